"""The prior of a follow-up: the same patient's latest earlier result of the same model.

Looked for in the node's own store first (the follow-up index: one row per done job, the patient known only by a
salted hash of Issuer of Patient ID and Patient ID, never by the ID itself), then, with ``[followup] fetch_from``,
in the PACS: C-FIND of the patient's earlier studies, the node's own SR there (its series description names the
model), C-GET of that SR, of the SEG it cites and of the image series they describe.

What the prior says of each finding comes from its result: from the node's store, the job's result (tracking UID
and identifier, volume, diameter, centre); from the PACS, the SR (tracking UID and identifier, volume, 3D
diameter) and the SEG (each segment's centre from its own frames). The radiologist's verdicts on the prior, where
the node holds them, are applied: a rejected finding is not carried, an edited one is carried with the
radiologist's volume.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from node.config import Destination, NodeConfig
from node.followup.track import PriorFinding
from node.outputs.consistency import concept_code, content_items
from node.store.db import Database
from node.store.results import JobResult

__all__ = ["Prior", "PriorFinder", "findings_from_objects", "patient_key", "segment_centres"]

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS followup_index (
    job_id INTEGER PRIMARY KEY,
    patient_key TEXT NOT NULL,
    model TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    study_date TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    time_point_order INTEGER NOT NULL DEFAULT 1,
    recorded_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS followup_patient ON followup_index(patient_key, model, study_date);
"""

_SEG_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")


def patient_key(ds: Dataset, salt: str) -> str | None:
    """A salted hash standing for the patient (Issuer of Patient ID + Patient ID); None without a Patient ID."""
    pid = str(ds.get("PatientID", "") or "").strip()
    if not pid:
        return None
    issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
    return hashlib.sha256(f"{salt}\0{issuer}\0{pid}".encode()).hexdigest()


def study_date(ds: Dataset) -> str:
    return str(ds.get("StudyDate", "") or ds.get("SeriesDate", "") or "")[:8]


@dataclass(slots=True)
class Prior:
    """A prior result and the images it was made on."""

    study_uid: str
    study_date: str
    series_uid: str
    findings: list[PriorFinding]
    image_files: list[Path]
    source: str
    time_point_order: int = 1
    rejected: int = 0
    job_id: int | None = None
    notes: list[str] = field(default_factory=list)


def _sr_groups(sr: Dataset) -> dict[str, dict[str, Any]]:
    """Tracking UID -> identifier, volume, 3D diameter, segment number, finding type, of an SR's groups."""
    out: dict[str, dict[str, Any]] = {}
    for group in sr.get("ContentSequence", []):
        if concept_code(group) != "126010":
            continue
        for mg in group.get("ContentSequence", []):
            e: dict[str, Any] = {}
            for item in content_items(mg):
                code = concept_code(item)
                if item.ValueType == "UIDREF" and code == "112040":
                    e["uid"] = str(item.UID)
                elif item.ValueType == "TEXT" and code == "112039":
                    e["id"] = str(item.TextValue)
                elif item.ValueType == "NUM" and code == "118565006":
                    e.setdefault("volume", float(item.MeasuredValueSequence[0].NumericValue))
                elif item.ValueType == "NUM" and code == "81827009":
                    e.setdefault("diameter", float(item.MeasuredValueSequence[0].NumericValue))
                elif item.ValueType == "IMAGE" and item.get("ReferencedSOPSequence"):
                    ref = item.ReferencedSOPSequence[0]
                    if "ReferencedSegmentNumber" in ref:
                        v = ref.ReferencedSegmentNumber
                        e["segment"] = int(v[0] if ref["ReferencedSegmentNumber"].VM > 1 else v)
            if "uid" not in e:
                continue
            entry = out.setdefault(e["uid"], {})
            for k, v in e.items():
                entry.setdefault(k, v)
    return out


def segment_centres(seg: Dataset) -> dict[int, tuple[float, float, float]]:
    """Segment number -> centre of its pixels (patient mm), from the SEG's own frames and geometry."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=np.float64)
    row_sp, col_sp = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    pixels = seg.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[None]
    labelmap = str(seg.get("SegmentationType", "")) == "LABELMAP"
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    for f, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ipp = np.array(fg.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64)
        frame = pixels[f]
        numbers = ([int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)] if not labelmap
                   else [int(v) for v in np.unique(frame) if v])
        for n in numbers:
            rows, cols = np.nonzero(frame == n if labelmap else frame)
            if rows.size == 0:
                continue
            pts = ipp[None, :] + cols[:, None] * col_sp * iop[None, :3] + rows[:, None] * row_sp * iop[None, 3:]
            sums[n] = sums.get(n, np.zeros(3)) + pts.sum(0)
            counts[n] = counts.get(n, 0) + int(rows.size)
    return {n: tuple(float(v) for v in sums[n] / counts[n]) for n in sums}  # type: ignore[misc]


def findings_from_objects(sr: Dataset, seg: Dataset | None, type_labels: dict[str, int] | None = None
                          ) -> list[PriorFinding]:
    """A prior's findings as its SR and SEG state them (centres from the SEG's segments; a finding without a
    segment, or without a volume, is not carried: nothing to match it by). ``type_labels``: the model card's
    label value of each segmented property type code (a finding's label in the prior)."""
    groups = _sr_groups(sr)
    centres = segment_centres(seg) if seg is not None else {}
    types = {int(d.SegmentNumber): str(d.SegmentedPropertyTypeCodeSequence[0].CodeValue)
             for d in seg.SegmentSequence} if seg is not None else {}
    out = []
    for uid, g in groups.items():
        segment = g.get("segment")
        if segment is None or segment not in centres or g.get("volume") is None:
            continue
        ident = str(g.get("id", ""))
        anatomy = "diameter" not in g
        label = (type_labels or {}).get(types.get(segment, ""), 1)
        out.append(PriorFinding(uid, ident, label, "anatomy" if anatomy else "finding",
                                float(g["volume"]), g.get("diameter"), centres[segment]))
    return out


class PriorFinder:
    """Finds a study's prior (see the module docstring)."""

    def __init__(self, config: NodeConfig, db: Database, *, series_files: Any = None, job_result: Any = None,
                 verdicts: Any = None) -> None:
        self.config = config
        self.db = db
        db.ensure(SCHEMA)
        #: series UID -> its files in the node's store (those still on disk)
        self.series_files = series_files
        #: job id -> its JobResult (or None)
        self.job_result = job_result
        #: job id -> {finding number: (outcome, final volume)}
        self.verdicts = verdicts
        self._salt: str | None = None

    def salt(self) -> str:
        if self._salt is None:
            import secrets

            with self.db.tx() as c:
                c.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('followup_salt', ?)", (secrets.token_hex(16),))
            row = self.db.one("SELECT value FROM meta WHERE key = 'followup_salt'")
            assert row is not None
            self._salt = str(row[0])
        return self._salt

    def record(self, job_id: int, ds: Dataset, model: str, series_uid: str, time_point_order: int = 1) -> None:
        """Index a done job so that a later study of the patient finds it."""
        key = patient_key(ds, self.salt())
        if key is None:
            return
        with self.db.tx() as c:
            c.execute("INSERT OR REPLACE INTO followup_index (job_id, patient_key, model, study_uid, study_date, "
                      "series_uid, time_point_order, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                      (job_id, key, model, str(ds.get("StudyInstanceUID", "")), study_date(ds), series_uid,
                       time_point_order, time.time()))

    def find(self, ds: Dataset, model: str, scratch: Path, type_labels: dict[str, int] | None = None
             ) -> Prior | None:
        """The prior of the study ``ds`` belongs to (a header of its series), or None when there is none.

        Raises:
            DeliveryError: the PACS could not be asked or did not send what it listed.
        """
        date = study_date(ds)
        if not date:
            return None
        local = self._local(ds, model, date)
        if local is not None and not local.image_files:
            src = self._source()
            if src is None:
                local.notes.append("the prior's images are no longer in the node's store and no [followup] "
                                   "fetch_from is set")
                return local
            local.image_files = self._get(src, local.study_uid, local.series_uid, scratch / "prior-images")
            local.source = f"node (images from {src.name})"
        if local is not None:
            return local
        src = self._source()
        return self._from_pacs(src, ds, model, date, scratch, type_labels) if src is not None else None

    def _source(self) -> Destination | None:
        name = self.config.followup.fetch_from
        return next((d for d in self.config.destinations if d.name == name), None) if name else None

    def _earliest(self, date: str) -> str:
        when = datetime.strptime(date, "%Y%m%d") - timedelta(days=self.config.followup.max_days)
        return when.strftime("%Y%m%d")

    def _local(self, ds: Dataset, model: str, date: str) -> Prior | None:
        key = patient_key(ds, self.salt())
        if key is None:
            return None
        study = str(ds.get("StudyInstanceUID", ""))
        rows = self.db.query("SELECT * FROM followup_index WHERE patient_key = ? AND model = ? AND study_uid != ? "
                             "AND study_date < ? AND study_date >= ? ORDER BY study_date DESC, job_id DESC",
                             (key, model, study, date, self._earliest(date)))
        for row in rows:
            result: JobResult | None = self.job_result(int(row["job_id"])) if self.job_result else None
            if result is None:
                continue
            outcomes = self.verdicts(int(row["job_id"])) if self.verdicts else {}
            findings, rejected = [], 0
            for f in result.findings:
                if not f.tracking_uid:
                    continue
                outcome, final_volume = outcomes.get(f.number, ("", None))
                if outcome == "rejected":
                    rejected += 1
                    continue
                edited = outcome == "edited" and final_volume
                findings.append(PriorFinding(f.tracking_uid, f.tracking_id or f"{f.label_name} {f.number} (AI)",
                                             f.label, f.kind, float(final_volume if edited else f.volume_mm3),
                                             None if edited else f.diameter_3d_mm, f.centroid_mm,
                                             source="edited" if edited else "ai"))
            files = [p for p in (self.series_files(str(row["series_uid"])) if self.series_files else []) if p.is_file()]
            return Prior(str(row["study_uid"]), str(row["study_date"]), str(row["series_uid"]), findings, files,
                         "node", int(row["time_point_order"]), rejected, int(row["job_id"]))
        return None

    def _get(self, src: Destination, study_uid: str, series_uid: str, out: Path) -> list[Path]:
        from node.net.fetch import cget

        return cget(src, study_uid, series_uid, out, self.config.node.ae_title)

    def _from_pacs(self, src: Destination, ds: Dataset, model: str, date: str, scratch: Path,
                   type_labels: dict[str, int] | None) -> Prior | None:
        from node.net.fetch import cfind

        pid = str(ds.get("PatientID", "") or "")
        if not pid:
            return None
        calling = self.config.node.ae_title
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.PatientID = pid
        q.StudyDate = f"{self._earliest(date)}-{(datetime.strptime(date, '%Y%m%d') - timedelta(days=1)).strftime('%Y%m%d')}"
        q.StudyInstanceUID = ""
        studies = sorted(cfind(src, q, calling), key=lambda s: str(s.get("StudyDate", "")), reverse=True)
        prefix = f"AI SR UNVERIFIED - {model} "
        for study in studies:
            study_uid = str(study.StudyInstanceUID)
            if study_uid == str(ds.get("StudyInstanceUID", "")):
                continue
            sq = Dataset()
            sq.QueryRetrieveLevel = "SERIES"
            sq.StudyInstanceUID = study_uid
            sq.Modality = "SR"
            sq.SeriesInstanceUID = ""
            sq.SeriesDescription = ""
            ours = [s for s in cfind(src, sq, calling) if str(s.get("SeriesDescription", "")).startswith(prefix)]
            for series in ours:
                files = self._get(src, study_uid, str(series.SeriesInstanceUID), scratch / "prior-sr")
                srs = sorted((dcmread(p) for p in files), key=lambda d: str(d.get("ContentDate", "")) +
                             str(d.get("ContentTime", "")), reverse=True)
                for sr in srs:
                    found = self._prior_of_sr(src, sr, study_uid, str(study.get("StudyDate", "")), scratch,
                                              type_labels)
                    if found is not None:
                        return found
        return None

    def _prior_of_sr(self, src: Destination, sr: Dataset, study_uid: str, date: str, scratch: Path,
                     type_labels: dict[str, int] | None) -> Prior | None:
        seg_ref = image_series = None
        for study in sr.get("CurrentRequestedProcedureEvidenceSequence", []):
            for series in study.get("ReferencedSeriesSequence", []):
                classes = {str(r.ReferencedSOPClassUID) for r in series.get("ReferencedSOPSequence", [])}
                if classes & set(_SEG_CLASSES):
                    seg_ref = str(series.SeriesInstanceUID)
                elif image_series is None:
                    image_series = str(series.SeriesInstanceUID)
        if image_series is None:
            return None
        seg = None
        if seg_ref is not None:
            seg_files = self._get(src, study_uid, seg_ref, scratch / "prior-seg")
            seg = next((d for d in (dcmread(p) for p in seg_files) if str(d.SOPClassUID) in _SEG_CLASSES), None)
        findings = findings_from_objects(sr, seg, type_labels)
        images = self._get(src, study_uid, image_series, scratch / "prior-images")
        order = 1
        logger.info("follow-up: prior found in %s (study of %s, %d finding(s))", src.name, date, len(findings))
        return Prior(study_uid, date[:8], image_series, findings, images, src.name, order)

