"""Every kind of model through one seam: classification end to end through a real node, evaluation of each kind
checked against a direct computation, notifications delivered through the outbox exactly once.

The classifier is the Model Zoo's ``breast_density_classification`` as published (../shared/data/model_zoo),
added with ``preannot models add`` (which switches off its ``pretrained: true``: the node never downloads) and
given seeded random weights; the inputs are synthetic mammograms (``preannot synth mammo``).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import product
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from pydicom import dcmread
from typer.testing import CliRunner

from node.cli import app
from node.devtools import zoo
from node.devtools.sink import StoreSink
from node.devtools.synth.mammo import write_mammogram
from node.devtools.synth.phantom import make_phantom
from node.devtools.synth.writer import write_case
from node.net.scu import send_files
from tests.conftest import ROOT, SMALL, free_port, node_toml, wait_for

ZOO = ROOT.parent / "shared" / "data" / "model_zoo"
needs_zoo = pytest.mark.skipif(not ZOO.is_dir(), reason=f"{ZOO} is not here (the shared data folder)")

BREAST = "breast_density_classification"


def _config(tmp_path: Path, models_dir: Path) -> Path:
    cfg = tmp_path / "models.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n\n[models]\ndir = "{models_dir}"\ndevice = "cpu"\n')
    return cfg


def _add_classifier(tmp_path: Path, models_dir: Path, *, spread: float = 0.02) -> Path:
    """``preannot models add`` the published bundle, then seeded random weights whose last layer is scaled by
    ``spread`` (so the class scores differ between images instead of saturating at 0 and 1)."""
    import torch

    r = CliRunner().invoke(app, ["models", "add", str(ZOO / BREAST), "--config", str(_config(tmp_path, models_dir))])
    assert "network_def#pretrained" in r.output, r.output
    assert "models/model.pt" in r.output  # no weights in the published bundle: reported, not fetched
    folder = models_dir / BREAST
    path = zoo.random_weights(folder, overrides={"network_def#pretrained": False})
    state = torch.load(path, weights_only=True)
    for key in [k for k in state if k.startswith("fc.")]:
        state[key] = state[key] * spread
    torch.save(state, path)
    return folder


@needs_zoo
def test_models_add_drafts_a_classifier_card_that_never_downloads(tmp_path: Path) -> None:
    import tomllib

    from node.errors import ModelError
    from node.inference.kinds import load_runner
    from node.inference.registry import load_model

    folder = _add_classifier(tmp_path, tmp_path / "models")
    card = tomllib.loads((folder / "model_card.toml").read_text())
    assert card["model"]["modality"] == ["MG"]  # from the bundle's metadata ("Mammogram")
    assert [lab["name"] for lab in card["labels"]] == ["A", "B", "C", "D"]  # channel 0 is a class, not background
    assert {lab["category"]["meaning"] for lab in card["labels"]} == {"Breast composition"}
    assert card["labels"][3]["type"] == {"code": "129719003", "scheme": "SCT", "meaning": "Extremely dense"}
    assert card["bundle"]["overrides"] == {"network_def#pretrained": False} and card["outputs"]["seg"] is False
    assert load_model(folder).kind.name == "classification"
    # the published flag left on: refused at load with the fix, never a download
    text = (folder / "model_card.toml").read_text().replace('overrides = { "network_def#pretrained" = false }', "")
    (folder / "model_card.toml").write_text(text)
    with pytest.raises(ModelError, match=r'download weights .* overrides = \{ "network_def#pretrained" = false \}'):
        load_runner(load_model(folder), device="cpu")


@needs_zoo
def test_breast_density_classification_through_a_real_node(tmp_path: Path,
                                                             dciodvfy: Callable[[Path], list[str]]) -> None:
    """A mammogram by C-STORE: one job, an SR stating the class with every class's score and the algorithm, no SEG;
    the route flags the class it was told to watch (raising the delivery priority)."""
    from node.config import load_config
    from node.service import Node

    models = tmp_path / "models"
    _add_classifier(tmp_path, models)
    mg = write_mammogram(tmp_path / "in", seed=11, density="D")
    sink = StoreSink(tmp_path / "pacs", ae_title="SINK")
    text = node_toml(tmp_path / "data", free_port(), sink_port=sink.port, models=models, stable=1.0)
    text = text.replace('match = { Modality = "CT", BodyPartExamined = ["CHEST", "THORAX"] }',
                        'match = { Modality = "MG" }').replace('models = ["lesion-ct-demo"]', f'models = ["{BREAST}"]')
    text = text.replace("\n[models]", '\n[[routes.flags]]\nclasses = ["A", "B", "C", "D"]\npriority = "stat"\n\n[models]')
    (tmp_path / "node.toml").write_text(text)
    node = Node(load_config(tmp_path / "node.toml"))
    node.start()
    try:
        assert all(o.ok for o in send_files([str(mg)], ae_title="PREANNOT", host="127.0.0.1", port=node.listener.port,
                                            calling_ae="TESTSCU"))
        job = wait_for(lambda: node.store.list_jobs(state="done") or node.store.list_jobs(state="dead"), 180,
                       what="the job")[0]
        assert job.state == "done", job.error
        result = job.result
        assert result is not None and result.roi_count == 0 and "seg" not in result.files
        (cls,) = result.classes
        assert cls.concept == "Breast composition" and set(cls.probabilities) == {"A", "B", "C", "D"}
        assert cls.probability == max(cls.probabilities.values()) and cls.value in cls.probabilities
        assert result.flags == (f"class {cls.value}",) and node.store.get(job.id).priority == "stat"
        sr_path = wait_for(lambda: [p for p in sink.files() if dcmread(p).Modality == "SR"], 60, what="the SR")[0]
        assert dciodvfy(sr_path) == []
        assert all(dcmread(p).Modality == "SR" for p in sink.files())  # no SEG for a classifier
        sr = dcmread(sr_path)
        items = _content_items(sr)
        (evaluation,) = [i for i in items if i.ValueType == "CODE"
                         and i.ConceptNameCodeSequence[0].CodeMeaning == "Breast composition"]
        assert evaluation.ConceptCodeSequence[0].CodeMeaning == cls.meaning
        numbers = {str(i.ConceptNameCodeSequence[0].CodeMeaning): float(i.MeasuredValueSequence[0].NumericValue)
                   for i in items if i.ValueType == "NUM"}
        assert set(numbers) == {f"AI probability: {c}" for c in "ABCD"}
        for name, p in cls.probabilities.items():
            assert numbers[f"AI probability: {name}"] == pytest.approx(p, abs=1e-4)
        assert any(i.ValueType == "TEXT" and i.TextValue == BREAST for i in items)  # the algorithm's name
        assert sr.VerificationFlag == "UNVERIFIED" and "UNVERIFIED" in sr.SeriesDescription
    finally:
        node.stop()
        sink.stop()


def _content_items(ds: Any) -> list[Any]:
    """Every content item of an SR document, depth first."""
    out = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out.extend(_content_items(item))
    return out


def _auc(pos: list[float], neg: list[float]) -> float:
    """ROC AUC by counting every (positive, negative) pair, ties one half."""
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in product(pos, neg)]
    return sum(pairs) / len(pairs)


@needs_zoo
def test_evaluate_classification_figures_match_a_direct_computation(tmp_path: Path) -> None:
    models = tmp_path / "models"
    _add_classifier(tmp_path, models, spread=0.05)
    data = tmp_path / "mammos"
    r = CliRunner().invoke(app, ["synth", "mammo", "--out", str(data), "--n", "8", "--first-seed", "400"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "report"
    r = CliRunner().invoke(app, ["evaluate", str(data), "--out", str(out), "-m", BREAST, "--bootstrap", "100",
                                 "--config", str(_config(tmp_path, models))])
    assert r.exit_code == 0, r.output
    assert "Breast composition: accuracy" in r.output
    summary = json.loads((out / "summary.json").read_text())
    c = summary["models"][BREAST]["classification"]["Breast composition"]
    cases = [json.loads(p.read_text()) for p in sorted((out / "cases").glob("*.json"))]
    rows = [x for case in cases for x in case["classes"]]
    assert len(rows) == 8 and c["cases"] == 8
    names = ["A", "B", "C", "D"]
    predicted = [max(names, key=lambda n: row["probabilities"][n]) for row in rows]
    assert predicted == [row["predicted"] for row in rows]
    confusion = [[sum(1 for row, p in zip(rows, predicted, strict=True) if row["reference"] == a and p == b)
                  for b in names] for a in names]
    assert c["confusion"] == confusion
    assert c["accuracy"] == pytest.approx(sum(row["reference"] == p for row, p in zip(rows, predicted, strict=True)) / 8)
    for name in names:
        pos = [row["probabilities"][name] for row in rows if row["reference"] == name]
        neg = [row["probabilities"][name] for row in rows if row["reference"] != name]
        assert c["per_class"][name]["auc"] == pytest.approx(_auc(pos, neg))
        tp = confusion[names.index(name)][names.index(name)]
        assert c["per_class"][name]["sensitivity"] == pytest.approx(tp / len(pos))
        fp = sum(confusion[names.index(a)][names.index(name)] for a in names if a != name)
        assert c["per_class"][name]["specificity"] == pytest.approx((len(neg) - fp) / len(neg))
    assert c["macro_auc"] == pytest.approx(np.mean([c["per_class"][n]["auc"] for n in names]))
    html = (out / "report.html").read_text()
    assert "Classification: " in html and "ROC curves" in html


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("labelled")
    for seed in (7101, 7102, 7103):
        write_case(make_phantom(seed, SMALL, n_lesions=2), root / f"case_{seed}", seed=seed)
    return root


def _froc_direct(cases: list[dict[str, Any]], label: str, rate: float) -> float:
    """The sensitivity at ``rate`` false positives per scan, by trying every score as the threshold."""
    scores = [*sorted({c["score"] for case in cases for c in case["lesions"][label]["candidates"]}), float("inf")]
    refs = sum(case["lesions"][label]["ref_lesions"] for case in cases)
    best = 0.0
    for t in scores:
        hit = sum(len({h for c in case["lesions"][label]["candidates"] if c["score"] >= t for h in c["hits"]})
                  for case in cases)
        fps = sum(1 for case in cases for c in case["lesions"][label]["candidates"] if c["score"] >= t and not c["hits"])
        if fps / len(cases) <= rate:
            best = max(best, hit / refs)
    return best


@needs_zoo
def test_evaluate_detection_froc_matches_a_direct_computation(tmp_path: Path, labelled: Path) -> None:
    """The Zoo's lung nodule detector (random weights, CPU-time settings of tests/test_model_zoo.py): lesion-wise
    figures, the sensitivity at 1/2/4/8 FP per scan, the reported operating point."""
    pytest.importorskip("torchvision")
    from tests.test_model_zoo import DETECTION_CARD

    models = tmp_path / "models"
    zoo.install_detector(ZOO, models, DETECTION_CARD.replace("detections_per_img=6", "detections_per_img=40"))
    out = tmp_path / "report"
    r = CliRunner().invoke(app, ["evaluate", str(labelled), "--out", str(out), "-m", "lung_nodule_ct_detection",
                                 "--bootstrap", "100", "--detection", "overlap",
                                 "--config", str(_config(tmp_path, models))])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    nodule = summary["models"]["lung_nodule_ct_detection"]["labels"]["Nodule"]
    assert "voxel" not in nodule  # boxes: lesion-wise figures only
    det = nodule["detection"]
    cases = [json.loads(p.read_text()) for p in sorted((out / "cases").glob("*.json"))]
    assert det["scored_by"] == "confidence" and det["lesions"] == sum(c["lesions"]["Nodule"]["ref_lesions"] for c in cases)
    candidates = [c for case in cases for c in case["lesions"]["Nodule"]["candidates"]]
    assert any(c["hits"] for c in candidates) and any(not c["hits"] for c in candidates)  # not vacuous
    for rate in (1.0, 2.0, 4.0, 8.0):
        assert det["sensitivity_at_fp"][str(rate)] == pytest.approx(_froc_direct(cases, "Nodule", rate))
        lo, hi = det["sensitivity_at_fp_ci"][str(rate)]
        assert lo <= hi
    # random weights rank false positives first: the whole curve is checked too, where it rises
    from_curve = max(p["sensitivity"] for p in det["froc"] if p["fp_per_scan"] <= 40.0)
    assert from_curve == pytest.approx(_froc_direct(cases, "Nodule", 40.0)) and from_curve > 0
    reported = [c for case in cases for c in case["lesions"]["Nodule"]["candidates"] if c["reported"]]
    assert det["fp_per_scan"] == pytest.approx(sum(1 for c in reported if not c["hits"]) / len(cases))
    assert det["detected"] == sum(len({h for c in case["lesions"]["Nodule"]["candidates"] if c["reported"]
                                       for h in c["hits"]}) for case in cases)
    assert "sensitivity at FP/scan" in r.output


def test_evaluate_segmentation_dice_matches_a_direct_computation(tmp_path: Path, labelled: Path) -> None:
    """The demo model: each case's Dice against the reference SEG, computed here with numpy from the model's own
    prediction and the reference read back, equals the report's."""
    from node.evaluate import discover, evaluate, load_reference
    from node.evaluate.run import EvalOptions
    from node.imaging.volume import load_series
    from node.inference.kinds import load_runner
    from node.inference.registry import Registry
    from node.processing.findings import predict_findings

    model = Registry(ROOT / "models").get("lesion-ct-demo")
    runner = load_runner(model, device="cpu")
    summary = evaluate(labelled, [model], tmp_path / "out", runners={model.name: runner},
                       options=EvalOptions(bootstrap=100))
    direct = []
    for case in discover(labelled).cases:
        volume = load_series(case.image_files)
        ref = load_reference(case, volume, label_map={"nodule": 1}) == 1
        found = predict_findings(volume, runner, model)
        pred = (found.labels == 1) if found.labels is not None else np.zeros(volume.shape, bool)
        direct.append(2 * (pred & ref).sum() / (pred.sum() + ref.sum()) if pred.any() or ref.any() else 1.0)
    assert summary["models"]["lesion-ct-demo"]["labels"]["Nodule"]["voxel"]["dice"]["mean"] == \
        pytest.approx(float(np.mean(direct)), abs=1e-6)


class _Receiver(BaseHTTPRequestHandler):
    posts: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Receiver.posts.append({"body": body, "if_none_exist": self.headers.get("If-None-Exist")})
        self.send_response(201)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return


@pytest.fixture
def receiver_port() -> Iterator[int]:
    _Receiver.posts = []
    yield free_port()


def test_notification_receiver_down_for_a_while_gets_each_notification_once(
        make_node: Callable[..., Any], small_series: Path, receiver_port: int) -> None:
    """[notify] messages are outbox rows: while the FHIR receiver is down they are retried (audited as failed
    deliveries); once it is up each arrives once, with its de-duplication key."""
    node = make_node(route_extra='priority = "stat"',
                     extra=f'[notify]\nfhir_url = "http://127.0.0.1:{receiver_port}/fhir"\ntimeout = 2\n')
    assert all(o.ok for o in send_files([str(p) for p in sorted(small_series.glob("*.dcm"))], ae_title="PREANNOT",
                                        host="127.0.0.1", port=node.listener.port, calling_ae="TESTSCU"))
    job = wait_for(lambda: node.store.list_jobs(state="done"), 120, what="the job")[0]

    def failures() -> int:
        return len(node.store.db.query("SELECT 1 FROM events WHERE kind = 'delivery.failed' AND detail LIKE "
                                       "'%notify:fhir%'"))

    wait_for(lambda: failures() >= 2, 60, what="two failed attempts while the receiver is down")
    http = ThreadingHTTPServer(("127.0.0.1", receiver_port), _Receiver)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        wait_for(lambda: _Receiver.posts, 60, what="the notification once the receiver is up")
        time.sleep(3.0)  # a few more delivery rounds: nothing is sent twice
        assert len(_Receiver.posts) == 1
        post = _Receiver.posts[0]
        assert post["body"]["identifier"] == [{"system": "urn:preannot:job", "value": str(job.id)}]
        assert post["if_none_exist"] == f"identifier=urn:preannot:job|{job.id}"
        rows = node.store.outbox(job_id=job.id)
        notes = [o for o in rows if o.destination == "notify:fhir"]
        assert len(notes) == 1 and notes[0].state == "sent" and notes[0].attempts >= 3
    finally:
        http.shutdown()
        http.server_close()


def test_evaluate_report_directory_is_reusable(tmp_path: Path, labelled: Path) -> None:
    """A case computed by an earlier release (no "classes" key) is computed again, not read as it is."""
    from node.evaluate import evaluate
    from node.evaluate.run import EvalOptions
    from node.inference.registry import Registry

    model = Registry(ROOT / "models").get("lesion-ct-demo")
    out = tmp_path / "out"
    evaluate(labelled, [model], out, options=EvalOptions(bootstrap=50))
    first = sorted((out / "cases").glob("*.json"))[0]
    old = json.loads(first.read_text())
    old.pop("classes")
    first.write_text(json.dumps(old))
    msgs: list[str] = []
    evaluate(labelled, [model], out, options=EvalOptions(bootstrap=50), progress=msgs.append)
    assert sum("already done" in m for m in msgs) == 2 and "classes" in json.loads(first.read_text())
    shutil.rmtree(out)


def test_evaluate_from_verdicts_scores_a_detector_as_sent(tmp_path: Path, labelled: Path) -> None:
    """A detector's result has no SEG: ``evaluate --from-verdicts`` scores its stored boxes, with their scores,
    lesion-wise against the radiologist's final SEG (one box on a lesion, one elsewhere: 1 of 2 found, 1 FP)."""
    from scipy import ndimage

    from node.evaluate import discover, evaluate, load_reference
    from node.evaluate.run import EvalOptions
    from node.evaluate.verdicts import as_sent, verdict_dataset
    from node.imaging.volume import load_series
    from node.inference.registry import Registry
    from node.ingest.spool import Spool
    from node.outputs.result import ResultObject
    from node.store.db import Database
    from node.store.jobs import JobStore
    from node.store.results import FindingResult, JobResult
    from node.store.series import SeriesStore
    from node.verdicts.judge import Judgement
    from node.verdicts.store import VerdictRecord, VerdictStore

    case = discover(labelled).cases[0]
    db = Database(tmp_path / "node.db")
    series, jobs, verdicts = SeriesStore(db), JobStore(db), VerdictStore(db)
    spool = Spool(tmp_path / "spool", series)
    for f in case.image_files:
        spool.store(f.read_bytes())
    volume = load_series(case.image_files)
    ref = load_reference(case, volume, label_map={"nodule": 1}) == 1
    comps, n = ndimage.label(ref)
    assert n == 2
    (kk, jj, ii), *_ = ndimage.find_objects(comps)

    def box(number: int, bbox: tuple[tuple[int, int], ...], score: float) -> FindingResult:
        return FindingResult(number=number, label=1, label_name="Nodule", kind="box", volume_mm3=1.0,
                             diameter_3d_mm=1.0, diameter_inplane_mm=1.0, centroid_mm=(0.0, 0.0, 0.0),
                             key_slice=bbox[0][0], bbox=bbox, mean=0.0, min=0.0, max=0.0, confidence=score)

    on_lesion = ((kk.start, kk.stop - 1), (jj.start, jj.stop - 1), (ii.start, ii.stop - 1))
    with db.tx() as c:
        jid = jobs.create(c, series_uid=case.series_uid, series_version=1, model="lesion-ct-demo", route="r",
                          send_to=[], max_attempts=3, config_version="x", now=time.time())
    assert jid is not None and jobs.lease(lease_seconds=60) is not None
    result = JobResult(model={"name": "lesion-ct-demo", "version": "1"}, series_uid=case.series_uid,
                       findings=(box(1, on_lesion, 0.9), box(2, ((0, 1), (0, 3), (0, 3)), 0.4)))
    jobs.complete(jid, result=result, objects=[ResultObject("/x/sr.dcm", "1.2.3.4.5", "sr")], destinations=[])
    verdicts.record(VerdictRecord(job_id=jid, source="seg", object_uid="1.2.3.9", study_uid="1.2", series_uid=case.series_uid,
                                  model="lesion-ct-demo", model_version="1", judgement=Judgement([], "edited", None),
                                  object_path=str(case.reference), received_at=time.time()))
    dataset = verdict_dataset(verdicts, series, model="lesion-ct-demo")
    assert len(dataset.cases) == 1
    model = Registry(ROOT / "models").get("lesion-ct-demo")
    sent, runner = as_sent(jobs, model, dataset)
    summary = evaluate(dataset, [sent], tmp_path / "out", runners={sent.name: runner}, options=EvalOptions(bootstrap=50))
    det = summary["models"][sent.name]["labels"]["Nodule"]["detection"]
    assert (det["lesions"], det["detected"], det["fp_per_scan"]) == (2, 1, 1.0)
    assert det["scored_by"] == "confidence" and det["sensitivity_at_fp"]["1.0"] == 0.5


@needs_zoo
def test_evaluate_from_verdicts_scores_a_classifier_as_sent(tmp_path: Path) -> None:
    """Radiologists state the class of six classified mammograms over HTTP (``class_value``); ``evaluate
    --from-verdicts`` scores the classes and scores the node sent against theirs: the confusion matrix and the
    accuracy checked against a direct computation; a class not among the model's is refused."""
    from node.config import VerdictsConfig
    from node.evaluate import evaluate
    from node.evaluate.run import EvalOptions
    from node.evaluate.verdicts import as_sent, verdict_dataset
    from node.inference.registry import Registry
    from node.ingest.spool import Spool
    from node.outputs.result import ResultObject
    from node.store.db import Database
    from node.store.jobs import JobStore
    from node.store.results import ClassResult, JobResult
    from node.store.series import SeriesStore
    from node.verdicts.intake import VerdictBodyError, VerdictIntake, http_verdict
    from node.verdicts.store import VerdictStore

    models = tmp_path / "models"
    _add_classifier(tmp_path, models)
    db = Database(tmp_path / "node.db")
    series, jobs, verdicts = SeriesStore(db), JobStore(db), VerdictStore(db)
    spool = Spool(tmp_path / "spool", series)
    intake = VerdictIntake(VerdictsConfig(), series, jobs, verdicts)
    names = ["A", "B", "C", "D"]
    # (the node's class scores, the radiologist's class) per mammogram
    cases = [((0.7, 0.1, 0.1, 0.1), "A"), ((0.1, 0.6, 0.2, 0.1), "B"), ((0.1, 0.5, 0.3, 0.1), "C"),
             ((0.05, 0.05, 0.8, 0.1), "C"), ((0.1, 0.1, 0.2, 0.6), "D"), ((0.4, 0.3, 0.2, 0.1), "D")]
    for n, (scores, stated) in enumerate(cases):
        mg = write_mammogram(tmp_path / "in" / str(n), seed=500 + n, density="B", patient_id=f"P{n}")
        stored = spool.store(mg.read_bytes())
        with db.tx() as c:
            jid = jobs.create(c, series_uid=stored.series_uid, series_version=1, model=BREAST, route="r", send_to=[],
                              max_attempts=3, config_version="x", now=time.time())
        assert jid is not None and jobs.lease(lease_seconds=60) is not None
        probabilities = dict(zip(names, scores, strict=True))
        best = max(names, key=lambda k: probabilities[k])
        result = JobResult(model={"name": BREAST, "version": "1"}, series_uid=stored.series_uid, classes=(
            ClassResult(concept="Breast composition", value=best, label=names.index(best) + 1,
                        probability=probabilities[best], probabilities=probabilities),))
        jobs.complete(jid, result=result, objects=[ResultObject(f"/x/sr{n}.dcm", f"1.2.3.4.{n}", "sr")],
                      destinations=[])
        job = jobs.get(jid)
        if n == 0:
            for bad in ({"findings": [], "added": 0}, {"class_value": "E"}):
                with pytest.raises(VerdictBodyError):
                    http_verdict(intake, job, bad, actor="ris")
        http_verdict(intake, job, {"findings": [], "added": 0, "class_value": stated}, actor="ris")
    dataset = verdict_dataset(verdicts, series, model=BREAST)
    assert len(dataset.cases) == len(cases) and all(c.reference_class for c in dataset.cases)
    sent, runner = as_sent(jobs, Registry(models).get(BREAST), dataset)
    summary = evaluate(dataset, [sent], tmp_path / "out", runners={sent.name: runner},
                       options=EvalOptions(bootstrap=50))
    c = summary["models"][sent.name]["classification"]["Breast composition"]
    predicted = [max(names, key=lambda k: dict(zip(names, s, strict=True))[k]) for s, _ in cases]
    confusion = [[sum(1 for (_s, ref), p in zip(cases, predicted, strict=True) if ref == a and p == b) for b in names]
                 for a in names]
    assert c["cases"] == len(cases) and c["confusion"] == confusion
    assert c["accuracy"] == pytest.approx(sum(ref == p for (_s, ref), p in zip(cases, predicted, strict=True))
                                          / len(cases))
    # the verdicts count in the agreement too: a changed class is an edit
    rows = verdicts.rows(model=BREAST)
    assert sorted(r["study_verdict"] for r in rows).count("accepted") == sum(
        ref == p for (_s, ref), p in zip(cases, predicted, strict=True))
