"""A gantry-tilted series gets results as good as its untilted twin: the model sees an orthogonal
resampling, the SEG sits on the original tilted instances, and its mask overlaps the known lesions.

Two models: a bundle that thresholds the image (it sees exactly what the resampling gives it, so the
geometry is measured alone: resampling, labels mapped back, SEG frames, measurements), and the demo
model on a tilted chest phantom (a learned model also reacts to the interpolation)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from node.devtools.synth.phantom import CaseGeometry, Phantom, make_phantom
from node.devtools.synth.writer import tilted_stack, write_series
from node.inference.registry import Registry
from node.inference.runner import BundleRunner
from node.outputs.equipment import Provenance
from node.processing.pipeline import ModelContext, process_series
from tests.conftest import SHARED
from tests.test_bundle_isolation import _bundle as _bundle_layout

TILT = 20.0

_THRESHOLD_NET = '''
import torch


class Threshold(torch.nn.Module):
    """Label 1 where the image is above -300 HU: a model that sees exactly what it is given."""

    def forward(self, x):
        return (x > -300.0).float()
'''


def _threshold_bundle(root: Path) -> Path:
    """A bundle (the isolation test's layout) whose network thresholds the image and has no postprocessing."""
    _bundle_layout(root, "threshold", 1, (0, 0, 0))
    b = root / "threshold"
    (b / "scripts" / "net.py").write_text(_THRESHOLD_NET)
    cfg = json.loads((b / "configs" / "inference.json").read_text())
    cfg["network_def"] = {"_target_": "scripts.net.Threshold"}
    cfg["postprocessing"]["transforms"] = []
    (b / "configs" / "inference.json").write_text(json.dumps(cfg))
    return b


def _sphere(noise_hu: float, *, radius_mm: float = 12.0) -> Phantom:
    """A 24 mm sphere of soft tissue (40 HU) in lung-like air (-800 HU), on the default chest grid."""
    geom = CaseGeometry(size=160, slices=72, spacing_xy=1.5, spacing_z=2.5)
    x0, y0, z0 = geom.origin
    z = z0 + np.arange(geom.slices) * geom.spacing_z
    y = y0 + np.arange(geom.size) * geom.spacing_xy
    x = x0 + np.arange(geom.size) * geom.spacing_xy
    centre = (8.0, -10.0, 4.0)
    r2 = (x[None, None] - centre[0]) ** 2 + (y[None, :, None] - centre[1]) ** 2 + (z[:, None, None] - centre[2]) ** 2
    inside = r2 <= radius_mm ** 2
    hu = np.where(inside, 40.0, -800.0).astype(np.float32)
    hu += np.random.default_rng(5).normal(0.0, noise_hu, hu.shape).astype(np.float32)
    return Phantom(geometry=geom, hu=hu, labels=inside.astype(np.uint8))


def _seg_dice(seg_path: Path, sources: list[Path], truth: np.ndarray) -> float:
    """Dice between the SEG's mask on each source instance and the truth on the same slices."""
    seg = hd.seg.segread(seg_path)
    by_uid = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): k for k, p in enumerate(sources)}
    pred = np.zeros(truth.shape, dtype=bool)
    for _study, _series, sop in seg.get_source_image_uids():
        mask = seg.get_pixels_by_source_instance(source_sop_instance_uids=[sop], combine_segments=True,
                                                 assert_missing_frames_are_empty=True)[0]
        pred[by_uid[sop]] = mask > 0
    inter = float((pred & truth).sum())
    return 2 * inter / float(pred.sum() + truth.sum())


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    phantom = make_phantom(200007, n_lesions=3)  # the default 256 x 256 x 96 chest, three lesions
    clean = make_phantom(200007, n_lesions=3, noise_hu=0.0)  # the same anatomy: the tilted scan adds its noise
    root = tmp_path_factory.mktemp("tilt")
    straight = write_series(phantom, root / "straight", seed=71)
    tilted = write_series(clean, root / "tilted", seed=72, tilt_deg=TILT, noise_hu=18.0)
    return {"phantom": phantom, "straight": straight, "tilted": tilted, "root": root}


def test_tilted_sphere_geometry_matches_its_untilted_twin(tmp_path: Path, dciodvfy: Any) -> None:
    _threshold_bundle(tmp_path / "models")
    model = Registry(tmp_path / "models").get("threshold")
    ctx = ModelContext(model, BundleRunner(model, device="cpu"), Provenance(model=model))
    straight = write_series(_sphere(18.0), tmp_path / "straight", seed=81)
    clean = _sphere(0.0)
    tilted = write_series(clean, tmp_path / "tilted", seed=82, tilt_deg=TILT, noise_hu=18.0)
    out_s = process_series(straight, ctx, tmp_path / "out-straight")
    out_t = process_series(tilted, ctx, tmp_path / "out-tilted")
    assert out_s.result.resampled is None and out_t.result.resampled["reason"] == f"gantry tilt {TILT:.1f} degrees"
    for f in ("seg", "sr"):
        assert dciodvfy(Path(out_t.result.files[f])) == []
    dice_s = _seg_dice(Path(out_s.result.files["seg"]), straight, clean.labels > 0)
    dice_t = _seg_dice(Path(out_t.result.files["seg"]), tilted, tilted_stack(clean, TILT).labels > 0)
    assert dice_s > 0.9 and dice_t >= 0.8 * dice_s, (dice_t, dice_s)
    # measured on the orthogonal grid in patient millimetres: the sphere's volume and diameter
    true_volume = 4 / 3 * np.pi * 12.0 ** 3
    for out in (out_s, out_t):
        (roi,) = out.rois
        assert roi.volume_mm3 == pytest.approx(true_volume, rel=0.12)
        assert roi.diameter_inplane_mm == pytest.approx(24.0, abs=3.0)
        assert np.allclose(roi.centroid_mm, (8.0, -10.0, 4.0), atol=1.5)


def test_tilted_chest_with_the_demo_model(twins: dict[str, Any], demo_model: Any, demo_runner: Any,
                                         dciodvfy: Any) -> None:
    ctx = ModelContext(demo_model, demo_runner, Provenance(model=demo_model))
    out_s = process_series(twins["straight"], ctx, twins["root"] / "out-straight")
    out_t = process_series(twins["tilted"], ctx, twins["root"] / "out-tilted")
    assert out_t.result.resampled["reason"] == f"gantry tilt {TILT:.1f} degrees"
    assert "seg" in out_s.result.files and "seg" in out_t.result.files, "the demo model found nothing"
    for f in ("seg", "sr"):
        assert dciodvfy(Path(out_t.result.files[f])) == []

    # every SEG frame references an original tilted instance and sits at its position and orientation
    seg = dcmread(out_t.result.files["seg"])
    sources = {str(ds.SOPInstanceUID): ds for ds in (dcmread(p, stop_before_pixels=True) for p in twins["tilted"])}
    shared = seg.SharedFunctionalGroupsSequence[0]
    iop = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    assert np.allclose(iop, [float(v) for v in next(iter(sources.values())).ImageOrientationPatient], atol=1e-5)
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert ref in sources
        ipp = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(ipp, [float(v) for v in sources[ref].ImagePositionPatient], atol=1e-3)

    phantom = twins["phantom"]
    dice_straight = _seg_dice(Path(out_s.result.files["seg"]), twins["straight"], phantom.mask)
    dice_tilted = _seg_dice(Path(out_t.result.files["seg"]), twins["tilted"], tilted_stack(phantom, TILT).labels > 0)
    assert dice_straight > 0.4, f"the untilted twin is the reference and must itself be found (Dice {dice_straight})"
    # the demo model (trained on unresampled phantoms) loses some Dice to the interpolation itself: measured
    # 0.78 -> 0.63 at 20 degrees on this case (docs/models.md); the geometry alone is held to 0.8 above
    assert dice_tilted >= 0.7 * dice_straight, (dice_tilted, dice_straight)


@pytest.mark.skipif(not (SHARED / "dcm_qa_ct" / "GE").is_dir(), reason="../shared/data/real_dicom is absent")
def test_real_ge_tilted_uneven_head_ct_is_processed(tmp_path: Path, demo_model: Any, demo_runner: Any,
                                                    dciodvfy: Any) -> None:
    """dcm_qa_ct/GE: 18.5 degree tilt, 4 mm then 7 mm slices with a 1.08 mm step between: processed."""
    files = sorted((SHARED / "dcm_qa_ct" / "GE").glob("*.dcm"))
    out = process_series(files, ModelContext(demo_model, demo_runner, Provenance(model=demo_model)), tmp_path)
    assert out.result.resampled["reason"] == "uneven slice spacing from 1.08 to 7.00 mm, gantry tilt 18.5 degrees"
    assert out.result.shape[0] == 28
    for name in ("seg", "sr"):
        if name in out.result.files:
            assert dciodvfy(Path(out.result.files[name])) == []
    assert "sr" in out.result.files
    sources = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    if "seg" in out.result.files:
        seg = dcmread(out.result.files["seg"])
        refs = {f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                for f in seg.PerFrameFunctionalGroupsSequence}
        assert refs <= sources
