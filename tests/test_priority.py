"""Priorities: STAT before routine without starving routine work, time-to-result targets, and the
notification of a STAT result (FHIR and HL7 v2 receivers run by the test)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from node.store.db import Database
from node.store.jobs import JobStore
from tests.conftest import wait_for


def _jobs(tmp_path: Path) -> JobStore:
    return JobStore(Database(tmp_path / "node.db"))


def _create(store: JobStore, n: int, priority: str, now: float) -> int:
    with store.db.tx() as c:
        jid = store.create(c, series_uid=f"1.2.{n}", series_version=1, model="m", route="r", send_to=[],
                           max_attempts=3, config_version="x", now=now, priority=priority)
    assert jid is not None
    return jid


def test_a_stat_job_queued_after_five_routine_jobs_starts_next(tmp_path: Path) -> None:
    store = _jobs(tmp_path)
    now = 1_000_000.0
    routine = [_create(store, n, "routine", now + n) for n in range(5)]
    urgent = _create(store, 10, "urgent", now + 10)
    stat = _create(store, 11, "stat", now + 11)
    order = []
    while (job := store.lease(lease_seconds=60, now=now + 20, aging_seconds=1800)) is not None:
        order.append(job.id)
    assert order == [stat, urgent, *routine]  # fair (oldest first) within a priority
    assert store.get(stat).priority == "stat"


def test_routine_work_ages_and_is_not_starved(tmp_path: Path) -> None:
    store = _jobs(tmp_path)
    now = 1_000_000.0
    old = _create(store, 1, "routine", now)  # waiting for two aging periods: it competes as stat
    stat = _create(store, 2, "stat", now + 3599)
    first = store.lease(lease_seconds=60, now=now + 3600, aging_seconds=1800)
    assert first is not None and first.id == old
    second = store.lease(lease_seconds=60, now=now + 3600, aging_seconds=1800)
    assert second is not None and second.id == stat


class _Fhir(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Fhir.received.append({"path": self.path, "auth": self.headers.get("Authorization"),
                               "body": json.loads(body)})
        self.send_response(201)
        self.send_header("Content-Type", "application/fhir+json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        return


@pytest.fixture
def receivers() -> Iterator[tuple[str, int, list[dict[str, Any]], list[bytes]]]:
    _Fhir.received = []
    http = ThreadingHTTPServer(("127.0.0.1", 0), _Fhir)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    messages: list[bytes] = []
    mllp = socket.socket()
    mllp.bind(("127.0.0.1", 0))
    mllp.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = mllp.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\x1c" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                msg = data.strip(b"\x0b\x1c\r")
                messages.append(msg)
                control = msg.split(b"\r")[0].split(b"|")[9]
                conn.sendall(b"\x0bMSH|^~\\&|RIS||PREANNOT||20261126||ACK|1|P|2.5.1\rMSA|AA|" + control + b"\r\x1c\r")

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{http.server_address[1]}/fhir", mllp.getsockname()[1], _Fhir.received, messages
    http.shutdown()
    mllp.close()


def test_stat_result_is_notified_by_fhir_and_hl7_with_its_time_to_result(
        make_node: Callable[..., Any], small_series: Path, receivers: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from node.net.scu import send_files

    fhir_url, hl7_port, posts, messages = receivers
    monkeypatch.setenv("TEST_FHIR_TOKEN", "fhir-secret-token")
    extra = (f'[notify]\nfhir_url = "{fhir_url}"\nfhir_token_env = "TEST_FHIR_TOKEN"\nhl7_host = "127.0.0.1"\n'
             f'hl7_port = {hl7_port}\n')
    node = make_node(extra=extra, route_extra='priority = "stat"')
    assert all(o.ok for o in send_files([str(p) for p in sorted(small_series.glob("*.dcm"))], ae_title="PREANNOT",
                                        host="127.0.0.1", port=node.listener.port, calling_ae="TESTSCU"))
    job = wait_for(lambda: node.store.list_jobs(state="done"), 120, what="the job")[0]
    assert job.priority == "stat" and job.result is not None
    assert 0 < job.result.time_to_result_s < 300 and job.result.target_breached is False
    wait_for(lambda: posts and messages, 30, what="both notifications")
    report = posts[0]
    assert report["path"] == "/fhir/DiagnosticReport" and report["auth"] == "Bearer fhir-secret-token"
    body = report["body"]
    assert body["resourceType"] == "DiagnosticReport" and body["status"] == "preliminary"
    assert "NOT VERIFIED" in body["conclusion"] and "lesion-ct-demo" in body["conclusion"]
    oru = messages[0].decode()
    segs = {s.split("|")[0]: s for s in oru.split("\r") if s}
    assert "ORU^R01" in segs["MSH"] and segs["OBX"].split("|")[11] == "P"
    assert segs["OBR"].endswith("|P")
    # delivered through the outbox, audited as deliveries to the notification channels
    sent = [json.loads(r["detail"])["destination"] for r in
            node.store.db.query("SELECT detail FROM events WHERE kind = 'delivery.sent'")]
    assert sorted(d for d in sent if d.startswith("notify:")) == ["notify:fhir", "notify:hl7"]
    metrics = node.metrics.render().decode()
    assert 'preannot_time_to_result_seconds_count{priority="stat"} 1.0' in metrics
    assert "fhir-secret-token" not in json.dumps([r["detail"] for r in node.store.db.query("SELECT detail FROM events")])
