"""Spool (durable ingest + index), assembler and the durable job store."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from node.config import load_config
from node.errors import InvalidInstanceError, JobError, OutOfSpaceError
from node.ingest.spool import Spool, safe_uid
from node.outputs.result import ResultObject
from node.schedule.assembler import Assembler
from node.store.db import Database
from node.store.jobs import JobState, JobStore, OutboxState
from node.store.results import JobResult
from node.store.series import SeriesState, SeriesStore


def _raw(path: Path, **changes: str) -> bytes:
    ds = dcmread(path)
    for k, v in changes.items():
        setattr(ds, k, v)
    if "SOPInstanceUID" in changes:
        ds.file_meta.MediaStorageSOPInstanceUID = changes["SOPInstanceUID"]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture
def db(tmp_path: Path) -> Database:
    return Database(tmp_path / "node.db")


def test_safe_uid() -> None:
    assert safe_uid("1.2.840.10008.1") == "1.2.840.10008.1"
    for bad in ("../../etc/passwd", "1.2/3", "..", "1.2.3 ", "a" * 70, "1.2\\3", "1." + "9" * 70):
        s = safe_uid(bad)
        assert "/" not in s and "\\" not in s and s not in (".", "..") and len(s) <= 64
    assert safe_uid("../x") != safe_uid("../y")


def test_store_index_and_duplicate(tmp_path: Path, db: Database, small_series: Path) -> None:
    spool = Spool(tmp_path / "spool", SeriesStore(db))
    f = sorted(small_series.glob("*.dcm"))[0]
    raw = f.read_bytes()
    r = spool.store(raw, calling_ae="TESTSCU", called_ae="PREANNOT")
    assert r.path.read_bytes() == raw  # stored exactly as received
    assert not r.duplicate
    assert oct(r.path.stat().st_mode & 0o777) == oct(0o600)
    row = db.one("SELECT * FROM instances WHERE sop_uid = ?", (r.sop_uid,))
    assert row is not None and row["calling_ae"] == "TESTSCU"
    again = spool.store(raw)
    assert again.duplicate and again.path == r.path
    (info,) = SeriesStore(db).list_series()
    assert info.instances == 1
    attrs = info.attrs
    assert attrs["Modality"] == "CT"
    assert "PatientName" not in attrs and "PatientID" not in attrs


def test_invalid_instances_leave_nothing(tmp_path: Path, db: Database, small_series: Path) -> None:
    spool = Spool(tmp_path / "spool", SeriesStore(db))
    f = sorted(small_series.glob("*.dcm"))[0]
    with pytest.raises(InvalidInstanceError):
        spool.store(b"not a dicom file at all" * 10)
    with pytest.raises(InvalidInstanceError, match="SOP Instance UID"):
        spool.store(f.read_bytes(), expected_sop_uid="1.2.3.4")
    ds = dcmread(f)
    del ds.SeriesInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(InvalidInstanceError, match="SeriesInstanceUID"):
        spool.store(buf.getvalue())
    assert db.one("SELECT COUNT(*) AS n FROM instances")["n"] == 0
    assert [p for p in (tmp_path / "spool").rglob("*") if p.is_file()] == []


def test_reserve_refuses_with_out_of_space(tmp_path: Path, db: Database, small_series: Path) -> None:
    spool = Spool(tmp_path / "spool", SeriesStore(db), reserve_bytes=1 << 62)
    with pytest.raises(OutOfSpaceError, match="reserve"):
        spool.store(sorted(small_series.glob("*.dcm"))[0].read_bytes())
    assert [p for p in (tmp_path / "spool").rglob("*.dcm")] == []


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize(("attr", "value", "why"), [
    ("SOPInstanceUID", "../../../escape", "not a UID"),
    ("SeriesInstanceUID", "../series", "not a UID"),
    ("StudyInstanceUID", "/abs", "not a UID"),
    ("SeriesInstanceUID", "1.2." + "3" * 2000, "2004 characters"),
    ("SOPInstanceUID", "1.02.3", "not a UID"),
    ("FrameOfReferenceUID", "1.2..3", "not a UID"),
])
def test_invalid_uids_are_refused_on_receipt(tmp_path: Path, db: Database, small_series: Path, attr: str,
                                             value: str, why: str) -> None:
    spool = Spool(tmp_path / "spool", SeriesStore(db))
    raw = _raw(sorted(small_series.glob("*.dcm"))[0], **{attr: value})
    with pytest.raises(InvalidInstanceError, match=f"{attr} .*{why}"):
        spool.store(raw)
    # nothing written, nothing indexed: an invalid UID can never reach a path or an output
    assert [p for p in (tmp_path / "spool").rglob("*") if p.is_file()] == []
    assert SeriesStore(db).list_series() == []


def test_sweep_removes_partial_files(tmp_path: Path, db: Database) -> None:
    (tmp_path / "spool" / ".tmp").mkdir(parents=True)
    (tmp_path / "spool" / ".tmp" / "half.part").write_bytes(b"partial")
    Spool(tmp_path / "spool", SeriesStore(db))
    assert list((tmp_path / "spool" / ".tmp").iterdir()) == []


def _config(tmp_path: Path, **node: object) -> object:
    return load_config(None, env={}, overrides={
        "node": {"data_dir": str(tmp_path), "stable_seconds": 5, **node},
        "routes": [{"name": "chest", "match": {"Modality": "CT"}, "models": ["m1", "m2"], "send_to": []},
                   {"name": "mr", "match": {"Modality": "MR"}, "models": ["m3"]}]})


def test_assembler_waits_for_stability_then_queues_one_job_per_model(tmp_path: Path, db: Database,
                                                                      small_series: Path) -> None:
    cfg = _config(tmp_path)
    store = JobStore(db)
    spool = Spool(tmp_path / "spool", SeriesStore(db))
    asm = Assembler(cfg, SeriesStore(db), store)
    files = sorted(small_series.glob("*.dcm"))
    for n, f in enumerate(files):
        spool.store(f.read_bytes(), now=1000.0 + n * 0.1)
    last = 1000.0 + (len(files) - 1) * 0.1
    assert asm.tick(now=last + 4.0) == []  # not stable yet
    d = asm.tick(now=last + 5.5)
    assert len(d) == 1 and d[0].routes == ["chest"] and len(d[0].jobs) == 2
    assert asm.tick(now=last + 100) == []  # dispatched once
    jobs = store.list_jobs()
    assert sorted(j.model for j in jobs) == ["m1", "m2"]
    assert all(j.state == JobState.QUEUED for j in jobs)


def test_late_instance_reprocess_and_ignore(tmp_path: Path, small_series: Path) -> None:
    files = sorted(small_series.glob("*.dcm"))
    for mode, expected_jobs in (("reprocess", 4), ("ignore", 2)):
        db = Database(tmp_path / mode / "node.db")
        cfg = _config(tmp_path / mode, late_instances=mode)
        store = JobStore(db)
        spool = Spool(tmp_path / mode / "spool", SeriesStore(db), late_instances=mode)
        asm = Assembler(cfg, SeriesStore(db), store)
        for f in files[:-1]:
            spool.store(f.read_bytes(), now=1000.0)
        asm.tick(now=1010.0)
        spool.store(files[0].read_bytes(), now=1020.0)  # a re-send is not a late instance
        assert not spool.store(files[-1].read_bytes(), now=1020.0).duplicate
        asm.tick(now=1030.0)
        assert len(store.list_jobs()) == expected_jobs, mode


def test_unmatched_series_is_kept_not_processed(tmp_path: Path, db: Database, small_series: Path) -> None:
    cfg = load_config(None, env={}, overrides={"node": {"data_dir": str(tmp_path), "stable_seconds": 1},
                                               "routes": [{"name": "mr", "match": {"Modality": "MR"}, "models": ["m"]}]})
    store = JobStore(db)
    spool = Spool(tmp_path / "spool", SeriesStore(db))
    spool.store(sorted(small_series.glob("*.dcm"))[0].read_bytes(), now=10.0)
    Assembler(cfg, SeriesStore(db), store).tick(now=20.0)
    assert store.list_jobs() == []
    assert SeriesStore(db).list_series()[0].state == SeriesState.UNMATCHED
    assert db.one("SELECT COUNT(*) AS n FROM events WHERE kind = 'series.unmatched'")["n"] == 1


def _job(store: JobStore, db: Database, max_attempts: int = 2) -> int:
    with db.tx() as c:
        jid = store.create(c, series_uid="1.2.3", series_version=1, model="m", route="r", send_to=["pacs"],
                           max_attempts=max_attempts, config_version="v", now=100.0)
    assert jid is not None
    return jid


def test_job_lifecycle_backoff_dead_retry(db: Database) -> None:
    store = JobStore(db)
    jid = _job(store, db)
    job = store.lease(lease_seconds=60, now=100.0)
    assert job is not None and job.id == jid and job.attempts == 1
    assert store.lease(lease_seconds=60, now=100.0) is None  # leased
    assert store.fail(jid, "boom", backoff_seconds=10, backoff_max_seconds=100, now=101.0) == JobState.FAILED
    assert store.lease(lease_seconds=60, now=105.0) is None  # backing off
    job = store.lease(lease_seconds=60, now=112.0)
    assert job is not None and job.attempts == 2
    assert store.fail(jid, "boom again", backoff_seconds=10, backoff_max_seconds=100, now=113.0) == JobState.DEAD
    assert store.get(jid).error == "boom again"
    assert store.lease(lease_seconds=60, now=10_000.0) is None
    store.retry(jid, actor="test")
    assert store.get(jid).state == JobState.QUEUED
    with pytest.raises(JobError, match="queued"):
        store.retry(jid)
    store.cancel(jid)
    assert store.get(jid).state == JobState.CANCELLED
    with pytest.raises(JobError, match="no job"):
        store.get(999)


def test_expired_lease_is_taken_again_and_recover(db: Database) -> None:
    store = JobStore(db)
    jid = _job(store, db, max_attempts=5)
    assert store.lease(lease_seconds=10, now=100.0) is not None
    again = store.lease(lease_seconds=10, now=111.0)
    assert again is not None and again.id == jid and again.attempts == 2
    assert store.recover(now=112.0) == (1, 0)
    assert store.get(jid).state == JobState.QUEUED


def test_complete_queues_outbox_once(db: Database) -> None:
    store = JobStore(db)
    jid = _job(store, db)
    store.lease(lease_seconds=60, now=100.0)
    objs = [ResultObject("/x/seg.dcm", "1.2.3.1", "seg"), ResultObject("/x/sr.dcm", "1.2.3.2", "sr")]
    store.complete(jid, result=JobResult(model={"name": "m"}, series_uid="1.2.3"), objects=objs, destinations=["pacs"], now=101.0)
    with pytest.raises(JobError, match="expected running"):
        store.complete(jid, result=JobResult(model={"name": "m"}, series_uid="1.2.3"), objects=objs, destinations=["pacs"])
    due = store.due_deliveries(now=102.0)
    assert [i.sop_uid for i in due["pacs"]] == ["1.2.3.1", "1.2.3.2"]
    assert store.due_deliveries(now=102.0) == {}  # marked sending
    a, b = due["pacs"]
    store.delivered(a, "0x0000")
    assert store.delivery_failed(b, "down", max_attempts=2, backoff_seconds=5, backoff_max_seconds=5,
                                 now=103.0) == OutboxState.PENDING
    assert store.due_deliveries(now=104.0) == {}
    b2 = store.due_deliveries(now=109.0)["pacs"][0]
    assert store.delivery_failed(b2, "still down", max_attempts=2, backoff_seconds=5, backoff_max_seconds=5,
                                 now=110.0) == OutboxState.DEAD
    assert store.outbox_counts() == {"pending": 0, "sending": 0, "sent": 1, "dead": 1, "superseded": 0}
    assert store.resend(jid) == 2
    assert store.outbox_counts()["pending"] == 2


def test_recover_requeues_sending_items(db: Database) -> None:
    store = JobStore(db)
    jid = _job(store, db)
    store.lease(lease_seconds=60, now=100.0)
    store.complete(jid, result=JobResult(model={"name": "m"}, series_uid="1.2.3"), objects=[ResultObject("/x", generate_uid(), "c")], destinations=["pacs"])
    assert store.due_deliveries()
    assert store.recover() == (0, 1)
    assert store.outbox_counts()["pending"] == 1


def test_same_sop_uid_with_other_content_is_a_conflict(tmp_path: Path, small_series: Path) -> None:
    f = sorted(small_series.glob("*.dcm"))[0]
    first = f.read_bytes()
    ds = dcmread(f)
    arr = ds.pixel_array.copy()
    arr[:4, :4] += 7
    ds.PixelData = arr.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    other = buf.getvalue()
    for policy in ("keep", "replace"):
        db = Database(tmp_path / policy / "node.db")
        series = SeriesStore(db)
        spool = Spool(tmp_path / policy / "spool", series, on_conflict=policy)
        r1 = spool.store(first, now=1.0)
        assert not spool.store(first, now=2.0).conflict  # an identical re-send is not a conflict
        r2 = spool.store(other, now=3.0)
        assert r2.conflict and r2.path == r1.path
        assert r1.path.read_bytes() == (first if policy == "keep" else other)
        events = [json.loads(r["detail"]) for r in db.query("SELECT detail FROM events WHERE kind = 'instance.conflict'")]
        assert events == [{"sop_uid": r1.sop_uid, "kept": "first" if policy == "keep" else "new", "calling_ae": ""}]


def _version_job(store: JobStore, db: Database, version: int, now: float) -> int:
    with db.tx() as c:
        jid = store.create(c, series_uid="1.2.3", series_version=version, model="m", route="r",
                           send_to=["pacs", "web"], max_attempts=2, config_version="v", now=now)
    assert jid is not None
    return jid


def test_new_version_supersedes_earlier_results(db: Database) -> None:
    """A reprocessed series: the earlier job's delivered objects are withdrawn by a rejection note sent after the
    new objects; its undelivered ones are never sent; a stale job finishing last is superseded at once."""
    from node.store.jobs import Supersession

    store = JobStore(db)
    old = _version_job(store, db, 1, 100.0)
    assert store.lease(lease_seconds=60, now=100.0).id == old  # type: ignore[union-attr]
    old_objs = [ResultObject("/o/seg.dcm", "1.9.1", "1.2.840.10008.5.1.4.1.1.66.4", "1.9.10"),
                ResultObject("/o/sr.dcm", "1.9.2", "1.2.840.10008.5.1.4.1.1.88.34", "1.9.20")]
    store.complete(old, result=JobResult(model={"name": "m"}, series_uid="1.2.3"), objects=old_objs, destinations=["pacs", "web"], now=101.0)
    due = store.due_deliveries(now=102.0)
    for it in due["pacs"]:
        store.delivered(it, "0x0000", now=103.0)  # delivered to the PACS; the web destination fails
    for it in due["web"]:
        store.delivery_failed(it, "down", max_attempts=5, backoff_seconds=10, backoff_max_seconds=10, now=103.0)

    stale = _version_job(store, db, 2, 110.0)
    new = _version_job(store, db, 3, 111.0)
    store.lease(lease_seconds=60, now=112.0)
    job = store.lease(lease_seconds=60, now=112.0)
    assert job is not None and job.id == new
    earlier = store.earlier_results(job)
    assert {(e.job_id, e.destination, e.state) for e in earlier} == {
        (old, "pacs", OutboxState.SENT), (old, "web", OutboxState.PENDING)}
    note = ResultObject("/n/kos.dcm", "1.9.9", "1.2.840.10008.5.1.4.1.1.88.59", "1.9.90")
    new_objs = [ResultObject("/n/seg.dcm", "1.9.3", "1.2.840.10008.5.1.4.1.1.66.4", "1.9.30")]
    store.complete(new, result=JobResult(model={"name": "m"}, series_uid="1.2.3"), objects=new_objs, destinations=["pacs", "web"],
                   supersedes=Supersession((old,), note, frozenset({"pacs", "web"})), now=113.0)
    assert store.get(old).superseded_by == new
    assert {(i.destination, i.state) for i in store.outbox(job_id=old)} == {
        ("pacs", OutboxState.SENT), ("web", OutboxState.SUPERSEDED)}
    # the note goes only where the old objects were delivered, and only once the new SEG is settled there
    due = store.due_deliveries(now=114.0)
    assert [i.sop_uid for i in due["pacs"]] == ["1.9.3"] and [i.sop_uid for i in due["web"]] == ["1.9.3"]
    store.delivered(due["pacs"][0], "0x0000", now=115.0)
    due = store.due_deliveries(now=116.0)
    assert [(i.sop_uid, i.role) for i in due["pacs"]] == [("1.9.9", "rejection")] and "web" not in due
    with pytest.raises(JobError, match="superseded"):
        store.resend(old)
    # version 2 was still running: it completes last, its results are superseded at once and never queued
    store.complete(stale, result=JobResult(model={"name": "m"}, series_uid="1.2.3"), objects=[ResultObject("/s/seg.dcm", "1.9.5", "x", "y")],
                   destinations=["pacs"], now=120.0)
    assert store.get(stale).superseded_by == new and store.outbox(job_id=stale) == []
    assert store.earlier_results(store.get(new)) == []
    kinds = [r["kind"] for r in db.query("SELECT kind FROM events WHERE kind = 'job.superseded'")]
    assert len(kinds) == 2


def test_after_a_restart_a_series_cut_off_while_arriving_waits_a_full_quiet_period(tmp_path: Path, db: Database,
                                                                                   small_series: Path) -> None:
    """Killed while a series arrived: at the restart its downtime is not counted as quiet, so the PACS re-sending
    the rest within the quiet period gets the whole series processed, not the part that was there."""
    cfg = _config(tmp_path)
    store = JobStore(db)
    spool = Spool(tmp_path / "spool", SeriesStore(db))
    files = sorted(small_series.glob("*.dcm"))
    for f in files[:5]:
        spool.store(f.read_bytes(), now=1000.0)  # then the node was killed; it restarts an hour later
    asm = Assembler(cfg, SeriesStore(db), store, started=4600.0)
    assert asm.tick(now=4601.0) == []  # the downtime is not quiet time
    for f in files[5:]:
        spool.store(f.read_bytes(), now=4603.0)  # the PACS sends the rest
    assert asm.tick(now=4607.0) == []
    (d,) = asm.tick(now=4609.0)
    assert d.outcome == "dispatched"
    assert SeriesStore(db).get(d.series_uid).instances == len(files)


@pytest.mark.parametrize("number", ["1e400", "99999999999999999999", "-99999999999999999999"])
def test_an_instance_number_no_integer_can_hold_leaves_no_orphan(tmp_path: Path, db: Database, small_series: Path,
                                                                 number: str) -> None:
    """InstanceNumber 1e400 or 20 digits: the instance is stored and indexed without it (the completeness checks
    cannot use it), or refused with nothing left in the spool; never a file the index does not know."""
    import pydicom

    spool = Spool(tmp_path / "spool", SeriesStore(db))
    placeholder = "7" * len(number)  # written as a valid number, then its bytes replaced by the hostile value
    with pydicom.config.disable_value_validation():
        raw = _raw(sorted(small_series.glob("*.dcm"))[0], InstanceNumber=placeholder)
    assert raw.count(placeholder.encode()) == 1
    raw = raw.replace(placeholder.encode(), number.encode())
    try:
        result = spool.store(raw)
    except InvalidInstanceError:
        result = None
    files = [p for p in (tmp_path / "spool").rglob("*.dcm")]
    if result is None:
        assert files == []
    else:
        assert files == [result.path] and SeriesStore(db).instance_count(result.series_uid) == 1
    assert [p for p in (tmp_path / "spool").rglob("*.part")] == []


def test_a_series_whose_other_instances_were_refused_is_held_not_skipped_as_too_small(
        tmp_path: Path, db: Database, small_series: Path) -> None:
    """11 of 12 instances refused for space: one image arrived. The series is not "only 1 image" (a scout) but
    incomplete, waiting for the refused ones."""
    cfg = _config(tmp_path)
    store = JobStore(db)
    series = SeriesStore(db)
    spool = Spool(tmp_path / "spool", series)
    files = sorted(small_series.glob("*.dcm"))
    first = spool.store(files[0].read_bytes(), now=1000.0)
    for f in files[1:12]:
        ds = dcmread(f, stop_before_pixels=True)
        series.record_refusal(reason="out of resources", series_uid=first.series_uid, sop_uid=str(ds.SOPInstanceUID),
                              calling_ae="TESTSCU", now=1000.0)
    (d,) = Assembler(cfg, series, store).tick(now=1010.0)
    assert d.outcome == "incomplete", d
    assert "refused" in d.reason and store.list_jobs() == []
