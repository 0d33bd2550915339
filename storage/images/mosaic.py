"""Siemens mosaics: the slices of one volume tiled in one 2D image (fMRI, DWI, ASL).

A mosaic instance is a volume of its own. Its slice count comes from the CSA image header
(NumberOfImagesInMosaic), else from the older (0019,xx0A) element, else from the tiles that
hold any signal; the tiles sit row by row in a square grid of ceil(sqrt(count)) per side.
The node cuts the tiles out, denoises them as one volume and tiles the result back into the
same layout, so smoothing never crosses a tile border.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

CSA_CREATOR = "SIEMENS CSA HEADER"
MR_HEADER_CREATOR = "SIEMENS MR HEADER"
CSA_IMAGE_HEADER = 0x10  # (0029,xx10) CSA Image Header Info
MR_HEADER_IMAGES_IN_MOSAIC = 0x0A  # (0019,xx0A) NumberOfImagesInMosaic, VB-era


class MosaicError(ValueError):
    """The image says MOSAIC but its layout cannot be worked out."""


@dataclass(frozen=True)
class MosaicLayout:
    """``count`` tiles of ``tile_rows`` x ``tile_columns``, ``per_side`` to a grid row."""

    count: int
    per_side: int
    tile_rows: int
    tile_columns: int

    def tile(self, index: int) -> tuple[slice, slice]:
        row, column = divmod(index, self.per_side)
        return (slice(row * self.tile_rows, (row + 1) * self.tile_rows),
                slice(column * self.tile_columns, (column + 1) * self.tile_columns))

    def split(self, image: np.ndarray) -> np.ndarray:
        """(count, tile_rows, tile_columns) from the mosaic image."""
        return np.stack([image[self.tile(i)] for i in range(self.count)])

    def fill(self, mosaic: np.ndarray, index: int, tile: np.ndarray) -> None:
        mosaic[self.tile(index)] = tile


@dataclass(frozen=True)
class MosaicTile:
    """Where one slice of a mosaic sits in its image."""

    index: int
    layout: MosaicLayout


def is_mosaic(ds: Dataset) -> bool:
    image_type = ds.get("ImageType") or []
    values = [image_type] if isinstance(image_type, str) else list(image_type)
    return any(str(v).strip().upper() == "MOSAIC" for v in values) and "NumberOfFrames" not in ds


def mosaic_layout(ds: Dataset) -> MosaicLayout:
    """The layout of a mosaic image; its pixels are decoded only when no header gives a count."""
    rows, columns = int(ds.Rows), int(ds.Columns)
    count = images_in_mosaic(ds)
    if count is None:
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # any decoding failure: the layout is unknown
            raise MosaicError(f"no NumberOfImagesInMosaic and pixels unreadable: {exc}") from exc
        count = _tiles_with_signal(pixels)
    per_side = math.ceil(math.sqrt(count))
    if count < 1 or rows % per_side or columns % per_side:
        raise MosaicError(f"{count} images do not tile a {rows}x{columns} mosaic")
    return MosaicLayout(count, per_side, rows // per_side, columns // per_side)


def images_in_mosaic(ds: Dataset) -> int | None:
    csa = _private_value(ds, 0x0029, CSA_CREATOR, CSA_IMAGE_HEADER)
    if isinstance(csa, bytes):
        value = csa_fields(csa).get("NumberOfImagesInMosaic")
        if value:
            return int(float(value[0]))
    old = _private_value(ds, 0x0019, MR_HEADER_CREATOR, MR_HEADER_IMAGES_IN_MOSAIC)
    if isinstance(old, bytes) and len(old) >= 2:  # US read without a VR
        return int(struct.unpack("<H", old[:2])[0]) or None
    if isinstance(old, int) and old > 0:
        return old
    return None


def _private_value(ds: Dataset, group: int, creator: str, offset: int) -> object:
    try:
        block = ds.private_block(group, creator)
        return block[offset].value if offset in block else None
    except (KeyError, ValueError):
        return None


def csa_fields(data: bytes) -> dict[str, list[str]]:
    """Name -> values of a CSA header (the SV10 form; the older one reads alike for the
    fields used here); a damaged header gives what was read before the damage."""
    fields: dict[str, list[str]] = {}
    csa2 = data[:4] == b"SV10"
    offset = 8 if csa2 else 0
    try:
        count, _ = struct.unpack_from("<2I", data, offset)
        offset += 8
        for _ in range(min(count, 1000)):
            name, _vm, _vr, _syngodt, items, _xx = struct.unpack_from("<64si4s3i", data, offset)
            offset += 84
            values: list[str] = []
            for _item in range(items):
                _, length, _, _ = struct.unpack_from("<4i", data, offset)  # x1: the length
                offset += 16
                if length < 0 or offset + length > len(data):
                    return fields
                text = data[offset:offset + length].split(b"\0", 1)[0].decode("latin-1").strip()
                if text:
                    values.append(text)
                offset += length + (-length % 4)
            fields[name.split(b"\0", 1)[0].decode("latin-1")] = values
    except struct.error:
        pass
    return fields


def _tiles_with_signal(pixels: np.ndarray) -> int:
    """The largest n whose ceil(sqrt(n)) grid divides the image, counting tiles in grid order
    up to the last one that holds any non-zero value."""
    rows, columns = pixels.shape
    for per_side in range(2, 65):
        if rows % per_side or columns % per_side:
            continue
        tile_rows, tile_columns = rows // per_side, columns // per_side
        if tile_rows < 16:
            break
        filled = [bool(pixels[r * tile_rows:(r + 1) * tile_rows,
                              c * tile_columns:(c + 1) * tile_columns].any())
                  for r in range(per_side) for c in range(per_side)]
        last = max((i for i, f in enumerate(filled) if f), default=-1) + 1
        if last > (per_side - 1) ** 2:
            return last
    raise MosaicError("no NumberOfImagesInMosaic and no tile layout fits the image")
