"""The models a worker keeps loaded: rules may name several checkpoints. Each is loaded when
a job first needs it; while the weights of those loaded exceed ``model.cache_mb``, the least
recently used ones (never the one just asked for) are unloaded."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

log = logging.getLogger(__name__)


class PooledModel(Protocol):
    @property
    def identity(self) -> str: ...


Model = TypeVar("Model", bound=PooledModel)


def _size(model: PooledModel) -> int:
    # Denoiser.weight_bytes; a model that does not say counts as nothing.
    return int(getattr(model, "weight_bytes", 0))


class ModelPool(Generic[Model]):
    def __init__(self, load: Callable[[str], Model], budget_bytes: int) -> None:
        self._load = load
        self.budget_bytes = budget_bytes
        self._loaded: OrderedDict[str, Model] = OrderedDict()

    def add(self, checkpoint: str, model: Model) -> None:
        """Keep an already loaded model (the worker's default, loaded at start)."""
        self._loaded[checkpoint] = model
        self._loaded.move_to_end(checkpoint)

    def get(self, checkpoint: str) -> Model:
        """The model for ``checkpoint``, loading it if needed (its errors propagate)."""
        model = self._loaded.get(checkpoint)
        if model is None:
            model = self._load(checkpoint)
            log.info("model loaded", extra={"model": model.identity,
                                            "models_loaded": len(self._loaded) + 1})
        self.add(checkpoint, model)
        self._evict(keep=checkpoint)
        return model

    @property
    def loaded(self) -> list[str]:
        return [m.identity for m in self._loaded.values()]

    def _evict(self, keep: str) -> None:
        while (sum(_size(m) for m in self._loaded.values()) > self.budget_bytes
               and len(self._loaded) > 1):
            oldest = next(k for k in self._loaded if k != keep)
            model = self._loaded.pop(oldest)
            log.info("model unloaded (model.cache_mb)", extra={"model": model.identity})
