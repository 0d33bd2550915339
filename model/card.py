"""The model card, without torch: where a checkpoint name leads, its card read from the
safetensors header, the identity derived series and jobs are named by, the sidecar check.

The serve process, `rules test` and the status pages read cards here (torch is hundreds of MB
and seconds to import); ``checkpoint.py`` adds the weights on top.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from denoised_node.model.errors import (
    CheckpointInvalidError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
)
from denoised_node.model.hyperparameters import HYPERPARAMETERS

FORMAT = "denoised-node/1"
CARD_KEY = "denoised_node_card"
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
_MAX_HEADER_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Architecture:
    """A card's ``architecture`` section, typed: what ``network.build_network`` builds.

    A key the section lacks reads as the checkpoints written before that key existed were
    built, and these defaults are written here only: the 1.x models took one slice
    (``in_slices`` 1) with no space-to-depth stem (1), read the noise as one Haar MAD figure
    per slice and had no noise-map channel. A new run's architecture is not these defaults but
    ``hyperparameters.default_config`` (5 slices, a stem of 2, the noise map)."""

    kind: str | None  # network.KINDS; checked where the network is built
    spatial_dims: int = 2
    in_slices: int = 1
    space_to_depth: int = 1
    noise_estimator: str = "haar_mad"  # or "noise_map" (inference.NOISE_ESTIMATORS)
    noise_map_channel: bool = False
    # The noise map's reading times this (1.x weights moved onto the map: training.widen).
    noise_map_factor: float = 1.0
    block_depth: int = HYPERPARAMETERS.block_depth  # slices per block of a 3D network
    fixed_timestep: float | None = None  # ablation only: the timestep whatever the noise
    unet: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, section: Mapping[str, Any]) -> Architecture:
        """The section as a card (or a network's config dict) holds it; keys it does not know
        are left out, absent ones take the older checkpoints' defaults."""
        convert: dict[str, Callable[[Any], Any]] = {
            "spatial_dims": int, "in_slices": int, "space_to_depth": int,
            "noise_estimator": str, "noise_map_channel": bool, "noise_map_factor": float,
            "block_depth": int, "fixed_timestep": float, "unet": dict}
        values = {f.name: convert[f.name](section[f.name]) for f in fields(cls)
                  if f.name in convert and section.get(f.name) is not None}
        return cls(kind=section.get("kind"), **values)


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    architecture: dict[str, Any]
    schedule: dict[str, Any]
    normalisation: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""
    weights_dtype: str = "float16"
    format: str = FORMAT
    # What the model was validated for (docs/rules.md): body_parts, contrasts,
    # acquisition_types, slice_thickness_mm [lo, hi], field_strength_t [lo, hi]. A key that is
    # absent restricts nothing; an empty card (a model of your own) restricts nothing at all.
    intended_use: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        try:
            data = json.loads(text)
            card = cls(**data)
        except (json.JSONDecodeError, TypeError) as exc:
            raise CheckpointInvalidError(f"the model card is not valid: {exc}") from None
        for key in ("architecture", "schedule", "normalisation", "training", "metrics",
                    "intended_use"):
            if not isinstance(getattr(card, key), dict):
                raise CheckpointInvalidError(f"the model card's {key} is a "
                                             f"{type(getattr(card, key)).__name__}, not an object")
        return card

    @property
    def arch(self) -> Architecture:
        """The architecture section, typed, with the older checkpoints' defaults filled in."""
        return Architecture.from_dict(self.architecture)

    @property
    def identity(self) -> str:
        return f"dn-{self.name}-{self.version}-{self.sha256[:12]}"


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """``"default"`` (or another bare name) is a checkpoint shipped in the package; else a path."""
    text = str(checkpoint)
    if "/" not in text and "\\" not in text and not text.endswith(".safetensors"):
        return CHECKPOINT_DIR / f"{text}.safetensors"
    return Path(text).expanduser()


def read_card(checkpoint: str | Path) -> ModelCard:
    """The card in a checkpoint's safetensors header, without reading the weights (and so
    without checking them: ``checkpoint.read_checkpoint`` does that when it loads them)."""
    path = resolve_checkpoint(checkpoint)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist")
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > _MAX_HEADER_BYTES:
                raise ValueError("header too long")
            header = json.loads(handle.read(length))
        text = (header.get("__metadata__") or {}).get(CARD_KEY)
    except (struct.error, ValueError, AttributeError):
        raise CheckpointInvalidError(f"{path} is not a safetensors file") from None
    if text is None:
        raise CheckpointInvalidError(f"{path} is a safetensors file but not a denoised-node "
                                     "checkpoint (no model card)")
    try:
        return ModelCard.from_json(text)
    except CheckpointInvalidError as exc:
        raise CheckpointInvalidError(f"{path}: {exc}") from None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sidecar(path: Path) -> bool:
    """Check the file against the sha256 its sidecar ``<name>.json`` pins (shipped
    checkpoints have one). False: no sidecar; raises when the file does not match."""
    side_path = path.with_suffix(".json")
    if not side_path.is_file():
        return False
    try:
        expected = json.loads(side_path.read_text()).get("file_sha256")
    except (json.JSONDecodeError, AttributeError):
        raise CheckpointInvalidError(f"{side_path} is not valid JSON") from None
    if expected and file_sha256(path) != expected:
        raise CheckpointMismatchError(
            f"checkpoint {path} does not match the sha256 in {side_path.name}: the file was "
            "altered or replaced; restore it or delete the stale card")
    return bool(expected)
