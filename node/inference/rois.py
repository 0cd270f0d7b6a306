"""Regions of interest: connected components of each label, with their measurements.

Per ROI: voxel count, volume (mm3), longest diameter in 3D and in-plane (on any one slice), centroid
in patient coordinates, bounding box, mean/min/max intensity (HU for CT), and the key slice (the
slice of largest in-plane area) with the outline and the long-axis end points on it, which the SR
uses to draw the finding in viewers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from node.imaging.regrid import Regridded
from node.imaging.volume import Volume
from node.inference.contour import mask_outline
from node.inference.registry import ModelCard

__all__ = ["ROI", "extract_rois", "max_distance", "paint_rois", "relocate_rois"]


@dataclass(slots=True)
class ROI:
    """One connected region of one label."""

    index: int
    label: int
    label_name: str
    voxels: int
    volume_mm3: float
    diameter_3d_mm: float
    diameter_inplane_mm: float
    centroid_mm: tuple[float, float, float]
    bbox: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # (k0, k1), (j0, j1), (i0, i1) inclusive
    mean: float
    min: float
    max: float
    key_slice: int
    key_outline_ij: list[tuple[float, float]] = field(default_factory=list)  # (column, row) pixel coords
    key_axis_ij: tuple[tuple[float, float], tuple[float, float]] = ((0.0, 0.0), (0.0, 0.0))
    mask: np.ndarray | None = field(default=None, repr=False)
    offset: tuple[int, int, int] = (0, 0, 0)
    #: "finding" (one connected component of a finding label), "anatomy" (all of an anatomy label) or
    #: "box" (a detector's box, see node.inference.detection)
    kind: str = "finding"
    #: the model's confidence in [0, 1]: the detector's score for a box (None when the model gives none)
    confidence: float | None = None
    #: a box's extent along the series' i, j, k axes (mm)
    size_mm: tuple[float, float, float] | None = None
    #: the finding's identity in the SR and SEG (and in verdicts and follow-ups), given by the pipeline
    tracking_uid: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("mask")
        return d


def max_distance(points: np.ndarray) -> tuple[float, int, int]:
    """Largest pairwise distance among points (N, D) and the indices of its two ends."""
    if len(points) < 2:
        return 0.0, 0, 0
    cand = np.arange(len(points))
    if len(points) > 64:
        try:
            cand = ConvexHull(points).vertices
        except (QhullError, ValueError):  # flat or degenerate: fall back to all points (subsampled)
            cand = np.linspace(0, len(points) - 1, min(len(points), 2000)).astype(int)
    p = points[cand]
    d2 = ((p[:, None, :] - p[None, :, :]) ** 2).sum(-1)
    a, b = np.unravel_index(int(np.argmax(d2)), d2.shape)
    return float(np.sqrt(d2[a, b])), int(cand[a]), int(cand[b])


def _surface_points(mask: np.ndarray) -> np.ndarray:
    eroded = ndimage.binary_erosion(mask)
    return np.argwhere(mask & ~eroded)


def _planar(sub: np.ndarray, off: np.ndarray, sx: float, sy: float, *, outlines: bool = True
            ) -> tuple[int, float, tuple[tuple[float, float], tuple[float, float]], list[tuple[float, float]]]:
    """The in-plane measures of one ROI mask ``sub`` (placed at ``off`` = (k, j, i)): key slice (largest
    area, local index), longest in-plane diameter over all slices (mm), the long axis on the key slice and
    its outline (column, row pixel coordinates)."""
    areas = sub.sum(axis=(1, 2))
    key_local = int(np.argmax(areas))
    best_inplane = 0.0
    for kk in range(sub.shape[0]):
        if areas[kk] == 0:
            continue
        sl2 = sub[kk]
        edge = np.argwhere(sl2 & ~ndimage.binary_erosion(sl2))  # (row, col)
        d, _, _ = max_distance(edge[:, ::-1].astype(np.float64) * np.array([sx, sy]))
        best_inplane = max(best_inplane, d)
    # long axis on the key slice (what a radiologist measures)
    key2d = sub[key_local]
    edge = np.argwhere(key2d & ~ndimage.binary_erosion(key2d))
    pts = edge[:, ::-1].astype(np.float64)
    _, a, b = max_distance(pts * np.array([sx, sy]))
    key_axis: tuple[tuple[float, float], tuple[float, float]]
    if len(pts) >= 2:
        pa, pb = pts[a] + off[[2, 1]], pts[b] + off[[2, 1]]
        key_axis = ((float(pa[0]), float(pa[1])), (float(pb[0]), float(pb[1])))
    else:
        c = (float(off[2] + pts[0][0]), float(off[1] + pts[0][1])) if len(pts) else (0.0, 0.0)
        key_axis = (c, c)
    outline = [(x + off[2], y + off[1]) for x, y in mask_outline(key2d)] if outlines else []
    return key_local, best_inplane, key_axis, outline


def relocate_rois(rois: list[ROI], grid: Regridded) -> tuple[list[ROI], list[ROI]]:
    """ROIs found on a resampled grid, placed on the source slices for the outputs.

    Measurements (volume, diameters, centroid, intensities) stay those made on the orthogonal grid;
    the key slice, outline, long axis, bounding box and mask become those of the ROI's voxels on the
    source slices (labels mapped back by nearest neighbour).

    Returns:
        (ROIs on the source slices, ROIs that cover no source pixel: thinner than the source spacing)
    """
    if not rois:
        return [], []
    ids = np.zeros(grid.volume.shape, dtype=np.uint16)
    for r in rois:
        if r.mask is None:
            raise ValueError(f"ROI {r.index} carries no mask")
        k0, j0, i0 = r.offset
        ids[k0:k0 + r.mask.shape[0], j0:j0 + r.mask.shape[1], i0:i0 + r.mask.shape[2]][r.mask] = r.index
    on_source = grid.to_source(ids)
    del ids
    sx, sy, _ = grid.source.spacing
    placed, lost = [], []
    boxes = ndimage.find_objects(on_source)
    for r in rois:
        box = boxes[r.index - 1] if r.index - 1 < len(boxes) else None
        if box is None:
            lost.append(r)
            continue
        sub = on_source[box] == r.index
        off = np.array([s.start for s in box])
        key_local, _, key_axis, outline = _planar(sub, off, sx, sy, outlines=bool(r.key_outline_ij))
        placed.append(replace(r, key_slice=int(off[0] + key_local), key_outline_ij=outline, key_axis_ij=key_axis,
                              bbox=tuple((int(s.start), int(s.stop - 1)) for s in box),  # type: ignore[arg-type]
                              mask=sub, offset=(int(off[0]), int(off[1]), int(off[2]))))
    return placed, lost


def extract_rois(labels: np.ndarray, volume: Volume, card: ModelCard, *, outlines: bool = True,
                 confidence: np.ndarray | None = None) -> list[ROI]:
    """The regions of interest of a label map.

    A label the card marks as a finding gives one ROI per connected component (26-connectivity);
    components below the label's ``min_volume_mm3`` are dropped. A label marked ``finding = false``
    (anatomy: an organ, a vessel) gives one ROI holding all of it, so that the SEG draws it and the SR
    reports its volume. Findings are numbered from 1 in order of decreasing volume, then anatomy.
    ``confidence`` (the winning class's probability per voxel, same shape) gives each ROI its mean.
    """
    sx, sy, sz = volume.spacing
    voxel_mm3 = sx * sy * sz
    rois: list[ROI] = []
    structure = np.ones((3, 3, 3), dtype=bool)
    for spec in card.labels:
        # bounding box of the label, found 64 slices at a time (no full-size boolean copy)
        zs = np.zeros(labels.shape[0], dtype=bool)
        ys, xs = np.zeros(labels.shape[1], dtype=bool), np.zeros(labels.shape[2], dtype=bool)
        for k0 in range(0, labels.shape[0], 64):
            h = labels[k0:k0 + 64] == spec.value
            zs[k0:k0 + 64] = h.reshape(h.shape[0], -1).any(axis=1)
            plane = h.any(axis=0)
            ys |= plane.any(axis=1)
            xs |= plane.any(axis=0)
        if not zs.any():
            continue
        crop = tuple(slice(int(np.argmax(a)), len(a) - int(np.argmax(a[::-1]))) for a in (zs, ys, xs))
        base = np.array([c.start for c in crop])
        hit = labels[crop] == spec.value
        if not spec.finding:
            roi = _measure(hit, crop, spec, volume, voxel_mm3, outlines=outlines, kind="anatomy", confidence=confidence)
            if roi is not None:
                rois.append(roi)
            continue
        try:  # 16-bit component labels (half the memory of int32) unless there are more than 65535 of them
            comp = np.empty(hit.shape, dtype=np.uint16)
            ndimage.label(hit, structure=structure, output=comp)
        except RuntimeError:
            comp = ndimage.label(hit, structure=structure)[0]
        del hit
        objects = ndimage.find_objects(comp)
        for idx, local in enumerate(objects, start=1):
            if local is None:
                continue
            sl = tuple(slice(s.start + b, s.stop + b) for s, b in zip(local, base, strict=True))
            roi = _measure(comp[local] == idx, sl, spec, volume, voxel_mm3, outlines=outlines, kind="finding",
                           confidence=confidence)
            if roi is not None:
                rois.append(roi)
    rois.sort(key=lambda r: (r.kind != "finding", -r.volume_mm3))
    for n, r in enumerate(rois, start=1):
        r.index = n
    return rois


def _measure(sub: np.ndarray, sl: tuple[slice, ...], spec: Any, volume: Volume, voxel_mm3: float, *,
             outlines: bool, kind: str, confidence: np.ndarray | None = None) -> ROI | None:
    """One ROI from its mask ``sub`` placed at ``sl`` (None when below the label's minimum volume)."""
    sx, sy, _ = volume.spacing
    count = int(sub.sum())
    vol = count * voxel_mm3
    if vol < spec.min_volume_mm3 or count == 0:
        return None
    off = np.array([s.start for s in sl])
    # the mean voxel index from the mask's three projections (no list of its voxels: organs are millions)
    mean_kji = [float(np.dot(sub.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64),
                             np.arange(sub.shape[axis]))) / count for axis in range(3)]
    centroid = volume.voxel_to_patient((np.asarray(mean_kji) + off)[::-1])[0]
    surf_ijk = (_surface_points(sub) + off)[:, ::-1].astype(np.float64)
    d3, _, _ = max_distance(volume.voxel_to_patient(surf_ijk))
    key_local, best_inplane, key_axis, outline = _planar(sub, off, sx, sy, outlines=outlines)
    values = volume.pixels[sl][sub]
    return ROI(
        index=0, label=spec.value, label_name=spec.name, voxels=count, volume_mm3=round(vol, 2),
        diameter_3d_mm=round(max(d3, min(sx, sy)), 2), diameter_inplane_mm=round(max(best_inplane, min(sx, sy)), 2),
        centroid_mm=(round(float(centroid[0]), 2), round(float(centroid[1]), 2), round(float(centroid[2]), 2)),
        bbox=tuple((int(s.start), int(s.stop - 1)) for s in sl),  # type: ignore[arg-type]
        mean=round(float(values.mean()), 1), min=round(float(values.min()), 1),
        max=round(float(values.max()), 1), key_slice=int(off[0] + key_local),
        key_outline_ij=outline, key_axis_ij=key_axis, mask=sub, offset=(int(off[0]), int(off[1]), int(off[2])),
        kind=kind,
        confidence=None if confidence is None else round(float(confidence[sl][sub].astype(np.float32).mean()), 4))


def paint_rois(rois: list[ROI], *, out: np.ndarray | None = None,
               shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """A label map holding exactly the given ROIs (each painted with its label value).

    ``out`` is cleared and painted in place (no second full-size array); otherwise a new uint8 array of
    ``shape`` is made.
    """
    if out is None:
        if shape is None:
            raise ValueError("paint_rois needs out or shape")
        out = np.zeros(shape, dtype=np.uint8)
    else:
        out.fill(0)
    for r in rois:
        if r.mask is None:
            raise ValueError(f"ROI {r.index} carries no mask to paint")
        k0, j0, i0 = r.offset
        region = out[k0:k0 + r.mask.shape[0], j0:j0 + r.mask.shape[1], i0:i0 + r.mask.shape[2]]
        region[r.mask] = r.label
    return out
