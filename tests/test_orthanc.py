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


def _start_node(tmp_path: Path, port: int, kind: str, orthanc: Orthanc, allowed: str) -> tuple[Any, Path]:
    """A started node sending its results to ``orthanc`` by ``kind``; returns it with its config path."""
    from node.config import load_config
    from node.service import Node
    from tests.conftest import node_toml

    text = node_toml(tmp_path / "data", port, stable=1.0, allowed=allowed)
    text = text.replace('send_to = []', 'send_to = ["pacs"]') + _destination(kind, orthanc)
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
