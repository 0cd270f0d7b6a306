"""kill -9 of a running node (a real `preannot serve` process): nothing acknowledged is lost, jobs
resume after restart, and the destination receives each result object once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from node.devtools.sink import StoreSink
from node.net.scu import echo, send_files
from tests.conftest import ROOT, free_port, node_toml, query_db, wait_for


def _serve(cfg: Path, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(cfg)], cwd=ROOT,
                            stdout=log.open("a"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc


_q = query_db


def test_kill9_during_inference_and_while_delivering(tmp_path: Path) -> None:
    port, sink_port = free_port(), free_port()
    data = tmp_path / "data"
    cfg = tmp_path / "node.toml"
    cfg.write_text(node_toml(data, port, sink_port=sink_port, stable=2.0, delivery_backoff=0.3))
    log = tmp_path / "node.log"
    db = data / "node.db"
    files = [str(p) for p in sorted((ROOT / "sample_dicom").glob("*.dcm"))]

    proc = _serve(cfg, log)
    try:
        wait_for(lambda: echo(ae_title="PREANNOT", host="127.0.0.1", port=port, calling_ae="TESTSCU", timeout=2),
                 60, what="the node to listen")
        outcomes = send_files(files, ae_title="PREANNOT", host="127.0.0.1", port=port, calling_ae="TESTSCU")
        assert all(o.ok for o in outcomes)
        wait_for(lambda: _q(db, "SELECT 1 FROM jobs WHERE state = 'running'"), 60, interval=0.05,
                 what="the job to run")
        proc.send_signal(signal.SIGKILL)  # during the job (loading or inference)
        proc.wait(10)
        # every acknowledged instance is on disk and indexed
        rows = _q(db, "SELECT path FROM instances")
        assert len(rows) == len(files)
        assert all(Path(r[0]).is_file() for r in rows)
        assert list((data / "spool" / ".tmp").iterdir()) == []
        assert _q(db, "SELECT state FROM jobs") == [("running",)]

        proc = _serve(cfg, log)  # restart; the destination is still down
        wait_for(lambda: _q(db, "SELECT 1 FROM jobs WHERE state = 'done'"), 180, what="the resumed job")
        wait_for(lambda: _q(db, "SELECT 1 FROM outbox WHERE error IS NOT NULL"), 30, what="a failed delivery")
        proc.send_signal(signal.SIGKILL)  # while results wait for the destination
        proc.wait(10)
        objects = _q(db, "SELECT sop_uid FROM outbox")
        assert objects and _q(db, "SELECT COUNT(*) FROM outbox WHERE state = 'sent'") == [(0,)]

        sink = StoreSink(tmp_path / "pacs", ae_title="SINK", port=sink_port)
        try:
            proc = _serve(cfg, log)
            wait_for(lambda: _q(db, "SELECT COUNT(*) FROM outbox WHERE state = 'sent'") == [(len(objects),)], 60,
                     what="delivery after restart")
            assert sorted(sink.received) == sorted(o[0] for o in objects)
            assert set(sink.received.values()) == {1}
            assert _q(db, "SELECT COUNT(*) FROM jobs") == [(1,)]
            assert _q(db, "SELECT COUNT(*) FROM events WHERE kind = 'node.recovered'")[0][0] >= 1
        finally:
            sink.stop()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
    text = log.read_text()
    assert "SYNTHETIC^DEMO" not in text and "PREANNOT-DEMO" not in text  # no patient name/ID in the logs


def test_sigterm_mid_job_exits_cleanly_and_the_job_runs_once(tmp_path: Path) -> None:
    port, sink_port = free_port(), free_port()
    data = tmp_path / "data"
    cfg = tmp_path / "node.toml"
    cfg.write_text(node_toml(data, port, sink_port=sink_port, stable=2.0, delivery_backoff=0.3)
                   .replace("stop_timeout_seconds = 10", "stop_timeout_seconds = 0"))  # requeue at once
    log = tmp_path / "node.log"
    db = data / "node.db"
    files = [str(p) for p in sorted((ROOT / "sample_dicom").glob("*.dcm"))]
    sink = StoreSink(tmp_path / "pacs", ae_title="SINK", port=sink_port)
    proc = _serve(cfg, log)
    try:
        wait_for(lambda: echo(ae_title="PREANNOT", host="127.0.0.1", port=port, calling_ae="TESTSCU", timeout=2),
                 60, what="the node to listen")
        assert all(o.ok for o in send_files(files, ae_title="PREANNOT", host="127.0.0.1", port=port,
                                            calling_ae="TESTSCU"))
        wait_for(lambda: _q(db, "SELECT 1 FROM jobs WHERE state = 'running'"), 60, interval=0.05,
                 what="the job to run")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        text = log.read_text()
        assert "terminate called" not in text and "Traceback" not in text
        state = _q(db, "SELECT state, attempts FROM jobs")
        # stopped mid-job: requeued without counting the attempt (or, if it just finished, done)
        assert state in ([("queued", 0)], [("done", 1)]), state
        if state == [("queued", 0)]:
            assert "requeued, it runs again at the next start" in text
        proc = _serve(cfg, log)
        wait_for(lambda: len(sink.received) == 2, 180, what="one SEG and one SR at the PACS")
        wait_for(lambda: _q(db, "SELECT COUNT(*) FROM outbox WHERE state = 'sent'") == [(2,)], 30,
                 what="both recorded as sent")
        assert set(sink.received.values()) == {1} and _q(db, "SELECT COUNT(*) FROM jobs") == [(1,)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        sink.stop()
