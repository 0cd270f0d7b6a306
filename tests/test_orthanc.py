"""A real PACS end to end: Orthanc routes CT series to preannot (Lua OnStableSeries), preannot sends
the SEG and SR back by C-STORE, DICOMweb STOW-RS or Orthanc REST, and they land in the same study,
once."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.conftest import wait_for
from tests.orthanc import Orthanc, orthanc_available

pytestmark = [pytest.mark.integration, pytest.mark.skipif(orthanc_available() is not None,
                                                          reason=orthanc_available() or "")]


def _destination(kind: str, orthanc: Orthanc) -> str:
    if kind == "dicom":
        return f'''
[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {orthanc.dicom_port}
'''
    url = f"{orthanc.url}/dicom-web" if kind == "dicomweb" else orthanc.url
    return f'''
[[destinations]]
name = "pacs"
kind = "{kind}"
url = "{url}"
auth = "basic"
username = "{orthanc.user}"
password_env = "TEST_ORTHANC_PASSWORD"
'''


def _start_node(tmp_path: Path, port: int, kind: str, orthanc: Orthanc, allowed: str, *, extra: str = "",
                web_port: int | None = None) -> tuple[Any, Path]:
    """A started node sending its results to ``orthanc`` by ``kind`` (its web service on ``web_port`` with a
    token when given); returns it with its config path."""
    from node.config import load_config
    from node.service import Node
    from tests.conftest import node_toml

    text = node_toml(tmp_path / "data", port, stable=1.0, allowed=allowed, extra=extra)
    text = text.replace('send_to = []', 'send_to = ["pacs"]') + _destination(kind, orthanc)
    if web_port is not None:
        text = text.replace("[web]\nenabled = false", f'[web]\nenabled = true\nport = {web_port}\n'
                                                       'tokens = { ris = "a-token-of-at-least-16" }')
    cfg_path = tmp_path / "node.toml"
    cfg_path.write_text(text)
    node = Node(load_config(cfg_path))
    node.start()
    return node, cfg_path


def _study_series(client: Any, study_id: str) -> dict[str, list[dict[str, Any]]]:
    by_modality: dict[str, list[dict[str, Any]]] = {}
    for s in client.get_json(f"/studies/{study_id}/series"):
        by_modality.setdefault(s["MainDicomTags"].get("Modality", "?"), []).append(s)
    return by_modality


@pytest.mark.parametrize("kind", ["dicom", "dicomweb", "orthanc"])
def test_orthanc_routes_and_receives_results(kind: str, tmp_path: Path, small_series: Path,
                                             make_node: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import free_port

    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", preannot_port=port)
    monkeypatch.setenv("TEST_ORTHANC_PASSWORD", orthanc.password)
    try:
        node, _ = _start_node(tmp_path, port, kind, orthanc, '["ORTHANC"]')
        try:
            client = orthanc.client()
            for p in sorted(small_series.glob("*.dcm")):
                client.upload(p.read_bytes())
            study_uid = str(dcmread(next(small_series.glob("*.dcm"))).StudyInstanceUID)
            found = client.lookup(study_uid)
            study_id = found[0] if isinstance(found, list) else found
            assert study_id
            series = wait_for(lambda: (s := _study_series(client, study_id)) and "SR" in s and "SEG" in s and s,
                              180, interval=1.0, what="SEG and SR in the Orthanc study")
            assert len(series["SEG"]) == 1 and len(series["SR"]) == 1
            assert len(series["SEG"][0]["Instances"]) == 1 and len(series["SR"][0]["Instances"]) == 1
            seg_bytes = client.get_binary(f"/instances/{series['SEG'][0]['Instances'][0]}/file")
            import io

            seg = dcmread(io.BytesIO(seg_bytes))
            ct_series_uid = str(dcmread(next(small_series.glob("*.dcm"))).SeriesInstanceUID)
            assert seg.StudyInstanceUID == study_uid
            assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct_series_uid
            # the PACS can show the objects before the node has recorded the C-STORE responses: wait for it
            wait_for(lambda: node.store.outbox_counts()["sent"] == 2, 30, what="both objects recorded as sent")

            # the same series routed again: no new job, no duplicate result
            client.post("/modalities/preannot/store", json={"Resources": [series["CT"][0]["ID"]]})
            time.sleep(4.0)
            assert len(node.store.list_jobs()) == 1
            again = _study_series(client, study_id)
            assert len(again["SEG"]) == 1 and len(again["SR"]) == 1
            assert sum(len(s["Instances"]) for s in again["SEG"] + again["SR"]) == 2
            # the password never reaches the logs or the audit trail
            events = " ".join(r["detail"] for r in node.store.db.query("SELECT detail FROM events"))
            assert orthanc.password not in events
        finally:
            node.stop()
    finally:
        orthanc.stop()


def test_wrong_password_is_retried_then_dead(tmp_path: Path, small_series: Path, make_node: Callable[..., Any],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from node.config import load_config
    from node.delivery.senders import make_sender

    orthanc = Orthanc(tmp_path / "orthanc", preannot_port=1)
    try:
        monkeypatch.setenv("TEST_ORTHANC_PASSWORD", "not-the-password")
        cfg = load_config(None, env={}, overrides={"destinations": [
            {"name": "pacs", "kind": "dicomweb", "url": f"{orthanc.url}/dicom-web", "auth": "basic",
             "username": "preannot", "password_env": "TEST_ORTHANC_PASSWORD"}]})
        out = make_sender(cfg.destination("pacs"), calling_ae="PREANNOT").send([str(next(small_series.glob("*.dcm")))])
        assert not out[0].ok and "HTTP 401" in (out[0].error or "")
        assert "not-the-password" not in (out[0].error or "")
        monkeypatch.delenv("TEST_ORTHANC_PASSWORD")
        out = make_sender(cfg.destination("pacs"), calling_ae="PREANNOT").send(["x.dcm"])
        assert "TEST_ORTHANC_PASSWORD is not set" in (out[0].error or "")
    finally:
        orthanc.stop()


@pytest.mark.parametrize("kind", ["dicom", "dicomweb"])
def test_fetch_past_study_for_reprocessing(kind: str, tmp_path: Path, small_series: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`preannot fetch --from pacs --study UID`: C-MOVE (or WADO-RS) brings a stored study to the node."""
    from typer.testing import CliRunner

    from node.cli import app
    from tests.conftest import free_port

    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", preannot_port=port, route=False)  # no automatic routing
    monkeypatch.setenv("TEST_ORTHANC_PASSWORD", orthanc.password)
    try:
        client = orthanc.client()
        for p in sorted(small_series.glob("*.dcm")):
            client.upload(p.read_bytes())
        node, cfg_path = _start_node(tmp_path, port, kind, orthanc, '["ORTHANC", "PACS"]')
        try:
            study_uid = str(dcmread(next(small_series.glob("*.dcm"))).StudyInstanceUID)
            r = CliRunner().invoke(app, ["fetch", "--from", "pacs", "--study", study_uid, "--config", str(cfg_path)])
            assert r.exit_code == 0, r.output
            assert "24 instance(s) sent, 0 failed" in r.output
            wait_for(lambda: node.store.outbox_counts()["sent"] == 2, 120, what="results of the fetched study")
            r = CliRunner().invoke(app, ["fetch", "--from", "pacs", "--study", "1.2.3.4.5", "--config", str(cfg_path)])
            # an unknown study: exit 1, and the message says that nothing was sent for it
            assert r.exit_code == 1 and "no instance" in r.output and "1.2.3.4.5" in r.output, r.output
        finally:
            node.stop()
    finally:
        orthanc.stop()


def test_series_count_from_the_pacs_holds_an_incomplete_series(tmp_path: Path, small_series: Path) -> None:
    """Route option expected_count_from: the node asks Orthanc by C-FIND how many instances the series has."""
    from node.config import load_config
    from node.net.scu import send_files
    from node.service import Node
    from tests.conftest import free_port, node_toml

    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", preannot_port=port, route=False)
    try:
        files = sorted(small_series.glob("*.dcm"))
        client = orthanc.client()
        for p in files:
            client.upload(p.read_bytes())  # the PACS holds all 24
        text = node_toml(tmp_path / "data", port, stable=0.5) + _destination("dicom", orthanc)
        text = text.replace("extra_outputs = []", 'extra_outputs = []\nexpected_count_from = "pacs"')
        (tmp_path / "node.toml").write_text(text)
        node = Node(load_config(tmp_path / "node.toml"))
        node.start()
        try:
            uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
            send = lambda fs: send_files([str(p) for p in fs], ae_title="PREANNOT", host="127.0.0.1",  # noqa: E731
                                         port=port, calling_ae="TESTSCU")
            assert all(o.ok for o in send(files[:20]))  # no hole in numbers or positions: only the PACS knows
            wait_for(lambda: node.series.get(uid).state == "incomplete", 30, what="held incomplete")
            assert node.series.get(uid).note == "pacs reports 24 instances by C-FIND; 20 received"
            assert node.store.list_jobs() == []
            assert all(o.ok for o in send(files[20:]))
            wait_for(lambda: node.store.list_jobs(state="done"), 120, what="the job once complete")
            assert node.series.get(uid).state == "dispatched"
        finally:
            node.stop()
    finally:
        orthanc.stop()


def test_reprocess_supersedes_with_a_rejection_note(tmp_path: Path, small_series: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     dciodvfy: Callable[[Path], list[str]]) -> None:
    """`reprocess` of a done series: one new SEG + SR, then an IOCM rejection note (KOS, 113001) citing the old
    ones, all in the same study of the PACS; the old job is shown superseded and cannot be resent."""
    import io

    from tests.conftest import free_port

    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", preannot_port=port)
    monkeypatch.setenv("TEST_ORTHANC_PASSWORD", orthanc.password)
    try:
        node, _ = _start_node(tmp_path, port, "dicom", orthanc, '["ORTHANC"]')
        try:
            client = orthanc.client()
            for p in sorted(small_series.glob("*.dcm")):
                client.upload(p.read_bytes())
            ct = dcmread(next(small_series.glob("*.dcm")), stop_before_pixels=True)
            study_id = wait_for(lambda: (f := client.lookup(str(ct.StudyInstanceUID))) and
                                (f[0] if isinstance(f, list) else f), 30, what="the study in Orthanc")
            wait_for(lambda: node.store.outbox_counts()["sent"] == 2, 180, what="first SEG + SR delivered")
            first = node.store.list_jobs()[0]
            old_uids = {i.sop_uid for i in node.store.outbox(job_id=first.id)}

            assert node.reprocess(str(ct.SeriesInstanceUID), actor="test") == 2
            wait_for(lambda: node.store.outbox_counts()["sent"] == 5, 180,
                     what="new SEG + SR and the rejection note delivered")
            jobs = {j.series_version: j for j in node.store.list_jobs()}
            assert jobs[1].superseded_by == jobs[2].id and jobs[2].superseded_by is None
            items = node.store.outbox(job_id=jobs[2].id)
            assert sorted(i.role for i in items) == ["rejection", "result", "result"]
            note_item = next(i for i in items if i.role == "rejection")
            # the note was sent after the objects replacing the withdrawn ones
            sent_at = {r["sop_uid"]: r["sent_at"] for r in node.store.db.query(
                "SELECT sop_uid, sent_at FROM outbox WHERE job_id = ?", (jobs[2].id,))}
            assert sent_at[note_item.sop_uid] >= max(v for k, v in sent_at.items() if k != note_item.sop_uid)
            assert dciodvfy(Path(note_item.path)) == []

            series = _study_series(client, study_id)
            assert len(series["KO"]) == 1 and len(series["KO"][0]["Instances"]) == 1
            ko = dcmread(io.BytesIO(client.get_binary(f"/instances/{series['KO'][0]['Instances'][0]}/file")))
            assert ko.StudyInstanceUID == ct.StudyInstanceUID
            assert ko.ConceptNameCodeSequence[0].CodeValue == "113001"  # Rejected for Quality Reasons
            cited = {i.ReferencedSOPInstanceUID for s in ko.CurrentRequestedProcedureEvidenceSequence
                     for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
            assert cited == old_uids
            # one current SEG and SR: the new ones are in the PACS beside the withdrawn ones (Orthanc keeps
            # rejected instances; an IOCM-aware PACS hides them)
            new_uids = {i.sop_uid for i in items if i.role == "result"}
            stored = {client.get_json(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]
                      for s in series["SEG"] + series["SR"] for i in s["Instances"]}
            assert new_uids <= stored and len(stored - old_uids - new_uids) == 0
            # a superseded job cannot be resent nor retried
            with pytest.raises(Exception, match="superseded"):
                node.store.resend(jobs[1].id)
            kinds = [r["kind"] for r in node.store.db.query("SELECT kind FROM events WHERE job_id = ?",
                                                            (jobs[1].id,))]
            assert "job.superseded" in kinds
        finally:
            node.stop()
    finally:
        orthanc.stop()


def _second_study(series: Path, out: Path) -> Path:
    """The same images as another patient visit: new study, series, frame of reference and instance UIDs."""
    from pydicom.uid import generate_uid

    out.mkdir(parents=True)
    study, ser, frame = generate_uid(), generate_uid(), generate_uid()
    for p in sorted(series.glob("*.dcm")):
        ds = dcmread(p)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, ser, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(out / p.name)
    return out


def test_radiologist_verdicts_come_back_through_orthanc(tmp_path: Path, small_series: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two studies routed by Orthanc; the radiologist (the test) stores an edited SEG and a verified SR for
    the first and a rejection note for the second; Orthanc's verdict rule sends them back; the node
    records accepted / edited (with Dice) / rejected / added exactly, once on re-send; the dashboard shows
    them in headless Chromium; `preannot evaluate --from-verdicts` gives the same Dice as the SEGs."""
    import json
    import shutil
    import subprocess

    import numpy as np
    from scipy import ndimage
    from typer.testing import CliRunner

    from node.cli import app
    from tests.conftest import free_port
    from tests.radiologist import edited_seg, rejection, verified_sr

    port, web_port = free_port(), free_port()
    orthanc = Orthanc(tmp_path / "orthanc", preannot_port=port, verdicts=True)
    monkeypatch.setenv("TEST_ORTHANC_PASSWORD", orthanc.password)
    node, cfg_path = _start_node(tmp_path, port, "dicom", orthanc, '["ORTHANC"]', web_port=web_port)
    try:
        client = orthanc.client()
        second = _second_study(small_series, tmp_path / "study2")
        for folder in (small_series, second):
            for p in sorted(folder.glob("*.dcm")):
                client.upload(p.read_bytes())
        wait_for(lambda: len(node.store.list_jobs(state="done")) == 2, 240, what="both studies processed")
        wait_for(lambda: node.store.outbox_counts().get("sent", 0) == 4, 60, what="SEG + SR of both at the PACS")
        study1 = str(dcmread(next(small_series.glob("*.dcm"))).SeriesInstanceUID)
        job1 = next(j for j in node.store.list_jobs() if j.series_uid == study1)
        job2 = next(j for j in node.store.list_jobs() if j.series_uid != study1)
        assert job1.result and job2.result
        seg1, sr1 = Path(job1.result.files["seg"]), Path(job1.result.files["sr"])
        seg2, sr2 = Path(job2.result.files["seg"]), Path(job2.result.files["sr"])
        sources = sorted((dcmread(p) for p in small_series.glob("*.dcm")), key=lambda d: float(d.ImagePositionPatient[2]))
        out = tmp_path / "radiologist"
        out.mkdir()
        edited, ai, final = edited_seg(seg1, sources, out)
        objects = [edited, verified_sr(sr1, out), rejection(seg2, sr2, out)]
        for p in objects:  # stored in the PACS as a workstation would; Orthanc's rule sends them back
            client.upload(p.read_bytes())
        wait_for(lambda: len(node.verdicts.rows()) == 3, 120, what="three verdicts back from Orthanc")
        by_source = {v["source"]: v for v in node.verdicts.rows()}
        v = by_source["seg"]
        n_ai = ndimage.label(ai, structure=np.ones((3, 3, 3), bool))[1]
        direct = float(2 * (ai & final).sum() / (ai.sum() + final.sum()))
        assert (v["job_id"], v["n_ai"], v["accepted"], v["edited"], v["rejected"], v["added"]) == \
            (job1.id, n_ai, n_ai - 2, 1, 1, 1)
        assert v["case_dice"] == pytest.approx(direct, abs=1e-4)
        assert by_source["sr"]["job_id"] == job1.id and by_source["sr"]["study_verdict"] == "accepted"
        assert by_source["ko"]["job_id"] == job2.id and by_source["ko"]["study_verdict"] == "rejected"
        assert len(node.store.list_jobs()) == 2  # nothing routed to a model
        # re-sent by the PACS: recorded once
        seg_series = client.lookup(str(dcmread(edited).SeriesInstanceUID))[0]
        client.post("/modalities/preannot/store", json={"Resources": [seg_series], "Synchronous": True})
        time.sleep(4)
        assert len(node.verdicts.rows()) == 3
        # the dashboard shows them
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is not None:
            flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                     f"--user-data-dir={tmp_path / 'chr'}"]
            dom = subprocess.run([chromium, *flags, "--virtual-time-budget=5000", "--dump-dom",
                                  f"http://127.0.0.1:{web_port}/"], capture_output=True, text=True, timeout=120).stdout
            assert "Radiologist verdicts" in dom and ">edited<" in dom and ">rejected<" in dom and ">accepted<" in dom
            assert f"{v['case_dice']:.2f}" in dom and "lesion-ct-demo" in dom
        # the physicist: evaluate from the verdict store, the AI as sent against the final SEG
        report = tmp_path / "report"
        # and a candidate (here the same model, run again on the validated series) scored on the same cases
        r = CliRunner().invoke(app, ["evaluate", "--from-verdicts", "lesion-ct-demo", "-m", "lesion-ct-demo",
                                     "--out", str(report), "--config", str(cfg_path), "--bootstrap", "200"])
        assert r.exit_code == 0, r.output
        summary = json.loads((report / "summary.json").read_text())
        assert summary["cases"] == 1
        sent = summary["models"]["lesion-ct-demo (as sent)"]
        dice = next(iter(sent["labels"].values()))["voxel"]["dice"]["mean"]
        assert dice == pytest.approx(direct, abs=1e-4)
        rerun = summary["models"]["lesion-ct-demo"]
        assert next(iter(rerun["labels"].values()))["voxel"]["dice"]["mean"] == pytest.approx(dice, abs=1e-3)
        assert (report / "report.html").is_file() and summary["comparisons"]
    finally:
        node.stop()
        orthanc.stop()


def test_verdicts_fetched_from_the_pacs_on_a_schedule(tmp_path: Path, small_series: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A PACS with no verdict rule: the node looks for SEG/SR/KO of its studies itself (C-FIND, then C-MOVE
    of the new series to its own AE title) and judges them; its own results are never fetched back."""
    from tests.conftest import free_port
    from tests.radiologist import edited_seg

    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", preannot_port=port)  # routes CT only
    node, _ = _start_node(tmp_path, port, "dicom", orthanc, '["ORTHANC"]',
                          extra='[verdicts]\nfetch_from = "pacs"\nfetch_minutes = 0.05\n')
    try:
        client = orthanc.client()
        for p in sorted(small_series.glob("*.dcm")):
            client.upload(p.read_bytes())
        job = wait_for(lambda: node.store.list_jobs(state="done"), 180, what="the study processed")[0]
        wait_for(lambda: node.store.outbox_counts().get("sent", 0) == 2, 60, what="SEG + SR at the PACS")
        sources = sorted((dcmread(p) for p in small_series.glob("*.dcm")), key=lambda d: float(d.ImagePositionPatient[2]))
        out = tmp_path / "radiologist"
        out.mkdir()
        edited, _, _ = edited_seg(Path(job.result.files["seg"]), sources, out)
        client.upload(edited.read_bytes())
        wait_for(lambda: node.verdicts.rows(), 90, what="the verdict fetched from the PACS")
        v = node.verdicts.rows()[0]
        assert v["source"] == "seg" and v["job_id"] == job.id and v["edited"] == 1 and v["rejected"] == 1
        time.sleep(4)  # more rounds of the schedule: nothing new, nothing twice
        assert len(node.verdicts.rows()) == 1
        own = {str(r[0]) for r in node.store.db.query("SELECT series_uid FROM outbox")}
        received = {s.series_uid for s in node.series.list_series(limit=100)}
        assert not own & received  # its own SEG and SR were not fetched back
    finally:
        node.stop()
        orthanc.stop()
