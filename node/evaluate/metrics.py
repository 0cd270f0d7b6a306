"""Metrics, with MONAI's implementations where they exist.

Voxel-wise per label: Dice, 95th percentile Hausdorff distance, average (symmetric) surface distance,
normalised surface Dice at a tolerance, volumes and their difference. Lesion-wise: candidate regions
(components or boxes) matched to reference lesions by overlap or by centroid (:func:`region_hits`); the
FROC curve over the candidates' scores (:func:`froc_curve`, :func:`sensitivity_at`). Classes: ROC AUC
(:func:`roc_auc`) and Wilson intervals for proportions. Empty cases follow the usual conventions: both
empty -> Dice 1, distances 0; one empty -> Dice 0, distances undefined (NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
    compute_surface_dice,
)
from scipy import ndimage, stats

__all__ = ["FrocData", "LesionMatch", "dice_score", "froc_curve", "label_metrics", "lesion_matches", "region_hits",
           "roc_auc", "sensitivity_at", "wilson"]


def _onehot(mask: np.ndarray) -> torch.Tensor:
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    return torch.cat([1 - m, m], dim=1)


def _union_box(pred: np.ndarray, ref: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of both masks, one voxel wider (surface distances stay fast on big volumes)."""
    return tuple(slice(max(int(np.min(ix)) - 1, 0), int(np.max(ix)) + 2) for ix in np.nonzero(pred | ref))


def dice_score(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two binary masks with MONAI's ``compute_dice``; both empty: 1, one empty: 0."""
    if not pred.any() and not ref.any():
        return 1.0
    if not pred.any() or not ref.any():
        return 0.0
    box = _union_box(pred, ref)
    return float(compute_dice(_onehot(pred[box]), _onehot(ref[box]), include_background=False)[0, 0])


def label_metrics(pred: np.ndarray, ref: np.ndarray, spacing_kji: tuple[float, float, float], *,
                  tolerance_mm: float = 2.0) -> dict[str, float]:
    """Voxel-wise metrics of one binary label. ``spacing_kji`` is the voxel size along (k, j, i) in mm."""
    voxel_mm3 = float(np.prod(spacing_kji))
    vp, vr = float(pred.sum()) * voxel_mm3, float(ref.sum()) * voxel_mm3
    out = {"volume_pred_mm3": vp, "volume_ref_mm3": vr, "volume_diff_mm3": vp - vr}
    if not pred.any() and not ref.any():
        return {**out, "dice": 1.0, "hd95_mm": 0.0, "asd_mm": 0.0, "nsd": 1.0}
    if not pred.any() or not ref.any():
        return {**out, "dice": 0.0, "hd95_mm": math.nan, "asd_mm": math.nan, "nsd": 0.0}
    box = _union_box(pred, ref)
    p, r = _onehot(pred[box]), _onehot(ref[box])
    spacing = list(spacing_kji)
    out["dice"] = dice_score(pred, ref)
    out["hd95_mm"] = float(compute_hausdorff_distance(p, r, percentile=95, spacing=spacing)[0, 0])
    out["asd_mm"] = float(compute_average_surface_distance(p, r, symmetric=True, spacing=spacing)[0, 0])
    out["nsd"] = float(compute_surface_dice(p, r, class_thresholds=[tolerance_mm], spacing=spacing)[0, 0])
    return out


@dataclass
class LesionMatch:
    """Lesion-wise matching of one case."""

    ref_lesions: int
    detected: int
    pred_volumes_mm3: list[float] = field(default_factory=list)  # one per predicted component
    pred_is_tp: list[bool] = field(default_factory=list)
    ref_detected_by_min_volume: list[list[float]] = field(default_factory=list)  # per ref: volumes of its hits

    def counts_at(self, min_volume_mm3: float) -> tuple[int, int]:
        """(detected reference lesions, false positives) keeping only predictions >= min_volume_mm3."""
        det = sum(1 for hits in self.ref_detected_by_min_volume if any(v >= min_volume_mm3 for v in hits))
        fp = sum(1 for v, tp in zip(self.pred_volumes_mm3, self.pred_is_tp, strict=True)
                 if not tp and v >= min_volume_mm3)
        return det, fp

    def to_dict(self) -> dict[str, Any]:
        return {"ref_lesions": self.ref_lesions, "detected": self.detected,
                "false_positives": sum(1 for tp in self.pred_is_tp if not tp),
                "pred_volumes_mm3": [round(v, 2) for v in self.pred_volumes_mm3], "pred_is_tp": self.pred_is_tp,
                "ref_hits": [[round(v, 2) for v in h] for h in self.ref_detected_by_min_volume]}


def lesion_matches(pred: np.ndarray, ref: np.ndarray, spacing_kji: tuple[float, float, float], *,
                   rule: str = "overlap", centroid_mm: float = 5.0) -> LesionMatch:
    """Match predicted and reference connected components (26-connectivity).

    ``overlap``: a prediction hits a reference lesion when they share a voxel. ``centroid``: when the
    prediction's centroid lies within ``centroid_mm`` of the reference lesion's centroid (or inside it).
    """
    structure = np.ones((3, 3, 3), dtype=bool)
    rl, nr = ndimage.label(ref, structure=structure)
    pl, npred = ndimage.label(pred, structure=structure)
    voxel_mm3 = float(np.prod(spacing_kji))
    sp = np.array(spacing_kji)
    pred_sizes = ndimage.sum_labels(np.ones_like(pl), pl, index=np.arange(1, npred + 1)) if npred else []
    ref_cent = np.array(ndimage.center_of_mass(ref, rl, range(1, nr + 1))) * sp if nr else np.zeros((0, 3))
    pred_cent = np.array(ndimage.center_of_mass(pred, pl, range(1, npred + 1))) * sp if npred else np.zeros((0, 3))
    hits: list[list[float]] = [[] for _ in range(nr)]
    is_tp = []
    volumes = [float(s) * voxel_mm3 for s in pred_sizes]
    for n in range(1, npred + 1):
        if rule == "centroid":
            d = np.linalg.norm(ref_cent - pred_cent[n - 1], axis=1) if nr else np.array([])
            c = tuple(round(float(v)) for v in pred_cent[n - 1] / sp)
            inside = int(rl[c]) if all(0 <= c[i] < rl.shape[i] for i in range(3)) else 0
            targets = {int(i) + 1 for i in np.nonzero(d <= centroid_mm)[0]} | ({inside} if inside else set())
        else:
            targets = {int(v) for v in np.unique(rl[pl == n]) if v}
        for t in targets:
            hits[t - 1].append(volumes[n - 1])
        is_tp.append(bool(targets))
    return LesionMatch(ref_lesions=nr, detected=sum(1 for h in hits if h), pred_volumes_mm3=volumes,
                       pred_is_tp=is_tp, ref_detected_by_min_volume=hits)


def region_hits(rois: list[Any], ref: np.ndarray, spacing_kji: tuple[float, float, float], *,
                rule: str = "overlap", centroid_mm: float = 5.0) -> tuple[list[float], list[list[int]]]:
    """Match candidate regions (ROIs with masks on the series grid: components or a detector's boxes) to the
    reference lesions (connected components of ``ref``).

    ``overlap``: a region hits a lesion when they share a voxel. ``centroid``: when the region's centre lies
    within ``centroid_mm`` of the lesion's centroid, or inside the lesion.

    Returns:
        (volume of each reference lesion in mm3, the lesions (1-based) each region hits)
    """
    structure = np.ones((3, 3, 3), dtype=bool)
    rl, nr = ndimage.label(ref, structure=structure)
    sp = np.asarray(spacing_kji, dtype=np.float64)
    sizes = ndimage.sum_labels(np.ones(rl.shape, dtype=np.uint8), rl, index=np.arange(1, nr + 1)) if nr else []
    ref_volumes = [float(v) * float(np.prod(sp)) for v in sizes]
    ref_cent = np.array(ndimage.center_of_mass(ref, rl, range(1, nr + 1))) * sp if nr else np.zeros((0, 3))
    hits: list[list[int]] = []
    for r in rois:
        k0, j0, i0 = r.offset
        sl = (slice(k0, k0 + r.mask.shape[0]), slice(j0, j0 + r.mask.shape[1]), slice(i0, i0 + r.mask.shape[2]))
        if rule == "centroid":
            centre = (np.argwhere(r.mask).mean(axis=0) + np.array([k0, j0, i0])) * sp
            d = np.linalg.norm(ref_cent - centre, axis=1) if nr else np.array([])
            c = tuple(round(float(v)) for v in centre / sp)
            inside = int(rl[c]) if all(0 <= c[i] < rl.shape[i] for i in range(3)) else 0
            targets = {int(i) + 1 for i in np.nonzero(d <= centroid_mm)[0]} | ({inside} if inside else set())
        else:
            targets = {int(v) for v in np.unique(rl[sl][r.mask]) if v}
        hits.append(sorted(targets))
    return ref_volumes, hits


@dataclass
class FrocData:
    """Per case: its reference lesion count, and per candidate its score and the lesions it hits."""

    refs: np.ndarray  # (cases,)
    #: per case: list of (score, hit lesion ids)
    candidates: list[list[tuple[float, list[int]]]]

    def matrices(self, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(detected lesions, false positives) per case and threshold, keeping candidates scoring >= it."""
        det = np.zeros((len(self.candidates), len(thresholds)))
        fp = np.zeros_like(det)
        for c, cands in enumerate(self.candidates):
            best: dict[int, float] = {}
            for score, targets in cands:
                if targets:
                    for t in targets:
                        best[t] = max(best.get(t, -np.inf), score)
            lesion_scores = np.array(sorted(best.values()))
            fp_scores = np.array(sorted(s for s, t in cands if not t))
            det[c] = len(lesion_scores) - np.searchsorted(lesion_scores, thresholds, side="left")
            fp[c] = len(fp_scores) - np.searchsorted(fp_scores, thresholds, side="left")
        return det, fp


def froc_curve(data: FrocData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds from the most to the least strict, sensitivity, false positives per scan) at each."""
    scores = sorted({s for cands in data.candidates for s, _ in cands}, reverse=True)
    thresholds = np.array([*scores, -np.inf])
    det, fp = data.matrices(thresholds)
    total = data.refs.sum()
    sens = det.sum(axis=0) / total if total else np.full(len(thresholds), np.nan)
    return thresholds, sens, fp.sum(axis=0) / max(len(data.candidates), 1)


def sensitivity_at(sens: np.ndarray, fp_per_scan: np.ndarray, rate: float) -> float:
    """The sensitivity at ``rate`` false positives per scan: the best sensitivity of the operating points with at
    most that many (0 when none has so few)."""
    ok = fp_per_scan <= rate + 1e-12
    return float(np.nanmax(sens[ok])) if ok.any() else 0.0


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (the Mann-Whitney probability that a positive scores above a negative, ties
    counting one half); NaN when either class is absent."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    pos, neg = scores[positive], scores[~positive]
    if pos.size == 0 or neg.size == 0:
        return math.nan
    ranks = stats.rankdata(np.concatenate([pos, neg]))
    return float((ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95 % interval of a proportion k/n ((nan, nan) when n is 0)."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
