"""daemon/dicom/rescan.py: a file in the store that no index row names is indexed again (its row
was lost: a crash before the commit, or a power loss undoing an unsynced commit), or
removed when stale (its instance has a row elsewhere)."""

from __future__ import annotations

import logging
import os
import sqlite3
from datetime import timedelta

import pytest
from sqlalchemy import delete, select

from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.dicom.rescan import Settled, settle_unindexed
from denoised_node.storage.models import Instance, Series, utcnow
from denoised_node.storage.runtime import Runtime

MR = "1.2.840.10008.5.1.4.1.1.4"


def _received(runtime: Runtime, paths) -> Receiver:  # type: ignore[no-untyped-def]
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    for path in paths:
        receiver.receive(path.read_bytes(), MR, "MOD")
    return receiver


def _age(path, seconds: float = 7200) -> None:  # type: ignore[no-untyped-def]
    then = utcnow().timestamp() - seconds
    os.utime(path, (then, then))


def test_an_instance_whose_row_was_lost_is_indexed_again(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    receiver = _received(runtime, mr_series.paths)
    lost = mr_series.instances[3].sop_instance_uid
    with runtime.sessions.begin() as session:
        session.execute(delete(Instance).where(Instance.sop_instance_uid == lost))
        series = session.scalars(select(Series)).one()
        series.instance_count -= 1
    settled = settle_unindexed(receiver, timedelta(0))
    assert settled == Settled(indexed=1)
    with runtime.sessions() as session:
        row = session.scalars(select(Instance).where(Instance.sop_instance_uid == lost)).one()
        assert runtime.store.path(row.path).is_file()
        assert session.scalars(select(Series)).one().instance_count == len(mr_series.paths)
    assert settle_unindexed(receiver, timedelta(0)) == Settled()


def test_a_stale_copy_of_a_moved_instance_is_removed(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    receiver = _received(runtime, mr_series.paths)
    kept = runtime.store.instances / mr_series.study_uid / mr_series.series_uid
    sop_uid = mr_series.instances[0].sop_instance_uid
    stale = runtime.store.instances / mr_series.study_uid / "1.2.3.999" / f"{sop_uid}.dcm"
    stale.parent.mkdir(parents=True)
    stale.write_bytes((kept / f"{sop_uid}.dcm").read_bytes())
    _age(stale)
    assert settle_unindexed(receiver, timedelta(minutes=10)) == Settled(removed=1)
    assert not stale.exists() and (kept / f"{sop_uid}.dcm").is_file()


def test_young_files_are_left_to_the_write_in_progress(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    receiver = _received(runtime, mr_series.paths[:2])
    folder = runtime.store.instances / mr_series.study_uid / mr_series.series_uid
    young = folder / f"{mr_series.instances[5].sop_instance_uid}.dcm"
    young.write_bytes(mr_series.paths[5].read_bytes())
    assert settle_unindexed(receiver, timedelta(minutes=10)) == Settled()
    assert young.is_file()
    with runtime.sessions() as session:
        assert len(session.scalars(select(Instance)).all()) == 2


def test_an_unreadable_file_is_kept_and_reported(runtime: Runtime, mr_series,  # type: ignore[no-untyped-def]
                                                 caplog: pytest.LogCaptureFixture) -> None:
    receiver = _received(runtime, mr_series.paths)
    folder = runtime.store.instances / mr_series.study_uid / mr_series.series_uid
    broken = folder / "1.2.3.4.5.dcm"
    broken.write_bytes(b"not DICOM at all")
    _age(broken)
    with caplog.at_level(logging.ERROR):
        assert settle_unindexed(receiver, timedelta(minutes=10)) == Settled(left=1)
    assert broken.is_file()
    assert "could not be indexed again" in caplog.text


def test_a_serving_node_commits_its_index_unsynced_and_everything_else_synced(
        runtime: Runtime) -> None:
    """The receiver's commits do not wait for the disk (the file does, before the success
    status); the queue's and the pages' commits do."""
    node_receiver = Receiver.for_node(runtime)
    with node_receiver.engine.connect() as connection:
        unsynced = connection.exec_driver_sql("PRAGMA synchronous").scalar()
    with runtime.engine.connect() as connection:
        synced = connection.exec_driver_sql("PRAGMA synchronous").scalar()
    assert (unsynced, synced) == (1, 2)  # NORMAL, FULL
    assert sqlite3.sqlite_version_info >= (3, 7)  # WAL: NORMAL keeps the database whole
