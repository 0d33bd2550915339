from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from denoised_node.daemon.cli.main import main
from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.jobs.completion import complete_idle_series
from denoised_node.storage.models import Job, Series
from denoised_node.storage.queue import JobState, transition
from denoised_node.storage.runtime import open_runtime

MR = "1.2.840.10008.5.1.4.1.1.4"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\nmin_free_mb = 0\n')
    return path


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def _failed_job(config: Path, mr_series) -> int:  # type: ignore[no-untyped-def]
    from denoised_node.config.settings import load_settings

    runtime = open_runtime(load_settings(config, environ={}))
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    for path in mr_series.paths:
        receiver.receive(path.read_bytes(), MR, "MOD")
    with runtime.sessions.begin() as session:
        session.scalars(select(Series)).one().last_received_at -= timedelta(minutes=1)
    (job_id,) = complete_idle_series(runtime.sessions, runtime.settings.series)
    with runtime.sessions.begin() as session:
        transition(session, job_id, JobState.QUEUED, JobState.PROCESSING, worker="w")
        transition(session, job_id, JobState.PROCESSING, JobState.FAILED, worker="w",
                   reason="safety gate failed")
    return job_id


def test_db_upgrade_then_status(config: Path) -> None:
    code, out, _ = run("db", "upgrade", "--config", str(config))
    assert code == 0 and "upgraded from empty" in out
    code, out, _ = run("db", "upgrade", "--config", str(config))
    assert code == 0 and "already at revision" in out
    code, out, _ = run("status", "--config", str(config), "--json")
    assert code == 0
    assert json.loads(out)["jobs"]["queued"] == 0


def test_status_on_missing_schema_is_one_clear_line(config: Path) -> None:
    code, _out, err = run("status", "--config", str(config))
    assert code == 1
    assert err.strip().count("\n") == 0 and "denoised-node db upgrade" in err


def test_bad_config_is_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nportt = 1\n")
    code, _, err = run("status", "--config", str(bad))
    assert code == 2 and err.startswith("error: ") and "node.portt" in err


def test_jobs_list_show_and_replay(config: Path, mr_series) -> None:  # type: ignore[no-untyped-def]
    run("db", "upgrade", "--config", str(config))
    job_id = _failed_job(config, mr_series)
    code, out, _ = run("jobs", "list", "--config", str(config), "--state", "failed")
    assert code == 0 and mr_series.series_uid in out and "safety gate failed" in out
    code, out, _ = run("jobs", "list", "--config", str(config), "--json", "--state", "done")
    assert code == 0 and json.loads(out) == []
    code, out, _ = run("jobs", "show", str(job_id), "--config", str(config), "--json")
    detail = json.loads(out)
    assert [e["to_state"] for e in detail["events"]] == ["queued", "processing", "failed"]
    code, out, _ = run("jobs", "show", str(job_id), "--config", str(config))
    assert "processing -> failed" in out
    code, out, _ = run("replay", "--failed", "--config", str(config))
    assert code == 0 and f"job {job_id} queued" in out
    code, out, _ = run("replay", "--job", str(job_id), "--config", str(config))
    assert code == 1 and "already queued" in out
    code, _, err = run("replay", "--series", "1.2.3.999", "--config", str(config))
    assert code == 3 and "no series" in err


def test_replay_of_purged_series_says_so(config: Path, mr_series) -> None:  # type: ignore[no-untyped-def]
    from denoised_node.config.settings import load_settings

    run("db", "upgrade", "--config", str(config))
    job_id = _failed_job(config, mr_series)
    runtime = open_runtime(load_settings(config, environ={}))
    with runtime.sessions.begin() as session:
        series = session.scalars(select(Series)).one()
        series.state = "purged"
        series.purged_at = session.get_one(Job, job_id).updated_at
    code, out, _ = run("replay", "--job", str(job_id), "--config", str(config))
    assert code == 1 and "purged" in out


def test_replay_needs_exactly_one_selector(config: Path) -> None:
    code, _, err = run("replay", "--config", str(config))
    assert code != 0 and "exactly one" in err


def test_jobs_show_unknown_job(config: Path) -> None:
    run("db", "upgrade", "--config", str(config))
    code, _, err = run("jobs", "show", "42", "--config", str(config))
    assert code == 3 and "no job with id 42" in err


def test_echo_unknown_destination(config: Path) -> None:
    code, _, err = run("echo", "nowhere", "--config", str(config))
    assert code == 3 and "no destination named or titled 'nowhere'" in err


def test_echo_unreachable_destination(tmp_path: Path) -> None:
    from tests.integration.peers.tools import free_port

    config = tmp_path / "c.toml"
    config.write_text(f'[node]\nacse_timeout = 2\n[[destinations]]\nname = "pacs"\n'
                      f'ae_title = "PACS"\nhost = "127.0.0.1"\nport = {free_port()}\n')
    code, _, err = run("echo", "pacs", "--config", str(config))
    assert code == 4 and "association failed: connection refused" in err  # the cause


# -- one convention: error lines, exit codes, --json everywhere -------------------------------

def test_usage_errors_are_error_lines_with_exit_code_2(config: Path) -> None:
    code, _, err = run("jobs", "show", "--config", str(config))
    assert code == 2 and err.startswith("error: ") and "Error:" not in err
    assert "jobs show --help`" in err  # the program name is CliRunner's here
    code, _, err = run("replay", "--config", str(config))
    assert code == 2 and err.startswith("error: give exactly one")


def test_errors_are_json_when_json_is_asked(config: Path, tmp_path: Path) -> None:
    run("db", "upgrade", "--config", str(config))
    code, out, err = run("jobs", "show", "42", "--config", str(config), "--json")
    assert code == 3 and err == ""
    assert json.loads(out) == {"error": json.loads(out)["error"], "exit_code": 3}
    assert "no job with id 42" in json.loads(out)["error"]
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nportt = 1\n")
    code, out, _ = run("status", "--json", "--config", str(bad))
    assert code == 2 and json.loads(out)["exit_code"] == 2


def test_db_upgrade_answers_in_json_and_takes_c(config: Path) -> None:
    code, out, _ = run("db", "upgrade", "-c", str(config), "--json")
    assert code == 0 and json.loads(out)["before"] is None and json.loads(out)["changed"]


def test_purge_of_an_unknown_series_is_an_error_like_replay(config: Path) -> None:
    run("db", "upgrade", "--config", str(config))
    code, _, err = run("purge", "--series", "1.2.3.999", "--config", str(config))
    assert code == 3 and err.startswith("error: no series with SeriesInstanceUID 1.2.3.999")


def _echo_config(tmp_path: Path, port: int, called: str = "PACS") -> Path:
    config = tmp_path / "c.toml"
    config.write_text(f'[node]\nacse_timeout = 5\n[[destinations]]\nname = "pacs"\n'
                      f'ae_title = "{called}"\nhost = "127.0.0.1"\nport = {port}\n')
    return config


def test_echo_by_ae_title_and_the_rejection_reason(tmp_path: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="REALPACS")
    ae.add_supported_context(Verification)
    ae.require_called_aet = True
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        port = server.server_address[1]
        ok = _echo_config(tmp_path, port, "REALPACS")
        code, out, _ = run("echo", "REALPACS", "--config", str(ok), "--json")
        assert code == 0 and json.loads(out)["destination"] == "pacs"
        wrong = _echo_config(tmp_path, port, "PACS")
        code, _, err = run("echo", "PACS", "--config", str(wrong))
        assert code == 4 and "association rejected: Called AE title not recognised" in err
    finally:
        server.shutdown()


def test_a_missing_extra_names_what_to_install(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import sys

    source = tmp_path / "t1.nii.gz"
    source.write_bytes(b"not read: nibabel is missing")
    monkeypatch.setitem(sys.modules, "nibabel", None)  # as on a plain install
    code, _, err = run("denoise", str(source), str(tmp_path / "out.nii.gz"))
    assert code == 1 and "Traceback" not in err
    assert err == ("error: NIfTI files, train and evaluate need the optional package nibabel, "
                   "which is not installed: pip install 'denoised-node[train]'\n")


TRAIN_MODULES = ("nilearn", "nibabel", "bm4d", "matplotlib", "tqdm")  # the train extra's


@pytest.mark.parametrize("command", [
    ["train", "--run-dir", "{tmp}/run", "--steps", "1"],
    ["train", "--run-dir", "{tmp}/run", "--steps", "1", "--evaluate"],
    ["evaluate", "--out-dir", "{tmp}/run", "--seeds", "1", "--levels", "5"],
    ["evaluate", "--families", "--out-dir", "{tmp}/run"],
    ["evaluate", "--ablation", "--ablation-steps", "1", "--out-dir", "{tmp}/run"],
    ["denoise", "{tmp}/t1.nii.gz", "{tmp}/run/out.nii.gz"],
])
@pytest.mark.parametrize("missing", [TRAIN_MODULES, ("tqdm",)], ids=["plain", "no-tqdm"])
def test_every_command_of_the_train_extra_says_so_before_any_work(
        command: list[str], missing: tuple[str, ...], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    (tmp_path / "t1.nii.gz").write_bytes(b"not read")
    for module in missing:
        monkeypatch.setitem(sys.modules, module, None)  # as on an install without the extra
    code, out, err = run(*(arg.format(tmp=tmp_path) for arg in command))
    assert (code, out) == (1, ""), err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert err.rstrip().endswith(
        f"{', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
        "not installed: pip install 'denoised-node[train]'"
    ), err
    assert not (tmp_path / "run").exists()  # nothing done before the error


@pytest.mark.parametrize("command", [["db", "upgrade"], ["status"], ["jobs", "list"]])
def test_a_postgresql_url_without_the_extra_says_so(command: list[str], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n[database]\n'
                      'url = "postgresql+psycopg://node@127.0.0.1:1/denoised"\n')
    monkeypatch.setitem(sys.modules, "psycopg", None)
    code, _, err = run(*command, "--config", str(config))
    assert code == 1 and err == ("error: PostgreSQL need the optional package psycopg, which is "
                                 "not installed: pip install 'denoised-node[postgres]'\n"), err


def test_replay_of_a_series_with_no_image_keeps_its_reason(config: Path, mr_series_factory) -> None:  # type: ignore[no-untyped-def]
    import pydicom

    from denoised_node.config.settings import load_settings
    from denoised_node.daemon.dicom.receive import Receiver

    run("db", "upgrade", "--config", str(config))
    runtime = open_runtime(load_settings(config, environ={}))
    ct = mr_series_factory(slices=2, sop_class_uid=pydicom.uid.CTImageStorage, modality="CT")
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    for path in ct.paths:
        receiver.receive(path.read_bytes(), pydicom.uid.CTImageStorage, "MOD")
    with runtime.sessions.begin() as session:
        session.scalars(select(Series)).one().last_received_at -= timedelta(minutes=1)
    (job_id,) = complete_idle_series(runtime.sessions, runtime.settings.series)
    with runtime.sessions() as session:
        before = session.get_one(Job, job_id).reason
    code, out, _ = run("replay", "--job", str(job_id), "--config", str(config))
    assert code == 1 and "has no image to denoise" in out and "not replayed" in out
    with runtime.sessions() as session:
        job = session.get_one(Job, job_id)
        assert (job.state, job.reason) == ("ignored", before) and "not an MR image" in before


def test_an_exit_status_is_not_classified_as_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """serve and receiver end with sys.exit(status). Classifying that as an error imported
    the model's modules (torch): seconds on every stop of the node and of each receiving
    process."""
    import click

    from denoised_node.daemon.cli import main as cli

    classified: list[BaseException] = []
    monkeypatch.setattr(cli, "command_error", lambda exc: classified.append(exc))

    @click.group(cls=cli.NodeGroup)
    def group() -> None:
        pass

    @group.command()
    def stops() -> None:
        raise SystemExit(3)

    result = CliRunner().invoke(group, ["stops"])
    assert result.exit_code == 3
    assert classified == []


def test_since_takes_a_duration_as_well_as_an_iso_date(config: Path, mr_series) -> None:  # type: ignore[no-untyped-def]
    """Issue 30, item 14: `jobs list --since 1h` was refused (ISO dates only)."""
    run("db", "upgrade", "--config", str(config))
    _failed_job(config, mr_series)
    for since, listed in (("1h", True), ("30m", True), ("2d", True), ("2000-01-01", True),
                          ("2999-01-01T08:00", False)):
        code, out, err = run("jobs", "list", "--config", str(config), "--json", "--since", since)
        assert code == 0, err
        assert len(json.loads(out)) == int(listed), since
    code, _, err = run("replay", "--failed", "--since", "1h", "--config", str(config))
    assert code == 0, err
    code, _, err = run("jobs", "list", "--config", str(config), "--since", "yesterday")
    assert code == 2 and "duration (30m, 1h, 2d, 1w)" in err


def test_a_duration_counts_back_from_now() -> None:
    from datetime import datetime

    from denoised_node.daemon.cli.options import parse_since

    now = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    assert parse_since("90m", now) == datetime(2026, 12, 3, 10, 30, tzinfo=UTC)
    assert parse_since("2d", now) == datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert parse_since("2026-12-01", now) == datetime(2026, 12, 1, tzinfo=UTC)


HEAVY = ("torch", "monai", "pynetdicom", "pydicom", "numpy", "alembic", "PIL", "jinja2",
         "highdicom", "waitress", "prometheus_client")


def test_status_imports_nothing_heavy(config: Path) -> None:
    """Issue 30, item 14: every command took 0.8-1.2 s, most of it imports that `status`
    never uses. Its import chain stays free of the model's, DICOM's and the web's packages."""
    run("db", "upgrade", "--config", str(config))
    script = ("import atexit, sys\n"
              "atexit.register(lambda: print(' '.join(sorted(sys.modules)), file=sys.stderr))\n"
              f"sys.argv = ['denoised-node', 'status', '--config', {str(config)!r}]\n"
              "from denoised_node.daemon.cli.main import main\nmain()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=False, timeout=120, env={k: v for k, v in os.environ.items()
                                            if not k.startswith("DENOISED_NODE_")})
    assert done.returncode == 0, done.stderr
    loaded = {name.split(".")[0] for name in done.stderr.split()}
    assert "jobs: queued 0" in done.stdout
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_the_schema_head_read_without_alembic_is_alembics() -> None:
    from alembic.script import ScriptDirectory

    from denoised_node.storage.schema import MIGRATIONS, head_revision

    assert [head_revision()] == ScriptDirectory(str(MIGRATIONS)).get_heads()
