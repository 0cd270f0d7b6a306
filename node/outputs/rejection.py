"""The IHE IOCM rejection note: a Key Object Selection that withdraws earlier result objects.

When a series is reprocessed (an operator's ``reprocess``, or late instances that open a new version),
the new SEG + SR replace the earlier ones of the same model. Where the earlier objects were delivered,
the node sends a rejection note (document title from CID 7011, "Rejected for Quality Reasons" by
default) that cites them, in the same study: an IOCM-aware PACS hides or deletes them, and any viewer
that shows the KOS tells the radiologist that they were withdrawn and by what.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes

from node.errors import OutputError
from node.outputs.equipment import Provenance, new_uid

__all__ = ["REJECTION_TITLES", "Withdrawn", "build_rejection_note"]

#: document titles of a rejection note (CID 7011 Rejected for Quality Reasons and its siblings)
REJECTION_TITLES = {
    "quality": codes.DCM.RejectedForQualityReasons,
    "patient-safety": codes.DCM.RejectedForPatientSafetyReasons,
}

#: the patient and study attributes a rejection note shares with the objects it cites
_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "IssuerOfPatientID",
                  "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                  "ReferringPhysicianName", "StudyDescription", "SpecificCharacterSet")


@dataclass(frozen=True, slots=True)
class Withdrawn:
    """An earlier result object to withdraw (its series UID may be empty for rows of older databases:
    it is then read from the file)."""

    sop_uid: str
    sop_class: str
    series_uid: str
    path: str


def _evidence(obj: Withdrawn, source: Dataset) -> Dataset:
    """The cited object as highdicom needs it: its identifiers plus the patient and study of the source."""
    series_uid = obj.series_uid
    if not series_uid:
        try:
            series_uid = str(dcmread(Path(obj.path), stop_before_pixels=True).SeriesInstanceUID)
        except (OSError, InvalidDicomError, AttributeError) as exc:
            raise OutputError(f"cannot cite {obj.sop_uid} in a rejection note: its series is unknown and its file "
                              f"is not readable ({exc})") from exc
    ds = Dataset()
    for kw in _PATIENT_STUDY:
        if kw in source:
            setattr(ds, kw, source.data_element(kw).value)  # type: ignore[union-attr]
    ds.SOPClassUID = obj.sop_class
    ds.SOPInstanceUID = obj.sop_uid
    ds.SeriesInstanceUID = series_uid
    return ds


def build_rejection_note(withdrawn: Sequence[Withdrawn], source: Dataset, provenance: Provenance, *,
                         series_number: int, reason: str = "quality", replaced_by: str = "") -> Dataset:
    """A KOS rejection note citing ``withdrawn`` (all in ``source``'s study).

    Args:
        withdrawn: the earlier SEG, SR... to withdraw (duplicates are cited once).
        source: an instance of the source series (patient and study attributes).
        provenance: the node and model signing the note.
        series_number: the note's series number.
        reason: a key of :data:`REJECTION_TITLES`.
        replaced_by: a short text naming what replaces them (put in the note's description).

    Raises:
        OutputError: nothing to cite, an unknown reason, or highdicom refused the document.
    """
    unique = list({w.sop_uid: w for w in withdrawn}.values())
    if not unique:
        raise OutputError("a rejection note needs at least one object to withdraw")
    if reason not in REJECTION_TITLES:
        raise OutputError(f"unknown rejection reason {reason!r}; expected one of {', '.join(REJECTION_TITLES)}")
    refs = [_evidence(w, source) for w in unique]
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=provenance.device_uid or new_uid(provenance.uid_root),
                                                       name="preannot", model_name=provenance.model.name[:64])
    description = (f"AI pre-annotation by {provenance.model.name} {provenance.model.version} withdrawn: "
                   f"superseded{' by ' + replaced_by if replaced_by else ''}")[:1024]
    try:
        content = hd.ko.KeyObjectSelection(
            document_title=REJECTION_TITLES[reason], referenced_objects=refs,
            observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device,
                                                          observer_identifying_attributes=device),
            description=description)
        kos = hd.ko.KeyObjectSelectionDocument(
            evidence=refs, content=content, series_instance_uid=new_uid(provenance.uid_root),
            series_number=series_number, sop_instance_uid=new_uid(provenance.uid_root), instance_number=1,
            manufacturer=provenance.manufacturer, institution_name=provenance.institution_name)
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"highdicom refused the rejection note: {exc}") from exc
    kos.SeriesDescription = provenance.series_description("REJECTED")
    provenance.stamp(kos)
    return kos
