"""Template filters: times in UTC, durations and figures for people."""

from __future__ import annotations

from datetime import UTC, datetime

from pydicom.uid import UID


def when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:02.0f} min"


def ago(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "-"
    return duration(max((now - moment).total_seconds(), 0.0)) + " ago"


def short_uid(uid: str | None, keep: int = 10) -> str:
    """The end of a UID, which is where UIDs of one study differ."""
    if not uid:
        return "-"
    return uid if len(uid) <= keep + 1 else "…" + uid[-keep:]


def figure(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def sop_name(uid: str) -> str:
    name = UID(uid).name
    return name if name != uid else f"SOP class {uid}"
