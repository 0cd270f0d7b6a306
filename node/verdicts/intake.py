"""Verdict intake: SEG, SR and KO objects that come back for a study the node sent results for.

The PACS routes them to the node by C-STORE (a routing rule on workstation objects, see deploy/) like
any other series; the assembler hands every stable series made only of SEG/SR/KO objects of such a
study here instead of to a model (:meth:`VerdictIntake.is_candidate`). Each object is matched to the
AI result it judges and classified finding by finding:

- **SEG** (edited or new, for the same source series): the final segmentation; each AI finding is
  accepted, edited or rejected, and final findings with no AI counterpart are added (``judge.py``).
  Matched per label when its segments carry the AI segments' property types, as one mask otherwise.
- **SR** with VerificationFlag VERIFIED citing the node's SR (predecessor, identical or evidence): the
  findings whose tracking UIDs it keeps are accepted, the others rejected; new tracking UIDs are added.
- **KO** rejecting the node's SEG or SR for a clinical reason (CID 7011 document titles 113001 quality,
  113037 patient safety): every finding rejected. An administrative withdrawal (113038 incorrect modality
  worklist entry, 113039 data retention policy expired: a PACS purging old studies) is not a judgement: not
  recorded, said why.

The node's own objects coming back (its SEG, SR and rejection notes) are recognised by SOP Instance UID
and ignored. An object recorded once is not recorded again (idempotent on re-send).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread
from scipy import ndimage

from node.config import VerdictsConfig
from node.errors import PreannotError
from node.store.jobs import Job, JobStore
from node.store.series import SeriesInfo, SeriesStore
from node.verdicts.judge import FindingVerdict, Judgement, judge_regions, study_verdict
from node.verdicts.regions import AIRegions, Grid, Region, read_seg
from node.verdicts.store import VerdictRecord, VerdictStore, hash_observer

__all__ = ["REJECTION_TITLES", "WITHDRAWAL_TITLES", "VerdictBodyError", "VerdictIntake", "http_verdict", "scanner_key"]

logger = logging.getLogger(__name__)

SEG_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")
KO_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
#: KOS document titles that reject instances for a clinical reason (CID 7011): a verdict on the AI result
REJECTION_TITLES = {"113001": "Rejected for Quality Reasons", "113037": "Rejected for Patient Safety Reasons"}
#: KOS document titles that withdraw instances for an administrative reason: no judgement of the AI result
WITHDRAWAL_TITLES = {"113038": "Incorrect Modality Worklist Entry", "113039": "Data Retention Policy Expired"}


def scanner_key(attrs: dict[str, Any]) -> str:
    """The source series' scanner as one string: manufacturer and model | kernel | slice thickness."""
    kernel = attrs.get("ConvolutionKernel", "")
    kernel = "\\".join(kernel) if isinstance(kernel, list) else str(kernel)
    maker = f"{attrs.get('Manufacturer', '?')} {attrs.get('ManufacturerModelName', '')}".strip()
    thick = attrs.get("SliceThickness")
    return f"{maker} | {kernel or '?'} | {thick if thick is not None else '?'} mm"


def _referenced_uids(ds: Dataset, keywords: tuple[str, ...]) -> set[str]:
    """Every ReferencedSOPInstanceUID under the given top-level sequences (any depth)."""
    out: set[str] = set()

    def walk(items: Any) -> None:
        for item in items or []:
            uid = item.get("ReferencedSOPInstanceUID")
            if uid:
                out.add(str(uid))
            for elem in item:
                if elem.VR == "SQ":
                    walk(elem.value)

    for kw in keywords:
        walk(ds.get(kw))
    return out


def _tracking_uids(ds: Dataset) -> list[str]:
    """Tracking unique identifiers (code 112040) of an SR's content tree, in order of first appearance."""
    seen: dict[str, None] = {}

    def walk(items: Any) -> None:
        for item in items or []:
            name = item.get("ConceptNameCodeSequence")
            if item.get("ValueType") == "UIDREF" and name and name[0].CodeValue == "112040":
                seen.setdefault(str(item.UID), None)
            walk(item.get("ContentSequence"))

    walk(ds.get("ContentSequence"))
    return list(seen)


def _tracking_ids(ds: Dataset) -> dict[str, str]:
    """Tracking UID -> Tracking Identifier (code 112039) of each measurement group of an SR that has both."""
    out: dict[str, str] = {}

    def walk(items: Any) -> None:
        for item in items or []:
            children = item.get("ContentSequence") or []
            uid = name = None
            for c in children:
                code = c.get("ConceptNameCodeSequence")
                code = code[0].CodeValue if code else ""
                if code == "112040" and c.get("ValueType") == "UIDREF":
                    uid = str(c.UID)
                elif code == "112039" and c.get("ValueType") == "TEXT":
                    name = str(c.TextValue)
            if uid and name:
                out[uid] = name
            walk(children)

    walk(ds.get("ContentSequence"))
    return out


def _has_findings(ds: Dataset) -> bool:
    """Whether an SR holds any measurement group (TID 1500's "Imaging Measurements" with content)."""
    def walk(items: Any) -> bool:
        for item in items or []:
            code = item.get("ConceptNameCodeSequence")
            if code and code[0].CodeValue in ("125007", "125008") and item.get("ContentSequence"):
                return True
            if walk(item.get("ContentSequence")):
                return True
        return False
    return walk(ds.get("ContentSequence"))


#: words of an assessment's coded value (its code meaning), checked in this order: a rejection first ("disagree"
#: holds "agree"), then a modification, then an acceptance
_ASSESSMENT_WORDS = (("rejected", ("reject", "disagree", "false positive", "not confirmed", "refute", "incorrect")),
                     ("edited", ("modif", "edit", "adjust", "revis", "amend")),
                     ("accepted", ("accept", "agree", "confirm", "true positive", "approve")))


def _assessment_outcome(item: Dataset) -> str | None:
    """accepted / edited / rejected from a CODE content item whose concept or value speaks of an assessment."""
    if item.get("ValueType") != "CODE" or not item.get("ConceptCodeSequence"):
        return None
    name = item.get("ConceptNameCodeSequence")
    concept = str(name[0].CodeMeaning).lower() if name else ""
    value = str(item.ConceptCodeSequence[0].CodeMeaning).lower()
    if not any(w in concept for w in ("assess", "verdict", "review", "agreement", "decision")):
        return None
    for outcome, words in _ASSESSMENT_WORDS:
        if any(w in value for w in words):
            return outcome
    return None


def _assessments(ds: Dataset) -> dict[str | None, str] | None:
    """The assessments an SR states (IHE AI Result Assessment): tracking UID of the AI finding -> outcome, and
    ``None`` -> outcome for an assessment of the whole result; None when the SR states no assessment.

    Read wherever they sit in the content tree: a container holding a Tracking UID (112040) and a coded
    assessment (a CODE item whose concept name speaks of an assessment, review, verdict or decision, and whose
    value's meaning says accept / agree / confirm, modify / edit / adjust, or reject / disagree / false positive)
    assesses that finding; a coded assessment outside any such container assesses the whole result."""
    found: dict[str | None, str] = {}

    def walk(items: Any) -> None:
        for item in items or []:
            children = item.get("ContentSequence") or []
            uid = next((str(c.UID) for c in children if c.get("ValueType") == "UIDREF"
                        and c.get("ConceptNameCodeSequence") and c.ConceptNameCodeSequence[0].CodeValue == "112040"),
                       None)
            outcome = next((o for c in children if (o := _assessment_outcome(c)) is not None), None)
            if uid is not None and outcome is not None:
                found[uid] = outcome
            elif outcome is not None:
                found.setdefault(None, outcome)
            walk(children)

    walk([ds])  # the document's root container first
    return found or None


class VerdictIntake:
    def __init__(self, config: VerdictsConfig, series: SeriesStore, jobs: JobStore, verdicts: VerdictStore) -> None:
        self.config = config
        self.series = series
        self.jobs = jobs
        self.verdicts = verdicts
        self._salt = verdicts.observer_salt()

    # --- which series -------------------------------------------------------------------------------

    def is_candidate(self, info: SeriesInfo) -> bool:
        """SEG / SR / KO objects of a study the node has a finished result for."""
        if not self.config.enabled:
            return False
        sop = str(info.attrs.get("SOPClassUID", ""))
        if not (sop in SEG_CLASSES or sop.startswith(SR_PREFIX)):
            return False
        return self.jobs.study_has_result(info.study_uid)

    # --- examining ----------------------------------------------------------------------------------

    def examine(self, series_uid: str) -> list[str]:
        """Judge every object of the series; one line per object saying what was recorded."""
        lines = []
        for path in self.series.files(series_uid):
            try:
                lines.extend(self.examine_file(path))
            except Exception as exc:  # one bad object never stops the others, nor the assembler
                logger.warning("verdict object %s not judged: %s: %s", path.name, type(exc).__name__, exc)
                lines.append(f"{path.name}: not judged ({type(exc).__name__}: {exc})")
                self._not_judged(path, series_uid, f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError)
                                 else str(exc))
        return lines

    def _not_judged(self, path: Path, series_uid: str, reason: str) -> None:
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "SOPClassUID",
                                                                       "StudyInstanceUID"])
            uid, sop, study = str(ds.SOPInstanceUID), str(ds.get("SOPClassUID", "")), str(ds.get("StudyInstanceUID", ""))
        except Exception:  # unreadable: kept under its file name
            uid, sop, study = f"file:{path.name}", "", ""
        self.verdicts.record_not_judged(object_uid=uid, reason=reason, sop_class=sop, series_uid=series_uid,
                                        study_uid=study)

    def examine_file(self, path: Path, *, received_at: float | None = None) -> list[str]:
        ds = dcmread(path)
        uid = str(ds.SOPInstanceUID)
        if self.jobs.made_object(uid):
            return [f"{uid}: one of the node's own objects, ignored"]
        sop = str(ds.SOPClassUID)
        received = received_at if received_at is not None else time.time()
        if sop in SEG_CLASSES:
            return [self._record(job, "seg", ds, path, judgement, received)
                    for job, judgement in self._judge_seg(ds)]
        if sop == KO_CLASS:
            return [self._record(job, "ko", ds, path, judgement, received) for job, judgement in self._judge_ko(ds)]
        if sop.startswith(SR_PREFIX):
            assessed = _assessments(ds)
            if assessed is not None:  # an explicit assessment of the AI result (IHE AIRA): the most direct route
                return [self._record(job, "assessment", ds, path, judgement, received)
                        for job, judgement in self._judge_assessment(ds, assessed)]
            return [self._record(job, "sr", ds, path, judgement, received) for job, judgement in self._judge_sr(ds)]
        return [f"{uid}: SOP class {sop} is not a verdict object"]

    def _record(self, job: Job, source: str, ds: Dataset, path: Path, judgement: Judgement, received: float) -> str:
        model = job.result.model if job.result else {}
        info = self.series.find(job.series_uid)
        rec = VerdictRecord(
            job_id=job.id, source=source, object_uid=str(ds.SOPInstanceUID), study_uid=str(ds.StudyInstanceUID),
            series_uid=job.series_uid, model=job.model, model_version=str(model.get("version", "")),
            judgement=judgement, observer=self._observer(ds, source), object_path=str(path), received_at=received,
            time_to_verdict_s=None if job.finished_at is None else round(received - job.finished_at, 1),
            scanner=scanner_key(info.attrs if info else {}), detail={"sop_class": str(ds.SOPClassUID)})
        vid, new = self.verdicts.record(rec)
        counts = judgement.counts()
        what = (f"job {job.id}: {source.upper()} verdict {judgement.study_verdict} "
                f"({counts['accepted']} accepted, {counts['edited']} edited, {counts['rejected']} rejected, "
                f"{counts['added']} added)")
        if new:
            logger.info("verdict %d recorded: %s", vid, what)
            return f"{ds.SOPInstanceUID}: {what}"
        return f"{ds.SOPInstanceUID}: already recorded as verdict {vid} (re-sent)"

    def _observer(self, ds: Dataset, source: str) -> str | None:
        name = None
        if source == "sr" and ds.get("VerifyingObserverSequence"):
            name = str(ds.VerifyingObserverSequence[0].get("VerifyingObserverName", "") or "")
        if not name:
            name = str(ds.get("ContentCreatorName", "") or "")
        return hash_observer(name, self._salt) if name else None

    # --- SEG ----------------------------------------------------------------------------------------

    def _judge_seg(self, ds: Dataset) -> Iterator[tuple[Job, Judgement]]:
        refs = {str(s.SeriesInstanceUID) for s in ds.get("ReferencedSeriesSequence", [])}
        derived = _referenced_uids(ds, ("ReferencedSeriesSequence", "PerFrameFunctionalGroupsSequence"))
        jobs = {j.id: j for j in self.jobs.done_jobs_that_sent(derived)}  # derived from the node's SEG
        for j in self.jobs.latest_done_jobs(refs):
            jobs.setdefault(j.id, j)
        if not jobs:
            raise ValueError("the SEG references no series the node has a result for")
        for job in jobs.values():
            yield job, self._seg_against_job(ds, job)

    def _seg_against_job(self, final_ds: Dataset, job: Job) -> Judgement:
        ai = self._ai_regions(job)
        final = read_seg(final_ds, ai.grid)  # GeometryError: elsewhere than the source images, not judged
        return judge_regions(ai, final, accept_dice=self.config.accept_dice)

    def _ai_regions(self, job: Job) -> AIRegions:
        """The AI findings' regions kept with the job; for a job of an earlier release, read from its SEG."""
        blob = self.jobs.regions(job.id)
        if blob is not None:
            return AIRegions.from_bytes(blob)
        result = job.result
        if result is None:
            raise ValueError(f"job {job.id} has no stored result")
        ours_path = result.files.get("seg")
        if not ours_path or not Path(ours_path).is_file():
            raise ValueError(f"job {job.id} kept no regions of its findings (an earlier release) and its SEG is no "
                             "longer on disk (retention): the edit cannot be compared")
        files = self.series.files(job.series_uid)
        if not files:
            raise ValueError(f"job {job.id} kept no regions of its findings (an earlier release) and its source "
                             "series is no longer in the spool (retention)")
        from node.imaging.volume import load_series

        grid = Grid.of_volume(load_series(files))
        ours = read_seg(dcmread(ours_path), grid)
        regions = []
        for n in ours.numbers:  # one segment's full mask at a time
            mask = ours.mask([n])
            box = ndimage.find_objects(mask.astype(np.uint8))[0]
            if box is None:
                continue
            seg = ours.segments.get(n)
            regions.append(Region(n, int(next((f.label for f in result.findings if f.number == n), 1)),
                                  seg.tracking_uid if seg else None, tuple(b.start for b in box),  # type: ignore[arg-type]
                                  mask[box].copy(), seg.type_code if seg else ""))
        return AIRegions(grid, regions)

    # --- SR and KO ----------------------------------------------------------------------------------

    def _findings_of(self, job: Job, outcome: str) -> list[FindingVerdict]:
        findings = job.result.findings if job.result else ()
        return [FindingVerdict(f.number, f.label, outcome, dice=1.0 if outcome == "accepted" else 0.0,
                               ai_volume_mm3=f.volume_mm3) for f in findings]

    def _judge_sr(self, ds: Dataset) -> Iterator[tuple[Job, Judgement]]:
        if str(ds.get("VerificationFlag", "")).upper() != "VERIFIED":
            raise ValueError("the SR is not VERIFIED: not a verdict (a draft or another AI's report)")
        cited = _referenced_uids(ds, ("PredecessorDocumentsSequence", "IdenticalDocumentsSequence",
                                      "CurrentRequestedProcedureEvidenceSequence"))
        jobs = self.jobs.done_jobs_that_sent(cited)
        if not jobs:
            raise ValueError("the verified SR cites none of the node's SRs")
        kept = set(_tracking_uids(ds))
        for job in jobs:
            stored = job.result.findings if job.result else ()
            ours = [f.tracking_uid for f in stored if f.tracking_uid]
            if len(ours) != len(stored):  # results of an earlier release: the UIDs are read from the SR sent
                ours_path = job.result.files.get("sr") if job.result else None
                ours = _tracking_uids(dcmread(ours_path)) if ours_path and Path(ours_path).is_file() else []
            findings: list[FindingVerdict] = []
            if ours and kept & set(ours):  # finding by finding, through the tracking UIDs the viewer kept
                for n, f in enumerate(stored, start=1):
                    uid = ours[n - 1] if n - 1 < len(ours) else None
                    outcome = "accepted" if uid in kept else "rejected"
                    findings.append(FindingVerdict(f.number, f.label, outcome,
                                                   dice=1.0 if outcome == "accepted" else 0.0,
                                                   ai_volume_mm3=f.volume_mm3))
                findings += [FindingVerdict(None, 0, "added") for _ in kept - set(ours)]
            elif not kept and not _has_findings(ds):  # verified with every AI finding removed
                findings = self._findings_of(job, "rejected")
            elif kept and ours:  # findings with other tracking UIDs: the viewer re-issued them; matched by identifier
                ids = _tracking_ids(ds)
                names = {f.tracking_id for f in stored if getattr(f, "tracking_id", "")}
                if not names & set(ids.values()):
                    raise ValueError("the verified SR keeps none of the AI findings' tracking UIDs or identifiers: "
                                     "which findings it judges cannot be told")
                kept_names = set(ids.values())
                findings = [FindingVerdict(f.number, f.label, "accepted" if f.tracking_id in kept_names else "rejected",
                                           dice=1.0 if f.tracking_id in kept_names else 0.0,
                                           ai_volume_mm3=f.volume_mm3) for f in stored]
                findings += [FindingVerdict(None, 0, "added") for u, name in ids.items() if name not in names]
            else:  # the document verified as a whole (no finding of its own: the AI's report signed as it is)
                findings = self._findings_of(job, "accepted")
            j = Judgement(findings, "", None)
            j.study_verdict = study_verdict(j.counts())
            yield job, j

    def _judge_assessment(self, ds: Dataset, assessed: dict[str | None, str]) -> Iterator[tuple[Job, Judgement]]:
        cited = _referenced_uids(ds, ("PredecessorDocumentsSequence", "IdenticalDocumentsSequence",
                                      "CurrentRequestedProcedureEvidenceSequence", "ContentSequence"))
        jobs = self.jobs.done_jobs_that_sent(cited)
        if not jobs:
            raise ValueError("the assessment references none of the node's SEGs or SRs")
        for job in jobs:
            stored = job.result.findings if job.result else ()
            by_uid = {f.tracking_uid: f for f in stored if f.tracking_uid}
            whole = assessed.get(None)
            per_finding = {u: o for u, o in assessed.items() if u is not None}
            unknown = [u for u in per_finding if u not in by_uid]
            if unknown and not whole and len(unknown) == len(per_finding):
                raise ValueError(f"the assessment's {len(unknown)} tracking UID(s) are none of job {job.id}'s findings")
            findings: list[FindingVerdict] = []
            for f in stored:
                outcome = per_finding.get(f.tracking_uid or "", whole)
                if outcome is None:
                    continue  # not assessed: nothing said about it
                findings.append(FindingVerdict(f.number, f.label, outcome, dice=1.0 if outcome == "accepted" else
                                               None if outcome == "edited" else 0.0, ai_volume_mm3=f.volume_mm3,
                                               note="assessed"))
            if not findings:
                raise ValueError(f"the assessment assesses none of job {job.id}'s findings")
            j = Judgement(findings, "", None)
            j.study_verdict = study_verdict(j.counts())
            yield job, j

    def _judge_ko(self, ds: Dataset) -> Iterator[tuple[Job, Judgement]]:
        title = ds.get("ConceptNameCodeSequence")
        code = str(title[0].CodeValue) if title else ""
        if code in WITHDRAWAL_TITLES:
            raise ValueError(f"the KO withdraws objects for an administrative reason ({code} "
                             f"{WITHDRAWAL_TITLES[code]}), not a judgement of the AI result")
        if code not in REJECTION_TITLES:
            raise ValueError(f"the KO's title ({code or 'none'}) is not a rejection")
        cited = _referenced_uids(ds, ("CurrentRequestedProcedureEvidenceSequence",))
        jobs = self.jobs.done_jobs_that_sent(cited)
        if not jobs:
            raise ValueError("the rejection note cites none of the node's objects")
        for job in jobs:
            j = Judgement(self._findings_of(job, "rejected"), "rejected", None)
            for f in j.findings:
                f.note = REJECTION_TITLES[code]
            yield job, j


class VerdictBodyError(PreannotError):
    """A verdict stated over HTTP that does not judge the job's findings each once."""

    http_status = 422


def http_verdict(intake: VerdictIntake, job: Job, body: dict[str, Any], *, actor: str) -> tuple[int, bool]:
    """Record a verdict given over HTTP for a done job: the listed findings with their outcome, plus
    ``added`` missed findings. The object UID is a digest of the job and the body: the same statement
    posted twice is recorded once."""
    import hashlib

    from node.errors import ConflictError

    if job.state != "done" or job.result is None:
        raise ConflictError(f"job {job.id} is {job.state}: only a done job's result can be judged")
    rois = {f.number: f for f in job.result.findings}
    info = intake.series.find(job.series_uid)
    listed = [f["finding"] for f in body.get("findings", [])]
    unknown = [n for n in listed if n not in rois]
    if unknown:
        raise ConflictError(f"job {job.id} has no finding {unknown[0]} (it has {len(rois)})")
    repeated = sorted({n for n in listed if listed.count(n) > 1})
    if repeated:
        raise VerdictBodyError(f"finding(s) {', '.join(map(str, repeated))} listed more than once")
    missing = sorted(set(rois) - set(listed))
    if missing and listed:
        raise VerdictBodyError(f"job {job.id} has {len(rois)} finding(s); the verdict must state each once (missing: "
                               f"{', '.join(map(str, missing))})")
    if not listed and rois:
        raise VerdictBodyError(f"job {job.id} has {len(rois)} finding(s); the verdict states none")
    stated = body.get("class_value")
    ai_class = job.result.classes[0] if job.result.classes else None
    if stated is not None and ai_class is None:
        raise VerdictBodyError(f"job {job.id} made no classification: class_value does not apply")
    if ai_class is not None and stated is None:
        raise VerdictBodyError(f"job {job.id} is a classification ({ai_class.concept}): state the class (class_value: "
                               f"one of {', '.join(ai_class.probabilities)})")
    if ai_class is not None and stated not in ai_class.probabilities:
        raise VerdictBodyError(f"class {stated!r} is not one of model {job.model}'s classes "
                               f"({', '.join(ai_class.probabilities)})")
    if not listed and not body.get("added") and stated is None:
        raise VerdictBodyError("an empty verdict: no finding judged, none added")
    findings = []
    for f in body.get("findings", []):
        if f["finding"] not in rois:
            raise ConflictError(f"job {job.id} has no finding {f['finding']} (it has {len(rois)})")
        r = rois[f["finding"]]
        findings.append(FindingVerdict(f["finding"], r.label, f["outcome"], ai_volume_mm3=r.volume_mm3,
                                       note=f.get("note")))
    findings += [FindingVerdict(None, 0, "added") for _ in range(int(body.get("added", 0)))]
    detail: dict[str, Any] = {}
    if ai_class is not None:  # the class: accepted as the model gave it, or changed by the radiologist
        same = stated == ai_class.value
        findings.append(FindingVerdict(None, ai_class.label, "accepted" if same else "edited",
                                       dice=1.0 if same else 0.0,
                                       note=None if same else f"{ai_class.concept}: {ai_class.value} -> {stated}"))
        detail = {"concept": ai_class.concept, "ai_class": ai_class.value, "reference_class": stated}
    j = Judgement(findings, "", None)
    j.study_verdict = study_verdict(j.counts())
    digest = hashlib.sha256(json.dumps({"job": job.id, **body}, sort_keys=True).encode()).hexdigest()[:32]
    now = time.time()
    rec = VerdictRecord(job_id=job.id, source="http", object_uid=f"http:{digest}",
                        study_uid=info.study_uid if info else "", series_uid=job.series_uid, model=job.model,
                        model_version=str(job.result.model.get("version", "")), judgement=j,
                        observer=f"{body.get('observer_role', 'radiologist')} via token {actor}", received_at=now,
                        time_to_verdict_s=None if job.finished_at is None else round(now - job.finished_at, 1),
                        scanner=scanner_key(info.attrs if info else {}), detail=detail)
    return intake.verdicts.record(rec)
