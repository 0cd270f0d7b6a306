"""Matching an AI result with the radiologist's final segmentation, finding by finding.

Each AI finding (a region kept with the job, numbered as in the AI's SR: :class:`~node.verdicts.regions.AIRegions`)
is compared with the connected components (26-connectivity, as the node's ROIs) of the final segmentation it
overlaps:

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
from node.verdicts.regions import AIRegions, FinalSegmentation, Grid, Region

__all__ = ["FindingVerdict", "Judgement", "judge_masks", "judge_regions", "study_verdict"]

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
    #: how the final objects were matched to the AI findings (a SEG: "tracking UID", "segment type", ...)
    matched_by: str = ""

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
    """Classify every connected component of ``ai`` (numbered in raster order) against ``final`` (boolean masks on
    the same ``[k, j, i]`` grid): :func:`judge_regions` for two bare masks (tests, offline comparisons)."""
    if ai.shape != final.shape:
        raise ValueError(f"the AI and final masks differ in shape: {ai.shape} vs {final.shape}")
    comp, _ = ndimage.label(ai.astype(bool, copy=False), structure=_STRUCTURE)
    regions = [Region(n, label, None, (box[0].start, box[1].start, box[2].start), comp[box] == n)
               for n, box in enumerate(ndimage.find_objects(comp), start=1) if box is not None]
    grid = Grid(frame_of_reference="", rows=ai.shape[1], columns=ai.shape[2], slices=[("", None)] * ai.shape[0],
                positions=[None] * ai.shape[0], spacing_kji=spacing_kji)
    fin = final.astype(bool, copy=False)
    final_seg = FinalSegmentation({}, {1: {k: fin[k] for k in range(fin.shape[0]) if fin[k].any()}}, ai.shape)
    out = judge_regions(AIRegions(grid, regions), final_seg, accept_dice=accept_dice)
    for f in out.findings:
        f.label = label
    return out

def _final_groups(ai: AIRegions, final: FinalSegmentation) -> tuple[dict[int, np.ndarray], str]:
    """Which of the final SEG's segments each AI finding is compared with, and how that was decided.

    By tracking UID when the final SEG keeps the AI's (the viewer carried the identity over); by property type
    when the AI made several kinds of finding (organs) and the final segments keep their types; otherwise every
    final segment (viewers that re-code what they save: OHIF stores every segment as "Tissue")."""
    shape = ai.grid.shape
    uids = {s.tracking_uid: n for n, s in final.segments.items() if s.tracking_uid}
    ai_uids = {r.tracking_uid for r in ai.regions if r.tracking_uid}
    if ai_uids & set(uids):
        empty = np.zeros(shape, dtype=bool)
        return ({r.number: final.mask([uids[r.tracking_uid]]) if r.tracking_uid in uids else empty
                 for r in ai.regions}, "tracking UID")
    ai_types = {r.type_code for r in ai.regions if r.type_code}
    fin_types = {final.segments[n].type_code for n in final.numbers if n in final.segments}
    if len(ai_types) > 1 and fin_types and fin_types <= ai_types:
        by_type: dict[str, list[int]] = {}
        for n in final.numbers:
            by_type.setdefault(final.segments[n].type_code if n in final.segments else "", []).append(n)
        masks = {code: final.mask(numbers) for code, numbers in by_type.items()}
        empty = np.zeros(shape, dtype=bool)
        return {r.number: masks.get(r.type_code or "", empty) for r in ai.regions}, "segment type"
    everything = final.mask()
    return {r.number: everything for r in ai.regions}, "all segments"


def judge_regions(ai: AIRegions, final: FinalSegmentation, *, accept_dice: float = 0.9) -> Judgement:
    """Classify every AI finding (numbered as in the AI result, its identity kept) against a final SEG placed on
    the same grid (:func:`node.verdicts.regions.read_seg`); final regions touching no AI finding are added."""
    spacing = ai.grid.spacing_kji
    voxel = float(np.prod(spacing))
    groups, how = _final_groups(ai, final)
    labelled: dict[int, tuple[np.ndarray, np.ndarray, list[Any]]] = {}  # id(mask) -> components, sizes, boxes
    out: list[FindingVerdict] = []
    for r in ai.regions:
        cand = groups[r.number]
        key = id(cand)
        if key not in labelled:
            comp, n = ndimage.label(cand, structure=_STRUCTURE)
            labelled[key] = (comp, np.bincount(comp.ravel(), minlength=n + 1), ndimage.find_objects(comp))
        comp, sizes, boxes = labelled[key]
        k0, j0, i0 = r.offset
        d, h, w = r.mask.shape
        box = (slice(k0, k0 + d), slice(j0, j0 + h), slice(i0, i0 + w))
        a_vox = int(r.mask.sum())
        a_vol = a_vox * voxel
        hits = [int(v) for v in np.unique(comp[box][r.mask]) if v]
        if not hits:
            out.append(FindingVerdict(r.number, r.label, "rejected", dice=0.0, ai_volume_mm3=round(a_vol, 2)))
            continue
        inter = int((np.isin(comp[box], hits) & r.mask).sum())
        f_vox = int(sizes[hits].sum())
        dice = 2.0 * inter / (a_vox + f_vox) if a_vox + f_vox else 1.0
        f_vol = f_vox * voxel
        outcome = "accepted" if dice >= accept_dice else "edited"
        diam = None
        if outcome == "edited":  # the diameters on the union of the boxes of both
            parts = [boxes[h - 1] for h in hits] + [box]
            span = tuple(slice(min(p[ax].start for p in parts), max(p[ax].stop for p in parts)) for ax in range(3))
            region = np.isin(comp[span], hits)
            whole = np.zeros(region.shape, dtype=bool)
            whole[tuple(slice(b.start - s.start, b.stop - s.start) for b, s in zip(box, span, strict=True))] = r.mask
            diam = round(_diameter_mm(region, spacing) - _diameter_mm(whole, spacing), 2)
        out.append(FindingVerdict(r.number, r.label, outcome, dice=round(dice, 4), ai_volume_mm3=round(a_vol, 2),
                                  final_volume_mm3=round(f_vol, 2),
                                  volume_change_pct=None if a_vol == 0 else round(100.0 * (f_vol - a_vol) / a_vol, 2),
                                  diameter_change_mm=diam))
    ai_any = ai.union()
    final_any = final.mask()
    comp, n = ndimage.label(final_any, structure=_STRUCTURE)
    if n:
        touched = set(np.unique(comp[ai_any]).tolist())
        sizes = np.bincount(comp.ravel(), minlength=n + 1)
        for idx in range(1, n + 1):
            if idx not in touched:
                out.append(FindingVerdict(None, 0, "added", final_volume_mm3=round(float(sizes[idx]) * voxel, 2)))
    case = round(dice_score(ai_any, final_any), 4) if (ai_any.any() or final_any.any()) else None
    result = Judgement(out, "", case)
    result.study_verdict = study_verdict(result.counts())
    result.matched_by = how
    return result
