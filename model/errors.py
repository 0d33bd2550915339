"""Errors of the model package: one base class, specific subclasses with clear messages."""

from __future__ import annotations


class ModelError(Exception):
    """The denoising model could not be loaded or run."""


class CheckpointNotFoundError(ModelError):
    """The checkpoint file does not exist: check [model] checkpoint in the config."""


class CheckpointInvalidError(ModelError):
    """The file is not a valid denoised-node checkpoint (not safetensors, or no model card)."""


class CheckpointMismatchError(ModelError):
    """The checkpoint's weights do not match its model card (sha256, tensor names or shapes):
    the file was altered or truncated; restore it or retrain."""


class DeviceUnavailableError(ModelError):
    """The requested device is not available on this host: set [model] device to auto or cpu."""


class InputVolumeError(ModelError):
    """The input volume cannot be denoised (wrong rank, empty, or not finite)."""
