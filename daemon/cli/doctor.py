"""`denoised-node doctor`: check everything the node needs and say how to fix what is wrong."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator

from denoised_node.config.settings import Settings
from denoised_node.daemon.cli.doctor_check import Check
from denoised_node.daemon.cli.doctor_security import security_checks


def _database(settings: Settings) -> Check:
    from sqlalchemy.exc import SQLAlchemyError

    from denoised_node.storage.db import make_engine
    from denoised_node.storage.schema import SchemaOutOfDate, check_schema

    where = settings.database_url.split("@")[-1]
    try:
        engine = make_engine(settings.database_url)
        check_schema(engine)
    except SchemaOutOfDate as exc:
        return Check("database", False, str(exc), "run `denoised-node db upgrade`")
    except (SQLAlchemyError, OSError) as exc:
        return Check("database", False, f"{where}: {exc}".splitlines()[0],
                     "check database.url and that the server is running")
    return Check("database", True, f"{where}: schema up to date")


def _model(settings: Settings) -> Check:
    from denoised_node.model.errors import ModelError
    from denoised_node.model.inference import Denoiser

    try:
        denoiser = Denoiser.from_settings(settings.model)
    except ModelError as exc:
        return Check("model", False, str(exc),
                     "set model.checkpoint to a checkpoint made by `denoised-node train`, "
                     "or to \"default\"")
    return Check("model", True, f"{denoiser.identity} on {denoiser.device} (sha256 verified)")


def _rule_models(settings: Settings) -> Iterator[Check]:
    """Each checkpoint a rule names besides [model]: its card reads and its sidecar matches
    (the weights are checked when a worker loads it)."""
    from denoised_node.model.card import read_card, resolve_checkpoint, verify_sidecar
    from denoised_node.model.errors import ModelError

    named = {rule.model: settings.checkpoint_for(rule.model) for rule in settings.rules
             if not rule.ignore
             and settings.checkpoint_for(rule.model) != settings.model.checkpoint}
    for name, checkpoint in sorted(named.items()):
        try:
            card = read_card(checkpoint)
            verify_sidecar(resolve_checkpoint(checkpoint))
        except ModelError as exc:
            yield Check(f"model {name}", False, str(exc),
                        f"fix [models] {name} or the rules that name it (docs/rules.md)")
            continue
        yield Check(f"model {name}", True, f"{card.identity} ({resolve_checkpoint(checkpoint)})")


def _gpu(settings: Settings) -> Check:
    import torch

    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return Check("gpu", True, names)
    if settings.model.device.startswith("cuda"):
        return Check("gpu", False, f"model.device is {settings.model.device} but no CUDA GPU "
                     "is visible", "install the NVIDIA driver and a CUDA build of torch, or set "
                     "model.device = \"auto\"")
    return Check("gpu", True, "none; inference runs on the CPU (slower)")


def _disk(settings: Settings) -> Check:
    data_dir = settings.node.data_dir
    probe = data_dir if data_dir.exists() else next(
        (p for p in data_dir.parents if p.exists()), data_dir.anchor)
    free_mb = shutil.disk_usage(probe).free // 2**20
    if free_mb < settings.node.min_free_mb:
        return Check("disk", False, f"{free_mb} MiB free at {data_dir}, under the "
                     f"{settings.node.min_free_mb} MiB watermark (the SCP refuses instances)",
                     "free space, or lower node.min_free_mb")
    return Check("disk", True, f"{free_mb} MiB free at {data_dir}")


def _destinations(settings: Settings) -> Iterator[Check]:
    from denoised_node.daemon.dicom.scu import SendError
    from denoised_node.daemon.jobs.destinations import echo

    if not settings.destinations:
        yield Check("destinations", False, "none configured: derived series go nowhere",
                    "add a [[destinations]] entry for the PACS")
    for destination in settings.destinations:
        name = f"destination {destination.name}"
        try:
            answer = echo(settings, destination)  # C-ECHO, or QIDO-RS for kind = "dicomweb"
        except SendError as exc:  # its fix names the AE title, host, port or url at fault
            yield Check(name, False, str(exc), exc.fix or "see the destination's log")
            continue
        yield Check(name, answer.ok, answer.detail,
                    "" if answer.ok else "the PACS answered but refused the echo")


def run_checks(settings: Settings) -> list[Check]:
    steps: list[Callable[[Settings], Check]] = [_database, _model, _gpu, _disk]
    checks = []
    for step in steps:
        try:
            checks.append(step(settings))
        except Exception as exc:  # noqa: BLE001 - doctor reports every failure, never crashes
            checks.append(Check(step.__name__.strip("_"), False, f"{type(exc).__name__}: {exc}"))
    try:
        checks.extend(security_checks(settings))  # access control, TLS files, HTTP port
    except Exception as exc:  # noqa: BLE001 - doctor reports every failure, never crashes
        checks.append(Check("security", False, f"{type(exc).__name__}: {exc}"))
    checks.extend(_rule_models(settings))
    checks.extend(_destinations(settings))
    return checks
