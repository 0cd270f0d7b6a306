"""What a PACS really sends: scouts and exam summaries beside the axial series, series that arrive in
pieces, refused instances, bad UIDs. Real node, real C-STORE on loopback, a storage SCP as the PACS."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.devtools.sink import StoreSink
from node.net.scu import send_files
from node.store.jobs import JobState
from node.store.series import SeriesState
from tests.conftest import wait_for

SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"


def _write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.save_as(path, enforce_file_format=True)
    return path


def _scout(axial: Path, out: Path) -> Path:
    ds = dcmread(axial)
    ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SeriesNumber = 1
    return _write(ds, out / "scout.dcm")


def _summary_capture(axial: Path, out: Path) -> Path:
    """The exam summary a scanner sends with the study: an RGB secondary capture."""
    ds = dcmread(axial)
    for kw in ("ImagePositionPatient", "ImageOrientationPatient", "RescaleIntercept", "RescaleSlope", "RescaleType",
               "WindowCenter", "WindowWidth", "WindowCenterWidthExplanation", "SliceLocation", "FrameOfReferenceUID"):
        if kw in ds:
            delattr(ds, kw)
    ds.SOPClassUID = SC_STORAGE
    ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.zeros((int(ds.Rows), int(ds.Columns), 3), dtype=np.uint8).tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return _write(ds, out / "summary.dcm")


def _as_new_series(files: list[Path], out: Path) -> list[Path]:
    """The series under new Series/SOP Instance UIDs (its own series for this test)."""
    series = generate_uid()
    paths = []
    for f in files:
        ds = dcmread(f)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series, generate_uid()
        paths.append(_write(ds, out / f.name))
    return paths


def _send(node: Any, paths: list[Path]) -> list[Any]:
    return send_files([str(p) for p in paths], ae_title="PREANNOT", host="127.0.0.1", port=node.listener.port,
                      calling_ae="TESTSCU")


@pytest.fixture
def sink(tmp_path: Path) -> Any:
    s = StoreSink(tmp_path / "pacs", ae_title="SINK")
    yield s
    s.stop()


def _series_state(node: Any, uid: str) -> Any:
    return node.series.get(uid)


def test_scout_and_summary_are_skipped_axial_gets_results(make_node: Callable[..., Any], sink: Any,
                                                          small_series: Path, tmp_path: Path) -> None:
    node = make_node(sink_port=sink.port, stable=0.5)
    axial = sorted(small_series.glob("*.dcm"))
    scout, summary = _scout(axial[0], tmp_path / "scout"), _summary_capture(axial[0], tmp_path / "sc")
    assert all(o.ok for o in _send(node, [scout, *axial, summary]))
    wait_for(lambda: node.store.outbox_counts()["sent"] == 2, 180, what="the axial series' SEG + SR")
    scout_uid = str(dcmread(scout, stop_before_pixels=True).SeriesInstanceUID)
    sc_uid = str(dcmread(summary, stop_before_pixels=True).SeriesInstanceUID)
    wait_for(lambda: all(node.series.get(u).state == SeriesState.SKIPPED for u in (scout_uid, sc_uid)), 30,
             what="scout and summary skipped")
    assert "localizer" in (node.series.get(scout_uid).note or "")
    assert "secondary capture" in (node.series.get(sc_uid).note or "")
    # one job, for the axial series only, and exactly its SEG + SR at the PACS
    jobs = node.store.list_jobs()
    axial_uid = str(dcmread(axial[0], stop_before_pixels=True).SeriesInstanceUID)
    assert [(j.series_uid, j.state) for j in jobs] == [(axial_uid, JobState.DONE)]
    received = [dcmread(p, stop_before_pixels=True) for p in sorted((tmp_path / "pacs").glob("*.dcm"))]
    assert sorted(str(d.Modality) for d in received) == ["SEG", "SR"]
    assert all(n == 1 for n in sink.received.values())
    # skipped with the reason in the API view and the audit trail
    skipped = {s.series_uid: s.note for s in node.series.list_series(state="skipped")}
    assert set(skipped) == {scout_uid, sc_uid}
    kinds = [r["kind"] for r in node.db.query("SELECT kind FROM events WHERE series_uid = ?", (sc_uid,))]
    assert "series.skipped" in kinds


def test_missing_middle_chunk_is_held_until_it_arrives(make_node: Callable[..., Any], sink: Any,
                                                       small_series: Path, tmp_path: Path) -> None:
    node = make_node(sink_port=sink.port, stable=0.5)
    files = _as_new_series(sorted(small_series.glob("*.dcm")), tmp_path / "s")
    uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    first, middle, last = files[:8], files[8:16], files[16:]
    assert all(o.ok for o in _send(node, first + last))
    wait_for(lambda: node.series.get(uid).state == SeriesState.INCOMPLETE, 30, what="the series held incomplete")
    assert "InstanceNumber runs from 1 to 24 with 8 missing" in (node.series.get(uid).note or "")
    assert node.store.list_jobs() == []  # nothing runs, nothing is sent
    assert all(o.ok for o in _send(node, middle))
    wait_for(lambda: node.store.outbox_counts()["sent"] == 2, 180, what="one SEG + SR once complete")
    jobs = node.store.list_jobs()
    assert len(jobs) == 1 and jobs[0].state == JobState.DONE
    assert len(sink.received) == 2 and all(n == 1 for n in sink.received.values())


def test_refused_instances_hold_the_series(make_node: Callable[..., Any], sink: Any, small_series: Path,
                                          tmp_path: Path) -> None:
    node = make_node(sink_port=sink.port, stable=0.5)
    files = _as_new_series(sorted(small_series.glob("*.dcm")), tmp_path / "s")
    uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    node.spool.reserve_bytes = 1 << 62  # the disk is "full": the first 8 instances are refused (0xA700)
    refused = _send(node, files[:8])
    assert [o.status for o in refused] == ["0xA700"] * 8
    node.spool.reserve_bytes = 0
    assert all(o.ok for o in _send(node, files[8:]))  # the rest arrives: contiguous numbers, no spacing hole
    wait_for(lambda: node.series.get(uid).state == SeriesState.INCOMPLETE, 30, what="held incomplete")
    assert "8 (out of resources)" in (node.series.get(uid).note or "")
    assert node.store.list_jobs() == []
    assert all(o.ok for o in _send(node, files[:8]))  # the PACS sends them again
    wait_for(lambda: node.store.outbox_counts()["sent"] == 2, 180, what="one SEG + SR")
    assert len(node.store.list_jobs()) == 1 and len(sink.received) == 2


def test_incomplete_series_fails_after_the_hold_time(make_node: Callable[..., Any], small_series: Path,
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREANNOT_NODE__INCOMPLETE_HOLD_MINUTES", "0.05")  # 3 s
    node = make_node(stable=0.5)
    files = _as_new_series(sorted(small_series.glob("*.dcm")), tmp_path / "s")
    uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    assert all(o.ok for o in _send(node, files[:8] + files[12:]))
    wait_for(lambda: node.series.get(uid).state == SeriesState.FAILED, 60, what="the series failed")
    note = node.series.get(uid).note or ""
    assert note.startswith("incomplete: InstanceNumber") and "incomplete_hold_minutes" in note
    assert node.store.list_jobs() == []


def test_permanent_input_error_is_not_retried(make_node: Callable[..., Any], small_series: Path,
                                              tmp_path: Path) -> None:
    node = make_node(stable=0.5)
    files = _as_new_series(sorted(small_series.glob("*.dcm")), tmp_path / "s")
    ds = dcmread(files[5])  # one slice of another matrix size: the series is not a volume
    ds.Rows, ds.Columns = 48, 48
    ds.PixelData = np.zeros((48, 48), dtype=np.uint16).tobytes()
    _write(ds, files[5])
    assert all(o.ok for o in _send(node, files))
    wait_for(lambda: node.store.list_jobs(state=JobState.DEAD), 120, what="the job dead")
    (job,) = node.store.list_jobs()
    assert job.attempts == 1 and "mixes matrix sizes" in (job.error or "")


@pytest.mark.parametrize(("attr", "value"), [("SeriesInstanceUID", "../../../../tmp/x"),
                                             ("StudyInstanceUID", "1." + "2" * 200),
                                             ("SOPInstanceUID", "1.2.03")])
def test_bad_uid_is_refused_on_receipt(make_node: Callable[..., Any], small_series: Path, tmp_path: Path,
                                       attr: str, value: str) -> None:
    node = make_node(stable=0.5)
    ds = dcmread(sorted(small_series.glob("*.dcm"))[0])
    setattr(ds, attr, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    p = tmp_path / "bad.dcm"
    p.write_bytes(buf.getvalue())
    (outcome,) = _send(node, [p])
    assert outcome.status == "0xC000"
    assert node.series.list_series() == []
    assert node.listener.stats.failures == {"cannot_understand": 1}


def test_refused_association_during_a_series_holds_it(make_node: Callable[..., Any], sink: Any,
                                                      small_series: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The PACS's second association is refused over the node's limit while a series arrives: the
    series waits for what that association carried instead of being processed in part."""
    from pynetdicom import AE, build_context

    monkeypatch.setenv("PREANNOT_NODE__MAX_ASSOCIATIONS", "1")
    node = make_node(sink_port=sink.port, stable=0.5)
    files = _as_new_series(sorted(small_series.glob("*.dcm")), tmp_path / "s")
    uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    ae = AE(ae_title="TESTSCU")
    ae.requested_contexts = [build_context(str(dcmread(files[0], stop_before_pixels=True).SOPClassUID))]
    first = ae.associate("127.0.0.1", node.listener.port, ae_title="PREANNOT")
    assert first.is_established
    for f in files[:10]:
        assert first.send_c_store(dcmread(f)).Status == 0
    second = ae.associate("127.0.0.1", node.listener.port, ae_title="PREANNOT")  # over the limit
    wait_for(lambda: not second.is_established, 5, what="the second association refused")
    first.release()
    wait_for(lambda: node.series.get(uid).state == SeriesState.INCOMPLETE, 30, what="held incomplete")
    assert "association of TESTSCU was refused" in (node.series.get(uid).note or "")
    assert node.store.list_jobs() == []
    assert all(o.ok for o in _send(node, files[10:]))  # the PACS retries what the refused one carried
    wait_for(lambda: node.store.outbox_counts()["sent"] == 2, 180, what="one SEG + SR")
    (job,) = node.store.list_jobs()
    assert job.result is not None and job.result.shape[0] == 24
