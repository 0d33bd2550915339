"""`denoised-node denoise` (daemon/cli/denoise.py) with the shipped model (no network peers): DICOM
folders and NIfTI files in, the derived series or volume out, through the gate."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from click.testing import CliRunner

from denoised_node.daemon.cli.main import main
from denoised_node.storage.images.derive import is_own_output
from tests.fixtures.node_state import minimal_config


def test_denoise_dicom_folder_writes_the_derived_series(tmp_path: Path, mr_series_factory) -> None:  # type: ignore[no-untyped-def]
    source = mr_series_factory(slices=4, rows=128, columns=112, noise_sigma=60.0)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["denoise", str(source.directory), str(out),
                                       "--config", str(minimal_config(tmp_path))])
    assert result.exit_code == 0, result.output
    files = sorted(out.glob("*.dcm"))
    assert len(files) == 4 and "4 derived instance(s)" in result.stdout
    # Off a terminal (here, and a log file) progress is whole lines (issue 30, item 14).
    progress = [line for line in result.stderr.split("\n") if "denoising" in line]
    assert progress and "\r" not in result.stderr
    assert all(re.fullmatch(r"denoising \d+/4 slices", line) for line in progress)
    for path in files:
        ds = pydicom.dcmread(path)
        assert is_own_output(ds) and ds.ImageType[0] == "DERIVED"
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID in source.sop_instance_uids


def test_denoise_nifti_keeps_affine_and_shape(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :80]
    clean = np.repeat(((np.hypot(yy - 48, xx - 40) < 30) * 800.0)[:, :, None], 5, axis=2)
    noisy = np.abs(clean + rng.normal(0, 40, clean.shape) + 1j * rng.normal(0, 40, clean.shape))
    affine = np.diag([0.9, 0.9, 3.0, 1.0])
    source = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(noisy.astype(np.float32), affine), str(source))
    target = tmp_path / "t1_denoised.nii.gz"
    result = CliRunner().invoke(main, ["denoise", str(source), str(target),
                                       "--config", str(minimal_config(tmp_path))])
    assert result.exit_code == 0, result.output
    image = nib.load(str(target))
    assert image.shape == noisy.shape
    np.testing.assert_allclose(image.affine, affine)
    data = np.asarray(image.dataobj)
    inside = clean > 0
    assert np.std(data[inside]) < 0.7 * np.std(noisy[inside])


def test_gate_failure_is_one_line_and_no_gate_writes_anyway(tmp_path: Path,  # type: ignore[no-untyped-def]
                                                            mr_series_factory) -> None:
    config = tmp_path / "strict.toml"
    config.write_text(
        minimal_config(tmp_path).read_text() + "[gate]\nmax_edge_correlation = 0.0001\n"
    )
    source = mr_series_factory(slices=2, rows=96, columns=96)
    result = CliRunner().invoke(main, ["denoise", str(source.directory), str(tmp_path / "a"),
                                       "--config", str(config)])
    assert result.exit_code == 1 and "safety gate failed" in result.stderr
    # Progress lines end before the error, which is one line of its own.
    *progress, error_line, _ = result.stderr.split("\n")
    assert progress and all(line.startswith("denoising ") for line in progress)
    assert error_line.startswith("error: series ")
    result = CliRunner().invoke(main, ["denoise", str(source.directory), str(tmp_path / "b"),
                                       "--config", str(config), "--no-gate"])
    assert result.exit_code == 0 and len(list((tmp_path / "b").glob("*.dcm"))) == 2


def test_nifti_goes_through_the_gate_too(tmp_path: Path) -> None:
    """A NIfTI result the gate refuses is not written (it was, with exit 0, before)."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:96, :80]
    clean = np.repeat(((np.hypot(yy - 48, xx - 40) < 30) * 800.0)[:, :, None], 5, axis=2)
    noisy = np.abs(clean + rng.normal(0, 40, clean.shape) + 1j * rng.normal(0, 40, clean.shape))
    source = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(noisy.astype(np.float32), np.eye(4)), str(source))
    config = tmp_path / "strict.toml"
    config.write_text(
        minimal_config(tmp_path).read_text() + "[gate]\nmax_edge_correlation = 0.0001\n"
    )
    target = tmp_path / "out.nii.gz"
    result = CliRunner().invoke(
        main, ["denoise", str(source), str(target), "--config", str(config)]
    )
    assert result.exit_code == 1 and "safety gate failed" in result.stderr
    assert not target.exists()
    result = CliRunner().invoke(main, ["denoise", str(source), str(target), "--config", str(config),
                                       "--no-gate"])
    assert result.exit_code == 0 and target.exists()


def test_denoise_rejects_other_inputs(tmp_path: Path) -> None:
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    result = CliRunner().invoke(main, ["denoise", str(other), str(tmp_path / "x"),
                                       "--config", str(minimal_config(tmp_path))])
    assert result.exit_code != 0


def test_denoise_takes_checkpoint_and_device(tmp_path: Path, mr_series_factory) -> None:  # type: ignore[no-untyped-def]
    source = mr_series_factory(slices=2, rows=32, columns=32)
    result = CliRunner().invoke(main, ["denoise", str(source.directory), str(tmp_path / "a"),
                                       "-c", str(minimal_config(tmp_path)), "--device", "tpu"])
    assert result.exit_code == 2 and result.stderr.startswith("error: --device: ")
    missing = tmp_path / "nowhere.safetensors"
    result = CliRunner().invoke(
        main,
        [
            "denoise",
            str(source.directory),
            str(tmp_path / "b"),
            "-c",
            str(minimal_config(tmp_path)),
            "--checkpoint",
            str(missing),
            "--json",
        ],
    )
    assert result.exit_code != 0 and str(missing) in json.loads(result.stdout)["error"]


def test_a_series_with_nothing_to_denoise_is_ignored_not_failed(tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                 mr_series_factory) -> None:
    """An all-zero series (like a real empty Philips MPRAGE) is nothing to do: exit 0, one line
    saying why, nothing written (it was a NothingToDenoise traceback with exit 1)."""
    source = mr_series_factory(slices=3, rows=64, columns=64)
    for path in source.directory.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.PixelData = bytes(len(ds.PixelData))
        ds.save_as(path)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["denoise", str(source.directory), str(out),
                                       "--config", str(minimal_config(tmp_path))])
    assert result.exit_code == 0, result.output
    assert "ignored, nothing to denoise" in result.stdout and result.exception is None
    assert not list(out.glob("*.dcm"))


def test_a_ct_folder_is_ignored_as_the_node_ignores_it(tmp_path: Path, mr_series_factory) -> None:  # type: ignore[no-untyped-def]
    """A CT series ran through the MR model (only the gate refused it; --no-gate wrote "CT ...
    DENOISED"). The node ignores it on receipt; offline denoising decides the same: exit 0,
    one line, nothing written, --no-gate or --override-intended-use notwithstanding."""
    ct = mr_series_factory(slices=3, rows=64, columns=64,
                           sop_class_uid=pydicom.uid.CTImageStorage, modality="CT")
    for flags in ([], ["--no-gate"], ["--no-gate", "--override-intended-use"]):
        out = tmp_path / f"out{len(flags)}"
        result = CliRunner().invoke(main, ["denoise", str(ct.directory), str(out), *flags,
                                           "--config", str(minimal_config(tmp_path))])
        assert result.exit_code == 0, result.output
        assert "ignored: not an MR image (CT Image Storage)" in result.stdout
        assert "nothing written" in result.stdout and not list(out.rglob("*.dcm"))


def test_a_series_outside_the_intended_use_is_ignored_unless_overridden(tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                         mr_series_factory) -> None:
    """The shipped card is for the brain: a knee series is ignored, as the worker ignores it;
    the flag overrides the intended use (as a rule's override_intended_use does)."""
    source = mr_series_factory(slices=3, rows=96, columns=96, noise_sigma=60.0)
    for path in source.directory.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.BodyPartExamined = "KNEE"
        ds.save_as(path)
    config = str(minimal_config(tmp_path))
    result = CliRunner().invoke(main, ["denoise", str(source.directory), str(tmp_path / "a"),
                                       "--config", config])
    assert result.exit_code == 0, result.output
    assert "ignored: BodyPartExamined KNEE is outside the model's intended use" in result.stdout
    assert not list((tmp_path / "a").rglob("*.dcm"))
    result = CliRunner().invoke(main, ["denoise", str(source.directory), str(tmp_path / "b"),
                                       "--config", config, "--override-intended-use", "--no-gate"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "b").glob("*.dcm"))) == 3
