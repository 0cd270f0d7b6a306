"""DICOM SEG (binary) of the ROIs of one job, placed exactly over the source images.

One segment per label that has at least one ROI; frames reference the source instances (and frames,
for multi-frame sources) and share their Frame of Reference. Empty frames are omitted.
"""

from __future__ import annotations

import logging

import highdicom as hd
import numpy as np

from node.errors import OutputError
from node.imaging.volume import Volume
from node.inference.registry import CodeSpec, ModelCard
from node.outputs.equipment import Provenance, new_uid

__all__ = ["build_seg", "coded"]

logger = logging.getLogger(__name__)


def coded(spec: CodeSpec) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(spec.code, spec.scheme, spec.meaning)


def build_seg(volume: Volume, labels: np.ndarray, card: ModelCard, provenance: Provenance, *,
              series_number: int, label_values: list[int] | None = None) -> hd.seg.Segmentation:
    """Build the SEG.

    Args:
        volume: the source volume (its sources and frame references place the frames).
        labels: ``[k, j, i]`` label map after ROI filtering (0 = background).
        card: the model card (segment codes, colours).
        provenance: model and node identification.
        series_number: the configured SEG series number.
        label_values: labels to include (default: those present in ``labels``).

    Raises:
        OutputError: no label to encode, or highdicom refused the object.
    """
    present = sorted(int(v) for v in np.unique(labels) if v) if label_values is None else label_values
    specs = [card.label(v) for v in present]
    if not present or any(s is None for s in specs):
        raise OutputError(f"labels {present} are not all described in the model card")
    descriptions = []
    for n, spec in enumerate(specs, start=1):
        assert spec is not None
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=n, segment_label=spec.name[:64],
            segmented_property_category=coded(spec.category), segmented_property_type=coded(spec.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=provenance.algorithm(),
            anatomic_regions=[coded(spec.finding_site)] if spec.finding_site else None,
            tracking_uid=new_uid(provenance.uid_root), tracking_id=f"{spec.name} (AI, unverified)"[:64],
            display_color=hd.color.CIELabColor.from_rgb(*spec.color),
        ))
    # frames in source order: single-frame sources are in slice order; multi-frame sources by frame number
    multiframe = volume.frames[0].frame is not None
    labelmap = card.outputs.seg_type == "labelmap"
    if multiframe and labelmap:
        raise OutputError("a label map SEG over multi-frame sources is not supported; use seg_type = \"binary\"")
    if multiframe:
        if len(volume.sources) != 1:
            raise OutputError("a SEG over several multi-frame source images is not supported")
        nframes = int(volume.sources[0].NumberOfFrames)
        arr = np.zeros((nframes, *labels.shape[1:], len(present)), dtype=bool)
        for k, ref in enumerate(volume.frames):
            for s, v in enumerate(present):
                arr[ref.frame - 1, :, :, s] = labels[k] == v  # type: ignore[operator]
        sources = volume.sources
    else:
        sources = [volume.sources[f.source] for f in volume.frames]
        if labelmap:  # one plane, segment numbers as values
            if present == list(range(1, len(present) + 1)) and int(labels.max()) <= len(present):
                arr = labels
            else:
                lut = np.zeros(256, dtype=np.uint8)
                lut[present] = np.arange(1, len(present) + 1, dtype=np.uint8)
                arr = lut[labels]
        elif present == list(range(1, len(present) + 1)) and int(labels.max()) <= len(present):
            # label values are already the segment numbers: highdicom takes the label map as is (no copy)
            arr = labels
        else:
            arr = np.stack([labels == v for v in present], axis=-1)
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
