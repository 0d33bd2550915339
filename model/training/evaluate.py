"""Evaluation on held-out data: noisy input, NLM, BM4D, the plain U-Net baseline, ours.

Test data: the central slab of the MNI152 T1 template (and of a T2-like contrast synthesised
from the tissue maps, never trained on), which training never saw; each method gets the slab
plus two slices either side as noisy input and is scored on the slab. Rician noise at
``levels`` (fractions of the clean max), one run per seed. NLM's h and BM4D's Rician bias
correction are tuned per level on validation slices in the gap (not the test slab).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from denoised_node.config.settings import SHIPPED_CHECKPOINT
from denoised_node.model.errors import CheckpointNotFoundError
from denoised_node.model.hyperparameters import TRAINING
from denoised_node.model.inference import Denoiser
from denoised_node.model.noise import add_rician
from denoised_node.model.training.baselines import bm4d_denoise, nlm_denoise
from denoised_node.model.training.data import Split, foreground_mask, load_mni_t1, load_mni_t2_like
from denoised_node.model.training.quality import hfen, psnr, ssim

logger = logging.getLogger(__name__)

METHODS = ("noisy", "nlm", "bm4d", "baseline", "ours")
CONTRASTS = {"t1": load_mni_t1, "t2like": load_mni_t2_like}
NLM_H = (0.5, 0.65, 0.8, 0.95, 1.1)
MARGIN = 2
MNI_SPACING = (1.0, 1.0, 1.0)  # mm: the 1 mm template, isotropic (so several planes apply)


@dataclass(frozen=True)
class EvalConfig:
    checkpoint: str = SHIPPED_CHECKPOINT
    baseline: str | None = None
    levels: tuple[float, ...] = (0.01, 0.03, 0.05, 0.07, 0.09)
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    contrasts: tuple[str, ...] = ("t1", "t2like")
    out_dir: Path = Path("eval")
    device: str = "auto"
    threads: int = 0
    figure_level: float = 0.05
    tta: int | None = None  # None: the Denoiser's default for the device
    planes: int | None = None  # None: the Denoiser's default for the device
    holdout: int = TRAINING.holdout  # the slab training held out
    gap: int = TRAINING.gap
    extra: dict[str, Any] = field(default_factory=dict)


def _rician_correct(d: np.ndarray, sigma: float, mode: str) -> np.ndarray:
    if mode == "none":
        return d
    k = 1.0 if mode == "sqrt(d^2-s^2)" else 2.0
    return np.sqrt(np.maximum(d.astype(np.float64) ** 2 - k * sigma**2, 0.0)).astype(np.float32)


class _Case:
    """One contrast: the clean test slab (with margins) and validation slices."""

    def __init__(self, name: str, vol: np.ndarray, holdout: int, gap: int) -> None:
        self.name = name
        self.range = float(vol.max())
        split = Split(vol.shape[0], holdout, gap)
        a, b = split.test
        self.clean = vol[a - MARGIN : b + MARGIN]
        self.inner = slice(MARGIN, MARGIN + (b - a))
        self.mask = foreground_mask(self.clean)[self.inner]
        va, vb = split.validation
        self.val_clean = vol[va - MARGIN : vb + MARGIN]
        self.val_inner = slice(MARGIN, MARGIN + (vb - va))
        self.val_mask = foreground_mask(self.val_clean)[self.val_inner]
        self.slices = b - a

    def score(self, out: np.ndarray) -> dict[str, float]:
        c, o = self.clean[self.inner], out[self.inner]
        return {
            "psnr_mask": psnr(c, o, self.range, self.mask),
            "psnr": psnr(c, o, self.range),
            "ssim_mask": ssim(c, o, self.range, self.mask),
            "ssim": ssim(c, o, self.range),
            "hfen": hfen(c, o),
        }

    def val_psnr(self, out: np.ndarray) -> float:
        return psnr(self.val_clean[self.val_inner], out[self.val_inner], self.range, self.val_mask)


def _tune(case: _Case, level: float, methods: tuple[str, ...], seed: int) -> dict[str, Any]:
    sigma = level * case.range
    noisy = add_rician(case.val_clean, sigma, np.random.default_rng(10_000 + seed))
    tuned: dict[str, Any] = {}
    if "nlm" in methods:
        scores = {h: case.val_psnr(nlm_denoise(noisy, sigma, h)) for h in NLM_H}
        tuned["nlm_h_factor"] = max(scores, key=lambda h: scores[h])
    if "bm4d" in methods:
        d = bm4d_denoise(noisy, sigma)
        modes = ("none", "sqrt(d^2-s^2)", "sqrt(d^2-2s^2)")
        scores_b = {m: case.val_psnr(_rician_correct(d, sigma, m)) for m in modes}
        tuned["bm4d_correction"] = max(scores_b, key=lambda m: scores_b[m])
    return tuned


def evaluate(cfg: EvalConfig, echo: Callable[[str], None] = lambda s: None,
             progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run the benchmark; write results.json, results.md and figure.png to ``cfg.out_dir``."""
    import torch

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models: dict[str, Denoiser] = {}
    if "ours" in cfg.methods:
        models["ours"] = Denoiser.load(cfg.checkpoint, device=cfg.device, tta=cfg.tta,
                                       planes=cfg.planes)
    if "baseline" in cfg.methods and cfg.baseline:
        try:
            models["baseline"] = Denoiser.load(cfg.baseline, device=cfg.device, tta=cfg.tta,
                                               planes=cfg.planes)
        except CheckpointNotFoundError as exc:
            echo(f"left out the plain U-Net baseline: {exc}")
    methods = tuple(m for m in cfg.methods if m in ("noisy", "nlm", "bm4d") or m in models)
    rows: list[dict[str, Any]] = []
    # The classical methods are deterministic and slow (BM4D): their rows are kept in a cache
    # beside the results, so re-evaluating a new checkpoint only runs the networks.
    cache_path = out_dir / "classical-cache.json"
    cache: dict[str, Any] = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    tuned_all: dict[str, Any] = {}
    figure_data: dict[str, np.ndarray] = {}
    total = len(cfg.contrasts) * len(cfg.levels) * len(cfg.seeds) * len(methods)

    def one_done() -> None:
        if progress is not None:
            progress(len(rows), total)

    for cname in cfg.contrasts:
        case = _Case(cname, CONTRASTS[cname](), cfg.holdout, cfg.gap)
        for level in cfg.levels:
            sigma = level * case.range
            tkey = f"{cname}/{level}/{cfg.holdout}/{cfg.gap}/tuned"
            tuned = cache.get(tkey, {})
            if not all(k in tuned for k in _tuned_keys(methods)):
                tuned = {**tuned, **_tune(case, level, methods, 0)}
                cache[tkey] = tuned
            tuned_all[f"{cname}/{round(level * 100)}%"] = tuned
            for seed in cfg.seeds:
                rng = np.random.default_rng(1000 * seed + round(level * 1000))
                noisy = add_rician(case.clean, sigma, rng)
                for method in methods:
                    ckey = f"{cname}/{level}/{cfg.holdout}/{cfg.gap}/{seed}/{method}"
                    if method in ("nlm", "bm4d") and ckey in cache:
                        rows.append(cache[ckey])
                        echo(
                            f"{cname} {level:.0%} seed {seed} {method:8s} (cached) psnr_mask "
                            f"{cache[ckey]['psnr_mask']:.2f}"
                        )
                        one_done()
                        continue
                    t0 = time.perf_counter()
                    if method == "noisy":
                        out = noisy
                    elif method == "nlm":
                        out = nlm_denoise(noisy, sigma, tuned["nlm_h_factor"])
                    elif method == "bm4d":
                        out = _rician_correct(
                            bm4d_denoise(noisy, sigma), sigma, tuned["bm4d_correction"]
                        )
                    else:
                        out = models[method].denoise(noisy, spacing=MNI_SPACING)
                    seconds = (time.perf_counter() - t0) / noisy.shape[0]
                    row = {"contrast": cname, "level": level, "seed": seed, "method": method,
                           "seconds_per_slice": seconds, **case.score(out)}
                    if method in models:
                        row["planes"] = models[method].planes_for(noisy.shape, MNI_SPACING)
                    rows.append(row)
                    one_done()
                    if method in ("nlm", "bm4d"):
                        cache[ckey] = row
                        cache_path.write_text(json.dumps(cache, indent=0, default=float))
                    echo(
                        f"{cname} {level:.0%} seed {seed} {method:8s} psnr_mask "
                        f"{row['psnr_mask']:.2f} "
                        f"ssim_mask {row['ssim_mask']:.4f} hfen {row['hfen']:.4f} {seconds:.3f} "
                        "s/slice"
                    )
                    if (
                        cname == "t1"
                        and seed == cfg.seeds[0]
                        and abs(level - cfg.figure_level) < 1e-9
                    ):
                        figure_data[method] = out[case.inner]
                        figure_data["clean"] = case.clean[case.inner]
    summary = summarise(rows)
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "models": {k: {"identity": m.identity, "tta": m.tta, "device": str(m.device),
                       "planes": m.planes,
                       "card_training": m.card.training}
                   for k, m in models.items()},
        "tuned": tuned_all,
        "summary": summary,
        "rows": rows,
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, default=float))
    (out_dir / "results.md").write_text(to_markdown(summary, methods))
    if "ours" in figure_data and "noisy" in figure_data:
        write_figure(figure_data, out_dir / "figure.png", cfg.figure_level)
    return result


def _tuned_keys(methods: tuple[str, ...]) -> list[str]:
    return [k for m, k in (("nlm", "nlm_h_factor"), ("bm4d", "bm4d_correction")) if m in methods]


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = ("psnr_mask", "psnr", "ssim_mask", "ssim", "hfen", "seconds_per_slice")
    groups: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["contrast"], r["level"], r["method"]), []).append(r)
    out = []
    for (contrast, level, method), rs in groups.items():
        entry: dict[str, Any] = {
            "contrast": contrast,
            "level": level,
            "method": method,
            "n": len(rs),
        }
        for k in keys:
            vals = np.array([r[k] for r in rs], dtype=np.float64)
            entry[k] = float(vals.mean())
            entry[k + "_std"] = float(vals.std())
        out.append(entry)
    return out


def to_markdown(summary: list[dict[str, Any]], methods: tuple[str, ...]) -> str:
    lines: list[str] = []
    for contrast in dict.fromkeys(s["contrast"] for s in summary):
        levels = sorted({s["level"] for s in summary if s["contrast"] == contrast})
        for metric, title, fmt in (
            ("psnr_mask", "PSNR in mask (dB)", "{:.2f} ± {:.2f}"),
            ("psnr", "PSNR whole image (dB)", "{:.2f} ± {:.2f}"),
            ("ssim_mask", "SSIM in mask", "{:.4f} ± {:.4f}"),
            ("hfen", "HFEN (lower is better)", "{:.4f} ± {:.4f}"),
        ):
            lines += [f"### {contrast}: {title}", "", "| noise | " + " | ".join(methods) + " |",
                      "|---|" + "---|" * len(methods)]
            for level in levels:
                cells = []
                for m in methods:
                    s = next(
                        (
                            x
                            for x in summary
                            if x["contrast"] == contrast
                            and x["level"] == level
                            and x["method"] == m
                        ),
                        None,
                    )
                    cells.append(fmt.format(s[metric], s[metric + "_std"]) if s else "")
                lines.append(f"| {level:.0%} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += [
            f"### {contrast}: seconds per slice",
            "",
            "| " + " | ".join(methods) + " |",
            "|" + "---|" * len(methods),
        ]
        secs = []
        for m in methods:
            vals = [
                x["seconds_per_slice"]
                for x in summary
                if x["contrast"] == contrast and x["method"] == m
            ]
            secs.append(f"{np.mean(vals):.3f}" if vals else "")
        lines += ["| " + " | ".join(secs) + " |", ""]
    return "\n".join(lines)


def write_figure(data: dict[str, np.ndarray], path: Path, level: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = data["clean"].shape[0] // 2
    clean, noisy, ours = data["clean"][k], data["noisy"][k], data["ours"][k]
    vmax = float(np.percentile(clean, 99.5))
    panels = [
        ("noisy", noisy, vmax),
        ("ours", ours, vmax),
        ("clean", clean, vmax),
        ("residual (noisy - ours)", noisy - ours, None),
        ("error x5 (ours - clean)", 5 * (ours - clean), None),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for ax, (title, img, vm) in zip(axes, panels):
        if vm is None:
            lim = 3 * level * float(data["clean"].max())
            ax.imshow(img, cmap="RdBu_r", vmin=-lim, vmax=lim)
        else:
            ax.imshow(img, cmap="gray", vmin=0, vmax=vm)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"MNI152 T1, held-out slice, Rician noise {level:.0%} of max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)



def evaluate_families_cli(cfg: EvalConfig, gate: Any, compare: str | None,
                          echo: Callable[[str], None] = lambda s: None,
                          progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """The held-out families (``families.py``) for ``cfg.checkpoint`` beside ``compare`` (the
    previous model); NLM's h is the one the T1 validation slices chose at each level."""
    import torch

    from denoised_node.model.training.families import evaluate_families

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_path = out_dir / "classical-cache.json"
    cache: dict[str, Any] = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    case = _Case("t1", load_mni_t1(), cfg.holdout, cfg.gap)
    nlm_h: dict[float, float] = {}
    for level in (0.03, 0.05, 0.09):
        tkey = f"t1/{level}/{cfg.holdout}/{cfg.gap}/tuned"
        tuned = cache.get(tkey, {})
        if "nlm_h_factor" not in tuned:
            tuned = {**tuned, **_tune(case, level, ("nlm",), 0)}
            cache[tkey] = tuned
            cache_path.write_text(json.dumps(cache, indent=0, default=float))
        nlm_h[level] = float(tuned["nlm_h_factor"])
    models: dict[str, Denoiser] = {}
    if compare:
        try:
            models["previous"] = Denoiser.load(
                compare, device=cfg.device, tta=cfg.tta, planes=cfg.planes
            )
        except CheckpointNotFoundError as exc:
            echo(f"left out the previous model: {exc}")
    models["ours"] = Denoiser.load(
        cfg.checkpoint, device=cfg.device, tta=cfg.tta, planes=cfg.planes
    )
    return evaluate_families(models, out_dir, gate, nlm_h, echo=echo, progress=progress,
                             with_bm4d=bool(cfg.extra.get("bm4d")))
