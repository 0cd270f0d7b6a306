"""The result of a done job: one frozen, typed record, written by the pipeline and the worker, persisted
by the job store (``jobs.result``, JSON) and read back by everything else (API, dashboard, verdicts,
notifications, evaluation) through :meth:`JobResult.from_json` only.

Findings are numbered once (``number``, from 1): the SR's tracking identifiers, the SEG's segments, the
API, the judge page and the exports all use that number, and each finding carries the tracking UID the
SR and SEG give it. Values are validated where they are made: a result never holds NaN or an infinity
(:class:`ResultError`), so that every reader, SQL included, can parse every row.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from node.errors import OutputError

__all__ = ["ClassResult", "FindingResult", "JobResult", "ResultError"]

#: the layout version written by this code; older rows (1: the untyped dict) are read and converted
SCHEMA = 2


class ResultError(OutputError, ValueError):
    """A job result with a value that cannot be stored (NaN, an infinity): the same input gives the same
    value, so the job is not retried."""

    permanent = True


def _finite(value: Any, where: str) -> Any:
    """``value`` with every float checked finite (recursively); raises ResultError naming ``where``."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ResultError(f"{where} is {value}; a result holds finite numbers only")
        return value
    if isinstance(value, dict):
        return {k: _finite(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v, f"{where}[{n}]") for n, v in enumerate(value)]
    return value


@dataclass(frozen=True, slots=True)
class FindingResult:
    """One reported finding (a region of interest), as the SR and SEG state it."""

    number: int
    label: int
    label_name: str
    #: "finding" (one connected component), "anatomy" (a whole organ) or "box" (a detector's box)
    kind: str
    volume_mm3: float
    #: None for a finding measured in part only (not listed in the SR: ``[outputs] sr_max_findings``)
    diameter_3d_mm: float | None
    diameter_inplane_mm: float | None
    centroid_mm: tuple[float, float, float]
    #: slice of largest in-plane area (0-based, in the series' sorted order)
    key_slice: int
    #: (k0, k1), (j0, j1), (i0, i1), inclusive, on the series' grid
    bbox: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    mean: float
    min: float
    max: float
    voxels: int = 0
    confidence: float | None = None
    #: a box's extent along the series' i, j, k axes (mm)
    size_mm: tuple[float, float, float] | None = None
    #: the tracking UID the SR and the SEG give the finding (its identity in verdicts and follow-ups)
    tracking_uid: str | None = None
    tracking_id: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FindingResult:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["centroid_mm"] = tuple(d.get("centroid_mm") or (0.0, 0.0, 0.0))
        d["bbox"] = tuple(tuple(b) for b in d.get("bbox") or ((0, 0), (0, 0), (0, 0)))
        if d.get("size_mm") is not None:
            d["size_mm"] = tuple(d["size_mm"])
        return cls(**d)


@dataclass(frozen=True, slots=True)
class ClassResult:
    """A classification: the class chosen for the series (or one of its images) and every class's
    probability."""

    concept: str
    #: the chosen class as the model card names it (e.g. "D"), its label value and its code's meaning
    value: str
    label: int
    probability: float
    #: every class's score, by class name
    probabilities: dict[str, float]
    meaning: str = ""
    #: SOP Instance UID of the image it is about (multi-image series), None for the whole series
    image_uid: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassResult:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True, slots=True)
class JobResult:
    """What a done job produced and where it went; see the module docstring."""

    model: dict[str, str]
    series_uid: str
    study_uid: str = ""
    shape: tuple[int, int, int] = (0, 0, 0)
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    findings: tuple[FindingResult, ...] = ()
    classes: tuple[ClassResult, ...] = ()
    #: findings the model produced that the results do not list, by reason (counts)
    not_reported: dict[str, int] = field(default_factory=dict)
    #: percentiles of the input's values (drift watch)
    intensity: dict[str, float] = field(default_factory=dict)
    #: how the series was resampled for the model (tilted or uneven stacks), None when it was not
    resampled: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    #: result files by role: seg, sr, preview, gsps, ...
    files: dict[str, str] = field(default_factory=dict)
    output_dir: str = ""
    priority: str = "routine"
    time_to_result_s: float | None = None
    target_s: float | None = None
    target_breached: bool = False
    #: what a route flagged in the result (e.g. "class:D"), and what it did about it
    flags: tuple[str, ...] = ()
    #: a study-level model's input series: name, series_uid, reference, description, modality, instances, selected
    inputs: tuple[dict[str, Any], ...] = ()
    #: the follow-up (node.followup.FollowUp.to_dict): the prior, the alignment, each finding's change; None when
    #: the patient has no prior result of the model (or follow-ups are off)
    followup: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for f in ("timings", "intensity", "spacing_mm"):
            _finite(getattr(self, f), f)
        for n, r in enumerate(self.findings):
            _finite([r.volume_mm3, r.diameter_3d_mm, r.diameter_inplane_mm, *r.centroid_mm, r.mean, r.min, r.max,
                     r.confidence if r.confidence is not None else 0.0], f"finding {n + 1}")
        for c in self.classes:
            _finite([c.probability, *c.probabilities.values()], f"class {c.value}")

    @property
    def roi_count(self) -> int:
        return len(self.findings)

    def finding(self, number: int) -> FindingResult | None:
        return next((f for f in self.findings if f.number == number), None)

    def with_delivery(self, **changes: Any) -> JobResult:
        """A copy with the worker's additions (priority, time to result, flags, output folder)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["schema"] = SCHEMA
        d["roi_count"] = len(self.findings)
        return d

    def to_json(self, *, indent: int | None = None) -> str:
        """JSON text (NaN and infinities refused: ResultError)."""
        try:
            return json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        except ValueError as exc:
            raise ResultError(f"job result of series {self.series_uid}: {exc}") from exc

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobResult:
        if int(d.get("schema", 1)) < 2:
            d = _from_v1(d)
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["findings"] = tuple(FindingResult.from_dict(f) for f in d.get("findings") or ())
        kw["classes"] = tuple(ClassResult.from_dict(c) for c in d.get("classes") or ())
        kw["shape"] = tuple(kw.get("shape") or (0, 0, 0))
        kw["spacing_mm"] = tuple(kw.get("spacing_mm") or (1.0, 1.0, 1.0))
        kw["flags"] = tuple(kw.get("flags") or ())
        kw["inputs"] = tuple(kw.get("inputs") or ())
        return cls(**kw)

    @classmethod
    def from_json(cls, text: str) -> JobResult:
        return cls.from_dict(json.loads(text))


def _from_v1(d: dict[str, Any]) -> dict[str, Any]:
    """The untyped result of earlier releases (``summary`` + ``rois`` twice) in this layout."""
    summary = d.get("summary") or {}
    findings = []
    for n, r in enumerate(d.get("rois") or [], start=1):
        findings.append({**r, "number": int(r.get("index", n))})
    return {
        "model": d.get("model") or summary.get("model") or {}, "series_uid": summary.get("series_uid", ""),
        "study_uid": summary.get("study_uid", ""), "shape": summary.get("shape") or (0, 0, 0),
        "spacing_mm": summary.get("spacing_mm") or (1.0, 1.0, 1.0), "findings": findings,
        "not_reported": summary.get("not_reported") or {}, "intensity": summary.get("intensity") or {},
        "resampled": summary.get("resampled"), "timings": d.get("timings") or {}, "files": d.get("files") or {},
        "output_dir": d.get("output_dir", ""), "priority": d.get("priority", "routine"),
        "time_to_result_s": d.get("time_to_result_s"), "target_s": d.get("target_s"),
        "target_breached": bool(d.get("target_breached")),
    }
