"""Build small CT series with arbitrary geometry for volume/SEG tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def make_series(out: Path, stored: np.ndarray, *, iop: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
                origin: tuple[float, float, float] = (-100.0, -100.0, -50.0), pixel_spacing: tuple[float, float] = (2.0, 2.0),
                step: tuple[float, float, float] | None = None, slope: float = 1.0, intercept: float = -1024.0,
                positions: list[tuple[float, float, float]] | None = None, sizes: list[tuple[int, int]] | None = None,
                iops: list[tuple[float, ...]] | None = None, sop_class: str = CTImageStorage,
                thicknesses: list[float] | None = None) -> list[Path]:
    """Write ``stored[k]`` as slice k (uint16 stored values) and return the paths (slice order).

    Slice k is at ``origin + k * step`` (step defaults to 3 mm along the slice normal) unless
    ``positions`` gives each position.
    """
    out.mkdir(parents=True, exist_ok=True)
    row, col = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row, col)
    step_v = np.array(step) if step is not None else normal * 3.0
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for k in range(stored.shape[0]):
        arr = stored[k]
        if sizes is not None:
            arr = np.zeros(sizes[k], dtype=np.uint16)
        ds = Dataset()
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        ds.PatientName, ds.PatientID = "GEOMETRY^TEST", "GEO1"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", "", ""
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, k + 1
        ds.PatientBirthDate, ds.PatientSex = "", ""
        ds.Manufacturer = "test"
        ds.BodyPartExamined = "CHEST"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PositionReferenceIndicator = ""
        pos = np.array(positions[k]) if positions is not None else np.array(origin) + k * step_v
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (iops[k] if iops is not None else iop)]
        ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
        ds.SliceThickness = f"{thicknesses[k]:g}" if thicknesses is not None else "3"
        ds.KVP = "120"
        ds.AcquisitionNumber = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = arr.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:g}", f"{intercept:g}", "HU"
        ds.PixelData = arr.astype(np.uint16).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        p = out / f"IM{k:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths
