"""Domain-randomised training data, synthesised in torch on the training device.

Each sample is a stack of ``in_slices`` neighbouring slices of a simulated acquisition and the
clean centre slice it should become. Everything is drawn per sample, batched, with no host
round trip:

- **Anatomy.** Tissue maps at 1 mm: the MNI152 template and its grey matter, white matter and
  CSF maps (only the blocks outside the held-out slab and its gaps), or a procedural volume
  (soft organ-like regions, a vessel tree, trabecular bone-like texture) regenerated as
  training goes: non-brain structure.
- **Contrast.** A random weight per tissue map (every ordering: T1-, T2-, PD- and FLAIR-like and
  all between), some of the template's own texture, a gamma, and a smooth bias field.
- **Geometry.** A random slice direction and in-plane rotation, pixels of 0.5-2 mm, slices
  1-6 mm apart whose thickness is integrated over a box slice profile (thick 2D acquisitions).
- **k-space.** Zero-filled interpolation (up to 2x) and partial Fourier (down to 60 %): blur on
  the signal and the same filter on the noise (correlated noise).
- **Noise.** Complex Gaussian noise, magnitude: Rician (one coil) or noncentral chi
  (sum-of-squares of 2-32 coils), optionally scaled by a smooth g-factor map (1-2.5x).
- **Storage.** Vendor-zeroed backgrounds (a threshold mask applied to input and target) and
  12-bit integer storage.

The batch is normalised like inference normalises (by a robust scale of the noisy input) and
``noise_map`` reads the noise level from the noisy centre slice, as at inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from denoised_node.model.hyperparameters import HYPERPARAMETERS
from denoised_node.model.training.dead_leaves import dead_leaves_maps

MAX_FLOOR = 0.25
THICK_SUBSAMPLES = 3  # points across a thick slice's profile (a thin one: the 1 mm source)


@dataclass(frozen=True)
class SynthConfig:
    patch: int = HYPERPARAMETERS.patch
    in_slices: int = HYPERPARAMETERS.in_slices
    sigma_range: tuple[float, float] = HYPERPARAMETERS.sigma_range  # of the clean's bright level
    # The constant mixture of a run (never a sequence of fine-tunes): dead leaves and the
    # organ-like volumes, each this share of samples; the named anatomy the rest.
    dead_leaves_prob: float = 0.35
    procedural_prob: float = 0.15
    regenerate_every: int = 100  # samples drawn from one procedural volume before a new one
    # A random intensity curve (air stays dark) on this share: contrasts no source has.
    curve_prob: float = 0.35
    # The T1 template itself as the contrast: the tissue maps are smooth, and a run with 35 %
    # of template samples lost 2 dB on the template's real texture within 200 steps.
    template_texture_prob: float = 0.6
    axis_probs: tuple[float, float, float] = HYPERPARAMETERS.axis_probs
    pixel_mm: tuple[float, float] = (0.5, 2.0)
    native_prob: float = 0.4  # on the source's own grid: 1 mm pixels, right angles
    thick_prob: float = 0.45  # a 2D acquisition with thick slices
    thick_mm: tuple[float, float] = (2.0, 6.0)
    bias_prob: float = 0.6
    bias_strength: float = 0.35
    zero_fill_prob: float = 0.3
    partial_fourier_prob: float = 0.3
    coil_counts: tuple[int, ...] = (1, 1, 1, 2, 4, 8, 16, 32)
    gfactor_prob: float = 0.3
    zeroed_background_prob: float = 0.3
    twelve_bit_prob: float = 0.5
    gamma_prob: float = 0.3


# ---------------------------------------------------------------------------------------------
# Anatomy sources: (channels, D, H, W) tissue maps at 1 mm
# ---------------------------------------------------------------------------------------------


def brain_maps(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """Four channels: the T1 template (its own texture), grey matter, white matter, CSF."""
    from scipy.ndimage import gaussian_filter

    brain = gaussian_filter((t1 > 0.05).astype(np.float32), 1.0)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    return np.stack([t1, gm, wm, csf]).astype(np.float32)


def _smooth_field(shape: tuple[int, ...], cutoff: float, gen: torch.Generator,
                  device: torch.device) -> torch.Tensor:
    """A random field low-passed (Gaussian in k-space) at ``cutoff`` cycles per voxel, unit std."""
    noise = torch.randn(shape, generator=gen, device=device)
    spec = torch.fft.rfftn(noise)
    freqs = [torch.fft.fftfreq(n, device=device) for n in shape[:-1]] + [
        torch.fft.rfftfreq(shape[-1], device=device)]
    grids = torch.meshgrid(*freqs, indexing="ij")
    r2 = grids[0] * grids[0]
    for g in grids[1:]:
        r2 = r2 + g * g
    field = torch.fft.irfftn(spec * torch.exp(-r2 / (2 * cutoff**2)), s=shape)
    return (field - field.mean()) / field.std().clamp_min(1e-8)


def procedural_maps(gen: torch.Generator, device: torch.device,
                    shape: tuple[int, int, int] = (72, 144, 144)) -> torch.Tensor:
    """Non-brain structure: two soft organ-like regions, a vessel network (where two smooth
    fields both cross zero), and a trabecular texture inside a region; 4 channels like the
    brain maps, so the same contrast draw applies."""
    f1 = _smooth_field(shape, 0.02, gen, device)
    f2 = _smooth_field(shape, 0.02, gen, device)
    organ_a = torch.sigmoid(4.0 * (f1 - 0.3))
    organ_b = torch.sigmoid(4.0 * (f2 - 0.3)) * (1 - organ_a)
    v1 = _smooth_field(shape, 0.04, gen, device)
    v2 = _smooth_field(shape, 0.04, gen, device)
    vessels = torch.exp(-(v1 * v1 + v2 * v2) / (2 * 0.12**2))
    trab = _smooth_field(shape, 0.18, gen, device)
    region = torch.sigmoid(4.0 * (_smooth_field(shape, 0.015, gen, device) - 0.5))
    bone = torch.sigmoid(6.0 * (trab - 0.2)) * region
    body = torch.sigmoid(3.0 * (_smooth_field(shape, 0.01, gen, device) + 1.0))
    return torch.stack([organ_a * body, organ_b * body, vessels * body, bone * body])


def _foreground(maps: torch.Tensor, stride: int = 3) -> torch.Tensor:
    """Voxel coordinates (K, 3) where the maps hold tissue, on a coarse lattice."""
    coarse = maps.sum(0)[::stride, ::stride, ::stride]
    coords = torch.nonzero(coarse > 0.3 * coarse.amax()) * stride
    if len(coords) == 0:
        coords = torch.nonzero(torch.ones_like(coarse)) * stride
    return coords


# ---------------------------------------------------------------------------------------------
# The synthesiser
# ---------------------------------------------------------------------------------------------


@dataclass
class Batch:
    noisy: torch.Tensor  # (B, in_slices, P, P), normalised
    clean: torch.Tensor  # (B, 1, P, P) the clean centre slice (3D: (B, 1, S, P, P)), normalised
    sigma: torch.Tensor  # (B,) the true noise sigma, normalised (for the record)


class Synthesizer:
    """Draws batches of simulated acquisitions from tissue-map volumes (see the module doc)."""

    def __init__(self, brain_blocks: list[np.ndarray], cfg: SynthConfig, device: torch.device,
                 seed: int, block_weights: list[float] | None = None) -> None:
        """``block_weights``: each anatomy block's share of the anatomy samples (default: by
        its foreground size)."""
        if not brain_blocks:
            raise ValueError(
                "no training anatomy: every volume is too small for the held-out split"
            )
        self.cfg = cfg
        self.device = device
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed)
        self.brain = [torch.from_numpy(np.ascontiguousarray(b)).to(device) for b in brain_blocks]
        self.brain_fg = [_foreground(b) for b in self.brain]
        if block_weights is not None and len(block_weights) != len(brain_blocks):
            raise ValueError("one weight per anatomy block")
        sizes = torch.tensor(block_weights if block_weights is not None
                             else [float(len(f)) for f in self.brain_fg], dtype=torch.float64)
        self.brain_probs = (sizes / sizes.sum()).float()
        self.procedural: tuple[torch.Tensor, torch.Tensor] | None = None
        self.leaves: tuple[torch.Tensor, torch.Tensor] | None = None
        self.draws = 0

    # -- random helpers ---------------------------------------------------------------------
    def _u(self, n: int, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=self.gen, device=self.device)

    def _p(self, n: int, p: float) -> torch.Tensor:
        return torch.rand(n, generator=self.gen, device=self.device) < p

    def _choice(
        self, options: torch.Tensor, n: int, probs: torch.Tensor | None = None
    ) -> torch.Tensor:
        if probs is None:
            probs = torch.full((len(options),), 1.0 / len(options))
        idx = torch.multinomial(
            probs.to(self.device).float(), n, replacement=True, generator=self.gen
        )
        return options.to(self.device)[idx]

    # -- geometry ---------------------------------------------------------------------------
    def _source(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Tissue maps (C, D, H, W) and the voxel coordinates of their foreground (K, 3)."""
        cfg = self.cfg
        fresh = self.draws % cfg.regenerate_every == 0
        self.draws += 1
        u = float(torch.rand(1, generator=self.gen, device=self.device))
        if u < cfg.dead_leaves_prob:
            if self.leaves is None or fresh:
                maps = dead_leaves_maps(self.gen, self.device)
                self.leaves = (maps, _foreground(maps))
            return self.leaves
        if u < cfg.dead_leaves_prob + cfg.procedural_prob:
            if self.procedural is None or fresh:
                maps = procedural_maps(self.gen, self.device)
                self.procedural = (maps, _foreground(maps))
            return self.procedural
        i = int(self._choice(torch.arange(len(self.brain)), 1, self.brain_probs))
        return self.brain[i], self.brain_fg[i]

    def _grid(self, n: int, fg: torch.Tensor, shape: tuple[int, int, int]
              ) -> tuple[torch.Tensor, int]:
        """Sampling positions (n, S*sub, P, P, 3) in grid_sample's [-1, 1] (x, y, z) order, and
        the points per slice profile (sub)."""
        cfg, dev = self.cfg, self.device
        p, s = cfg.patch, cfg.in_slices
        axes = torch.tensor([0, 1, 2])
        axis = self._choice(axes, n, torch.tensor(cfg.axis_probs))
        # Native samples sit on the source's own 1 mm grid (no interpolation): resampling at
        # other sizes and angles softens the template's texture, and a network that sees only
        # softened texture over-smooths real 1 mm scans (2 dB lost on the validation slices).
        native = bool(self._p(1, cfg.native_prob).item())
        pixel = torch.ones(n, device=dev) if native else self._u(n, *cfg.pixel_mm)
        thick = bool(self._p(1, cfg.thick_prob).item())
        subsamples = THICK_SUBSAMPLES if thick else 1
        if thick:
            spacing = self._u(n, *cfg.thick_mm)
        else:
            spacing = torch.ones(n, device=dev) if native else pixel * self._u(n, 1.0, 1.3)
        thickness = spacing * self._u(n, 0.8, 1.0)
        if native:
            angle = torch.randint(0, 4, (n,), generator=self.gen, device=dev).float() * (
                math.pi / 2
            )
        else:
            angle = self._u(n, 0.0, 2 * math.pi)
        eye = torch.eye(3, device=dev)
        normal = eye[axis]  # (n, 3) in (D, H, W) voxel axes
        a1 = eye[(axis + 1) % 3]
        a2 = eye[(axis + 2) % 3]
        u = torch.cos(angle)[:, None] * a1 + torch.sin(angle)[:, None] * a2
        v = -torch.sin(angle)[:, None] * a1 + torch.cos(angle)[:, None] * a2
        size = torch.tensor(shape, dtype=torch.float32, device=dev)
        # Centres on the foreground, so that patches hold anatomy.
        pick = torch.randint(0, len(fg), (n,), generator=self.gen, device=dev)
        centre = fg[pick].float()
        if not native:
            centre = centre + torch.rand(n, 3, generator=self.gen, device=dev) - 0.5
        k = torch.arange(s, device=dev, dtype=torch.float32) - s // 2
        sub = (torch.arange(subsamples, device=dev, dtype=torch.float32) + 0.5) / subsamples - 0.5
        offs = (
            k[None, :, None] * spacing[:, None, None]
            + sub[None, None, :] * thickness[:, None, None]
        )
        ij = torch.arange(p, device=dev, dtype=torch.float32) - p // 2  # integer offsets
        pos = (
            centre[:, None, None, None, None, :]
            + offs[:, :, :, None, None, None] * normal[:, None, None, None, None, :]
            + ij[None, None, None, :, None, None]
            * pixel[:, None, None, None, None, None]
            * u[:, None, None, None, None, :]
            + ij[None, None, None, None, :, None]
            * pixel[:, None, None, None, None, None]
            * v[:, None, None, None, None, :]
        )
        norm = pos / (size - 1) * 2 - 1  # (n, S, sub, P, P, 3) in (D, H, W) order
        grid = norm.flip(-1).reshape(n, s * subsamples, p, p, 3)
        return grid, subsamples

    def _sample_maps(self, n: int) -> torch.Tensor:
        """(n, C, S, P, P): tissue maps through the slice profile, per sample."""
        cfg = self.cfg
        out = []
        for _ in range(n):
            src, fg = self._source()
            grid, sub = self._grid(1, fg, tuple(src.shape[1:]))  # type: ignore[arg-type]
            maps = F.grid_sample(src[None], grid, mode="bilinear", padding_mode="zeros",
                                 align_corners=True)  # (1, C, S*sub, P, P)
            c = maps.shape[1]
            maps = maps.reshape(1, c, cfg.in_slices, sub, cfg.patch, cfg.patch).mean(3)
            out.append(maps)
        return torch.cat(out)

    # -- contrast, k-space, noise, storage ---------------------------------------------------
    def _contrast(self, maps: torch.Tensor) -> torch.Tensor:
        n, c = maps.shape[:2]
        cfg = self.cfg
        w = self._u(n * c, 0.03, 1.0).reshape(n, c)
        w[:, 0] = self._u(n, 0.0, 0.5)  # the template's texture, a little
        template = self._p(n, cfg.template_texture_prob)
        w[template] = torch.tensor([1.0, 0.0, 0.0, 0.0], device=self.device)
        img = torch.einsum("nc,ncspq->nspq", w, maps)
        img = img / img.flatten(1).amax(1).clamp_min(1e-6)[:, None, None, None]
        gamma = torch.where(
            self._p(n, cfg.gamma_prob), self._u(n, 0.7, 1.4), torch.ones(n, device=self.device)
        )
        img = img.clamp_min(0) ** gamma[:, None, None, None]
        return self._curve(img)

    def _curve(self, img: torch.Tensor, knots: int = 6) -> torch.Tensor:
        """A random piecewise-linear intensity curve on ``curve_prob`` of the samples: inverts or
        reorders contrasts (T1 into T2- or FLAIR-like) for sources that carry one contrast only;
        zero stays zero (air has no signal)."""
        n = img.shape[0]
        use = self._p(n, self.cfg.curve_prob)
        if not bool(use.any()):
            return img
        ys = self._u(n * knots, 0.05, 1.0).reshape(n, knots)
        ys[:, 0] = 0.0
        x = img.clamp(0.0, 1.0) * (knots - 1)
        lo = x.floor().clamp(max=knots - 2)
        frac = x - lo
        idx = lo.long().flatten(1)
        y0 = torch.gather(ys, 1, idx).reshape(img.shape)
        y1 = torch.gather(ys, 1, idx + 1).reshape(img.shape)
        curved = y0 + frac * (y1 - y0)
        curved = curved / curved.flatten(1).amax(1).clamp_min(1e-6)[:, None, None, None]
        return torch.where(use[:, None, None, None], curved, img)

    def _bias(self, img: torch.Tensor) -> torch.Tensor:
        n, _, p, _ = img.shape
        y = torch.linspace(-1, 1, p, device=self.device)
        yy, xx = torch.meshgrid(y, y, indexing="ij")
        terms = torch.stack([xx, yy, xx * xx, yy * yy, xx * yy])  # (5, P, P)
        coef = (torch.rand(n, 5, generator=self.gen, device=self.device) * 2 - 1)
        coef = coef * self.cfg.bias_strength * self._p(n, self.cfg.bias_prob)[:, None]
        field = torch.exp(torch.einsum("nk,kpq->npq", coef, terms))
        return img * field[:, None]

    def _kspace_filter(self, n: int) -> torch.Tensor:
        """(n, P, P) real masks in fftshifted k-space: zero-filling and partial Fourier."""
        cfg, p = self.cfg, self.cfg.patch
        f = torch.fft.fftshift(torch.fft.fftfreq(p, device=self.device))  # -0.5..0.5
        fy, fx = torch.meshgrid(f, f, indexing="ij")
        keep = torch.where(
            self._p(n, cfg.zero_fill_prob), self._u(n, 0.5, 1.0), torch.ones(n, device=self.device)
        )
        mask = (
            (fy.abs()[None] <= 0.5 * keep[:, None, None])
            & (fx.abs()[None] <= 0.5 * keep[:, None, None])
        ).float()
        pf = torch.where(
            self._p(n, cfg.partial_fourier_prob),
            self._u(n, 0.6, 0.85),
            torch.ones(n, device=self.device),
        )
        # Partial Fourier: the first (1 - pf) of the phase-encoding axis is not acquired.
        return mask * (fy[None] >= -0.5 + (1.0 - pf)[:, None, None]).float()

    def _apply_kspace(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        k = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))
        return torch.fft.ifft2(torch.fft.ifftshift(k * mask[:, None], dim=(-2, -1)))

    def _gfactor(self, n: int) -> torch.Tensor:
        p = self.cfg.patch
        field = torch.stack([_smooth_field((p, p), 0.015, self.gen, self.device) for _ in range(n)])
        g = torch.exp(0.45 * field)
        g = g / g.mean(dim=(-2, -1), keepdim=True)
        use = self._p(n, self.cfg.gfactor_prob)
        return torch.where(use[:, None, None], g, torch.ones_like(g))

    @torch.no_grad()
    def batch(self, n: int, all_slices: bool = False) -> Batch:
        """``n`` samples; the target is the centre slice, or every slice (3D) with
        ``all_slices``."""
        cfg = self.cfg
        half = cfg.in_slices // 2
        img = self._contrast(self._sample_maps(n))  # (n, S, P, P), bright tissue ~1
        img = self._bias(img)
        level = torch.quantile(img[:, half].flatten(1), 0.995, dim=1).clamp_min(1e-3)
        img = img / level[:, None, None, None]
        mask = self._kspace_filter(n)
        signal = self._apply_kspace(img, mask)  # complex
        clean = signal.abs()
        lo, hi = cfg.sigma_range
        # Log-uniform, so that each decade of noise gets its share (train.py weights the loss
        # by 1/sigma^2, so that 1 % noise is not drowned by 9 %).
        sigma = torch.exp(self._u(n, math.log(lo), math.log(hi)))
        # Filtered noise keeps its marginal sigma: divide by the filter's RMS gain.
        gain = mask.pow(2).mean(dim=(-2, -1)).clamp_min(1e-6).sqrt()
        g = self._gfactor(n)
        local = (sigma[:, None, None] * g)[:, None]  # (n, 1, P, P)
        noise = torch.complex(torch.randn(img.shape, generator=self.gen, device=self.device),
                              torch.randn(img.shape, generator=self.gen, device=self.device))
        noise = self._apply_kspace(noise, mask) / gain[:, None, None, None]
        power = (signal + local * noise).abs().pow(2)
        coils = self._choice(torch.tensor(cfg.coil_counts), n).float()
        # A realistic corner only: the sum-of-squares floor (about sigma * sqrt(2N)) stays under
        # MAX_FLOOR of the bright level; many coils at high noise is not what scanners send,
        # and such samples' floors dominated the loss (a first run lost 4 dB on plain noise).
        most = (MAX_FLOOR / sigma).pow(2) / 2
        coils = torch.minimum(coils, most.floor().clamp_min(1.0))
        extra = (coils - 1).clamp_min(0)
        # Noncentral chi: the other coils' noise adds sigma^2 * chi^2 with 2(N-1) degrees.
        multi = extra > 0
        if bool(multi.any()):
            shape = extra[multi][:, None, None, None].expand(-1, *img.shape[1:]).contiguous()
            chi2 = torch._standard_gamma(shape, generator=self.gen) * 2.0  # chi^2(2k) = 2 Gamma(k)
            power[multi] = power[multi] + (local[multi] ** 2) * chi2
        noisy = power.sqrt()
        zeroed = self._p(n, cfg.zeroed_background_prob)
        smooth = F.avg_pool2d(noisy, 5, stride=1, padding=2)
        thresh = self._u(n, 0.03, 0.15)[:, None, None, None] * torch.quantile(
            smooth[:, half].flatten(1), 0.99, dim=1)[:, None, None, None]
        keep = torch.where(
            zeroed[:, None, None, None], smooth > thresh, torch.ones_like(noisy, dtype=torch.bool)
        )
        noisy = noisy * keep
        clean = clean * keep
        bits = self._p(n, cfg.twelve_bit_prob)
        top = self._u(n, 300.0, 4095.0) / noisy.flatten(1).amax(1).clamp_min(1e-6)
        quant = torch.round(noisy * top[:, None, None, None]) / top[:, None, None, None]
        noisy = torch.where(bits[:, None, None, None], quant, noisy)
        if self._p(1, 0.5).item():
            noisy, clean = noisy.flip(1), clean.flip(1)
        # Normalise as inference does: by the bright level of the noisy input, jittered.
        scale = torch.quantile(noisy[:, half].flatten(1), 0.995, dim=1).clamp_min(1e-3)
        scale = scale * self._u(n, 0.8, 1.25)
        noisy = noisy / scale[:, None, None, None]
        clean = clean / scale[:, None, None, None]
        clean = clean[:, None] if all_slices else clean[:, half : half + 1]
        return Batch(noisy.float().contiguous(), clean.float().contiguous(), sigma / scale)
