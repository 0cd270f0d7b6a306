"""Operations: the HTTP API of a running `preannot serve`, the dashboard in headless Chromium,
the audit trail's hash chain and retention."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from io import BytesIO
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from typer.testing import CliRunner

from node.cli import app
from node.config import load_config
from node.net.scu import send_files
from node.retention import execute_purge, plan_purge
from node.store.audit import verify
from node.store.db import Database
from tests.conftest import ROOT, free_port, node_toml, wait_for

TOKEN = "test-token-0123456789abcdef"


@pytest.fixture
def served(tmp_path: Path, small_series: Path):  # type: ignore[no-untyped-def]
    """A real `preannot serve` process with the HTTP service on, fed one series."""
    port, web = free_port(), free_port()
    cfg = tmp_path / "node.toml"
    text = node_toml(tmp_path / "data", port).replace("[web]\nenabled = false", "")
    cfg.write_text(text + f'\n[web]\nenabled = true\nbind = "127.0.0.1"\nport = {web}\ntokens = {{ ops = "{TOKEN}" }}\n')
    log = (tmp_path / "node.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(cfg)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{web}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None  # stop waiting if it died
    wait_for(up, 60, what="the HTTP service")
    assert proc.poll() is None, (tmp_path / "node.log").read_text()
    outcomes = send_files([str(p) for p in sorted(small_series.glob("*.dcm"))], ae_title="PREANNOT",
                          host="127.0.0.1", port=port, calling_ae="TESTSCU")
    assert all(o.ok for o in outcomes)
    wait_for(lambda: any(j["state"] == "done" for j in httpx.get(f"{base}/api/jobs").json()), 120,
             what="the job to finish")
    yield base, cfg, tmp_path
    proc.terminate()
    proc.wait(30)
    log.close()


def test_api_metrics_actions(served) -> None:  # type: ignore[no-untyped-def]
    base, cfg, _ = served
    assert httpx.get(f"{base}/health").json()["status"] == "ok"
    r = httpx.get(f"{base}/ready")
    assert r.status_code == 200 and all(r.json()["checks"].values())
    metrics = httpx.get(f"{base}/metrics").text
    assert "preannot_instances_received_total 24.0" in metrics
    assert 'preannot_jobs{state="done"} 1.0' in metrics
    assert 'preannot_series_stable_total{outcome="routed"} 1.0' in metrics
    assert 'preannot_job_stage_seconds_count{model="lesion-ct-demo",stage="inference"} 1.0' in metrics
    assert "preannot_queue_depth 0.0" in metrics and "preannot_disk_free_bytes" in metrics
    jobs = httpx.get(f"{base}/api/jobs", params={"state": "done"}).json()
    assert len(jobs) == 1 and jobs[0]["model"] == "lesion-ct-demo"
    job_id = jobs[0]["id"]
    detail = httpx.get(f"{base}/api/jobs/{job_id}").json()
    assert {"inference", "rois", "sr"} <= set(detail["timings"])
    assert detail["inputs"]["instances"] == 24
    assert detail["model_identification"]["weights_sha256"]
    assert [e["kind"] for e in detail["events"]][:2] == ["job.queued", "job.started"]
    # the preview is drawn after the results are queued for delivery: it may lag the job by a moment
    png = wait_for(lambda: (r := httpx.get(f"{base}/api/jobs/{job_id}/preview.png")).status_code == 200 and r,
                   timeout=30, what="the job's preview")
    assert png.content[:4] == b"\x89PNG"
    assert httpx.get(f"{base}/api/series").json()[0]["instances"] == 24
    assert httpx.get(f"{base}/api/jobs", params={"state": "bogus"}).status_code == 422
    assert httpx.get(f"{base}/api/jobs/9999").status_code == 404
    for huge in ("99999999999999999999999", str(2**63), "-1"):  # beyond an SQLite integer: refused, never a 500
        assert httpx.get(f"{base}/api/jobs/{huge}").status_code == 422
    # actions need the token
    assert httpx.post(f"{base}/api/jobs/{job_id}/retry").status_code == 401
    bad = httpx.post(f"{base}/api/jobs/{job_id}/retry", headers={"Authorization": "Bearer wrong-token-xxxxxxxx"})
    assert bad.status_code == 403
    # a done job is not retried (it would put a second AI result beside the first): 409, by error type
    # bodies: refused before they are read (no token: 401; too large: 413), answered while the client is still
    # sending; a verdict's counts bounded
    host, port = base.removeprefix("http://").split(":")
    for auth, expected in (("", b" 401 "), (f"Authorization: Bearer {TOKEN}\r\n", b" 413 ")):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall((f"POST /api/jobs/{job_id}/verdict HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: "
                          f"application/json\r\nContent-Length: {300 << 20}\r\n\r\n").encode() + b"{" * 65536)
            t0 = time.monotonic()
            answer = sock.recv(4096)  # the 300 MB never come: the answer must not wait for them
            assert expected in answer.split(b"\r\n")[0], answer[:200]
            assert time.monotonic() - t0 < 3
    huge = httpx.post(f"{base}/api/jobs/{job_id}/verdict", json={"added": 10**12},
                      headers={"Authorization": f"Bearer {TOKEN}"})
    assert huge.status_code == 422
    done_retry = httpx.post(f"{base}/api/jobs/{job_id}/retry", headers={"Authorization": f"Bearer {TOKEN}"})
    assert done_retry.status_code == 409 and "reprocess" in done_retry.json()["detail"]
    conflict = httpx.post(f"{base}/api/jobs/{job_id}/cancel", headers={"Authorization": f"Bearer {TOKEN}"})
    assert conflict.status_code == 409
    series_uid = detail["series_uid"]
    assert httpx.post(f"{base}/api/series/1.2.3.4.404/reprocess",
                      headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404
    ok = httpx.post(f"{base}/api/series/{series_uid}/reprocess", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json()["version"] == 2
    wait_for(lambda: len(httpx.get(f"{base}/api/jobs", params={"state": "done"}).json()) == 2, 120,
             what="the reprocessed series' job")
    series = httpx.get(f"{base}/api/series").json()[0]
    assert series["state"] == "dispatched" and series["version"] == 2
    done = sorted(httpx.get(f"{base}/api/jobs", params={"state": "done"}).json(), key=lambda j: j["id"])
    assert done[0]["superseded_by"] == done[1]["id"] and done[1]["superseded_by"] is None
    # the same from the command line, on the running node's database
    from typer.testing import CliRunner

    from node.cli import app as cli_app

    r = CliRunner().invoke(cli_app, ["reprocess", "1.2.3.4.404", "--config", str(cfg)])
    assert r.exit_code == 1 and "1.2.3.4.404" in r.output, r.output
    r = CliRunner().invoke(cli_app, ["reprocess", series_uid, "--config", str(cfg)])
    assert r.exit_code == 0 and "version 3" in r.output, r.output
    wait_for(lambda: len(httpx.get(f"{base}/api/jobs", params={"state": "done"}).json()) == 3, 120,
             what="the job of the series reprocessed from the CLI")
    r = CliRunner().invoke(cli_app, ["jobs", "--config", str(cfg)])
    assert f"superseded by job {done[1]['id'] + 1}" in r.output, r.output
    docs = httpx.get(f"{base}/docs").text
    assert "swagger" in docs.lower() and "cdn.jsdelivr" not in docs
    assert httpx.get(f"{base}/openapi.json").json()["info"]["title"] == "preannot"
    # no secret or patient identifier in the log
    log = (cfg.parent / "node.log").read_text()
    assert TOKEN not in log and "TESTPATIENT" not in log and "PID-424242" not in log


def test_verdict_over_http_judge_page_exports_and_metrics(served) -> None:  # type: ignore[no-untyped-def]
    """A radiologist's verdict stated over HTTP (token, audited, idempotent), the judge page, the exports,
    the agreement and its metrics, and the CLI over the same store."""
    base, cfg, _ = served
    job_id = wait_for(lambda: httpx.get(f"{base}/api/jobs", params={"state": "done"}).json(), 120,
                      what="the job")[0]["id"]
    detail = httpx.get(f"{base}/api/jobs/{job_id}").json()
    n = detail["roi_count"]
    assert n >= 1
    page = httpx.get(f"{base}/judge/{job_id}").text
    assert f"verdict on job {job_id}" in page and page.count('data-finding="') == n
    assert "checked" not in page  # nothing pre-selected: an unjudged finding is never sent as accepted
    body = {"findings": [{"finding": 1, "outcome": "rejected", "note": "a vessel"}]
            + [{"finding": k, "outcome": "rejected"} for k in range(2, n + 1)], "added": 1}
    url = f"{base}/api/jobs/{job_id}/verdict"
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json={"findings": [{"finding": 99, "outcome": "accepted"}]},
                      headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 409
    assert httpx.post(url, json={"findings": [{"finding": 1, "outcome": "maybe"}]},
                      headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 422
    first = httpx.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}"}).json()
    again = httpx.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert first["new"] and not again["new"] and first["verdict"] == again["verdict"]
    rows = httpx.get(f"{base}/api/verdicts").json()
    assert len(rows) == 1 and rows[0]["source"] == "http" and rows[0]["study_verdict"] == "edited"
    assert [f["outcome"] for f in rows[0]["findings"]] == ["rejected"] * n + ["added"]
    named = dict(body, observer_role="Dr Jane Doe")  # a role from the list, never a name
    assert httpx.post(url, json=named, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 422
    assert rows[0]["findings"][0]["note"] == "a vessel"
    csv_text = httpx.get(f"{base}/api/verdicts", params={"format": "csv"}).text
    assert csv_text.splitlines()[0].startswith("id,job_id,source") and len(csv_text.splitlines()) == 2
    agree = httpx.get(f"{base}/api/agreement").json()
    assert agree[0]["model"] == "lesion-ct-demo" and agree[0]["acceptance"] == 0.0
    assert agree[0]["added_per_study"] == 1.0
    assert httpx.get(f"{base}/api/agreement/trend.png").content[:4] == b"\x89PNG"
    assert isinstance(httpx.get(f"{base}/api/alerts").json(), list)
    metrics = httpx.get(f"{base}/metrics").text
    assert 'preannot_verdict_acceptance{model="lesion-ct-demo",version="0.3.0"} 0.0' in metrics
    assert 'preannot_verdict_studies{model="lesion-ct-demo",verdict="edited",version="0.3.0"} 1.0' in metrics
    from typer.testing import CliRunner

    from node.cli import app as cli_app

    r = CliRunner().invoke(cli_app, ["verdicts", "list", "--config", str(cfg)])
    assert r.exit_code == 0 and f"job {job_id}" in r.output and f"rejected {n}" in r.output, r.output
    r = CliRunner().invoke(cli_app, ["verdicts", "agreement", "--config", str(cfg)])
    assert r.exit_code == 0 and "acceptance 0%" in r.output, r.output
    r = CliRunner().invoke(cli_app, ["verdicts", "export", "--format", "json", "--config", str(cfg)])
    assert r.exit_code == 0 and json.loads(r.output)[0]["job_id"] == job_id
    events = [e["kind"] for e in httpx.get(f"{base}/api/jobs/{job_id}").json()["events"]]
    assert events.count("verdict.recorded") == 1


def test_dashboard_in_headless_chromium(served) -> None:  # type: ignore[no-untyped-def]
    base, _, tmp = served
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian package chromium; `make test` installs it as root)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'chr'}"]
    shot = tmp / "dashboard.png"
    subprocess.run([chromium, *flags, "--window-size=1400,1300", f"--screenshot={shot}",
                    "--virtual-time-budget=5000", f"{base}/"], capture_output=True, timeout=120, check=False)
    assert shot.is_file() and shot.stat().st_size > 20_000
    dom = subprocess.run([chromium, *flags, "--virtual-time-budget=5000", "--dump-dom", f"{base}/"],
                         capture_output=True, text=True, timeout=120).stdout
    assert "Recent jobs" in dom and "lesion-ct-demo" in dom and "/preview.png" in dom
    out = ROOT / "docs" / "img"
    if os.environ.get("PREANNOT_SAVE_SCREENSHOTS"):
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / "dashboard.png")


def _db_with_events(tmp_path: Path) -> Database:
    from node.store.jobs import JobStore

    db = Database(tmp_path / "node.db")
    store = JobStore(db)
    for n in range(5):
        store.record("test.event", {"n": n}, actor="t")
    return db


def test_audit_chain_verifies_and_detects_tampering(tmp_path: Path) -> None:
    db = _db_with_events(tmp_path)
    assert verify(db).ok and verify(db).records == 5
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path}"\n')
    runner = CliRunner()
    assert "hash chain verified" in runner.invoke(app, ["audit", "verify", "--config", str(cfg)]).output
    exported = runner.invoke(app, ["audit", "export", "--config", str(cfg), "--since", "2000-01-01"]).output
    assert len(exported.strip().splitlines()) == 5
    db.close()
    con = sqlite3.connect(tmp_path / "node.db")
    con.execute("UPDATE events SET detail = '{\"n\": 99}' WHERE id = 3")
    con.commit()
    con.close()
    db = Database(tmp_path / "node.db")
    result = verify(db)
    assert not result.ok and result.first_bad_id == 3 and "modified" in result.reason
    r = runner.invoke(app, ["audit", "verify", "--config", str(cfg)])
    assert r.exit_code == 1 and "BROKEN at record 3" in r.output
    con = sqlite3.connect(tmp_path / "node.db")
    con.execute("DELETE FROM events WHERE id = 3")
    con.commit()
    con.close()
    assert "missing" in verify(Database(tmp_path / "node.db")).reason


def test_purge_removes_only_what_is_allowed(tmp_path: Path, small_series: Path) -> None:
    from node.ingest.spool import Spool
    from node.outputs.result import ResultObject, job_dir
    from node.store.jobs import JobStore
    from node.store.results import JobResult
    from node.store.series import SeriesStore

    cfg = load_config(None, env={}, overrides={"node": {"data_dir": str(tmp_path)},
                                               "retention": {"spool_days": 1, "outputs_days": 1}})
    db = Database(tmp_path / "node.db")
    store = JobStore(db)
    series = SeriesStore(db)
    spool = Spool(tmp_path / "spool", series)
    old = time.time() - 3 * 86400
    files = sorted(small_series.glob("*.dcm"))
    busy_uid = "1.2.3.999"
    for f in files[:3]:
        spool.store(f.read_bytes(), now=old)
    busy_ds = dcmread(files[3])  # a second series, whose job is still queued
    busy_ds.SeriesInstanceUID, busy_ds.SOPInstanceUID = busy_uid, busy_uid + ".1"
    buf = BytesIO()
    busy_ds.save_as(buf, enforce_file_format=True)
    spool.store(buf.getvalue(), now=old)
    series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    with db.tx() as c:  # the test plays the assembler: the series become stable and get their jobs
        for uid in (series_uid, busy_uid):
            info = series.claim_stable(c, uid, version=1, last_received=old)
            assert info is not None
            series.mark_dispatched(c, info, routes=["r"], jobs=[], now=old)
        done = store.create(c, series_uid=series_uid, series_version=1, model="m", route="r", send_to=["pacs"],
                            max_attempts=1, config_version="v", now=old)
        busy = store.create(c, series_uid=busy_uid, series_version=1, model="m", route="r", send_to=[],
                            max_attempts=1, config_version="v", now=old)
    assert done and busy
    store.lease(lease_seconds=60, now=old)  # the first job runs...
    out_dir = job_dir(tmp_path, done) / "attempt-1"
    out_dir.mkdir(parents=True)
    (out_dir / "sr.dcm").write_bytes(b"x" * 100)
    store.complete(done, result=JobResult(model={"name": "m"}, series_uid="1.2.3"), objects=[ResultObject(str(out_dir / "sr.dcm"), "1.2.3.4", "sr")],
                   destinations=["pacs"], now=old)
    # a result still waiting for delivery keeps the series and its outputs
    assert plan_purge(series, store, cfg).series == [] and plan_purge(series, store, cfg).job_dirs == {}
    item = store.due_deliveries()["pacs"][0]
    store.delivered(item, "0x0000")
    plan = plan_purge(series, store, cfg)
    assert plan.series == [series_uid] and len(plan.instance_files) == 3 and list(plan.job_dirs) == [done]
    r = CliRunner().invoke(app, ["purge", "--dry-run"], env={"PREANNOT_NODE__DATA_DIR": str(tmp_path),
                                                             "PREANNOT_RETENTION__SPOOL_DAYS": "1",
                                                             "PREANNOT_RETENTION__OUTPUTS_DAYS": "1"})
    assert "would remove 1 series (3 instance files), 1 job output folder(s)" in r.output
    assert all(p.exists() for p in plan.instance_files)  # dry run removed nothing
    execute_purge(series, store, cfg, actor="test")
    assert not any(p.exists() for p in plan.instance_files)
    assert not (tmp_path / "outputs" / f"job-{done:06d}").exists()
    assert series.get(series_uid).state == "purged"
    # the series whose job is queued is untouched; the audit trail is kept and intact
    assert series.get(busy_uid).state == "dispatched" and all(p.exists() for p in series.files(busy_uid))
    assert db.one("SELECT COUNT(*) AS n FROM events WHERE kind = 'purge.series'")["n"] == 1
    assert verify(db).ok
