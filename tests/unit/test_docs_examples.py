"""The command examples in the README and docs/ run what they say they run."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _pynetdicom_tools() -> set[str]:
    """The console scripts pynetdicom installs into the venv's bin (storescu, echoscu, ...)."""
    return {entry.name for entry in metadata.distribution("pynetdicom").entry_points
            if entry.group == "console_scripts"}


def test_dcmtk_examples_name_dcmtk_by_its_full_path() -> None:
    """With the venv on PATH, a bare `storescu` is pynetdicom's, which takes other options
    (`storescu: error: argument port: invalid int value: '+r'`)."""
    tools = _pynetdicom_tools()
    assert {"storescu", "echoscu"} <= tools
    bare = re.compile(rf"(?<![\w/.-])({'|'.join(sorted(tools))})\s+[-+]")
    found = [f"{doc.relative_to(ROOT)}: {match.group(0)}" for doc in DOCS
             for match in bare.finditer(doc.read_text())]
    assert found == [], "call DCMTK's tools as /usr/bin/NAME"
