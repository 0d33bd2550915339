"""DIMSE statuses on both sides: what the SCP answers, and what a destination's answer means."""

from __future__ import annotations

import errno

from denoised_node.daemon.dicom.dimse_status import Status, describe, is_stored, status_for


def test_a_full_disk_is_out_of_resources() -> None:
    assert status_for(OSError(errno.ENOSPC, "No space left on device")) == Status.OUT_OF_RESOURCES
    assert status_for(OSError(errno.EIO, "I/O error")) == Status.PROCESSING_FAILURE


def test_success_and_the_storage_warnings_count_as_stored() -> None:
    assert all(is_stored(code) for code in (0x0000, 0xB000, 0xB006, 0xB007))
    assert not any(is_stored(code) for code in (0xA700, 0xA900, 0xC000, 0x0110, 0x0122))


def test_a_refusal_is_described_in_words() -> None:
    assert describe(0xA700) == "0xA700 (Refused: Out of Resources)"
    assert describe(0x0122) == "0x0122 (Refused: SOP Class Not Supported)"
    assert describe(0xFE01).startswith("0xFE01 (")
