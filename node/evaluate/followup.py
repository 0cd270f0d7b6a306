"""``preannot evaluate-followup``: how well a model and the node's follow-up keep each lesion's identity over time,
on a labelled longitudinal set.

The set: one folder per patient pair, each with ``prior/`` and ``current/`` (an image series each) and
``prior_truth_seg.dcm`` and ``current_truth_seg.dcm``, reference SEGs with one segment per lesion, a lesion's
segments at the two time points sharing their Tracking UID (``preannot synth followup`` writes such pairs).

Each pair runs through the node's own pipeline: the model on the prior, then on the current series with the prior
as its follow-up (alignment, matching, change). Each reference lesion is then judged:

- seen at both time points: **right** when the model's finding on it now carries the identity of its finding on
  it then; a lesion the model missed at either time point counts as **not detected** (a detector's miss, not a
  matching error: reported apart);
- gone (prior only): right when the model's prior finding on it is said not seen;
- new (current only): right when the model's finding on it is said new.

A finding is "on" a reference lesion when its centre lies within ``max(5 mm, half the lesion's equivalent
diameter)`` of the lesion's centre (the nearest finding). The report gives the rate with its 95 % interval
(Wilson), per status, the volume change error of each lesion seen at both time points, and each pair's
alignment figures.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread

from node.config import NodeConfig
from node.followup import Prior, PriorFinding, follow_prior
from node.followup.prior import segment_centres
from node.followup.track import equivalent_diameter
from node.processing.pipeline import ModelContext, PipelineOptions, process_series
from node.store.results import FindingResult

__all__ = ["evaluate_followup", "wilson"]

logger = logging.getLogger(__name__)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson interval of a proportion k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def _reference(path: Path) -> dict[str, tuple[tuple[float, float, float], float]]:
    """Tracking UID -> (centre mm, volume mm3) of each lesion of a reference SEG."""
    seg = dcmread(path)
    centres = segment_centres(seg)
    shared = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    row, col = (float(v) for v in shared.PixelSpacing)
    thick = float(shared.get("SpacingBetweenSlices", 0) or shared.get("SliceThickness", 1) or 1)
    pixels = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
    counts: dict[int, int] = {}
    for f, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        n = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        counts[n] = counts.get(n, 0) + int(np.count_nonzero(pixels[f]))
    out = {}
    for d in seg.SegmentSequence:
        n = int(d.SegmentNumber)
        if n in centres and "TrackingUID" in d:
            out[str(d.TrackingUID)] = (centres[n], counts.get(n, 0) * row * col * thick)
    return out


def _on(findings: tuple[FindingResult, ...], centre: tuple[float, float, float], volume: float
        ) -> FindingResult | None:
    """The model's finding on a reference lesion (nearest centre within the tolerance), None when missed."""
    tol = max(5.0, 0.5 * equivalent_diameter(volume))
    best: tuple[float, FindingResult] | None = None
    for f in findings:
        if f.kind == "anatomy":
            continue
        d = float(np.linalg.norm(np.array(f.centroid_mm) - centre))
        if d <= tol and (best is None or d < best[0]):
            best = (d, f)
    return best[1] if best else None


def evaluate_followup(root: Path, ctx: ModelContext, config: NodeConfig, out: Path,
                      progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate ``ctx``'s model with the node's follow-up on the pairs under ``root``; writes ``summary.json`` and
    ``report.md`` into ``out`` and returns the summary."""
    pairs = sorted(p.parent for p in root.rglob("prior_truth_seg.dcm") if (p.parent / "current_truth_seg.dcm").is_file())
    if not pairs:
        raise FileNotFoundError(f"no pair under {root} (folders with prior/, current/, prior_truth_seg.dcm and "
                                "current_truth_seg.dcm)")
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    per_pair: list[dict[str, Any]] = []
    for n, pair in enumerate(pairs, start=1):
        if progress:
            progress(f"pair {n}/{len(pairs)}: {pair.name}")
        work = out / "work" / pair.name
        first = process_series(sorted((pair / "prior").rglob("*.dcm")), ctx, work / "prior")
        r = first.result
        date = str(dcmread(next((pair / "prior").rglob("*.dcm")), stop_before_pixels=True).get("StudyDate", ""))
        prior = Prior(r.study_uid, date, r.series_uid,
                      [PriorFinding(str(f.tracking_uid), str(f.tracking_id), f.label, f.kind, f.volume_mm3,
                                    f.diameter_3d_mm, f.centroid_mm) for f in r.findings if f.tracking_uid],
                      sorted((pair / "prior").rglob("*.dcm")), "evaluation")

        def hook(volume: Any, rois: list[Any], _model: Any, _scratch: Path, _prior: Prior = prior) -> Any:
            return follow_prior(_prior, volume, rois, config.followup)

        opts = replace(PipelineOptions(outputs=config.outputs), followup=hook)
        second = process_series(sorted((pair / "current").rglob("*.dcm")), ctx, work / "current", options=opts)
        now = second.result
        fu = now.followup or {}
        status_of = {c["number"]: c["status"] for c in fu.get("changes") or [] if c.get("number") is not None}
        not_seen = {c["tracking_uid"] for c in fu.get("changes") or [] if c["status"] == "not seen"}
        before, after = _reference(pair / "prior_truth_seg.dcm"), _reference(pair / "current_truth_seg.dcm")
        per_pair.append({"pair": pair.name, "alignment": fu.get("alignment"), "not_matched": fu.get("not_matched"),
                         "findings_prior": len(r.findings), "findings_current": len(now.findings)})
        for uid in sorted(set(before) | set(after)):
            status = "both" if uid in before and uid in after else "gone" if uid in before else "new"
            p = _on(r.findings, *before[uid]) if uid in before else None
            c = _on(now.findings, *after[uid]) if uid in after else None
            row: dict[str, Any] = {"pair": pair.name, "lesion": uid, "status": status}
            if (status != "new" and p is None) or (status != "gone" and c is None):
                row["outcome"] = "not detected"
            elif status == "both":
                assert p is not None and c is not None
                row["outcome"] = "right" if c.tracking_uid == p.tracking_uid else "wrong"
                true_ratio = after[uid][1] / before[uid][1] if before[uid][1] else None
                measured = c.volume_mm3 / p.volume_mm3 if p.volume_mm3 else None
                if true_ratio and measured:
                    row["volume_ratio_true"] = round(true_ratio, 3)
                    row["volume_ratio_measured"] = round(measured, 3)
                    row["volume_ratio_error_pct"] = round(100.0 * (measured / true_ratio - 1.0), 1)
            elif status == "gone":
                assert p is not None
                row["outcome"] = "right" if p.tracking_uid in not_seen else "wrong"
            else:
                assert c is not None
                row["outcome"] = "right" if status_of.get(c.number) == "new" else "wrong"
            rows.append(row)
    judged = [r for r in rows if r["outcome"] != "not detected"]
    right = sum(r["outcome"] == "right" for r in judged)
    lo, hi = wilson(right, len(judged))
    by_status = {s: {"right": sum(r["outcome"] == "right" for r in rows if r["status"] == s),
                     "judged": sum(r["outcome"] != "not detected" for r in rows if r["status"] == s),
                     "not_detected": sum(r["outcome"] == "not detected" for r in rows if r["status"] == s)}
                 for s in ("both", "gone", "new")}
    errors = [abs(r["volume_ratio_error_pct"]) for r in rows if "volume_ratio_error_pct" in r]
    summary = {"model": ctx.model.identification(), "pairs": len(pairs), "lesions": len(rows),
               "judged": len(judged), "right": right, "rate": round(right / len(judged), 4) if judged else None,
               "rate_95ci": [round(lo, 4), round(hi, 4)], "by_status": by_status,
               "volume_ratio_abs_error_pct_median": round(float(np.median(errors)), 1) if errors else None,
               "pairs_detail": per_pair, "lesions_detail": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [f"# Follow-up evaluation: {ctx.model.name} {ctx.model.version}", "",
             f"{len(pairs)} pair(s), {len(rows)} reference lesion(s), {len(judged)} judged "
             f"(found by the model at every time point they exist).", "",
             f"**Identity kept right: {right}/{len(judged)}"
             + (f" = {100 * right / len(judged):.1f} % (95 % CI {100 * lo:.1f}-{100 * hi:.1f} %)**" if judged else "**"),
             "", "| lesions | right | judged | not detected |", "|---|---|---|---|"]
    lines += [f"| {s} | {v['right']} | {v['judged']} | {v['not_detected']} |" for s, v in by_status.items()]
    if errors:
        lines += ["", f"Volume change error (measured / true ratio), median |error|: {np.median(errors):.1f} %"]
    lines += ["", "| pair | alignment NCC | rotation (deg) | findings prior / now | not matched |", "|---|---|---|---|---|"]
    for info in per_pair:
        a = info["alignment"] or {}
        lines.append(f"| {info['pair']} | {a.get('ncc', '')} | {a.get('rotation_deg', '')} | {info['findings_prior']}"
                     f" / {info['findings_current']} | {info['not_matched'] or ''} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return summary
