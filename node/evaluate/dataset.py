"""Labelled datasets: image series with references beside them.

Any nesting is accepted. Every DICOM file under the root is read once (header only): image instances
are grouped by Series Instance UID. References:

- **regions** (segmentation and detection models): a DICOM SEG, matched to the image series its
  Referenced Series Sequence names, or a NIfTI label file (``*.nii``, ``*.nii.gz``) matched to the image
  series in the same folder (or its parent's);
- **classes** (classification models): ``classes.csv`` at the dataset's root, one row per series with
  columns ``series`` (a Series Instance UID, or the series' folder relative to the root) and ``class``
  (the class name as the model card names it).

A series with either kind of reference is a case. Problems (a SEG whose series is missing, an image
series without reference, two references for one series, a classes.csv row naming no series) are
collected, not raised: the report lists them.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from node.errors import VolumeError
from node.imaging.volume import Volume

__all__ = ["Case", "Dataset", "discover", "load_reference"]

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass
class Case:
    name: str
    series_uid: str
    image_files: list[Path]
    #: the reference segmentation (SEG or NIfTI), None for a case with a class reference only
    reference: Path | None = None
    #: the reference class (classes.csv), None when the case has none
    reference_class: str | None = None


@dataclass
class Dataset:
    root: Path
    cases: list[Case] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def discover(root: Path) -> Dataset:
    """Find the (image series, reference) pairs under ``root``."""
    out = Dataset(root=root)
    series: dict[str, list[Path]] = defaultdict(list)
    segs: dict[str, list[Path]] = defaultdict(list)
    nifti: list[Path] = []
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        if p.name.endswith((".nii", ".nii.gz")):
            nifti.append(p)
            continue
        try:
            ds = dcmread(p, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if str(ds.get("SOPClassUID", "")) == SEG_CLASS:
            ref_uids = [str(s.SeriesInstanceUID) for s in ds.get("ReferencedSeriesSequence", [])]
            if not ref_uids:
                out.problems.append(f"{p.relative_to(root)}: SEG without Referenced Series Sequence")
            for r in ref_uids:
                segs[r].append(p)
        elif "SeriesInstanceUID" in ds and ds.get("Rows"):
            series[str(ds.SeriesInstanceUID)].append(p)
    folder_of = {uid: files[0].parent for uid, files in series.items()}
    classes = _read_classes(root, folder_of, out.problems)
    for label in nifti:
        match = [uid for uid, d in folder_of.items() if d in (label.parent, label.parent.parent) or
                 d.parent == label.parent]
        if len(match) == 1:
            segs[match[0]].append(label)
        else:
            out.problems.append(f"{label.relative_to(root)}: NIfTI label matches {len(match)} image series; "
                                "expected one in the same folder")
    for uid, refs in segs.items():
        if uid not in series:
            out.problems.append(f"{refs[0].relative_to(root)}: references series {uid}, which is not in the dataset")
    for uid, files in sorted(series.items(), key=lambda kv: str(kv[1][0])):
        refs = segs.get(uid, [])
        rel = files[0].parent.relative_to(root)
        if not refs and uid not in classes:
            out.problems.append(f"{rel}: image series {uid} has no reference (segmentation or class)")
            continue
        if len(refs) > 1:
            out.problems.append(f"{rel}: {len(refs)} references for series {uid}; using {refs[0].name}")
        name = str(rel).replace("/", "_") if str(rel) != "." else uid
        if name.endswith("_image"):
            name = name[: -len("_image")]
        out.cases.append(Case(name=name, series_uid=uid, image_files=files, reference=refs[0] if refs else None,
                              reference_class=classes.get(uid)))
    return out


def _read_classes(root: Path, folder_of: dict[str, Path], problems: list[str]) -> dict[str, str]:
    """``classes.csv``: series UID -> reference class (rows naming no series of the dataset are problems)."""
    path = root / "classes.csv"
    if not path.is_file():
        return {}
    by_folder = {str(d.relative_to(root)): uid for uid, d in folder_of.items()}
    out: dict[str, str] = {}
    with path.open(newline="") as f:
        for n, row in enumerate(csv.DictReader(f), start=2):
            key, value = (row.get("series") or "").strip(), (row.get("class") or "").strip()
            uid = key if key in folder_of else by_folder.get(key.strip("/"))
            if uid is None or not value:
                problems.append(f"classes.csv line {n}: {key!r} names no image series of the dataset"
                                if uid is None else f"classes.csv line {n}: no class")
                continue
            out[uid] = value
    return out


def load_reference(case: Case, volume: Volume, *, label_map: dict[str, int] | None = None) -> np.ndarray:
    """The reference label map on the volume's grid ``[k, j, i]``.

    SEG: each segment becomes the label whose name (or type code meaning) matches in ``label_map``,
    else its segment number. NIfTI: the label array, reoriented to the series grid (it must be the same
    grid up to axis order and flips).

    Raises:
        VolumeError: the reference does not fit the series.
    """
    if case.reference is None:
        raise VolumeError(f"case {case.name} has no reference segmentation (a class reference only)")
    if case.reference.name.endswith((".nii", ".nii.gz")):
        return _load_nifti(case.reference, volume)
    import highdicom as hd

    seg = hd.seg.segread(case.reference)
    uids = [str(volume.sources[f.source].SOPInstanceUID) for f in volume.frames]
    numbers = [int(d.SegmentNumber) for d in seg.SegmentSequence]
    try:
        arr = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=numbers,
                                                assert_missing_frames_are_empty=True)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise VolumeError(f"{case.reference.name}: the SEG does not map onto series {case.series_uid}: {exc}") from exc
    out = np.zeros(volume.shape, dtype=np.uint8)
    for idx, d in enumerate(seg.SegmentSequence):
        value = int(d.SegmentNumber)
        if label_map:
            keys = [str(d.SegmentLabel).lower(), str(d.SegmentedPropertyTypeCodeSequence[0].CodeMeaning).lower()]
            value = next((label_map[k] for k in keys if k in label_map), value)
        out[arr[..., idx] > 0] = value
    return out


def _load_nifti(path: Path, volume: Volume) -> np.ndarray:
    import nibabel as nib

    img: Any = nib.load(str(path))
    data = np.asarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    ras = volume.ras_affine()
    ornt_src = nib.orientations.io_orientation(img.affine)
    ornt_dst = nib.orientations.io_orientation(ras)
    transform = nib.orientations.ornt_transform(ornt_src, ornt_dst)
    data = nib.orientations.apply_orientation(data, transform)  # now in the series' (i, j, k) axes
    if data.shape != (volume.shape[2], volume.shape[1], volume.shape[0]):
        raise VolumeError(f"{path.name}: label grid {data.shape} does not match the series grid "
                          f"{(volume.shape[2], volume.shape[1], volume.shape[0])} (i, j, k)")
    return np.ascontiguousarray(np.rint(data).astype(np.uint8).transpose(2, 1, 0))
