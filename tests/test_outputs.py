"""DICOM SEG and TID 1500 SR: placement over the source, content, references, validation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from node.imaging.volume import Volume, load_series
from node.inference.prediction import LabelMap
from node.inference.rois import describe, extract_rois
from node.outputs.equipment import Provenance
from node.outputs.result import save_dataset
from node.outputs.seg import build_seg
from node.processing.pipeline import ModelContext, process_series
from tests.dicomgen import make_series


class FixedRunner:
    """A runner returning a given label map (to test outputs independently of a model)."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels

    def predict(self, volume: Volume, *, deadline: float | None = None) -> LabelMap:
        return LabelMap(self.labels.copy())


def _blob_labels(shape: tuple[int, int, int]) -> np.ndarray:
    lab = np.zeros(shape, dtype=np.uint8)
    lab[2:5, 3:9, 4:8] = 1  # an asymmetric block: any flip or shift shows
    lab[1, 1, 1] = 1  # a single voxel (dropped by min volume? the card says 15 mm3)
    return lab


def _regions(labels: np.ndarray, volume: Volume, card: Any) -> list[Any]:
    """One region per label value present (its whole mask), as the SEG builder takes them."""
    from node.inference.rois import measure_region

    out = []
    for value in sorted(int(v) for v in np.unique(labels) if v):
        spec = card.label(value)
        roi = measure_region(labels == value, (0, 0, 0), label=value, name=spec.name, kind="anatomy", volume=volume,
                             widths=volume.slab_widths(), confidence=None)
        roi.index = len(out) + 1
        out.append(roi)
    return out


def _roundtrip(seg_path: Path, volume: Volume, source_paths: list[Path]) -> np.ndarray:
    """Read the SEG back and map each frame to its source slice by SOP Instance UID."""
    seg = hd.seg.segread(seg_path)
    uids = [str(volume.sources[f.source].SOPInstanceUID) for f in volume.frames]
    return seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1],
                                             assert_missing_frames_are_empty=True)[..., 0]


@pytest.mark.parametrize("geometry", ["axial", "reversed", "coronal", "nonsquare"])
def test_seg_placed_exactly_over_source(tmp_path: Path, demo_model: Any, geometry: str,
                                        dciodvfy: Callable[[Path], list[str]]) -> None:
    stored = np.full((6, 12, 14), 24, dtype=np.uint16)
    kwargs: dict[str, Any] = {}
    if geometry == "coronal":
        kwargs["iop"] = (1, 0, 0, 0, 0, -1)
    if geometry == "nonsquare":
        kwargs["pixel_spacing"] = (2.0, 0.7)
    paths = make_series(tmp_path / "src", stored, **kwargs)
    if geometry == "reversed":
        paths = list(reversed(paths))
    volume = load_series(paths)
    labels = _blob_labels(volume.shape)
    prov = Provenance(model=demo_model, device_uid="1.2.826.0.1.3680043.10.1473.99")
    seg = build_seg(volume, _regions(labels, volume, demo_model.card), demo_model.card, prov, series_number=9901)
    p = save_dataset(seg, tmp_path / "seg.dcm")
    back = _roundtrip(p, volume, paths)
    assert np.array_equal(back.astype(bool), labels.astype(bool))
    ds = dcmread(p)
    assert ds.FrameOfReferenceUID == volume.sources[0].FrameOfReferenceUID
    assert ds.StudyInstanceUID == volume.sources[0].StudyInstanceUID
    assert ds.SeriesInstanceUID != volume.sources[0].SeriesInstanceUID
    assert ds.SeriesNumber == 9901
    assert "UNVERIFIED" in ds.SeriesDescription
    assert ds.NumberOfFrames == 4  # empty frames omitted: slices 1..4 hold the blob/voxel
    assert dciodvfy(p) == []


def test_seg_sr_content_and_references(tmp_path: Path, small_series: Path, demo_model: Any,
                                       dciodvfy: Callable[[Path], list[str]]) -> None:
    paths = sorted(small_series.glob("*.dcm"))
    volume = load_series(paths)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[8:12, 30:40, 20:28] = 1
    labels[15:17, 50:55, 60:66] = 1
    prov = Provenance(model=demo_model, device_uid="1.2.826.0.1.3680043.10.1473.98")
    out = process_series(paths, ModelContext(demo_model, FixedRunner(labels), prov), tmp_path / "out", volume=volume)
    assert out.result.roi_count == 2
    seg_path, sr_path = Path(out.result.files["seg"]), Path(out.result.files["sr"])
    assert dciodvfy(seg_path) == []
    assert dciodvfy(sr_path) == []
    seg = dcmread(seg_path)
    sr_ds = dcmread(sr_path)
    # flagged as unverified AI output, IHE AIR identification, weights hash
    assert sr_ds.CompletionFlag == "PARTIAL" and sr_ds.VerificationFlag == "UNVERIFIED"
    for ds in (seg, sr_ds):
        eq = ds.ContributingEquipmentSequence[-1]
        purpose = eq.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == \
            ("Newcode1", "99IHE", "Processing Algorithm")
        assert eq.ManufacturerModelName == "lesion-ct-demo"
        assert any(demo_model.sha256[:56] in v for v in eq.SoftwareVersions)
        assert ds.PatientID == "PID-424242" and ds.StudyInstanceUID == volume.sources[0].StudyInstanceUID
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "lesion-ct-demo" and demo_model.sha256 in algo.AlgorithmParameters
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "27925004"

    sr = hd.sr.srread(sr_path)
    vol_groups = sr.content.get_volumetric_roi_measurement_groups()
    planar = sr.content.get_planar_roi_measurement_groups()
    assert len(vol_groups) == 2 and len(planar) == 6  # outline, long axis and centroid per ROI
    source_uids = {str(ds.SOPInstanceUID) for ds in volume.sources}
    for g in vol_groups:
        ref = g.referenced_segment
        assert ref is not None
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID  # type: ignore[attr-defined]
        names = {m.name.meaning: (m.value, m.unit.value) for m in g.get_measurements()}
        assert names["Volume"][1] == "mm3" and names["Diameter"][1] == "mm"
        assert g.finding_type.value == "27925004"
        assert g.tracking_identifier.endswith("(AI)")
    vols = sorted(float(dict((m.name.meaning, m.value) for m in g.get_measurements())["Volume"])
                  for g in vol_groups)
    sx, sy, sz = volume.spacing
    assert vols == pytest.approx(sorted([2 * 5 * 6 * sx * sy * sz, 4 * 10 * 8 * sx * sy * sz]))
    centroids = []
    for g in planar:
        region = g.roi
        assert region is not None
        if region.ValueType == "SCOORD3D":  # the centroid, in the source's frame of reference
            assert region.ReferencedFrameOfReferenceUID == volume.sources[0].FrameOfReferenceUID
            assert region.GraphicType == "POINT"
            centroids.append([float(v) for v in region.GraphicData])
        else:
            image_item = region.ContentSequence[0]
            assert image_item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID in source_uids
    assert np.allclose(sorted(centroids), sorted(list(r.centroid_mm) for r in out.rois), atol=0.01)
    # the long-axis line of the big ROI lies on its key slice and is about its diagonal
    rois = out.rois
    assert rois[0].diameter_inplane_mm == pytest.approx(np.hypot(9 * sx, 7 * sy), rel=0.15)


def test_no_finding_report(tmp_path: Path, small_series: Path, demo_model: Any,
                           dciodvfy: Callable[[Path], list[str]]) -> None:
    paths = sorted(small_series.glob("*.dcm"))
    volume = load_series(paths)
    prov = Provenance(model=demo_model)
    out = process_series(paths, ModelContext(demo_model, FixedRunner(np.zeros(volume.shape, np.uint8)), prov),
                         tmp_path / "out", volume=volume)
    assert "seg" not in out.result.files  # an empty SEG is not produced
    sr_path = Path(out.result.files["sr"])
    assert dciodvfy(sr_path) == []
    sr = hd.sr.srread(sr_path)
    assert sr.content.get_volumetric_roi_measurement_groups() == []
    assert sr.content.get_planar_roi_measurement_groups() == []
    text = [str(e.value) for e in dcmread(sr_path).iterall() if e.keyword in ("TextValue", "CodeMeaning")]
    assert any(t.startswith("AI: no region of interest found") for t in text)
    assert "Clinical finding absent" in text


def test_rois_measurements(tmp_path: Path, demo_model: Any) -> None:
    stored = np.full((10, 40, 40), 1024 + 40, dtype=np.uint16)  # 40 HU everywhere
    volume = load_series(make_series(tmp_path, stored, pixel_spacing=(1.0, 1.0), step=(0, 0, 1.0)))
    labels = np.zeros(volume.shape, np.uint8)
    zz, yy, xx = np.mgrid[:10, :40, :40]
    labels[((zz - 5) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2) <= 16] = 1  # sphere r=4 mm
    labels[0, 0, 0] = 1  # 1 mm3: below min_volume_mm3 (15) -> dropped
    rois = extract_rois(labels, volume, demo_model.card)
    assert len(rois) == 1 and not rois[0].described and rois[0].diameter_3d_mm == 0.0  # cheap measures only
    describe(rois, volume)
    r = rois[0]
    assert r.volume_mm3 == pytest.approx(4 / 3 * np.pi * 64, rel=0.1)
    assert r.diameter_3d_mm == pytest.approx(8.0, abs=1.5)
    assert r.diameter_inplane_mm == pytest.approx(8.0, abs=1.5)
    assert r.mean == pytest.approx(40.0)
    assert r.key_slice == 5
    assert r.bbox == ((1, 9), (16, 24), (16, 24))
    x0, y0, z0 = -100.0, -100.0, -50.0
    assert r.centroid_mm == pytest.approx((x0 + 20, y0 + 20, z0 + 5), abs=0.01)
    assert len(r.key_outline_ij) > 8


def test_select_findings_floor_then_cap_per_label_keeps_anatomy() -> None:
    from node.inference.rois import ROI
    from node.processing.findings import select_findings

    def roi(label: int, conf: float | None, vol: float, kind: str = "finding") -> ROI:
        return ROI(index=0, label=label, label_name=str(label), voxels=1, volume_mm3=vol, diameter_3d_mm=1,
                   diameter_inplane_mm=1, centroid_mm=(0, 0, 0), bbox=((0, 0), (0, 0), (0, 0)), mean=0, min=0, max=0,
                   key_slice=0, kind=kind, confidence=conf)

    rois = [roi(1, 0.9, 10), roi(1, 0.8, 50), roi(1, 0.7, 30), roi(1, 0.1, 99), roi(2, None, 5), roi(2, None, 7),
            roi(3, None, 1000, kind="anatomy")]
    kept, dropped = select_findings(rois, 0.5, 2)
    assert [(r.label, r.confidence, r.volume_mm3) for r in kept] == [
        (1, 0.9, 10), (1, 0.8, 50), (2, None, 5), (2, None, 7), (3, None, 1000)]
    assert [r.index for r in kept] == [1, 2, 3, 4, 5]
    assert dropped == {"below_min_confidence": 1, "over_max_findings": 1}
    assert select_findings(rois[:2], None, None)[1] == {}


def test_labelmap_seg_holds_every_label_in_one_plane_per_slice(tmp_path: Path, small_series: Path,
                                                                demo_model: Any) -> None:
    """seg_type = "labelmap": the Label Map Segmentation IOD, one frame per source slice, segment numbers as
    pixel values (the card's label values renumbered 1..n), read back by highdicom as the same label map."""
    from node.inference.registry import LabelSpec

    vol = load_series(sorted(small_series.glob("*.dcm")))
    base = demo_model.card.labels[0]
    labels_spec = [base.model_copy(update={"value": v, "name": f"Structure {v}"}) for v in (3, 7, 9)]
    card = demo_model.card.model_copy(update={
        "labels": labels_spec, "outputs": demo_model.card.outputs.model_copy(update={"seg_type": "labelmap"})})
    assert all(isinstance(s, LabelSpec) for s in card.labels)
    lab = np.zeros(vol.shape, np.uint8)
    lab[2:5, 10:20, 10:20] = 3
    lab[8:12, 30:50, 40:60] = 7
    lab[15, 60:70, 60:70] = 9
    model = demo_model.__class__(**{**demo_model.__dict__, "card": card})
    seg = build_seg(vol, _regions(lab, vol, card), card, Provenance(model=model), series_number=9901)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"  # Label Map Segmentation Storage
    assert int(seg.NumberOfFrames) == vol.shape[0]
    path = save_dataset(seg, tmp_path / "seg.dcm", fsync=False)
    back = hd.seg.segread(path)
    arr = back.get_volume(combine_segments=True).array  # in the source's slice order
    expected = np.select([lab == 3, lab == 7, lab == 9], [1, 2, 3], 0)
    assert arr.shape[0] == vol.shape[0]
    assert sorted(np.unique(arr).tolist()) == [0, 1, 2, 3]
    assert int((arr > 0).sum()) == int((expected > 0).sum())


def test_many_findings_compact_report_is_valid(tmp_path: Path, small_series: Path, demo_model: Any,
                                               dciodvfy: Callable[[Path], list[str]]) -> None:
    """Over 100 findings, each keeps two groups (volume; outline with long axis and area); the evidence is split
    into referenced (current) and other (pertinent) instances as highdicom would; 0 dciodvfy errors."""
    from node.outputs.sr import COMPACT_ABOVE, build_sr

    vol = load_series(sorted(small_series.glob("*.dcm")))
    card = demo_model.card.model_copy(update={"labels": [demo_model.card.labels[0].model_copy(
        update={"min_volume_mm3": 0.0})]})
    lab = np.zeros(vol.shape, np.uint8)
    lab[::2, 2:90:4, 2:90:4] = 1  # isolated single voxels: 12 x 22 x 22 components
    rois = extract_rois(lab, vol, card)[:150]
    assert len(rois) == 150 > COMPACT_ABOVE
    prov = Provenance(model=demo_model)
    seg = build_seg(vol, rois, card, prov, series_number=1)
    sr = build_sr(vol, rois, card, prov, seg=seg, series_number=2)
    measurements = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    assert len(measurements.ContentSequence) == 2 * 150
    current = {r.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
               for se in s.ReferencedSeriesSequence for r in se.ReferencedSOPSequence}
    other = {r.ReferencedSOPInstanceUID for s in sr.get("PertinentOtherEvidenceSequence", [])
             for se in s.ReferencedSeriesSequence for r in se.ReferencedSOPSequence}
    key_slices = {str(vol.sources[vol.frames[r.key_slice].source].SOPInstanceUID) for r in rois}
    assert current == key_slices | {seg.SOPInstanceUID}
    assert current | other == {str(s.SOPInstanceUID) for s in vol.sources} | {seg.SOPInstanceUID}
    assert not current & other
    path = save_dataset(sr, tmp_path / "sr.dcm", fsync=False)
    assert dciodvfy(path) == []


def test_ragged_outline_is_thinned_to_fit_an_sr_value() -> None:
    """A comb-shaped region (one component, an outline of ~100,000 points) keeps a closed outline short
    enough for the SR's graphic data (one FL value: 64 KiB)."""
    from node.inference.contour import MAX_OUTLINE_POINTS, mask_outline

    mask = np.zeros((200, 512), dtype=bool)
    mask[:, ::2] = True  # teeth
    mask[-1, :] = True  # joined at the base
    pts = mask_outline(mask)
    assert len(pts) <= MAX_OUTLINE_POINTS and pts[0] == pts[-1]
    assert 2 * len(pts) * 4 < 65536
    xs = [p[0] for p in pts]
    assert min(xs) < 1 and max(xs) > 510  # still spans the region
