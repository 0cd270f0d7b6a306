"""The check every job's results pass before anything is sent: the numbers agree with the objects they describe.

A result object can be valid DICOM and wrong. Before a job's objects are written and queued, this module
reads them back as a receiving viewer would and checks:

- **one identity per finding**: each finding of the job has exactly one SEG segment with its tracking UID, and
  each segment is one of the job's findings; the SR reports (a measurement group with a volume) exactly the
  findings it lists (``[outputs] sr_max_findings``) and states how many others the SEG holds;
- **volumes**: each finding's volume in the SR equals the job's measure and the volume of its SEG segment
  computed from the SEG itself (its frames' pixels times pixel area times the slab each referenced source
  slice stands for), within :data:`VOLUME_TOLERANCE`;
- **nothing lost without a word**: every label value the model produced is reported, or left out with a
  stated reason, and each reason's count is in the SR;
- **no invalid value copied**: the patient and study attributes of every object respect their VR (a source's
  invalid value must not be copied; see ``imaging.volume.clean_copied``).

A failure is a :class:`ConsistencyError`: the job fails with the reasons, permanently (the same input gives
the same objects), and nothing is sent.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from node.errors import OutputError
from node.imaging.volume import COPIED, Volume, invalid_values
from node.inference.rois import ROI
from node.outputs.sr import unlisted_meaning

__all__ = ["VOLUME_TOLERANCE", "ConsistencyError", "SrFinding", "check_results", "seg_volumes", "sr_findings"]

#: largest relative difference between a finding's volumes (SR, SEG, job result); a one-voxel difference is
#: always tolerated (rounding of tiny findings)
VOLUME_TOLERANCE = 0.02

_SEG_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")


class ConsistencyError(OutputError):
    """The job's result objects disagree with each other or with the findings: nothing is sent."""

    permanent = True


@dataclass(frozen=True, slots=True)
class SrFinding:
    """What an SR states of one tracked finding."""

    tracking_uid: str
    tracking_id: str
    volume_mm3: float | None
    segment_number: int | None


def content_items(ds: Any) -> Iterator[Any]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from content_items(item)


def concept_code(item: Any, attr: str = "ConceptNameCodeSequence") -> str:
    seq = item.get(attr)
    return str(seq[0].CodeValue) if seq else ""


def sr_findings(sr: Dataset) -> dict[str, SrFinding]:
    """The findings an SR reports (groups with a region, a volume or a segment), by tracking UID (the volume and
    the segment from any of the finding's groups); not the groups stating classes or what was left out."""
    found: dict[str, dict[str, Any]] = {}
    for group in sr.get("ContentSequence", []):
        if concept_code(group) != "126010":  # Imaging Measurements
            continue
        for mg in group.get("ContentSequence", []):
            uid = ident = None
            volume = segment = None
            region = False
            for item in content_items(mg):
                region = region or item.ValueType in ("SCOORD", "SCOORD3D")
                code = concept_code(item)
                if item.ValueType == "UIDREF" and code == "112040":
                    uid = str(item.UID)
                elif item.ValueType == "TEXT" and code == "112039":
                    ident = str(item.TextValue)
                elif item.ValueType == "NUM" and code == "118565006":  # Volume
                    volume = float(item.MeasuredValueSequence[0].NumericValue)
                elif item.ValueType == "IMAGE" and item.get("ReferencedSOPSequence"):
                    ref = item.ReferencedSOPSequence[0]
                    if "ReferencedSegmentNumber" in ref:
                        segment = int(ref.ReferencedSegmentNumber[0] if ref["ReferencedSegmentNumber"].VM > 1
                                      else ref.ReferencedSegmentNumber)
            if uid is None or not (region or volume is not None or segment is not None):
                continue
            entry = found.setdefault(uid, {"id": ident or "", "volume": None, "segment": None})
            entry["volume"] = entry["volume"] if entry["volume"] is not None else volume
            entry["segment"] = entry["segment"] or segment
    return {u: SrFinding(u, e["id"], e["volume"], e["segment"]) for u, e in found.items()}


def seg_volumes(seg: Dataset, volume: Volume) -> dict[int, tuple[str, float]]:
    """Per segment number: its tracking UID and its volume (mm3) computed from the SEG's own frames on the source
    slices (pixels x pixel area x the slab each referenced slice stands for)."""
    uids = {int(d.SegmentNumber): str(d.get("TrackingUID", "")) for d in seg.SegmentSequence}
    slice_of: dict[tuple[str, int | None], int] = {}
    for k, ref in enumerate(volume.frames):
        slice_of[(str(volume.sources[ref.source].SOPInstanceUID), ref.frame)] = k
    widths = volume.slab_widths()
    sx, sy, _ = volume.spacing
    labelmap = str(seg.SOPClassUID) == _SEG_CLASSES[1]
    per_frame = _binary_frame_counts(seg) if not labelmap else None
    pixels = None
    if per_frame is None:
        pixels = seg.pixel_array
        if pixels.ndim == 2:
            pixels = pixels[None]
    out = dict.fromkeys(uids, 0.0)
    shared = seg.SharedFunctionalGroupsSequence[0] if seg.get("SharedFunctionalGroupsSequence") else Dataset()

    def group(fg: Dataset, keyword: str) -> Any:
        return fg.get(keyword) or shared.get(keyword)

    for n, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        src = group(fg, "DerivationImageSequence")[0].SourceImageSequence[0]
        frame = int(src.ReferencedFrameNumber) if "ReferencedFrameNumber" in src else None
        at = slice_of.get((str(src.ReferencedSOPInstanceUID), frame))
        if at is None:
            raise ConsistencyError(f"SEG frame {n + 1} references an image that is not in the series")
        if per_frame is not None:
            number = int(group(fg, "SegmentIdentificationSequence")[0].ReferencedSegmentNumber)
            out[number] += float(per_frame[n]) * sx * sy * float(widths[at])
        elif labelmap:
            assert pixels is not None
            counts = np.bincount(np.asarray(pixels[n]).ravel())
            for number in out:
                if number < len(counts):
                    out[number] += float(counts[number]) * sx * sy * float(widths[at])
        else:
            assert pixels is not None
            number = int(group(fg, "SegmentIdentificationSequence")[0].ReferencedSegmentNumber)
            out[number] += float(np.count_nonzero(pixels[n])) * sx * sy * float(widths[at])
    return {number: (uids[number], vol) for number, vol in out.items()}


def _binary_frame_counts(seg: Dataset) -> np.ndarray | None:
    """The set pixels of each frame of a BINARY SEG, counted on its packed bits (no decoded copy of thousands of
    frames); None when its frames are not byte-aligned or not native (then the caller decodes them)."""
    if str(seg.get("SegmentationType", "")) != "BINARY" or int(seg.get("BitsAllocated", 0)) != 1:
        return None
    if seg.file_meta.get("TransferSyntaxUID", "") not in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2"):
        return None
    per = int(seg.Rows) * int(seg.Columns)
    frames = int(seg.get("NumberOfFrames", 1))
    if per % 8:
        return None
    data = np.frombuffer(seg.PixelData, dtype=np.uint8)[: frames * per // 8]
    if data.size != frames * per // 8:
        return None
    rows = data.reshape(frames, per // 8)
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(rows).sum(axis=1, dtype=np.int64)
    return _POPCOUNT[rows].sum(axis=1, dtype=np.int64)


#: set bits of each byte value (numpy < 2 has no bitwise_count)
_POPCOUNT = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint8)


def _close(a: float, b: float, voxel: float) -> bool:
    return abs(a - b) <= max(VOLUME_TOLERANCE * max(abs(a), abs(b)), voxel * 1.01)


def check_results(volume: Volume, rois: list[ROI], made: Mapping[str, Dataset], *, produced: Mapping[int, int],
                  left_out: Mapping[int, Mapping[str, int]], not_reported: Mapping[str, int],
                  listed: list[ROI] | None = None, not_seen: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """The disagreements between the job's findings and its objects (module docstring); empty when consistent.
    ``listed``: the findings the SR lists (None: all of ``rois``); the SEG holds them all. ``not_seen``: tracking
    UIDs of a follow-up's prior findings not seen any more, which the SR states with no segment (each must be one
    of the SR's findings, where it lies within the series, and none of the job's)."""
    problems: list[str] = []
    by_uid = {r.tracking_uid: r for r in rois if r.tracking_uid}
    in_sr = by_uid if listed is None else {r.tracking_uid: r for r in listed if r.tracking_uid}
    if len(by_uid) != len(rois):
        problems.append("findings without a tracking UID, or two findings with the same one")
    sr = made.get("sr")
    seg = made.get("seg")
    sx, sy, _ = volume.spacing
    voxel = sx * sy * float(volume.slab_widths().max()) if volume.shape[0] else 0.0
    reported = sr_findings(sr) if sr is not None else {}
    if sr is not None:
        extra = sorted(set(reported) - set(in_sr) - set(not_seen))
        clash = sorted(set(not_seen) & set(by_uid))
        if clash:
            problems.append(f"{len(clash)} finding(s) are both found and said not seen ({clash[0]}, ...)")
        for uid in not_seen:
            f = reported.get(uid)
            if f is not None and f.segment_number is not None:
                problems.append(f"a prior finding not seen any more ({uid}) points to a segment")
        if extra:
            problems.append(f"the SR reports {len(extra)} finding(s) that are not the job's listed findings "
                            f"({extra[0]}, ...)")
        for uid, r in in_sr.items():
            f = reported.get(uid)
            if f is None:
                problems.append(f"finding {r.index} ({r.label_name}) is not in the SR")
            elif f.volume_mm3 is not None and not _close(f.volume_mm3, r.volume_mm3, voxel):
                problems.append(f"finding {r.index}: the SR states {f.volume_mm3:.1f} mm3, the job measured "
                                f"{r.volume_mm3:.1f} mm3")
        text = " ".join(str(e.value) for e in sr.iterall() if e.keyword == "CodeMeaning")
        for reason, n in not_reported.items():
            if f"{n} not reported" not in text:
                problems.append(f"{n} finding(s) left out ({reason}) are not stated in the SR")
        unlisted = len(by_uid) - len(in_sr)
        if unlisted and unlisted_meaning(unlisted) not in text:
            problems.append(f"{unlisted} finding(s) in the SEG only are not stated in the SR")
    if seg is not None:
        segments = seg_volumes(seg, volume)
        seg_uids = {uid: number for number, (uid, _v) in segments.items()}
        if len(seg_uids) != len(segments):
            problems.append("SEG segments without a tracking UID, or two with the same one")
        for uid, r in by_uid.items():
            number = seg_uids.get(uid)
            if number is None:
                problems.append(f"finding {r.index} ({r.label_name}) has no SEG segment with its tracking UID")
                continue
            seg_volume = segments[number][1]
            if not _close(seg_volume, r.volume_mm3, voxel):
                problems.append(f"finding {r.index}: its SEG segment holds {seg_volume:.1f} mm3 on the source slices, "
                                f"the job measured {r.volume_mm3:.1f} mm3")
            f = reported.get(uid)
            if f is not None and f.segment_number is not None and f.segment_number != number:
                problems.append(f"finding {r.index}: the SR points to segment {f.segment_number}, its segment is "
                                f"{number}")
        orphan = sorted(set(seg_uids) - set(by_uid))
        if orphan:
            problems.append(f"the SEG has {len(orphan)} segment(s) that are not the job's findings")
    reported_labels = {r.label for r in rois}
    for value, amount in produced.items():
        if amount and value not in reported_labels and not left_out.get(value):
            problems.append(f"the model produced label value {value}, which is neither reported nor stated as left out")
    for name, ds in made.items():
        bad = invalid_values(ds, COPIED)
        if bad:
            problems.append(f"the {name.upper()} holds values that break their VR: {', '.join(bad)}")
    return problems
