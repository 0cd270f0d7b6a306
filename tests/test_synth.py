"""The synthetic generator: geometry, HU ranges, lesions and their ground-truth SEG."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import dcmread

from node.devtools.synth.phantom import CaseGeometry, make_phantom
from node.devtools.synth.writer import write_case
from tests.conftest import SMALL


def test_same_seed_same_case() -> None:
    a = make_phantom(7, SMALL)
    b = make_phantom(7, SMALL)
    assert np.array_equal(a.hu, b.hu)
    assert [les.center for les in a.lesions] == [les.center for les in b.lesions]
    c = make_phantom(8, SMALL)
    assert not np.array_equal(a.hu, c.hu)


def test_hu_ranges_are_plausible() -> None:
    ph = make_phantom(11, CaseGeometry(size=128, slices=32, spacing_xy=2.8125, spacing_z=5.0), n_lesions=1)
    hu = ph.hu
    assert hu.min() >= -1024 and hu.max() <= 3071
    corner = hu[:, :5, :5]
    assert abs(float(corner.mean()) + 1000) < 15  # air outside the body
    mid = hu[16]
    lung_like = mid[(mid > -950) & (mid < -700)]
    assert lung_like.size > 500  # lung parenchyma present
    assert (mid > 300).sum() > 20  # bone present (spine, ribs)
    soft = mid[(mid > -20) & (mid < 100)]
    assert soft.size > 1000  # soft tissue


def test_lesions_have_requested_count_size_and_label() -> None:
    ph = make_phantom(5, CaseGeometry(size=128, slices=40, spacing_xy=2.8125, spacing_z=2.5), n_lesions=3)
    assert len(ph.lesions) == 3
    for les in ph.lesions:
        assert 3.0 <= les.diameter_mm <= 30.0
        assert les.kind in ("solid", "part-solid")
        assert les.attached_to in ("none", "pleura", "vessel")
        assert (ph.labels == les.index).sum() == les.voxels > 0
    # lesion centres lie inside the labelled lesions' bounding region
    g = ph.geometry
    x0, y0, z0 = g.origin
    for les in ph.lesions:
        k = round((les.center[2] - z0) / g.spacing_z)
        j = round((les.center[1] - y0) / g.spacing_xy)
        i = round((les.center[0] - x0) / g.spacing_xy)
        window = ph.labels[max(k - 2, 0):k + 3, max(j - 3, 0):j + 4, max(i - 3, 0):i + 4]
        assert (window == les.index).any()


def test_written_series_geometry(small_series: Path) -> None:
    files = sorted(small_series.glob("*.dcm"))
    assert len(files) == SMALL.slices
    dss = [dcmread(f) for f in files]
    z = [float(ds.ImagePositionPatient[2]) for ds in dss]
    assert np.allclose(np.diff(z), SMALL.spacing_z)
    for ds in dss:
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in ds.PixelSpacing] == [SMALL.spacing_xy] * 2
        assert ds.Rows == ds.Columns == SMALL.size
        assert ds.BodyPartExamined == "CHEST"
    assert len({ds.SeriesInstanceUID for ds in dss}) == 1
    hu = dss[0].pixel_array * float(dss[0].RescaleSlope) + float(dss[0].RescaleIntercept)
    assert hu.min() >= -1024


def test_ground_truth_seg_matches_lesions(tmp_path: Path) -> None:
    ph = make_phantom(21, SMALL, n_lesions=2)
    info = write_case(ph, tmp_path / "case", seed=21)
    assert len(info["lesions"]) == 2  # type: ignore[arg-type]
    seg = hd.seg.segread(tmp_path / "case" / "ground_truth_seg.dcm")
    images = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
              for p in (tmp_path / "case" / "image").glob("*.dcm")}
    order = sorted(images, key=lambda u: float(dcmread(images[u], stop_before_pixels=True).ImagePositionPatient[2]))
    mask = seg.get_pixels_by_source_instance(source_sop_instance_uids=order, segment_numbers=[1],
                                             assert_missing_frames_are_empty=True)[..., 0]
    assert np.array_equal(mask.astype(bool), ph.mask)


def test_case_without_lesions_gets_an_empty_seg(tmp_path: Path) -> None:
    ph = make_phantom(3, SMALL, n_lesions=0)
    write_case(ph, tmp_path / "case", seed=3)
    seg = hd.seg.segread(tmp_path / "case" / "ground_truth_seg.dcm")
    assert seg.number_of_segments == 1
