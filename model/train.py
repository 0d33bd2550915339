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
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import ModelCard, write_checkpoint
from .data import (
    PatchSampler,
    SamplerConfig,
    Split,
    foreground_mask,
    load_mni_t1,
    load_pair,
    load_volume,
)
from .inference import denoise_volume
from .metrics import psnr, ssim
from .network import build_network, count_parameters, default_config
from .noise import add_rician, robust_scale
from .schedule import NoiseSchedule

logger = logging.getLogger(__name__)

MODEL_VERSION = "1.0"


@dataclass
class TrainConfig:
    run_dir: Path
    kind: str = "diffusion_unet"
    name: str = "unet25d"
    volumes: list[str] = field(default_factory=lambda: ["mni152-t1"])
    pairs: list[tuple[str, str]] = field(default_factory=list)  # real (noisy, clean) pairs instead
    steps: int = 6000
    batch_size: int = 12
    patch: int = 128
    lr: float = 1e-3
    warmup: int = 300
    min_lr_ratio: float = 0.03
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 20240611
    threads: int = 1
    device: str = "cpu"
    amp: bool = True
    val_every: int = 250
    save_every_s: float = 300.0
    holdout: int = 24
    gap: int = 8
    sigma_range: tuple[float, float] = (0.005, 0.12)
    val_noise: tuple[float, ...] = (0.01, 0.05, 0.09)
    arch: dict[str, Any] | None = None  # overrides default_config(kind)
    log_every: int = 25
    command: str = ""
    init_from: str | None = None  # start from these weights (fine-tuning), with a fresh schedule


def _load_volumes(specs: list[str]) -> list[np.ndarray]:
    vols = []
    for spec in specs:
        vols.append(load_mni_t1() if spec == "mni152-t1" else load_volume(spec))
    return vols


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


class Validator:
    """Fixed noisy validation volumes (slices in the gap, never trained on), fixed seeds."""

    def __init__(
        self,
        vol: np.ndarray,
        split: Split,
        levels: tuple[float, ...],
        in_slices: int,
        seed: int,
        noisy: np.ndarray | None = None,
    ) -> None:
        """Simulated noise at ``levels``, or the real ``noisy`` volume of a pair."""
        a, b = split.validation
        half = in_slices // 2
        lo, hi = max(0, a - half), min(vol.shape[0], b + half)
        self.clean = vol[lo:hi]
        self.inner = slice(a - lo, b - lo)
        rng = np.random.default_rng(seed)
        if noisy is None:
            self.cases = [(f"{round(lvl * 100)}%", add_rician(self.clean, lvl * float(vol.max()), rng)) for lvl in levels]
        else:
            self.cases = [("paired", noisy[lo:hi])]
        self.mask = foreground_mask(self.clean)[self.inner]
        self.range = float(vol.max())

    def run(self, net: torch.nn.Module, schedule: NoiseSchedule, device: torch.device) -> dict[str, float]:
        out: dict[str, float] = {}
        c = self.clean[self.inner]
        for key, noisy in self.cases:
            den = denoise_volume(net, noisy, schedule, device=device, batch_size=8)[self.inner]  # type: ignore[arg-type]
            out[f"psnr_mask_{key}"] = round(psnr(c, den, self.range, self.mask), 3)
            out[f"ssim_mask_{key}"] = round(ssim(c, den, self.range, self.mask), 4)
        out["psnr_mask_mean"] = round(float(np.mean([v for k, v in out.items() if k.startswith("psnr")])), 3)
        return out


def _machine() -> dict[str, Any]:
    return {
        "host_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def make_card(cfg: TrainConfig, arch: dict[str, Any], schedule: NoiseSchedule, record: dict[str, Any], metrics: dict[str, Any]) -> ModelCard:
    return ModelCard(
        name=cfg.name,
        version=MODEL_VERSION,
        architecture=arch,
        schedule=schedule.to_dict(),
        normalisation={
            "input": "volume / p99.5(volume); output * the same scale",
            "sigma_estimator": "per-slice Haar diagonal MAD / 0.6745 on the normalised slice",
        },
        training={
            "data": [f"{n} -> {c}" for n, c in cfg.pairs] if cfg.pairs else cfg.volumes,
            "holdout": {"slab": cfg.holdout, "gap": cfg.gap, "axis": "slice"},
            "noise": {"kind": "real pairs"} if cfg.pairs else {"kind": "rician", "sigma_fraction_of_max": list(cfg.sigma_range)},
            "patch": cfg.patch,
            "batch_size": cfg.batch_size,
            "loss": "mse",
            "optimiser": {"kind": "adam", "lr": cfg.lr, "warmup": cfg.warmup, "schedule": "cosine", "ema": cfg.ema_decay},
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
    from .checkpoint import read_checkpoint
    from .inference import resolve_checkpoint

    card, tensors = read_checkpoint(resolve_checkpoint(path))
    if card.architecture.get("kind") != kind:
        raise ValueError(f"{path} holds a {card.architecture.get('kind')} model; this run trains {kind}")
    return card, tensors


def _rng_state(rng: np.random.Generator) -> str:
    return json.dumps(rng.bit_generator.state)


def train(cfg: TrainConfig, *, resume: bool = False) -> Path:
    """Train (or resume) a run; return the path of its best checkpoint."""
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, cfg.threads))
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    # Read on resume too: the architecture and the lineage come from its card.
    start = _initial_weights(cfg.init_from, cfg.kind) if cfg.init_from else None
    arch = cfg.arch or (start[0].architecture if start else default_config(cfg.kind))
    schedule = NoiseSchedule()
    in_slices = int(arch.get("in_slices", 1))
    if cfg.pairs:  # real noisy/clean pairs: the noise is what the scanner made
        pairs = [load_pair(n, c) for n, c in cfg.pairs]
        vols = [c for _, c in pairs]
        noisy_blocks: list[np.ndarray] | None = [
            b for n, c in pairs for b in Split(c.shape[0], cfg.holdout, cfg.gap).training_blocks(n)
        ]
        scales = [robust_scale(n) for n, c in pairs for _ in Split(c.shape[0], cfg.holdout, cfg.gap).training_blocks(c)]
        sampler_cfg = SamplerConfig(patch=cfg.patch, in_slices=in_slices, axis_probs=(1.0, 0.0, 0.0), stride2_prob=0.0)
    else:
        vols = _load_volumes(cfg.volumes)
        noisy_blocks = None
        scales = [robust_scale(v) for v in vols for _ in Split(v.shape[0], cfg.holdout, cfg.gap).training_blocks(v)]
        sampler_cfg = SamplerConfig(patch=cfg.patch, in_slices=in_slices, sigma_range=cfg.sigma_range)
    split0 = Split(vols[0].shape[0], cfg.holdout, cfg.gap)
    blocks = [b for v in vols for b in Split(v.shape[0], cfg.holdout, cfg.gap).training_blocks(v)]
    sampler = PatchSampler(blocks, scales, schedule, sampler_cfg, rng, noisy_blocks=noisy_blocks)
    validator = Validator(
        vols[0], split0, cfg.val_noise, in_slices, cfg.seed + 1, noisy=pairs[0][0] if cfg.pairs else None
    )

    net = build_network(arch).to(device)
    ema = build_network(arch).to(device)
    if start and not (resume and (run / "state.pt").exists()):
        net.load_state_dict({k: v.float() for k, v in start[1].items()})
        logger.info("starting from %s (%s)", cfg.init_from, start[0].identity)
    ema.load_state_dict(net.state_dict())
    ema.eval()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    use_amp = cfg.amp and device.type == "cuda" and torch.cuda.is_bf16_supported()
    step, best, wall = 0, -math.inf, 0.0
    commands: list[str] = []
    state_path = run / "state.pt"
    if resume and state_path.exists():
        st = torch.load(state_path, map_location=device, weights_only=True)
        net.load_state_dict(st["net"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        step, best, wall = int(st["step"]), float(st["best"]), float(st["wall"])
        rng.bit_generator.state = json.loads(st["rng"])
        torch.set_rng_state(st["torch_rng"])
        commands = json.loads(st.get("commands", "[]"))
        logger.info("resumed %s at step %d (best val %.3f dB)", run, step, best)
    elif state_path.exists():
        raise FileExistsError(f"{run} already holds a run; pass --resume to continue it or pick another folder")
    commands.append(f"{cfg.command} (from step {step})")
    (run / "config.json").write_text(json.dumps(asdict(cfg), default=str, indent=2))
    logger.info(
        "training %s (%s, %.2f M parameters) for %d steps on %s, %d thread(s)",
        cfg.name, cfg.kind, count_parameters(net) / 1e6, cfg.steps, device, torch.get_num_threads(),
    )

    def save_state() -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save(
            {
                "net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "step": step, "best": best, "wall": wall, "rng": _rng_state(rng), "torch_rng": torch.get_rng_state(),
                "commands": json.dumps(commands),
            },
            tmp,
        )
        tmp.replace(state_path)

    def export(path: Path, metrics: dict[str, Any]) -> None:
        record = {"steps": step, "wall_seconds": round(wall), "parameters": count_parameters(ema),
                  "commands": commands}
        if start:  # fine-tuned: keep the lineage of the weights it started from
            record["initialised_from"] = initial_lineage(start[0])
        write_checkpoint(path, {k: v for k, v in ema.state_dict().items()}, make_card(cfg, arch, schedule, record, metrics))

    stop = _StopFlag()
    last_save = time.monotonic()
    loss_avg, t_mark, s_mark = None, time.perf_counter(), step
    while step < cfg.steps and not stop.requested:
        t_step = time.perf_counter()
        x, y, t, _ = sampler.batch(cfg.batch_size)
        xt, yt, tt = (torch.from_numpy(a).to(device) for a in (x, y, t))
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        net.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            pred = net(xt, tt)
        loss = torch.nn.functional.mse_loss(pred.float(), yt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.mul_(d).add_(pn.detach(), alpha=1 - d)
        step += 1
        wall += time.perf_counter() - t_step
        lv = float(loss.detach())
        loss_avg = lv if loss_avg is None else 0.95 * loss_avg + 0.05 * lv
        if step % cfg.log_every == 0:
            rate = (time.perf_counter() - t_mark) / max(1, step - s_mark)
            t_mark, s_mark = time.perf_counter(), step
            logger.info("step %d loss %.3e lr %.2e %.2f s/step", step, loss_avg, _lr_at(step, cfg), rate)
        if step % cfg.val_every == 0 or step == cfg.steps:
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
    save_state()
    stop.restore()
    if stop.requested:
        logger.info("stopped %s at step %d on a signal; state saved, continue with --resume", run, step)
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
