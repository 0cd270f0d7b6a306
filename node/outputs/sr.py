"""DICOM Comprehensive 3D SR, TID 1500 Measurement Report, for the ROIs of one job (IHE AI Results).

Per ROI, sharing one tracking identifier and UID:
1. a volumetric group (TID 1411) referencing the ROI's segment in the SEG: volume and 3D diameter;
2. a planar group (TID 1410) with the outline on the key slice (largest in-plane area) as a SCOORD
   POLYLINE (closed) on the source image: long axis, area and volume, so viewers that draw SR regions (OHIF)
   show the finding with its measurements;
3. a planar group with the long axis on the key slice as a 2-point SCOORD POLYLINE: its length;
4. a planar group whose region is the ROI's centroid in patient coordinates (SCOORD3D POINT in the
   source's Frame of Reference), geometric purpose "Center".

The report lists the findings it is given (the pipeline gives the first ``[outputs] sr_max_findings``, the
SEG keeps every finding) and states how many others the SEG holds. Organs (anatomy) get groups 1 and 2 with
their volume; a detector's box gets its rectangle (2) and
centre (4); over ``COMPACT_ABOVE`` ROIs each keeps groups 1 and 2 only. The document's evidence is
written here, not by highdicom's document constructor (which copies and searches the whole content).

Observer: the node as a device. CompletionFlag PARTIAL, VerificationFlag UNVERIFIED. What is not reported,
and a study without any finding, are stated in the Qualitative Evaluations container (see ``build_sr``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes

from node.errors import OutputError
from node.imaging.volume import Volume
from node.inference.prediction import ClassStatement
from node.inference.registry import ModelCard
from node.inference.rois import NOT_REPORTED, ROI, describe
from node.outputs.equipment import Provenance, new_uid
from node.outputs.seg import coded

if TYPE_CHECKING:
    from node.followup.track import Change, FollowUp

__all__ = ["CHANGE", "UNLISTED_CODE", "build_sr", "unlisted_meaning"]

logger = logging.getLogger(__name__)

LONG_AXIS = hd.sr.CodedConcept("103339001", "SCT", "Long Axis")
CENTER = hd.sr.CodedConcept("111010", "DCM", "Center")
#: the model's confidence in a finding, in [0, 1]: for a detector, its score for the box (the probability
#: the detector assigns to the box holding a finding of that type, before any radiologist review). No
#: standard code names an AI confidence in TID 1500, so a local one is used and documented (docs/models.md).
CONFIDENCE = hd.sr.CodedConcept("CONF", "99PREANNOT", "AI confidence score")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
#: the local code of each reason a finding is not reported (docs/outputs.md)
_NOTREP_CODES = {"below_min_confidence": "NOTREP-CONF", "over_max_findings": "NOTREP-CAP",
                 "below_min_volume": "NOTREP-VOL", "between_slices": "NOTREP-GAP", "not_in_card": "NOTREP-CARD"}
#: the local code stating how many findings the report does not list (they are in the SEG)
UNLISTED_CODE = "NOTLISTED"


def unlisted_meaning(n: int) -> str:
    """The statement of ``n`` findings in the SEG that the SR does not list."""
    return f"{n} more finding(s) in the SEG only, not listed here"[:64]


#: above this many ROIs in one report, each gets two groups (volume; outline with long axis and area), not four
COMPACT_ABOVE = 25


def _source_image(volume: Volume, k: int) -> hd.sr.SourceImageForRegion:
    ref = volume.frames[k]
    ds = volume.sources[ref.source]
    return hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=ds.SOPClassUID, referenced_sop_instance_uid=ds.SOPInstanceUID,
        referenced_frame_numbers=[ref.frame] if ref.frame is not None else None)


def build_sr(volume: Volume, rois: list[ROI], card: ModelCard, provenance: Provenance, *,
             seg: hd.seg.Segmentation | None, series_number: int,
             not_reported: dict[str, int] | None = None,
             statements: list[ClassStatement] | None = None,
             inputs: Iterable[Dataset] = (), unlisted: int = 0,
             followup: FollowUp | None = None) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 measurement report.

    ``not_reported``: findings the route left out, by reason (``below_min_confidence``,
    ``over_max_findings``): stated in a group of their own, so the reader knows the list is capped.
    ``statements``: a classifier's classes, each a group with the coded class as a qualitative
    evaluation and the probability of every class (see :func:`_statement_group`).
    ``inputs``: the other series a study-level model read (headers): evidence the model used, listed with the
    reference series' instances in the Current Requested Procedure Evidence.
    ``unlisted``: findings of the job that are in the SEG but not listed here (over ``[outputs] sr_max_findings``),
    stated in the Qualitative Evaluations container.
    ``followup``: the job's follow-up (:mod:`node.followup`): each group carries the time point (TID 1502), each
    tracked finding its change since the prior (:func:`_change_items`), each prior finding not seen any more a
    point where it was expected, and the Qualitative Evaluations container the study's summary.

    Raises:
        OutputError: highdicom refused the content.
    """
    try:
        device = hd.sr.DeviceObserverIdentifyingAttributes(
            uid=provenance.device_uid or new_uid(provenance.uid_root), name="preannot",
            manufacturer_name=provenance.manufacturer, model_name=provenance.model.name[:64],
            serial_number=provenance.device_serial_number)
        context = hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device,
                                                          observer_identifying_attributes=device))
        groups: list = []
        describe([r for r in rois if not r.described], volume)  # outlines and axes, where not measured yet
        # each finding's own segment, by the identity they share (the tracking UID)
        segment_of = {str(d.TrackingUID): int(d.SegmentNumber) for d in seg.SegmentSequence
                      if "TrackingUID" in d} if seg is not None else {}
        algo = provenance.sr_algorithm()
        # many findings (a noisy model): each keeps its volume group and its outline with long axis and area,
        # not the separate long-axis line and centre point, so that the report stays quick to build and read
        compact = len(rois) > COMPACT_ABOVE
        # a follow-up: the time point of every group, each tracked finding's change (by the job's finding number)
        tracked = followup is not None and followup.not_matched is None
        when = _time_point(followup) if followup is not None else None
        changes = followup.of_number() if tracked and followup is not None else {}
        days = followup.days if followup is not None else 0.0
        # a label's codes and the measurement concepts are the same for each of its findings: made once
        per_label: dict[int, tuple[Any, Any, Any]] = {}
        src_of: dict[int, hd.sr.SourceImageForRegion] = {}
        for_uid = str(volume.sources[0].get("FrameOfReferenceUID", ""))
        for roi in rois:
            found = card.label(roi.label)
            if found is None:
                raise OutputError(f"label {roi.label} is not described in the model card")
            spec = found
            if roi.label not in per_label:
                per_label[roi.label] = (coded(spec.type), coded(spec.category),
                                        [hd.sr.FindingSite(anatomic_location=coded(spec.finding_site))]
                                        if spec.finding_site else None)
            finding, category, sites = per_label[roi.label]
            anatomy = roi.kind == "anatomy"  # a whole organ: its volume, not a finding's measures
            if roi.tracking_uid is None:  # one identity per finding: the pipeline gives it; made here otherwise
                roi.tracking_uid = new_uid(provenance.uid_root)
            tracking = hd.sr.TrackingIdentifier(uid=roi.tracking_uid, identifier=roi.identifier())
            volume_m = hd.sr.Measurement(name=codes.SCT.Volume, value=float(roi.volume_mm3),
                                         unit=codes.UCUM.CubicMillimeter)
            diam3d = hd.sr.Measurement(name=codes.SCT.Diameter, value=float(roi.diameter_3d_mm),
                                       unit=codes.UCUM.Millimeter)
            long_axis = hd.sr.Measurement(name=LONG_AXIS, value=float(roi.diameter_inplane_mm),
                                          unit=codes.UCUM.Millimeter)
            confidence = ([hd.sr.Measurement(name=CONFIDENCE, value=float(roi.confidence), unit=NO_UNITS)]
                          if roi.confidence is not None else [])
            change = changes.get(roi.index)
            change_m, change_q = _change_items(change, days) if change is not None else ([], None)
            if seg is not None and roi.tracking_uid in segment_of:
                ref_seg = hd.sr.ReferencedSegment(
                    sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                    segment_number=segment_of[roi.tracking_uid],
                    source_series=hd.sr.SourceSeriesForSegmentation(volume.series_uid))
                groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking, referenced_segment=ref_seg, finding_type=finding,
                    finding_category=category, algorithm_id=algo, finding_sites=sites, time_point_context=when,
                    measurements=([volume_m] if anatomy else [volume_m, diam3d]) + change_m,
                    qualitative_evaluations=change_q))
            src = src_of.get(roi.key_slice)
            if src is None:
                src = src_of[roi.key_slice] = _source_image(volume, roi.key_slice)
            sx, sy, _ = volume.spacing
            outline = np.array(roi.key_outline_ij, dtype=np.float64) + 0.5  # SCOORD: pixel centre at +0.5
            if len(outline) >= 4:
                area = float(np.count_nonzero(roi.mask[roi.key_slice - roi.offset[0]])) * sx * sy \
                    if roi.mask is not None else 0.0
                if roi.kind == "box" and roi.size_mm is not None:
                    area = roi.size_mm[0] * roi.size_mm[1]
                groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    referenced_region=hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                                                        graphic_data=outline, source_image=src),
                    finding_type=finding, finding_category=category, finding_sites=sites, algorithm_id=algo,
                    time_point_context=when,
                    measurements=[volume_m if anatomy else long_axis,
                                  hd.sr.Measurement(name=codes.SCT.Area, value=round(area, 2),
                                                    unit=codes.UCUM.SquareMillimeter), *confidence]))
            if anatomy:  # an organ: its volume and its outline where it is largest (viewers draw SR regions
                continue  # only with image coordinates), not a finding's long axis and centre
            axis = np.array(roi.key_axis_ij, dtype=np.float64) + 0.5
            if compact:
                continue
            if roi.kind != "box" and not np.allclose(axis[0], axis[1]):  # a box's outline says it all
                groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    referenced_region=hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                                                        graphic_data=axis, source_image=src),
                    finding_type=finding, finding_category=category, algorithm_id=algo, time_point_context=when,
                    measurements=[long_axis]))
            if for_uid:
                groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    referenced_region=hd.sr.ImageRegion3D(graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                                                          graphic_data=np.array([roi.centroid_mm], dtype=np.float64),
                                                          frame_of_reference_uid=for_uid),
                    geometric_purpose=CENTER, finding_type=finding, finding_category=category,
                    algorithm_id=algo, time_point_context=when))
        # what the report does not list, and a study without any finding, are stated in the document's Qualitative
        # Evaluations container (TID 1500), not in measurement groups: OHIF 3.13 throws on a measurement group
        # that references no image region, and takes the whole viewport down with it
        qualitative: list[Any] = []
        for reason, n in (not_reported or {}).items():
            why = NOT_REPORTED.get(reason, reason.replace("_", " "))
            qualitative.append(hd.sr.CodeContentItem(
                name=hd.sr.CodedConcept("121071", "DCM", "Finding"),
                value=hd.sr.CodedConcept(_NOTREP_CODES.get(reason, "NOTREP"), "99PREANNOT",
                                         f"{n} not reported: {why}"[:64]),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
        if unlisted:
            qualitative.append(hd.sr.CodeContentItem(
                name=hd.sr.CodedConcept("121071", "DCM", "Finding"),
                value=hd.sr.CodedConcept(UNLISTED_CODE, "99PREANNOT", unlisted_meaning(unlisted)),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
        if followup is not None:
            qualitative.append(hd.sr.TextContentItem(
                name=hd.sr.CodedConcept("121106", "DCM", "Comment"), value=followup.summary()[:1024],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
            if tracked:
                for gone in followup.not_seen():
                    group = _not_seen_group(gone, volume, card, algo, when)
                    if group is not None:
                        groups.append(group)
                    else:
                        qualitative.append(hd.sr.TextContentItem(
                            name=hd.sr.CodedConcept("121106", "DCM", "Comment"),
                            value=f"{gone.tracking_id}: not seen; it was outside this series' field of view"[:1024],
                            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
        for statement in statements or []:
            groups.append(_statement_group(statement, volume, provenance, algo))
        if not rois and not statements:
            qualitative.append(hd.sr.CodeContentItem(
                name=hd.sr.CodedConcept("121071", "DCM", "Finding"),
                value=hd.sr.CodedConcept("373572006", "SCT", "Clinical finding absent"),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
            qualitative.append(hd.sr.TextContentItem(
                name=hd.sr.CodedConcept("121106", "DCM", "Comment"),
                value=f"AI: no region of interest found by {provenance.model.name} {provenance.model.version}"[:1024],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
        def measurement_report(items: list) -> hd.sr.MeasurementReport:
            return hd.sr.MeasurementReport(
                observation_context=context,
                procedure_reported=hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure"),
                imaging_measurements=items, title=codes.DCM.ImagingMeasurementReport)

        placeholder = hd.sr.MeasurementsAndQualitativeEvaluations(  # highdicom wants one group; dropped below
            tracking_identifier=hd.sr.TrackingIdentifier(uid=new_uid(provenance.uid_root), identifier="AI"),
            algorithm_id=algo)
        report = measurement_report(groups or [placeholder])
        if not groups:  # no measurement at all: the Qualitative Evaluations container says why (TID 1500 allows it)
            report[0].ContentSequence = Sequence([item for item in report[0].ContentSequence
                                                 if item.ConceptNameCodeSequence[0].CodeValue != "126010"])
        if qualitative:  # TID 1500 row 12: Qualitative Evaluations, after the imaging measurements
            container = hd.sr.ContainerContentItem(
                name=hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations"),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
            container.ContentSequence = Sequence(qualitative)
            report[0].ContentSequence.append(container)
        evidence = list(volume.sources)
        if seg is not None:
            evidence.append(seg)
        # highdicom's document constructor copies the whole content tree, re-parses it and searches it for
        # references: three quarters of the time with many findings (1,000 findings: 16 of 22 s). The
        # document is made around the first group only, then given the full content and its evidence,
        # split as highdicom splits it (referenced instances: current evidence; the others: pertinent).
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence, content=measurement_report(groups[:1] or [placeholder]),
            series_instance_uid=new_uid(provenance.uid_root),
            series_number=series_number, sop_instance_uid=new_uid(provenance.uid_root), instance_number=1,
            manufacturer=provenance.manufacturer, is_complete=False, is_final=False, is_verified=False,
            institution_name=provenance.institution_name,
            series_description=provenance.series_description("SR"))
        sr.ContentSequence = report[0].ContentSequence
        read = list(inputs)
        _set_evidence(sr, [*evidence, *read], _referenced_uids(report[0]) | {str(ds.SOPInstanceUID) for ds in read})
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"highdicom refused the SR: {type(exc).__name__}: {exc}") from exc
    provenance.stamp(sr)
    return sr


#: a tracked finding's change since the prior (local codes: no standard code states an AI's change; docs/followup.md)
CHANGE = hd.sr.CodedConcept("CHANGE", "99PREANNOT", "Change since prior")
CHANGE_VALUES = {"new": ("NEW", "New since prior"), "grown": ("GROWN", "Grown since prior"),
                 "shrunk": ("SHRUNK", "Shrunk since prior"), "stable": ("STABLE", "Stable since prior"),
                 "not seen": ("NOTSEEN", "Not seen at this time point")}
PRIOR_VOLUME = hd.sr.CodedConcept("PRIORVOL", "99PREANNOT", "Volume at prior time point")
VOLUME_CHANGE = hd.sr.CodedConcept("VOLCHG", "99PREANNOT", "Volume change since prior")
VOLUME_CHANGE_PCT = hd.sr.CodedConcept("VOLCHGPCT", "99PREANNOT", "Volume change since prior (%)")
PRIOR_DIAMETER = hd.sr.CodedConcept("PRIORDIAM", "99PREANNOT", "Diameter at prior time point")
DOUBLING_TIME = hd.sr.CodedConcept("VDT", "99PREANNOT", "Volume doubling time")
PERCENT = hd.sr.CodedConcept("%", "UCUM", "percent")
DAYS = hd.sr.CodedConcept("d", "UCUM", "day")


def _time_point(followup: FollowUp) -> hd.sr.TimePointContext:
    """TID 1502 for this study: its date and its order among the patient's time points (the prior's + 1)."""
    d = followup.study_date
    label = f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 else (d or "follow-up")
    return hd.sr.TimePointContext(time_point=label, time_point_order=followup.time_point_order)


def _change_items(change: Change, days: float) -> tuple[list[hd.sr.Measurement], list[hd.sr.QualitativeEvaluation]]:
    """A tracked finding's change as measurements and a qualitative evaluation of its group."""
    code, meaning = CHANGE_VALUES[change.status]
    q = [hd.sr.QualitativeEvaluation(name=CHANGE, value=hd.sr.CodedConcept(code, "99PREANNOT", meaning))]
    m: list[hd.sr.Measurement] = []
    if change.prior_volume_mm3 is not None:
        m.append(hd.sr.Measurement(name=PRIOR_VOLUME, value=round(change.prior_volume_mm3, 2),
                                   unit=codes.UCUM.CubicMillimeter))
    if change.volume_change_mm3 is not None:
        m.append(hd.sr.Measurement(name=VOLUME_CHANGE, value=round(change.volume_change_mm3, 2),
                                   unit=codes.UCUM.CubicMillimeter))
    if change.volume_change_pct is not None:
        m.append(hd.sr.Measurement(name=VOLUME_CHANGE_PCT, value=round(change.volume_change_pct, 2), unit=PERCENT))
    if change.prior_diameter_mm is not None:
        m.append(hd.sr.Measurement(name=PRIOR_DIAMETER, value=round(change.prior_diameter_mm, 2),
                                   unit=codes.UCUM.Millimeter))
    vdt = change.doubling_time_days(days)
    if vdt is not None and change.kind == "finding":
        m.append(hd.sr.Measurement(name=DOUBLING_TIME, value=round(vdt, 1), unit=DAYS))
    return m, q


def _not_seen_group(change: Change, volume: Volume, card: ModelCard, algo: hd.sr.AlgorithmIdentification,
                    when: hd.sr.TimePointContext | None) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | None:
    """A prior finding not seen any more: a point where the alignment puts it on this series' nearest slice, with
    its prior volume and "Not seen at this time point" (None: it lies outside the series)."""
    if change.expected_mm is None:
        return None
    ijk = np.linalg.solve(volume.affine[:3, :3], np.asarray(change.expected_mm) - volume.affine[:3, 3])
    i, j, k = (float(v) for v in ijk)
    nk, nj, ni = volume.shape
    if not (-0.5 <= k <= nk - 0.5 and 0 <= i <= ni - 1 and 0 <= j <= nj - 1):
        return None
    spec = card.label(change.label)
    finding = coded(spec.type) if spec is not None else None
    category = coded(spec.category) if spec is not None else None
    code, meaning = CHANGE_VALUES["not seen"]
    measurements = []
    if change.prior_volume_mm3 is not None:
        measurements.append(hd.sr.Measurement(name=PRIOR_VOLUME, value=round(change.prior_volume_mm3, 2),
                                              unit=codes.UCUM.CubicMillimeter))
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=change.tracking_uid, identifier=change.tracking_id[:64]),
        referenced_region=hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POINT,
                                            graphic_data=np.array([[i + 0.5, j + 0.5]]),
                                            source_image=_source_image(volume, round(min(max(k, 0), nk - 1)))),
        finding_type=finding, finding_category=category, algorithm_id=algo, time_point_context=when,
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            name=CHANGE, value=hd.sr.CodedConcept(code, "99PREANNOT", meaning))])


def _statement_group(st: ClassStatement, volume: Volume, provenance: Provenance,
                     algo: hd.sr.AlgorithmIdentification) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A classifier's statement as a TID 1501 group: the class as a qualitative evaluation ("Breast
    composition" = "Extremely dense"), the probability of each class as a measurement (a local code per
    class, documented in docs/outputs.md: no standard code names an AI class probability), the algorithm,
    and the image it is about when the series holds several images."""
    concept = hd.sr.CodedConcept(st.concept.code, st.concept.scheme, st.concept.meaning)
    value = hd.sr.CodedConcept(st.value.code, st.value.scheme, st.value.meaning)
    probabilities = [hd.sr.Measurement(
        name=hd.sr.CodedConcept(f"PROB{label}", "99PREANNOT", f"AI probability: {name}"[:64]),
        value=round(float(p), 4), unit=NO_UNITS) for label, name, _code, p in st.probabilities]
    sources = None
    where = ""
    if st.image_index is not None:
        ref = volume.frames[st.image_index]
        ds = volume.sources[ref.source]
        sources = [hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=ds.SOPClassUID, referenced_sop_instance_uid=ds.SOPInstanceUID,
            referenced_frame_numbers=[ref.frame] if ref.frame is not None else None)]
        where = f" image {st.image_index + 1}"
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=new_uid(provenance.uid_root),
                                                     identifier=f"{st.concept.meaning}{where} (AI)"[:64]),
        algorithm_id=algo, qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=concept, value=value)],
        measurements=probabilities, source_images=sources)


def _referenced_uids(item: Any) -> set[str]:
    """SOP Instance UIDs referenced anywhere in a content tree (image regions, segments, ...)."""
    found: set[str] = set()
    stack = [item]
    while stack:
        it = stack.pop()
        for ref in it.get("ReferencedSOPSequence", []):
            found.add(str(ref.ReferencedSOPInstanceUID))
        stack.extend(it.get("ContentSequence", []))
    return found


def _references(datasets: list[Any]) -> list[Dataset]:
    """The Hierarchical SOP Instance Reference Macro for ``datasets``: study -> series -> instances."""
    tree: dict[str, dict[str, list[Any]]] = {}
    for ds in datasets:
        tree.setdefault(str(ds.StudyInstanceUID), {}).setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    studies = []
    for study_uid, series in tree.items():
        study = Dataset()
        study.StudyInstanceUID = study_uid
        study.ReferencedSeriesSequence = []
        for series_uid, members in series.items():
            se = Dataset()
            se.SeriesInstanceUID = series_uid
            se.ReferencedSOPSequence = []
            for ds in members:
                ref = Dataset()
                ref.ReferencedSOPClassUID = ds.SOPClassUID
                ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
                se.ReferencedSOPSequence.append(ref)
            study.ReferencedSeriesSequence.append(se)
        studies.append(study)
    return studies


def _set_evidence(sr: Any, evidence: list[Any], referenced: set[str]) -> None:
    known = {str(ds.SOPInstanceUID) for ds in evidence}
    missing = referenced - known
    if missing:
        raise ValueError(f"the SR references {len(missing)} instance(s) that are not in its evidence")
    current = [ds for ds in evidence if str(ds.SOPInstanceUID) in referenced]
    other = [ds for ds in evidence if str(ds.SOPInstanceUID) not in referenced]
    for kw in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        if kw in sr:
            del sr[kw]
    if current:
        sr.CurrentRequestedProcedureEvidenceSequence = _references(current)
    if other:
        sr.PertinentOtherEvidenceSequence = _references(other)
