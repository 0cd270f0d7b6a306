"""What the node keeps to judge a verdict: the AI's own findings' regions on the source images, and a reader
that places any returned SEG on those images after checking it lies where they lie.

:class:`AIRegions` is made by the pipeline from the reported findings (each finding's mask, cropped to its
box, bit-packed and compressed: a few kB per job) and the geometry of the source images (SOP Instance UID and
frame of each slice, its position, the orientation, the frame of reference). The job store keeps it with the
job (``jobs.regions``) for as long as the job's row exists, independent of the output folder's retention, so a
radiologist's SEG can be judged also when the AI found nothing (no AI SEG was made) or its SEG file is gone.

:func:`read_seg` reads a returned SEG (binary, fractional or label map; highdicom's, OHIF's, any viewer's)
frame by frame with pydicom, and places each frame on a slice of that grid, by the source image the frame
references or, failing that, by its position. It refuses (:class:`GeometryError`, the reason named) a SEG in
another frame of reference, with another orientation or matrix, or a frame that lies more than half a voxel
away from the slice it claims to be on: such a SEG is not judged, never accepted.
"""

from __future__ import annotations

import io
import json
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue

__all__ = ["AIRegions", "FinalSegmentation", "GeometryError", "Grid", "Region", "read_seg"]

#: layout version of the stored blob
_VERSION = 1


class GeometryError(ValueError):
    """A returned SEG does not lie on the source images of the AI result: not judged."""


@dataclass
class Grid:
    """The source images of a result as slices ``k`` of one ``[k, j, i]`` grid."""

    frame_of_reference: str
    rows: int
    columns: int
    #: per slice k: (SOP Instance UID, frame number or None)
    slices: list[tuple[str, int | None]]
    #: per slice k: ImagePositionPatient (LPS mm), or None where unknown
    positions: list[tuple[float, float, float] | None]
    #: row direction, column direction (ImageOrientationPatient), or () where unknown
    orientation: tuple[float, ...] = ()
    #: (slice, row, column) spacing in mm
    spacing_kji: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.slices), self.rows, self.columns)

    @property
    def tolerance_mm(self) -> float:
        """How far a frame may lie from its slice: half the smallest voxel side (at least 0.05 mm)."""
        return max(0.05, 0.5 * min(self.spacing_kji))

    def to_dict(self) -> dict[str, Any]:
        return {"frame_of_reference": self.frame_of_reference, "rows": self.rows, "columns": self.columns,
                "slices": [list(s) for s in self.slices], "positions": [list(p) if p else None for p in self.positions],
                "orientation": list(self.orientation), "spacing_kji": list(self.spacing_kji)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Grid:
        return cls(frame_of_reference=d["frame_of_reference"], rows=int(d["rows"]), columns=int(d["columns"]),
                   slices=[(str(s[0]), None if s[1] is None else int(s[1])) for s in d["slices"]],
                   positions=[tuple(p) if p else None for p in d["positions"]],  # type: ignore[misc]
                   orientation=tuple(d.get("orientation") or ()), spacing_kji=tuple(d["spacing_kji"]))  # type: ignore[arg-type]

    @classmethod
    def of_volume(cls, volume: Any) -> Grid:
        """The grid of a :class:`node.imaging.volume.Volume` (its original slices)."""
        first = volume.sources[0]
        k = len(volume.frames)
        if volume.positions is not None and len(volume.positions) == k:
            pos = [tuple(float(x) for x in p) for p in volume.positions]
        else:
            pos = [tuple(float(x) for x in (volume.affine @ np.array([0.0, 0.0, n, 1.0]))[:3]) for n in range(k)]
        sx, sy, sz = volume.spacing
        orient = tuple(float(v) for v in first.get("ImageOrientationPatient") or ())
        if not orient and "SharedFunctionalGroupsSequence" in first:
            po = first.SharedFunctionalGroupsSequence[0].get("PlaneOrientationSequence")
            orient = tuple(float(v) for v in po[0].ImageOrientationPatient) if po else ()
        return cls(frame_of_reference=str(first.get("FrameOfReferenceUID", "")), rows=int(volume.shape[1]),
                   columns=int(volume.shape[2]),
                   slices=[(str(volume.sources[f.source].SOPInstanceUID), f.frame) for f in volume.frames],
                   positions=pos, orientation=orient,  # type: ignore[arg-type]
                   spacing_kji=(float(sz), float(sy), float(sx)))


@dataclass
class Region:
    """One AI finding: its number and identity, and its mask (cropped to its box at ``offset``)."""

    number: int
    label: int
    tracking_uid: str | None
    offset: tuple[int, int, int]
    mask: np.ndarray = field(repr=False)
    #: the segmented property type's code value (the SEG segment's), "" where unknown
    type_code: str = ""

    def paint(self, out: np.ndarray, value: bool | int = True) -> None:
        k0, j0, i0 = self.offset
        d, h, w = self.mask.shape
        out[k0:k0 + d, j0:j0 + h, i0:i0 + w][self.mask] = value


@dataclass
class AIRegions:
    """The AI result's findings on its source images (see the module doc)."""

    grid: Grid
    regions: list[Region]

    @classmethod
    def of_rois(cls, volume: Any, rois: list[Any], type_codes: dict[int, str] | None = None) -> AIRegions:
        """From the pipeline's reported findings (``type_codes``: label value -> property type code)."""
        codes = type_codes or {}
        regions = [Region(int(r.index), int(r.label), r.tracking_uid, tuple(int(x) for x in r.offset),  # type: ignore[arg-type]
                          np.asarray(r.mask, dtype=bool), codes.get(int(r.label), "")) for r in rois if r.mask is not None]
        return cls(Grid.of_volume(volume), regions)

    def to_bytes(self) -> bytes:
        meta = {"version": _VERSION, "grid": self.grid.to_dict(),
                "regions": [{"number": r.number, "label": r.label, "tracking_uid": r.tracking_uid,
                             "offset": list(r.offset), "shape": list(r.mask.shape), "type_code": r.type_code}
                            for r in self.regions]}
        head = json.dumps(meta).encode()
        bits = b"".join(np.packbits(r.mask.ravel()).tobytes() for r in self.regions)
        return zlib.compress(len(head).to_bytes(8, "little") + head + bits, 6)

    @classmethod
    def from_bytes(cls, blob: bytes) -> AIRegions:
        raw = zlib.decompress(blob)
        n = int.from_bytes(raw[:8], "little")
        meta = json.loads(raw[8:8 + n])
        if int(meta.get("version", 0)) != _VERSION:
            raise ValueError(f"stored AI regions of layout {meta.get('version')} cannot be read by this release")
        buf = io.BytesIO(raw[8 + n:])
        regions = []
        for r in meta["regions"]:
            shape = tuple(int(x) for x in r["shape"])
            size = int(np.prod(shape))
            mask = np.unpackbits(np.frombuffer(buf.read((size + 7) // 8), dtype=np.uint8), count=size)
            regions.append(Region(int(r["number"]), int(r["label"]), r.get("tracking_uid"),
                                  tuple(int(x) for x in r["offset"]), mask.reshape(shape).astype(bool),  # type: ignore[arg-type]
                                  str(r.get("type_code") or "")))
        return cls(Grid.from_dict(meta["grid"]), regions)

    def union(self) -> np.ndarray:
        out = np.zeros(self.grid.shape, dtype=bool)
        for r in self.regions:
            r.paint(out)
        return out


@dataclass
class FinalSegment:
    number: int
    label: str
    type_code: str
    tracking_uid: str | None


@dataclass
class FinalSegmentation:
    """A returned SEG placed on the AI result's grid: per segment number found in its frames, its 2D masks by slice
    ``k`` (sparse: a SEG of many segments over a large series never holds a full volume per segment)."""

    segments: dict[int, FinalSegment]
    #: segment number -> {slice k: [j, i] boolean mask}
    frames: dict[int, dict[int, np.ndarray]]
    shape: tuple[int, int, int]
    #: frames placed by position because they reference no source image of the grid
    placed_by_position: int = 0

    @property
    def numbers(self) -> list[int]:
        """The segment numbers that have content (frames may cite numbers the segment list lacks)."""
        return sorted(self.frames)

    def mask(self, numbers: list[int] | None = None) -> np.ndarray:
        """The union of the given segments (all when None) on the grid, ``[k, j, i]`` booleans."""
        out = np.zeros(self.shape, dtype=bool)
        for n in self.numbers if numbers is None else numbers:
            for k, m in self.frames.get(n, {}).items():
                out[k] |= m
        return out

def _seq_first(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _functional(frame_groups: Dataset | None, shared: Dataset | None, keyword: str) -> Dataset | None:
    """A functional group macro's first item: per-frame first, shared otherwise."""
    for fg in (frame_groups, shared):
        if fg is not None and keyword in fg and fg.get(keyword):
            return fg.get(keyword)[0]
    return None


def _source_refs(item: Dataset | None) -> list[tuple[str, int | None]]:
    """(SOP Instance UID, frame) of every source image in a Derivation Image item."""
    out: list[tuple[str, int | None]] = []
    for src in (item.get("SourceImageSequence") or []) if item is not None else []:
        uid = src.get("ReferencedSOPInstanceUID")
        if not uid:
            continue
        frames = src.get("ReferencedFrameNumber")
        values = list(frames) if isinstance(frames, MultiValue) else [] if frames in (None, "") else [frames]
        out.append((str(uid), int(values[0]) if values else None))
    return out


def _segments(ds: Dataset) -> dict[int, FinalSegment]:
    out = {}
    for item in ds.get("SegmentSequence") or []:
        n = int(item.SegmentNumber)
        typ = item.get("SegmentedPropertyTypeCodeSequence")
        uid = item.get("TrackingUID")
        out[n] = FinalSegment(n, str(item.get("SegmentLabel", "")), str(typ[0].CodeValue) if typ else "",
                              str(uid) if uid else None)
    return out


def _add(frames: dict[int, dict[int, np.ndarray]], number: int, k: int, mask: np.ndarray) -> None:
    if not mask.any():
        return
    per = frames.setdefault(number, {})
    per[k] = per[k] | mask if k in per else mask.astype(bool, copy=True)


def read_seg(ds: Dataset, grid: Grid) -> FinalSegmentation:
    """Place every frame of the SEG ``ds`` on ``grid`` (see the module doc); raises GeometryError."""
    if str(ds.get("Modality", "")) != "SEG":
        raise GeometryError(f"not a SEG (Modality {ds.get('Modality', 'none')})")
    for_uid = str(ds.get("FrameOfReferenceUID", "") or "")
    if grid.frame_of_reference and for_uid and for_uid != grid.frame_of_reference:
        raise GeometryError(f"the SEG is in frame of reference {for_uid}, the source images in "
                            f"{grid.frame_of_reference}")
    rows, cols = int(ds.Rows), int(ds.Columns)
    if (rows, cols) != (grid.rows, grid.columns):
        raise GeometryError(f"the SEG's frames are {rows} x {cols}, the source images {grid.rows} x {grid.columns}")
    shared = _seq_first(ds, "SharedFunctionalGroupsSequence")
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    orient_item = _functional(per_frame[0] if per_frame else None, shared, "PlaneOrientationSequence")
    if orient_item is not None and grid.orientation:
        seg_orient = np.array([float(v) for v in orient_item.ImageOrientationPatient])
        ours = np.array(grid.orientation)
        if np.abs(seg_orient - ours).max() > 1e-3:
            raise GeometryError(f"the SEG's orientation {seg_orient.round(4).tolist()} is not the source images' "
                                f"{ours.round(4).tolist()}")
    segments = _segments(ds)
    labelmap = str(ds.SOPClassUID) == "1.2.840.10008.5.1.4.1.1.66.7" or str(
        ds.get("SegmentationType", "")).upper() == "LABELMAP"
    pixels = ds.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.shape[0] != nframes:
        raise GeometryError(f"the SEG has {pixels.shape[0]} frames of pixels for NumberOfFrames {nframes}")
    index = {s: k for k, s in enumerate(grid.slices)}
    by_uid = {uid: k for k, (uid, frame) in enumerate(grid.slices) if frame is None}
    positions = np.array([p if p is not None else (np.nan, np.nan, np.nan) for p in grid.positions], dtype=float)
    tol = grid.tolerance_mm
    frames: dict[int, dict[int, np.ndarray]] = {}
    by_position = 0
    for f in range(nframes):
        fg = per_frame[f] if f < len(per_frame) else None
        refs = _source_refs(_functional(fg, shared, "DerivationImageSequence"))
        pos_item = _functional(fg, None, "PlanePositionSequence")
        ipp = np.array([float(v) for v in pos_item.ImagePositionPatient]) if pos_item is not None else None
        k = None
        for uid, frame in refs:
            k = index.get((uid, frame), by_uid.get(uid) if frame in (None, 1) else None)
            if k is not None:
                break
        if k is not None and ipp is not None and grid.positions[k] is not None:
            off = float(np.linalg.norm(ipp - positions[k]))
            if off > tol:
                raise GeometryError(f"frame {f + 1} of the SEG lies {off:.1f} mm from the source image it references "
                                    f"(slice {k + 1}; at most {tol:.2f} mm allowed)")
        if k is None:
            if ipp is None:
                raise GeometryError(f"frame {f + 1} of the SEG references no source image of the AI result and "
                                    "states no position")
            dist = np.linalg.norm(positions - ipp, axis=1)
            if np.all(np.isnan(dist)) or np.nanmin(dist) > tol:
                near = "" if np.all(np.isnan(dist)) else f" (nearest {np.nanmin(dist):.1f} mm away)"
                raise GeometryError(f"frame {f + 1} of the SEG lies on no slice of the source images{near}")
            k = int(np.nanargmin(dist))
            by_position += 1
        frame_px = pixels[f]
        if labelmap:
            for value in np.unique(frame_px):
                if value == 0:
                    continue
                _add(frames, int(value), k, frame_px == value)
        else:
            seg_item = _functional(fg, shared, "SegmentIdentificationSequence")
            number = int(seg_item.ReferencedSegmentNumber) if seg_item is not None else 1
            _add(frames, number, k, frame_px > 0)
    return FinalSegmentation(segments, frames, grid.shape, by_position)
