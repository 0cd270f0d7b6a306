"""Synthetic digital mammograms (Digital Mammography X-Ray Image, for presentation) with a known breast density.

A breast outline (a half ellipse against the chest wall) holds fatty tissue and fibroglandular tissue; the
share of fibroglandular tissue follows the ACR BI-RADS composition category asked (A: almost entirely fat,
B: scattered fibroglandular densities, C: heterogeneously dense, D: extremely dense), drawn as a smoothed
random texture thresholded at that share. The images exist to exercise classifiers end to end (the node's
reading of projection images, the Model Zoo's breast density bundle, the SR's class statements,
evaluation of classification): they look like mammograms to a program, not to a radiologist.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from node import __version__

__all__ = ["DENSITY_FRACTIONS", "make_mammogram", "write_mammogram"]

#: share of the breast that is fibroglandular, per BI-RADS composition category
DENSITY_FRACTIONS = {"A": 0.10, "B": 0.35, "C": 0.62, "D": 0.85}

_MG_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.2")
_ROOT = "1.2.826.0.1.3680043.10.1473."


def make_mammogram(seed: int, density: str, *, rows: int = 384, cols: int = 288) -> np.ndarray:
    """A 12-bit mammogram (``[rows, cols]`` uint16, MONOCHROME2) of the given BI-RADS density (A-D)."""
    from scipy import ndimage

    if density not in DENSITY_FRACTIONS:
        raise ValueError(f"density {density!r}: expected one of {sorted(DENSITY_FRACTIONS)}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:rows, :cols].astype(np.float64)
    # the chest wall on the left edge; the breast a half ellipse reaching 80-90 % of the width
    reach = cols * rng.uniform(0.78, 0.9)
    half_height = rows * rng.uniform(0.40, 0.46)
    centre = rows / 2 + rng.uniform(-0.04, 0.04) * rows
    breast = (xx / reach) ** 2 + ((yy - centre) / half_height) ** 2 <= 1.0
    # fibroglandular tissue: a smooth random field, densest near the nipple's axis, thresholded at the share
    field = ndimage.gaussian_filter(rng.normal(size=(rows, cols)), sigma=rows / 40)
    field += 0.6 * np.exp(-(((yy - centre) / (0.5 * half_height)) ** 2)) * field.std()
    inside = field[breast]
    share = DENSITY_FRACTIONS[density]
    threshold = np.quantile(inside, 1.0 - share) if inside.size else 0.0
    gland = breast & (field >= threshold)
    thickness = np.sqrt(np.clip(1.0 - (xx / reach) ** 2 - ((yy - centre) / half_height) ** 2, 0, 1))
    img = np.full((rows, cols), 60.0)
    img[breast] = 700.0 + 500.0 * thickness[breast]
    img[gland] += 1300.0 * (0.6 + 0.4 * thickness[gland])
    img = ndimage.gaussian_filter(img, 1.2) + rng.normal(0, 25.0, size=img.shape)
    return np.clip(np.rint(img), 0, 4095).astype(np.uint16)


def write_mammogram(out_dir: Path, *, seed: int, density: str, laterality: str = "L", view: str = "CC",
                    patient_id: str = "SYNTH-MG", patient_name: str = "SYNTHETIC^MAMMO", study_uid: str | None = None,
                    series_uid: str | None = None, instance_number: int = 1, pixel_spacing_mm: float = 0.5) -> Path:
    """Write one mammogram as a DICOM file in ``out_dir``; returns its path."""
    pixels = make_mammogram(seed, density)
    out_dir.mkdir(parents=True, exist_ok=True)
    sop_uid = generate_uid(prefix=_ROOT, entropy_srcs=["mammo", str(seed), laterality, view])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _MG_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    now = _dt.datetime(2026, 11, 2, 9, 30)
    ds.SOPClassUID, ds.SOPInstanceUID = _MG_FOR_PRESENTATION, sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid(prefix=_ROOT, entropy_srcs=["mammo-study", str(seed)])
    ds.SeriesInstanceUID = series_uid or generate_uid(prefix=_ROOT, entropy_srcs=["mammo-series", str(seed)])
    ds.Modality, ds.PatientName, ds.PatientID = "MG", patient_name, patient_id
    ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = "19700101", "F", "056Y"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = f"MG{seed}", "1", ""
    ds.SeriesNumber, ds.InstanceNumber = 1, instance_number
    ds.Manufacturer, ds.ManufacturerModelName = "preannot synthetic", "mammo phantom"
    ds.SoftwareVersions = f"preannot {__version__}"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined = "BREAST"
    ds.ImageLaterality = ds.Laterality = laterality
    ds.ViewPosition = view
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.PatientOrientation = ["A", "R"] if laterality == "L" else ["P", "L"]
    ds.BurnedInAnnotation = "NO"
    ds.ImagerPixelSpacing = ds.PixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.WindowCenter, ds.WindowWidth = 1400, 2800
    ds.PixelData = pixels.tobytes()
    path = out_dir / f"MG_{laterality}{view}_{seed}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
