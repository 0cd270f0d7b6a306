"""Series -> 3D volume with its patient geometry.

Reads single-frame image series and enhanced multi-frame images (one or several files), sorts the
slices along the slice normal, checks the geometry and applies the rescale. Arrays are indexed
``[k, j, i]`` (slice, row, column). :attr:`Volume.affine` maps ``(i, j, k, 1)`` to patient
coordinates in mm (LPS, DICOM's frame of reference).

Projection images (mammography, digital and computed radiography: :data:`PROJECTION_MODALITIES`) have
no position in a patient frame: a series of them is read as a stack of 2D images in InstanceNumber
order (:attr:`Volume.projection`), its k axis the image index, pixel spacing from PixelSpacing or
ImagerPixelSpacing; MONOCHROME1 images are inverted so that higher values are brighter everywhere.

Refused, with a message that names the values found (:class:`~node.errors.VolumeError`): objects
without pixel data, mixed frames of reference, orientations or matrix sizes, duplicate positions,
missing slices (a gap over ``gap_tolerance`` x the usual spacing), uneven spacing, and gantry tilt
(slice positions not along the slice normal; resampling is not implemented).
"""

from __future__ import annotations

import logging
import math
import mmap
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.valuerep import validate_value

from node.errors import MissingSlicesError, VolumeError
from node.imaging.spacing import classify_spacing

__all__ = ["CT_WINDOW", "PROJECTION_MODALITIES", "TILT_TOLERANCE_DEG", "FrameRef", "Volume", "clean_copied",
           "display_window", "invalid_values", "load_series", "read_headers"]

logger = logging.getLogger(__name__)


#: largest angle (degrees) between the slice stack and the slice normal still taken as an orthogonal stack
TILT_TOLERANCE_DEG = 0.5

#: the soft-tissue/lung display window (HU) used for every CT picture the node draws
CT_WINDOW = (-1000.0, 400.0)

#: modalities whose images are projections (each image stands alone; no slice stack)
PROJECTION_MODALITIES = frozenset({"MG", "DX", "CR", "IO", "PX", "RG"})


def display_window(pixels: np.ndarray, modality: str) -> tuple[float, float]:
    """The (low, high) display window of a picture: :data:`CT_WINDOW` for CT, else the 1st-99th
    percentiles of ``pixels`` (pass one slice or the whole volume)."""
    if modality == "CT":
        return CT_WINDOW
    lo, hi = np.percentile(pixels, [1, 99])
    return float(lo), float(hi)

@dataclass(frozen=True, slots=True)
class FrameRef:
    """Where slice k of the volume comes from: source index (in :attr:`Volume.sources`) and frame (1-based)."""

    source: int
    frame: int | None


@dataclass(slots=True)
class Volume:
    """A 3D image with its geometry and the source instances it was read from.

    Attributes:
        pixels: ``[k, j, i]``, rescale applied (HU for CT); int16 when every value is an integer that
            fits (typical CT: half the memory), float32 otherwise.
        affine: 4x4, voxel (i, j, k) -> patient LPS mm.
        sources: the source datasets without pixel data, in the order of :attr:`frames` references.
        frames: per slice k, which source (and frame, for multi-frame images) it came from.
    """

    pixels: np.ndarray
    affine: np.ndarray
    sources: list[Dataset]
    frames: list[FrameRef]
    modality: str = ""
    series_uid: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    #: the scratch mapping holding :attr:`pixels` when the volume was decoded into one (large series)
    mapping: mmap.mmap | None = field(default=None, repr=False)
    #: ImagePositionPatient of each slice k (LPS mm), as read
    positions: np.ndarray | None = field(default=None, repr=False)
    #: angle (degrees) between the slice stack and the slice normal: gantry tilt
    tilt_deg: float = 0.0
    #: the steps between slices differ (designed uneven spacing; missing slices are refused instead)
    uneven: bool = False
    #: what makes the volume irregular, in words ("" for a regular stack)
    geometry_note: str = ""
    #: a stack of 2D projection images (k is the image index, not a position)
    projection: bool = False
    #: for a series holding several volumes, the one read ("DiffusionBValue = 1000 (of 0, 500, 1000)")
    selected: str = ""

    @property
    def irregular(self) -> bool:
        """True when the slices are not a regular orthogonal stack (tilted or unevenly spaced): a model
        must see it resampled (``node.imaging.regrid``)."""
        return self.uneven or self.tilt_deg > TILT_TOLERANCE_DEG

    def release_memory(self) -> None:
        """Give the pages of a file-backed volume back to the page cache (they leave this process's RSS).

        The pixels stay valid: touching them again reads them back from the page cache (or the scratch
        file). A no-op for a volume held in ordinary memory.
        """
        if self.mapping is not None:
            self.mapping.madvise(mmap.MADV_DONTNEED)

    def slab_widths(self) -> np.ndarray:
        """How thick a slab of the patient each slice k stands for (mm, along the slice normal): half-way to
        each neighbour (the end slices: their one step), so that unevenly spaced or overlapping stacks (two
        acquisitions meeting) count every millimetre once; a regular stack gives its spacing everywhere. A
        volume's region measures ``area x slab width`` per slice, as its SEG on these slices does."""
        n = self.shape[0]
        if self.positions is None or n < 2 or self.projection:
            return np.full(n, self.spacing[2] if n else 1.0)
        normal = np.cross(self.affine[:3, 0], self.affine[:3, 1])
        normal /= np.linalg.norm(normal)
        steps = np.abs(np.diff(self.positions @ normal))
        widths = np.empty(n)
        widths[0], widths[-1] = steps[0], steps[-1]
        widths[1:-1] = (steps[:-1] + steps[1:]) / 2
        return widths

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (i, j, k) in mm."""
        return tuple(float(np.linalg.norm(self.affine[:3, n])) for n in range(3))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.pixels.shape)  # type: ignore[return-value]

    def voxel_to_patient(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) voxel indices (i, j, k) -> (N, 3) patient coordinates (mm).

        For an unevenly spaced stack, k follows the slices' own positions (linear between two slices).
        """
        ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
        if not self.uneven or self.positions is None:
            return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]
        ks = np.arange(len(self.positions), dtype=np.float64)
        origin = np.stack([np.interp(ijk[:, 2], ks, self.positions[:, a]) for a in range(3)], axis=1)
        return origin + ijk[:, :2] @ self.affine[:3, :2].T

    def ras_affine(self) -> np.ndarray:
        """Voxel (i, j, k) -> RAS mm, the convention of NIfTI and of MONAI's readers."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine

    def to_monai(self, dtype: np.dtype | type | None = np.float32) -> tuple[np.ndarray, np.ndarray]:
        """Pixels in MONAI's spatial order (i, j, k) and the matching RAS affine (as ITK/NIfTI readers give).

        ``dtype=None`` returns a transposed view of :attr:`pixels` (no copy); otherwise a contiguous
        array of that type (float32 is what MONAI's ``LoadImage`` gives by default).
        """
        lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
        view = self.pixels.transpose(2, 1, 0)
        arr = view if dtype is None else np.ascontiguousarray(view, dtype=dtype)
        return arr, lps_to_ras @ self.affine


_NON_IMAGE_PREFIXES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.104.", "1.2.840.10008.5.1.4.1.1.11.",
                       "1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.481.")


@dataclass(slots=True)
class _Slice:
    source: int
    frame: int | None
    ipp: np.ndarray
    iop: np.ndarray
    spacing: tuple[float, float]  # (row spacing, column spacing) as in PixelSpacing
    rows: int
    cols: int
    slope: float
    intercept: float
    for_uid: str
    thickness: float | None = None
    #: what may tell this slice's volume from others at the same position (see :data:`SEPARATORS`)
    tags: dict[str, Any] = field(default_factory=dict)


#: attributes that tell apart the volumes of a series holding several at the same slice positions (diffusion
#: b-values, echoes, dynamics, magnitude/phase), in the order they are tried
SEPARATORS = ("DiffusionBValue", "EchoTime", "TemporalPosition", "ImageComponent", "TriggerTime", "AcquisitionNumber")

#: private b-value attributes of vendors that do not write DiffusionBValue (0018,9087) in classic images
_PRIVATE_BVALUES = ((0x0043, 0x1039), (0x0019, 0x100C), (0x2001, 0x1003))


def _number(v: Any) -> float | None:
    try:
        if isinstance(v, list | tuple) or (hasattr(v, "__len__") and not isinstance(v, str | bytes)):
            v = next(iter(v))
        if isinstance(v, bytes):
            v = v.decode(errors="ignore").strip("\x00 ")
        f = float(v)
        return f if np.isfinite(f) else None
    except (TypeError, ValueError, IndexError):
        return None


def _classic_tags(ds: Dataset) -> dict[str, Any]:
    tags: dict[str, Any] = {}
    b = _number(ds.get("DiffusionBValue"))
    for tag in _PRIVATE_BVALUES:
        if b is None and tag in ds:
            b = _number(ds[tag].value)
            if b is not None and tag == (0x0043, 0x1039):
                b = b % 1e9  # GE writes 1000000000 + b
    if b is not None:
        tags["DiffusionBValue"] = b
    for kw, name in (("EchoTime", "EchoTime"), ("TemporalPositionIdentifier", "TemporalPosition"),
                     ("TriggerTime", "TriggerTime"), ("AcquisitionNumber", "AcquisitionNumber")):
        v = _number(ds.get(kw))
        if v is not None:
            tags[name] = v
    image_type = list(ds.get("ImageType", []) or [])
    if len(image_type) > 2:
        tags["ImageComponent"] = str(image_type[2])
    return tags


def _frame_tags(fg: Dataset, shared: Dataset, ds: Dataset) -> dict[str, Any]:
    def item(seq_kw: str) -> Dataset | None:
        for src in (fg, shared):
            seq = src.get(seq_kw)
            if seq:
                return seq[0]
        return None

    tags: dict[str, Any] = {}
    diffusion = item("MRDiffusionSequence")
    if diffusion is not None and _number(diffusion.get("DiffusionBValue")) is not None:
        tags["DiffusionBValue"] = _number(diffusion.get("DiffusionBValue"))
    echo = item("MREchoSequence")
    if echo is not None and _number(echo.get("EffectiveEchoTime")) is not None:
        tags["EchoTime"] = _number(echo.get("EffectiveEchoTime"))
    content = item("FrameContentSequence")
    if content is not None and _number(content.get("TemporalPositionIndex")) is not None:
        tags["TemporalPosition"] = _number(content.get("TemporalPositionIndex"))
    frame_type = item("MRImageFrameTypeSequence")
    if frame_type is not None:
        kind = frame_type.get("ComplexImageComponent") or (list(frame_type.get("FrameType", []))[2:3] or [None])[0]
        if kind:
            tags["ImageComponent"] = str(kind) + "/" + "\\".join(str(v) for v in frame_type.get("FrameType", [])[2:])
    cardiac = item("CardiacSynchronizationSequence")
    if cardiac is not None and _number(cardiac.get("NominalCardiacTriggerDelayTime")) is not None:
        tags["TriggerTime"] = _number(cardiac.get("NominalCardiacTriggerDelayTime"))
    acquisition = _number(ds.get("AcquisitionNumber"))
    if acquisition is not None:
        tags["AcquisitionNumber"] = acquisition
    return tags


def _floats(v: Any, n: int, what: str, where: str) -> np.ndarray:
    try:
        arr = np.array([float(x) for x in v], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{where}: {what} is {v!r}; expected {n} numbers") from exc
    if arr.shape != (n,):
        raise VolumeError(f"{where}: {what} has {arr.size} values; expected {n}")
    return arr


#: Type 2 attributes of the patient and study modules that every result object copies from its source
#: images; some scanners leave them out (a GE head CT without PatientBirthDate, say)
_COPIED_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")


#: attributes the SEG and SR copy from their source images (Patient, General Study, Patient Study, Clinical
#: Trial Subject and Study modules): each value is checked against its VR before it is copied
COPIED = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex",
          "OtherPatientIDs", "EthnicGroup", "PatientComments", "PatientSpeciesDescription", "PatientBreedDescription",
          "PatientIdentityRemoved", "DeidentificationMethod", "StudyInstanceUID", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription", "PatientAge", "PatientSize",
          "PatientWeight", "Occupation", "AdditionalPatientHistory", "ClinicalTrialSponsorName",
          "ClinicalTrialProtocolID", "ClinicalTrialSubjectID", "ClinicalTrialSiteID", "ClinicalTrialTimePointID")


def invalid_values(ds: Dataset, keywords: Sequence[str] = COPIED) -> list[str]:
    """Those of ``keywords`` whose value in ``ds`` breaks its VR's rules (a PatientAge of "0Y", a date written
    2026-01-01, a name longer than its VR allows)."""
    bad = []
    for kw in keywords:
        if kw not in ds:
            continue
        elem = ds[kw]  # the element (ds.get gives its value)
        if elem.VR in ("SQ", "UN"):
            continue
        try:
            values = list(elem.value) if elem.VM > 1 else [elem.value]
            for v in values:
                if v not in (None, ""):
                    validate_value(elem.VR, str(v) if isinstance(v, int | float) else v, pydicom_config.RAISE)
        except (ValueError, TypeError, KeyError):
            bad.append(kw)
    return bad


def clean_copied(ds: Dataset) -> list[str]:
    """Make a source header safe to copy into the node's outputs (in memory only): an element whose value breaks
    its VR is emptied when the outputs must have it (Type 2 patient and study attributes) and removed
    otherwise. Returns the keywords fixed (never their values: patient data)."""
    fixed = invalid_values(ds)
    for kw in fixed:
        if kw in _COPIED_TYPE2:
            setattr(ds, kw, "")
        elif kw in ds:
            del ds[kw]
    return fixed


def read_headers(paths: Sequence[Path]) -> list[Dataset]:
    """Read the headers (no pixel data) of the files; raises VolumeError for an unreadable file.

    Type 2 patient and study attributes missing from a header are added empty (in memory only), as the
    SEG and SR that copy them require them present, empty or not; values that break their VR's rules are
    not copied (:func:`clean_copied`, logged once per series by keyword).
    """
    out: list[Dataset] = []
    fixed: set[str] = set()
    for p in paths:
        try:
            ds = dcmread(p, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            raise VolumeError(f"cannot read {Path(p).name}: {exc}") from exc
        fixed.update(clean_copied(ds))
        for kw in _COPIED_TYPE2:
            if kw not in ds:
                setattr(ds, kw, "")
        if str(ds.get("PatientIdentityRemoved", "")).upper() == "YES" and not ds.get("DeidentificationMethod") \
                and "DeidentificationMethodCodeSequence" not in ds:
            # Type 1C once identity is removed; copied into every output, which would then be invalid
            ds.DeidentificationMethod = "not stated in the source images"
        out.append(ds)
    if fixed and out:
        logger.warning("series %s: values that break their VR are not copied into the results: %s",
                       out[0].get("SeriesInstanceUID", "?"), ", ".join(sorted(fixed)))
    return out


def _slices_of(ds: Dataset, index: int, where: str) -> list[_Slice]:
    sop_class = str(ds.get("SOPClassUID", ""))
    if not ds.get("Rows"):
        raise VolumeError(f"{where}: SOP class {sop_class or '?'} holds no image (no pixel data); "
                          "an image series is expected")
    if sop_class.startswith(_NON_IMAGE_PREFIXES):
        raise VolumeError(f"{where}: SOP class {sop_class} is not an image; an image series is expected")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        raise VolumeError(f"{where}: Rows x Columns is {rows} x {cols}")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise VolumeError(f"{where}: {ds.SamplesPerPixel} samples per pixel; only greyscale images are supported")
    for_uid = str(ds.get("FrameOfReferenceUID", ""))
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    shared = ds.get("SharedFunctionalGroupsSequence")
    perframe = ds.get("PerFrameFunctionalGroupsSequence")
    if perframe is not None:  # enhanced multi-frame
        sh = shared[0] if shared else Dataset()
        out = []
        for f in range(nframes):
            fg = perframe[f]

            def get(seq_kw: str, attr: str, _fg: Dataset = fg, _f: int = f) -> Any:
                for src in (_fg, sh):
                    seq = src.get(seq_kw)
                    if seq and attr in seq[0]:
                        return seq[0][attr].value
                if attr in ("RescaleSlope", "RescaleIntercept"):
                    return 1.0 if attr == "RescaleSlope" else 0.0
                raise VolumeError(f"{where} frame {_f + 1}: no {attr} in {seq_kw}")

            out.append(_Slice(
                source=index, frame=f + 1,
                ipp=_floats(get("PlanePositionSequence", "ImagePositionPatient"), 3, "ImagePositionPatient", where),
                iop=_floats(get("PlaneOrientationSequence", "ImageOrientationPatient"), 6, "ImageOrientationPatient",
                            where),
                spacing=tuple(_floats(get("PixelMeasuresSequence", "PixelSpacing"), 2, "PixelSpacing", where)),  # type: ignore[arg-type]
                rows=rows, cols=cols,
                slope=_rescale(get("PixelValueTransformationSequence", "RescaleSlope"), "RescaleSlope", where),
                intercept=_rescale(get("PixelValueTransformationSequence", "RescaleIntercept"), "RescaleIntercept",
                                   where),
                for_uid=for_uid, tags=_frame_tags(fg, sh, ds)))
        return out
    image_type = [str(v).upper() for v in ds.get("ImageType", []) or []]
    if "MOSAIC" in image_type or "VFRAME" in image_type:
        raise VolumeError(f"{where}: a mosaic ({'Siemens MOSAIC' if 'MOSAIC' in image_type else 'United Imaging VFRAME'}"
                          ": several slices tiled in one image); the node does not unpack mosaics, as its results could "
                          "not reference the slices: export the series as single slices or enhanced MR")
    if nframes > 1:
        raise VolumeError(f"{where}: a legacy multi-frame image ({nframes} frames) without per-frame geometry")
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
        raise VolumeError(f"{where}: no ImagePositionPatient/ImageOrientationPatient; the slice cannot be placed")
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if spacing is None:
        raise VolumeError(f"{where}: no PixelSpacing")
    return [_Slice(
        source=index, frame=None,
        ipp=_floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", where),
        iop=_floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", where),
        spacing=tuple(_floats(spacing, 2, "PixelSpacing", where)),  # type: ignore[arg-type]
        rows=rows, cols=cols,
        slope=_rescale(ds.get("RescaleSlope", 1.0), "RescaleSlope", where),
        intercept=_rescale(ds.get("RescaleIntercept", 0.0), "RescaleIntercept", where),
        for_uid=for_uid, thickness=_thickness(ds), tags=_classic_tags(ds))]


def _rescale(value: Any, name: str, where: str) -> float:
    """RescaleSlope / RescaleIntercept as a number; absent or empty: the identity. A value that is not a finite number
    (``nan``, ``inf``, text) or a slope of 0 would make every voxel meaningless and poison every statistic computed
    from them: refused, named."""
    default = 1.0 if name == "RescaleSlope" else 0.0
    if value is None or value == "":
        return default
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise VolumeError(f"{where}: {name} {str(value)[:32]!r} is not a number") from None
    if not math.isfinite(v) or (name == "RescaleSlope" and v == 0.0):
        raise VolumeError(f"{where}: {name} is {value}; a finite{' non-zero' if name == 'RescaleSlope' else ''} "
                          "number is required to turn stored values into real ones")
    return v


def _thickness(ds: Dataset) -> float | None:
    try:
        v = ds.get("SliceThickness")
        return float(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _describe_value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def split_volumes(slices: list[_Slice], series: str) -> tuple[str, dict[Any, list[_Slice]]] | None:
    """The volumes of a series holding several at the same slice positions: (the attribute that tells them apart,
    its value -> that volume's slices), or None when every position holds one slice.

    Raises:
        VolumeError: several slices at a position and no attribute of :data:`SEPARATORS` tells them apart.
    """
    normal = np.cross(slices[0].iop[:3], slices[0].iop[3:])
    pos = np.round(np.array([float(s.ipp @ normal) for s in slices]) * 100).astype(np.int64)
    if len(np.unique(pos)) == len(pos):
        return None
    for attr in SEPARATORS:
        values = [s.tags.get(attr) for s in slices]
        if any(v is None for v in values) or len(set(values)) < 2:
            continue
        groups: dict[Any, list[int]] = {}
        for n, v in enumerate(values):
            groups.setdefault(v, []).append(n)
        if all(len(np.unique(pos[idx])) == len(idx) for idx in groups.values()):
            order = sorted(groups, key=lambda v: (0, v, "") if isinstance(v, float) else (1, 0.0, str(v)))
            return attr, {v: [slices[n] for n in groups[v]] for v in order}
    where, counts = np.unique(pos, return_counts=True)
    raise VolumeError(f"series {series} has {int(counts.max())} slices at position {float(where[counts.argmax()]) / 100:.2f} "
                      f"mm along the normal and none of "
                      f"{', '.join(SEPARATORS)} tells them apart; expected one volume (several phases or echoes "
                      "in one series?)")


VOLUME_CHOICE = re.compile(r"^(first|last|(max|min):(\w+)|(\w+)=(.+))$")


def choose_volume(attr: str, volumes: dict[Any, list[_Slice]], choice: str | None, series: str) -> tuple[Any, list[_Slice]]:
    """The volume ``choice`` names (a model card's ``[model] volume``): "first", "last", "max:<attribute>",
    "min:<attribute>" or "<attribute>=<value>".

    Raises:
        VolumeError: no choice given, or it names another attribute or a value the series does not hold (the
            message names the attribute and its values).
    """
    values = list(volumes)
    listed = ", ".join(_describe_value(v) for v in values)
    if choice is None:
        raise VolumeError(f"series {series} holds {len(values)} volumes at the same positions, told apart by {attr} "
                          f"({listed}); the model card's [model] volume must say which one the model takes "
                          f'(e.g. "max:{attr}", "first", "{attr}={_describe_value(values[-1])}")')
    m = VOLUME_CHOICE.match(choice.strip())
    if m is None:
        raise VolumeError(f"[model] volume = {choice!r}: expected first, last, max:<attribute>, min:<attribute> or "
                          "<attribute>=<value>")
    if m.group(1) in ("first", "last"):
        key = values[0] if m.group(1) == "first" else values[-1]
        return key, volumes[key]
    wanted = m.group(3) or m.group(4)
    if wanted != attr:
        raise VolumeError(f"series {series} holds {len(values)} volumes told apart by {attr} ({listed}), not by "
                          f"{wanted} ([model] volume = {choice!r})")
    if m.group(2):
        numeric = [v for v in values if isinstance(v, float)]
        key = (max if m.group(2) == "max" else min)(numeric or values)
        return key, volumes[key]
    target = m.group(5)
    for v in values:
        if _describe_value(v) == target or (isinstance(v, float) and _number(target) == v):
            return v, volumes[v]
    raise VolumeError(f"series {series} holds no volume with {attr} = {target} (it has {listed})")


@dataclass(frozen=True, slots=True)
class _Stack:
    slices: list[_Slice]
    step: np.ndarray
    tilt_deg: float
    uneven: bool
    note: str


def _check_and_sort(slices: list[_Slice], series: str, *, tilt_tolerance_deg: float) -> _Stack:
    first = slices[0]
    for s in slices[1:]:
        if (s.rows, s.cols) != (first.rows, first.cols):
            raise VolumeError(f"series {series} mixes matrix sizes {first.rows}x{first.cols} and {s.rows}x{s.cols}; "
                              "expected one")
        if np.abs(s.iop - first.iop).max() > 1e-3:
            raise VolumeError(f"series {series} mixes orientations {np.round(first.iop, 4).tolist()} and "
                              f"{np.round(s.iop, 4).tolist()}; expected one")
        if s.for_uid != first.for_uid:
            raise VolumeError(f"series {series} mixes frames of reference {first.for_uid} and {s.for_uid}")
        if np.abs(np.array(s.spacing) - np.array(first.spacing)).max() > 1e-3:
            raise VolumeError(f"series {series} mixes pixel spacings {first.spacing} and {s.spacing}")
    row_dir, col_dir = first.iop[:3], first.iop[3:]
    normal = np.cross(row_dir, col_dir)
    pos = np.array([float(s.ipp @ normal) for s in slices])
    order = np.argsort(pos, kind="stable")
    slices = [slices[i] for i in order]
    pos = pos[order]
    if len(slices) == 1:
        return _Stack(slices, normal * (first.thickness or 1.0), 0.0, False, "")
    steps = np.diff(pos)
    dup = np.where(steps < 1e-2)[0]
    if dup.size:
        i = int(dup[0])
        count = int(np.sum(np.abs(pos - pos[i]) < 1e-2))
        raise VolumeError(f"series {series} has {count} slices at position {pos[i]:.2f} mm along the normal; "
                          "expected one (several phases or echoes in one series?)")
    report = classify_spacing(pos, [s.thickness for s in slices])
    if report.gaps:
        raise MissingSlicesError(f"series {series} has {report.describe_gap()} (incomplete transfer?)")
    notes = []
    if report.uneven:
        notes.append(report.describe_uneven())
    # tilt: how far the slice origins drift in the slice plane per mm along the normal
    inplane = np.array([s.ipp - slices[0].ipp - (p - pos[0]) * normal for s, p in zip(slices, pos, strict=True)])
    drift = float(np.linalg.norm(inplane[-1]))
    angle = float(np.degrees(np.arctan2(drift, abs(pos[-1] - pos[0]))))
    tilted = angle > tilt_tolerance_deg
    if tilted:
        notes.append(f"gantry tilt {angle:.1f} degrees")
    span = slices[-1].ipp - slices[0].ipp
    return _Stack(slices, span / (len(slices) - 1), angle if tilted else 0.0, report.uneven, ", ".join(notes))


_NATIVE_LE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")


def _fast_native(ds: Dataset) -> np.ndarray | None:
    """Single-frame native little-endian greyscale pixels straight from the buffer (no decoder), or None."""
    ts = str(getattr(ds.file_meta, "TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    if ts not in _NATIVE_LE or int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("SamplesPerPixel", 1)) != 1:
        return None
    bits, stored = int(ds.get("BitsAllocated", 0)), int(ds.get("BitsStored", 0))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    if bits not in (8, 16) or "PixelData" not in ds or (signed and stored != bits):
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    raw = ds.PixelData
    if len(raw) < rows * cols * bits // 8:
        return None  # let the decoder report the short pixel data
    dtype = {(8, False): "<u1", (8, True): "<i1", (16, False): "<u2", (16, True): "<i2"}[(bits, signed)]
    arr = np.frombuffer(raw, dtype=dtype, count=rows * cols).reshape(rows, cols)
    if not signed and stored < bits:
        arr = arr & np.array((1 << stored) - 1, dtype=arr.dtype)  # unused high bits are not pixel data
    return arr


def _decode(ds: Dataset, where: str) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise VolumeError(f"{where}: no pixel data")
    fast = _fast_native(ds)
    if fast is not None:
        return fast
    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise VolumeError(f"{where}: pixel data cannot be decoded "
                          f"(transfer syntax {ds.file_meta.get('TransferSyntaxUID', '?')}): {exc}") from exc
    return np.asarray(arr)


def _volume_dtype(headers: Sequence[Dataset], slices: Sequence[_Slice]) -> np.dtype:
    """int16 when every rescaled value is an integer that fits (most CT: half the memory of float32), else float32."""
    lo, hi = 0, 0
    for s in slices:
        if s.slope != 1.0 or s.intercept != int(s.intercept):
            return np.dtype(np.float32)
        ds = headers[s.source]
        stored = int(ds.get("BitsStored", 16) or 16)
        if int(ds.get("PixelRepresentation", 0)) == 1:
            smin, smax = -(1 << (stored - 1)), (1 << (stored - 1)) - 1
        else:
            smin, smax = 0, (1 << stored) - 1
        lo, hi = min(lo, smin + int(s.intercept)), max(hi, smax + int(s.intercept))
    return np.dtype(np.int16) if lo >= -32768 and hi <= 32767 else np.dtype(np.float32)


def _scratch_array(folder: Path, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, mmap.mmap]:
    """A zeroed array backed by an anonymous (already unlinked) file in ``folder``, and its mapping."""
    folder.mkdir(parents=True, exist_ok=True)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    with tempfile.TemporaryFile(dir=folder, prefix=".volume-") as f:
        f.truncate(nbytes)
        mapping = mmap.mmap(f.fileno(), nbytes)  # the mapping keeps the (unlinked) file alive
    return np.frombuffer(mapping, dtype=dtype).reshape(shape), mapping


def load_series(paths: Sequence[Path], *, tilt_tolerance_deg: float = TILT_TOLERANCE_DEG,
                scratch_dir: Path | None = None, map_above_bytes: int = 256 * 2**20,
                volume: str | None = None) -> Volume:
    """Read a series into a :class:`Volume`.

    A tilted or unevenly spaced stack is read as it is, with :attr:`Volume.geometry_note` saying so (the
    pipeline resamples it for the model); a stack with missing slices is refused.

    Args:
        paths: the files of one series (any order).
        tilt_tolerance_deg: largest angle between the slice stack and the slice normal taken as no tilt.
        scratch_dir: where a volume larger than ``map_above_bytes`` is decoded into an unlinked
            scratch file mapped into memory, so :meth:`Volume.release_memory` can hand its pages
            back while the model runs (None: always in ordinary memory).
        volume: for a series holding several volumes at the same positions (b-values, echoes, dynamics), which
            one to read (:func:`choose_volume`; a model card's ``[model] volume``).

    Returns:
        The volume, slices sorted along the normal (increasing position).

    Raises:
        VolumeError: the series cannot be turned into a volume; the message says why.
    """
    import time

    if not paths:
        raise VolumeError("the series has no instances")
    t0 = time.perf_counter()
    headers = read_headers(paths)
    by_series: dict[str, int] = {}
    for ds in headers:
        uid = str(ds.get("SeriesInstanceUID", "?"))
        by_series[uid] = by_series.get(uid, 0) + 1
    if len(by_series) > 1:
        listed = ", ".join(f"{uid} ({n} instance(s))" for uid, n in by_series.items())
        raise VolumeError(f"the files hold {len(by_series)} series: {listed}; expected one")
    series = next(iter(by_series))
    if all(_is_projection(ds) for ds in headers):
        return _load_projection(paths, headers, series, t0)
    slices: list[_Slice] = []
    for n, ds in enumerate(headers):
        slices.extend(_slices_of(ds, n, f"series {series}, instance {ds.get('SOPInstanceUID', Path(paths[n]).name)}"))
    selected = ""
    split = split_volumes(slices, series) if len(slices) > 1 else None
    if split is not None:
        attr, volumes = split
        key, slices = choose_volume(attr, volumes, volume, series)
        selected = f"{attr} = {_describe_value(key)} (of {', '.join(_describe_value(v) for v in volumes)})"
    stack = _check_and_sort(slices, series, tilt_tolerance_deg=tilt_tolerance_deg)
    slices, step = stack.slices, stack.step
    t1 = time.perf_counter()
    # second pass: each file is read again for its pixels, one at a time, straight into its sorted slot;
    # keeping every dataset from the first pass would double the peak memory (the page cache makes the
    # re-read cheap)
    first = slices[0]
    dtype = _volume_dtype(headers, slices)
    shape = (len(slices), first.rows, first.cols)
    mapping: mmap.mmap | None = None
    if scratch_dir is not None and int(np.prod(shape)) * dtype.itemsize > map_above_bytes:
        pixels, mapping = _scratch_array(scratch_dir, shape, dtype)
    else:
        pixels = np.empty(shape, dtype=dtype)
    cache: tuple[int, np.ndarray] | None = None
    for k, s in enumerate(slices):
        where = f"series {series}, instance {headers[s.source].get('SOPInstanceUID', '?')}"
        if s.frame is None:
            ds = dcmread(paths[s.source])
            arr = _decode(ds, where)
        else:
            if cache is None or cache[0] != s.source:
                cache = (s.source, _decode(dcmread(paths[s.source]), where))
            arr = cache[1][s.frame - 1] if cache[1].ndim == 3 else cache[1]
        if arr.shape != (first.rows, first.cols):
            raise VolumeError(f"{where}: decoded pixels are {arr.shape}; Rows x Columns say "
                              f"{first.rows} x {first.cols}")
        if s.slope != 1.0:
            np.multiply(arr, np.float32(s.slope), out=pixels[k], casting="unsafe")
            if s.intercept != 0.0:
                pixels[k] += np.float32(s.intercept)
        elif s.intercept != 0.0:
            np.add(arr, pixels.dtype.type(s.intercept), out=pixels[k], casting="unsafe")
        else:
            pixels[k] = arr
    t2 = time.perf_counter()
    row_dir, col_dir = first.iop[:3], first.iop[3:]
    affine = np.eye(4)
    affine[:3, 0] = row_dir * first.spacing[1]  # i (column index) moves along the row direction
    affine[:3, 1] = col_dir * first.spacing[0]  # j (row index) moves along the column direction
    affine[:3, 2] = step
    affine[:3, 3] = first.ipp
    used = list(dict.fromkeys(s.source for s in slices))  # sources in slice order
    remap = {src: n for n, src in enumerate(used)}
    return Volume(
        pixels=pixels, affine=affine, sources=[headers[i] for i in used],
        frames=[FrameRef(remap[s.source], s.frame) for s in slices],
        modality=str(headers[0].get("Modality", "")), series_uid=series,
        timings={"read_headers": t1 - t0, "decode": t2 - t1}, mapping=mapping,
        positions=np.array([s.ipp for s in slices]), tilt_deg=stack.tilt_deg, uneven=stack.uneven,
        geometry_note=stack.note, selected=selected)


def _is_projection(ds: Dataset) -> bool:
    """A projection image without a position in the patient (mammogram, radiograph)."""
    return str(ds.get("Modality", "")).upper() in PROJECTION_MODALITIES and "ImagePositionPatient" not in ds


def _load_projection(paths: Sequence[Path], headers: list[Dataset], series: str, t0: float) -> Volume:
    """A series of 2D projection images as a stack, in InstanceNumber order (see the module docstring).

    Raises:
        VolumeError: multi-frame or colour images, or images of different sizes or spacings.
    """
    import time

    def number(n: int) -> tuple[float, str]:
        try:
            return float(headers[n].get("InstanceNumber") or 0), str(headers[n].get("SOPInstanceUID", ""))
        except (TypeError, ValueError):
            return 0.0, str(headers[n].get("SOPInstanceUID", ""))

    order = sorted(range(len(headers)), key=number)
    first = headers[order[0]]
    rows, cols = int(first.get("Rows", 0) or 0), int(first.get("Columns", 0) or 0)
    spacings = set()
    for n in order:
        ds = headers[n]
        where = f"series {series}, instance {ds.get('SOPInstanceUID', Path(paths[n]).name)}"
        if "PixelData" not in ds and not ds.get("Rows"):
            raise VolumeError(f"{where}: no pixel data")
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise VolumeError(f"{where}: a multi-frame projection image ({ds.NumberOfFrames} frames, tomosynthesis?) "
                              "is not read as a 2D image")
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise VolumeError(f"{where}: {ds.SamplesPerPixel} samples per pixel; only greyscale images are supported")
        if (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) != (rows, cols):
            raise VolumeError(f"series {series} mixes image sizes {rows}x{cols} and {ds.Rows}x{ds.Columns}; "
                              "a series of projection images of one size is expected")
        spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing") or [1.0, 1.0]
        spacings.add(tuple(round(float(v), 4) for v in _floats(spacing, 2, "PixelSpacing", where)))
    if len(spacings) > 1:
        raise VolumeError(f"series {series} mixes pixel spacings {sorted(spacings)}; one is expected")
    row_spacing, col_spacing = next(iter(spacings))
    t1 = time.perf_counter()
    pixels = np.empty((len(order), rows, cols), dtype=np.float32)
    for k, n in enumerate(order):
        ds = dcmread(paths[n])
        where = f"series {series}, instance {ds.get('SOPInstanceUID', '?')}"
        arr = _decode(ds, where).astype(np.float32)
        if arr.shape != (rows, cols):
            raise VolumeError(f"{where}: decoded pixels are {arr.shape}; Rows x Columns say {rows} x {cols}")
        slope = _rescale(ds.get("RescaleSlope", 1.0), "RescaleSlope", where)
        intercept = _rescale(ds.get("RescaleIntercept", 0.0), "RescaleIntercept", where)
        if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":  # higher values are darker
            stored = int(ds.get("BitsStored", 16) or 16)
            lo, hi = (-(1 << (stored - 1)), (1 << (stored - 1)) - 1) if int(ds.get("PixelRepresentation", 0)) \
                else (0, (1 << stored) - 1)
            arr = (lo + hi) - arr
        pixels[k] = arr * slope + intercept
    t2 = time.perf_counter()
    affine = np.diag([col_spacing, row_spacing, 1.0, 1.0])
    return Volume(pixels=pixels, affine=affine, sources=[headers[n] for n in order],
                  frames=[FrameRef(k, None) for k in range(len(order))], modality=str(first.get("Modality", "")),
                  series_uid=series, timings={"read_headers": t1 - t0, "decode": t2 - t1},
                  geometry_note="projection images", projection=True)
