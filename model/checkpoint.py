"""Checkpoints: safetensors weights plus a model card (JSON) in the safetensors metadata.

Nothing is unpickled. The card carries the architecture config (the network is built from it
with ``build_network``), the normalisation, the noise schedule, the training record, metrics,
a version and the sha256 of the weights; ``read_checkpoint`` refuses a file whose tensors do not
hash to the card's sha256. A sidecar ``<name>.json`` beside the file (written for shipped
checkpoints) also pins the sha256 of the whole file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from denoised_node.model.card import CARD_KEY, FORMAT, ModelCard, file_sha256, verify_sidecar
from denoised_node.model.errors import (
    CheckpointInvalidError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
)

__all__ = ["ModelCard", "publish", "read_checkpoint", "weights_sha256", "write_checkpoint"]

logger = logging.getLogger(__name__)


def weights_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A hash over names, dtypes, shapes and bytes, in name order: independent of file layout."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_checkpoint(
    path: str | Path,
    state_dict: dict[str, torch.Tensor],
    card: ModelCard,
    *,
    dtype: torch.dtype = torch.float16,
    sidecar: bool = False,
) -> ModelCard:
    """Write weights (floating tensors cast to ``dtype``) and the card; return the card with
    its sha256 filled in. The write is atomic (temp file, then rename)."""
    from safetensors.torch import save_file

    tensors = {
        k: (v.detach().cpu().to(dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in state_dict.items()
    }
    card = replace(
        card, sha256=weights_sha256(tensors), weights_dtype=str(dtype).removeprefix("torch.")
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, CARD_KEY: card.to_json()})
    tmp.chmod(0o644)
    tmp.replace(path)
    if sidecar:
        side = {"file_sha256": file_sha256(path), "card": json.loads(card.to_json())}
        path.with_suffix(".json").write_text(json.dumps(side, indent=2, sort_keys=True) + "\n")
    logger.info("wrote checkpoint %s (%s)", path, card.identity)
    return card


def read_checkpoint(path: str | Path) -> tuple[ModelCard, dict[str, torch.Tensor]]:
    """Read and verify a checkpoint; raise a ``ModelError`` subclass naming the file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist")
    verify_sidecar(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointInvalidError(
            f"{path} is not a readable safetensors checkpoint: {exc}"
        ) from None
    if meta.get("format") != FORMAT or CARD_KEY not in meta:
        raise CheckpointInvalidError(
            f"{path} is a safetensors file but not a denoised-node checkpoint (no model card)"
        )
    try:
        card = ModelCard.from_json(meta[CARD_KEY])
    except CheckpointInvalidError as exc:
        raise CheckpointInvalidError(f"{path}: {exc}") from None
    actual = weights_sha256(tensors)
    if actual != card.sha256:
        raise CheckpointMismatchError(
            f"checkpoint {path}: the weights hash to {actual[:12]}, the card says "
            f"{card.sha256[:12]}; "
            "the file was altered"
        )
    return card, tensors


def publish(
    src: str | Path,
    dst: str | Path,
    *,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    intended_use: dict[str, Any] | None = None,
) -> ModelCard:
    """Copy a verified checkpoint to ``dst`` (e.g. ``model/checkpoints/default.safetensors``)
    with a sidecar card ``dst.json`` that pins the file's sha256; ``training`` and ``metrics``
    are merged into the card, ``intended_use`` replaces its own (the weights, and so the
    sha256, stay as they are)."""
    card, tensors = read_checkpoint(src)
    card = replace(card, training={**card.training, **(training or {})},
                   metrics={**card.metrics, **(metrics or {})},
                   intended_use=card.intended_use if intended_use is None else intended_use)
    dtype = getattr(torch, card.weights_dtype)
    out = write_checkpoint(dst, tensors, card, dtype=dtype, sidecar=True)
    if out.sha256 != card.sha256:  # same tensors, same dtype: cannot differ
        raise CheckpointMismatchError(f"publishing {src} changed its weights")
    return out
