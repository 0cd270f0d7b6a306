"""The radiologist's verdict: matching, intake by C-STORE through a real node, storage, agreement, drift."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from scipy import ndimage

from node.config import VerdictsConfig
from node.devtools.sink import StoreSink
from node.net.scu import send_files
from node.store.db import Database
from node.store.jobs import JobState, JobStore
from node.store.results import JobResult
from node.verdicts.judge import Judgement, judge_masks, study_verdict
from node.verdicts.stats import agreement, alerts
from node.verdicts.store import VerdictRecord, VerdictStore
from tests.conftest import wait_for
from tests.radiologist import blob, edited_seg, rejection, verified_sr


def test_judge_classifies_each_finding_exactly() -> None:
    shape = (30, 64, 64)
    a1, a2, a3 = blob(shape, (10, 15, 15), 4), blob(shape, (15, 40, 40), 5), blob(shape, (20, 15, 45), 3)
    ai = a1 | a2 | a3
    grown = ndimage.binary_dilation(a2, iterations=3)
    new = blob(shape, (25, 50, 10), 3)
    final = a1 | grown | new  # a1 kept, a2 dilated, a3 removed, one added
    j = judge_masks(ai, final, (2.0, 1.0, 1.0), accept_dice=0.9)
    outcomes = {f.finding: f.outcome for f in j.findings}
    assert outcomes == {1: "accepted", 2: "edited", 3: "rejected", None: "added"}
    edited = next(f for f in j.findings if f.outcome == "edited")
    expected = 2 * (a2 & grown).sum() / (a2.sum() + grown.sum())
    assert edited.dice == pytest.approx(expected, abs=1e-4)
    assert edited.volume_change_pct is not None and edited.volume_change_pct > 0
    assert edited.diameter_change_mm is not None and edited.diameter_change_mm > 0
    assert j.counts() == {"accepted": 1, "edited": 1, "rejected": 1, "added": 1}
    assert j.study_verdict == "edited"
    assert study_verdict({"accepted": 2, "edited": 0, "rejected": 0, "added": 0}) == "accepted"
    assert study_verdict({"accepted": 0, "edited": 0, "rejected": 2, "added": 0}) == "rejected"


def _send(node: Any, paths: list[Path]) -> None:
    out = send_files([str(p) for p in paths], ae_title="PREANNOT", host="127.0.0.1", port=node.listener.port,
                     calling_ae="TESTSCU")
    assert all(o.ok for o in out), out


def test_verdicts_come_back_by_c_store_and_are_recorded_once(make_node: Callable[..., Any], small_series: Path,
                                                             tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sink = StoreSink(tmp_path / "pacs", ae_title="SINK")
    try:
        node = make_node(sink_port=sink.port, stable=1.0)
        files = sorted(small_series.glob("*.dcm"))
        _send(node, files)
        wait_for(lambda: node.store.list_jobs(state=JobState.DONE), 120, what="the job")
        job = node.store.list_jobs()[0]
        wait_for(lambda: node.store.outbox_counts().get("sent", 0) >= 2, 60, what="the results delivered")
        assert job.result is not None
        our_seg, our_sr = Path(job.result.files["seg"]), Path(job.result.files["sr"])
        sources = sorted((dcmread(p) for p in files), key=lambda d: float(d.ImagePositionPatient[2]))
        out = tmp_path / "radiologist"
        out.mkdir()
        edited, ai, final = edited_seg(our_seg, sources, out)
        # the PACS forwards the node's own objects too: they are recognised and ignored
        _send(node, [edited, *sink.files()])
        wait_for(lambda: node.verdicts.rows(), 60, what="the SEG verdict")
        time.sleep(2.5)  # the node's own objects (one series each) are examined too
        rows = node.verdicts.rows()
        assert len(rows) == 1 and rows[0]["source"] == "seg"
        v = rows[0]
        n_ai = ndimage.label(ai, structure=np.ones((3, 3, 3), bool))[1]
        assert v["n_ai"] == n_ai and v["rejected"] == 1 and v["edited"] == 1 and v["added"] == 1
        assert v["accepted"] == n_ai - 2 and v["study_verdict"] == "edited"
        assert v["case_dice"] == pytest.approx(2 * (ai & final).sum() / (ai.sum() + final.sum()), abs=1e-4)
        assert v["observer"].startswith("obs-") and "Doe" not in json.dumps(rows)
        assert "Doe" not in caplog.text
        edited_f = [f for f in node.verdicts.findings(v["id"]) if f["outcome"] == "edited"]
        assert len(edited_f) == 1 and 0 < edited_f[0]["dice"] < 0.9
        # re-sent: recorded once
        _send(node, [edited])
        time.sleep(2.5)
        assert len(node.verdicts.rows()) == 1
        # a verified SR citing ours: accepted; a rejection note: rejected
        _send(node, [verified_sr(our_sr, out)])
        wait_for(lambda: len(node.verdicts.rows()) == 2, 60, what="the SR verdict")
        sr_v = node.verdicts.rows()[-1]
        assert sr_v["source"] == "sr" and sr_v["study_verdict"] == "accepted" and sr_v["accepted"] == sr_v["n_ai"]
        # "save the SEG, then sign the SR": the signature does not undo the edit (evidence merged per finding)
        merged = agreement(node.verdicts)[0]
        assert merged["study_verdicts"] == {"edited": 1} and merged["accepted"] == n_ai - 2
        assert merged["edited"] == 1 and merged["rejected_per_study"] == 1 and merged["added_per_study"] == 1
        assert merged["edit_dice"] == pytest.approx(edited_f[0]["dice"])
        _send(node, [rejection(our_seg, our_sr, out)])
        wait_for(lambda: len(node.verdicts.rows()) == 3, 60, what="the KO verdict")
        ko_v = node.verdicts.rows()[-1]
        assert ko_v["source"] == "ko" and ko_v["study_verdict"] == "rejected" and ko_v["rejected"] == ko_v["n_ai"]
        # nothing was routed to a model, and the verdicts are in the audit chain
        assert len(node.store.list_jobs()) == 1
        kinds = [r["kind"] for r in node.store.db.query("SELECT kind FROM events")]
        assert kinds.count("verdict.recorded") == 3
        # a clinical rejection note rejects every AI finding; the radiologist's added finding stays a miss
        rows = agreement(node.verdicts)
        assert rows[0]["studies"] == 1 and rows[0]["study_verdicts"] == {"edited": 1}
        assert rows[0]["accepted"] == 0 and rows[0]["rejected_per_study"] == n_ai and rows[0]["added_per_study"] == 1
        csv_text = node.verdicts.export("csv")
        assert csv_text.splitlines()[0].startswith("id,job_id,source") and len(csv_text.splitlines()) == 4
        # an HTTP verdict, idempotent on the same body
        every = [{"finding": f.number, "outcome": "accepted"} for f in job.result.findings]
        body = {"findings": every, "added": 0, "observer_role": "radiologist"}
        vid, new = node.record_http_verdict(job.id, body, actor="ris")
        assert new and node.record_http_verdict(job.id, body, actor="ris") == (vid, False)
        # an HTTP verdict judges each of the job's findings once: a partial, repeated or empty one is refused
        from node.verdicts.intake import VerdictBodyError

        bad = [{"findings": every[:-1] + every[:1]}, {"findings": every + every[:1]}, {}]
        if len(every) > 1:
            bad.append({"findings": every[1:]})
        for body in bad:
            with pytest.raises(VerdictBodyError):
                node.record_http_verdict(job.id, body, actor="ris")
        n_ai = len(every)
        intake = node.verdict_intake
        # a PACS purging the study (113039) or a worklist correction (113038) is not a judgement
        for title in (("113039", "Data Retention Policy Expired"), ("113038", "Incorrect Modality Worklist Entry")):
            with pytest.raises(ValueError, match="administrative"):
                intake.examine_file(rejection(our_seg, our_sr, out, title=title))
        # signed with every AI finding deleted: each rejected, not accepted
        def delete_findings(ds: Any) -> None:
            for item in ds.ContentSequence:
                if item.ConceptNameCodeSequence[0].CodeValue == "126010":  # Imaging Measurements
                    item.ContentSequence = []
        lines = intake.examine_file(verified_sr(our_sr, out, edit=delete_findings, name="deleted.dcm"))
        assert f"0 accepted, 0 edited, {n_ai} rejected, 0 added" in lines[0], lines
        # signed by a viewer that re-issued the tracking UIDs (identifiers kept): each accepted, none added
        def reissue(ds: Any) -> None:
            from pydicom.uid import generate_uid

            def walk(items: Any) -> None:
                for item in items or []:
                    if item.get("ValueType") == "UIDREF" and item.ConceptNameCodeSequence[0].CodeValue == "112040":
                        item.UID = generate_uid()
                    walk(item.get("ContentSequence"))
            walk(ds.ContentSequence)
        lines = intake.examine_file(verified_sr(our_sr, out, edit=reissue, name="reissued.dcm"))
        assert f"{n_ai} accepted, 0 edited, 0 rejected, 0 added" in lines[0], lines
    finally:
        sink.stop()


def _month(db: Database, store: VerdictStore) -> None:
    """30 days, 4 studies a day: scanner A (kernel B30f, 90 % of findings accepted) for 15 days, then
    scanner B (kernel Br40, 50 % accepted)."""
    start = time.time() - 30 * 86400
    rng = np.random.default_rng(5)
    jid = 0
    for day in range(30):
        for n in range(4):
            jid += 1
            ts = start + day * 86400 + n * 3600
            new = day >= 15
            attrs = {"Manufacturer": "B" if new else "A", "ConvolutionKernel": "Br40" if new else "B30f",
                     "SliceThickness": "1.0", "Modality": "CT"}
            uid = f"1.2.3.{jid}"
            with db.tx() as c:
                c.execute("INSERT INTO series (series_uid, study_uid, modality, attrs, first_received, last_received, "
                          "updated_at) VALUES (?,?,?,?,?,?,?)", (uid, f"1.2.4.{jid}", "CT", json.dumps(attrs), ts, ts, ts))
                # a sharper kernel: the same anatomy, a wider spread of values (HU percentiles)
                spread = 1.3 if new else 1.0
                intensity = {"p5": round(-900 * spread + rng.normal(0, 10), 1), "p50": round(40 + rng.normal(0, 5), 1),
                             "p95": round(300 * spread + rng.normal(0, 10), 1)}
                result = JobResult(model={"name": "m", "version": "1.0"}, series_uid=uid, intensity=intensity)
                c.execute("INSERT INTO jobs (id, series_uid, series_version, model, route, send_to, state, "
                          "max_attempts, created_at, updated_at, next_run_at, finished_at, result, intensity) VALUES "
                          "(?,?,1,'m','r','[]','done',3,?,?,?,?,?,?)",
                          (jid, uid, ts, ts, ts, ts, result.to_json(), json.dumps(intensity)))
            accepted = int(rng.binomial(4, 0.5 if new else 0.9))
            j = Judgement([], study_verdict({"accepted": accepted, "edited": 0, "rejected": 4 - accepted, "added": 0}),
                          None)
            from node.verdicts.judge import FindingVerdict

            j.findings = [FindingVerdict(k + 1, 1, "accepted" if k < accepted else "rejected") for k in range(4)]
            store.record(VerdictRecord(job_id=jid, source="http", object_uid=f"x{jid}", study_uid=f"1.2.4.{jid}",
                                       series_uid=uid, model="m", model_version="1.0", judgement=j,
                                       received_at=ts + 1800, time_to_verdict_s=1800.0,
                                       scanner=f"{attrs['Manufacturer']} | {attrs['ConvolutionKernel']} | 1.0 mm"))


def test_a_month_of_verdicts_with_a_scanner_change_raises_the_alerts(tmp_path: Path) -> None:
    db = Database(tmp_path / "node.db")
    store = VerdictStore(db)
    _month(db, store)
    config = VerdictsConfig(alert_acceptance_floor=0.7, alert_window=30, baseline_days=15, alert_p=0.01)
    found = {a["kind"]: a for a in alerts(store, JobStore(db), config)}
    assert {"acceptance_floor", "acceptance_drop", "input_shift"} <= set(found)
    drop = found["acceptance_drop"]
    table = {r["scanner"]: r for r in drop["by_scanner"]}
    assert table["A | B30f | 1.0 mm"]["baseline"] > 0.8 and table["B | Br40 | 1.0 mm"]["recent"] < 0.65
    shift = [a for a in alerts(store, JobStore(db), config) if a["kind"] == "input_shift"]
    assert {a["attribute"] for a in shift} >= {"Manufacturer", "ConvolutionKernel", "intensity p5", "intensity p95"}
    assert "intensity p50" not in {a["attribute"] for a in shift}  # the median did not move
    per_scanner = {r["scanner"]: r for r in agreement(store, by="scanner")}
    a, b = per_scanner["A | B30f | 1.0 mm"], per_scanner["B | Br40 | 1.0 mm"]
    assert a["acceptance_ci"][0] > b["acceptance_ci"][1]  # the intervals do not overlap
    # the gauges cover the alert window (the last 30 judged studies: all on scanner B), not all time
    whole, recent = agreement(store)[0], agreement(store, window=30)[0]
    assert whole["studies"] == 120 and recent["studies"] == 30
    assert recent["acceptance"] == pytest.approx(b["acceptance"], abs=0.05) and whole["acceptance"] > 0.6
    # before the change: no alert on agreement
    config_early = VerdictsConfig(alert_acceptance_floor=0.7, alert_window=30, baseline_days=40)
    assert not [x for x in alerts(store, JobStore(db), config_early) if x["kind"] == "acceptance_drop"]


def test_a_verdict_handed_over_before_a_kill_is_examined_at_the_restart(make_node: Callable[..., Any],
                                                                         small_series: Path, tmp_path: Path) -> None:
    """The assembler hands a verdict series over (state ``verdict``) and the node dies before examining it: at the
    next start it is examined (before: it stayed unexamined for good, and the PACS re-sending it was a duplicate)."""
    node = make_node(stable=1.0)
    files = sorted(small_series.glob("*.dcm"))
    _send(node, files)
    wait_for(lambda: node.store.list_jobs(state=JobState.DONE), 120, what="the job")
    job = node.store.list_jobs()[0]
    assert job.result is not None
    sources = sorted((dcmread(p) for p in files), key=lambda d: float(d.ImagePositionPatient[2]))
    out = tmp_path / "radiologist"
    out.mkdir()
    edited, _ai, _final = edited_seg(Path(job.result.files["seg"]), sources, out)
    node.stop()
    # what a node killed right after the hand-over leaves: the SEG spooled, its series in state verdict
    stored = node.spool.store(edited.read_bytes(), calling_ae="TESTSCU")
    info = node.series.get(stored.series_uid)
    with node.db.tx() as c:
        claimed = node.series.claim_stable(c, info.series_uid, version=info.version, last_received=info.last_received)
        assert claimed is not None
        node.series.mark_verdict(c, claimed, now=time.time())
    assert node.verdicts.rows() == []
    again = make_node(stable=1.0)
    wait_for(lambda: again.verdicts.rows(), 60, what="the verdict examined after the restart")
    assert again.verdicts.rows()[0]["source"] == "seg"
    again.stop()
    third = make_node(stable=1.0)  # examined once: not again at the next start
    time.sleep(2)
    assert len(third.verdicts.rows()) == 1
    assert third.db.one("SELECT COUNT(*) AS n FROM events WHERE kind = 'verdict.examined'")["n"] == 1
