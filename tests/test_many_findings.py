"""A noisy model's many findings (issue 30): the SR lists a capped number, the SEG keeps every finding, and the
shortcuts that make this quick give the same objects as the slow paths they replace."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from node.config import OutputsConfig
from node.imaging.volume import load_series
from node.inference.rois import extract_rois
from node.outputs import seg as seg_module
from node.outputs.consistency import _binary_frame_counts, seg_volumes, sr_findings
from node.outputs.encode import encoded_sequences
from node.outputs.equipment import Provenance
from node.outputs.result import save_dataset
from node.outputs.seg import build_seg
from node.outputs.sr import build_sr, unlisted_meaning
from node.processing.pipeline import ModelContext, PipelineOptions, process_series
from tests.test_outputs import FixedRunner


def _speckle(shape: tuple[int, int, int]) -> np.ndarray:
    """Isolated 2 x 2 x 1 blobs, one every 4 pixels on every other slice (a few hundred findings)."""
    lab = np.zeros(shape, np.uint8)
    for k in range(0, shape[0], 2):
        for j in range(2, shape[1] - 3, 8):
            for i in range(2, shape[2] - 3, 8):
                lab[k, j:j + 2, i:i + 2] = 1
    return lab


@pytest.fixture(scope="module")
def noisy(small_series: Path, demo_model: Any) -> tuple[Any, Any, np.ndarray]:
    vol = load_series(sorted(small_series.glob("*.dcm")))
    card = demo_model.card.model_copy(update={"labels": [demo_model.card.labels[0].model_copy(
        update={"min_volume_mm3": 0.0})]})
    return vol, dataclasses.replace(demo_model, card=card), _speckle(vol.shape)


def test_sr_lists_the_cap_seg_keeps_all_and_the_sr_says_so(tmp_path: Path, noisy: tuple[Any, Any, np.ndarray],
                                                            dciodvfy: Callable[[Path], list[str]]) -> None:
    """With ``sr_max_findings = 12``: every finding is a SEG segment and in result.json, the SR lists the 12 largest
    with their diameters and states how many others the SEG holds; the consistency check passes; 0 dciodvfy
    errors in both objects."""
    vol, model, lab = noisy
    ctx = ModelContext(model, FixedRunner(lab), Provenance(model=model))
    out = process_series(sorted(Path(vol.sources[0].filename).parent.glob("*.dcm")), ctx, tmp_path / "out",
                         options=PipelineOptions(outputs=OutputsConfig(sr_max_findings=12, preview_png=False),
                                                 fsync=False))
    findings = out.result.findings
    total = len(findings)
    assert total > 100
    seg = dcmread(out.result.files["seg"])
    sr = dcmread(out.result.files["sr"])
    assert len(seg.SegmentSequence) == total
    listed = sr_findings(sr)
    assert len(listed) == 12
    by_number = {f.number: f for f in findings}
    assert {f.tracking_uid for f in findings if f.number <= 12} == set(listed)
    assert all(by_number[n].diameter_3d_mm is not None for n in range(1, 13))
    assert all(f.diameter_3d_mm is None and f.diameter_inplane_mm is None for f in findings if f.number > 12)
    text = " ".join(str(e.value) for e in sr.iterall() if e.keyword == "CodeMeaning")
    assert unlisted_meaning(total - 12) in text
    # every SEG segment holds its finding's volume (read from the written file)
    volumes = seg_volumes(seg, vol)
    for uid, v in volumes.values():
        f = next(f for f in findings if f.tracking_uid == uid)
        assert v == pytest.approx(f.volume_mm3, rel=0.02)
    assert dciodvfy(Path(out.result.files["seg"])) == []
    assert dciodvfy(Path(out.result.files["sr"])) == []


def test_sr_cap_zero_lists_every_finding(tmp_path: Path, noisy: tuple[Any, Any, np.ndarray]) -> None:
    vol, model, lab = noisy
    ctx = ModelContext(model, FixedRunner(lab), Provenance(model=model))
    out = process_series(sorted(Path(vol.sources[0].filename).parent.glob("*.dcm")), ctx, tmp_path / "out",
                         options=PipelineOptions(outputs=OutputsConfig(sr_max_findings=0, preview_png=False),
                                                 fsync=False))
    assert len(sr_findings(dcmread(out.result.files["sr"]))) == len(out.result.findings)
    assert all(f.diameter_3d_mm is not None for f in out.result.findings)


def _normalised_bytes(ds: Any) -> bytes:
    """The object as pydicom writes it, its UIDs and times of creation set to fixed values (they differ build to
    build)."""
    import io

    fixed = "1.2.3.4"
    ds.SeriesInstanceUID = ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = fixed
    for seq in (ds.DimensionOrganizationSequence, ds.DimensionIndexSequence):
        for item in seq:
            item.DimensionOrganizationUID = fixed
    for keyword in ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime", "SeriesDate",
                    "SeriesTime"):
        if keyword in ds:
            setattr(ds, keyword, "")
    for item in ds.get("ContributingEquipmentSequence", []):
        item.ContributionDateTime = ""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("count", [2, 60])
def test_assembled_seg_is_highdicoms_own(monkeypatch: pytest.MonkeyPatch, noisy: tuple[Any, Any, np.ndarray],
                                         count: int) -> None:
    """The SEG whose frames the node assembles (one pass per segment over its box) and whose segment descriptions
    it copies from each label's first is, byte for byte, the SEG highdicom makes on its own from the same segments:
    modules, segment descriptions, frames in the same order with the same functional groups, pixels; the tracking
    UIDs as given. Its frame index answers as highdicom's."""
    vol, model, lab = noisy
    rois = extract_rois(lab, vol, model.card)[:count]
    prov = Provenance(model=model)
    fast = build_seg(vol, rois, model.card, prov, series_number=1)
    made: list[str] = []
    real = seg_module._assemble_binary
    monkeypatch.setattr(seg_module, "_assemble_binary", lambda **kw: made.append("fast") or real(**kw))
    build_seg(vol, rois, model.card, prov, series_number=1)
    assert made == ["fast"]
    monkeypatch.setattr(seg_module, "_assemble_binary", lambda boxes, **kw: hd.seg.Segmentation(**kw))
    monkeypatch.setattr(seg_module, "_Segmentation", hd.seg.Segmentation)
    spec = model.card.label(rois[0].label)

    def described(template: Any, number: int, label: str, uid: str, ident: str) -> Any:  # highdicom's constructor
        return hd.seg.SegmentDescription(
            segment_number=number, segment_label=label, tracking_uid=uid, tracking_id=ident,
            segmented_property_category=seg_module.coded(spec.category),
            segmented_property_type=seg_module.coded(spec.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=prov.algorithm(),
            anatomic_regions=[seg_module.coded(spec.finding_site)] if spec.finding_site else None,
            display_color=hd.color.CIELabColor.from_rgb(*spec.color))

    monkeypatch.setattr(seg_module, "_same_label", described)
    slow = build_seg(vol, rois, model.card, prov, series_number=1)
    assert int(fast.NumberOfFrames) == int(slow.NumberOfFrames) >= count
    uid = str(rois[-1].tracking_uid)
    sources = [str(vol.sources[f.source].SOPInstanceUID) for f in vol.frames]
    for seg in (fast, slow):  # highdicom's frame index over the assembled frames
        pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=sources, segment_numbers=[1, count],
                                                   assert_missing_frames_are_empty=True)
        assert int(pixels[..., 1].sum()) == rois[-1].voxels
        assert int(pixels[..., 0].sum()) == rois[0].voxels
    counts = _binary_frame_counts(fast)
    assert counts is not None
    assert counts.tolist() == [int(np.count_nonzero(f)) for f in fast.pixel_array]
    assert str(fast.SegmentSequence[-1].TrackingUID) == uid
    assert _normalised_bytes(fast) == _normalised_bytes(slow)


def test_large_sequences_are_written_byte_for_byte_as_pydicom_writes_them(tmp_path: Path,
                                                                          noisy: tuple[Any, Any, np.ndarray]) -> None:
    """A SEG of hundreds of frames and an SR of hundreds of groups: save_dataset's pre-encoded sequences give the
    same file as pydicom's own writer, and the dataset is unchanged afterwards."""
    vol, model, lab = noisy
    rois = extract_rois(lab, vol, model.card)[:150]
    prov = Provenance(model=model)
    seg = build_seg(vol, rois, model.card, prov, series_number=1)
    sr = build_sr(vol, rois, model.card, prov, seg=seg, series_number=2)
    for name, ds in (("seg", seg), ("sr", sr)):
        before = ds.PerFrameFunctionalGroupsSequence if name == "seg" else ds.ContentSequence
        ds.save_as(tmp_path / f"{name}-pydicom.dcm", enforce_file_format=True)
        with encoded_sequences(ds) as encoded:  # the shortcut is taken (a SEG's "OB or OW" pixels included)
            assert encoded >= 1
        save_dataset(ds, tmp_path / f"{name}.dcm", fsync=False)
        assert (tmp_path / f"{name}.dcm").read_bytes() == (tmp_path / f"{name}-pydicom.dcm").read_bytes()
        after = ds.PerFrameFunctionalGroupsSequence if name == "seg" else ds.ContentSequence
        assert after is before


def test_channels_last_network_gives_the_same_labels(demo_runner: Any, small_series: Path) -> None:
    """The demo bundle's 3D network on the CPU in channels-last layout (what the node does) and in the default
    layout: the same label map."""
    import torch

    vol = load_series(sorted(small_series.glob("*.dcm")))
    assert demo_runner.channels_last
    fast = demo_runner.predict(vol).labels.copy()
    try:
        demo_runner.channels_last = False
        demo_runner.network = demo_runner.network.to(memory_format=torch.contiguous_format)
        plain = demo_runner.predict(load_series(sorted(small_series.glob("*.dcm")))).labels
    finally:
        demo_runner.channels_last = True
        demo_runner.network = demo_runner.network.to(memory_format=torch.channels_last_3d)
    a, b = fast > 0, plain > 0
    assert 2 * int((a & b).sum()) / max(int(a.sum() + b.sum()), 1) >= 0.999


def test_components_as_scipy_numbers_them_and_produced_counts() -> None:
    """The node's connected components (connected-components-3d) are scipy's, label for label, in 16 bits while
    they fit; the produced-voxel count over the labelled voxels only equals a full bincount."""
    from scipy import ndimage

    from node.inference.prediction import LabelMap
    from node.inference.rois import components

    rng = np.random.default_rng(3)
    for shape, fill in (((40, 60, 70), 0.8), ((70, 90, 90), 0.6)):
        mask = rng.random(shape) > fill
        ours = components(mask)
        theirs = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))[0]
        np.testing.assert_array_equal(ours, theirs)
        assert ours.dtype == (np.uint16 if np.count_nonzero(mask) <= 65535 else np.uint32)
    labels = rng.integers(0, 4, size=(70, 30, 30)).astype(np.uint8)
    full = np.bincount(labels.ravel())
    assert LabelMap(labels).produced(None) == {v: int(full[v]) for v in (1, 2, 3)}  # type: ignore[arg-type]
