"""Fault injection: kill -9 during ingest, a corpus of bad input, failing models, a destination down
for good. `make soak` runs the same with more trials (PREANNOT_SOAK=1) plus a bounded fuzz.

Each test appends its figures to $PREANNOT_FAULT_REPORT (JSON lines) when set, for docs/security.md.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.sop_class import CTImageStorage as CT_IMAGE_STORAGE  # type: ignore[attr-defined]

from node.net.scu import echo, send_files
from node.store.jobs import JobState
from tests.conftest import ROOT, free_port, node_toml, query_db, wait_for

SOAK = os.environ.get("PREANNOT_SOAK") == "1"


def report(name: str, **figures: Any) -> None:
    path = os.environ.get("PREANNOT_FAULT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, **figures}) + "\n")


_q = query_db


# --- kill -9 during ingest ------------------------------------------------------------------------

def _kill_during_ingest_trials(tmp_path: Path, small_series: Path, trials: int) -> dict[str, int]:
    port = free_port()
    data = tmp_path / "data"
    cfg = tmp_path / "node.toml"
    cfg.write_text(node_toml(data, port).replace('models = ["lesion-ct-demo"]', 'models = ["lesion-ct-demo"]\n'
                                                 'calling_ae = ["NOBODY"]'))  # ingest only: no job runs
    files = sorted(small_series.glob("*.dcm"))
    def dataset_bytes(b: bytes) -> bytes:  # the stored file has the node's own file meta: compare the dataset
        return b[132 + 12 + int.from_bytes(b[140:144], "little"):]

    originals = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): dataset_bytes(p.read_bytes())
                 for p in files}
    rng = random.Random(1234)
    acked_total = lost = partial = 0
    log = (tmp_path / "node.log").open("a")
    for _ in range(trials):
        proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(cfg)], cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: echo(ae_title="PREANNOT", host="127.0.0.1", port=port, calling_ae="TESTSCU", timeout=1),
                 60, what="the node")
        outcomes: list[Any] = []

        def push(into: list[Any] = outcomes) -> None:
            into.extend(send_files([str(p) for p in files], ae_title="PREANNOT", host="127.0.0.1", port=port,
                                   calling_ae="TESTSCU", timeout=5))

        sender = threading.Thread(target=push)
        sender.start()
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        sender.join(30)
        acked = {str(dcmread(o.path, stop_before_pixels=True).SOPInstanceUID) for o in outcomes if o.ok}
        acked_total += len(acked)
        indexed = dict(_q(data / "node.db", "SELECT sop_uid, path FROM instances")) if (data / "node.db").exists() else {}
        for uid in acked:
            if uid not in indexed or not Path(indexed[uid]).is_file():
                lost += 1
            elif dataset_bytes(Path(indexed[uid]).read_bytes()) != originals[uid]:
                partial += 1
        for uid, path in indexed.items():  # nothing indexed is half-written either
            if dataset_bytes(Path(path).read_bytes()) != originals.get(uid):
                partial += 1
    # a final start: the partial temp files are swept, the sender's retry completes the series
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(cfg)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: echo(ae_title="PREANNOT", host="127.0.0.1", port=port, calling_ae="TESTSCU", timeout=1),
                 60, what="the node")
        assert list((data / "spool" / ".tmp").iterdir()) == []
        retry = send_files([str(p) for p in files], ae_title="PREANNOT", host="127.0.0.1", port=port,
                           calling_ae="TESTSCU")
        assert all(o.ok for o in retry)
        assert _q(data / "node.db", "SELECT COUNT(*) FROM instances") == [(len(files),)]
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    return {"trials": trials, "acknowledged": acked_total, "lost": lost, "partial": partial}


@pytest.mark.timeout(2400)
def test_kill9_during_ingest(tmp_path: Path, small_series: Path) -> None:
    figures = _kill_during_ingest_trials(tmp_path, small_series, trials=50 if SOAK else 6)
    report("kill9_during_ingest", **figures)
    assert figures["lost"] == 0 and figures["partial"] == 0


# --- bad input corpus -----------------------------------------------------------------------------

def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _corpus(base: Path, rng: random.Random) -> list[tuple[str, bytes]]:
    """(kind, file bytes) of bad or odd instances, each with fresh UIDs."""
    raw = base.read_bytes()
    out: list[tuple[str, bytes]] = []

    def fresh(**changes: Any) -> Dataset:
        ds = dcmread(io.BytesIO(raw))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        for k, v in changes.items():
            setattr(ds, k, v)
        return ds

    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    for _ in range(40):  # truncated anywhere after the file meta
        b = _encode(fresh())
        out.append(("truncated", b[:rng.randrange(meta_end + 1, len(b) - 1)]))
    for _ in range(40):  # random bytes flipped in the dataset header (wrong VRs, lengths, tags)
        b = bytearray(_encode(fresh()))
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(meta_end, min(meta_end + 700, len(b)))
            b[pos] = rng.randrange(256)
        out.append(("corrupted-header", bytes(b)))
    for _ in range(5):
        ds = fresh()
        del ds.PixelData
        out.append(("missing-pixel-data", _encode(ds)))
    for n in range(10):
        ds = fresh()
        ds.PixelData = ds.PixelData[: (n + 1) * 100]
        out.append(("short-pixel-data", _encode(ds)))
    for rows, cols in ((65535, 65535), (0, 0), (1, 70000 % 65536), (30000, 30000), (7, 13)):
        out.append(("absurd-rows-columns", _encode(fresh(Rows=rows, Columns=cols))))
    for n in range(5):
        ds = fresh()
        ds.add_new(0x00091010, "OB", os.urandom(2**20 if n == 0 else 2**16))
        ds.add_new(0x00090010, "LO", "HUGE PRIVATE")
        out.append(("huge-private-tag", _encode(ds)))
    names = ["Müller^Jürgen", "Дмитрий^Иванов", "山田^太郎", "O'Brien^Seán", "\u202eevil^name", "a" * 64, "",
             "Name^With\\Backslash", "Ωmega^Δelta", "🙂^Emoji"]
    for name in names:
        out.append(("odd-character-set", _encode(fresh(PatientName=name))))
    for uid in ("../../../etc/passwd", "1.2/3", "..", "1.2.3\\4", "/abs/path", "1." + "9" * 80, "1.2 3", "C:\\x",
                "1.2.3.4.5.6.7.8.9.0.1.2.3.4.5.6.7.8.9.0.1.2.3.4.5.6.7.8.9.0.1.2.3.4.5.6", "%2e%2e%2f"):
        ds = fresh()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        out.append(("path-characters-in-uid", _encode(ds)))
    for _ in range(60):  # garbage after a valid file meta
        b = _encode(fresh())
        out.append(("random-dataset-bytes", b[:meta_end] + os.urandom(rng.randint(1, 4000))))
    return out


def _store_raw(port: int, items: list[tuple[str, bytes]], tmp: Path) -> list[tuple[str, int | None]]:
    """C-STORE each file as it is on disk (pynetdicom sends the dataset bytes without re-encoding)."""
    ae = AE(ae_title="TESTSCU")
    for cx in AllStoragePresentationContexts[:120]:
        ae.add_requested_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES[:3])
    results: list[tuple[str, int | None]] = []
    assoc = None
    for n, (kind, data) in enumerate(items):
        p = tmp / f"bad{n:04d}.dcm"
        p.write_bytes(data)
        if assoc is None or not assoc.is_established:
            assoc = ae.associate("127.0.0.1", port, ae_title="PREANNOT")
        try:
            status = assoc.send_c_store(str(p)) if assoc.is_established else None
            results.append((kind, int(status.Status) if status else None))
        except Exception as exc:  # the SCU itself may refuse to send a broken file: that is an outcome too
            logging.getLogger(__name__).warning("the SCU did not send %s: %s", kind, exc)
            results.append((kind, -1))
    if assoc is not None and assoc.is_established:
        assoc.release()
    return results


def _inconsistent_series(src: Path, out: Path) -> dict[str, list[Path]]:
    files = sorted(src.glob("*.dcm"))[:6]
    made: dict[str, list[Path]] = {}
    for kind in ("mixed-sizes", "mixed-orientations", "duplicate-positions", "non-image-sr"):
        series = generate_uid()
        d = out / kind
        d.mkdir(parents=True)
        for n, f in enumerate(files):
            ds = dcmread(f)
            ds.SeriesInstanceUID = series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            if kind == "mixed-sizes" and n == 3:
                ds.Rows = ds.Columns = 48
                ds.PixelData = ds.PixelData[: 48 * 48 * 2]
            if kind == "mixed-orientations" and n == 3:
                ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
            if kind == "duplicate-positions" and n == 3:
                ds.ImagePositionPatient = dcmread(files[2]).ImagePositionPatient
            if kind == "non-image-sr":
                ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
                for kw in ("Rows", "Columns", "PixelData"):
                    delattr(ds, kw)
            ds.save_as(d / f.name)
        made[kind] = sorted(d.glob("*.dcm"))
    return made


@pytest.mark.filterwarnings("ignore")
def test_bad_input_corpus(make_node: Callable[..., Any], small_series: Path, tmp_path: Path) -> None:
    node = make_node(stable=0.5)
    # an image route that also catches the non-image series: it must be skipped with a reason
    node.config.routes[0].match.clear()  # type: ignore[attr-defined]
    rng = random.Random(99)
    corpus = _corpus(sorted(small_series.glob("*.dcm"))[0], rng)
    results = _store_raw(node.listener.port, corpus, tmp_path)
    by_kind: dict[str, dict[str, int]] = {}
    for kind, status in results:
        key = "success" if status == 0 else "refused" if status in (0xA700, 0xC000, 0x0110) else \
            "not sent by the SCU" if status == -1 else f"other {status}"
        by_kind.setdefault(kind, {}).setdefault(key, 0)
        by_kind[kind][key] += 1
    assert all("other" not in k for v in by_kind.values() for k in v), by_kind
    assert by_kind["missing-pixel-data"].get("success", 0) + by_kind["missing-pixel-data"].get("refused", 0) == 5
    assert by_kind["odd-character-set"].get("success") == 10  # odd names are data, not errors
    assert by_kind["huge-private-tag"].get("success") == 5
    # inconsistent and non-image series: accepted, then their jobs fail (or they are skipped) saying why
    bad_series = _inconsistent_series(small_series, tmp_path / "series")
    for files in bad_series.values():
        assert all(o.ok for o in send_files([str(p) for p in files], ae_title="PREANNOT", host="127.0.0.1",
                                            port=node.listener.port, calling_ae="TESTSCU"))
    # ... and a good series still goes through
    good = sorted(small_series.glob("*.dcm"))
    assert all(o.ok for o in send_files([str(p) for p in good], ae_title="PREANNOT", host="127.0.0.1",
                                        port=node.listener.port, calling_ae="TESTSCU"))
    good_uid = str(dcmread(good[0]).SeriesInstanceUID)
    wait_for(lambda: node.store.list_jobs(series_uid=good_uid, state=JobState.DONE), 180, what="the good series")
    messages = {}
    for kind, files in bad_series.items():
        uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        if kind == "non-image-sr":  # never a job: skipped before any, with the reason
            wait_for(lambda u=uid: node.series.get(u).state == "skipped", 60, what="the SR series skipped")
            messages[kind] = node.series.get(uid).note
            continue
        job = wait_for(lambda u=uid: [j for j in node.store.list_jobs(series_uid=u) if j.error], 120,
                       what=f"the {kind} job to fail")[0]
        assert job.state == JobState.DEAD and job.attempts == 1  # bad input: not retried
        messages[kind] = job.error
    assert "mixes matrix sizes" in messages["mixed-sizes"]
    assert "mixes orientations" in messages["mixed-orientations"]
    assert "slices at position" in messages["duplicate-positions"]
    assert "not an image: a structured report" in messages["non-image-sr"]
    assert echo(ae_title="PREANNOT", host="127.0.0.1", port=node.listener.port, calling_ae="TESTSCU")
    spool = node.config.data_dir / "spool"
    assert all(spool in p.resolve().parents for p in spool.rglob("*"))  # nothing escaped the spool
    report("bad_input_corpus", instances=len(corpus), series=len(bad_series), by_kind=by_kind,
           node_crashes=0, job_messages=messages)


def _malformed(source: Path) -> list[tuple[str, bytes]]:
    """(kind, file bytes) of datasets broken below the element level (nesting, compression, lengths), each
    with fresh UIDs and a valid file meta, so that a chunked SCU sends the broken bytes as they are."""
    import zlib

    from pydicom.filewriter import write_file_meta_info

    def fresh() -> tuple[bytes, bytes, bytes]:
        ds = dcmread(source)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        raw = _encode(ds)
        meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
        meta = io.BytesIO()
        meta.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
        return raw[:meta_end], raw[meta_end:], meta.getvalue()

    sq = b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff"  # (0008,1115) SQ, undefined length
    item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    end_item, end_sq = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00", b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    cases: list[tuple[str, Callable[[bytes, bytes, bytes], bytes]]] = [
        ("deep-nesting", lambda h, b, z: h + (sq + item) * 3000 + (end_item + end_sq) * 3000 + b),
        ("deflate-garbage", lambda h, b, z: z + b"\x78\x9c" + bytes(range(256)) * 4),
        ("deflate-truncated", lambda h, b, z: z + zlib.compress(b)[2:-4][: len(b) // 50]),
        ("deflate-not-deflated", lambda h, b, z: z + b),
        ("length-beyond-end", lambda h, b, z: h + b"\x08\x00\x18\x00UI\xff\x7f" + b[:50]),
        ("item-longer-than-sequence", lambda h, b, z: h + b"\x08\x00\x15\x11SQ\x00\x00\x10\x00\x00\x00"
         + b"\xfe\xff\x00\xe0\x20\x00\x00\x00" + b"\x00" * 8 + b),
        ("sequence-length-huge", lambda h, b, z: h + b"\x08\x00\x15\x11SQ\x00\x00\xf0\xff\xff\xff" + item + b),
        ("stray-item-delimiter", lambda h, b, z: h + end_item + b),
        ("stray-sequence-delimiter", lambda h, b, z: h + end_sq + b),
    ]
    return [(kind, make(*fresh())) for kind, make in cases]


@pytest.mark.filterwarnings("ignore")
def test_malformed_datasets_get_cannot_understand_and_leave_nothing(
        make_node: Callable[..., Any], small_series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dataset the node cannot parse is the sender's error: 0xC000 (cannot understand), never 0x0110 (our own
    processing failure), one log line, and nothing of it stays in the spool; the same association then stores a
    good instance. What pydicom reads leniently (a stray delimiter it skips) may be stored, whole and indexed."""
    import pynetdicom

    # the SCU sends each file's bytes after its meta without parsing them (as a PACS forwarding them would)
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    node = make_node(stable=30)
    good = sorted(small_series.glob("*.dcm"))
    cases = _malformed(good[0])
    ae = AE(ae_title="TESTSCU")
    for ts in ALL_TRANSFER_SYNTAXES[:3]:  # one context per transfer syntax, so that each file goes as it is
        ae.add_requested_context(CT_IMAGE_STORAGE, ts)
    assoc = ae.associate("127.0.0.1", node.listener.port, ae_title="PREANNOT")
    assert assoc.is_established
    statuses: dict[str, int] = {}
    for n, (kind, data) in enumerate([*cases, ("good", good[1].read_bytes())]):
        (tmp_path / f"{n}.dcm").write_bytes(data)
        statuses[kind] = int(assoc.send_c_store(tmp_path / f"{n}.dcm").Status)
    assoc.release()
    lenient = {"item-longer-than-sequence", "stray-item-delimiter"}
    wrong = {kind: hex(s) for kind, s in statuses.items() if kind != "good" and s != 0xC000
             and not (kind in lenient and s == 0)}
    assert not wrong, f"expected 0xC000 for every malformed dataset, got {wrong}"
    assert statuses["good"] == 0
    stored = sum(1 for s in statuses.values() if s == 0)
    assert _q(node.config.data_dir / "node.db", "SELECT COUNT(*) FROM instances") == [(stored,)]
    spooled = [p for p in (node.config.data_dir / "spool").rglob("*") if p.is_file()]
    assert len(spooled) == stored, spooled  # the stored instances only: no orphan, no .part
    failures = node.listener.stats.failures
    assert failures.get("cannot_understand") == len(cases) - stored + 1, failures
    assert not failures.get("processing_failure"), failures
    report("malformed_datasets", cases=len(cases), refused_0xC000=len(cases) - stored + 1,
           stored_lenient=stored - 1, processing_failures=0, orphans=0, statuses={k: hex(v) for k, v in statuses.items()})


def _send_store_request(assoc: Any, path: Path, affected_sop_uid: str) -> tuple[int | None, float]:
    """A C-STORE request sent as a broken SCU would, with whatever Affected SOP Instance UID it is given (even
    an empty one, which pynetdicom's own ``send_c_store`` would never send). Returns (status or None when no
    answer came within the DIMSE timeout, seconds waited)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pynetdicom.dimse_primitives import C_STORE

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, dcmread(path))
    req = C_STORE()
    req.MessageID, req.Priority, req.AffectedSOPClassUID = 7, 2, CT_IMAGE_STORAGE
    req._affected_sop_instance_uid = affected_sop_uid  # type: ignore[assignment]  # past the setter's checks
    req.DataSet = io.BytesIO(buf.getvalue())
    context = assoc._get_valid_context(CT_IMAGE_STORAGE, "1.2.840.10008.1.2", "scu")
    assoc._reactor_checkpoint.clear()  # as send_c_store does: the reactor must not take the answer
    while not assoc._is_paused:
        time.sleep(0.0001)
    t0 = time.monotonic()
    assoc.dimse.send_msg(req, context.context_id)
    _, rsp = assoc.dimse.get_msg(block=True)
    assoc._reactor_checkpoint.set()
    return (int(rsp.Status) if rsp is not None else None), time.monotonic() - t0


def test_store_request_without_affected_sop_instance_uid_is_answered_at_once(
        make_node: Callable[..., Any], small_series: Path) -> None:
    """pynetdicom drops a C-STORE request lacking a mandatory command element without an answer, so the sender
    waited its whole DIMSE timeout (60 s by default). The node answers 0xC000 at once, stores nothing, and the
    association goes on."""
    node = make_node(stable=30)
    files = sorted(small_series.glob("*.dcm"))
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CT_IMAGE_STORAGE, "1.2.840.10008.1.2")
    ae.dimse_timeout = 10
    assoc = ae.associate("127.0.0.1", node.listener.port, ae_title="PREANNOT")
    assert assoc.is_established
    status, waited = _send_store_request(assoc, files[0], "")
    assert status == 0xC000 and waited < 2, (status, waited)
    assert _q(node.config.data_dir / "node.db", "SELECT COUNT(*) FROM instances") == [(0,)]
    status, _ = _send_store_request(assoc, files[1], str(dcmread(files[1]).SOPInstanceUID))
    assert status == 0x0000 and assoc.is_established
    assoc.release()
    assert _q(node.config.data_dir / "node.db", "SELECT COUNT(*) FROM instances") == [(1,)]
    assert len([p for p in (node.config.data_dir / "spool").rglob("*") if p.is_file()]) == 1


# --- model failures -------------------------------------------------------------------------------

def _failing_bundle(models: Path, name: str, func: str) -> None:
    shutil.copytree(ROOT / "models" / "lesion-ct-demo", models / name)
    cfg_path = models / name / "configs" / "inference.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["postprocessing"]["transforms"].insert(0, {"_target_": "Lambdad", "keys": "pred", "func": func})
    cfg_path.write_text(json.dumps(cfg))


def test_model_failures_are_recorded_and_isolated(tmp_path: Path, small_series: Path) -> None:
    from node.config import load_config
    from node.service import Node

    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(ROOT / "models" / "lesion-ct-demo", models / "good")
    _failing_bundle(models, "raises", "$lambda x: (_ for _ in ()).throw(ValueError('simulated model bug'))")
    _failing_bundle(models, "oom", "$lambda x: (_ for _ in ()).throw(MemoryError('simulated out of memory'))")
    _failing_bundle(models, "slow", "$lambda x: (__import__('time').sleep(8), x)[1]")
    port = free_port()
    text = node_toml(tmp_path / "data", port, stable=0.5, models=models)
    text = text.replace('models = ["lesion-ct-demo"]', 'models = ["raises", "oom", "slow", "good"]')
    text = text.replace("[jobs]\nbackoff_seconds = 0.5", "[jobs]\nbackoff_seconds = 0.2\nmax_attempts = 2\n"
                                                         "timeout_seconds = 6")  # the good model needs ~1 s
    (tmp_path / "node.toml").write_text(text)
    node = Node(load_config(tmp_path / "node.toml"))
    node.start()
    try:
        assert all(o.ok for o in send_files([str(p) for p in sorted(small_series.glob("*.dcm"))],
                                             ae_title="PREANNOT", host="127.0.0.1", port=port, calling_ae="TESTSCU"))
        wait_for(lambda: len(node.store.list_jobs(state=JobState.DEAD)) == 3 and
                 len(node.store.list_jobs(state=JobState.DONE)) == 1, 180, what="3 dead jobs and 1 done")
        errors = {j.model: j.error or "" for j in node.store.list_jobs(state=JobState.DEAD)}
        assert "simulated model bug" in errors["raises"]
        assert "simulated out of memory" in errors["oom"]
        assert "timeout" in errors["slow"]
        assert all(j.attempts == 2 for j in node.store.list_jobs(state=JobState.DEAD))
        assert all(w.is_alive() for w in node.workers)  # the worker recovered each time
        metrics = node.metrics.render().decode()
        assert 'preannot_jobs_finished_total{model="raises",state="dead"} 1.0' in metrics
        report("model_failures", injected=["exception", "out-of-memory", "timeout"], attempts_each=2,
               other_jobs_done=1, worker_alive=True)
    finally:
        node.stop()


# --- destination down for good --------------------------------------------------------------------

def test_destination_down_for_good_is_dead_lettered(tmp_path: Path, small_series: Path) -> None:
    from node.config import load_config
    from node.service import Node

    port = free_port()
    text = node_toml(tmp_path / "data", port, sink_port=free_port(), stable=0.5, delivery_backoff=0.4)
    text = text.replace("max_attempts = 50", "max_attempts = 4")
    (tmp_path / "node.toml").write_text(text)
    node = Node(load_config(tmp_path / "node.toml"))
    node.start()
    try:
        assert all(o.ok for o in send_files([str(p) for p in sorted(small_series.glob("*.dcm"))],
                                             ae_title="PREANNOT", host="127.0.0.1", port=port, calling_ae="TESTSCU"))
        wait_for(lambda: node.store.outbox_counts()["dead"] >= 2, 120, what="dead-lettered results")
        dead = node.store.outbox(state="dead")
        assert all(i.attempts == 4 and "destination down or unreachable" in (i.error or "") for i in dead)
        times = [r["ts"] for r in node.store.db.query(
            "SELECT ts FROM events WHERE kind IN ('delivery.failed', 'delivery.dead') AND detail LIKE ? ORDER BY id",
            (f'%{dead[0].sop_uid}%',))]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert len(times) == 4 and all(g >= 0.35 for g in gaps) and gaps == sorted(gaps)  # exponential backoff
        assert 'preannot_outbox{state="dead"}' in node.metrics.render().decode()
        assert node.status()["outbox"]["dead"] == len(dead)
        report("destination_down_for_good", attempts=4, gaps_s=[round(g, 2) for g in gaps], dead_lettered=len(dead))
    finally:
        node.stop()


# --- fuzz (soak only) -----------------------------------------------------------------------------

@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_fuzz_scp_with_hypothesis(make_node: Callable[..., Any], small_series: Path, tmp_path: Path) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    node = make_node()
    raw = sorted(small_series.glob("*.dcm"))[0].read_bytes()
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    body = raw[meta_end:meta_end + 1200]
    sent = {"n": 0}

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=3000), st.integers(min_value=0, max_value=len(body)))
    def fuzz(noise: bytes, cut: int) -> None:
        data = raw[:meta_end] + body[:cut] + noise
        results = _store_raw(node.listener.port, [("fuzz", data)], tmp_path)
        sent["n"] += 1
        assert results[0][1] in (0x0000, 0xA700, 0xC000, 0x0110, -1, None)

    fuzz()
    assert echo(ae_title="PREANNOT", host="127.0.0.1", port=node.listener.port, calling_ae="TESTSCU")
    report("fuzz_scp", examples=sent["n"], node_crashes=0)


# --- the disk fills up during a job ----------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 64 MB tmpfs of its own (root only: skipped elsewhere), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_disk_full_during_a_job_heals_when_space_returns(tmp_path: Path, small_series: Path, small_disk: Path) -> None:
    """The series is received, then the disk fills before its job writes anything: the job's writes (and the
    database's) fail, the worker survives, readiness says the node is not ready, no partial file is left; once
    space is back the same job completes and its results reach the PACS once, without a restart."""
    from node.config import load_config
    from node.devtools.sink import StoreSink
    from node.service import Node

    models = tmp_path / "models"
    models.mkdir()  # the demo model, taking 5 s in its postprocessing: the disk fills while it runs
    _failing_bundle(models, "slow", "$lambda x: (__import__('time').sleep(5), x)[1]")
    sink = StoreSink(tmp_path / "pacs", ae_title="SINK")
    port = free_port()
    text = node_toml(small_disk / "data", port, sink_port=sink.port, stable=1.0, models=models)
    (tmp_path / "node.toml").write_text(text.replace('models = ["lesion-ct-demo"]', 'models = ["slow"]'))
    node = Node(load_config(tmp_path / "node.toml"))
    node.start()
    filler = small_disk / "filler"
    try:
        assert all(o.ok for o in send_files([str(p) for p in sorted(small_series.glob("*.dcm"))],
                                             ae_title="PREANNOT", host="127.0.0.1", port=port, calling_ae="TESTSCU"))
        wait_for(lambda: node.store.list_jobs(state="running"), 30, what="the job running")
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)  # fill the disk while the model runs
        for block in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * block)
            except OSError:
                pass
        os.close(fd)
        time.sleep(8)  # the job runs into the full disk
        assert all(w.is_alive() for w in node.workers)
        assert sink.files() == []
        assert node.readiness()["store_writable"] is False
        assert node.store.list_jobs()[0].state != "done"
        filler.unlink()  # space is back
        job = wait_for(lambda: node.store.list_jobs(state="done"), 120, what="the job once space returned")[0]
        files = wait_for(lambda: len(sink.files()) >= 2 and sink.files(), 60, what="the results")
        time.sleep(2)
        assert len(sink.files()) == len(files) == 2  # once each: a SEG and an SR
        assert sum(sink.received.values()) == 2
        assert len(node.store.list_jobs()) == 1 and job.state == "done"
        assert all(w.is_alive() for w in node.workers)
        assert node.readiness()["store_writable"] is True
        assert not [p for p in (small_disk / "data").rglob("*.part")]  # no partial file left behind
        report("disk_full_during_job", job_attempts=node.store.get(job.id).attempts, results_received=2,
               worker_alive=True)
    finally:
        filler.unlink(missing_ok=True)
        node.stop()
        sink.stop()
