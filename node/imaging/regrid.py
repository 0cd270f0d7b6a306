"""Tilted and unevenly spaced stacks, resampled to a regular orthogonal grid for the model, and the model's
labels mapped back onto the original slices.

The grid keeps the series' own row and column directions and in-plane pixel spacing; its third axis is
the slice normal (row x column), with the median step between the original slices along the normal.
It is wide enough to hold every original slice after the in-plane drift a gantry tilt gives them.

Interpolation (documented in docs/models.md):
- image: linear along the normal between the two nearest original slices, bilinear in the plane
  (each original slice is shifted by its in-plane drift); outside the scanned field: the series' minimum;
- labels back: nearest neighbour, from the grid slice nearest to each original slice along the normal,
  shifted back by that slice's drift; so SEG frames sit on the original instances with their own
  position and orientation.
Measurements are made on the orthogonal grid, in patient millimetres.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from node.errors import VolumeError
from node.imaging.volume import FrameRef, Volume

__all__ = ["Regridded", "regularize"]


@dataclass
class Regridded:
    """An irregular source volume and its orthogonal resampling."""

    source: Volume
    #: the orthogonal volume the model sees (pixels resampled; geometry in :attr:`Volume.affine`)
    volume: Volume
    #: along-normal position of each source slice, relative to the first (mm)
    source_d: np.ndarray
    #: along-normal position of each grid slice, relative to the first source slice (mm)
    grid_d: np.ndarray
    #: per source slice: where its pixel (0, 0) falls on the grid, in grid pixels (row, column)
    offsets: np.ndarray

    def describe(self) -> dict[str, object]:
        """For the job's summary: why and how the series was resampled."""
        sx, sy, sz = self.volume.spacing
        return {"reason": self.source.geometry_note, "grid_shape": list(self.volume.shape),
                "grid_spacing_mm": [round(sx, 4), round(sy, 4), round(sz, 4)],
                "image": "linear along the normal, bilinear in plane", "labels_back": "nearest neighbour"}

    def to_source(self, labels: np.ndarray) -> np.ndarray:
        """Labels on the grid ``[m, J, I]`` -> labels on the source slices ``[k, j, i]`` (nearest neighbour)."""
        if labels.shape != self.volume.shape:
            raise VolumeError(f"labels of shape {labels.shape} do not match the grid {self.volume.shape}")
        dz = self.volume.spacing[2]
        k_n, rows, cols = self.source.shape
        out = np.zeros((k_n, rows, cols), dtype=labels.dtype)
        for k in range(k_n):
            m = round(float((self.source_d[k] - self.grid_d[0]) / dz))
            m = min(max(m, 0), labels.shape[0] - 1)
            if not labels[m].any():
                continue
            # source pixel (j, i) sits at grid pixel (j + offset_row, i + offset_col)
            ndimage.affine_transform(labels[m], np.eye(2), offset=self.offsets[k], output_shape=(rows, cols),
                                     output=out[k], order=0, mode="constant", cval=0)
        return out


def regularize(volume: Volume, *, max_voxels: int = 1_500_000_000) -> Regridded | None:
    """The orthogonal resampling of an irregular volume (tilted or unevenly spaced); None when the
    volume is already a regular orthogonal stack.

    Raises:
        VolumeError: the grid would be absurdly large (positions far apart for the pixel spacing).
    """
    if not volume.irregular:
        return None
    if volume.positions is None or volume.shape[0] < 2:
        raise VolumeError(f"series {volume.series_uid}: an irregular stack without slice positions")
    r = volume.affine[:3, 0] / np.linalg.norm(volume.affine[:3, 0])
    c = volume.affine[:3, 1] / np.linalg.norm(volume.affine[:3, 1])
    n = np.cross(r, c)
    dx, dy = float(np.linalg.norm(volume.affine[:3, 0])), float(np.linalg.norm(volume.affine[:3, 1]))
    rel = volume.positions - volume.positions[0]
    d = rel @ n
    a = rel @ r / dx  # in-plane drift of each slice's origin, in columns
    b = rel @ c / dy  # ... and in rows
    steps = np.diff(d)
    dz = float(np.median(steps))
    if dz <= 0:
        raise VolumeError(f"series {volume.series_uid}: slices are not ordered along their normal")
    a0, b0 = math.floor(float(a.min())), math.floor(float(b.min()))
    width = volume.shape[2] + math.ceil(float(a.max())) - a0
    height = volume.shape[1] + math.ceil(float(b.max())) - b0
    depth = math.floor(float((d[-1] - d[0]) / dz) + 1e-6) + 1
    if depth * height * width > max_voxels:
        raise VolumeError(f"series {volume.series_uid}: the resampled grid would be {depth} x {height} x {width} "
                          "voxels; the slice positions do not fit a plausible stack")
    grid_d = d[0] + dz * np.arange(depth)
    fill = float(np.min(volume.pixels))
    pixels = np.empty((depth, height, width), dtype=volume.pixels.dtype if volume.pixels.dtype.kind == "f"
                      else np.float32)
    offsets = np.stack([b - b0, a - a0], axis=1)  # source pixel (0, 0) of slice k on the grid (row, col)

    def shifted(k: int) -> np.ndarray:
        src = volume.pixels[k].astype(np.float32, copy=False)
        # grid pixel (J, I) reads source pixel (J - offset_row, I - offset_col)
        return ndimage.affine_transform(src, np.eye(2), offset=-offsets[k], output_shape=(height, width),
                                        order=1, mode="constant", cval=fill)

    cache: dict[int, np.ndarray] = {}
    for m, z in enumerate(grid_d):
        k1 = int(np.searchsorted(d, z, side="left"))
        if k1 < len(d) and abs(d[k1] - z) < 1e-6:
            k0, k1, w = k1, k1, 0.0
        else:
            k0, k1 = max(k1 - 1, 0), min(k1, len(d) - 1)
            w = 0.0 if k0 == k1 else float((z - d[k0]) / (d[k1] - d[k0]))
        for k in list(cache):
            if k < k0:
                del cache[k]
        for k in {k0, k1}:
            if k not in cache:
                cache[k] = shifted(k)
        pixels[m] = cache[k0] if w == 0.0 else (1.0 - w) * cache[k0] + w * cache[k1]
    if volume.pixels.dtype.kind != "f" and np.all(np.isfinite(pixels)):
        pixels = np.rint(pixels).astype(volume.pixels.dtype)
    affine = np.eye(4)
    affine[:3, 0] = r * dx
    affine[:3, 1] = c * dy
    affine[:3, 2] = n * dz
    affine[:3, 3] = volume.positions[0] + a0 * dx * r + b0 * dy * c
    grid = Volume(pixels=pixels, affine=affine, sources=volume.sources, frames=[FrameRef(0, None)] * depth,
                  modality=volume.modality, series_uid=volume.series_uid,
                  timings=dict(volume.timings))
    return Regridded(source=volume, volume=grid, source_d=d, grid_d=grid_d, offsets=offsets)
