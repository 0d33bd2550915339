"""The held-out families evaluation: scoring, lesion contrast, the gate study and its table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from denoised_node.config.settings import GateSettings
from denoised_node.model.noise import add_rician
from denoised_node.model.training import families
from denoised_node.model.training.families import Case, evaluate_families, lesion_contrast


def _disc(slices: int = 8, size: int = 96) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    disc = (np.hypot(yy - size / 2, xx - size / 2) < size * 0.38) * (0.6 + 0.2 * np.sin(xx / 6.0))
    return np.repeat(disc[None].astype(np.float32), slices, axis=0)


def test_lesion_contrast_is_one_when_kept_and_zero_when_erased() -> None:
    clean = _disc()
    pattern = np.zeros_like(clean)
    pattern[4, 40:43, 40:43] = 0.2
    case = Case(
        "lesions", 0.05, clean + pattern, clean + pattern, (1.0, 1.0, 1.0), 0.05, lesions=pattern
    )
    assert lesion_contrast(case, clean + pattern) == pytest.approx(1.0)
    assert lesion_contrast(case, clean) == pytest.approx(0.0)


class _Smoother:
    identity = "fake"

    def denoise(self, volume: np.ndarray, spacing: object = None) -> np.ndarray:
        from scipy.ndimage import gaussian_filter

        return np.stack([gaussian_filter(s, 0.7) for s in volume]).astype(np.float32)


def test_families_table_and_gate_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean = _disc()
    noisy = add_rician(clean, 0.05, np.random.default_rng(0))
    monkeypatch.setattr(families, "build_cases", lambda seed=0, skipped=None: [
        Case("disc", 0.05, clean, noisy, (1.0, 1.0, 1.0), 0.05)])
    monkeypatch.setattr(families, "_real_epi", lambda: noisy)
    result = evaluate_families({"ours": _Smoother()}, tmp_path, GateSettings(), {0.05: 0.8},
                               echo=lambda s: None)
    methods = {r["method"] for r in result["rows"]}
    assert methods == {"noisy", "nlm", "ours"}
    ours = next(r for r in result["rows"] if r["method"] == "ours")
    noisy_row = next(r for r in result["rows"] if r["method"] == "noisy")
    assert ours["psnr_mask"] > noisy_row["psnr_mask"] and "gate_passed" in ours
    breaks = {g["break"]: g["caught"] for g in result["gate"]}
    assert breaks["intensity -15 %"] and breaks["nothing removed"]
    text = (tmp_path / "families.md").read_text()
    assert "| disc | 5% |" in text and "caught" in text
    assert (tmp_path / "real-epi.png").stat().st_size > 1000


def test_scoring_against_a_second_acquisition_takes_its_noise_out() -> None:
    """real-epi-v2v: a result equal to the truth scores as if the reference were clean, though
    the reference carries noise of its own."""
    rng = np.random.default_rng(1)
    truth = _disc()
    reference = truth + rng.normal(0, 0.02, truth.shape).astype(np.float32)
    plain = Case("x", 0.05, reference, reference, (1.0, 1.0, 1.0), 0.05)
    v2v = Case("x", 0.05, reference, reference, (1.0, 1.0, 1.0), 0.05, reference_noise_var=0.02**2)
    assert families.score(plain, truth)["psnr_mask"] == pytest.approx(
        10 * np.log10(truth.max() ** 2 / 0.02**2), abs=0.3
    )
    assert families.score(v2v, truth)["psnr_mask"] > families.score(plain, truth)["psnr_mask"] + 6


def test_held_out_material_left_out_when_its_package_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from denoised_node.model.training import held_out

    monkeypatch.setattr(held_out, "COLIN27", Path("/nonexistent/ch2.nii.gz"))
    skipped: list[str] = []
    cases = families._optional_cases((0.05,), np.random.default_rng(0), skipped)
    assert any(s.startswith("colin27: ") and "mricron-data" in s for s in skipped)
    phantom = [c for c in cases if c.family == "phantom-5mm"]
    assert (
        len(phantom) == 1
        and phantom[0].clean.shape == (20, 256, 256)
        and phantom[0].spacing[0] == 5.0
    )


def test_thick_slices_average_the_centre_five_by_five() -> None:
    from denoised_node.model.training.held_out import thick_slices

    vol = np.arange(100, dtype=np.float32)[:, None, None] * np.ones((1, 4, 4), np.float32)
    thick = thick_slices(vol, slices=4, mm=5)
    assert thick.shape == (4, 4, 4)
    np.testing.assert_allclose(
        thick[:, 0, 0] * 57.0, [42, 47, 52, 57], rtol=1e-6
    )  # slices 40-59, over the max
