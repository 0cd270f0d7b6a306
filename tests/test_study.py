"""Study-level jobs: a model that takes several series of a study (brain MR sequences as channels, CT phases as keys),
through a real node over C-STORE and offline by `preannot run`; the resampling of inputs onto the reference grid;
the drafting of inputs and labels from published bundles.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from typer.testing import CliRunner

from node.cli import app
from node.devtools import zoo
from node.devtools.sink import StoreSink
from node.devtools.synth.study import write_mr_study, write_phase_study
from node.net.scu import send_files
from tests.conftest import ROOT, SHARED, free_port, node_toml, wait_for

ZOO = ROOT.parent / "shared" / "data" / "model_zoo"
needs_zoo = pytest.mark.skipif(not ZOO.is_dir(), reason=f"{ZOO} is not here (the shared data folder)")
BRATS = "brats_mri_segmentation"
#: CPU-time setting: smaller patches than the published 240 x 240 x 160 (the code path is the published one)
BRATS_OVERRIDES = '{ "inferer#roi_size" = [96, 96, 64] }'


def _config(tmp_path: Path, models: Path) -> Path:
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n[models]\ndir = "{models}"\ndevice = "cpu"\n')
    return cfg


def _add_brats(tmp_path: Path, models: Path) -> Path:
    """brats_mri_segmentation as published, added by `models add` (its drafted card as it is, CPU-time patches), with
    weights whose outputs are constant: "whole tumour" over the whole grid, so the volume is a number to check."""
    cfg = _config(tmp_path, models)
    r = CliRunner().invoke(app, ["models", "add", str(ZOO / BRATS), "--config", str(cfg), "--no-try"])
    assert "takes 4 series of a study (T1c, T1, T2, FLAIR)" in r.output, r.output
    card = models / BRATS / "model_card.toml"
    card.write_text(card.read_text() + f"\n[bundle]\noverrides = {BRATS_OVERRIDES}\n")
    zoo.random_weights(models / BRATS)
    zoo.set_output_bias(models / BRATS, (-6.0, 6.0, -6.0))
    return cfg


def _node(tmp_path: Path, models: Path, sink: StoreSink, *, model: str, modality: str, wait: float) -> Any:
    from node.config import load_config
    from node.service import Node

    text = node_toml(tmp_path / "data", free_port(), sink_port=sink.port, models=models, stable=1.0)
    text = text.replace('match = { Modality = "CT", BodyPartExamined = ["CHEST", "THORAX"] }',
                        f'match = {{ Modality = "{modality}" }}').replace('models = ["lesion-ct-demo"]',
                                                                       f'models = ["{model}"]')
    text = text.replace("\n[jobs]\n", f"\n[jobs]\ninputs_wait_seconds = {wait}\n")
    (tmp_path / "node.toml").write_text(text)
    node = Node(load_config(tmp_path / "node.toml"))
    node.start()
    return node


def _send(node: Any, folders: list[Path]) -> None:
    files = [str(p) for f in folders for p in sorted(f.glob("*.dcm"))]
    assert all(o.ok for o in send_files(files, ae_title="PREANNOT", host="127.0.0.1", port=node.listener.port,
                                        calling_ae="TESTSCU"))


def _grid_mm3(folder: Path) -> float:
    """The volume covered by a series of parallel slices: rows x columns x pixel area x slice spacing x slices."""
    files = sorted(folder.glob("*.dcm"))
    ds = dcmread(files[0], stop_before_pixels=True)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    return int(ds.Rows) * int(ds.Columns) * dr * dc * float(ds.SliceThickness) * len(files)


def _evidence_series(sr: Any) -> set[str]:
    return {s.SeriesInstanceUID for st in sr.CurrentRequestedProcedureEvidenceSequence
            for s in st.ReferencedSeriesSequence}


@needs_zoo
def test_brats_on_a_synthetic_mr_study_through_a_real_node(tmp_path: Path,
                                                           dciodvfy: Callable[[Path], list[str]]) -> None:
    """Four sequences in three planes (the FLAIR oblique), a localizer and a 3-b-value diffusion series by C-STORE,
    routed to brats: one job, on the T1c series (the reference); its SEG on the T1c slices; its SR citing the four
    series it read and only those; both valid; the whole-grid region's volume is the T1c series' own."""
    models = tmp_path / "models"
    _add_brats(tmp_path, models)
    study = write_mr_study(tmp_path / "study", seed=4101)
    by_name = {s.name: s for s in study}
    sink = StoreSink(tmp_path / "pacs", ae_title="SINK")
    node = _node(tmp_path, models, sink, model=BRATS, modality="MR", wait=60)
    try:
        _send(node, [s.folder for s in study])
        job = wait_for(lambda: node.store.list_jobs(state="done") or node.store.list_jobs(state="dead"), 240,
                       what="the study's job")[0]
        assert job.state == "done", job.error
        jobs = node.store.list_jobs()
        assert len(jobs) == 1 and jobs[0].series_uid == by_name["T1c"].series_uid
        result = job.result
        assert result is not None
        assert [i["name"] for i in result.inputs] == ["T1c", "T1", "T2", "FLAIR"]
        assert {i["name"]: i["series_uid"] for i in result.inputs} == {
            n: by_name[n].series_uid for n in ("T1c", "T1", "T2", "FLAIR")}
        assert all(i["version"] == 1 for i in result.inputs)
        (roi,) = result.findings
        assert roi.label_name == "Whole tumor"
        assert roi.volume_mm3 == pytest.approx(_grid_mm3(by_name["T1c"].folder), rel=1e-6)
        study_uid = node.series.get(job.series_uid).study_uid
        wait_for(lambda: all(s.state != "receiving" for s in node.series.study_series(study_uid)), 30,
                 what="every series of the study stable")
        states = {s.series_uid: s for s in node.series.study_series(study_uid)}
        for name in ("localizer", "DWI"):
            assert states[by_name[name].series_uid].state == "skipped", states[by_name[name].series_uid]
        assert "not one of model" in (states[by_name["DWI"].series_uid].note or "")
        for name in ("T1", "T2", "FLAIR"):
            assert states[by_name[name].series_uid].state == "dispatched"
        files = wait_for(lambda: len(sink.files()) >= 2 and sink.files(), 60, what="the SEG and the SR")
        seg_path = next(p for p in files if dcmread(p).Modality == "SEG")
        sr_path = next(p for p in files if dcmread(p).Modality == "SR")
        assert dciodvfy(seg_path) == [] and dciodvfy(sr_path) == []
        seg = dcmread(seg_path)
        assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [by_name["T1c"].series_uid]
        cited = _evidence_series(dcmread(sr_path)) - {seg.SeriesInstanceUID}
        assert cited == {by_name[n].series_uid for n in ("T1c", "T1", "T2", "FLAIR")}
    finally:
        node.stop()
        sink.stop()


@needs_zoo
def test_brats_without_flair_fails_after_the_wait_naming_it_and_runs_when_it_comes(tmp_path: Path) -> None:
    models = tmp_path / "models"
    _add_brats(tmp_path, models)
    study = write_mr_study(tmp_path / "study", seed=4102)
    by_name = {s.name: s for s in study}
    sink = StoreSink(tmp_path / "pacs", ae_title="SINK")
    node = _node(tmp_path, models, sink, model=BRATS, modality="MR", wait=4)
    try:
        _send(node, [by_name[n].folder for n in ("T1c", "T1", "T2")])
        job = wait_for(lambda: node.store.list_jobs(state="dead"), 120, what="the job to give up")[0]
        assert "no series for input FLAIR" in (job.error or ""), job.error
        assert job.attempts == 1  # the waits were not counted as attempts
        assert sink.files() == []
        _send(node, [by_name["FLAIR"].folder])  # it comes after all: the study runs again, with it
        done = wait_for(lambda: node.store.list_jobs(state="done"), 120, what="the job with FLAIR")[0]
        assert done.series_uid == by_name["T1c"].series_uid and done.series_version == 2
        assert done.result is not None
        assert [i["name"] for i in done.result.inputs] == ["T1c", "T1", "T2", "FLAIR"]
    finally:
        node.stop()
        sink.stop()


def _add_phases(tmp_path: Path) -> tuple[Path, Path]:
    models = tmp_path / "models"
    zoo.write_phase_bundle(models / "three_phase")
    return models, _config(tmp_path, models)


def test_three_phase_ct_by_run_input(tmp_path: Path, dciodvfy: Callable[[Path], list[str]]) -> None:
    """Three phases on three grids (1.5, 3 and 5 mm slices; one frame of reference), a bundle that loads each under
    its own key and resamples them itself: `preannot run --input` gives each series by name; the SEG is on the
    arterial series (the reference), its one region the arterial grid."""
    _models, cfg = _add_phases(tmp_path)
    study = {s.name: s for s in write_phase_study(tmp_path / "ct", seed=5201)}
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["run", "-m", "three_phase", "--config", str(cfg), str(out),
                                 *[a for n in ("artery", "vein", "excret") for a in ("--input",
                                                                                      f"{n}={study[n].folder}")]])
    assert r.exit_code == 0, r.output
    result = json.loads((out / "result.json").read_text())
    assert result["series_uid"] == study["artery"].series_uid
    assert [i["name"] for i in result["inputs"]] == ["artery", "vein", "excret"]
    (roi,) = result["findings"]
    assert roi["volume_mm3"] == pytest.approx(_grid_mm3(study["artery"].folder), rel=1e-6)
    assert dciodvfy(out / "seg.dcm") == [] and dciodvfy(out / "sr.dcm") == []
    seg = dcmread(out / "seg.dcm")
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [study["artery"].series_uid]
    assert _evidence_series(dcmread(out / "sr.dcm")) >= {s.series_uid for s in study.values()}
    # the study folder itself: the inputs picked by the card's match rules, and said
    r = CliRunner().invoke(app, ["run", "-m", "three_phase", "--config", str(cfg), str(tmp_path / "ct"),
                                 str(tmp_path / "out2")])
    assert r.exit_code == 0, r.output
    assert f"input vein <- series {study['vein'].series_uid}" in r.output
    # a missing input is named, with the rule that did not find it
    shutil.rmtree(study["excret"].folder)
    r = CliRunner().invoke(app, ["run", "-m", "three_phase", "--config", str(cfg), str(tmp_path / "ct"),
                                 str(tmp_path / "out3")])
    assert r.exit_code == 2 and "no series for input excret" in r.output, r.output
    r = CliRunner().invoke(app, ["run", "-m", "three_phase", "--config", str(cfg), str(tmp_path / "out4"),
                                 "--input", f"arterial={study['artery'].folder}"])
    assert r.exit_code == 2 and "has no input 'arterial'" in r.output, r.output


def test_three_phase_ct_through_a_real_node(tmp_path: Path, dciodvfy: Callable[[Path], list[str]]) -> None:
    models, _cfg = _add_phases(tmp_path)
    study = {s.name: s for s in write_phase_study(tmp_path / "ct", seed=5202)}
    sink = StoreSink(tmp_path / "pacs", ae_title="SINK")
    node = _node(tmp_path, models, sink, model="three_phase", modality="CT", wait=60)
    try:
        _send(node, [study[n].folder for n in ("excret", "vein", "artery")])  # the reference last
        job = wait_for(lambda: node.store.list_jobs(state="done") or node.store.list_jobs(state="dead"), 180,
                       what="the study's job")[0]
        assert job.state == "done", job.error
        assert [j.series_uid for j in node.store.list_jobs()] == [study["artery"].series_uid]
        files = wait_for(lambda: len(sink.files()) >= 2 and sink.files(), 60, what="the SEG and the SR")
        for p in files:
            assert dciodvfy(p) == [], p
        seg = next(dcmread(p) for p in files if dcmread(p).Modality == "SEG")
        assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [study["artery"].series_uid]
        # a new version of an input series (the PACS re-sends the venous phase with a corrected slice) makes the
        # study's result again, superseding the first
        node.series.reopen_for_reprocess(study["vein"].series_uid)
        again = wait_for(lambda: [j for j in node.store.list_jobs(state="done") if j.id != job.id], 120,
                         what="the result made again")[0]
        assert again.series_uid == study["artery"].series_uid and again.series_version == 2
        assert {i["name"]: i["version"] for i in again.result.inputs}["vein"] == 2
        assert node.store.get(job.id).superseded_by == again.id
    finally:
        node.stop()
        sink.stop()


def test_inputs_are_resampled_onto_the_reference_grid(tmp_path: Path) -> None:
    """The FLAIR (oblique, 80 x 80, 4 mm) onto the T1c grid (axial): the lesion's bright rim lands where the T1c has
    it; voxels outside the FLAIR's field of view are 0."""
    from node.imaging.onto import resample_onto
    from node.imaging.volume import load_series

    study = {s.name: s for s in write_mr_study(tmp_path / "mr", seed=4103)}
    truth = json.loads((tmp_path / "mr" / "truth.json").read_text())
    t1c = load_series(sorted(study["T1c"].folder.glob("*.dcm")))
    flair = load_series(sorted(study["FLAIR"].folder.glob("*.dcm")))
    out = resample_onto(flair, t1c)
    assert out.shape == t1c.shape and out.dtype == np.float32
    centre = np.array(truth["lesions"][0]["centre_mm"])
    i, j, k = np.round(np.linalg.inv(t1c.affine) @ np.append(centre, 1.0))[:3].astype(int)
    core = float(out[k, j, i])
    far = float(np.median(out[out > 0]))
    assert core > 1.3 * far, (core, far)  # the FLAIR's oedema is bright at the lesion, on the T1c grid
    assert float(out[0, 0, 0]) == 0.0  # a corner of the T1c grid the oblique FLAIR does not cover


@needs_zoo
def test_drafted_brats_card_has_the_labels_its_postprocessing_makes_and_its_four_inputs(tmp_path: Path) -> None:
    import tomllib

    models = tmp_path / "models"
    _add_brats(tmp_path, models)
    card = tomllib.loads((models / BRATS / "model_card.toml").read_text())
    assert [(lab["value"], lab["name"]) for lab in card["labels"]] == [
        (1, "Tumor core"), (2, "Whole tumor"), (4, "Enhancing tumor")]
    assert all(lab["finding"] for lab in card["labels"])
    assert [i["name"] for i in card["inputs"]] == ["T1c", "T1", "T2", "FLAIR"]
    assert card["model"]["modality"] == ["MR"]


PROSTATE = "prostate_mri_anatomy"
#: CPU-time settings: 2 mm instead of 0.5 mm, one patch at a time (the code path is the published one)
PROSTATE_OVERRIDES = ('{ "inferer#roi_size" = [64, 64, 64], "inferer#sw_batch_size" = 1, "inferer#overlap" = 0.0, '
                      '"preprocessing#transforms#3#pixdim" = [2.0, 2.0, 2.0] }')
MR_FOLDERS = ["dcm_qa_12bit", "dcm_qa_enh", "dcm_qa_frag", "dcm_qa_ge", "dcm_qa_mosaic_siemens", "dcm_qa_ts",
              "dcm_qa_uih", "dcm_qa_xa30", "dicom2nifti", "pydicom", "pydicom_data", "pylibjpeg_data"]


@pytest.fixture(scope="module")
def prostate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("prostate")
    models = tmp / "models"
    cfg = _config(tmp, models)
    r = CliRunner().invoke(app, ["models", "add", str(ZOO / PROSTATE), "--config", str(cfg)])
    assert "tried: it runs" in r.output, r.output  # its KeepLargestConnectedComponentd needs scikit-image
    card = models / PROSTATE / "model_card.toml"
    assert 'modality = ["MR"]' in card.read_text()
    card.write_text(card.read_text() + f"\n[bundle]\noverrides = {PROSTATE_OVERRIDES}\n")
    zoo.random_weights(models / PROSTATE)
    return cfg


@pytest.mark.slow
@needs_zoo
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/real_dicom is absent")
@pytest.mark.parametrize("folder", MR_FOLDERS)
def test_prostate_anatomy_as_published_on_every_real_mr_folder(folder: str, prostate: Path, tmp_path: Path,
                                                               dciodvfy: Callable[[Path], list[str]]) -> None:
    """prostate_mri_anatomy added by `models add` on each real MR folder: every series a volume gets a SEG and an SR
    with 0 dciodvfy errors, every other is refused with its reason; nothing crashes. The GE 3D T1 (oblique, with
    orientation jitter between slices) is among the processed."""
    if not (SHARED / folder).is_dir():
        pytest.skip(f"{folder} is not in the corpus")
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["run", "-m", PROSTATE, str(SHARED / folder), str(out), "--config", str(prostate)])
    assert "Traceback" not in r.output, r.output[-3000:]
    assert r.exit_code in (0, 1, 2), r.output[-3000:]
    if r.exit_code == 1:
        assert "FAILED" in r.output, r.output[-3000:]
    for p in sorted(out.rglob("*.dcm")):
        assert dciodvfy(p) == [], (p, r.output[-2000:])
    if folder == "dcm_qa_ge":
        assert r.exit_code == 0 and list(out.rglob("seg.dcm")), r.output[-3000:]
