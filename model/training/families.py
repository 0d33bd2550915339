"""Held-out families: the frozen evaluation beyond the T1 test slab, and the gate's study.

Every family is built from data no training run samples and no decision looks at (the MNI
test slab and its gaps, a real scan from a package, a texture generator training does not
use); thresholds, checkpoints and NLM's strength are chosen on validation data elsewhere.

The families:

- t1, t2like: the MNI152 test slab (T1, and the T2-like contrast from its tissue maps), Rician
- thick-5mm: the slab and its gaps averaged into 5 mm slices (a thick 2D series), Rician
- chi8, corr2x, gfactor, zeroed: the T1 slab at 5 %: 8-coil sum-of-squares, 2x zero-filled
  k-space, a 0.6-1.6x g-factor map, a vendor-zeroed background
- lesions: the T1 slab with 24 small Gaussian lesions (+-20 % of the max) inserted, 5 %
- blobs: a non-brain texture (scikit-image binary blobs, smoothed), Rician
- real-epi: a real EPI volume (nibabel's example4d, its two volumes averaged as the reference),
  Rician on top
- real-epi-v2v: the same EPI's first volume with noise added, scored against its second, with
  the second's own noise (from the difference of the two) taken out of the squared error
- scalp, macaque: the central test slabs of the scalp template and the INIA19 macaque (training
  samples neither), Rician
- colin27, colin27-5mm: Colin27 (one subject, `held_out.py`): its central slab at 1 mm, and its
  central 100 mm as 20 axial 5 mm slices, Rician
- phantom-5mm: a piecewise-smooth brain-like phantom, 20 axial 5 mm slices of 256x256, Rician

The families from optional packages (mricron-data, the nimare wheel) are left out, and named in
the result's ``skipped``, where those are not installed. With ``bm4d`` the table has BM4D (true
sigma) and, as the ceiling, BM4D with the clean volume as its Wiener pilot (``bm4d-oracle``).

``evaluate_families`` scores noisy, NLM (true sigma; h as validation chose it for Rician at
that level), the shipped 1.x model and the model under test (PSNR and SSIM in the mask, HFEN,
the lesions' kept contrast), runs the gate on the model's result (false alarms) and on
deliberately broken results (catch rate), and writes ``families.md`` and ``families.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter, shift

from denoised_node.model.noise import add_coil_noise, add_rician, estimate_sigma, gfactor_field
from denoised_node.model.training.data import Split, foreground_mask, load_mni_t1, load_mni_t2_like
from denoised_node.model.training.quality import hfen, psnr, ssim

MARGIN = 2


@dataclass(frozen=True)
class Case:
    family: str
    level: float
    clean: np.ndarray  # with MARGIN slices either side
    noisy: np.ndarray
    spacing: tuple[float, float, float]
    sigma: float  # the noise sigma added (absolute)
    lesions: np.ndarray | None = None  # the inserted lesion pattern (signed), if any
    # Scored against a second real acquisition: its own noise variance, taken out of the MSE.
    reference_noise_var: float = 0.0

    @property
    def inner(self) -> slice:
        return slice(MARGIN, self.clean.shape[0] - MARGIN)


def _slab(vol: np.ndarray, extra: int = 0) -> np.ndarray:
    a, b = Split(vol.shape[0]).test
    return vol[a - MARGIN - extra : b + MARGIN + extra]


def _zero_filled(clean: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    h, w = clean.shape[-2:]
    noise = rng.normal(size=clean.shape) + 1j * rng.normal(size=clean.shape)
    k = np.fft.fftshift(np.fft.fft2(noise), axes=(-2, -1))
    keep = np.zeros((h, w))
    keep[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 1
    band = np.fft.ifft2(np.fft.ifftshift(k * keep, axes=(-2, -1)))
    band = band / band.real.std() * sigma
    return np.abs(clean + band).astype(np.float32)


def _lesions(shape: tuple[int, int, int], peak: float, rng: np.random.Generator) -> np.ndarray:
    pattern = np.zeros(shape, dtype=np.float32)
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    for _ in range(24):
        z = int(rng.integers(MARGIN, shape[0] - MARGIN))
        cy, cx = int(rng.integers(50, shape[1] - 50)), int(rng.integers(40, shape[2] - 40))
        sign = 1.0 if rng.random() < 0.5 else -1.0
        pattern[z] += sign * 0.2 * peak * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 1.2**2))
    return pattern


def _blobs(rng_seed: int) -> np.ndarray:
    from skimage.data import binary_blobs

    vol = binary_blobs(length=128, blob_size_fraction=0.06, n_dim=3, volume_fraction=0.35,
                       rng=rng_seed)[:20].astype(np.float32)
    return gaussian_filter(0.3 + 0.6 * vol, 0.8).astype(np.float32)


def _real_epi() -> np.ndarray:
    import os

    import nibabel as nib

    path = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "example4d.nii.gz")
    image: Any = nib.load(path)  # a Nifti1Image (the stubs say FileBasedImage)
    data = np.asarray(image.dataobj, dtype=np.float32).mean(axis=3)
    return np.ascontiguousarray(np.transpose(data, (2, 1, 0)))  # (z, y, x)


def build_cases(levels: tuple[float, ...] = (0.03, 0.05, 0.09), seed: int = 0,
                skipped: list[str] | None = None) -> list[Case]:
    """Every family's cases; the optional families whose package is missing are named in
    ``skipped`` (when given) instead."""
    rng = np.random.default_rng(10_000 + seed)
    t1 = load_mni_t1()
    t2 = load_mni_t2_like()
    cases: list[Case] = []
    slab_t1, slab_t2 = _slab(t1), _slab(t2)
    iso = (1.0, 1.0, 1.0)
    for lvl in levels:
        cases.append(Case("t1", lvl, slab_t1, add_rician(slab_t1, lvl, rng), iso, lvl))
        cases.append(Case("t2like", lvl, slab_t2, add_rician(slab_t2, lvl, rng), iso, lvl))
    # Thick slices: the slab and its gaps (never trained on) averaged 5 by 5.
    wide = _slab(t1, extra=8)
    n = (wide.shape[0] // 5) * 5
    thick = wide[:n].reshape(n // 5, 5, *wide.shape[1:]).mean(1)
    for lvl in levels:
        cases.append(
            Case("thick-5mm", lvl, thick, add_rician(thick, lvl, rng), (5.0, 1.0, 1.0), lvl)
        )
    s = 0.05
    cases.append(Case("chi8", s, slab_t1, add_coil_noise(slab_t1, s, 8, rng), iso, s))
    cases.append(Case("corr2x", s, slab_t1, _zero_filled(slab_t1, s, rng), iso, s))
    g = gfactor_field(slab_t1.shape[1:])[None]
    cases.append(Case("gfactor", s, slab_t1, add_coil_noise(slab_t1, s * g, 1, rng), iso, s))
    zeroed = np.where(slab_t1 > 0.02, add_rician(slab_t1, s, rng), 0.0).astype(np.float32)
    cases.append(
        Case("zeroed", s, np.where(zeroed > 0, slab_t1, 0.0).astype(np.float32), zeroed, iso, s)
    )
    pattern = _lesions(slab_t1.shape, 1.0, rng)
    with_lesions = np.clip(slab_t1 + pattern * (slab_t1 > 0.1), 0, None).astype(np.float32)
    cases.append(Case("lesions", s, with_lesions, add_rician(with_lesions, s, rng), iso, s,
                      lesions=pattern * (slab_t1 > 0.1)))
    blobs = _blobs(seed)
    for lvl in levels[:2]:
        cases.append(Case("blobs", lvl, blobs, add_rician(blobs, lvl, rng), iso, lvl))
    epi = _real_epi()
    for lvl in levels[:2]:
        sig = lvl * float(epi.max())
        cases.append(Case("real-epi", lvl, epi, add_rician(epi, sig, rng), (2.2, 2.0, 2.0), sig))
    cases += _v2v_cases(levels[:2], rng)
    cases += _optional_cases(levels, rng, skipped if skipped is not None else [])
    return cases


def _v2v_cases(levels: tuple[float, ...], rng: np.random.Generator) -> list[Case]:
    from denoised_node.model.training.held_out import epi_volumes, reference_noise_variance

    first, second = epi_volumes()
    var = reference_noise_variance(first, second, foreground_mask(second))
    out = []
    for lvl in levels:
        sig = lvl * float(first.max())
        out.append(
            Case(
                "real-epi-v2v",
                lvl,
                second,
                add_rician(first, sig, rng),
                (2.2, 2.0, 2.0),
                sig,
                reference_noise_var=var,
            )
        )
    return out


def _optional_cases(
    levels: tuple[float, ...], rng: np.random.Generator, skipped: list[str]
) -> list[Case]:
    from denoised_node.model.training import held_out

    iso, thick = (1.0, 1.0, 1.0), (float(held_out.THICK_MM), 1.0, 1.0)
    builders: dict[str, Callable[[], tuple[np.ndarray, tuple[float, float, float]]]] = {
        "scalp": lambda: (held_out.named_test_slab("mni152-scalp", MARGIN), iso),
        "macaque": lambda: (held_out.named_test_slab("inia19-macaque", MARGIN), iso),
        "colin27": lambda: (held_out.central_slab(held_out.colin27(), MARGIN), iso),
        "colin27-5mm": lambda: (held_out.thick_slices(held_out.colin27()), thick),
        "phantom-5mm": lambda: (held_out.thick_slices(held_out.smooth_phantom()), thick),
    }
    cases = []
    for family, build in builders.items():
        try:
            clean, spacing = build()
        except FileNotFoundError as exc:
            skipped.append(f"{family}: {exc}")
            continue
        for lvl in levels:
            cases.append(
                Case(
                    family,
                    lvl,
                    clean,
                    add_rician(clean, lvl * float(clean.max()), rng),
                    spacing,
                    lvl * float(clean.max()),
                )
            )
    return cases


def lesion_contrast(case: Case, out: np.ndarray) -> float:
    """How much of the inserted lesions' contrast the result keeps (1 = all), measured as the
    regression of (result - the clean slab without lesions) on the lesion pattern."""
    assert case.lesions is not None
    base = case.clean - case.lesions
    diff = (out - base)[case.inner]
    pat = case.lesions[case.inner]
    m = np.abs(pat) > 0.05 * np.abs(pat).max()
    return float((diff[m] * pat[m]).sum() / (pat[m] ** 2).sum())


def score(case: Case, out: np.ndarray) -> dict[str, float]:
    c, o = case.clean[case.inner], out[case.inner]
    peak = float(case.clean.max())  # PSNR's peak: the clean maximum, as in evaluate.py
    mask = foreground_mask(case.clean)[case.inner]
    row = {
        "psnr_mask": psnr(c, o, peak, mask),
        "ssim_mask": ssim(c, o, peak, mask),
        "hfen": hfen(c, o),
    }
    if case.reference_noise_var:
        err = float(((o.astype(np.float64) - c) ** 2)[mask].mean()) - case.reference_noise_var
        row["psnr_mask"] = float("inf") if err <= 0 else float(10 * np.log10(peak**2 / err))
    if case.lesions is not None:
        row["lesion_contrast"] = lesion_contrast(case, out)
    return row


# Deliberately broken results: what the gate must catch.
BREAKS: dict[str, Callable[[np.ndarray, np.ndarray, float], tuple[np.ndarray, np.ndarray]]] = {
    "blur 1 px": lambda x, y, s: (x, np.stack([gaussian_filter(v, 1.0) for v in y])),
    "blur 2.5 px": lambda x, y, s: (x, np.stack([gaussian_filter(v, 2.5) for v in y])),
    "shift 1 px": lambda x, y, s: (x, np.stack([shift(v, (0, 1), order=1) for v in y])),
    "intensity -15 %": lambda x, y, s: (x, y * 0.85),
    "texture added (1 sigma)": lambda x, y, s: (
        x,
        y + np.random.default_rng(5).normal(0, s, y.shape).astype(np.float32),
    ),
    "nothing removed": lambda x, y, s: (x, x.copy()),
}


def score_on_families(models: dict[str, Any], seed: int = 0,
                      echo: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    """Each model's mean over the held-out families (PSNR and SSIM in the mask, HFEN, the
    lesions' kept contrast), without the baselines and the gate's study (the ablation)."""
    sums: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    for case in build_cases(seed=seed):
        for name, model in models.items():
            row = score(case, model.denoise(case.noisy, spacing=case.spacing))
            for key, value in row.items():
                sums[name].setdefault(key, []).append(value)
            sums[name].setdefault(f"psnr_{case.family}", []).append(row["psnr_mask"])
            echo(f"{case.family} {case.level:.0%} {name}: psnr_mask {row['psnr_mask']:.2f}")
    return {
        name: {k: float(np.mean(v)) for k, v in rows.items() if v} for name, rows in sums.items()
    }


def _bm4d_oracle(noisy: np.ndarray, sigma: float, clean: np.ndarray) -> np.ndarray:
    """BM4D's Wiener stage with the clean volume as its pilot: a ceiling no denoiser reaches."""
    import bm4d

    return np.asarray(bm4d.bm4d(noisy, sigma, stage_arg=clean), dtype=np.float32)


def evaluate_families(models: dict[str, Any], out_dir: Path, gate: Any, nlm_h: dict[float, float],
                      echo: Callable[[str], None] = print, seed: int = 0,
                      progress: Callable[[int, int], None] | None = None,
                      with_bm4d: bool = False) -> dict[str, Any]:
    """``models``: name -> Denoiser; ``gate``: the gate settings; ``nlm_h``: level -> h factor;
    ``with_bm4d``: BM4D (true sigma) and its oracle as well (minutes a case on a CPU)."""
    from denoised_node.model.gate import check_result
    from denoised_node.model.training.baselines import bm4d_denoise, nlm_denoise

    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    gate_rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    cases = build_cases(seed=seed, skipped=skipped)
    for note in skipped:
        echo(f"left out {note}")
    for index, case in enumerate(cases):
        if progress is not None:
            progress(index, len(cases))
        sigma = case.sigma
        outs = {"noisy": case.noisy}
        h = nlm_h.get(case.level) or nlm_h[min(nlm_h, key=lambda k: abs(k - case.level))]
        outs["nlm"] = nlm_denoise(case.noisy, sigma, h)
        if with_bm4d:
            outs["bm4d"] = bm4d_denoise(case.noisy, sigma)
            outs["bm4d-oracle"] = _bm4d_oracle(case.noisy, sigma, case.clean)
        for name, model in models.items():
            outs[name] = model.denoise(case.noisy, spacing=case.spacing)
        for name, out in outs.items():
            row = {"family": case.family, "level": case.level, "method": name, **score(case, out)}
            if name in models:
                verdict = check_result(case.noisy, out, gate)
                row["gate_passed"] = verdict.passed
                row["gate_reason"] = verdict.reason
            rows.append(row)
            echo(
                f"{case.family} {case.level:.0%} {name:10s} psnr_mask {row['psnr_mask']:.2f}"
                + (
                    " gate "
                    + ("pass" if row.get("gate_passed")
                       else f"FAIL: {row.get('gate_reason', '')}")
                    if name in models
                    else ""
                )
            )
        last = list(models)[-1]
        for brk, make in BREAKS.items():
            x, y = make(case.noisy, outs[last], sigma)
            verdict = check_result(x, y, gate)
            gate_rows.append({"family": case.family, "level": case.level, "break": brk,
                              "caught": not verdict.passed, "reason": verdict.reason})
    if progress is not None:
        progress(len(cases), len(cases))
    last_model = models[list(models)[-1]]
    write_real_scan_figure(last_model, out_dir / "real-epi.png")
    real = _real_epi()
    real_out = last_model.denoise(real, spacing=(2.2, 2.0, 2.0))
    verdict = check_result(real, real_out, gate)
    result = {"rows": rows, "gate": gate_rows, "skipped": skipped,
              "real_epi_as_acquired": {"gate_passed": verdict.passed, "gate_reason": verdict.reason,
                                       "figures": verdict.figures},
              "vendor_slices": vendor_slices_as_acquired(last_model, gate, out_dir, skipped, echo)}
    (out_dir / "families.json").write_text(json.dumps(result, indent=1, default=float))
    (out_dir / "families.md").write_text(families_markdown(result, list(models)))
    return result


def vendor_slices_as_acquired(model: Any, gate: Any, out_dir: Path, skipped: list[str],
                              echo: Callable[[str], None]) -> dict[str, Any]:
    """The real vendor slices as acquired (no reference): the gate's verdict, the noise read in
    the result against the input (Haar MAD on the slice's scale), and a figure of input, result
    and residual (``vendor-<name>.png``)."""
    from denoised_node.model.gate import check_result
    from denoised_node.model.training.held_out import VENDOR_SLICES, vendor_slice

    found: dict[str, Any] = {}
    for name in VENDOR_SLICES:
        try:
            img = vendor_slice(name)
        except FileNotFoundError as exc:
            skipped.append(f"{name}: {exc}")
            continue
        out = model.denoise(img)
        verdict = check_result(img, out, gate)
        noise_in, noise_out = estimate_sigma(img[0]), estimate_sigma(out[0])
        found[name] = {"gate_passed": verdict.passed, "gate_reason": verdict.reason,
                       "noise_in": noise_in, "noise_out": noise_out,
                       "noise_ratio": noise_out / noise_in if noise_in > 0 else float("nan")}
        write_triptych(img[0], out[0], f"{name} as acquired: {getattr(model, 'identity', '')}",
                       out_dir / f"vendor-{name}.png")
        echo(f"{name}: gate {'pass' if verdict.passed else 'refused: ' + verdict.reason}; "
             f"noise {noise_in:.3g} -> {noise_out:.3g}")
    return found


def write_triptych(img: np.ndarray, out: np.ndarray, title: str, path: Path) -> None:
    """Input, result and residual (which should hold noise only) of one slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vmax = float(np.percentile(img, 99.5))
    res = img - out
    lim = 4 * 1.4826 * float(np.median(np.abs(res[img > 0]))) if (img > 0).any() else 1.0
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.3))
    for ax, (name, data, kw) in zip(
        axes,
        (
            ("input", img, {"cmap": "gray", "vmin": 0, "vmax": vmax}),
            ("denoised", out, {"cmap": "gray", "vmin": 0, "vmax": vmax}),
            (
                "residual (input - result)",
                res,
                {"cmap": "RdBu_r", "vmin": -(lim or 1.0), "vmax": lim or 1.0},
            ),
        ),
    ):
        ax.imshow(data, **kw)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def families_markdown(result: dict[str, Any], models: list[str]) -> str:
    baselines = [
        m for m in ("nlm", "bm4d", "bm4d-oracle") if any(r["method"] == m for r in result["rows"])
    ]
    methods = ["noisy", *baselines, *models]
    lines = ["| family | noise | " + " | ".join(methods) + " | gate on " + models[-1] + " |",
             "|---|---|" + "---|" * (len(methods) + 1)]
    keys = list(dict.fromkeys((r["family"], r["level"]) for r in result["rows"]))
    for fam, lvl in keys:
        cells = []
        for m in methods:
            r = next(
                x
                for x in result["rows"]
                if x["family"] == fam and x["level"] == lvl and x["method"] == m
            )
            extra = f" (lesions {r['lesion_contrast']:.2f})" if "lesion_contrast" in r else ""
            cells.append(f"{r['psnr_mask']:.2f}{extra}")
        g = next(
            x
            for x in result["rows"]
            if x["family"] == fam and x["level"] == lvl and x["method"] == models[-1]
        )
        cells.append("pass" if g["gate_passed"] else "refused: " + g["gate_reason"].split(":")[0])
        lines.append(f"| {fam} | {lvl:.0%} | " + " | ".join(cells) + " |")
    ours_rows = [r for r in result["rows"] if r["method"] == models[-1]]
    false_alarms = sum(not r["gate_passed"] for r in ours_rows)
    lines += [
        "",
        f"Gate false alarms on {models[-1]}'s results: {false_alarms} of {len(ours_rows)}.",
        "",
        "| broken result | caught |",
        "|---|---|",
    ]
    for brk in BREAKS:
        rs = [g for g in result["gate"] if g["break"] == brk]
        lines.append(f"| {brk} | {sum(g['caught'] for g in rs)} of {len(rs)} |")
    total = result["gate"]
    lines.append(f"| all | {sum(g['caught'] for g in total)} of {len(total)} |")
    vendor = result.get("vendor_slices") or {}
    if vendor:
        lines += ["", "| real vendor slice | gate | noise in -> out |", "|---|---|---|"]
        for name, v in vendor.items():
            verdict = "pass" if v["gate_passed"] else "refused: " + v["gate_reason"].split(":")[0]
            lines.append(f"| {name} | {verdict} | {v['noise_in']:.3g} -> {v['noise_out']:.3g} "
                         f"({v['noise_ratio']:.2f}x) |")
    if result.get("skipped"):
        lines += ["", "Left out (package not installed): " + "; ".join(result["skipped"]) + "."]
    return "\n".join(lines) + "\n"


def write_real_scan_figure(model: Any, path: Path) -> None:
    """The real EPI as acquired (its own scanner noise, no reference): input, result, residual
    (which should look like noise), for three slices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epi = _real_epi()
    out = model.denoise(epi, spacing=(2.2, 2.0, 2.0))
    picks = sorted({epi.shape[0] // 3, epi.shape[0] // 2, (2 * epi.shape[0]) // 3})
    vmax = float(np.percentile(epi, 99.5))
    fig, axes = plt.subplots(len(picks), 3, figsize=(8.4, 2.6 * len(picks)))
    for row, z in enumerate(picks):
        res = epi[z] - out[z]
        lim = 4 * float(np.median(np.abs(res[epi[z] > 0]))) * 1.4826 or 1.0
        for col, (title, img, kw) in enumerate((
                ("real EPI as acquired", epi[z], {"cmap": "gray", "vmin": 0, "vmax": vmax}),
                ("denoised", out[z], {"cmap": "gray", "vmin": 0, "vmax": vmax}),
                ("residual (input - result)", res, {"cmap": "RdBu_r", "vmin": -lim, "vmax": lim}))):
            ax = axes[row, col]
            ax.imshow(img[::-1], **kw)
            ax.set_title(f"{title}, slice {z}", fontsize=8)
            ax.axis("off")
    fig.suptitle(
        f"nibabel example4d (real EPI, 2 mm): {getattr(model, 'identity', '')}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
