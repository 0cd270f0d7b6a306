"""One identity per finding in verdicts, geometry checked, misses on negative studies, evidence merged.

Reproduces issue 28's failures: findings numbered in raster order on the SEG route (deleting "Nodule 1", the
largest, recorded finding 3 rejected), a SEG shifted or in another frame of reference recorded as accepted, a
radiologist's SEG on a study with no AI finding not judged, and "save the SEG, then sign the SR" erasing the
edit in the statistics (latest verdict wins).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from node.devtools.synth.phantom import make_phantom
from node.devtools.synth.writer import write_series
from node.imaging.volume import load_series
from node.store.jobs import JobState
from node.verdicts.judge import judge_regions
from node.verdicts.regions import AIRegions, GeometryError, Grid, Region, read_seg
from node.verdicts.store import merge_evidence
from tests.conftest import SMALL, wait_for
from tests.radiologist import blob

TISSUE = hd.sr.CodedConcept("T-D0050", "SRT", "Tissue")


def _final_seg(sources: list[Dataset], mask: np.ndarray, *, labelmap: bool = False) -> Dataset:
    """A radiologist's SEG as a viewer saves it: one segment, re-coded "Tissue", MANUAL."""
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask.astype(np.uint8),
        segmentation_type="LABELMAP" if labelmap else "BINARY",
        segment_descriptions=[hd.seg.SegmentDescription(
            segment_number=1, segment_label="Segment 1", segmented_property_category=TISSUE,
            segmented_property_type=TISSUE, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)],
        series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="Viewer", manufacturer_model_name="Viewer", software_versions="1", device_serial_number="1")
    return dcmread(_save(seg))


def _save(ds: Dataset) -> Any:
    import io

    buf = io.BytesIO()
    ds.save_as(buf)
    buf.seek(0)
    return buf


def _region(number: int, mask: np.ndarray) -> Region:
    idx = np.argwhere(mask)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    return Region(number, 1, generate_uid(), tuple(int(x) for x in lo),  # type: ignore[arg-type]
                  mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].copy(), "M-01000")


def test_seg_verdicts_keep_each_findings_number_and_refuse_a_seg_elsewhere(small_series: Path) -> None:
    files = sorted(small_series.glob("*.dcm"))
    volume = load_series(files)
    sources = sorted((dcmread(p, stop_before_pixels=True) for p in files),
                     key=lambda d: float(d.ImagePositionPatient[2]))
    grid = Grid.of_volume(volume)
    assert grid.shape == volume.shape
    # finding 1 is the largest (the SR numbers by volume) but comes last in raster order; finding 2 first
    big = blob(volume.shape, (16, 60, 60), 5)
    small = blob(volume.shape, (5, 20, 20), 3)
    ai = AIRegions(grid, [_region(1, big), _region(2, small)])
    ai = AIRegions.from_bytes(ai.to_bytes())  # as kept with the job
    assert [r.number for r in ai.regions] == [1, 2] and (ai.union() == (big | small)).all()
    # the radiologist deletes finding 1 ("Lesion 1", the largest) and keeps finding 2
    for labelmap in (False, True):
        final = read_seg(_final_seg(sources, small, labelmap=labelmap), grid)
        j = judge_regions(ai, final)
        outcome = {f.finding: f.outcome for f in j.findings}
        assert outcome == {1: "rejected", 2: "accepted"}, (labelmap, outcome)
        assert j.study_verdict == "edited" and j.counts()["added"] == 0
    # frames placed by position when they reference no source image (another viewer's SEG)
    ds = _final_seg(sources, small | big)
    for item in ds.PerFrameFunctionalGroupsSequence:
        del item.DerivationImageSequence
    final = read_seg(ds, grid)
    assert final.placed_by_position == len(ds.PerFrameFunctionalGroupsSequence)
    assert {f.outcome for f in judge_regions(ai, final).findings} == {"accepted"}
    # shifted by 20 mm: not judged, never accepted
    shifted = _final_seg(sources, small | big)
    for item in shifted.PerFrameFunctionalGroupsSequence:
        pos = item.PlanePositionSequence[0]
        pos.ImagePositionPatient = [float(pos.ImagePositionPatient[0]) + 20.0, *pos.ImagePositionPatient[1:]]
    with pytest.raises(GeometryError, match=r"lies 20\.0 mm from the source image"):
        read_seg(shifted, grid)
    other = _final_seg(sources, small | big)
    other.FrameOfReferenceUID = generate_uid()
    with pytest.raises(GeometryError, match="frame of reference"):
        read_seg(other, grid)
    # a study with no AI finding: the radiologist's lesion is a miss of the model
    none = AIRegions.from_bytes(AIRegions(grid, []).to_bytes())
    j = judge_regions(none, read_seg(_final_seg(sources, small), grid))
    assert j.counts() == {"accepted": 0, "edited": 0, "rejected": 0, "added": 1} and j.study_verdict == "edited"


def _send(node: Any, paths: list[Path]) -> None:
    from node.net.scu import send_files

    out = send_files([str(p) for p in paths], ae_title="PREANNOT", host="127.0.0.1", port=node.listener.port,
                     calling_ae="TESTSCU")
    assert all(o.ok for o in out), out


def test_a_radiologist_seg_on_a_study_without_ai_finding_records_the_miss(make_node: Callable[..., Any],
                                                                            tmp_path: Path) -> None:
    series = tmp_path / "negative"
    empty = make_phantom(777, SMALL, n_lesions=0)
    empty.hu[:] = -1000  # air only: nothing for the model to find
    write_series(empty, series, seed=777)
    files = sorted(series.glob("*.dcm"))
    node = make_node(stable=1.0)
    _send(node, files)
    wait_for(lambda: node.store.list_jobs(state=JobState.DONE), 120, what="the job")
    job = node.store.list_jobs()[0]
    assert job.result is not None and job.result.roi_count == 0 and "seg" not in job.result.files
    sources = sorted((dcmread(p) for p in files), key=lambda d: float(d.ImagePositionPatient[2]))
    shape = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    seg = _final_seg(sources, blob(shape, (12, 48, 30), 3))
    path = tmp_path / "radiologist_seg.dcm"
    seg.save_as(path)
    _send(node, [path])
    wait_for(lambda: node.verdicts.rows(), 60, what="the verdict on the negative study")
    v = node.verdicts.rows()[0]
    assert (v["n_ai"], v["added"], v["study_verdict"]) == (0, 1, "edited")
    added = node.verdicts.findings(v["id"])
    assert [f["outcome"] for f in added] == ["added"] and added[0]["final_volume_mm3"] > 0


def test_regions_survive_the_output_folders_retention(make_node: Callable[..., Any], small_series: Path,
                                                      tmp_path: Path) -> None:
    """The SEG file gone (retention of the output folder): the edit is still judged, finding by finding."""
    import shutil

    files = sorted(small_series.glob("*.dcm"))
    node = make_node(stable=1.0)
    _send(node, files)
    wait_for(lambda: node.store.list_jobs(state=JobState.DONE), 120, what="the job")
    job = node.store.list_jobs()[0]
    assert job.result is not None and job.result.roi_count >= 2
    ai = AIRegions.from_bytes(node.store.regions(job.id) or b"")
    assert [r.number for r in ai.regions] == [f.number for f in job.result.findings]
    assert [r.tracking_uid for r in ai.regions] == [f.tracking_uid for f in job.result.findings]
    assert [int(r.mask.sum()) for r in ai.regions] == [f.voxels for f in job.result.findings]
    time.sleep(1.0)
    shutil.rmtree(job.result.output_dir)
    # the radiologist deletes finding 1 (the largest) and keeps the others unchanged
    sources = sorted((dcmread(p) for p in files), key=lambda d: float(d.ImagePositionPatient[2]))
    kept = np.zeros(ai.grid.shape, dtype=bool)
    for r in ai.regions[1:]:
        r.paint(kept)
    path = tmp_path / "deleted_first.dcm"
    copy.deepcopy(_final_seg(sources, kept)).save_as(path)
    _send(node, [path])
    wait_for(lambda: node.verdicts.rows(), 60, what="the verdict")
    v = node.verdicts.rows()[0]
    outcomes = {f["finding"]: f["outcome"] for f in node.verdicts.findings(v["id"])}
    assert outcomes == {f.number: "rejected" if f.number == 1 else "accepted" for f in job.result.findings}

    # the same SEG shifted by 20 mm: not judged, and said where an operator looks (API, dashboard, audit trail)
    shifted = _final_seg(sources, kept)
    for item in shifted.PerFrameFunctionalGroupsSequence:
        pos = item.PlanePositionSequence[0]
        pos.ImagePositionPatient = [*pos.ImagePositionPatient[:2], float(pos.ImagePositionPatient[2]) + 20.0]
    shifted.SeriesInstanceUID = generate_uid()
    path = tmp_path / "shifted.dcm"
    shifted.save_as(path)
    _send(node, [path])
    wait_for(lambda: node.verdicts.not_judged(), 60, what="the shifted SEG to be examined")
    assert len(node.verdicts.rows()) == 1  # never accepted
    from fastapi.testclient import TestClient

    from node.web.app import create_app

    client = TestClient(create_app(node))
    listed = client.get("/api/verdicts/not-judged").json()
    assert len(listed) == 1 and listed[0]["object_uid"] == str(shifted.SOPInstanceUID)
    assert "lies 20.0 mm from the source image it references" in listed[0]["reason"]
    page = client.get("/").text
    assert "Objects not judged" in page and "lies 20.0 mm" in page
    kinds = [r["kind"] for r in node.store.db.query("SELECT kind FROM events")]
    assert kinds.count("verdict.not_judged") == 1

def test_evidence_is_merged_per_finding_not_latest_wins() -> None:
    def rows(*outcomes: str, added: int = 0) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"finding": n, "outcome": o, "dice": 0.5 if o == "edited" else None}
                                     for n, o in enumerate(outcomes, start=1)]
        return out + [{"finding": None, "outcome": "added", "dice": None}] * added

    def outcome(*verdicts: tuple[str, list[dict[str, Any]]]) -> tuple[list[str], int]:
        m = merge_evidence(list(verdicts))
        return [m["findings"][n]["outcome"] for n in sorted(m["findings"])], m["added"]

    seg = ("seg", rows("accepted", "edited", "rejected", added=1))
    # the SEG saved, then the AI's SR signed as it is (every tracking UID kept): the edit stands
    assert outcome(seg, ("sr", rows("accepted", "accepted", "accepted"))) == (
        ["accepted", "edited", "rejected"], 1)
    # signed first, then the SEG: the same
    assert outcome(("sr", rows("accepted", "accepted", "accepted")), seg) == (["accepted", "edited", "rejected"], 1)
    # an SR signed without finding 1 rejects it, whatever the SEG said
    assert outcome(seg, ("sr", rows("rejected", "accepted", "accepted"))) == (["rejected", "edited", "rejected"], 1)
    # a later SEG replaces an earlier one (the radiologist corrected the correction)
    assert outcome(seg, ("seg", rows("accepted", "accepted", "accepted"))) == (["accepted"] * 3, 1)
    # without a SEG the latest statement counts
    assert outcome(("http", rows("accepted", "rejected")), ("sr", rows("accepted", "accepted"))) == (
        ["accepted", "accepted"], 0)


def test_an_explicit_assessment_sr_judges_each_finding(make_node: Callable[..., Any], small_series: Path,
                                                       tmp_path: Path) -> None:
    """An assessment of the AI result (IHE AI Result Assessment): per finding by its tracking UID, or the whole."""
    from node.devtools.sink import StoreSink
    from tests.radiologist import assessment_sr

    sink = StoreSink(tmp_path / "pacs", ae_title="SINK")
    try:
        node = make_node(sink_port=sink.port, stable=1.0)
        _send(node, sorted(small_series.glob("*.dcm")))
        wait_for(lambda: node.store.list_jobs(state=JobState.DONE), 120, what="the job")
        job = node.store.list_jobs()[0]
        assert job.result is not None and job.result.roi_count >= 3
        found = job.result.findings
        sr = Path(job.result.files["sr"])
        out = tmp_path / "assess"
        out.mkdir()
        said = {found[0].tracking_uid: "rejected", found[1].tracking_uid: "edited",
                **{f.tracking_uid: "accepted" for f in found[2:]}}
        _send(node, [assessment_sr(sr, out, said)])
        wait_for(lambda: node.verdicts.rows(), 60, what="the assessment's verdict")
        v = node.verdicts.rows()[0]
        assert v["source"] == "assessment" and v["job_id"] == job.id
        outcomes = {f["finding"]: f["outcome"] for f in node.verdicts.findings(v["id"])}
        assert outcomes == {f.number: said[f.tracking_uid] for f in found}
        # the whole result rejected in one statement
        lines = node.verdict_intake.examine_file(assessment_sr(sr, out, {None: "rejected"}, name="whole.dcm"))
        assert f"0 accepted, 0 edited, {len(found)} rejected, 0 added" in lines[0], lines
    finally:
        sink.stop()
