"""Synthetic studies of several series: a brain MR study (sequences in several planes and resolutions, a
localizer, a diffusion series of three b-values) and a three-phase contrast CT study, with known lesions.

One continuous phantom, defined in patient coordinates (mm, LPS), is sampled on the grid of each series, so
all the series of a study share one frame of reference and show the same anatomy at the same place, as a
real study does. Each sequence gives the tissues the contrast that sequence would (T1: white matter bright,
CSF dark; T2: CSF bright; FLAIR: CSF suppressed, oedema bright; T1 after gadolinium: an enhancing tumour
rim; diffusion: the signal falls with the b-value as ``exp(-b * ADC)``, slower in a tumour). The images exist
to exercise study-level models end to end (series matched to a model's inputs, resampled onto one grid,
results on the reference series): they look like MR to a program, not to a radiologist.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from node import __version__

__all__ = ["AXIAL", "CORONAL", "SAGITTAL", "Lesion", "Plane", "StudySeries", "write_mr_study", "write_phase_study"]

_ROOT = "1.2.826.0.1.3680043.10.1473."

#: (row direction, column direction) of the standard planes, in LPS
AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
SAGITTAL = ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0))
CORONAL = ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0))


def _uid(seed: int, *parts: object) -> str:
    return generate_uid(prefix=_ROOT, entropy_srcs=["study", str(seed), *(str(p) for p in parts)])


def _tilted(plane: tuple[tuple[float, ...], tuple[float, ...]], degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """A plane turned by ``degrees`` about its row direction (an oblique acquisition, e.g. AC-PC aligned)."""
    row, col = np.asarray(plane[0], float), np.asarray(plane[1], float)
    normal = np.cross(row, col)
    a = np.radians(degrees)
    return row, np.cos(a) * col + np.sin(a) * normal


@dataclass(frozen=True)
class Plane:
    """The grid of one series: plane, in-plane matrix and spacing, slices, centred on ``centre``."""

    row: tuple[float, float, float]
    col: tuple[float, float, float]
    matrix: tuple[int, int]  # rows, columns
    pixel_mm: float
    slices: int
    slice_mm: float
    centre: tuple[float, float, float] = (0.0, -10.0, 30.0)

    def positions(self) -> np.ndarray:
        """ImagePositionPatient of each slice (the centre of its first pixel)."""
        row, col = np.asarray(self.row), np.asarray(self.col)
        normal = np.cross(row, col)
        rows, cols = self.matrix
        corner = (np.asarray(self.centre) - (cols - 1) / 2 * self.pixel_mm * row
                  - (rows - 1) / 2 * self.pixel_mm * col)
        return np.array([corner + (k - (self.slices - 1) / 2) * self.slice_mm * normal for k in range(self.slices)])

    def points(self, k: int) -> np.ndarray:
        """Patient coordinates of every pixel of slice k, ``[rows, cols, 3]``."""
        rows, cols = self.matrix
        jj, ii = np.mgrid[:rows, :cols].astype(np.float64)
        pos = self.positions()[k]
        return pos + ii[..., None] * self.pixel_mm * np.asarray(self.row) + jj[..., None] * self.pixel_mm \
            * np.asarray(self.col)


@dataclass(frozen=True)
class Lesion:
    """A tumour: a necrotic core, an enhancing rim, oedema around it (radii in mm)."""

    centre: tuple[float, float, float]
    core_mm: float
    rim_mm: float
    oedema_mm: float

    def to_dict(self) -> dict[str, object]:
        whole = 4 / 3 * np.pi * self.oedema_mm ** 3
        return {"centre_mm": [round(c, 1) for c in self.centre], "core_radius_mm": self.core_mm,
                "rim_radius_mm": self.rim_mm, "oedema_radius_mm": self.oedema_mm,
                "tumour_core_mm3": round(4 / 3 * np.pi * self.rim_mm ** 3, 1), "whole_tumour_mm3": round(whole, 1)}


# tissue indices, later ones drawn over earlier ones
_BACKGROUND, _SCALP, _SKULL, _GM, _WM, _CSF, _OEDEMA, _RIM, _CORE = range(9)

#: signal of each tissue per sequence (arbitrary units, 12-bit range), and the ADC (mm2/s) for diffusion
_SIGNAL = {
    "T1": (0, 1500, 150, 700, 1000, 250, 600, 650, 400),
    "T1c": (0, 1500, 150, 700, 1000, 250, 600, 1900, 400),
    "T2": (0, 900, 100, 1000, 800, 2200, 1700, 1300, 1900),
    "FLAIR": (0, 900, 100, 900, 700, 120, 1700, 1300, 1100),
    "DWI": (0, 700, 80, 1000, 900, 1800, 1500, 1200, 1600),
}
_ADC = (0.0, 0.0010, 0.0, 0.0008, 0.0007, 0.0030, 0.0014, 0.0006, 0.0025)


@dataclass
class _Head:
    centre: np.ndarray
    lesions: list[Lesion] = field(default_factory=list)

    def tissue(self, p: np.ndarray) -> np.ndarray:
        """The tissue index at patient points ``p`` (``[..., 3]``)."""
        d = p - self.centre

        def inside(semi: tuple[float, float, float], offset: tuple[float, float, float] = (0, 0, 0)) -> np.ndarray:
            q = (d - np.asarray(offset)) / np.asarray(semi)
            return (q ** 2).sum(axis=-1) <= 1.0

        t = np.zeros(p.shape[:-1], dtype=np.uint8)
        t[inside((74, 92, 84))] = _SCALP
        t[inside((68, 86, 78))] = _SKULL
        t[inside((63, 81, 73))] = _GM
        t[inside((50, 66, 56), (0, 0, 6))] = _WM
        for x in (-9.0, 9.0):
            t[inside((5, 22, 9), (x, -4, 14))] = _CSF
        for les in self.lesions:
            r = np.linalg.norm(p - np.asarray(les.centre), axis=-1)
            t[r <= les.oedema_mm] = _OEDEMA
            t[r <= les.rim_mm] = _RIM
            t[r <= les.core_mm] = _CORE
        return t


def _head(seed: int, n_lesions: int) -> _Head:
    rng = np.random.default_rng(seed)
    head = _Head(centre=np.array([0.0, -10.0, 30.0]))
    for _ in range(n_lesions):
        centre = head.centre + rng.uniform([-30, -40, -10], [30, 40, 30])
        core = float(rng.uniform(4.0, 7.0))
        rim = core + float(rng.uniform(2.5, 4.0))
        cx, cy, cz = (round(float(c), 1) for c in centre)
        head.lesions.append(Lesion((cx, cy, cz), round(core, 1), round(rim, 1),
                                   round(rim + float(rng.uniform(6.0, 10.0)), 1)))
    return head


@dataclass(frozen=True)
class StudySeries:
    """One series of a synthetic study, as written."""

    name: str
    description: str
    folder: Path
    series_uid: str
    files: int
    plane: str


def _common(ds: Dataset, *, seed: int, study_uid: str, for_uid: str, when: _dt.datetime, patient_id: str,
            patient_name: str, modality: str, study_description: str) -> None:
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = when.strftime("%H%M%S")
    ds.AccessionNumber = f"ST{seed:06d}"[:16]
    ds.Modality = modality
    ds.Manufacturer = "preannot synthetic phantom"
    ds.ManufacturerModelName = "node.devtools.synth"
    ds.SoftwareVersions = __version__
    ds.InstitutionName = "Synthetic Hospital"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19650101"
    ds.PatientSex = "O"
    ds.PatientAge = "061Y"
    ds.StudyInstanceUID = study_uid
    ds.StudyID = "1"
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0


def _save(ds: Dataset, path: Path) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


def _noisy(signal: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Magnitude MR noise (Rician): the modulus of the signal plus complex Gaussian noise."""
    return np.sqrt((signal + rng.normal(0, sigma, signal.shape)) ** 2 + rng.normal(0, sigma, signal.shape) ** 2)


def _slice(head: _Head, plane: Plane, k: int, signal: tuple[float, ...], *, supersample: int = 2) -> np.ndarray:
    """The mean signal over each pixel (partial volume: ``supersample``^2 points per pixel in plane)."""
    pts = plane.points(k)
    row, col = np.asarray(plane.row), np.asarray(plane.col)
    table = np.asarray(signal, dtype=np.float64)
    acc = np.zeros(pts.shape[:2])
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    for a in offsets:
        for b in offsets:
            acc += table[head.tissue(pts + (a * row + b * col) * plane.pixel_mm)]
    return acc / supersample ** 2


#: the MR series of :func:`write_mr_study`: name -> (description, plane, tilt, matrix, pixel, slices, slice mm,
#: sequence attributes)
_MR_SERIES: dict[str, tuple[str, tuple, float, tuple[int, int], float, int, float, dict[str, object]]] = {
    "T1": ("T1 MPRAGE SAG", SAGITTAL, 0.0, (96, 96), 2.0, 40, 3.6,
           {"ScanningSequence": ["GR", "IR"], "SequenceVariant": ["SP", "MP"], "MRAcquisitionType": "3D",
            "RepetitionTime": "2000", "EchoTime": "2.9", "InversionTime": "900", "FlipAngle": "9",
            "SequenceName": "*tfl3d1"}),
    "T1c": ("T1 MPRAGE AX POST GD", AXIAL, 0.0, (96, 96), 2.0, 50, 3.0,
            {"ScanningSequence": ["GR", "IR"], "SequenceVariant": ["SP", "MP"], "MRAcquisitionType": "3D",
             "RepetitionTime": "2000", "EchoTime": "2.9", "InversionTime": "900", "FlipAngle": "9",
             "SequenceName": "*tfl3d1", "ContrastBolusAgent": "GADOBUTROL", "ContrastBolusVolume": "7.5"}),
    "T2": ("T2 TSE COR", CORONAL, 0.0, (96, 96), 2.0, 40, 4.5,
           {"ScanningSequence": ["SE"], "SequenceVariant": ["SK", "SP"], "MRAcquisitionType": "2D",
            "RepetitionTime": "5000", "EchoTime": "98", "FlipAngle": "150", "SequenceName": "*tse2d1_15"}),
    "FLAIR": ("FLAIR AX OBL", AXIAL, 12.0, (80, 80), 2.4, 30, 5.0,
              {"ScanningSequence": ["SE", "IR"], "SequenceVariant": ["SK", "SP", "MP"], "MRAcquisitionType": "2D",
               "RepetitionTime": "9000", "EchoTime": "81", "InversionTime": "2500", "FlipAngle": "150",
               "SequenceName": "*tir2d1_16"}),
}

#: b-values of the diffusion series
B_VALUES = (0, 500, 1000)


def write_mr_study(out: Path, *, seed: int = 4100, lesions: int = 1, without: tuple[str, ...] = (),
                   patient_id: str | None = None, scale: float = 1.0) -> list[StudySeries]:
    """Write a brain MR study into ``out``: one folder per series (T1 sagittal, T1 after gadolinium axial, T2
    coronal, FLAIR axial oblique, a three-plane localizer, a diffusion series with b = 0, 500 and 1000 at the
    same positions), and ``truth.json`` (the lesions, the series). ``without`` leaves out series by name.
    ``scale`` multiplies the four sequences' matrices and slice counts (and divides their pixel and slice sizes):
    2.5 gives a clinical-size T1c of 240 x 240 x 125.

    Returns:
        The series written, in the order written.
    """
    head = _head(seed, lesions)
    rng = np.random.default_rng(seed + 1)
    out.mkdir(parents=True, exist_ok=True)
    study_uid, for_uid = _uid(seed, "mr-study"), _uid(seed, "mr-for")
    when = _dt.datetime(2026, 10, 1, 8, 0) + _dt.timedelta(days=seed % 60)
    pid = patient_id or f"SYN-MR-{seed}"
    common = {"seed": seed, "study_uid": study_uid, "for_uid": for_uid, "when": when, "patient_id": pid,
              "patient_name": "SYNTHETIC^BRAIN", "modality": "MR", "study_description": "MR BRAIN W/WO (synthetic)"}
    written: list[StudySeries] = []
    number = 1

    def instance(folder: Path, series_uid: str, series_number: int, description: str, k: int, n: int,
                 pixels: np.ndarray, plane: Plane, row: np.ndarray, col: np.ndarray, pos: np.ndarray,
                 image_type: list[str], extra: dict[str, object]) -> None:
        ds = Dataset()
        _common(ds, **common)  # type: ignore[arg-type]
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = _uid(seed, series_uid, k)
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.ProtocolName = description
        ds.ImageType = image_type
        ds.InstanceNumber = n
        ds.AcquisitionNumber = 1
        ds.MagneticFieldStrength = "1.5"
        ds.ImagingFrequency = "63.68"
        ds.ImagedNucleus = "1H"
        ds.PatientPosition = "HFS"
        ds.BodyPartExamined = "BRAIN"
        ds.SliceThickness = f"{plane.slice_mm:g}"
        ds.SpacingBetweenSlices = f"{plane.slice_mm:g}"
        ds.ImagePositionPatient = [f"{v:.5f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *col)]
        ds.PixelSpacing = [f"{plane.pixel_mm:g}", f"{plane.pixel_mm:g}"]
        ds.Rows, ds.Columns = pixels.shape
        for kw, v in extra.items():
            setattr(ds, kw, v)
        stored = np.clip(np.rint(pixels), 0, 4095).astype(np.uint16)
        ds.WindowCenter, ds.WindowWidth = f"{float(np.percentile(stored, 99)) / 2:.0f}", \
            f"{max(float(np.percentile(stored, 99)), 1.0):.0f}"
        ds.PixelData = stored.tobytes()
        _save(ds, folder / f"MR{n:04d}.dcm")

    for name, (description, base, tilt, matrix, pixel, slices, slice_mm, attrs) in _MR_SERIES.items():
        if name in without:
            number += 1
            continue
        row, col = _tilted(base, tilt)
        if scale != 1.0:
            matrix = (round(matrix[0] * scale), round(matrix[1] * scale))
            pixel, slices, slice_mm = pixel / scale, round(slices * scale), slice_mm / scale
        plane = Plane(tuple(row), tuple(col), matrix, pixel, slices, slice_mm)  # type: ignore[arg-type]
        folder = out / f"{number:02d}_{name}"
        folder.mkdir(parents=True, exist_ok=True)
        series_uid = _uid(seed, "mr-series", name)
        positions = plane.positions()
        for k in range(slices):
            pixels = _noisy(_slice(head, plane, k, _SIGNAL[name]), rng, 12.0)
            instance(folder, series_uid, number, description, k, k + 1, pixels, plane, row, col, positions[k],
                     ["ORIGINAL", "PRIMARY", "M", "ND"], attrs)
        written.append(StudySeries(name, description, folder, series_uid, slices,
                                   "oblique" if tilt else {AXIAL: "axial", SAGITTAL: "sagittal",
                                                           CORONAL: "coronal"}[base]))
        number += 1

    if "localizer" not in without:  # three single slices, one per plane, in one series
        folder = out / f"{number:02d}_localizer"
        folder.mkdir(parents=True, exist_ok=True)
        series_uid = _uid(seed, "mr-series", "localizer")
        for k, base in enumerate((SAGITTAL, CORONAL, AXIAL)):
            row, col = np.asarray(base[0]), np.asarray(base[1])
            plane = Plane(base[0], base[1], (128, 128), 2.0, 1, 8.0)  # type: ignore[arg-type]
            pixels = _noisy(_slice(head, plane, 0, _SIGNAL["T1"], supersample=1), rng, 20.0)
            instance(folder, series_uid, number, "3-PLANE LOC", k, k + 1, pixels, plane, row, col,
                     plane.positions()[0], ["ORIGINAL", "PRIMARY", "LOCALIZER"],
                     {"ScanningSequence": ["GR"], "SequenceVariant": ["SP"], "MRAcquisitionType": "2D",
                      "RepetitionTime": "8.6", "EchoTime": "4.0", "FlipAngle": "20"})
        written.append(StudySeries("localizer", "3-PLANE LOC", folder, series_uid, 3, "three planes"))
    number += 1

    if "DWI" not in without:  # three volumes at the same positions, one per b-value
        folder = out / f"{number:02d}_DWI"
        folder.mkdir(parents=True, exist_ok=True)
        series_uid = _uid(seed, "mr-series", "dwi")
        plane = Plane(AXIAL[0], AXIAL[1], (64, 64), 3.0, 24, 5.0)  # type: ignore[arg-type]
        row, col = np.asarray(AXIAL[0]), np.asarray(AXIAL[1])
        positions = plane.positions()
        adc = np.asarray(_ADC)
        n = 0
        for b in B_VALUES:
            table = tuple(float(s) for s in np.asarray(_SIGNAL["DWI"]) * np.exp(-b * adc))
            for k in range(plane.slices):
                n += 1
                pixels = _noisy(_slice(head, plane, k, table), rng, 15.0)
                instance(folder, series_uid, number, "DWI b0 b500 b1000 AX", n, n, pixels, plane, row, col,
                         positions[k], ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"],
                         {"ScanningSequence": ["EP"], "SequenceVariant": ["SK", "SP"], "MRAcquisitionType": "2D",
                          "RepetitionTime": "4800", "EchoTime": "89", "FlipAngle": "90", "SequenceName": f"*ep_b{b}",
                          "DiffusionBValue": float(b), "DiffusionDirectionality": "ISOTROPIC" if b else "NONE"})
        written.append(StudySeries("DWI", "DWI b0 b500 b1000 AX", folder, series_uid, n, "axial"))

    truth = {"study_uid": study_uid, "frame_of_reference_uid": for_uid, "lesions": [les.to_dict() for les in head.lesions],
             "series": [{"name": s.name, "description": s.description, "folder": s.folder.name,
                         "series_uid": s.series_uid, "instances": s.files, "plane": s.plane} for s in written]}
    (out / "truth.json").write_text(json.dumps(truth, indent=2))
    return written


#: the phases of :func:`write_phase_study`: name -> (description, slice mm, pixel mm, matrix, HU of the aorta,
#: of the kidneys' cortex, of the collecting system)
_PHASES = {
    "artery": ("ABD ARTERIAL 1.5mm", 1.5, 1.6, 160, 320.0, 200.0, 30.0),
    "vein": ("ABD PORTAL VENOUS 3mm", 3.0, 1.8, 140, 160.0, 170.0, 35.0),
    "excret": ("ABD EXCRETORY 5mm", 5.0, 2.0, 128, 120.0, 130.0, 900.0),
}


def write_phase_study(out: Path, *, seed: int = 5200, without: tuple[str, ...] = (),
                      patient_id: str | None = None) -> list[StudySeries]:
    """Write a three-phase contrast CT of the abdomen into ``out`` (arterial, portal venous, excretory: three axial
    series on three grids, one frame of reference), one folder per phase, and ``truth.json`` (the kidneys, a
    renal lesion). The aorta, the kidneys' cortex and the collecting system enhance as each phase would.
    """
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    study_uid, for_uid = _uid(seed, "ct-study"), _uid(seed, "ct-for")
    when = _dt.datetime(2026, 10, 2, 10, 0) + _dt.timedelta(days=seed % 60)
    pid = patient_id or f"SYN-CT-{seed}"
    common = {"seed": seed, "study_uid": study_uid, "for_uid": for_uid, "when": when, "patient_id": pid,
              "patient_name": "SYNTHETIC^ABDOMEN", "modality": "CT",
              "study_description": "CT ABDOMEN 3 PHASE (synthetic)"}
    kidneys = [np.array([-70.0, 40.0, 0.0]), np.array([70.0, 40.0, 5.0])]
    lesion = kidneys[0] + rng.uniform(-12, 12, 3)
    centre = np.array([0.0, 0.0, 0.0])
    written = []
    for number, (name, (description, slice_mm, pixel, size, aorta, cortex, collecting)) in enumerate(
            _PHASES.items(), start=2):
        if name in without:
            continue
        folder = out / f"{number:02d}_{name}"
        folder.mkdir(parents=True, exist_ok=True)
        series_uid = _uid(seed, "ct-series", name)
        n_slices = round(120.0 / slice_mm)
        plane = Plane(AXIAL[0], AXIAL[1], (size, size), pixel, n_slices, slice_mm, (0.0, 0.0, 0.0))
        positions = plane.positions()
        for k in range(n_slices):
            p = plane.points(k)
            d = p - centre
            hu = np.full(p.shape[:2], -1000.0)
            hu[((d[..., 0] / 160) ** 2 + (d[..., 1] / 120) ** 2) <= 1] = -100.0  # fat
            hu[((d[..., 0] / 150) ** 2 + (d[..., 1] / 110) ** 2) <= 1] = 45.0  # soft tissue
            hu[np.hypot(d[..., 0], d[..., 1] - 20) <= 12] = aorta
            for kc in kidneys:
                q = (p - kc) / np.array([28.0, 22.0, 50.0])
                r = np.sqrt((q ** 2).sum(axis=-1))
                hu[r <= 1.0] = cortex
                hu[r <= 0.45] = collecting
            hu[np.linalg.norm(p - lesion, axis=-1) <= 9.0] = 25.0  # a hypo-enhancing renal mass
            hu += rng.normal(0, 12.0, hu.shape)
            stored = np.clip(np.rint(hu + 1024.0), 0, 4095).astype(np.uint16)
            ds = Dataset()
            _common(ds, **common)  # type: ignore[arg-type]
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = _uid(seed, series_uid, k)
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = number
            ds.SeriesDescription = description
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.ContrastBolusAgent = "IOMEPROL"
            ds.InstanceNumber = k + 1
            ds.AcquisitionNumber = number
            ds.KVP = "120"
            ds.PatientPosition = "FFS"
            ds.BodyPartExamined = "ABDOMEN"
            ds.SliceThickness = f"{slice_mm:g}"
            ds.ImagePositionPatient = [f"{v:.5f}" for v in positions[k]]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.PixelSpacing = [f"{pixel:g}", f"{pixel:g}"]
            ds.Rows = ds.Columns = size
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
            ds.WindowCenter, ds.WindowWidth = "50", "400"
            ds.PixelData = stored.tobytes()
            _save(ds, folder / f"CT{k + 1:04d}.dcm")
        written.append(StudySeries(name, description, folder, series_uid, n_slices, "axial"))
    truth = {"study_uid": study_uid, "frame_of_reference_uid": for_uid,
             "kidneys_mm": [[round(float(v), 1) for v in kc] for kc in kidneys],
             "lesion_mm": [round(float(v), 1) for v in lesion],
             "series": [{"name": s.name, "description": s.description, "folder": s.folder.name,
                         "series_uid": s.series_uid, "instances": s.files} for s in written]}
    (out / "truth.json").write_text(json.dumps(truth, indent=2))
    return written
