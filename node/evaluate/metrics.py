"""Metrics for one case, with MONAI's implementations where they exist.

Voxel-wise per label: Dice, 95th percentile Hausdorff distance, average (symmetric) surface distance,
normalised surface Dice at a tolerance, volumes and their difference. Lesion-wise: connected
components matched by overlap or by centroid; per predicted component its volume, so the FROC curve
can sweep the minimum-volume operating point. Empty cases follow the usual conventions: both empty ->
Dice 1, distances 0; one empty -> Dice 0, distances undefined (NaN).
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
from scipy import ndimage

__all__ = ["LesionMatch", "dice_score", "label_metrics", "lesion_matches"]


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
