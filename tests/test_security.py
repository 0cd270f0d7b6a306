"""Security: DICOM TLS (server and mutual), AE/host binding, per-caller limits, file permissions and
no patient identifiers in the logs of a full run."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.net.scu import send_files
from node.net.tls import client_context
from node.store.jobs import JobState
from tests.conftest import wait_for
from tests.test_faults import report


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Test CA",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    for name, cn, ext in (("server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
                          ("client", "TESTSCU", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", str(d / f"{name}.key"),
                 "-out", str(d / f"{name}.csr"))
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
                 "-CAcreateserial", "-days", "2", "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.pem"))
    return d


def _send(node: Any, files: list[Path], ctx: Any = None) -> list[Any]:
    return send_files([str(p) for p in files], ae_title="PREANNOT", host="127.0.0.1", port=node.listener.port,
                      calling_ae="TESTSCU", ssl_context=ctx, server_hostname="localhost")


def _tls_node(make_node: Callable[..., Any], pki: Path, *, mutual: bool) -> Any:
    node = make_node(extra="")
    node.stop()
    from node.config import load_config
    from node.service import Node

    cfg = node.config.model_dump(mode="json")
    cfg["node"].update({"tls_cert": str(pki / "server.pem"), "tls_key": str(pki / "server.key"),
                        "tls_ca": str(pki / "ca.pem") if mutual else None, "tls_require_client_cert": mutual})
    cfg.pop("source", None)
    tls_node = Node(load_config(None, env={}, overrides=cfg))
    tls_node.start()
    return tls_node


def test_dicom_tls_server(make_node: Callable[..., Any], pki: Path, small_series: Path) -> None:
    node = _tls_node(make_node, pki, mutual=False)
    try:
        files = sorted(small_series.glob("*.dcm"))[:2]
        assert all(o.ok for o in _send(node, files, client_context(ca=pki / "ca.pem")))
        assert not any(o.ok for o in _send(node, files))  # plain TCP to a TLS port: refused
        wrong_ca = client_context(ca=pki / "client.pem")  # does not sign the server: handshake fails
        assert not any(o.ok for o in _send(node, files, wrong_ca))
    finally:
        node.stop()


def test_mutual_tls(make_node: Callable[..., Any], pki: Path, small_series: Path) -> None:
    node = _tls_node(make_node, pki, mutual=True)
    try:
        files = sorted(small_series.glob("*.dcm"))[:1]
        assert not any(o.ok for o in _send(node, files, client_context(ca=pki / "ca.pem")))  # no client cert
        ctx = client_context(ca=pki / "ca.pem", cert=pki / "client.pem", key=pki / "client.key")
        assert all(o.ok for o in _send(node, files, ctx))
    finally:
        node.stop()


@pytest.mark.slow  # minutes of CPU: `make test-slow` (CI runs it too)
def test_calling_ae_bound_to_hosts(make_node: Callable[..., Any], small_series: Path) -> None:
    node = make_node(extra="")
    node.listener.caller_hosts = {"TESTSCU": [ipaddress.ip_network("10.1.2.0/24")],
                                  "STORESCU": [ipaddress.ip_network("127.0.0.0/8")]}
    outcomes = _send(node, sorted(small_series.glob("*.dcm"))[:2])
    assert not any(o.ok for o in outcomes)
    assert node.store.db.one("SELECT COUNT(*) AS n FROM instances")["n"] == 0
    wait_for(lambda: node.listener.stats.associations_refused >= 1, 5, what="the refusal counted")  # after the send
    assert node.listener.stats.associations_refused == 1
    ok = send_files([str(p) for p in sorted(small_series.glob("*.dcm"))[:2]], ae_title="PREANNOT",
                    host="127.0.0.1", port=node.listener.port, calling_ae="STORESCU")
    assert all(o.ok for o in ok)


def test_associations_per_caller_are_limited(make_node: Callable[..., Any]) -> None:
    node = make_node(extra="")
    node.listener.max_per_caller = 1
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    first = ae.associate("127.0.0.1", node.listener.port, ae_title="PREANNOT")
    assert first.is_established
    refused = node.listener.stats.associations_refused
    second = ae.associate("127.0.0.1", node.listener.port, ae_title="PREANNOT")
    # accepted at the protocol level, then aborted by the policy before it can be used
    wait_for(lambda: not second.is_established, 5, what="the abort")
    assert second.is_aborted
    assert node.listener.stats.associations_refused == refused + 1
    assert node.listener.stats.associations == 1  # only the first counts as served
    first.release()
    wait_for(lambda: node.listener.active_associations("TESTSCU") == 0, 5, what="the release")
    third = ae.associate("127.0.0.1", node.listener.port, ae_title="PREANNOT")
    assert third.is_established and third.send_c_echo().Status == 0
    third.release()


def test_permissions_and_no_identifiers_in_logs(make_node: Callable[..., Any], small_series: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    previous = os.umask(0o022)  # a permissive umask, as a shell or a service manager may give
    try:
        node = make_node(stable=0.5)
        files = sorted(small_series.glob("*.dcm"))
        assert all(o.ok for o in _send(node, files))
        wait_for(lambda: node.store.list_jobs(state=JobState.DONE), 120, what="the job")
        data = node.config.data_dir
        preview = Path(node.store.list_jobs()[0].result.files["preview"])
        wait_for(preview.exists, 30, what="the preview")
    finally:
        os.umask(previous)
    everything = [data, *data.rglob("*")]
    assert any(p.name == "node.db-wal" for p in everything) and preview in everything
    wrong = {str(p.relative_to(data)): oct(p.stat().st_mode & 0o777) for p in everything
             if (p.stat().st_mode & 0o777) != (0o700 if p.is_dir() else 0o600)}
    assert wrong == {}
    wait_for(lambda: "job 1 done" in caplog.text, 30, what="the job's log line")  # the run was logged...
    text = caplog.text
    for identifier in ("TESTPATIENT", "ALICE", "PID-424242", "19600101"):  # ...without identifiers
        assert identifier not in text


def _half_open(port: int, source: str) -> socket.socket | None:
    """A connection that sends the first 8 bytes of an A-ASSOCIATE-RQ and then nothing."""
    s = socket.socket()
    s.settimeout(3)
    try:
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(bytes([0x01, 0x00, 0x00, 0x00, 0x00, 0x44, 0x00, 0x01]))
    except OSError:
        s.close()
        return None
    return s


def test_half_open_connections_cannot_lock_out_the_pacs(make_node: Callable[..., Any], small_series: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREANNOT_NODE__ASSOCIATION_REQUEST_TIMEOUT", "3")
    node = make_node(stable=60)  # nothing is processed during the test: only the intake is measured
    port = node.listener.port
    sources = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]  # an attacker with three addresses on the network
    held = [s for n in range(20) if (s := _half_open(port, sources[n % 3])) is not None]
    try:
        wait_for(lambda: node.listener.guard.pending() + node.listener.guard.refused_total >= 20, 5,
                 what="the 20 connections seen")
        # at most max_pending_per_host (4) from each address wait; the others were closed at once
        assert node.listener.guard.pending() <= 12 and node.listener.guard.refused_total >= 8
        t0 = time.monotonic()
        files = sorted(small_series.glob("*.dcm"))
        outcomes = _send(node, files)  # the PACS, from 127.0.0.1, while the half-open connections are held
        elapsed = time.monotonic() - t0
        assert all(o.ok for o in outcomes) and elapsed < 2.0, elapsed
        # the pending ones are closed once their association request is overdue; nothing was stored by them
        wait_for(lambda: node.listener.guard.pending() == 0, 10, what="the half-open connections closed")
        assert node.listener.guard.timed_out_total >= 1
        assert node.series.instance_count(str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)) == 24
        assert node.listener.stats.associations == 1
    finally:
        for s in held:
            s.close()


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.parametrize("pdu_type", [0x01, 0x04])
def test_a_huge_announced_pdu_is_never_buffered(make_node: Callable[..., Any], small_series: Path,
                                                pdu_type: int) -> None:
    """An unknown host announces a 4 GiB A-ASSOCIATE-RQ (or P-DATA-TF) and streams zeros: the node closes the
    connection after the 6-byte header, its memory does not grow, and the PACS is served right after."""
    import struct

    node = make_node()
    before = _rss_mb()
    s = socket.create_connection(("127.0.0.1", node.listener.port), timeout=5)
    s.sendall(struct.pack(">BBL", pdu_type, 0, 0xFFFFFFF0))
    sent, t0, closed = 0, time.monotonic(), False
    block = b"\0" * (1 << 20)
    while time.monotonic() - t0 < 4:
        try:
            s.sendall(block)
            sent += len(block)
        except OSError:
            closed = True
            break
    s.close()
    grown = _rss_mb() - before
    assert closed, f"the node kept reading: {sent >> 20} MiB sent"
    assert grown < 200, f"the node grew by {grown:.0f} MB"
    t1 = time.monotonic()
    assert all(o.ok for o in _send(node, sorted(small_series.glob("*.dcm"))[:2]))
    served = time.monotonic() - t1
    assert served < 5
    report("huge_announced_pdu", pdu_type=f"0x{pdu_type:02X}", announced_bytes=0xFFFFFFF0, sent_mib=sent >> 20,
           closed=closed, rss_growth_mb=round(grown, 1), pacs_served_s=round(served, 2))


def test_broken_dimse_from_a_known_caller_never_locks_it_out(make_node: Callable[..., Any],
                                                            small_series: Path) -> None:
    """A known caller opens 20 associations, each sending one P-DATA whose command set is 16 zero bytes (which ends
    pynetdicom's handling of it without a release or an abort event), and leaves them open: the per-caller limit
    (4) is not used up by them, and the same caller is served within a second after."""
    from tests.pdufuzz import (
        CT_STORAGE,
        EXPLICIT_LE,
        IMPLICIT_LE,
        VERIFICATION,
        _read_pdu,
        assoc_rq,
        pdu,
        pdv,
        presentation_context,
    )

    node = make_node()
    held = []
    try:
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", node.listener.port), timeout=5)
            held.append(s)
            ctxs = [presentation_context(1, VERIFICATION, [IMPLICIT_LE]),
                    presentation_context(3, CT_STORAGE, [EXPLICIT_LE, IMPLICIT_LE])]
            s.sendall(assoc_rq(called=b"PREANNOT", calling=b"TESTSCU", contexts=ctxs))
            reply = _read_pdu(s)
            if reply is not None and reply[0] == 0x02:
                s.sendall(pdu(0x04, pdv(1, 0x03, bytes(16))))
            time.sleep(0.05)
        time.sleep(1.0)
        t0 = time.monotonic()
        outcomes = _send(node, sorted(small_series.glob("*.dcm"))[:2])
        assert all(o.ok for o in outcomes), [o.status for o in outcomes]
        served = time.monotonic() - t0
        assert served < 5
        assert node.listener.active_associations("TESTSCU") == 0
        report("broken_dimse_associations", associations=20, lockouts=0, caller_slots_left_open=0,
               pacs_served_s=round(served, 2))
    finally:
        for s in held:
            s.close()
