"""The ablation runner: variants trained at equal steps, seed-major, scored on validation and
on the held-out families, and reused when run again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from denoised_node.model.training import ablation, families


def test_ablation_trains_each_variant_and_seed_then_reuses_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained: list[tuple[str, int, int]] = []
    scored: list[str] = []

    def fake_train(cfg: Any, resume: bool = False) -> Path:  # the real one: test_model_train
        trained.append((cfg.name, cfg.seed, cfg.steps))
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        metrics = {"step": cfg.steps, "psnr_mask_mean": 30.0 + cfg.seed, "psnr_mask_5%": 29.0}
        (cfg.run_dir / "metrics.jsonl").write_text(json.dumps(metrics) + "\n")
        return cfg.run_dir / "best.safetensors"

    def fake_families(run_dir: Path, threads: int, device: str) -> dict[str, float]:
        scored.append(run_dir.name)
        return {"psnr_mask": 30.0, "ssim_mask": 0.9, "hfen": 0.3, "lesion_contrast": 0.5,
                "psnr_t1": 31.0}

    monkeypatch.setattr(ablation, "train", fake_train)
    monkeypatch.setattr(ablation, "_families", fake_families)
    monkeypatch.setattr(ablation, "_noisy_families", lambda out_dir: {"psnr_mask": 25.0})
    result = ablation.run(tmp_path, steps=40, seeds=[1, 2], batch_size=2, patch=32, threads=1,
                          names=["ours", "plain-unet-map"])
    assert list(result) == ["ours", "plain-unet-map", "noisy input"]
    # seed-major: a run cut short still holds every variant at the first seed
    assert trained == [("ablation-ours", 1, 40), ("ablation-plain-unet-map", 1, 40),
                       ("ablation-ours", 2, 40), ("ablation-plain-unet-map", 2, 40)]
    assert scored == ["ours-s1", "plain-unet-map-s1", "ours-s2", "plain-unet-map-s2"]
    assert [run["psnr_mask_mean"] for run in result["ours"]["runs"]] == [31.0, 32.0]
    text = (tmp_path / "ablation.md").read_text()
    assert "40 steps each" in text and "| ours | 2.95 M | 31.50 ± 0.50 |" in text
    assert "| plain-unet-map | 30.00 ± 0.00 | 0.900 ± 0.000 | 0.300 ± 0.000 |" in text
    assert "| noisy input | 25.00 ± 0.00 |" in text
    ablation.run(tmp_path, steps=40, seeds=[1, 2], batch_size=2, patch=32, threads=1,
                 names=["ours", "plain-unet-map"])
    assert len(trained) == 4  # finished runs are reused, not trained again


def test_families_score_every_case_for_each_model() -> None:
    class Identity:
        def denoise(self, volume: np.ndarray, spacing: Any = None) -> np.ndarray:
            return volume

    scores = families.score_on_families({"noisy": Identity()}, echo=lambda _: None)["noisy"]
    assert {"psnr_mask", "ssim_mask", "hfen", "lesion_contrast", "psnr_t1", "psnr_real-epi"} \
        <= set(scores)
    assert 15 < scores["psnr_mask"] < 35 and 0.9 < scores["lesion_contrast"] <= 1.1
