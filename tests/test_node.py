"""The running node over real DICOM associations on loopback (pynetdicom and dcmtk as peers)."""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from node.devtools.sink import StoreSink
from node.net.scu import echo, send_files
from node.store.jobs import JobState
from tests.conftest import free_port, wait_for


def _send(node: Any, paths: list[Path], calling: str = "TESTSCU") -> list[Any]:
    return send_files([str(p) for p in paths], ae_title="PREANNOT", host="127.0.0.1", port=node.listener.port,
                      calling_ae=calling)


def _done_jobs(node: Any) -> list[Any]:
    return node.store.list_jobs(state=JobState.DONE)


def test_series_over_several_associations_is_one_job(make_node: Callable[..., Any], small_series: Path,
                                                     tmp_path: Path) -> None:
    sink = StoreSink(tmp_path / "pacs", ae_title="SINK")
    try:
        node = make_node(sink_port=sink.port, stable=5.0)  # gaps between associations stay well below it
        files = sorted(small_series.glob("*.dcm"))
        for chunk in (files[:8], files[8:16], files[16:]):  # three associations
            assert all(o.ok for o in _send(node, chunk))
        wait_for(lambda: _done_jobs(node), 120, what="the job to finish")
        job = node.store.list_jobs()[0]
        assert len(node.store.list_jobs()) == 1
        assert job.result and job.result.shape[0] == len(files)
        n_objects = len(job.result.files) - ("preview" in job.result.files)
        wait_for(lambda: len(sink.received) == n_objects, 60, what="the results at the destination")
        # the sink holds the objects before the node has recorded the C-STORE responses: wait for that too
        wait_for(lambda: node.store.outbox_counts()["sent"] == n_objects, 30, what="the deliveries recorded")
        assert set(sink.received.values()) == {1}
        kinds = sorted(str(dcmread(p).Modality) for p in sink.files())
        assert "SR" in kinds
        study = dcmread(files[0]).StudyInstanceUID
        assert all(dcmread(p).StudyInstanceUID == study for p in sink.files())
        events = [r["kind"] for r in node.store.db.query("SELECT kind FROM events ORDER BY id")]
        for kind in ("series.stable", "job.queued", "job.started", "job.done", "delivery.sent"):
            assert kind in events
    finally:
        sink.stop()


def test_unknown_calling_ae_is_refused(make_node: Callable[..., Any], small_series: Path) -> None:
    node = make_node()
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.listener.port, ae_title="PREANNOT")
    assert assoc.is_rejected
    # counted by the node's association thread once its A-ASSOCIATE-RJ is on the wire (pynetdicom's EVT_REJECTED
    # comes after the send): the peer can read the rejection first
    wait_for(lambda: node.listener.stats.associations_refused >= 1, 5, what="the refusal counted")
    assert node.listener.stats.associations_refused == 1
    assert node.store.db.one("SELECT COUNT(*) AS n FROM instances")["n"] == 0
    assert echo(ae_title="PREANNOT", host="127.0.0.1", port=node.listener.port, calling_ae="TESTSCU")


def test_route_miss_is_kept_not_processed(make_node: Callable[..., Any], small_series: Path, tmp_path: Path) -> None:
    node = make_node(stable=0.5)
    out = tmp_path / "mr"
    out.mkdir()
    series_uid = generate_uid()
    for p in sorted(small_series.glob("*.dcm"))[:3]:
        ds = dcmread(p)
        ds.Modality = "MR"
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(out / p.name)
    assert all(o.ok for o in _send(node, sorted(out.glob("*.dcm"))))
    wait_for(lambda: node.series.list_series()[0].state == "unmatched", 20, what="unmatched")
    assert node.store.list_jobs() == []


def test_bad_instance_gets_failure_status_and_node_stays_up(make_node: Callable[..., Any], small_series: Path) -> None:
    node = make_node()
    ds = dcmread(sorted(small_series.glob("*.dcm"))[0])
    del ds.StudyInstanceUID
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.listener.port, ae_title="PREANNOT")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xC000
    assert node.listener.stats.failures == {"cannot_understand": 1}
    assert all(o.ok for o in _send(node, sorted(small_series.glob("*.dcm"))[:2]))


def test_below_disk_reserve_answers_out_of_resources(make_node: Callable[..., Any], small_series: Path) -> None:
    node = make_node(extra="")
    node.spool.reserve_bytes = 1 << 62  # as if the disk were almost full
    outcomes = _send(node, sorted(small_series.glob("*.dcm"))[:2])
    assert [o.status for o in outcomes] == ["0xA700", "0xA700"]
    node.spool.reserve_bytes = 0  # space comes back: accepted again
    assert all(o.ok for o in _send(node, sorted(small_series.glob("*.dcm"))[:2]))


def test_disk_full_logs_one_line_per_association_and_no_traceback(make_node: Callable[..., Any], small_series: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A full disk refuses a whole series: the log names the reason once and sums it up when the association
    ends, with no traceback; the database itself full (SQLite "disk is full") is refused the same way and leaves
    no unindexed file behind."""
    import logging
    import sqlite3

    node = make_node(extra="")
    files = sorted(small_series.glob("*.dcm"))
    node.spool.reserve_bytes = 1 << 62
    with caplog.at_level(logging.INFO, logger="node"):
        assert {o.status for o in _send(node, files)} == {"0xA700"}
        wait_for(lambda: any("24 instance(s) refused" in r.getMessage() for r in caplog.records), 10,
                 what="the association's summary line")
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING and "refused" in r.getMessage()]
    assert len(loud) == 2, [r.getMessage() for r in loud]  # the first refusal, then the summary
    assert "24 x out_of_resources" in loud[1].getMessage() and "MiB free" in loud[1].getMessage()
    assert not any(r.exc_info for r in caplog.records)

    node.spool.reserve_bytes = 0
    caplog.clear()

    def full(*args: Any, **kwargs: Any) -> Any:
        raise sqlite3.OperationalError("database or disk is full")

    real = node.series.index_instance
    node.series.index_instance = full
    try:
        with caplog.at_level(logging.INFO, logger="node"):
            assert {o.status for o in _send(node, files[:3])} == {"0xA700"}
    finally:
        node.series.index_instance = real
    assert not any(r.exc_info for r in caplog.records)
    assert any("database full" in r.getMessage() for r in caplog.records)
    assert not list((node.config.data_dir / "spool").rglob("*.dcm"))  # nothing half-stored
    assert all(o.ok for o in _send(node, files[:3]))  # and the node goes on


def test_destination_down_then_up(make_node: Callable[..., Any], small_series: Path, tmp_path: Path) -> None:
    port = free_port()
    node = make_node(sink_port=port, stable=0.5)
    assert all(o.ok for o in _send(node, sorted(small_series.glob("*.dcm"))))
    wait_for(lambda: _done_jobs(node), 120, what="the job")
    wait_for(lambda: any(i.error for i in node.store.outbox()), 30, what="a failed delivery attempt")
    assert node.store.outbox_counts()["sent"] == 0
    assert "destination down or unreachable" in (node.store.outbox()[0].error or "")
    sink = StoreSink(tmp_path / "pacs", ae_title="SINK", port=port)
    try:
        n = len(node.store.outbox())
        wait_for(lambda: node.store.outbox_counts()["sent"] == n, 60, what="delivery after recovery")
        assert len(sink.received) == n and set(sink.received.values()) == {1}
    finally:
        sink.stop()


@pytest.mark.integration
def test_dcmtk_storescu_and_storescp_as_outside_peers(make_node: Callable[..., Any], small_series: Path,
                                                     tmp_path: Path) -> None:
    if not (shutil.which("storescu") and shutil.which("storescp")):
        pytest.skip("dcmtk is not installed; `make test` installs it as root")
    port = free_port()
    received = tmp_path / "storescp"
    received.mkdir()
    scp = subprocess.Popen(["storescp", "-aet", "SINK", "-od", str(received), "-uf", "--fork", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        node = make_node(sink_port=port, stable=1.0)
        files = [str(p) for p in sorted(small_series.glob("*.dcm"))]
        proc = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "PREANNOT", "127.0.0.1",
                               str(node.listener.port), *files], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert node.store.db.one("SELECT COUNT(*) AS n FROM instances")["n"] == len(files)
        wait_for(lambda: _done_jobs(node), 120, what="the job")
        job = _done_jobs(node)[0]
        n = len([k for k in job.result.files if k != "preview"])
        wait_for(lambda: node.store.outbox_counts()["sent"] == n, 60, what="delivery to storescp")
        got = wait_for(lambda: len(list(received.glob("*"))) == n and list(received.glob("*")), 20,
                       what="files written by storescp")
        assert {dcmread(p).Modality for p in got} <= {"SEG", "SR"}
    finally:
        scp.terminate()
        scp.wait(10)


def test_instances_are_stored_as_received(make_node: Callable[..., Any], small_series: Path) -> None:
    node = make_node()
    f = sorted(small_series.glob("*.dcm"))[0]
    assert _send(node, [f])[0].ok
    row = node.store.db.one("SELECT path FROM instances")
    stored = dcmread(io.BytesIO(Path(row["path"]).read_bytes()))
    original = dcmread(f)
    assert stored.PixelData == original.PixelData
    assert stored.SOPInstanceUID == original.SOPInstanceUID


def test_routes_select_on_the_called_ae_title(make_node: Callable[..., Any], small_series: Path) -> None:
    """The AE title the sender called is recorded and routes select on it (pynetdicom's acceptor title is
    always the node's own; the requested one is in the A-ASSOCIATE-RQ)."""
    node = make_node(route_extra='called_ae = ["PREANNOT_CT"]')
    files = sorted(small_series.glob("*.dcm"))
    out = send_files([str(p) for p in files], ae_title="PREANNOT_CT", host="127.0.0.1", port=node.listener.port,
                     calling_ae="TESTSCU")
    assert all(o.ok for o in out)
    wait_for(lambda: node.store.list_jobs(), 60, what="the job of the series sent to PREANNOT_CT")
    rows = node.store.db.query("SELECT DISTINCT called_ae FROM instances")
    assert [r[0] for r in rows] == ["PREANNOT_CT"]


def test_woken_reactors_store_release_abort_and_close_their_pipes(make_node: Callable[..., Any],
                                                                   small_series: Path) -> None:
    """With pynetdicom's reactors woken by their socket and queues (node.ingest.wakeups): instances stored over
    many associations, released and aborted ones, an echo; every association's wake-up pipe closed once it has
    ended (no descriptor left behind), and the node still answers."""
    import os

    from node.ingest import wakeups

    node = make_node()
    assert wakeups.installed()
    files = sorted(small_series.glob("*.dcm"))
    before = len(os.listdir("/proc/self/fd"))
    for n in range(20):  # released associations
        assert all(o.ok for o in _send(node, files[n % len(files):][:1]))
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    for _ in range(5):  # aborted ones, one of them mid-series
        assoc = ae.associate("127.0.0.1", node.listener.port, ae_title="PREANNOT")
        assert assoc.is_established
        status = assoc.send_c_store(dcmread(files[0]))
        assert status.Status == 0x0000
        assoc.abort()
    assert echo(ae_title="PREANNOT", host="127.0.0.1", port=node.listener.port, calling_ae="TESTSCU")
    wait_for(lambda: len(os.listdir("/proc/self/fd")) <= before + 2, 20, what="the associations' pipes closed")
    stored = node.store.db.query("SELECT COUNT(*) AS n FROM instances")[0]["n"]
    assert stored == min(20, len(files))
