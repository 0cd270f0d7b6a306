"""DICOM SEG of the ROIs of one job, placed exactly over the source images.

One segment per reported finding (a connected component, a box) or organ, carrying the finding's identity:
its tracking UID (the same as in the SR, the job's result and, later, its verdicts and follow-ups) and its
tracking identifier, e.g. "Nodule 2 (AI, unverified)". Frames reference the source instances (and frames,
for multi-frame sources) and share their Frame of Reference. Empty frames are omitted (binary SEG).
"""

from __future__ import annotations

import logging

import highdicom as hd
import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from node.errors import OutputError
from node.imaging.volume import Volume
from node.inference.registry import CodeSpec, LabelSpec, ModelCard
from node.inference.rois import ROI, paint_rois
from node.outputs.equipment import Provenance, new_uid

__all__ = ["build_seg", "coded", "segment_label"]

logger = logging.getLogger(__name__)


def coded(spec: CodeSpec) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(spec.code, spec.scheme, spec.meaning)


def _shared_orientation(sources: list[Dataset]) -> list[Dataset]:
    """The sources as highdicom must see them: one orientation for all. Real scanners write orientations that
    differ slice to slice by about 1e-8 (an oblique GE 3D T1: 32 distinct values); the volume reader accepts
    differences up to 1e-3 per direction cosine (``imaging.volume``) and the SEG states the first slice's.
    Header copies are changed, never the received files; the SEG still references each original instance."""
    first = [float(v) for v in sources[0].ImageOrientationPatient] if "ImageOrientationPatient" in sources[0] else None
    if first is None or all([float(v) for v in ds.get("ImageOrientationPatient", first)] == first for ds in sources):
        return sources
    out = []
    for ds in sources:
        copy = Dataset()
        copy.update(ds)  # a shallow copy of the header: its elements shared, its orientation replaced
        copy[0x00200037] = DataElement(0x00200037, "DS", list(sources[0].ImageOrientationPatient))  # a new element
        if hasattr(ds, "file_meta"):
            copy.file_meta = ds.file_meta
        out.append(copy)
    return out


def segment_label(roi: ROI, spec: LabelSpec) -> str:
    """A segment's label: "Nodule 2" for a finding or box, "Liver" for an organ."""
    return (spec.name if roi.kind == "anatomy" else f"{spec.name} {roi.index}")[:64]


def build_seg(volume: Volume, rois: list[ROI], card: ModelCard, provenance: Provenance, *,
              series_number: int) -> hd.seg.Segmentation:
    """Build the SEG, segment n being ``rois[n - 1]``.

    Args:
        volume: the source volume (its sources and frame references place the frames).
        rois: the reported findings, with their masks and tracking UIDs.
        card: the model card (segment codes, colours).
        provenance: model and node identification.
        series_number: the configured SEG series number.

    Raises:
        OutputError: no ROI to encode, a label the card does not describe, or highdicom refused the object.
    """
    if not rois:
        raise OutputError("a SEG needs at least one region")
    descriptions = []
    for n, roi in enumerate(rois, start=1):
        spec = card.label(roi.label)
        if spec is None:
            raise OutputError(f"label {roi.label} is not described in the model card")
        if roi.tracking_uid is None:  # one identity per finding: the pipeline gives it; made here otherwise
            roi.tracking_uid = new_uid(provenance.uid_root)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=n, segment_label=segment_label(roi, spec),
            segmented_property_category=coded(spec.category), segmented_property_type=coded(spec.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=provenance.algorithm(),
            anatomic_regions=[coded(spec.finding_site)] if spec.finding_site else None,
            tracking_uid=roi.tracking_uid,
            tracking_id=f"{segment_label(roi, spec)} (AI, unverified)"[:64],
            display_color=hd.color.CIELabColor.from_rgb(*spec.color),
        ))
    numbers = list(range(1, len(rois) + 1))
    labelmap = card.outputs.seg_type == "labelmap"
    if labelmap and len(rois) > 255:
        raise OutputError(f"a label map SEG holds at most 255 segments; {len(rois)} regions (use seg_type = \"binary\")")
    multiframe = volume.frames[0].frame is not None
    if multiframe and labelmap:
        raise OutputError("a label map SEG over multi-frame sources is not supported; use seg_type = \"binary\"")
    painted = paint_rois(rois, shape=volume.shape, values=numbers)  # segment numbers (regions never overlap)
    if multiframe:
        if len(volume.sources) != 1:
            raise OutputError("a SEG over several multi-frame source images is not supported")
        nframes = int(volume.sources[0].NumberOfFrames)
        arr = np.zeros((nframes, *painted.shape[1:]), dtype=painted.dtype)
        for k, ref in enumerate(volume.frames):
            arr[ref.frame - 1] = painted[k]  # type: ignore[operator]
        sources = volume.sources
    else:
        sources = _shared_orientation([volume.sources[f.source] for f in volume.frames])
        arr = painted
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=arr,
            segmentation_type=(hd.seg.SegmentationTypeValues.LABELMAP if labelmap
                               else hd.seg.SegmentationTypeValues.BINARY),
            segment_descriptions=descriptions,
            series_instance_uid=new_uid(provenance.uid_root),
            series_number=series_number,
            sop_instance_uid=new_uid(provenance.uid_root),
            instance_number=1,
            manufacturer=provenance.manufacturer,
            manufacturer_model_name=provenance.model.name[:64],
            software_versions=provenance.software_versions(),  # type: ignore[arg-type]  # LO, multi-valued
            device_serial_number=provenance.device_serial_number,
            institution_name=provenance.institution_name,
            series_description=provenance.series_description("SEG"),
            content_label="AI_UNVERIFIED",
            content_description="AI pre-annotation, not verified by a radiologist"[:64],
            content_creator_name=None,
            omit_empty_frames=not labelmap,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"highdicom refused the SEG: {exc}") from exc
    provenance.stamp(seg)
    return seg
