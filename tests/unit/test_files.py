from __future__ import annotations

from pathlib import Path

import pytest

from denoised_node.storage.files import (
    FileStore,
    InstanceUIDs,
    InvalidUID,
    OutOfSpace,
    StoreError,
    check_uid,
)


@pytest.mark.parametrize("uid", ["1.2.840.10008.5.1.4.1.1.4", "2.25.123", "1"])
def test_valid_uids_pass(uid: str) -> None:
    assert check_uid(uid, "UID") == uid


@pytest.mark.parametrize("uid", ["", "../../etc/passwd", "1.2/3", "1..2", ".1.2", "1.2.",
                                 "1.2.a", "1" * 65, "1.2\x00.3", None, "1.2 3"])
def test_malformed_uids_are_refused(uid: object) -> None:
    with pytest.raises(InvalidUID):
        check_uid(uid, "UID")


def test_write_instance_is_atomic_and_under_the_store(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    stored = store.write_instance("1.2", "1.2.3", "1.2.3.4", b"DICM-data")
    assert stored.relative_path == "instances/1.2/1.2.3/1.2.3.4.dcm"
    assert (tmp_path / stored.relative_path).read_bytes() == b"DICM-data"
    assert list(store.incoming.iterdir()) == []


def test_path_traversal_uid_is_never_used(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    with pytest.raises(InvalidUID):
        store.write_instance("1.2", "../../..", "1.2.3", b"x")
    with pytest.raises(StoreError):
        store.path("../outside.dcm")
    assert not (tmp_path / "outside.dcm").exists()


def test_clean_incoming_removes_crash_leftovers(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    (store.incoming / "abc.part").write_bytes(b"half")
    assert store.clean_incoming() == 1
    assert list(store.incoming.iterdir()) == []


def test_watermark_refuses_before_writing(tmp_path: Path) -> None:
    store = FileStore(tmp_path, min_free_bytes=10**18)
    with pytest.raises(OutOfSpace, match="watermark"):
        store.write_instance("1.2", "1.2.3", "1.2.3.4", b"x")
    assert not (tmp_path / "instances" / "1.2").exists()


def test_instance_uids_are_checked_once_on_construction() -> None:
    uids = InstanceUIDs(" 1.2.3 ", "1.2.3.4\x00", "1.2.3.4.5")
    assert (uids.study, uids.series, uids.sop) == ("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert uids.relative_path == "instances/1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    with pytest.raises(InvalidUID, match="SeriesInstanceUID '../x'"):
        InstanceUIDs("1.2.3", "../x", "1.2.3.4.5")
    with pytest.raises(InvalidUID, match="SOPInstanceUID ''"):
        InstanceUIDs("1.2.3", "1.2.3.4", None)  # type: ignore[arg-type]  # as ds.get gives it
