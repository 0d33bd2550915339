"""One finding of `denoised-node doctor`: what was checked, whether it is fine, and how to fix
it. Its own module so that doctor.py and doctor_security.py both use it without importing each
other."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
