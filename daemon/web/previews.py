"""The series page's pictures and safety-gate figures, made from the files in the store:
the middle slice of one stack before denoising (the received instances), after (the job's
derived instances), and the residual (before - after), with the gate's figures recomputed on
the slices the worker's gate looks at.

The derived files hold the output rounded to stored values, so the figures may differ a
little from the worker's own. preview_cache.py makes them, one at a time, off the HTTP
request threads, and keeps them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from denoised_node.config.settings import GateSettings
from denoised_node.daemon.web.png import residual_spread, to_png, window
from denoised_node.storage.images.series import Stack, StackPlan, load_volume, plan_stacks

KINDS = ("before", "after", "residual")
GATE_SLICES = 32  # model.gate.MAX_SLICES (importing it imports torch: done only when needed)


@dataclass(frozen=True)
class PreviewInput:
    """What the database says about a job's files (read in the page's session)."""

    job_id: int
    version: str  # changes whenever the job, or the series under it, changes
    source_paths: tuple[Path, ...]
    derived_paths: tuple[Path, ...] | None  # None: the job has no derived series (yet)
    derived_missing: str = ""  # why the derived series cannot be shown
    refused: bool = False  # derived_paths: the result the safety gate refused, not sent


@dataclass(frozen=True)
class GateRow:
    figure: str
    meaning: str
    value: float
    limit: str  # "" for figures the gate reports but does not judge
    ok: bool | None


@dataclass(frozen=True)
class Preview:
    stacks: tuple[str, ...] = ()  # the source's stacks, by label
    stack: int = 0
    slice_index: int = 0
    depth: int = 0
    images: dict[str, bytes] = field(default_factory=dict)
    residual_spread: float = 0.0
    gate_passed: bool | None = None
    gate_reason: str = ""
    gate_rows: tuple[GateRow, ...] = ()
    notes: tuple[str, ...] = ()  # what could not be shown, and why
    pending: bool = False  # being made: the page reloads, the pictures answer 503
    refused: bool = False  # "after" is the result the safety gate refused: never sent


def _sample(depth: int) -> list[int]:
    """The slices the gate measures (model.gate.measure subsamples the same way)."""
    if depth <= GATE_SLICES:
        return list(range(depth))
    return [int(i) for i in np.linspace(0, depth - 1, GATE_SLICES).round().astype(int)]


def _load(stack: Stack, indices: Sequence[int]) -> np.ndarray:
    part = Stack(stack.rows, stack.columns, tuple(stack.slices[i] for i in indices), stack.label,
                 stack.pixel_spacing)
    return load_volume(part)


def _matching(plan: StackPlan, stack: Stack) -> Stack | None:
    for candidate in plan.stacks:
        if candidate.label == stack.label and candidate.depth == stack.depth:
            return candidate
    return None


def make_preview(source: PreviewInput, stack_index: int, gate: GateSettings) -> Preview:
    plan = plan_stacks(source.source_paths)
    if not plan.stacks:
        reasons = sorted({reason for _, reason in plan.skipped}) or ["no stored images"]
        return Preview(notes=(f"Nothing to show: {'; '.join(reasons)}.",))
    labels = tuple(stack.label for stack in plan.stacks)
    index = min(max(stack_index, 0), len(plan.stacks) - 1)
    stack = plan.stacks[index]
    middle = stack.depth // 2
    sample = _sample(stack.depth)
    wanted = sorted(set(sample) | {middle})
    before = _load(stack, wanted)
    row_of = {slice_index: row for row, slice_index in enumerate(wanted)}
    low, high = window(before[row_of[middle]])
    images = {"before": to_png(before[row_of[middle]], low, high)}
    base = Preview(labels, index, middle, stack.depth, images, refused=source.refused)
    notes = []
    derived_stack = None
    if source.derived_paths is None:
        notes.append(source.derived_missing or "No derived series for this job.")
    else:
        derived_stack = _matching(plan_stacks(source.derived_paths), stack)
        if derived_stack is None and source.refused:
            notes.append("Only the stack the safety gate refused was kept; pick it above.")
        elif derived_stack is None:
            notes.append("The derived series does not match the stored series any more "
                         "(instances arrived after this job); replay it to compare.")
    if derived_stack is None:
        return replace(base, notes=tuple(notes))
    after = _load(derived_stack, wanted)
    residual = before[row_of[middle]] - after[row_of[middle]]
    spread = residual_spread(residual)
    images = {**images, "after": to_png(after[row_of[middle]], low, high),
              "residual": to_png(residual, -spread, spread)}
    rows = [row_of[i] for i in sample]
    passed, reason, gate_rows = gate_figures(before[rows], after[rows], gate)
    return Preview(labels, index, middle, stack.depth, images, spread, passed, reason,
                   gate_rows, tuple(notes), refused=source.refused)


def gate_figures(before: np.ndarray, after: np.ndarray,
                 gate: GateSettings) -> tuple[bool, str, tuple[GateRow, ...]]:
    from denoised_node.model.gate import check_result  # imports torch: only here

    verdict = check_result(before, after, gate)
    f = verdict.figures
    if not f:
        return verdict.passed, verdict.reason, ()
    from denoised_node.model.gate import CHECKS

    rows = tuple(GateRow(c.figure, c.meaning, f[c.figure], c.bound_text(gate),
                         c.passes(f[c.figure], gate)) for c in CHECKS) + (
        GateRow("sigma_estimate", "estimated noise sigma (physical units)",
                f["sigma_estimate"], "", None),
        GateRow("tissue_fraction", "fraction of pixels taken as tissue",
                f["tissue_fraction"], "", None),
    )
    return verdict.passed, verdict.reason, rows
