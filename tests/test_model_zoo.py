"""Model Zoo bundles as published (../shared/data/model_zoo: configs, scripts, licences; no weights).

Each test gives a bundle random weights made here for its own ``network_def`` (the last layer's bias tilted
so that the outputs are not empty), writes a model card, and runs it through ``preannot run`` on a small
synthetic CT: the whole path (the bundle's own transforms, inferer and inversion, the node's outputs) runs
exactly as with released weights. Skipped cleanly without ../shared.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from node.devtools import zoo
from tests.conftest import ROOT

ZOO = ROOT.parent / "shared" / "data" / "model_zoo"
pytestmark = pytest.mark.skipif(not ZOO.is_dir(), reason=f"{ZOO} is not here (the shared data folder)")

# the published cards (node/devtools/zoo.py), with small patches for CPU time in tests
SPLEEN_CARD = zoo.SPLEEN_CARD + """
[bundle]
overrides = { "inferer#roi_size" = [32, 32, 32], "inferer#sw_batch_size" = 1 }
"""


def install(name: str, models_dir: Path, card: str, *, yaml_config: bool = False, favour: int = 1,
            tilt: float = 3.0) -> Path:
    return zoo.install_segmenter(ZOO, name, models_dir, card, yaml_config=yaml_config, favour=favour, tilt=tilt)


def _config(tmp_path: Path, models_dir: Path) -> Path:
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n\n[models]\ndir = "{models_dir}"\ndevice = "cpu"\n')
    return cfg


@pytest.mark.parametrize("yaml_config", [False, True], ids=["json", "yaml"])
def test_spleen_bundle_as_published_gives_the_organ_with_its_volume(
        yaml_config: bool, tmp_path: Path, small_series: Path, dciodvfy: Callable[[Path], list[str]]) -> None:
    from pydicom import dcmread
    from typer.testing import CliRunner

    from node.cli import app

    models = tmp_path / "models"
    install("spleen_ct_segmentation", models, SPLEEN_CARD, yaml_config=yaml_config)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["run", "--model", "spleen_ct_segmentation", str(small_series), str(out),
                                 "--config", str(_config(tmp_path, models)), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads((out / "result.json").read_text())
    rois = result["findings"]
    # anatomy: one region for the whole organ (not one per connected piece), with its volume
    assert [(x["label_name"], x["kind"]) for x in rois] == [("Spleen", "anatomy")]
    assert rois[0]["volume_mm3"] > 0
    # the bundle applies a softmax then an argmax: the region's confidence is its mean winning probability
    assert 0.5 <= rois[0]["confidence"] <= 1.0
    seg, sr = out / "seg.dcm", out / "sr.dcm"
    assert dciodvfy(seg) == [] and dciodvfy(sr) == []
    segment_labels = [s.SegmentLabel for s in dcmread(seg).SegmentSequence]
    assert segment_labels == ["Spleen"]
    text = str(dcmread(sr))
    assert "Spleen (AI)" in text and "Volume" in text and "AI confidence score" in text


def test_spleen_bundle_labels_and_confidence_identical_with_node_transforms(tmp_path: Path,
                                                                                small_series: Path) -> None:
    """The published Spacingd (trilinear) and Invertd (trilinear on the softmax, then argmax) replaced by the
    node's bounded resampling, and the two classes carried by class 1's probability alone (softmax, resampling back
    and argmax on one channel): the same labels and the same confidence map as MONAI's own transforms."""
    from node.imaging.volume import load_series
    from node.inference.registry import load_model
    from node.inference.resample import BoundedSpacingd
    from node.inference.runner import BundleRunner

    bounded_dir = install("spleen_ct_segmentation", tmp_path / "a", SPLEEN_CARD, tilt=0.0)
    stock_dir = install("spleen_ct_segmentation", tmp_path / "b", SPLEEN_CARD + "substitute_transforms = false\n",
                        tilt=0.0)
    bounded, stock = (BundleRunner(load_model(d), device="cpu") for d in (bounded_dir, stock_dir))
    assert [type(t) for t in bounded.preprocessing.transforms].count(BoundedSpacingd) == 1
    assert bounded._binary is not None and stock._binary is None  # the one-channel path is the one tested
    assert "Spacingd" in [type(t).__name__ for t in stock.preprocessing.transforms]
    volume = load_series(sorted(small_series.glob("*.dcm")))
    pa, pb = bounded.predict(volume), stock.predict(volume)
    (la, ca), (lb, cb) = (pa.labels, pa.confidence), (pb.labels, pb.confidence)
    assert 0 < la.sum() < la.size  # not vacuous: both classes present
    np.testing.assert_array_equal(la, lb)
    assert ca is not None and cb is not None
    np.testing.assert_allclose(ca.astype(np.float32), cb.astype(np.float32), atol=1e-3)


def test_card_override_of_a_missing_key_is_refused_at_load(tmp_path: Path) -> None:
    from node.errors import ModelError
    from node.inference.registry import load_model
    from node.inference.runner import BundleRunner

    card = SPLEEN_CARD.replace('"inferer#sw_batch_size" = 1', '"inferer#no_such_key" = 1')
    folder = install("spleen_ct_segmentation", tmp_path / "models", card)
    with pytest.raises(ModelError, match="no_such_key"):
        BundleRunner(load_model(folder), device="cpu")


# for CPU time in tests only: the test series' own 3 x 3 x 2.5 mm instead of 0.703 x 0.703 x 1.25 mm, small
# patches, at most 6 boxes (appended to the card's [bundle.overrides] table)
DETECTION_CARD = zoo.DETECTION_CARD + """infer_patch_size = [64, 64, 32]
"preprocessing#transforms#4#pixdim" = [3.0, 3.0, 2.5]
"detector_ops#1" = "$@detector.set_box_selector_parameters(score_thresh=0.02, topk_candidates_per_level=50, nms_thresh=0.22, detections_per_img=6)"
"""


def install_detector(models_dir: Path, card: str = DETECTION_CARD) -> Path:
    return zoo.install_detector(ZOO, models_dir, card)


def test_detection_bundle_as_published_gives_boxes_in_the_sr(tmp_path: Path, small_series: Path,
                                                             dciodvfy: Callable[[Path], list[str]]) -> None:
    """The Zoo's RetinaNet nodule detector through `preannot run`: one TID 1500 group per box with its rectangle on
    the key slice, its size and its score; no SEG (the card does not ask for box masks)."""
    pytest.importorskip("torchvision")
    from pydicom import dcmread
    from typer.testing import CliRunner

    from node.cli import app
    from node.inference.registry import load_model

    models = tmp_path / "models"
    folder = install_detector(models)
    assert load_model(folder).kind.name == "detection"
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["run", "--model", "lung_nodule_ct_detection", str(small_series), str(out),
                                 "--config", str(_config(tmp_path, models)), "--json"])
    assert r.exit_code == 0, r.output
    rois = json.loads((out / "result.json").read_text())["findings"]
    assert 1 <= len(rois) <= 6 and {x["kind"] for x in rois} == {"box"}
    scores = [x["confidence"] for x in rois]
    assert scores == sorted(scores, reverse=True) and all(0.02 <= s <= 1 for s in scores)
    assert not (out / "seg.dcm").exists()
    sr_path = out / "sr.dcm"
    assert dciodvfy(sr_path) == []
    sr = dcmread(sr_path)
    # every box: a closed 5-point rectangle on a source image, with its score
    regions, confidences = [], []

    def walk(items: Any) -> None:
        for it in items:
            if getattr(it, "GraphicType", "") == "POLYLINE" and len(it.GraphicData) == 10:
                regions.append(it)
            name = it.get("ConceptNameCodeSequence")
            if name and name[0].CodeValue == "CONF":
                confidences.append(float(it.MeasuredValueSequence[0].NumericValue))
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(sr.ContentSequence)
    assert len(regions) == len(rois) and sorted(confidences, reverse=True) == pytest.approx(scores, abs=1e-3)
    ct = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in small_series.glob("*.dcm")}
    for reg in regions:
        pts = np.array(reg.GraphicData, dtype=float).reshape(-1, 2)
        assert np.allclose(pts[0], pts[-1])  # closed
        assert reg.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID in ct


def test_route_confidence_floor_and_cap_are_applied_and_stated(tmp_path: Path, small_series: Path) -> None:
    """min_confidence and max_findings: fewer boxes reported, and the SR says how many were left out."""
    pytest.importorskip("torchvision")
    from pydicom import dcmread

    from node.config import OutputsConfig
    from node.inference.kinds import load_runner
    from node.inference.registry import load_model
    from node.inference.rois import NOT_REPORTED
    from node.outputs.equipment import Provenance
    from node.processing.findings import FindingOptions
    from node.processing.pipeline import ModelContext, PipelineOptions, process_series

    model = load_model(install_detector(tmp_path / "models"))
    runner = load_runner(model, device="cpu")
    ctx = ModelContext(model, runner, Provenance.for_node(model, OutputsConfig(), device_uid="1.2.3"))
    files = sorted(small_series.glob("*.dcm"))
    full = process_series(files, ctx, tmp_path / "all", options=PipelineOptions(fsync=False))
    scores = sorted((r.confidence or 0.0 for r in full.rois), reverse=True)
    assert len(scores) >= 3
    floor = (scores[0] + scores[-1]) / 2
    capped = process_series(files, ctx, tmp_path / "capped",
                            options=PipelineOptions(fsync=False, findings=FindingOptions(min_confidence=floor,
                                                                                         max_findings=1)))
    assert len(capped.rois) == 1 and capped.rois[0].confidence == pytest.approx(scores[0])
    left = capped.result.not_reported
    assert sum(left.values()) == len(scores) - 1 and left["below_min_confidence"] >= 1
    text = str(dcmread(tmp_path / "capped" / "sr.dcm"))
    for reason, n in left.items():
        assert f"{n} not reported: {NOT_REPORTED[reason]}"[:64] in text


@pytest.mark.slow  # minutes of CPU: `make test-slow` (CI runs it too)
def test_models_add_drafts_a_card_for_the_whole_body_bundle_and_its_organs_come_out(
        tmp_path: Path, small_series: Path, dciodvfy: Callable[[Path], list[str]]) -> None:
    """`preannot models add`: the 104 wholeBody labels get a draft card (SNOMED CT codes where the table has them,
    the rest listed); with random weights the bundle then runs and its organs come out as SEG segments with their
    volumes in the SR."""
    import tomllib

    import torch
    from pydicom import dcmread
    from typer.testing import CliRunner

    from node.cli import app

    models = tmp_path / "models"
    cfg = _config(tmp_path, models)
    r = CliRunner().invoke(app, ["models", "add", str(ZOO / "wholeBody_ct_segmentation"), "--config", str(cfg)])
    # no weights are published with the bundle: copied and carded, but not usable yet, and it says why
    assert r.exit_code == 1 and "draft model_card.toml with 104 label(s)" in r.output, r.output
    assert "not in the code table" in r.output and "no weights: its large_files list names models/model.pt" in r.output
    card = tomllib.loads((models / "wholeBody_ct_segmentation" / "model_card.toml").read_text())
    by_name = {lab["name"]: lab for lab in card["labels"]}
    assert by_name["Liver"]["type"]["code"] == "10200004" and by_name["Liver"]["finding"] is False
    assert by_name["Kidney right"]["type"]["code"] == "9846003"
    assert len(card["labels"]) == 104
    r = CliRunner().invoke(app, ["models", "add", str(ZOO / "wholeBody_ct_segmentation"), "--config", str(cfg)])
    assert r.exit_code == 1 and "--force" in r.output

    # random weights for its network_def (the card written by models add is kept), small patches for CPU time
    from monai.bundle import ConfigParser

    folder = models / "wholeBody_ct_segmentation"
    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    torch.manual_seed(0)
    (folder / "models").mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), folder / "models" / "model.pt")
    text = (folder / "model_card.toml").read_text()
    (folder / "model_card.toml").write_text(
        text + '\n[bundle]\noverrides = { "inferer#roi_size" = [32, 32, 32], "inferer#sw_batch_size" = 1 }\n')
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["run", "--model", "wholeBody_ct_segmentation", str(small_series), str(out),
                                 "--config", str(cfg), "--json"])
    assert r.exit_code == 0, r.output
    rois = json.loads((out / "result.json").read_text())["findings"]
    assert rois and {x["kind"] for x in rois} == {"anatomy"}  # organs, one region per label present
    assert len({x["label_name"] for x in rois}) == len(rois)
    assert dciodvfy(out / "seg.dcm") == [] and dciodvfy(out / "sr.dcm") == []
    segs = [s.SegmentLabel for s in dcmread(out / "seg.dcm").SegmentSequence]
    assert sorted(segs) == sorted(x["label_name"] for x in rois)


@pytest.mark.slow  # minutes of CPU: `make test-slow` (CI runs it too)
def test_two_workers_run_a_segmentation_and_a_detection_bundle_interleaved(tmp_path: Path, small_series: Path) -> None:
    """A node with two workers and one route naming the spleen segmenter and the nodule detector (its own
    scripts package): two series, four interleaved jobs, each with its own model's kind of result."""
    pytest.importorskip("torchvision")
    from node.config import load_config
    from node.service import Node
    from node.store.jobs import JobState
    from tests.conftest import free_port, wait_for
    from tests.test_bundle_isolation import send_series_copies

    models = tmp_path / "models"
    install("spleen_ct_segmentation", models, SPLEEN_CARD)
    install_detector(models)
    port = free_port()
    cfg = load_config(None, env={}, overrides={
        "node": {"ae_title": "PREANNOT", "bind": "127.0.0.1", "port": port, "data_dir": str(tmp_path / "data"),
                 "allowed_callers": ["TESTSCU"], "stable_seconds": 2.0, "free_space_reserve_mb": 0},
        "routes": [{"name": "both", "match": {"Modality": "CT"},
                    "models": ["spleen_ct_segmentation", "lung_nodule_ct_detection"]}],
        "models": {"dir": str(models), "device": "cpu", "preload": True},
        "jobs": {"workers": 2, "backoff_seconds": 0.2}, "web": {"enabled": False}})
    node = Node(cfg)
    node.start()
    try:
        send_series_copies(tmp_path, sorted(small_series.glob("*.dcm")), 2, port)
        wait_for(lambda: len(node.store.list_jobs(state=JobState.DONE)) == 4
                 or node.store.list_jobs(state=JobState.DEAD), 240, what="4 jobs")
        jobs = node.store.list_jobs()
        assert [j.state for j in jobs] == [JobState.DONE] * 4, [(j.id, j.state, j.error) for j in jobs]
        for j in jobs:
            kinds = {r.kind for r in j.result.findings} if j.result else set()
            assert kinds == ({"anatomy"} if j.model == "spleen_ct_segmentation" else {"box"}), (j.model, kinds)
        assert {(j.model, j.series_uid) for j in jobs} == {(m, s) for m in ("spleen_ct_segmentation",
                                                                             "lung_nodule_ct_detection")
                                                           for s in {j.series_uid for j in jobs}}
    finally:
        node.stop()


@pytest.mark.slow  # minutes of CPU: `make test-slow` (CI runs it too)
def test_swin_unetr_bundle_runs_after_models_add_removes_an_argument_monai_dropped(
        tmp_path: Path, small_series: Path, dciodvfy: Callable[[Path], list[str]]) -> None:
    """swin_unetr_btcv_segmentation as published passes SwinUNETR an ``img_size`` that MONAI 1.5+ no longer
    accepts: `models add` finds it and writes ``[bundle] remove``; with random weights the bundle then runs
    and its 13 organs come out as segments (SEG and SR: 0 dciodvfy errors)."""
    import tomllib

    import torch
    from monai.bundle import ConfigParser
    from pydicom import dcmread
    from typer.testing import CliRunner

    from node.cli import app
    from node.errors import ModelError
    from node.inference.registry import load_model
    from node.inference.runner import BundleRunner

    models = tmp_path / "models"
    cfg = _config(tmp_path, models)
    r = CliRunner().invoke(app, ["models", "add", str(ZOO / "swin_unetr_btcv_segmentation"), "--config", str(cfg)])
    assert "network_def#img_size" in r.output, r.output
    folder = models / "swin_unetr_btcv_segmentation"
    card_text = (folder / "model_card.toml").read_text()
    card = tomllib.loads(card_text)
    assert card["bundle"]["remove"] == ["network_def#img_size"] and len(card["labels"]) == 13
    by_name = {lab["name"]: lab for lab in card["labels"]}
    assert by_name["Right Kidney"]["type"]["code"] == "9846003"  # "Right X" matched as well as "x_right"
    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    del parser["network_def"]["img_size"]
    torch.manual_seed(0)
    (folder / "models").mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), folder / "models" / "model.pt")
    (folder / "model_card.toml").write_text(card_text.replace(  # 64: the smallest patch SwinUNETR's norms accept
        "[bundle]\n", '[bundle]\noverrides = { "inferer#roi_size" = [64, 64, 64], "inferer#sw_batch_size" = 1, "inferer#overlap" = 0.0 }\n'))
    # without the removal the published config does not load on this MONAI, and says so
    (tmp_path / "bad").mkdir()
    import shutil

    shutil.copytree(folder, tmp_path / "bad" / folder.name)
    bad_card = tmp_path / "bad" / folder.name / "model_card.toml"
    bad_card.write_text(bad_card.read_text().replace('remove = ["network_def#img_size"]', "remove = []"))
    with pytest.raises(ModelError, match="img_size"):
        BundleRunner(load_model(tmp_path / "bad" / folder.name), device="cpu")
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["run", "--model", "swin_unetr_btcv_segmentation", str(small_series), str(out),
                                 "--config", str(cfg), "--json"])
    assert r.exit_code == 0, r.output
    rois = json.loads((out / "result.json").read_text())["findings"]
    assert rois and {x["kind"] for x in rois} == {"anatomy"}
    assert dciodvfy(out / "seg.dcm") == [] and dciodvfy(out / "sr.dcm") == []
    assert len(dcmread(out / "seg.dcm").SegmentSequence) == len(rois)
