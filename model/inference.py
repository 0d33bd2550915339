"""Inference: a volume in physical units in, the denoised volume out.

``Denoiser.load`` reads and verifies a checkpoint, builds the network from its card and keeps
it warm on a device; ``denoise`` normalises the volume by its robust scale, estimates the noise
sigma of each slice (the estimator used in training), turns it into the timestep through the
card's noise schedule, pads rows and columns to what the network needs, runs one deterministic
forward pass per slice (batched, mixed precision on a GPU) and crops back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from denoised_node.config.settings import PLANE_CHOICES, TTA_CHOICES, ModelSettings
from denoised_node.model.card import Architecture, resolve_checkpoint
from denoised_node.model.checkpoint import ModelCard, read_checkpoint
from denoised_node.model.errors import (
    CheckpointMismatchError,
    DeviceUnavailableError,
    InputVolumeError,
)
from denoised_node.model.network import DenoiseNet, build_network
from denoised_node.model.noise import estimate_sigma, robust_scale
from denoised_node.model.noise_map import noise_map
from denoised_node.model.schedule import NoiseSchedule

logger = logging.getLogger(__name__)


Progress = Callable[[int, int], None]

# Test-time augmentation: the slice's 90-degree rotations and mirror images, mapped back and
# averaged (deterministic); docs/model.md measures them beside the planes.
TTA_TRANSFORMS: tuple[tuple[int, bool], ...] = (
    (0, False), (0, True), (2, False), (2, True), (1, False), (1, True), (3, False), (3, True)
)

# Multi-planar inference: on a near-isotropic volume the 2.5D network also runs with rows,
# then columns, as the slice axis and the planes are averaged; their errors are largely
# independent. Where it applies (voxel sides within ISOTROPY_LIMIT of each other, at least
# MIN_PLANE_DEPTH slices) and why each plane reads the noise a little lower
# (PLANE_SIGMA_FACTOR): docs/model.md, "Several planes on near-isotropic volumes".
PLANE_ORDERS: tuple[tuple[int, int, int], ...] = ((0, 1, 2), (1, 0, 2), (2, 0, 1))
ISOTROPY_LIMIT = 1.4
MIN_PLANE_DEPTH = 16
PLANE_SIGMA_FACTOR = {1: 1.0, 2: 0.85, 3: 0.8}

Spacing = tuple[float, float, float]

# The [model] section's defaults (batch size, mixed precision, threads...): their one home is
# config/settings.py's ModelSettings, which Denoiser.load and denoise_volume default to.
NODE_DEFAULTS = ModelSettings()


def _run_tta(net: DenoiseNet, x: torch.Tensor, t: torch.Tensor, tta: int) -> torch.Tensor:
    acc: torch.Tensor | None = None
    for k, flip in TTA_TRANSFORMS[:tta]:
        xi = torch.rot90(x, k, dims=(-2, -1))
        if flip:
            xi = torch.flip(xi, dims=(-1,))
        yi = net(xi, t).float()
        if flip:
            yi = torch.flip(yi, dims=(-1,))
        yi = torch.rot90(yi, -k, dims=(-2, -1))
        acc = yi if acc is None else acc + yi
    assert acc is not None
    return acc / tta


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device {device!r} was asked for but CUDA is not available on this host"
            )
        index = int(device[5:]) if device.startswith("cuda:") else 0
        if index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"device {device!r} does not exist: this host has {torch.cuda.device_count()} "
                "CUDA device(s)"
            )
        return torch.device("cuda", index)
    raise DeviceUnavailableError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")


def _pad_to(x: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    pad = [(0, 0)] * (x.ndim - 2) + [(ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)]
    return np.pad(x, pad, mode="symmetric"), (h, w)


def _crop(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    h, w = hw
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top : top + h, left : left + w]


def check_volume(volume: np.ndarray) -> np.ndarray:
    vol = np.asarray(volume)
    if vol.ndim == 2:
        vol = vol[None]
    if vol.ndim != 3 or min(vol.shape) == 0:
        raise InputVolumeError(f"expected a (slices, rows, cols) volume, got shape {vol.shape}")
    vol = vol.astype(np.float32, copy=False)
    if not np.isfinite(vol).all():
        raise InputVolumeError("the volume holds NaN or infinite values")
    return vol


def planes_for(shape: tuple[int, ...], spacing: Spacing | None, planes: int) -> int:
    """How many planes a volume of ``shape`` (slices, rows, columns) with voxel ``spacing``
    (mm, same order) gets when ``planes`` are configured: 1 unless its voxels are near-cubic
    and it has at least MIN_PLANE_DEPTH slices, rows and columns. Unknown spacing: 1."""
    if planes <= 1 or spacing is None or len(shape) != 3 or min(shape) < MIN_PLANE_DEPTH:
        return 1
    steps = [abs(float(x)) for x in spacing]
    if len(steps) != 3 or min(steps) <= 0 or not all(np.isfinite(steps)):
        return 1
    return planes if max(steps) / min(steps) <= ISOTROPY_LIMIT else 1


# How a checkpoint reads the noise level (its card's architecture says, under "noise_estimator"):
# "haar_mad" (the 1.x models: one Haar MAD figure per slice) or "noise_map" (noise_map.py: a
# map per slice, robust to zeroed backgrounds, coil combination and correlated noise).
NOISE_ESTIMATORS = ("haar_mad", "noise_map")


def uses_noise_map(net: DenoiseNet) -> bool:
    return Architecture.from_dict(net.cfg).noise_estimator == "noise_map"


def noise_map_factor(net: DenoiseNet) -> float:
    """What the noise map's reading is multiplied by before it becomes the timestep and the map
    channel: 1 for networks trained on the map; for 1.x weights moved onto the map (widened,
    not retrained) the factor that puts the map's reading on the scale of the Haar MAD they
    were trained with (it read 0.79-0.87x of the true sigma), chosen on validation."""
    return Architecture.from_dict(net.cfg).noise_map_factor


def slice_timesteps(vol: np.ndarray, schedule: NoiseSchedule, scale: float = 1.0,
                    factor: float = 1.0) -> np.ndarray:
    """Per-slice timesteps from the Haar MAD estimate of each slice normalised by ``scale``
    (one slice at a time: no normalised copy of the volume), times ``factor``."""
    sigmas = np.array([estimate_sigma(s / scale) for s in vol], dtype=np.float32)
    return schedule.timestep(sigmas * np.float32(factor))


def noise_inputs(net: DenoiseNet, slices: np.ndarray, schedule: NoiseSchedule,
                 factor: float = 1.0) -> tuple[np.ndarray, np.ndarray | None]:
    """The network's noise inputs for normalised ``slices`` (B, H, W): one timestep per slice,
    and the noise-map channel (B, H, W) as a fraction of the timestep range where the network
    takes one."""
    if not uses_noise_map(net):
        sigmas = np.array([estimate_sigma(s) for s in slices], dtype=np.float32)
        return schedule.timestep(sigmas * np.float32(factor)), None
    result = noise_map(torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32)))
    factor *= noise_map_factor(net)
    t = schedule.timestep(result.sigma.numpy() * np.float32(factor))
    if not net.map_channel:
        return t, None
    local = schedule.timestep(result.sigma_map.numpy() * np.float32(factor))
    return t, (local / np.float32(schedule.num_steps - 1)).astype(np.float32)


@torch.inference_mode()
def denoise_volume(
    net: DenoiseNet,
    volume: np.ndarray,
    schedule: NoiseSchedule,
    *,
    device: torch.device | None = None,
    batch_size: int = NODE_DEFAULTS.batch_size,
    amp: bool = False,
    progress: Progress | None = None,
    tta: int = 1,
    planes: int = 1,
    batch_pixels: int | None = None,
) -> np.ndarray:
    """The whole inference path on an in-memory network (also used by training's validation).
    ``planes`` > 1 averages the 2.5D network run along that many axes (see ``planes_for``;
    the caller decides whether the volume suits it); a 3D network ignores it.
    ``batch_pixels``: a 2.5D batch holds at most this many pixels (at least one slice)."""
    if tta not in TTA_CHOICES:
        raise ValueError(f"tta must be one of {TTA_CHOICES}, not {tta}")
    if planes not in PLANE_CHOICES:
        raise ValueError(f"planes must be one of {PLANE_CHOICES}, not {planes}")
    vol = check_volume(volume)
    squeeze = np.asarray(volume).ndim == 2
    device = device or next(net.parameters()).device
    scale = robust_scale(vol)
    use_amp = amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    if net.spatial_dims == 2:
        # Normalised and padded batch by batch, into one output array: besides the caller's
        # volume, memory holds one copy of it (two with several planes) however long the series.
        result = np.empty(0, dtype=np.float32)
        for index, order in enumerate(PLANE_ORDERS[:planes]):
            view = vol.transpose(order)  # no copy: batches gather their slices from the view
            batch = _batch_for(view.shape, batch_size, batch_pixels)
            out = _denoise_2d(net, view, scale, schedule, PLANE_SIGMA_FACTOR[planes], batch,
                              device, use_amp, amp_dtype,
                              _plane_progress(progress, index, planes, vol.shape[0]), tta)
            back = out.transpose(np.argsort(order))
            if index == 0:
                result = np.ascontiguousarray(back)
            else:
                result += back
            del out, back
        if planes > 1:
            result /= planes
    else:
        vol_n = vol / scale
        t_all, local = noise_inputs(net, vol_n, schedule)
        padded, hw = _pad_to(vol_n, net.multiple)
        local_padded = None if local is None else _pad_to(local, net.multiple)[0]
        del vol_n
        out = _denoise_3d(net, padded, t_all, device, use_amp, amp_dtype, progress, tta,
                          local_padded)
        result = np.ascontiguousarray(_crop(out, hw))
        del padded, out
    result *= scale
    if vol.min() >= 0:
        np.maximum(result, 0.0, out=result)
    result = result.astype(np.float32, copy=False)
    return result[0] if squeeze else result


def _batch_for(shape: tuple[int, ...], batch_size: int, batch_pixels: int | None) -> int:
    """Slices per batch: ``batch_size``, fewer where they would hold over ``batch_pixels``."""
    if batch_pixels is None:
        return batch_size
    return max(1, min(batch_size, batch_pixels // max(1, shape[-2] * shape[-1])))


def _plane_progress(progress: Progress | None, index: int, planes: int,
                    slices: int) -> Progress | None:
    """Progress of one plane's pass, reported in the volume's slices over all planes."""
    if progress is None or planes == 1:
        return progress

    def report(done: int, total: int) -> None:
        progress(min(slices, (index * total + done) * slices // (planes * total)), slices)

    return report


def _denoise_2d(net: DenoiseNet, vol: np.ndarray, scale: float, schedule: NoiseSchedule,
                factor: float, batch_size: int, device: torch.device, use_amp: bool,
                amp_dtype: torch.dtype, progress: Progress | None, tta: int) -> np.ndarray:
    """2.5D: each slice with its neighbours as channels (edges repeated), batch by batch, and
    the noise inputs read from each slice (times ``factor``). Returns the normalised output;
    the caller scales it back."""
    n = vol.shape[0]
    out = np.empty_like(vol)
    half = net.in_slices // 2
    offsets = np.arange(-half, half + 1)
    on_gpu = device.type == "cuda"

    def collect(idx: np.ndarray, y: torch.Tensor, hw: tuple[int, int]) -> None:
        out[idx] = _crop(y[:, 0].float().cpu().numpy(), hw)  # waits for this batch only
        if progress is not None:
            progress(int(idx[-1]) + 1, n)

    # CUDA kernels run asynchronously: batch k is queued before batch k-1 is copied back and
    # batch k+1 is built, so the GPU computes while the CPU slices, pads and copies.
    pending: tuple[np.ndarray, torch.Tensor, tuple[int, int]] | None = None
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        nb = np.clip(idx[:, None] + offsets[None, :], 0, n - 1)
        slabs = vol[nb] / scale
        t_batch, local = noise_inputs(net, slabs[:, half], schedule, factor)
        if local is not None:
            slabs = np.concatenate([slabs, local[:, None]], axis=1)
        batch, hw = _pad_to(slabs, net.multiple)
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        if on_gpu:
            x = x.pin_memory()
        x = x.to(device, non_blocking=on_gpu)
        t = torch.from_numpy(np.ascontiguousarray(t_batch)).to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            y = _run_tta(net, x, t, tta)
        if pending is not None:
            collect(*pending)
        pending = (idx, y, hw)
    if pending is not None:
        collect(*pending)
    return out


def _denoise_3d(
    net: DenoiseNet,
    padded: np.ndarray,
    t_all: np.ndarray,
    device: torch.device,
    use_amp: bool,
    amp_dtype: torch.dtype,
    progress: Progress | None,
    tta: int = 1,
    local: np.ndarray | None = None,
) -> np.ndarray:
    """3D variant: overlapping blocks along the slice axis, averaged where they overlap;
    ``local``: the noise-map channel, padded like the volume."""
    depth = Architecture.from_dict(net.cfg).block_depth
    step = max(1, depth - 4)
    n = padded.shape[0]
    acc = np.zeros_like(padded)
    weight = np.zeros((n, 1, 1), dtype=np.float32)
    starts = list(range(0, max(1, n - depth + 1), step))
    if starts[-1] + depth < n:
        starts.append(n - depth)
    for s in starts:
        idx = np.clip(np.arange(s, s + depth), 0, n - 1)
        block = padded[idx][None] if local is None else np.stack([padded[idx], local[idx]])
        x = torch.from_numpy(np.ascontiguousarray(block))[None].to(device)
        t = torch.tensor([float(np.median(t_all[idx]))], device=device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            y = _run_tta(net, x, t, tta)[0, 0].cpu().numpy()
        for k, i in enumerate(idx):
            if s + k < n:
                acc[i] += y[k]
                weight[i] += 1
        if progress is not None:
            progress(min(n, s + depth), n)
    return acc / np.maximum(weight, 1)


@dataclass
class Denoiser:
    """A loaded, verified model kept warm on a device."""

    card: ModelCard
    net: DenoiseNet
    schedule: NoiseSchedule
    device: torch.device
    batch_size: int = NODE_DEFAULTS.batch_size
    amp: bool = NODE_DEFAULTS.amp
    path: Path | None = None
    batch_pixels: int = NODE_DEFAULTS.batch_pixels
    tta: int = 1
    planes: int = 1  # on near-isotropic volumes (planes_for); others get 1

    @classmethod
    def load(
        cls,
        checkpoint: str | Path = NODE_DEFAULTS.checkpoint,
        device: str = NODE_DEFAULTS.device,
        batch_size: int = NODE_DEFAULTS.batch_size,
        amp: bool = NODE_DEFAULTS.amp,
        threads: int = NODE_DEFAULTS.threads,
        tta: int | None = None,
        planes: int | None = None,
        batch_pixels: int = NODE_DEFAULTS.batch_pixels,
    ) -> Denoiser:
        """Load and verify ``checkpoint``. ``tta``: passes averaged per slice (1, 2, 4, 8);
        None picks 8 on a GPU and 1 on a CPU. ``planes``: planes averaged on near-isotropic
        volumes (1, 2, 3); None picks 3 on a GPU and 2 on a CPU (two passes keep a 256x256
        slice under 0.3 s on two cores)."""
        path = resolve_checkpoint(checkpoint)
        dev = resolve_device(device)
        if threads > 0:
            torch.set_num_threads(threads)
        card, tensors = read_checkpoint(path)
        try:
            net = build_network(card.architecture)
            net.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointMismatchError(
                f"checkpoint {path}: the weights do not fit the architecture in its card: {exc}"
            ) from None
        schedule = NoiseSchedule.from_dict(card.schedule)
        net.eval().to(dev)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        logger.info("loaded model %s on %s", card.identity, dev, extra={"model": card.identity})
        if tta is None:
            tta = 8 if dev.type == "cuda" else 1
        if tta not in TTA_CHOICES:
            raise ValueError(f"tta must be one of {TTA_CHOICES}, not {tta}")
        if planes is None:
            planes = 3 if dev.type == "cuda" else 2
        if planes not in PLANE_CHOICES:
            raise ValueError(f"planes must be one of {PLANE_CHOICES}, not {planes}")
        return cls(card=card, net=net, schedule=schedule, device=dev, batch_size=batch_size,
                   amp=amp, path=path, tta=tta, planes=planes, batch_pixels=batch_pixels)

    @classmethod
    def from_settings(cls, model: ModelSettings) -> Denoiser:
        """Load as the `[model]` section of the node's config says."""
        return cls.load(checkpoint=model.checkpoint, device=model.device,
                        batch_size=model.batch_size, amp=model.amp, threads=model.threads,
                        tta=model.tta, planes=model.planes, batch_pixels=model.batch_pixels)

    @property
    def identity(self) -> str:
        return self.card.identity

    @property
    def weight_bytes(self) -> int:
        """The weights' size on the device (what model.cache_mb counts)."""
        return sum(p.numel() * p.element_size() for p in self.net.parameters())

    def planes_for(self, shape: tuple[int, ...], spacing: Spacing | None) -> int:
        """The planes a volume of this shape and voxel spacing gets from this model."""
        return planes_for(shape, spacing, self.planes) if self.net.spatial_dims == 2 else 1

    def denoise(self, volume: np.ndarray, progress: Progress | None = None,
                spacing: Spacing | None = None) -> np.ndarray:
        """Denoise ``volume`` (slices, rows, columns). ``spacing``: its voxel size in mm in the
        same order, which lets a near-isotropic volume be denoised in several planes."""
        t0 = time.perf_counter()
        out = denoise_volume(
            self.net,
            volume,
            self.schedule,
            device=self.device,
            batch_size=self.batch_size,
            amp=self.amp,
            progress=progress,
            tta=self.tta,
            planes=self.planes_for(np.shape(volume), spacing),
            batch_pixels=self.batch_pixels,
        )
        logger.debug(
            "denoised %s in %.2f s",
            tuple(np.shape(volume)),
            time.perf_counter() - t0,
            extra={"model": self.identity},
        )
        return out
