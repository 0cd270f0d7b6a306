"""Matching an AI segmentation with the radiologist's final one, finding by finding.

A finding is a connected component (26-connectivity, as the node's ROIs) of the label map. Each AI
finding is compared with the final components it overlaps:

- **accepted**: kept unchanged or nearly (Dice with those final components >= ``accept_dice``);
- **edited**: kept but changed (overlap, Dice below the threshold): Dice, volume and diameter change;
- **rejected**: no final voxel overlaps it;
- **added**: a final component that overlaps no AI finding (a miss of the model).

The study's verdict: ``accepted`` when every AI finding is accepted and nothing was added, ``rejected``
when every AI finding was rejected and nothing was added, ``no_findings`` when neither side has any,
``edited`` otherwise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from node.evaluate.metrics import dice_score

__all__ = ["FindingVerdict", "Judgement", "judge_masks", "study_verdict"]

_STRUCTURE = np.ones((3, 3, 3), dtype=bool)


@dataclass
class FindingVerdict:
    """One AI finding's fate (``finding`` its 1-based index in the AI result) or one added final finding."""

    finding: int | None
    label: int
    outcome: str  # accepted | edited | rejected | added
    dice: float | None = None
    ai_volume_mm3: float | None = None
    final_volume_mm3: float | None = None
    volume_change_pct: float | None = None
    diameter_change_mm: float | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Judgement:
    findings: list[FindingVerdict]
    study_verdict: str
    case_dice: float | None

    def counts(self) -> dict[str, int]:
        out = {"accepted": 0, "edited": 0, "rejected": 0, "added": 0}
        for f in self.findings:
            out[f.outcome] += 1
        return out


def _diameter_mm(mask: np.ndarray, spacing_kji: tuple[float, float, float]) -> float:
    """The largest distance between two surface voxels (mm)."""
    from node.inference.rois import max_distance

    surface = mask & ~ndimage.binary_erosion(mask)
    pts = np.argwhere(surface).astype(np.float64) * np.asarray(spacing_kji)
    return max_distance(pts)[0]


def study_verdict(counts: dict[str, int]) -> str:
    n_ai = counts["accepted"] + counts["edited"] + counts["rejected"]
    if n_ai == 0 and counts["added"] == 0:
        return "no_findings"
    if counts["added"] == 0 and counts["accepted"] == n_ai:
        return "accepted"
    if counts["added"] == 0 and counts["rejected"] == n_ai:
        return "rejected"
    return "edited"


def judge_masks(ai: np.ndarray, final: np.ndarray, spacing_kji: tuple[float, float, float], *,
                accept_dice: float = 0.9, label: int = 1) -> Judgement:
    """Classify every AI finding of ``ai`` against ``final`` (boolean masks on the same ``[k, j, i]`` grid)."""
    if ai.shape != final.shape:
        raise ValueError(f"the AI and final masks differ in shape: {ai.shape} vs {final.shape}")
    ai, final = ai.astype(bool, copy=False), final.astype(bool, copy=False)
    voxel = float(np.prod(spacing_kji))
    ai_comp, n_ai = ndimage.label(ai, structure=_STRUCTURE)
    fin_comp, n_fin = ndimage.label(final, structure=_STRUCTURE)
    objects = ndimage.find_objects(ai_comp)
    touched: set[int] = set()
    out: list[FindingVerdict] = []
    for idx in range(1, n_ai + 1):
        box = objects[idx - 1]
        assert box is not None
        a = ai_comp[box] == idx
        hits = {int(v) for v in np.unique(fin_comp[box][a]) if v}
        a_vol = float(a.sum()) * voxel
        if not hits:
            out.append(FindingVerdict(idx, label, "rejected", dice=0.0, ai_volume_mm3=round(a_vol, 2)))
            continue
        touched |= hits
        region = np.isin(fin_comp, list(hits))
        whole = np.zeros(ai.shape, dtype=bool)
        whole[box] = a
        d = dice_score(whole, region)
        f_vol = float(region.sum()) * voxel
        outcome = "accepted" if d >= accept_dice else "edited"
        change = None if a_vol == 0 else round(100.0 * (f_vol - a_vol) / a_vol, 2)
        diam = round(_diameter_mm(region, spacing_kji) - _diameter_mm(whole, spacing_kji), 2)
        out.append(FindingVerdict(idx, label, outcome, dice=round(d, 4), ai_volume_mm3=round(a_vol, 2),
                                  final_volume_mm3=round(f_vol, 2), volume_change_pct=change,
                                  diameter_change_mm=diam))
    for idx in range(1, n_fin + 1):
        if idx not in touched:
            f_vol = float((fin_comp == idx).sum()) * voxel
            out.append(FindingVerdict(None, label, "added", final_volume_mm3=round(f_vol, 2)))
    result = Judgement(out, "", round(dice_score(ai, final), 4) if (ai.any() or final.any()) else None)
    result.study_verdict = study_verdict(result.counts())
    return result
