"""Findings of a follow-up matched to its prior's, and what changed.

Each prior finding is carried into the follow-up's patient coordinates by the alignment
(:mod:`node.followup.register`) and paired one-to-one with the follow-up's findings of the same label (the
Hungarian assignment on the distance between centres), a pair kept only when its centres lie within the gate:
``max(min_gate_mm, gate_factor x the smaller equivalent diameter)``. A matched finding keeps the prior's tracking
identifier and UID; an unmatched follow-up finding is new; an unmatched prior finding is "not seen". A whole organ
(anatomy) keeps its identity by label.

Change of a matched finding: volume and 3D diameter at both time points, the absolute and relative change, and
for a growing finding the volume doubling time ``days x ln 2 / ln(V_now / V_prior)``; its status is grown or shrunk
when the volume changed by ``growth_pct`` or more (25 %: the volumetric threshold of lung nodule follow-up), else
stable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.optimize import linear_sum_assignment

if TYPE_CHECKING:
    from node.followup.register import Alignment

__all__ = ["Change", "FollowUp", "PriorFinding", "equivalent_diameter", "match_findings"]

NEW, GROWN, SHRUNK, STABLE, NOT_SEEN = "new", "grown", "shrunk", "stable", "not seen"


def equivalent_diameter(volume_mm3: float) -> float:
    """The diameter (mm) of the sphere of that volume."""
    return (6.0 * max(volume_mm3, 0.0) / math.pi) ** (1.0 / 3.0)


@dataclass(frozen=True, slots=True)
class PriorFinding:
    """A finding of the prior result, as its SR and SEG state it (centre in the prior's patient coordinates)."""

    tracking_uid: str
    tracking_id: str
    label: int
    kind: str
    volume_mm3: float
    diameter_3d_mm: float | None
    centroid_mm: tuple[float, float, float]
    #: "ai" (as the AI made it), "edited" (the radiologist's outline: its volume and centre are theirs)
    source: str = "ai"


@dataclass(frozen=True, slots=True)
class Change:
    """One tracked finding across the two time points."""

    status: str  # new, grown, shrunk, stable, not seen
    tracking_uid: str
    tracking_id: str
    label: int
    #: the follow-up's finding number (None: not seen any more)
    number: int | None
    prior_volume_mm3: float | None
    volume_mm3: float | None
    prior_diameter_mm: float | None
    diameter_mm: float | None
    #: distance between the carried prior centre and the follow-up's centre (mm)
    distance_mm: float | None = None
    #: where the prior finding lies in the follow-up (patient mm), for one not seen any more
    expected_mm: tuple[float, float, float] | None = None
    kind: str = "finding"

    @property
    def volume_change_mm3(self) -> float | None:
        if self.prior_volume_mm3 is None or self.volume_mm3 is None:
            return None
        return self.volume_mm3 - self.prior_volume_mm3

    @property
    def volume_change_pct(self) -> float | None:
        if self.prior_volume_mm3 is None or self.volume_mm3 is None or self.prior_volume_mm3 <= 0:
            return None
        return 100.0 * (self.volume_mm3 / self.prior_volume_mm3 - 1.0)

    @property
    def diameter_change_mm(self) -> float | None:
        if self.prior_diameter_mm is None or self.diameter_mm is None:
            return None
        return self.diameter_mm - self.prior_diameter_mm

    def doubling_time_days(self, days: float) -> float | None:
        """Volume doubling time (days) of a growing finding ``days`` after the prior (None otherwise)."""
        if (self.prior_volume_mm3 is None or self.volume_mm3 is None or days <= 0
                or self.volume_mm3 <= self.prior_volume_mm3 or self.prior_volume_mm3 <= 0):
            return None
        return days * math.log(2.0) / math.log(self.volume_mm3 / self.prior_volume_mm3)

    def to_dict(self, days: float) -> dict[str, Any]:
        d = asdict(self)
        for k, v in (("volume_change_mm3", self.volume_change_mm3), ("volume_change_pct", self.volume_change_pct),
                     ("diameter_change_mm", self.diameter_change_mm),
                     ("doubling_time_days", self.doubling_time_days(days))):
            d[k] = None if v is None else round(v, 2)
        for k in ("prior_volume_mm3", "volume_mm3", "prior_diameter_mm", "diameter_mm", "distance_mm"):
            d[k] = None if d[k] is None else round(d[k], 2)
        if d["expected_mm"] is not None:
            d["expected_mm"] = [round(v, 2) for v in d["expected_mm"]]
        return d


@dataclass(slots=True)
class FollowUp:
    """The follow-up of one job: its prior, the alignment, each finding's change (or why there is none)."""

    prior_study_uid: str
    prior_study_date: str  # YYYYMMDD
    study_date: str
    prior_series_uid: str
    source: str  # "node" (the node's own store) or the PACS destination's name
    #: time point of this study (the prior's + 1)
    time_point_order: int = 2
    alignment: Alignment | None = None
    changes: list[Change] = field(default_factory=list)
    #: prior findings the radiologist rejected (not carried)
    rejected: int = 0
    #: why there is no matching (no alignment, ...); None when matched
    not_matched: str | None = None
    #: the node's job of the prior (None: the prior came from the PACS)
    prior_job_id: int | None = None

    @property
    def days(self) -> float:
        from datetime import datetime

        try:
            return float((datetime.strptime(self.study_date[:8], "%Y%m%d")
                          - datetime.strptime(self.prior_study_date[:8], "%Y%m%d")).days)
        except ValueError:
            return 0.0

    def of_number(self) -> dict[int, Change]:
        return {c.number: c for c in self.changes if c.number is not None}

    def not_seen(self) -> list[Change]:
        return [c for c in self.changes if c.status == NOT_SEEN]

    def diameter_sums(self) -> tuple[float, float] | None:
        """RECIST-style sum of the findings' 3D diameters at the prior and now (tracked findings only: those
        matched, new and not seen; a finding without a diameter counts by its equivalent sphere)."""
        if self.not_matched is not None:
            return None
        before = now = 0.0
        for c in self.changes:
            if c.kind == "anatomy":
                continue
            if c.prior_volume_mm3 is not None:
                before += c.prior_diameter_mm or equivalent_diameter(c.prior_volume_mm3)
            if c.volume_mm3 is not None:
                now += c.diameter_mm or equivalent_diameter(c.volume_mm3)
        return before, now

    def summary(self) -> str:
        """The study's follow-up in words (the SR's comment, ``summary`` in the result, the dashboard)."""
        p = self.prior_study_date
        prior = f"{p[:4]}-{p[4:6]}-{p[6:8]}" if len(p) == 8 else "an earlier date"
        if self.not_matched is not None:
            return f"AI follow-up: the prior result of {prior} was found, findings not matched: {self.not_matched}"
        counts: dict[str, int] = {}
        for c in self.changes:
            counts[c.status] = counts.get(c.status, 0) + 1
        text = (f"AI follow-up of the study of {prior} ({self.days:.0f} days): "
                + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
        if self.rejected:
            text += f"; {self.rejected} prior finding(s) rejected by the radiologist not carried"
        sums = self.diameter_sums()
        if sums is not None and sums[0] > 0:
            text += (f"; sum of diameters {sums[1]:.1f} mm (prior {sums[0]:.1f} mm, "
                     f"{100.0 * (sums[1] / sums[0] - 1.0):+.0f} %)")
        return text + "; computed by AI, unverified"

    def to_dict(self) -> dict[str, Any]:
        sums = self.diameter_sums()
        counts: dict[str, int] = {}
        for c in self.changes:
            counts[c.status] = counts.get(c.status, 0) + 1
        return {
            "prior_study_uid": self.prior_study_uid, "prior_study_date": self.prior_study_date,
            "prior_series_uid": self.prior_series_uid, "study_date": self.study_date, "days": self.days,
            "source": self.source, "time_point_order": self.time_point_order, "prior_job_id": self.prior_job_id,
            "alignment": self.alignment.describe() if self.alignment else None, "not_matched": self.not_matched,
            "rejected_prior_findings": self.rejected, "counts": counts, "summary": self.summary(),
            "sum_diameters_mm": None if sums is None else {
                "prior": round(sums[0], 1), "current": round(sums[1], 1),
                "change_pct": round(100.0 * (sums[1] / sums[0] - 1.0), 1) if sums[0] > 0 else None,
                "note": "computed by the AI, unverified"},
            "changes": [c.to_dict(self.days) for c in self.changes]}


@dataclass(frozen=True, slots=True)
class Current:
    """What matching needs of a follow-up finding."""

    number: int
    label: int
    kind: str
    volume_mm3: float
    diameter_3d_mm: float | None
    centroid_mm: tuple[float, float, float]


def _status(prior_volume: float, volume: float, growth_pct: float) -> str:
    if prior_volume <= 0:
        return GROWN
    pct = 100.0 * (volume / prior_volume - 1.0)
    return GROWN if pct >= growth_pct else SHRUNK if pct <= -growth_pct else STABLE


def match_findings(prior: list[PriorFinding], current: list[Current], alignment: Alignment, *,
                   min_gate_mm: float = 10.0, gate_factor: float = 0.75, growth_pct: float = 25.0
                   ) -> tuple[list[Change], dict[int, PriorFinding]]:
    """Pair ``prior`` with ``current`` findings (see the module's docstring).

    Returns:
        Every tracked finding's change (the follow-up's in their order, then the prior's not seen), and the prior
        finding each matched follow-up finding (by number) inherits its identity from.
    """
    matched: dict[int, PriorFinding] = {}
    changes: dict[int, Change] = {}
    gone: list[Change] = []
    labels = sorted({p.label for p in prior} | {c.label for c in current})
    for label in labels:
        ps = [p for p in prior if p.label == label]
        cs = [c for c in current if c.label == label]
        if not ps:
            continue
        anatomy_p = [p for p in ps if p.kind == "anatomy"]
        anatomy_c = [c for c in cs if c.kind == "anatomy"]
        for p, c in zip(anatomy_p[:1], anatomy_c[:1], strict=False):  # an organ keeps its identity by label
            matched[c.number] = p
        ps = [p for p in ps if p.kind != "anatomy"]
        cs = [c for c in cs if c.kind != "anatomy"]
        where = alignment.to_current(np.array([p.centroid_mm for p in ps])) if ps else np.zeros((0, 3))
        pairs: list[tuple[int, int, float]] = []
        if ps and cs:
            here = np.array([c.centroid_mm for c in cs], dtype=np.float64)
            dist = np.linalg.norm(where[:, None, :] - here[None, :, :], axis=2)
            gate = np.array([[max(min_gate_mm, gate_factor * min(equivalent_diameter(p.volume_mm3),
                                                                 equivalent_diameter(c.volume_mm3)))
                              for c in cs] for p in ps])
            cost = np.where(dist <= gate, dist, 1e6)
            rows, cols = linear_sum_assignment(cost)
            pairs = [(int(r), int(c), float(dist[r, c])) for r, c in zip(rows, cols, strict=True)
                     if cost[r, c] < 1e6]
        used_p = {r for r, _c, _d in pairs}
        for r, col, d in pairs:
            p, c = ps[r], cs[col]
            matched[c.number] = p
            changes[c.number] = Change(_status(p.volume_mm3, c.volume_mm3, growth_pct), p.tracking_uid,
                                       p.tracking_id, label, c.number, p.volume_mm3, c.volume_mm3,
                                       p.diameter_3d_mm, c.diameter_3d_mm, distance_mm=d, kind=c.kind)
        for r, p in enumerate(ps):
            if r not in used_p:
                gone.append(Change(NOT_SEEN, p.tracking_uid, p.tracking_id, label, None, p.volume_mm3, None,
                                   p.diameter_3d_mm, None, expected_mm=(float(where[r][0]), float(where[r][1]), float(where[r][2])),
                                   kind=p.kind))
    out: list[Change] = []
    for c in current:
        if c.number in changes:
            out.append(changes[c.number])
        elif c.number in matched:  # an organ
            p = matched[c.number]
            out.append(Change(STABLE if abs(c.volume_mm3 - p.volume_mm3) < 0.25 * max(p.volume_mm3, 1.0) else
                              _status(p.volume_mm3, c.volume_mm3, growth_pct), p.tracking_uid, p.tracking_id,
                              c.label, c.number, p.volume_mm3, c.volume_mm3, None, None, kind="anatomy"))
        else:
            out.append(Change(NEW, "", "", c.label, c.number, None, c.volume_mm3, None, c.diameter_3d_mm,
                              kind=c.kind))
    return out + gone, matched
