"""Dead-leaves volumes: random occluding shapes over many scales, generated in torch.

Why: a denoiser trained on one template learns that template's texture and paints it into
flat regions. Dead leaves (shapes dropped one over another, sizes drawn from a power law) hold
what every image has and no template owns: flat regions, straight and curved edges both sharp
and soft, corners, thin structures and occlusions at every scale. Denoisers trained on such
images come close to ones trained on natural images.

Each shape is an ellipsoid or a convex polytope (the intersection of a few half-spaces), with
an intensity that is flat or shaded linearly across the shape, and an edge whose width is drawn
from sharp (a fraction of a voxel) to soft (a few voxels). Gibbs ringing and the rest of the
acquisition come from the synthesiser's k-space and noise stages (``synth.py``).
"""

from __future__ import annotations

import math

import torch

DEFAULT_SHAPE = (80, 144, 144)


def _rand(gen: torch.Generator, device: torch.device, *size: int) -> torch.Tensor:
    return torch.rand(size, generator=gen, device=device)


def _rotation(gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """A uniformly random 3x3 rotation (QR of a Gaussian matrix, signs fixed)."""
    a = torch.randn(3, 3, generator=gen, device=device)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))[None, :]


def _radius(gen: torch.Generator, device: torch.device, r_min: float, r_max: float) -> float:
    """A radius drawn log-uniformly on [r_min, r_max]. The scale-invariant law (density r^-4
    in 3D) needs tens of thousands of shapes before the small ones fill a volume; log-uniform
    sizes show every scale with a few hundred."""
    u = float(_rand(gen, device, 1))
    return float(r_min * (r_max / r_min) ** u)


def dead_leaves_volume(gen: torch.Generator, device: torch.device,
                       shape: tuple[int, int, int] = DEFAULT_SHAPE, shapes: int = 260,
                       r_min: float = 1.5, r_max: float = 70.0) -> torch.Tensor:
    """One volume (D, H, W) in [0, 1] on a 1 mm grid; later shapes occlude earlier ones."""
    background = float(_rand(gen, device, 1)) * 0.3
    vol = torch.full(shape, background, device=device)
    coords = [torch.arange(n, device=device, dtype=torch.float32) for n in shape]
    size = torch.tensor(shape, dtype=torch.float32, device=device)
    # Largest first, so that the small shapes stay visible on top of the large ones.
    radii = sorted((_radius(gen, device, r_min, r_max) for _ in range(shapes)), reverse=True)
    for r in radii:
        centre = _rand(gen, device, 3) * (size + 2 * r * 0.5) - r * 0.5
        # Bounding box of the shape (with margin for a soft edge), clipped to the volume.
        ext = 1.2 * r + 4.0
        lo = [max(0, math.floor(float(centre[i]) - ext)) for i in range(3)]
        hi = [min(shape[i], math.ceil(float(centre[i]) + ext) + 1) for i in range(3)]
        if any(hi[i] <= lo[i] for i in range(3)):
            continue
        z, y, x = torch.meshgrid(
            coords[0][lo[0] : hi[0]],
            coords[1][lo[1] : hi[1]],
            coords[2][lo[2] : hi[2]],
            indexing="ij",
        )
        rel = torch.stack([z, y, x], dim=-1) - centre  # (..., 3)
        rot = _rotation(gen, device)
        local = rel @ rot  # coordinates in the shape's own frame
        if float(_rand(gen, device, 1)) < 0.55:
            # Ellipsoid: axes between 0.25 r and r (thin plates and rods at the extremes).
            axes = r * (0.25 + 0.75 * _rand(gen, device, 3))
            q = (local / axes).norm(dim=-1)
            sdf = (q - 1.0) * axes.min()  # approximately the distance to the surface, in voxels
        else:
            # Convex polytope: 4-9 random half-spaces at distances about r from the centre.
            faces = int(torch.randint(4, 10, (1,), generator=gen, device=device))
            normals = torch.randn(faces, 3, generator=gen, device=device)
            normals = normals / normals.norm(dim=1, keepdim=True)
            dist = r * (0.5 + 0.5 * _rand(gen, device, faces))
            sdf = (local @ normals.T - dist).amax(dim=-1)
            sdf = torch.maximum(sdf, local.norm(dim=-1) - 1.2 * r + 3.0)  # bounded, inside the box
        soft = (
            0.25 if float(_rand(gen, device, 1)) < 0.5 else 0.5 + 2.5 * float(_rand(gen, device, 1))
        )
        alpha = torch.sigmoid(-sdf / soft)
        value = 0.05 + 0.95 * float(_rand(gen, device, 1))
        if float(_rand(gen, device, 1)) < 0.6:  # shaded: a linear ramp across the shape
            grad = torch.randn(3, generator=gen, device=device) * (0.15 / max(r, 1.0))
            inside = (value + rel @ grad).clamp(0.0, 1.0)
        else:
            inside = torch.full_like(alpha, value)
        block = vol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        vol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = block + alpha * (inside - block)
    vol = vol.clamp(0.0, None)
    return vol / vol.amax().clamp_min(1e-6)


def dead_leaves_maps(gen: torch.Generator, device: torch.device,
                     shape: tuple[int, int, int] = DEFAULT_SHAPE) -> torch.Tensor:
    """The volume as the synthesiser's four tissue-map channels: the image as the texture
    channel, the others empty (its contrast is in its random intensities)."""
    vol = dead_leaves_volume(gen, device, shape)
    maps = torch.zeros((4, *shape), device=device)
    maps[0] = vol
    return maps
