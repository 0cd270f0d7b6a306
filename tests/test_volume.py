"""Series -> volume: geometry, rescale, and refusals with their messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from node.errors import MissingSlicesError, VolumeError
from node.imaging.regrid import regularize
from node.imaging.spacing import classify_spacing
from node.imaging.volume import load_series
from tests.conftest import SHARED
from tests.dicomgen import make_series


def _marker(shape: tuple[int, int, int], at: tuple[int, int, int]) -> np.ndarray:
    arr = np.full(shape, 24, dtype=np.uint16)  # -1000 HU
    arr[at] = 2024  # +1000 HU
    return arr


def test_axial_geometry_and_rescale(tmp_path: Path) -> None:
    stored = _marker((6, 20, 30), (2, 5, 7))
    paths = make_series(tmp_path, stored, pixel_spacing=(2.0, 1.5), origin=(-10.0, -20.0, 30.0), slope=1.0)
    vol = load_series(paths)
    assert vol.shape == (6, 20, 30)
    assert vol.spacing == pytest.approx((1.5, 2.0, 3.0))  # non-square pixels: column spacing 1.5, row 2.0
    assert vol.pixels.min() == -1000 and vol.pixels.max() == 1000
    k, j, i = np.argwhere(vol.pixels == 1000)[0]
    # pixel (row 5, column 7) of slice 2: x = -10 + 7 * 1.5, y = -20 + 5 * 2.0, z = 30 + 2 * 3
    assert vol.voxel_to_patient(np.array([i, j, k]))[0] == pytest.approx([0.5, -10.0, 36.0])


def test_reversed_and_shuffled_order_is_sorted(tmp_path: Path) -> None:
    stored = np.stack([np.full((8, 8), 100 * k, dtype=np.uint16) for k in range(5)])
    paths = make_series(tmp_path, stored)
    vol = load_series(list(reversed(paths)))
    assert [float(vol.pixels[k, 0, 0]) for k in range(5)] == [100.0 * k - 1024 for k in range(5)]
    vol2 = load_series([paths[3], paths[0], paths[4], paths[1], paths[2]])
    assert np.array_equal(vol.pixels, vol2.pixels)
    # positions given from head to feet: still sorted along the normal
    paths_desc = make_series(tmp_path / "desc", stored[::-1], origin=(0, 0, 12.0), step=(0, 0, -3.0))
    vol3 = load_series(paths_desc)
    assert vol3.affine[2, 2] == pytest.approx(3.0)
    assert vol3.affine[2, 3] == pytest.approx(0.0)


def test_coronal_acquisition(tmp_path: Path) -> None:
    iop = (1, 0, 0, 0, 0, -1)  # rows along x, columns towards the feet; slices step along +y
    stored = _marker((4, 10, 12), (1, 3, 4))
    paths = make_series(tmp_path, stored, iop=iop, origin=(-6.0, -30.0, 50.0), pixel_spacing=(2.0, 1.0))
    vol = load_series(paths)
    k, j, i = np.argwhere(vol.pixels == 1000)[0]
    # x = -6 + 4 * 1.0, y = -30 + 1 * 3, z = 50 - 3 * 2.0
    assert vol.voxel_to_patient(np.array([i, j, k]))[0] == pytest.approx([-2.0, -27.0, 44.0])


def test_rescale_slope(tmp_path: Path) -> None:
    stored = np.full((3, 4, 4), 10, dtype=np.uint16)
    vol = load_series(make_series(tmp_path, stored, slope=2.5, intercept=-5))
    assert float(vol.pixels[0, 0, 0]) == 20.0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sizes": [(8, 8), (8, 8), (8, 10)]}, "mixes matrix sizes 8x8 and 8x10"),
    ({"iops": [(1, 0, 0, 0, 1, 0), (1, 0, 0, 0, 1, 0), (1, 0, 0, 0, 0, -1)]}, "mixes orientations"),
    ({"positions": [(0, 0, 0), (0, 0, 3), (0, 0, 3)]}, "has 2 slices at position 3.00 mm"),
    ({"positions": [(0, 0, 0), (0, 0, 3), (0, 0, 9)]}, "gap of 6.00 mm .* 1 slice\\(s\\) missing"),
])
def test_refusals(tmp_path: Path, kwargs: dict, message: str) -> None:
    stored = np.zeros((3, 8, 8), dtype=np.uint16)
    with pytest.raises(VolumeError, match=message):
        load_series(make_series(tmp_path, stored, **kwargs))


def test_missing_slices_are_their_own_error(tmp_path: Path) -> None:
    stored = np.zeros((5, 8, 8), dtype=np.uint16)
    with pytest.raises(MissingSlicesError, match="2 slice"):
        load_series(make_series(tmp_path, stored, positions=[(0, 0, 0), (0, 0, 2), (0, 0, 4), (0, 0, 10), (0, 0, 12)]))


def test_tilt_and_uneven_spacing_are_read_and_described(tmp_path: Path) -> None:
    stored = np.zeros((5, 8, 8), dtype=np.uint16)
    uneven = load_series(make_series(tmp_path / "u", stored,
                                     positions=[(0, 0, 0), (0, 0, 3), (0, 0, 6), (0, 0, 9.8), (0, 0, 12.8)]))
    assert uneven.uneven and uneven.irregular and "uneven slice spacing from 3.00 to 3.80 mm" in uneven.geometry_note
    # voxel -> patient follows each slice's own position
    assert uneven.voxel_to_patient(np.array([0, 0, 3]))[0][2] == pytest.approx(9.8)
    assert uneven.voxel_to_patient(np.array([0, 0, 3.5]))[0][2] == pytest.approx(11.3)
    tilted = load_series(make_series(tmp_path / "t", stored[:3], positions=[(0, 0, 0), (0, 2.0, 3), (0, 4.0, 6)]))
    assert not tilted.uneven and tilted.tilt_deg == pytest.approx(33.69, abs=0.01)
    assert "gantry tilt 33.7 degrees" in tilted.geometry_note


@pytest.mark.parametrize(("positions", "thickness", "gaps", "uneven"), [
    ([0, 2, 4, 6, 8], None, 0, False),
    ([0, 2, 4, 8, 10], None, 1, False),  # 2x step between 2 mm steps: one slice missing
    ([0, 0.75, 1.5, 3.0], None, 1, False),  # the Siemens excerpt of dicom2nifti
    ([0, 4, 8, 12, 13.08, 20.08, 27.08], [4, 4, 4, 4, 7, 7, 7], 0, True),  # the GE head CT's protocol change
    ([0, 2.5, 5, 10, 15], [2.5, 2.5, 2.5, 5, 5], 0, True),  # 2x, but a run of them and a new thickness
])
def test_spacing_classification(positions: list[float], thickness: list[float] | None, gaps: int,
                                uneven: bool) -> None:
    report = classify_spacing(positions, thickness)
    assert len(report.gaps) == gaps and report.uneven is uneven


def test_non_image_refused(tmp_path: Path) -> None:
    from pydicom import dcmread

    p = make_series(tmp_path, np.zeros((1, 4, 4), dtype=np.uint16))[0]
    ds = dcmread(p)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    for kw in ("Rows", "Columns", "PixelData"):
        delattr(ds, kw)
    ds.save_as(p)
    with pytest.raises(VolumeError, match="no image"):
        load_series([p])


def test_empty_series_refused() -> None:
    with pytest.raises(VolumeError, match="no instances"):
        load_series([])


needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/real_dicom is absent (a user's clone)")


@needs_shared
def test_real_ge_ct_with_gantry_tilt_and_uneven_spacing_is_resampled() -> None:
    vol = load_series(sorted((SHARED / "dcm_qa_ct" / "GE").glob("*.dcm")))
    assert vol.uneven and vol.tilt_deg == pytest.approx(18.5, abs=0.2)
    grid = regularize(vol)
    assert grid is not None
    sx, sy, sz = grid.volume.spacing
    assert sz == pytest.approx(4.22, abs=0.01)  # the median step along the table (13 x 4.2 mm, 1.1, 13 x 7.4 mm)
    # the grid is orthogonal: its axes are perpendicular unit directions times the spacing
    a = grid.volume.affine[:3, :3] / np.array([sx, sy, sz])
    assert np.allclose(a.T @ a, np.eye(3), atol=1e-9)
    # its slices are perpendicular to the table (the stack's advance: z here): axial slices, as a
    # gantry-tilt correction gives them
    assert np.allclose(a[:, 2], [0.0, 0.0, 1.0], atol=1e-6)
    # a label painted on the grid comes back on the original slices at the same patient position
    labels = np.zeros(grid.volume.shape, np.uint8)
    m, jj, ii = grid.volume.shape[0] // 2, grid.volume.shape[1] // 2, grid.volume.shape[2] // 2
    labels[m - 1:m + 2, jj - 5:jj + 5, ii - 5:ii + 5] = 1
    back = grid.to_source(labels)
    assert back.any()
    k, j, i = np.argwhere(back)[len(np.argwhere(back)) // 2]
    p_src = vol.voxel_to_patient(np.array([i, j, k]))[0]
    p_grid = grid.volume.voxel_to_patient(np.array([ii, jj, m]))[0]
    assert np.linalg.norm(p_src - p_grid) < 12.0  # within the 10-voxel box (plus half a 7 mm slice)


@needs_shared
@pytest.mark.parametrize(("folder", "match"), [("001", "gap of 10.00 mm"), ("002", "gap of 1.50 mm")])
def test_real_missing_slice_excerpts_are_refused_as_gaps(folder: str, match: str) -> None:
    files = sorted((SHARED / "dicom2nifti" / "failing" / "sliceincrement" / folder).glob("*.dcm"))
    with pytest.raises(MissingSlicesError, match=f"{match} .* 1 slice"):
        load_series(files)


@needs_shared
def test_real_siemens_tilt_excerpt_is_detected_and_resampled() -> None:
    """dicom2nifti's Siemens excerpt (GantryDetectorTilt not filled in): the tilt shows in the geometry."""
    vol = load_series(sorted((SHARED / "dicom2nifti" / "failing" / "gantrytilting" / "001").glob("*.dcm")))
    assert vol.irregular and vol.tilt_deg == pytest.approx(14.0, abs=0.1) and not vol.uneven
    grid = regularize(vol)
    assert grid is not None and not grid.volume.irregular
    # slices perpendicular to the table: the tilted planes span more of it than the 4 slice positions do
    assert grid.volume.shape[0] > 4 and grid.volume.shape[2] == vol.shape[2]


@needs_shared
@pytest.mark.parametrize("folder", ["dcm_qa_enh/Siemens/XA10", "dcm_qa_frag/5001_anat-T1w_acq-tfl"])
def test_real_mr_series_load(folder: str) -> None:
    files = sorted((SHARED / folder).glob("*.dcm"))
    if folder.startswith("dcm_qa_enh"):
        files = files[:1]  # one enhanced multi-frame file is one volume
    vol = load_series(files)
    assert vol.pixels.ndim == 3 and vol.pixels.shape[0] > 1
    assert np.isfinite(vol.pixels).all()
    assert all(s > 0 for s in vol.spacing)


@pytest.mark.parametrize(("slope", "intercept", "message"), [
    (float("nan"), -1024.0, "RescaleSlope is nan"),
    (1.0, float("inf"), "RescaleIntercept is inf"),
    (0.0, 0.0, "RescaleSlope is 0"),
])
def test_a_rescale_that_is_not_a_finite_number_is_refused_by_name(tmp_path: Path, slope: float, intercept: float,
                                                                  message: str) -> None:
    """A NaN slope would make every voxel NaN and every statistic after it (the stored result, the drift metrics)."""
    stored = np.full((3, 4, 4), 10, dtype=np.uint16)
    with pytest.raises(VolumeError, match=message):
        load_series(make_series(tmp_path, stored, slope=slope, intercept=intercept))
