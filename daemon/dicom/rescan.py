"""Files in the store that no index row names: indexed again, or removed when stale.

An instance's file is put in place (fsync, rename, fsync of its folder) before its index
row is committed, and a serving node does not wait for that commit to reach the disk
(Receiver.for_node). So a crash can leave a file without its row:

- between the rename and the commit: the sender got no success status and sends again;
- after the success status, when a power loss undoes index commits not yet on disk;
- after an instance moved to another series, before its old file was removed.

The first two are instances the node keeps: indexed again, as if just received (the
calling AE title is not known then). The third is a stale copy, told by its SOP Instance
UID (the file's name) having a row elsewhere: removed. serve runs this at start-up, and the
retention pass on files older than a write can take.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select

from denoised_node.daemon.dicom.dimse_status import ReceiveError
from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.storage.files import StoreError, sop_uid_of
from denoised_node.storage.models import Instance
from denoised_node.storage.retention import unindexed_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settled:
    indexed: int = 0
    removed: int = 0
    left: int = 0  # no longer readable as an instance: kept for a person to look at


def settle_unindexed(receiver: Receiver, older_than: timedelta,
                     now: datetime | None = None) -> Settled:
    indexed = removed = left = 0
    store = receiver.store
    for relative in unindexed_files(receiver.sessions, store, older_than, now):
        sop_uid = sop_uid_of(relative)
        with receiver.sessions() as session:
            elsewhere = session.scalar(select(Instance.id).where(
                Instance.sop_instance_uid == sop_uid))
        if elsewhere is not None:
            store.remove(relative)
            removed += 1
            continue
        try:
            receiver.receive(store.path(relative).read_bytes(), None, "")
        except (ReceiveError, StoreError, OSError) as exc:
            log.error("a file no index row names could not be indexed again; it stays "
                      "where it is: %s", exc, extra={"path": relative})
            left += 1
            continue
        indexed += 1
    settled = Settled(indexed, removed, left)
    if indexed or removed:
        log.warning("settled files no index row named (left by a crash)",
                    extra={"indexed_again": indexed, "stale_removed": removed})
    return settled
