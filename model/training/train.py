"""Training: MSE on simulated Rician-noisy 2.5D patches, one forward pass per sample.

A run lives in a folder (``runs/<name>``): ``train.log``, ``metrics.jsonl`` (one line per
validation), ``state.pt`` (everything needed to resume: weights, EMA, optimiser, RNG states,
step; tensors and plain types only, read back with ``weights_only=True``), ``last.safetensors``
and ``best.safetensors`` (EMA weights plus the model card, best by validation PSNR).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from denoised_node.model.checkpoint import ModelCard, write_checkpoint
from denoised_node.model.hyperparameters import (
    HYPERPARAMETERS,
    LOSS_WEIGHTINGS,
    TRAINING,
    default_config,
)
from denoised_node.model.inference import noise_map_factor, uses_noise_map
from denoised_node.model.network import DenoiseNet, build_network, count_parameters, widen_input
from denoised_node.model.noise import estimate_sigma, robust_scale
from denoised_node.model.noise_map import noise_map
from denoised_node.model.schedule import NoiseSchedule
from denoised_node.model.training.data import (
    NAMED_VOLUMES,
    PatchSampler,
    SamplerConfig,
    Split,
    is_named_volume,
    load_mni_t2_like,
    load_named_volume,
    load_pair,
    load_training_volume,
    mni_maps,
    volume_maps,
)
from denoised_node.model.training.synth import Batch, SynthConfig, Synthesizer
from denoised_node.model.training.validation import (
    VALIDATION_NOISE_SEED,
    DomainValidator,
    Validator,
    domain_validator,
)

logger = logging.getLogger(__name__)

MODEL_VERSION = "1.0"
DEFAULT_VOLUMES = ("mni152-t1", "mni152-scalp", "inia19-macaque")


@dataclass
class TrainConfig:
    run_dir: Path
    kind: str = HYPERPARAMETERS.kind
    name: str = "unet25d"
    # Named sources (data.NAMED_VOLUMES) or paths; each volume gets an equal share of the
    # anatomy samples.
    volumes: list[str] = field(default_factory=lambda: list(DEFAULT_VOLUMES))
    pairs: list[tuple[str, str]] = field(default_factory=list)  # real (noisy, clean) pairs instead
    steps: int | None = 6000  # None: train until the time budget is spent
    time_budget_s: float | None = None  # wall-clock budget; the schedule follows elapsed time
    batch_size: int = TRAINING.batch_size
    patch: int = HYPERPARAMETERS.patch
    lr: float = TRAINING.lr
    warmup: int = TRAINING.warmup
    min_lr_ratio: float = 0.03
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = TRAINING.seed
    threads: int = TRAINING.threads
    device: str = "cpu"
    amp: bool = True
    val_every: int = TRAINING.val_every
    save_every_s: float = 300.0
    holdout: int = TRAINING.holdout
    gap: int = TRAINING.gap
    sigma_range: tuple[float, float] = HYPERPARAMETERS.sigma_range
    val_noise: tuple[float, ...] = (0.01, 0.05, 0.09)
    arch: dict[str, Any] | None = None  # overrides default_config(kind)
    log_every: int = 25
    command: str = ""
    init_from: str | None = None  # start from these weights (fine-tuning), with a fresh schedule
    prefetch: int = 2  # batches synthesised ahead, in a thread
    # The synthesiser's constant mixture (synth.SynthConfig): dead leaves, organ-like volumes.
    dead_leaves_prob: float = SynthConfig.dead_leaves_prob
    procedural_prob: float = SynthConfig.procedural_prob
    # "relative": each sample's squared error over its input's (the identity's), so that every
    # sample counts alike whatever its noise level and kind (the loss is the mean ratio to
    # the noisy input: 1 for the identity); "inverse_variance": over its sigma^2; "none".
    loss_weighting: str = "relative"

    def __post_init__(self) -> None:
        if self.steps is None and self.time_budget_s is None:
            raise ValueError("give a number of steps, a time budget, or both")


def _load_volumes(specs: list[str]) -> list[np.ndarray]:
    return [load_named_volume(s) if is_named_volume(s) else load_training_volume(s) for s in specs]


def _volume_name(spec: str) -> str:
    return spec if is_named_volume(spec) else Path(spec).name.split(".")[0]


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products natively (avx512_bf16 or AMX): autocast to
    bf16 is then about 1.5x faster per step; elsewhere it is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def sample_weights(noisy: torch.Tensor, clean: torch.Tensor, sigma: torch.Tensor,
                   cfg: TrainConfig) -> torch.Tensor | None:
    """Per-sample loss weights (constants, no gradient); None for plain MSE.

    - ``relative``: 1 / the squared error of the noisy input itself (its centre slice, or every
      slice of a 3D target), floored at (sigma / 2)^2 so that a patch of zeroed background does
      not weigh without bound. Why not 1/sigma^2 alone: the input's error is 0.7-40 sigma^2
      across noise kinds (a sum-of-squares floor, a g-factor map), and under 1/sigma^2 five
      samples in a hundred carried a third of the loss; a run at lr 1e-3 diverged in fp32.
    - ``inverse_variance``: (sigma_ref / sigma)^2, sigma_ref the range's geometric mean.
    Where a sample's sigma is unknown (real pairs) ``relative`` uses no floor and
    ``inverse_variance`` gives None."""
    if cfg.loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(
            f"unknown loss weighting {cfg.loss_weighting!r}; known: {', '.join(LOSS_WEIGHTINGS)}"
        )
    if cfg.loss_weighting == "none":
        return None
    known = bool(torch.isfinite(sigma).all())
    if cfg.loss_weighting == "inverse_variance":
        if not known:
            return None
        ref = math.sqrt(cfg.sigma_range[0] * cfg.sigma_range[1])
        return (ref / sigma.clamp_min(1e-4)).pow(2)
    if clean.ndim == 5:  # 3D: every slice is a target
        identity = noisy[:, None]
    else:
        half = noisy.shape[1] // 2
        identity = noisy[:, half : half + 1]
    err = (identity.float() - clean.float()).pow(2).flatten(1).mean(1)
    floor = (0.5 * sigma).pow(2) if known else torch.full_like(err, 1e-8)
    return 1.0 / torch.maximum(err, floor.clamp_min(1e-8))


def weighted_mse(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    if weights is None:
        return torch.nn.functional.mse_loss(pred, target)
    per_sample = (pred - target).pow(2).flatten(1).mean(1)
    return (per_sample * weights).mean()


def load_run_config(run_dir: Path) -> TrainConfig:
    """The config a run was started with (its config.json): a resumed run keeps its schedule."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{run_dir} holds no run (no config.json); start one with --run-dir"
        )
    raw = json.loads(path.read_text())
    known = {f.name for f in TrainConfig.__dataclass_fields__.values()}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path} has keys this version does not know: {', '.join(unknown)}")
    for key in ("sigma_range", "val_noise"):
        if key in raw and raw[key] is not None:
            raw[key] = tuple(raw[key])
    raw["pairs"] = [tuple(p) for p in raw.get("pairs", [])]
    raw["run_dir"] = Path(run_dir)
    return TrainConfig(**raw)


def _progress(step: int, wall: float, cfg: TrainConfig) -> float:
    """How far the run is, 0..1: by steps, or by wall-clock time, whichever is further."""
    fracs = []
    if cfg.steps:
        fracs.append(step / cfg.steps)
    if cfg.time_budget_s:
        fracs.append(wall / cfg.time_budget_s)
    return min(1.0, max(fracs))


def _lr_at(step: int, cfg: TrainConfig, wall: float = 0.0) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.time_budget_s:
        frac = _progress(step, wall, cfg)
    else:
        frac = min(1.0, (step - cfg.warmup) / max(1, (cfg.steps or 1) - cfg.warmup))
    return cfg.lr * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    )


def _machine() -> dict[str, Any]:
    return {
        "host_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def training_sources(cfg: TrainConfig) -> dict[str, str]:
    """Every source of the training data and what it is, for the model card."""
    if cfg.pairs:
        return {f"{n} -> {c}": "real noisy/clean pair" for n, c in cfg.pairs}
    found = {s: NAMED_VOLUMES.get(s, "a clean volume given with --volume") for s in cfg.volumes}
    if cfg.dead_leaves_prob > 0:
        found["dead leaves"] = (
            f"procedural ({cfg.dead_leaves_prob:.0%} of samples, model/training/dead_leaves.py)"
        )
    if cfg.procedural_prob > 0:
        found["organ-like volumes"] = (
            f"procedural ({cfg.procedural_prob:.0%} of samples, synth.procedural_maps)"
        )
    return found


def make_card(
    cfg: TrainConfig,
    arch: dict[str, Any],
    schedule: NoiseSchedule,
    record: dict[str, Any],
    metrics: dict[str, Any],
) -> ModelCard:
    return ModelCard(
        name=cfg.name,
        version=MODEL_VERSION,
        architecture=arch,
        schedule=schedule.to_dict(),
        normalisation={
            "input": "volume / p99.5(volume); output * the same scale",
            "sigma_estimator": (
                "noise_map.noise_map on the normalised slice: per-tile Haar MAD away from edges, "
                "zeroed blocks left out, trusted where the signal is well above the noise, "
                "corrected for correlated noise; timestep from its median, map channel from the map"
                if arch.get("noise_estimator") == "noise_map"
                else "per-slice Haar diagonal MAD / 0.6745 on the normalised slice"
            ),
        },
        training={
            "data": [f"{n} -> {c}" for n, c in cfg.pairs] if cfg.pairs else cfg.volumes,
            "sources": training_sources(cfg),
            "holdout": {"slab": cfg.holdout, "gap": cfg.gap, "axis": "slice"},
            "noise": {"kind": "real pairs"}
            if cfg.pairs
            else {
                "kind": "domain-randomised synthesis (model/training/synth.py)",
                "sigma_fraction_of_bright_level": list(cfg.sigma_range),
                "synthesis": asdict(
                    SynthConfig(
                        patch=cfg.patch,
                        sigma_range=cfg.sigma_range,
                        dead_leaves_prob=cfg.dead_leaves_prob,
                        procedural_prob=cfg.procedural_prob,
                    )
                ),
                "loss_weighting": cfg.loss_weighting,
            },
            "patch": cfg.patch,
            "time_budget_s": cfg.time_budget_s,
            "batch_size": cfg.batch_size,
            "loss": "mse",
            "optimiser": {
                "kind": "adam",
                "lr": cfg.lr,
                "warmup": cfg.warmup,
                "schedule": "cosine",
                "ema": cfg.ema_decay,
            },
            "seed": cfg.seed,
            "command": cfg.command,
            "machine": _machine(),
            **record,
        },
        metrics=metrics,
    )


def initial_lineage(card: ModelCard) -> dict[str, Any]:
    """What a fine-tuned card says of the checkpoint it started from."""
    keys = ("steps", "wall_seconds", "commands", "machine", "initialised_from")
    return {"identity": card.identity, **{k: card.training[k] for k in keys if k in card.training}}


def _initial_weights(path: str, kind: str) -> tuple[ModelCard, dict[str, torch.Tensor]]:
    """Read a checkpoint to fine-tune from; it must be of the kind being trained."""
    from denoised_node.model.card import resolve_checkpoint
    from denoised_node.model.checkpoint import read_checkpoint

    card, tensors = read_checkpoint(resolve_checkpoint(path))
    if card.architecture.get("kind") != kind:
        raise ValueError(
            f"{path} holds a {card.architecture.get('kind')} model; this run trains {kind}"
        )
    return card, tensors


def _sources(cfg: TrainConfig, in_slices: int, device: torch.device
             ) -> tuple[Any, list[np.ndarray], np.ndarray | None, np.ndarray | None]:
    """The batch source (domain-randomised synthesis, or real pairs), the clean volumes, the
    first pair's noisy volume, and the T2-like validation contrast."""
    if cfg.pairs:  # real noisy/clean pairs: the noise is what the scanner made
        pairs = [load_pair(n, c) for n, c in cfg.pairs]
        vols = [c for _, c in pairs]
        noisy_blocks = [
            b for n, c in pairs for b in Split(c.shape[0], cfg.holdout, cfg.gap).training_blocks(n)
        ]
        scales = [
            robust_scale(n)
            for n, c in pairs
            for _ in Split(c.shape[0], cfg.holdout, cfg.gap).training_blocks(c)
        ]
        blocks = [
            b for v in vols for b in Split(v.shape[0], cfg.holdout, cfg.gap).training_blocks(v)
        ]
        sampler_cfg = SamplerConfig(
            patch=cfg.patch, in_slices=in_slices, axis_probs=(1.0, 0.0, 0.0), stride2_prob=0.0
        )
        rng = np.random.default_rng(cfg.seed)
        return (
            PairBatches(
                PatchSampler(
                    blocks, scales, NoiseSchedule(), sampler_cfg, rng, noisy_blocks=noisy_blocks
                ),
                device,
            ),
            vols,
            pairs[0][0],
            None,
        )
    vols = _load_volumes(cfg.volumes)
    maps = [
        mni_maps() if spec == "mni152-t1" else volume_maps(v) for spec, v in zip(cfg.volumes, vols)
    ]
    blocks, weights = [], []
    for m, v in zip(maps, vols):
        ranges = Split(v.shape[0], cfg.holdout, cfg.gap).training_ranges()
        total = sum(hi - lo for lo, hi in ranges)
        for lo, hi in ranges:  # each volume an equal share, its blocks by size
            blocks.append(m[:, lo:hi])
            weights.append((hi - lo) / total)
    synth_cfg = SynthConfig(
        patch=cfg.patch,
        in_slices=in_slices,
        sigma_range=cfg.sigma_range,
        dead_leaves_prob=cfg.dead_leaves_prob,
        procedural_prob=cfg.procedural_prob,
    )
    synth = Synthesizer(blocks, synth_cfg, device, cfg.seed, block_weights=weights)
    t2 = load_mni_t2_like() if "mni152-t1" in cfg.volumes else None
    return synth, vols, None, t2


def build_validator(cfg: TrainConfig, vols: list[np.ndarray], pair_noisy: np.ndarray | None,
                    t2: np.ndarray | None, in_slices: int, families: bool) -> DomainValidator:
    """The run's validation domains (``validation.domain_validator``), or a real pair's slices."""
    if cfg.pairs:
        rows = Split(vols[0].shape[0], cfg.holdout, cfg.gap).validation
        return DomainValidator(
            {
                "paired": Validator(
                    vols[0],
                    rows,
                    cfg.val_noise,
                    in_slices,
                    VALIDATION_NOISE_SEED,
                    noisy=pair_noisy,
                    families=families,
                )
            }
        )
    return domain_validator(
        [_volume_name(s) for s in cfg.volumes],
        vols,
        t2,
        in_slices,
        VALIDATION_NOISE_SEED,
        levels=cfg.val_noise,
        holdout=cfg.holdout,
        gap=cfg.gap,
        leaves=cfg.dead_leaves_prob > 0,
        families=families,
    )


class PairBatches:
    """The real-pair sampler (numpy) behind the synthesiser's interface."""

    def __init__(self, sampler: PatchSampler, device: torch.device) -> None:
        self.sampler = sampler
        self.device = device

    def batch(self, n: int, all_slices: bool = False) -> Batch:
        x, y, _, sig = self.sampler.batch(n)
        return Batch(torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device),
                     torch.from_numpy(sig).to(self.device))


class Prefetcher:
    """Draws batches in a thread while the network trains on the previous ones (torch ops
    release the GIL), ``depth`` batches ahead."""

    def __init__(self, source: Any, batch_size: int, depth: int, all_slices: bool) -> None:
        self.source, self.batch_size, self.all_slices = source, batch_size, all_slices
        self.queue: queue.Queue[Batch | BaseException] = queue.Queue(maxsize=max(1, depth))
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="batch-prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                item: Batch | BaseException = self.source.batch(
                    self.batch_size, all_slices=self.all_slices
                )
            except BaseException as exc:  # noqa: BLE001 - re-raised in the training thread
                item = exc
            while not self.stopping.is_set():
                try:
                    self.queue.put(item, timeout=0.2)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def next(self) -> Batch:
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)


def network_inputs(net: DenoiseNet, noisy: torch.Tensor, schedule: NoiseSchedule
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's input and timesteps for a normalised batch of slices (B, S, P, P), read
    the way inference reads them (``inference.noise_inputs``), on the batch's device."""
    if net.spatial_dims == 3:
        b, d, h, w = noisy.shape
        x = noisy[:, None]
        if not uses_noise_map(net):
            sig = [
                float(np.median([estimate_sigma(s) for s in v]))
                for v in noisy.detach().cpu().numpy()
            ]
            return x, torch.tensor(schedule.timestep(np.array(sig)), device=noisy.device)
        nm = noise_map(noisy.reshape(b * d, h, w))
        k = noise_map_factor(net)
        t = schedule.timestep_torch(k * nm.sigma.reshape(b, d)).median(dim=1).values
        if net.map_channel:
            local = schedule.timestep_torch(k * nm.sigma_map.reshape(b, 1, d, h, w)) / (
                schedule.num_steps - 1
            )
            x = torch.cat([x, local], dim=1)
        return x, t
    centre = noisy[:, net.in_slices // 2]
    if not uses_noise_map(net):
        sigmas = np.array([estimate_sigma(s) for s in centre.detach().cpu().numpy()],
                          dtype=np.float32)
        return noisy, torch.from_numpy(schedule.timestep(sigmas)).to(noisy.device)
    nm = noise_map(centre)
    k = noise_map_factor(net)
    t = schedule.timestep_torch(k * nm.sigma)
    if net.map_channel:
        local = schedule.timestep_torch(k * nm.sigma_map) / (schedule.num_steps - 1)
        noisy = torch.cat([noisy, local[:, None]], dim=1)
    return noisy, t


def _architecture(
    cfg: TrainConfig, start: tuple[ModelCard, dict[str, torch.Tensor]] | None
) -> dict[str, Any]:
    """The run's architecture: given, or the start checkpoint's with today's noise inputs, or
    the default."""
    if cfg.arch:
        return cfg.arch
    if start:
        base = default_config(cfg.kind)
        keys = ("noise_estimator", "noise_map_channel")
        return {**start[0].architecture, **{k: base[k] for k in keys if k in base}}
    return default_config(cfg.kind)


def train(cfg: TrainConfig, *, resume: bool = False,
          progress: Callable[[int, int], None] | None = None) -> Path:
    """Train (or resume) a run; return the path of its best checkpoint. ``progress(done,
    total)``: steps of ``cfg.steps``, or seconds of the time budget, at each log line."""
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, cfg.threads))
    device = torch.device(
        cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    torch.manual_seed(cfg.seed)

    # Read on resume too: the architecture and the lineage come from its card.
    start = _initial_weights(cfg.init_from, cfg.kind) if cfg.init_from else None
    arch = _architecture(cfg, start)
    schedule = NoiseSchedule()
    net = build_network(arch).to(device)
    ema = build_network(arch).to(device)
    depth = (
        int(arch.get("block_depth", HYPERPARAMETERS.block_depth))
        if net.spatial_dims == 3
        else net.in_slices
    )
    source, vols, pair_noisy, t2 = _sources(cfg, depth, device)
    validator = build_validator(
        cfg, vols, pair_noisy, t2, net.in_slices, families=uses_noise_map(net)
    )

    if start and not (resume and (run / "state.pt").exists()):
        weights = widen_input({k: v.float() for k, v in start[1].items()}, net)
        net.load_state_dict(weights)
        logger.info("starting from %s (%s)", cfg.init_from, start[0].identity)
    ema.load_state_dict(net.state_dict())
    ema.eval()
    on_gpu = device.type == "cuda"
    if on_gpu:  # channels_last suits the GPU's convolutions (on a CPU it did not help)
        net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs lack it
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    # bf16 autocast, fp32 master weights (the optimiser's): on a GPU that has bf16, and on a
    # CPU with native bf16 (1.08 against 1.63 s a step here; docs/model.md has the A/B).
    # The 3D variant is left in fp32 on a CPU: its first bf16 step there gave NaN weights.
    use_amp = cfg.amp and (torch.cuda.is_bf16_supported() if on_gpu
                           else cpu_has_bf16() and net.spatial_dims == 2)
    step, best, wall = 0, -math.inf, 0.0
    commands: list[str] = []
    state_path = run / "state.pt"
    if resume and state_path.exists():
        st = torch.load(state_path, map_location=device, weights_only=True)
        net.load_state_dict(st["net"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        step, best, wall = int(st["step"]), float(st["best"]), float(st["wall"])
        torch.set_rng_state(st["torch_rng"])
        if "synth_rng" in st and isinstance(source, Synthesizer):
            source.gen.set_state(st["synth_rng"])
        commands = json.loads(st.get("commands", "[]"))
        logger.info("resumed %s at step %d (best val %.3f dB)", run, step, best)
    elif state_path.exists():
        raise FileExistsError(
            f"{run} already holds a run; pass --resume to continue it or pick another folder"
        )
    commands.append(f"{cfg.command} (from step {step})")
    (run / "config.json").write_text(json.dumps(asdict(cfg), default=str, indent=2))
    budget = (f"{cfg.steps} steps" if cfg.steps else "") + (
        f"{' or ' if cfg.steps else ''}{cfg.time_budget_s / 60:.0f} min"
        if cfg.time_budget_s
        else ""
    )
    logger.info(
        "training %s (%s, %.2f M parameters) for %s on %s, %d thread(s), %s",
        cfg.name, cfg.kind, count_parameters(net) / 1e6, budget, device, torch.get_num_threads(),
        "bf16 autocast" if use_amp else "fp32",
    )

    def save_state() -> None:
        tmp = state_path.with_suffix(".tmp")
        extra = {"synth_rng": source.gen.get_state()} if isinstance(source, Synthesizer) else {}
        torch.save(
            {
                "net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "step": step, "best": best, "wall": wall, "torch_rng": torch.get_rng_state(),
                "commands": json.dumps(commands), **extra,
            },
            tmp,
        )
        tmp.replace(state_path)

    def export(path: Path, metrics: dict[str, Any]) -> None:
        record = {"steps": step, "wall_seconds": round(wall), "parameters": count_parameters(ema),
                  "commands": commands}
        if start:  # fine-tuned: keep the lineage of the weights it started from
            record["initialised_from"] = initial_lineage(start[0])
        write_checkpoint(
            path,
            {k: v for k, v in ema.state_dict().items()},
            make_card(cfg, arch, schedule, record, metrics),
        )

    def finished() -> bool:
        return _progress(step, wall, cfg) >= 1.0

    stop = _StopFlag()
    prefetch = Prefetcher(source, cfg.batch_size, cfg.prefetch, all_slices=net.spatial_dims == 3)
    ema_params: list[torch.Tensor] = list(ema.parameters())
    net_params = list(net.parameters())
    last_save = time.monotonic()
    loss_sum = torch.zeros((), device=device)
    loss_avg: float | None = None
    t_mark, s_mark = time.perf_counter(), step
    try:
        while not finished() and not stop.requested:
            t_step = time.perf_counter()
            batch = prefetch.next()
            xt, tt = network_inputs(net, batch.noisy, schedule)
            yt = batch.clean
            if on_gpu:
                xt = xt.contiguous(memory_format=torch.channels_last) if xt.ndim == 4 else xt
            lr = _lr_at(step, cfg, wall)
            for g in opt.param_groups:
                g["lr"] = lr
            net.train()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                pred = net(xt, tt)
            loss = weighted_mse(pred.float(), yt, sample_weights(batch.noisy, yt, batch.sigma, cfg))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net_params, cfg.grad_clip)
            opt.step()
            with torch.no_grad():
                d = min(cfg.ema_decay, (1 + step) / (10 + step))
                torch._foreach_lerp_(ema_params, [p.detach() for p in net_params], 1 - d)
                loss_sum += loss.detach()
            step += 1
            wall += time.perf_counter() - t_step
            if step % cfg.log_every == 0:  # the only host sync between validations
                mean_loss = float(loss_sum) / cfg.log_every
                loss_sum.zero_()
                loss_avg = mean_loss if loss_avg is None else 0.7 * loss_avg + 0.3 * mean_loss
                rate = (time.perf_counter() - t_mark) / max(1, step - s_mark)
                t_mark, s_mark = time.perf_counter(), step
                frac = _progress(step, wall, cfg)
                left = (wall / frac - wall) if frac > 0 else float("nan")
                logger.info(
                    "step %d (%.1f %%, about %.0f min left) loss %.3e lr %.2e %.2f s/step, "
                    "%d thread(s), load %.2f",
                    step,
                    100 * frac,
                    left / 60,
                    loss_avg,
                    lr,
                    rate,
                    torch.get_num_threads(),
                    os.getloadavg()[0],
                )
                if progress is not None:
                    progress(*((step, cfg.steps) if cfg.steps else
                               (round(wall), round(cfg.time_budget_s or wall))))
            if step % cfg.val_every == 0 or finished():
                metrics = validator.run(ema, schedule, device)
                line = {"step": step, "wall_s": round(wall), "loss": loss_avg, **metrics}
                with open(run / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(line) + "\n")
                logger.info("validation step %d: %s", step, json.dumps(metrics))
                export(run / "last.safetensors", {"validation": metrics})
                if metrics["psnr_mask_mean"] > best:
                    best = metrics["psnr_mask_mean"]
                    export(run / "best.safetensors", {"validation": metrics})
                save_state()
                last_save = time.monotonic()
            elif time.monotonic() - last_save > cfg.save_every_s:
                save_state()
                last_save = time.monotonic()
    finally:
        prefetch.close()
    save_state()
    stop.restore()
    if stop.requested:
        logger.info(
            "stopped %s at step %d on a signal; state saved, continue with --resume", run, step
        )
    else:
        logger.info("finished %s at step %d, best validation %.3f dB", run, step, best)
    return run / "best.safetensors"


class _StopFlag:
    """SIGTERM/SIGINT ask the loop to save its state and stop after the current step."""

    def __init__(self) -> None:
        import signal
        import threading

        self.requested = False
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True

    def restore(self) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)


_RUN_HANDLERS: list[logging.Handler] = []


def setup_run_logging(run_dir: Path) -> None:
    """Log to runs/<name>/train.log and stderr (for the CLI); replaces a previous run's handlers."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    while _RUN_HANDLERS:
        old = _RUN_HANDLERS.pop()
        root.removeHandler(old)
        old.close()
    for h in (logging.FileHandler(run_dir / "train.log"), logging.StreamHandler(sys.stderr)):
        h.setFormatter(fmt)
        root.addHandler(h)
        _RUN_HANDLERS.append(h)
