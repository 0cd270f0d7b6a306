"""The radiologist, played by the tests: an edited SEG, a verified SR and a rejection note built from the
node's own results with highdicom and pydicom, as a viewer or a PACS would make them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid
from scipy import ndimage

__all__ = ["assessment_sr", "blob", "edited_seg", "rejection", "verified_sr"]


def blob(shape: tuple[int, int, int], centre: tuple[int, int, int], r: int) -> np.ndarray:
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2) <= r * r


def edited_seg(our_seg: Path, sources: list[Dataset], out: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """The radiologist's edit: first AI finding removed, second dilated, one new finding added."""
    ours = hd.seg.segread(our_seg)
    uids = [str(d.SOPInstanceUID) for d in sources]
    ai = np.asarray(ours.get_pixels_by_source_instance(source_sop_instance_uids=uids,
                                                       segment_numbers=ours.get_segment_numbers(),
                                                       assert_missing_frames_are_empty=True)).any(axis=-1)
    comp, n = ndimage.label(ai, structure=np.ones((3, 3, 3), bool))
    assert n >= 2, "the demo model should find at least two lesions in the small phantom"
    # the finding to enlarge: one with no other finding nearby (so that only it changes)
    grow = next(c for c in range(2, n + 1)
                if not (ndimage.binary_dilation(comp == c, iterations=4) & ai & (comp != c)).any())
    final = ai.copy()
    final[comp == 1] = False
    final |= ndimage.binary_dilation(comp == grow, iterations=2)
    free = np.argwhere(~ndimage.binary_dilation(ai, iterations=6))
    k, j, i = free[len(free) // 2]
    final |= blob(ai.shape, (int(k), int(j), int(i)), 3)
    desc = ours.get_segment_description(ours.get_segment_numbers()[0])
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=final.astype(np.uint8), segmentation_type="BINARY",
        segment_descriptions=[hd.seg.SegmentDescription(
            segment_number=1, segment_label="Lesion (edited)",
            segmented_property_category=desc.SegmentedPropertyCategoryCodeSequence[0],
            segmented_property_type=desc.SegmentedPropertyTypeCodeSequence[0],
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)],
        series_instance_uid=hd.UID(), series_number=300, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="Viewer", manufacturer_model_name="OHIF", software_versions="3", device_serial_number="1",
        content_creator_name="Doe^Jane")
    path = out / "edited_seg.dcm"
    seg.save_as(path)
    return path, ai, final


def verified_sr(our_sr: Path, out: Path, *, edit: Any = None, name: str = "verified_sr.dcm") -> Path:
    """The radiologist signs the AI's SR (its predecessor); ``edit(ds)`` changes its content first (deletes the
    findings, re-issues their tracking UIDs, as viewers do)."""
    ds = dcmread(our_sr)
    if edit is not None:
        edit(ds)
    ref = Dataset()
    ref.StudyInstanceUID = ds.StudyInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = ds.SeriesInstanceUID
    sop = Dataset()
    sop.ReferencedSOPClassUID = ds.SOPClassUID
    sop.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    series.ReferencedSOPSequence = DicomSequence([sop])
    ref.ReferencedSeriesSequence = DicomSequence([series])
    ds.PredecessorDocumentsSequence = DicomSequence([ref])
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.VerificationFlag = "VERIFIED"
    obs = Dataset()
    obs.VerifyingObserverName = "Doe^Jane"
    obs.VerifyingOrganization = "Radiology"
    obs.VerificationDateTime = "20261126120000"
    obs.VerifyingObserverIdentificationCodeSequence = DicomSequence([])
    ds.VerifyingObserverSequence = DicomSequence([obs])
    path = out / name
    ds.save_as(path)
    return path


def rejection(our_seg: Path, our_sr: Path, out: Path, *, title: tuple[str, str] = (
        "113001", "Rejected for Quality Reasons")) -> Path:
    seg, sr = dcmread(our_seg), dcmread(our_sr)
    ko = hd.ko.KeyObjectSelectionDocument(
        evidence=[seg, sr], content=hd.ko.KeyObjectSelection(
            document_title=hd.sr.CodedConcept(title[0], "DCM", title[1]),
            referenced_objects=[seg, sr]),
        series_instance_uid=hd.UID(), series_number=301, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="PACS", institution_name="Hospital", institutional_department_name="Radiology")
    path = out / f"rejection-{title[0]}.dcm"
    ko.save_as(path)
    return path


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def assessment_sr(our_sr: Path, out: Path, outcomes: dict[str | None, str], *, name: str = "assessment.dcm") -> Path:
    """An assessment of the AI result as an AI Result Assessment creator would write it: an SR citing the AI's SR,
    with one container per assessed finding (its Tracking UID and a coded assessment: "Accepted", "Modified",
    "Rejected"), or a coded assessment of the whole result (key None). Private codes: the node reads meanings."""
    ai = dcmread(our_sr)
    ds = Dataset()
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
               "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        if kw in ai:
            setattr(ds, kw, getattr(ai, kw))
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "SR", 402, 1
    ds.Manufacturer = "Assessment workstation"
    ds.ContentDate, ds.ContentTime = "20261205", "120000"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ref = Dataset()
    ref.StudyInstanceUID = ai.StudyInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = ai.SeriesInstanceUID
    sop = Dataset()
    sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID = ai.SOPClassUID, ai.SOPInstanceUID
    series.ReferencedSOPSequence = DicomSequence([sop])
    ref.ReferencedSeriesSequence = DicomSequence([series])
    ds.CurrentRequestedProcedureEvidenceSequence = DicomSequence([ref])
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = DicomSequence([_code("AIRA1", "99PREANNOT", "AI Result Assessment")])
    meaning = {"accepted": "Accepted", "edited": "Modified", "rejected": "Rejected"}

    def assessment(outcome: str) -> Dataset:
        item = Dataset()
        item.RelationshipType, item.ValueType = "CONTAINS", "CODE"
        item.ConceptNameCodeSequence = DicomSequence([_code("AIRA2", "99PREANNOT", "Assessment")])
        item.ConceptCodeSequence = DicomSequence([_code(f"AIRA-{outcome}", "99PREANNOT", meaning[outcome])])
        return item

    items = []
    for uid, outcome in outcomes.items():
        if uid is None:
            items.append(assessment(outcome))
            continue
        group = Dataset()
        group.RelationshipType, group.ValueType, group.ContinuityOfContent = "CONTAINS", "CONTAINER", "SEPARATE"
        group.ConceptNameCodeSequence = DicomSequence([_code("AIRA3", "99PREANNOT", "Assessed finding")])
        track = Dataset()
        track.RelationshipType, track.ValueType, track.UID = "CONTAINS", "UIDREF", uid
        track.ConceptNameCodeSequence = DicomSequence([_code("112040", "DCM", "Tracking Unique Identifier")])
        group.ContentSequence = DicomSequence([track, assessment(outcome)])
        items.append(group)
    ds.ContentSequence = DicomSequence(items)
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path = out / name
    ds.save_as(path, enforce_file_format=True)
    return path
