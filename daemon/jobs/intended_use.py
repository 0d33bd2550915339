"""Is a series within what the model was validated for (its card's ``intended_use``)?

Each key of the card restricts one thing. The series' value is read from the standard
attributes; where the series does not say (no BodyPartExamined, a description with no known
contrast word), the key does not refuse it: the card limits what is known to be outside.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from denoised_node.daemon.jobs.series_attributes import SeriesAttributes

# Contrast words in SeriesDescription / ProtocolName / SequenceName, most specific first
# (a "T2 FLAIR" is FLAIR, a "DWI" with an ADC map is DWI).
_CONTRAST_WORDS: tuple[tuple[str, str], ...] = (
    ("DWI", r"\b(dwi|diff\w*|adc|trace|dti|ep2d_diff|resolve|b\d{3,4})\b"),
    ("PERFUSION", r"\b(perf\w*|dsc|dce|asl|pcasl|pasl)\b"),
    ("ANGIO", r"\b(tof|angio\w*|mra|pc3d)\b"),
    ("SWI", r"\b(swi|swan|susc\w*|t2\*|t2star|gre_?\w*hemo)\b"),
    ("BOLD", r"\b(bold|fmri|rest\w*|epfid2d)\b"),
    ("FLAIR", r"\b(flair|dark[_ -]?fluid|tirm)\b"),
    ("PD", r"\b(pd|pdw|proton[_ -]?density)\b"),
    ("T2", r"\b(t2w?|t2_\w+|tse_t2|haste|space_t2|ciss|fiesta|truefisp)\b"),
    ("T1", r"\b(t1w?|t1_\w+|mprage|mp2rage|spgr|bravo|tfl|vibe|flash|ir_?fspgr)\b"),
)
# Field strength above this is in gauss (old Philips files write 15000 for 1.5 T).
_GAUSS_THRESHOLD = 100.0


def series_contrast(facts: SeriesAttributes) -> str | None:
    """The contrast the series' names say (T1, T2, PD, FLAIR, DWI, ...); None: they say none."""
    text = " ".join(facts.text(k) for k in ("SeriesDescription", "ProtocolName", "SequenceName"))
    words = re.sub(r"[_+]", " ", text.lower())
    for contrast, pattern in _CONTRAST_WORDS:
        if re.search(pattern, words) or re.search(pattern, text.lower()):
            return contrast
    return None


def _field_strength(facts: SeriesAttributes) -> float | None:
    value = facts.number("MagneticFieldStrength")
    if value is not None and value > _GAUSS_THRESHOLD:
        return value / 10000.0
    return value


def outside_intended_use(facts: SeriesAttributes, intended_use: Mapping[str, Any]) -> str | None:
    """Why the series is outside the model's intended use; None when it is within."""
    listed: list[tuple[str, str, str | None]] = [
        ("modalities", "Modality", facts.text("Modality") or None),
        ("body_parts", "BodyPartExamined", facts.text("BodyPartExamined") or None),
        ("acquisition_types", "MRAcquisitionType", facts.text("MRAcquisitionType") or None),
        ("contrasts", "contrast", series_contrast(facts)),
    ]
    for key, what, value in listed:
        allowed = intended_use.get(key)
        if allowed and value is not None and value.upper() not in {a.upper() for a in allowed}:
            return f"{what} {value} is outside the model's intended use ({', '.join(allowed)})"
    ranges: list[tuple[str, str, str, float | None]] = [
        ("slice_thickness_mm", "SliceThickness", "mm", facts.number("SliceThickness")),
        ("field_strength_t", "MagneticFieldStrength", "T", _field_strength(facts)),
    ]
    for key, what, unit, number in ranges:
        bounds = intended_use.get(key)
        if bounds and number is not None and not bounds[0] <= number <= bounds[1]:
            return (f"{what} {number:g} {unit} is outside the model's intended use "
                    f"({bounds[0]:g}-{bounds[1]:g} {unit})")
    return None
