"""Evaluation: the table, JSON and figure from a small run (no BM4D: too slow for a unit test)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner

from denoised_node.daemon.cli.model_commands import evaluate_command
from denoised_node.model.checkpoint import ModelCard, write_checkpoint
from denoised_node.model.network import build_network
from denoised_node.model.schedule import NoiseSchedule
from denoised_node.model.training import evaluate as evaluate_module
from denoised_node.model.training.data import load_mni_t1
from denoised_node.model.training.evaluate import EvalConfig, _rician_correct, evaluate

TINY = {
    "kind": "diffusion_unet", "spatial_dims": 2, "in_slices": 3, "space_to_depth": 2,
    "unet": {"channels": [8, 16], "attention_levels": [False, True], "num_res_blocks": 1,
             "num_head_channels": 16, "norm_num_groups": 8},
}


def _centre_of_t1() -> np.ndarray:
    """The MNI T1 template's slices cut to a 64x64 window of the brain: every slice kept (the
    split into training, gap and test slabs is along them), a tenth of the pixels to denoise."""
    return load_mni_t1()[:, 70:134, 60:124]


def _tiny(path: Path) -> Path:
    torch.manual_seed(0)
    card = ModelCard(
        name="tiny", version="0.0", architecture=TINY, schedule=NoiseSchedule().to_dict()
    )
    write_checkpoint(path, build_network(TINY).state_dict(), card)
    return path


def test_evaluate_writes_table_json_and_figure(tmp_path: Path) -> None:
    ckpt = _tiny(tmp_path / "tiny.safetensors")
    cfg = EvalConfig(
        checkpoint=str(ckpt),
        baseline=str(tmp_path / "absent.safetensors"),
        levels=(0.05,),
        seeds=(0,),
        methods=("noisy", "baseline", "ours"),
        contrasts=("t1",),
        out_dir=tmp_path / "eval",
        device="cpu",
        holdout=4,
        gap=2,
    )
    result = evaluate(cfg)
    methods = {s["method"] for s in result["summary"]}
    assert methods == {"noisy", "ours"}  # an absent baseline is left out, not an error
    ours = next(s for s in result["summary"] if s["method"] == "ours")
    noisy = next(s for s in result["summary"] if s["method"] == "noisy")
    # the untrained tiny net is the identity: same figures as the noisy input
    assert abs(ours["psnr_mask"] - noisy["psnr_mask"]) < 0.01
    assert 25 < noisy["psnr_mask"] < 27  # 5 % Rician noise
    md = (tmp_path / "eval" / "results.md").read_text()
    assert "PSNR in mask" in md and "| 5% |" in md
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]
    assert (tmp_path / "eval" / "figure.png").stat().st_size > 10_000


def test_rician_correction_lowers_the_background() -> None:
    d = np.full((4, 4), 1.25, np.float32)
    assert _rician_correct(d, 1.0, "none")[0, 0] == np.float32(1.25)
    assert _rician_correct(d, 1.0, "sqrt(d^2-s^2)")[0, 0] < 1.0
    assert _rician_correct(d, 1.0, "sqrt(d^2-2s^2)")[0, 0] == 0


def test_evaluate_cli(tmp_path: Path) -> None:
    ckpt = _tiny(tmp_path / "tiny.safetensors")
    res = CliRunner().invoke(
        evaluate_command,
        [
            "--checkpoint",
            str(ckpt),
            "--baseline",
            "none",
            "--levels",
            "3",
            "--seeds",
            "1",
            "--methods",
            "noisy,nlm,ours",
            "--contrasts",
            "t2like",
            "--out-dir",
            str(tmp_path / "e"),
            "--device",
            "cpu",
            "--json",
            "--holdout",
            "4",
            "--gap",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    nlm = next(s for s in summary if s["method"] == "nlm")
    noisy = next(s for s in summary if s["method"] == "noisy")
    assert nlm["psnr_mask"] > noisy["psnr_mask"] + 2


def test_evaluate_cli_reports_a_missing_checkpoint(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        evaluate_command,
        [
            "--checkpoint",
            str(tmp_path / "x.safetensors"),
            "--methods",
            "ours",
            "--contrasts",
            "t1",
            "--seeds",
            "1",
            "--levels",
            "5",
            "--out-dir",
            str(tmp_path / "e"),
        ],
    )
    assert res.exit_code != 0 and "does not exist" in res.output


def test_evaluate_records_the_planes_each_network_got(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(evaluate_module.CONTRASTS, "t1", _centre_of_t1)
    ckpt = _tiny(tmp_path / "tiny.safetensors")
    cfg = EvalConfig(
        checkpoint=str(ckpt),
        baseline=None,
        levels=(0.05,),
        seeds=(0,),
        methods=("ours",),
        contrasts=("t1",),
        out_dir=tmp_path / "eval",
        device="cpu",
        holdout=16,
        gap=2,
        planes=3,
    )
    result = evaluate(cfg)
    assert result["models"]["ours"]["planes"] == 3
    # 20 slices of 1 mm by 64x64: isotropic, deep enough
    assert [row["planes"] for row in result["rows"]] == [3]


def test_planes_study_table(tmp_path: Path) -> None:
    from benchmarks.planes_study import planes_by_spacing, to_markdown
    from denoised_node.model.inference import Denoiser

    den = Denoiser.load(
        _tiny(tmp_path / "tiny.safetensors"), device="cpu"
    )  # untrained: the identity
    centre = _centre_of_t1()
    rows = planes_by_spacing(den, holdout=16, gap=4, spacings=(1.0, 2.0), volume=centre)
    assert [row.slices for row in rows] == [24, 12]
    for row in rows:
        scores = list(row.psnr_mask_by_planes.values())
        # identity in every plane, mapped back to the volume's axes: the noisy input's PSNR
        assert 25 < scores[0] < 27 and max(scores) - min(scores) < 0.01
    assert "| 2 mm |" in to_markdown(rows)
