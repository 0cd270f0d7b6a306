"""A patient's findings over time, one line per lesion: the chain of a job's follow-ups back to the first time
point, read from the node's own results (each follow-up names the job of its prior when that was the node's)."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from node.store.results import JobResult

__all__ = ["timeline", "timeline_png"]

#: how many time points are followed back
MAX_POINTS = 50


def _date(d: str) -> str:
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 else d


def timeline(job_id: int, result_of: Callable[[int], JobResult | None]) -> dict[str, Any]:
    """The time points (oldest first) and each tracked lesion's volume and diameter at each of them.

    ``result_of``: a job id -> its result (None when unknown). A chain whose prior came from the PACS ends there
    (the prior's own result is the PACS's, named by its study)."""
    chain: list[tuple[int | None, JobResult | None, dict[str, Any]]] = []
    seen: set[int] = set()
    current: int | None = job_id
    while current is not None and current not in seen and len(chain) < MAX_POINTS:
        seen.add(current)
        result = result_of(current)
        if result is None:
            break
        fu = result.followup or {}
        chain.append((current, result, fu))
        current = fu.get("prior_job_id")
    points: list[dict[str, Any]] = []
    lesions: dict[str, dict[str, Any]] = {}
    first_fu = chain[-1][2] if chain else {}
    if first_fu.get("prior_study_uid") and first_fu.get("prior_job_id") is None:  # the first time point: the PACS's
        points.append({"job_id": None, "study_uid": first_fu["prior_study_uid"],
                       "study_date": _date(str(first_fu.get("prior_study_date", ""))), "source": first_fu.get("source")})
        for c in first_fu.get("changes") or []:
            if c.get("prior_volume_mm3") is not None and c.get("tracking_uid"):
                lesions.setdefault(c["tracking_uid"], {"tracking_id": c["tracking_id"], "label": c["label"],
                                                       "points": {}})["points"][0] = {
                    "volume_mm3": c["prior_volume_mm3"], "diameter_mm": c.get("prior_diameter_mm"), "status": "seen"}
    for jid, result, fu in reversed(chain):
        assert result is not None
        n = len(points)
        date = _date(str(fu.get("study_date") or ""))
        points.append({"job_id": jid, "study_uid": result.study_uid, "study_date": date or None,
                       "matched": fu.get("not_matched") is None if fu else None, "not_matched": fu.get("not_matched")})
        status = {c["number"]: c["status"] for c in fu.get("changes") or [] if c.get("number") is not None}
        for f in result.findings:
            if not f.tracking_uid or f.kind == "anatomy":
                continue
            line = lesions.setdefault(f.tracking_uid, {"tracking_id": f.tracking_id, "label": f.label, "points": {}})
            line["points"][n] = {"volume_mm3": f.volume_mm3, "diameter_mm": f.diameter_3d_mm,
                                 "status": status.get(f.number, "seen" if not fu else "new")}
        for c in fu.get("changes") or []:
            if c.get("status") == "not seen" and c.get("tracking_uid") in lesions:
                lesions[c["tracking_uid"]]["points"][n] = {"volume_mm3": None, "diameter_mm": None,
                                                           "status": "not seen"}
    rows = [{"tracking_uid": uid, "tracking_id": v["tracking_id"], "label": v["label"],
             "points": [v["points"].get(n) for n in range(len(points))]} for uid, v in lesions.items()]
    return {"job_id": job_id, "time_points": points, "lesions": rows,
            "note": "volumes and diameters computed by the AI, unverified"}


def timeline_png(data: dict[str, Any]) -> bytes:
    """One line per lesion: its volume at each time point (a lesion not seen drops to 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.0), dpi=100)
    labels = [p.get("study_date") or "?" for p in data["time_points"]]
    xs = list(range(len(labels)))
    for row in data["lesions"]:
        pts = [(x, (p["volume_mm3"] if p["volume_mm3"] is not None else 0.0)) for x, p in zip(xs, row["points"],
                                                                                              strict=True) if p]
        if pts:
            ax.plot([x for x, _ in pts], [v for _, v in pts], marker="o", label=row["tracking_id"])
    ax.set_xticks(xs, labels)
    ax.set_ylabel("volume (mm³)")
    ax.set_title("Findings over time (AI, unverified)")
    if data["lesions"]:
        ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
