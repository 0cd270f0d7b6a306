"""Regions of interest: connected components of each finding label, whole organs, a detector's boxes, with
their measurements on the images the radiologist sees.

Measuring is in two steps, so that a noisy model's thousands of specks cost microseconds each:

1. :func:`extract_rois` (or :func:`on_source`, for a model that saw a resampled grid) finds every region
   and its **cheap measures** from its own mask, in one pass: voxel count, volume (each slice's area times
   the slab of the patient it stands for, :meth:`Volume.slab_widths`, as the SEG on those slices gives it),
   bounding box, centroid in patient coordinates, key slice (largest area), mean/min/max intensity (HU for
   CT), the mean confidence;
2. :func:`describe` adds the **costly measures** to the findings that are reported: longest 3D diameter,
   longest in-plane diameter over the slices, the long axis and the outline on the key slice (what the SR
   draws in viewers).

Every measure is made on the series' own slices: a tilted or unevenly spaced series is resampled for the
model only, and its regions are placed back on the original slices (:func:`on_source`) before they are
measured; a region that covers no original pixel (thinner than the slice spacing, between two slices) is
counted as lost, never silently dropped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from node.imaging.regrid import Regridded
from node.imaging.volume import Volume
from node.inference.contour import mask_outline
from node.inference.registry import ModelCard

__all__ = ["NOT_REPORTED", "ROI", "Regions", "describe", "extract_rois", "max_distance", "measure_region", "on_source", "paint_rois"]


@dataclass(slots=True)
class ROI:
    """One region of one label."""

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
    #: whether :func:`describe` has measured its diameters, long axis and outline
    described: bool = False
    #: the tracking identifier a follow-up carries over from the prior (None: :meth:`identifier` makes it)
    tracking_id: str | None = None

    def identifier(self) -> str:
        """The finding's Tracking Identifier in the SR (the SEG's adds "unverified"): the prior's in a follow-up,
        else "<label> <number> (AI)", "<label> (AI)" for a whole organ."""
        if self.tracking_id:
            return self.tracking_id[:64]
        return (f"{self.label_name} (AI)" if self.kind == "anatomy" else f"{self.label_name} {self.index} (AI)")[:64]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("mask")
        return d


#: why a finding is not reported, in the words the SR and the API use
NOT_REPORTED = {
    "below_min_confidence": "below the route's minimum confidence",
    "over_max_findings": "over the route's cap per label",
    "below_min_volume": "below the model card's minimum volume",
    "between_slices": "between the original slices",
    "not_in_card": "label value(s) not in the model card",
}



@dataclass
class Regions:
    """The regions a prediction gives, and those the model card's rules left out."""

    rois: list[ROI]
    #: label value -> its regions below the card's ``min_volume_mm3`` (left out, stated in the results)
    too_small: dict[int, int] = field(default_factory=dict)


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


def row_ends(sub: np.ndarray) -> np.ndarray:
    """(k, j, i) of the first and last voxel of every row of a 3D mask: their convex hull is the mask's (each
    voxel lies between its row's two ends), so the longest distance across the mask is between two of them.
    Two passes over the mask, no erosion and no list of surface voxels (an organ has millions)."""
    rows = sub.any(axis=2)
    k, j = np.nonzero(rows)
    first = sub.argmax(axis=2)[k, j]
    last = sub.shape[2] - 1 - sub[:, :, ::-1].argmax(axis=2)[k, j]
    return np.concatenate([np.stack([k, j, first], axis=1), np.stack([k, j, last], axis=1)])


def components(mask: np.ndarray) -> np.ndarray:
    """The 26-connected components of a 3D mask, numbered from 1 (``scipy.ndimage.label``'s numbering: in order of
    each component's first voxel in C order), in 16-bit labels when there can be no more than 65,535 of them.
    connected-components-3d does it in a fifth of scipy's time (2,000 specks over 300 x 512 x 512: 0.1 s)."""
    import cc3d

    upper = int(np.count_nonzero(mask))  # no more components than voxels
    return cc3d.connected_components(mask.view(np.uint8), connectivity=26, max_labels=max(upper, 1),
                                     out_dtype=np.uint16 if upper <= 65535 else np.uint32)


def _edge(mask2d: np.ndarray) -> np.ndarray:
    """(row, col) of a 2D mask's boundary pixels."""
    return np.argwhere(mask2d & ~ndimage.binary_erosion(mask2d))


def measure_region(sub: np.ndarray, off: tuple[int, int, int], *, label: int, name: str, kind: str, volume: Volume,
            widths: np.ndarray, confidence: np.ndarray | None, min_volume: float = 0.0,
            spacing: tuple[float, float, float] | None = None) -> ROI | None:
    """The cheap measures of one region from its mask ``sub`` placed at ``off`` = (k, j, i); None when it is
    empty or below ``min_volume``. ``spacing``: the volume's (given by a caller measuring thousands of regions)."""
    per_slice = sub.sum(axis=(1, 2), dtype=np.int64)
    count = int(per_slice.sum())
    if count == 0:
        return None
    k0, j0, i0 = off
    sx, sy, _ = spacing or volume.spacing
    vol = float(per_slice @ widths[k0:k0 + sub.shape[0]]) * sx * sy
    if vol < min_volume:
        return None
    # the mean voxel index from the mask's three projections (no list of its voxels: organs are millions)
    mean_kji = [float(np.dot(per_slice, np.arange(sub.shape[0]))) / count,
                float(np.dot(sub.sum(axis=(0, 2), dtype=np.int64), np.arange(sub.shape[1]))) / count,
                float(np.dot(sub.sum(axis=(0, 1), dtype=np.int64), np.arange(sub.shape[2]))) / count]
    centroid = volume.voxel_to_patient((np.asarray(mean_kji) + np.asarray(off))[::-1])[0]
    sl = (slice(k0, k0 + sub.shape[0]), slice(j0, j0 + sub.shape[1]), slice(i0, i0 + sub.shape[2]))
    values = volume.pixels[sl][sub]
    conf = None
    if confidence is not None:
        conf = round(float(confidence[sl][sub].astype(np.float32).mean()), 4)
    return ROI(index=0, label=label, label_name=name, voxels=count, volume_mm3=round(vol, 2),
               diameter_3d_mm=0.0, diameter_inplane_mm=0.0,
               centroid_mm=(round(float(centroid[0]), 2), round(float(centroid[1]), 2), round(float(centroid[2]), 2)),
               bbox=((k0, k0 + sub.shape[0] - 1), (j0, j0 + sub.shape[1] - 1), (i0, i0 + sub.shape[2] - 1)),
               mean=round(float(values.mean()), 1), min=round(float(values.min()), 1), max=round(float(values.max()), 1),
               key_slice=k0 + int(np.argmax(per_slice)), mask=sub, offset=off, kind=kind, confidence=conf)


def _order(rois: list[ROI]) -> list[ROI]:
    """Findings by decreasing volume, then anatomy; numbered from 1."""
    rois.sort(key=lambda r: (r.kind != "finding", -r.volume_mm3))
    for n, r in enumerate(rois, start=1):
        r.index = n
    return rois


def extract_rois(labels: np.ndarray, volume: Volume, card: ModelCard, *,
                 confidence: np.ndarray | None = None, too_small: dict[int, int] | None = None) -> list[ROI]:
    """The regions of interest of a label map on ``volume``'s grid, with their cheap measures (module doc).

    A label the card marks as a finding gives one ROI per connected component (26-connectivity);
    components below the label's ``min_volume_mm3`` are dropped. A label marked ``finding = false``
    (anatomy: an organ, a vessel) gives one ROI holding all of it. Findings are numbered from 1 in order of
    decreasing volume, then anatomy. ``confidence`` (the winning class's probability per voxel, same
    shape) gives each ROI its mean. ``too_small`` (when given) counts, per label value, the regions left out
    for their size.
    """
    widths = volume.slab_widths()
    spacing = volume.spacing
    rois: list[ROI] = []
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
        base = tuple(c.start for c in crop)
        hit = labels[crop] == spec.value
        common = {"label": spec.value, "name": spec.name, "volume": volume, "widths": widths,
                  "confidence": confidence, "min_volume": spec.min_volume_mm3, "spacing": spacing}
        if not spec.finding:
            roi = measure_region(hit, base, kind="anatomy", **common)  # type: ignore[arg-type]
            if roi is not None:
                rois.append(roi)
            elif too_small is not None:
                too_small[spec.value] = too_small.get(spec.value, 0) + 1
            continue
        comp = components(hit)
        del hit
        for idx, local in enumerate(ndimage.find_objects(comp), start=1):
            if local is None:
                continue
            off = (local[0].start + base[0], local[1].start + base[1], local[2].start + base[2])
            roi = measure_region(comp[local] == idx, off, kind="finding", **common)  # type: ignore[arg-type]
            if roi is not None:
                rois.append(roi)
            elif too_small is not None:
                too_small[spec.value] = too_small.get(spec.value, 0) + 1
    return _order(rois)


def on_source(rois: list[ROI], grid: Regridded, *, confidence: np.ndarray | None = None) -> tuple[list[ROI], list[ROI]]:
    """Regions found on a resampled grid, placed on the original slices (each original pixel takes the region
    of the grid voxel nearest to it) and measured there; their label, kind and confidence stay.
    ``confidence`` (on the grid) gives each placed region its mean over its original pixels instead.

    Returns:
        (ROIs on the original slices, renumbered; ROIs that cover no original pixel: between two slices)
    """
    if not rois:
        return [], []
    ids = np.zeros(grid.volume.shape, dtype=np.uint16 if len(rois) < 65535 else np.uint32)
    for n, r in enumerate(rois, start=1):
        if r.mask is None:
            raise ValueError(f"ROI {r.index} carries no mask")
        k0, j0, i0 = r.offset
        ids[k0:k0 + r.mask.shape[0], j0:j0 + r.mask.shape[1], i0:i0 + r.mask.shape[2]][r.mask] = n
    placed_ids = grid.to_source(ids)
    del ids
    conf_src = grid.to_source(confidence) if confidence is not None else None
    source = grid.source
    widths = source.slab_widths()
    boxes = ndimage.find_objects(placed_ids)
    placed, lost = [], []
    for n, r in enumerate(rois, start=1):
        box = boxes[n - 1] if n - 1 < len(boxes) else None
        if box is None:
            lost.append(r)
            continue
        off = (box[0].start, box[1].start, box[2].start)
        region = measure_region(placed_ids[box] == n, off, label=r.label, name=r.label_name, kind=r.kind, volume=source,
                         widths=widths, confidence=conf_src)
        if region is None:
            lost.append(r)
            continue
        if conf_src is None:
            region.confidence = r.confidence
        region.size_mm = r.size_mm
        placed.append(region)
    for n, r in enumerate(placed, start=1):
        r.index = n
    return placed, lost


def describe(rois: list[ROI], volume: Volume, *, outlines: bool = True) -> None:
    """Add the costly measures to ``rois`` (in place): longest 3D diameter, longest in-plane diameter, the long
    axis and the outline on the key slice. A detector's box keeps the sizes its box gives; an organ's in-plane
    diameter is measured on its key slice only (an organ's SR group states its volume, not diameters)."""
    sx, sy, _ = volume.spacing
    for r in rois:
        if r.described or r.mask is None:
            continue
        sub, off = r.mask, np.asarray(r.offset)
        key_local = r.key_slice - r.offset[0]
        key2d = sub[key_local]
        if r.kind == "box":
            (k0, k1), (j0, j1), (i0, i1) = r.bbox
            w, h, d = (i1 - i0 + 1) * sx, (j1 - j0 + 1) * sy, float(volume.slab_widths()[k0:k1 + 1].sum())
            r.size_mm = r.size_mm or (round(w, 2), round(h, 2), round(d, 2))
            r.diameter_3d_mm = round(float(np.sqrt(w * w + h * h + d * d)), 2)
            r.diameter_inplane_mm = round(float(max(w, h)), 2)
            r.key_outline_ij = [(i0 - 0.5, j0 - 0.5), (i1 + 0.5, j0 - 0.5), (i1 + 0.5, j1 + 0.5), (i0 - 0.5, j1 + 0.5),
                                (i0 - 0.5, j0 - 0.5)]
            r.key_axis_ij = ((float(i0), float(j0)), (float(i1), float(j1)))  # the in-plane diagonal
            r.described = True
            continue
        ends = row_ends(sub) + off  # the same hull as the surface voxels', at a fraction of the cost
        d3, _, _ = max_distance(volume.voxel_to_patient(ends[:, ::-1].astype(np.float64)))
        # long axis on the key slice (what a radiologist measures)
        edge = _edge(key2d)
        pts = edge[:, ::-1].astype(np.float64)
        key_d, a, b = max_distance(pts * np.array([sx, sy]))
        best_inplane = key_d
        if r.kind != "anatomy":  # a finding's longest diameter on any of its slices
            for kk in range(sub.shape[0]):
                if kk != key_local and sub[kk].any():
                    e = _edge(sub[kk])
                    best_inplane = max(best_inplane, max_distance(e[:, ::-1].astype(np.float64) * np.array([sx, sy]))[0])
        if len(pts) >= 2:
            pa, pb = pts[a] + off[[2, 1]], pts[b] + off[[2, 1]]
            r.key_axis_ij = ((float(pa[0]), float(pa[1])), (float(pb[0]), float(pb[1])))
        else:
            c = (float(off[2] + pts[0][0]), float(off[1] + pts[0][1])) if len(pts) else (0.0, 0.0)
            r.key_axis_ij = (c, c)
        if outlines:
            r.key_outline_ij = [(x + off[2], y + off[1]) for x, y in mask_outline(key2d)]
        r.diameter_3d_mm = round(max(d3, min(sx, sy)), 2)
        r.diameter_inplane_mm = round(max(best_inplane, min(sx, sy)), 2)
        r.described = True


def paint_rois(rois: list[ROI], *, out: np.ndarray | None = None,
               shape: tuple[int, int, int] | None = None, values: list[int] | None = None) -> np.ndarray:
    """A map holding exactly the given ROIs, each painted with its label value (or with ``values[n]``, e.g. its
    segment number, then in the smallest unsigned type that holds them).

    ``out`` is cleared and painted in place (no second full-size array); otherwise a new array of ``shape``.
    """
    if out is None:
        if shape is None:
            raise ValueError("paint_rois needs out or shape")
        top = max(values) if values else 255
        out = np.zeros(shape, dtype=np.uint8 if top < 256 else np.uint16 if top < 65536 else np.uint32)
    else:
        out.fill(0)
    for n, r in enumerate(rois):
        if r.mask is None:
            raise ValueError(f"ROI {r.index} carries no mask to paint")
        k0, j0, i0 = r.offset
        region = out[k0:k0 + r.mask.shape[0], j0:j0 + r.mask.shape[1], i0:i0 + r.mask.shape[2]]
        region[r.mask] = r.label if values is None else values[n]
    return out

