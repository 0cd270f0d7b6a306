"""Write synthetic phantoms as a CT Image Storage series plus a ground-truth DICOM SEG."""

from __future__ import annotations

import datetime as _dt
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from node import __version__
from node.devtools.synth.phantom import Phantom

__all__ = ["SYNTH_UID_ROOT", "write_case", "write_ground_truth_seg", "write_series", "write_tracked_truth_seg"]

logger = logging.getLogger(__name__)

#: UID root for synthetic objects (a UUID-derived root would also do; this one is stable for tests).
SYNTH_UID_ROOT = "1.2.826.0.1.3680043.10.1473."

LESION_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure
LESION_TYPE = codes.SCT.Nodule


def _uid(seed: int, *parts: object) -> str:
    """A deterministic UID for (seed, parts): the same case always gets the same UIDs."""
    return generate_uid(prefix=SYNTH_UID_ROOT, entropy_srcs=[str(seed), *map(str, parts)])


@dataclass(frozen=True)
class TiltedStack:
    """A phantom sampled on gantry-tilted planes, as a tilted acquisition would give it."""

    hu: np.ndarray  # [k, j, i]
    labels: np.ndarray  # lesion labels on the same planes (nearest neighbour)
    positions: list[tuple[float, float, float]]  # ImagePositionPatient per slice
    orientation: tuple[float, float, float, float, float, float]  # ImageOrientationPatient


def tilted_stack(phantom: Phantom, tilt_deg: float, *, noise_hu: float = 0.0, seed: int = 0) -> TiltedStack:
    """Sample the phantom on planes tilted by ``tilt_deg`` about the patient's left-right axis.

    Rows run along x; columns along (0, cos t, -sin t); the table moves along z, so successive slice
    origins step along z by ``spacing_z / cos t`` (``spacing_z`` along the slice normal): the stack is
    sheared, exactly as a tilted gantry makes it. Only planes that cross the body inside the phantom's
    z-range are kept (a real tilted plane never ends in the middle of the patient). HU: trilinear;
    labels: nearest; outside the phantom: air. Sample a phantom made with ``noise_hu=0`` and give the
    noise here (``noise_hu``): interpolating a noisy phantom would blur its noise, which a scanner's
    tilted slices do not have.
    """
    from scipy import ndimage

    geom = phantom.geometry
    t = np.radians(tilt_deg)
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, np.cos(t), -np.sin(t)])
    x0, y0, z0 = geom.origin
    z1 = z0 + (geom.slices - 1) * geom.spacing_z
    body_rows = np.where((phantom.hu > -500).any(axis=(0, 2)))[0]
    y_lo, y_hi = y0 + body_rows.min() * geom.spacing_xy, y0 + body_rows.max() * geom.spacing_xy
    # a plane through (y, z) = (0, zc) is at z = zc - y tan t: keep zc where the body part stays inside
    reach = max(abs(y_lo), abs(y_hi)) * abs(np.tan(t))
    step = geom.spacing_z / np.cos(t)
    n = int(np.floor((z1 - z0 - 2 * reach) / step)) + 1
    if n < 2:
        raise ValueError(f"a {tilt_deg} degree tilt leaves no plane inside this phantom")
    zc_first = (z0 + z1) / 2.0 - (n - 1) * step / 2.0
    half_height = (geom.size - 1) * geom.spacing_xy / 2.0
    rng = np.random.default_rng(seed)
    jj, ii = np.meshgrid(np.arange(geom.size), np.arange(geom.size), indexing="ij")
    hu = np.empty((n, geom.size, geom.size), dtype=np.float32)
    labels = np.empty((n, geom.size, geom.size), dtype=phantom.labels.dtype)
    positions = []
    for k in range(n):
        ipp = np.array([x0, 0.0, zc_first + k * step]) - half_height * col
        p = ipp[:, None, None] + ii[None] * geom.spacing_xy * row[:, None, None] \
            + jj[None] * geom.spacing_xy * col[:, None, None]
        coords = np.stack([(p[2] - z0) / geom.spacing_z, (p[1] - y0) / geom.spacing_xy,
                           (p[0] - x0) / geom.spacing_xy])
        hu[k] = ndimage.map_coordinates(phantom.hu, coords, order=1, mode="constant", cval=-1000.0)
        if noise_hu:
            hu[k] += rng.normal(0.0, noise_hu, hu[k].shape).astype(np.float32) * (hu[k] > -990.0)
        labels[k] = ndimage.map_coordinates(phantom.labels, coords, order=0, mode="constant", cval=0)
        positions.append((float(ipp[0]), float(ipp[1]), float(ipp[2])))
    return TiltedStack(hu=hu, labels=labels, positions=positions,
                       orientation=(1.0, 0.0, 0.0, 0.0, float(col[1]), float(col[2])))


def write_series(phantom: Phantom, out_dir: Path, *, seed: int, patient_name: str = "SYNTHETIC^CHEST",
                 patient_id: str | None = None, compress: bool = False, tilt_deg: float = 0.0,
                 noise_hu: float = 0.0, when: _dt.datetime | None = None) -> list[Path]:
    """Write the phantom's HU volume as single-frame CT instances, one file per slice.

    ``tilt_deg`` writes it as a gantry-tilted acquisition (:func:`tilted_stack`, which adds ``noise_hu``
    after sampling: pass a phantom made without noise), with GantryDetectorTilt. ``when``: the study's date and
    time (default: one derived from the seed).

    Returns:
        The written paths, in slice order.
    """
    geom = phantom.geometry
    out_dir.mkdir(parents=True, exist_ok=True)
    tilted = tilted_stack(phantom, tilt_deg, noise_hu=noise_hu, seed=seed) if tilt_deg else None
    study_uid = _uid(seed, "study")
    series_uid = _uid(seed, "series")
    for_uid = _uid(seed, "for")
    if when is None:
        when = _dt.datetime(2026, 1, 1, 9, 0, 0) + _dt.timedelta(days=seed % 300, minutes=seed % 600)
    pid = patient_id or f"SYN{seed:06d}"
    stored = np.clip(np.rint((tilted.hu if tilted else phantom.hu) + 1024.0), 0, 4095).astype(np.uint16)
    x0, y0, z0 = geom.origin
    paths: list[Path] = []
    for k in range(stored.shape[0]):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = _uid(seed, "instance", k)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = when.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = when.strftime("%H%M%S")
        ds.AccessionNumber = f"ACC{seed:06d}"
        ds.Modality = "CT"
        ds.Manufacturer = "preannot synthetic phantom"
        ds.ManufacturerModelName = "node.devtools.synth"
        ds.SoftwareVersions = __version__
        ds.InstitutionName = "Synthetic Hospital"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "CT CHEST (synthetic)"
        ds.SeriesDescription = "Chest 2.5 mm (synthetic phantom)"
        ds.PatientName = patient_name
        ds.PatientID = pid
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "O"
        ds.PatientAge = "066Y"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = f"{geom.spacing_z:g}"
        ds.KVP = "120"
        ds.PatientPosition = "FFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        if tilted is None:
            ds.ImagePositionPatient = [f"{x0:.5f}", f"{y0:.5f}", f"{z0 + k * geom.spacing_z:.5f}"]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.SliceLocation = f"{z0 + k * geom.spacing_z:.5f}"
        else:
            ds.ImagePositionPatient = [f"{v:.5f}" for v in tilted.positions[k]]
            ds.ImageOrientationPatient = [f"{v:.8f}" for v in tilted.orientation]
            ds.SliceLocation = f"{tilted.positions[k][2]:.5f}"
            ds.GantryDetectorTilt = f"{tilt_deg:g}"
        ds.PixelSpacing = [f"{geom.spacing_xy:.6g}", f"{geom.spacing_xy:.6g}"]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = geom.size
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = ["-600", "40"]
        ds.WindowWidth = ["1500", "400"]
        ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
        ds.PixelData = stored[k].tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        if compress:
            ds.compress(RLELossless, stored[k], generate_instance_uid=False)
        path = out_dir / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_ground_truth_seg(phantom: Phantom, source_paths: list[Path], out_path: Path, *, seed: int) -> Path:
    """Write the phantom's lesion mask as a binary DICOM SEG referencing the source series.

    All lesions share one segment ("Nodule"); a case without lesions gets a SEG with one empty frame.
    """
    from pydicom import dcmread

    sources = [dcmread(p, stop_before_pixels=True) for p in source_paths]
    mask = phantom.mask.astype(np.uint8)
    desc = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Nodule",
        segmented_property_category=LESION_CATEGORY,
        segmented_property_type=LESION_TYPE,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        anatomic_regions=[codes.SCT.Lung],
        tracking_uid=_uid(seed, "gt-track"),
        tracking_id="ground truth: all lesions",
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[desc],
        series_instance_uid=_uid(seed, "gt-series"),
        series_number=900,
        sop_instance_uid=_uid(seed, "gt-instance"),
        instance_number=1,
        manufacturer="preannot synthetic phantom",
        manufacturer_model_name="node.devtools.synth ground truth",
        software_versions=__version__,
        device_serial_number="synthetic",
        series_description="Ground truth lesions (synthetic)",
        content_label="GROUNDTRUTH",
        omit_empty_frames=bool(mask.any()),
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out_path)
    return out_path


def write_tracked_truth_seg(labels: np.ndarray, lesions: dict[int, tuple[str, str]], source_paths: list[Path],
                            out_path: Path, *, seed: int) -> Path:
    """A ground-truth SEG with one segment per lesion (``lesions``: label value -> (tracking UID, tracking ID)):
    a lesion keeps its tracking UID at every time point, so a longitudinal set states which lesion is which."""
    from pydicom import dcmread

    sources = [dcmread(p, stop_before_pixels=True) for p in source_paths]
    values = [v for v in sorted(lesions) if (labels == v).any()]
    descriptions = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=lesions[v][1][:64], segmented_property_category=LESION_CATEGORY,
        segmented_property_type=LESION_TYPE, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        anatomic_regions=[codes.SCT.Lung], tracking_uid=lesions[v][0], tracking_id=lesions[v][1][:64])
        for n, v in enumerate(values, start=1)]
    stack = np.zeros((*labels.shape, max(len(values), 1)), dtype=np.uint8)
    for n, v in enumerate(values):
        stack[..., n] = labels == v
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=stack if values else stack[..., 0],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions or [hd.seg.SegmentDescription(
            segment_number=1, segment_label="none", segmented_property_category=LESION_CATEGORY,
            segmented_property_type=LESION_TYPE, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)],
        series_instance_uid=_uid(seed, "gt-series", out_path.name), series_number=900,
        sop_instance_uid=_uid(seed, "gt-instance", out_path.name), instance_number=1,
        manufacturer="preannot synthetic phantom", manufacturer_model_name="node.devtools.synth ground truth",
        software_versions=__version__, device_serial_number="synthetic",
        series_description="Ground truth lesions, tracked (synthetic)", content_label="GROUNDTRUTH",
        omit_empty_frames=bool(values))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out_path)
    return out_path


def write_case(phantom: Phantom, case_dir: Path, *, seed: int, compress: bool = False,
               ground_truth: bool = True, patient_name: str | None = None) -> dict[str, object]:
    """Write one labelled case: ``image/`` (CT series), ``ground_truth_seg.dcm`` and ``ground_truth.json``.

    Returns:
        The ground-truth description written to ``ground_truth.json``.
    """
    image_dir = case_dir / "image"
    paths = write_series(phantom, image_dir, seed=seed, compress=compress,
                         patient_name=patient_name or f"SYNTHETIC^CASE{seed:04d}")
    info: dict[str, object] = {
        "seed": seed,
        "geometry": asdict(phantom.geometry),
        "lesions": [asdict(les) for les in phantom.lesions],
    }
    if ground_truth:
        write_ground_truth_seg(phantom, paths, case_dir / "ground_truth_seg.dcm", seed=seed)
        (case_dir / "ground_truth.json").write_text(json.dumps(info, indent=2))
    return info
