"""Denoise one series: stored files in, derived files out. Used by the worker and by the
offline `denoised-node denoise` command, so both write exactly the same objects."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from denoised_node.config.settings import GateSettings, ModelSettings, Settings
from denoised_node.model.noise_floor import under_noise_floor
from denoised_node.storage.images.derive import DerivationInfo, DerivedSeriesWriter
from denoised_node.storage.images.derived_uids import DerivedUIDs
from denoised_node.storage.images.recognise import DEFAULT_POLICY, InputPolicy
from denoised_node.storage.images.series import (
    NoNoiseToRemove,
    NothingToDenoise,
    SeriesError,
    Stack,
    StackPlan,
    flat_reason,
    load_volume,
    plan_stacks,
)

log = logging.getLogger(__name__)


class Denoises(Protocol):
    @property
    def identity(self) -> str: ...

    @property
    def card(self) -> Any: ...

    def denoise(self, volume: np.ndarray,
                progress: Callable[[int, int], None] | None = None,
                spacing: tuple[float, float, float] | None = None) -> np.ndarray: ...


class PermanentError(Exception):
    """Retrying cannot help (the input or the result is unacceptable); the job fails at once."""


class GateFailed(PermanentError):
    """The safety gate rejected the result; nothing was sent."""

    def __init__(self, message: str, checks: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.checks = checks  # gate_checks(): what failed, by name


@dataclass(frozen=True)
class SeriesOutcome:
    derived_series_uid: str
    files: list[Path]
    skipped: list[tuple[str, str]]
    gate_figures: list[dict[str, float]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # load, model, gate, write
    # Set when the gate refused a stack and the caller asked to keep the result for review.
    gate_refusal: str | None = None
    gate_checks: tuple[str, ...] = ()  # gate_checks() of that refusal

    def describe_seconds(self) -> str:
        return ", ".join(f"{stage} {value:.2f}" for stage, value in self.seconds.items())


def software_version() -> str:
    try:
        return version("denoised-node")
    except PackageNotFoundError:
        return "0+unknown"


def derivation_info(settings: Settings, denoiser: Denoises) -> DerivationInfo:
    card = denoiser.card
    return DerivationInfo(
        model_identity=denoiser.identity,
        model_name=str(getattr(card, "name", "denoiser")),
        model_version=str(getattr(card, "version", "")),
        software_version=software_version(),
        description_suffix=settings.series.description_suffix,
        transfer_syntax=settings.send.output_transfer_syntax,
        station_ae_title=settings.node.ae_title,
    )


def input_policy(settings: Settings) -> InputPolicy:
    return InputPolicy(mosaics=settings.series.mosaics, reformats=settings.series.reformats)


def plan_series(paths: Sequence[Path], policy: InputPolicy = DEFAULT_POLICY) -> StackPlan:
    plan = plan_stacks(paths, policy)
    if not plan.stacks:
        raise NothingToDenoise(_nothing(plan.skipped))
    return plan


def memory_refusal(stack: Stack, model: ModelSettings) -> str | None:
    """Why ``stack`` is too large for a worker's memory (model.max_slice_pixels,
    model.max_stack_mb), or None."""
    pixels = stack.rows * stack.columns
    if pixels > model.max_slice_pixels:
        return (f"slices of {stack.rows}x{stack.columns} pixels, over model.max_slice_pixels "
                f"({model.max_slice_pixels})")
    megabytes = stack.depth * pixels * 4 / 2**20
    if megabytes > model.max_stack_mb:
        return (f"{stack.depth} slices of {stack.rows}x{stack.columns}: {megabytes:.1f} MB as "
                f"float32, over model.max_stack_mb ({model.max_stack_mb})")
    return None


def _under_noise_floor(volume: np.ndarray, denoiser: Denoises) -> str | None:
    intended = getattr(getattr(denoiser, "card", None), "intended_use", None) or {}
    return under_noise_floor(volume, intended)


def _nothing(skipped: list[tuple[str, str]]) -> str:
    reasons = sorted({reason for _, reason in skipped}) or ["no images"]
    return f"nothing to denoise: {'; '.join(reasons)}"


def denoise_series(paths: Sequence[Path], source_series_uid: str, denoiser: Denoises,
                   settings: Settings, out_dir: Path, now: datetime,
                   progress: Callable[[int, int], None] | None = None,
                   hold_gate_failures: bool = False,
                   plan: StackPlan | None = None,
                   refused_dir: Path | None = None,
                   noise_floor: bool = True) -> SeriesOutcome:
    """Denoise every stack of the series and write the derived instances into ``out_dir``.

    Raises NothingToDenoise when no image is usable and GateFailed when a stack's result does
    not pass the safety gate (in that case nothing should be sent). With
    ``hold_gate_failures`` a refused result is written all the same, for a person to review,
    and the outcome's ``gate_refusal`` says why. ``plan``: the caller's plan_series of
    ``paths`` (the worker plans first, so that what a series is comes before the rules).
    ``refused_dir``: where a result the gate refuses (without holding it) is kept for people
    to look at: the refused stack only, so at most model.max_stack_mb's worth.
    ``noise_floor``: leave out a stack whose noise reads under the model's floor (its card's
    intended use; False where the intended use is overridden); when that leaves nothing,
    NoNoiseToRemove.
    """
    plan = plan or plan_series(paths, input_policy(settings))
    info = derivation_info(settings, denoiser)
    derived = DerivedUIDs.for_plan(info.model_identity, source_series_uid, plan)
    writer = DerivedSeriesWriter(out_dir, info, now, derived)
    total, done = plan.slice_count, 0
    figures: list[dict[str, float]] = []
    refusal: str | None = None
    refused_checks: tuple[str, ...] = ()
    seconds = dict.fromkeys(("load", "model", "gate", "write"), 0.0)
    clock = _StageClock(seconds)
    quiet_stacks = 0
    for stack in plan.stacks:
        too_big = memory_refusal(stack, settings.model)
        if too_big:  # never loaded: what cannot fit the limits is left out, not tried
            uids = dict.fromkeys(ref.sop_instance_uid for ref in stack.slices)
            plan.skipped += [(uid, f"{too_big}, stack {stack.label}") for uid in uids]
            done += stack.depth
            continue
        with clock("load"):
            volume = load_volume(stack)
        flat = flat_reason(volume)
        if flat:  # nothing for the network to do, and nothing the gate could judge
            uids = dict.fromkeys(ref.sop_instance_uid for ref in stack.slices)
            plan.skipped += [(uid, f"{flat}, stack {stack.label}") for uid in uids]
            writer.keep_unchanged(stack)
            done += stack.depth
            continue
        quiet = _under_noise_floor(volume, denoiser) if noise_floor else None
        if quiet:  # the model would change structure more than it removes noise
            uids = dict.fromkeys(ref.sop_instance_uid for ref in stack.slices)
            plan.skipped += [(uid, f"{quiet}, stack {stack.label}") for uid in uids]
            quiet_stacks += 1
            writer.keep_unchanged(stack)
            done += stack.depth
            continue
        offset = done

        def stack_progress(finished: int, _count: int, offset: int = offset) -> None:
            if progress:
                progress(offset + finished, total)

        with clock("model"):
            denoised = denoiser.denoise(volume, progress=stack_progress,
                                        spacing=stack.voxel_spacing)
        if settings.gate.enabled:
            from denoised_node.model.gate import check_result  # torch: only where it runs

            with clock("gate"):
                verdict = check_result(volume, denoised, settings.gate)
            figures.append(dict(verdict.figures))
            if not verdict.passed:
                failure = f"safety gate failed on stack {stack.label}: {verdict.reason}"
                if not hold_gate_failures:
                    if refused_dir is not None:
                        _keep_refused(refused_dir, info, now, derived, stack, denoised)
                    raise GateFailed(failure, gate_checks(verdict.figures, settings.gate))
                if refusal is None:
                    refusal, refused_checks = failure, gate_checks(verdict.figures, settings.gate)
        with clock("write"):
            writer.add_stack(stack, denoised)
        done += stack.depth
        del volume, denoised
    with clock("write"):
        files = writer.close()
    if not files:
        if quiet_stacks:
            raise NoNoiseToRemove(_nothing(plan.skipped))
        raise NothingToDenoise(_nothing(plan.skipped))
    for sop_uid, reason in plan.skipped:
        log.info("image skipped", extra={"sop_instance_uid": sop_uid, "reason": reason})
    return SeriesOutcome(derived.series_uid, files, plan.skipped, figures, seconds, refusal,
                         refused_checks)


def _keep_refused(folder: Path, info: DerivationInfo, now: datetime, derived: DerivedUIDs,
                  stack: Stack, denoised: np.ndarray) -> None:
    """Write the refused stack's derived images (classic ones, and multi-frame objects the
    stack fills) for the series page; the refusal stands if this fails."""
    try:
        DerivedSeriesWriter(folder, info, now, derived).add_stack(stack, denoised)
    except (OSError, SeriesError, ValueError) as exc:
        log.warning("could not keep the refused result: %s", exc, extra={"path": str(folder)})


def gate_checks(figures: Mapping[str, float], gate: GateSettings) -> tuple[str, ...]:
    """The names of the gate checks a refused result broke (model.gate CHECKS figures), by
    each check's own bound; ("output",) when the output itself was unusable (its shape
    changed, NaN or infinite values), which leaves no figures."""
    from denoised_node.model.gate import CHECKS

    broken = tuple(check.figure for check in CHECKS
                   if check.figure in figures and not check.passes(figures[check.figure], gate))
    return broken or ("output",)


class _StageClock:
    """Adds the wall time of each `with clock(stage):` block to ``seconds[stage]``."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - started
