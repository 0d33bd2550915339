"""The UIDs of a derived series and of its instances: what they are made from.

A derived UID names what the derived object holds, so that no two different objects ever
share one. The derived series UID is computed from the model's identity, the source series
UID and the content of every source image the series is made from (the SHA-256 of each
stored file, as read when the series is planned); a derived instance's UID from the derived
series UID and its source's SOP Instance UID. Hence:

- a replay of the same content gives the same UIDs: the PACS replaces, never duplicates;
- new content under the same source UIDs (pixels changed, an image added, or moved into or
  out of the series) gives a new derived series of new instances, which reaches even a PACS
  that never overwrites; the old one stays there, and the job history names it superseded;
- a source instance that moved to another series is derived under a UID of that series'
  derived series, never under the one it had in the first;
- another model gives another series beside the first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.uid import generate_uid

from denoised_node.storage.images.series import SourceImage, StackPlan


def derived_uid(*parts: str) -> str:
    """A UID under 2.25 computed from ``parts`` (the same parts give the same UID)."""
    return generate_uid(prefix="2.25.", entropy_srcs=[str(part) for part in parts])


def content_digest(sources: Iterable[SourceImage]) -> str:
    """One digest of what the source images hold: their SOP Instance UIDs and file digests,
    in an order that does not depend on how they were listed."""
    content = hashlib.sha256()
    for uid, digest in sorted({(s.sop_instance_uid, s.digest) for s in sources}):
        content.update(f"{uid}={digest}\n".encode())
    return content.hexdigest()


@dataclass(frozen=True)
class DerivedUIDs:
    """The UIDs of one derived series: its own, and each instance's from its source's."""

    series_uid: str

    @classmethod
    def for_sources(cls, model_identity: str, source_series_uid: str,
                    sources: Iterable[SourceImage]) -> DerivedUIDs:
        return cls(derived_uid(model_identity, source_series_uid, content_digest(sources)))

    @classmethod
    def for_plan(cls, model_identity: str, source_series_uid: str, plan: StackPlan) -> DerivedUIDs:
        """The derived series of the images a plan denoises (or keeps, in its stacks)."""
        return cls.for_sources(model_identity, source_series_uid,
                               (ref.source for stack in plan.stacks for ref in stack.slices))

    def instance_uid(self, source_sop_instance_uid: str) -> str:
        return derived_uid(self.series_uid, source_sop_instance_uid)
