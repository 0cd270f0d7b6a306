"""The Ray backend on a local Ray cluster started by the tests (`ray start --head`, as on a head server):
results identical to the local backend, an actor killed mid-job, the node restarted while actors run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from node.devtools.sink import StoreSink
from node.net.scu import send_files
from tests.conftest import free_port, node_toml, wait_for

RAY = Path(sys.executable).parent / "ray"
pytestmark = [pytest.mark.integration, pytest.mark.skipif(not RAY.is_file(), reason="ray is not installed")]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([str(RAY), "start", "--head", f"--port={port}", "--num-cpus=8", "--num-gpus=0",
                    "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"],
                   check=True, env=env, timeout=180, capture_output=True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], env=env, timeout=120, capture_output=True)
        shutil.rmtree(temp, ignore_errors=True)


def _start(tmp: Path, sink_port: int, extra: str = "") -> tuple[Any, Path]:
    from node.config import load_config
    from node.service import Node

    tmp.mkdir(parents=True, exist_ok=True)
    cfg = tmp / "node.toml"
    if not cfg.exists():
        cfg.write_text(node_toml(tmp / "data", free_port(), sink_port=sink_port, stable=1.0, extra=extra))
    node = Node(load_config(cfg))
    node.start()
    return node, cfg


def _ray(address: str) -> str:
    return f'[compute]\nbackend = "ray"\naddress = "{address}"\nactors = 2\nthreads_per_actor = 1\n'


def _send(node: Any, series: Path) -> None:
    assert all(o.ok for o in send_files([str(p) for p in sorted(series.glob("*.dcm"))], ae_title="PREANNOT",
                                        host="127.0.0.1", port=node.listener.port, calling_ae="TESTSCU"))


def _outcome(node: Any) -> dict[str, Any]:
    job = wait_for(lambda: node.store.list_jobs(state="done"), 180, what="the job done")[0]
    assert job.result is not None
    rois = [{k: getattr(r, k) for k in ("label", "voxels", "volume_mm3", "bbox", "key_slice", "confidence")}
            for r in job.result.findings]
    seg = dcmread(job.result.files["seg"])
    return {"job": job, "rois": rois, "seg_pixels": seg.PixelData}


def test_results_identical_to_the_local_backend(tmp_path: Path, small_series: Path, ray_cluster: str) -> None:
    sink = StoreSink(tmp_path / "pacs", ae_title="SINK")
    try:
        local, _ = _start(tmp_path / "local", sink.port)
        try:
            _send(local, small_series)
            a = _outcome(local)
        finally:
            local.stop()
        on_ray, _ = _start(tmp_path / "ray", sink.port, _ray(ray_cluster))
        try:
            _send(on_ray, small_series)
            b = _outcome(on_ray)
            assert on_ray.pool is not None
            caps = [c for c in on_ray.pool.capacities() if c is not None]
            assert len(caps) == 2 and sum(c["jobs_run"] for c in caps) >= 1  # it ran on an actor
        finally:
            on_ray.stop()
        assert a["rois"] and a["rois"] == b["rois"]
        assert a["seg_pixels"] == b["seg_pixels"]
    finally:
        sink.stop()


@pytest.mark.slow  # minutes of CPU: `make test-slow` (CI runs it too)
def test_published_bundle_confidence_comes_back_for_labelled_voxels_identical(
        tmp_path: Path, small_series: Path, ray_cluster: str) -> None:
    """A bundle with a softmax (the Zoo's spleen): its confidence travels for the labelled voxels only,
    and every ROI's confidence is the local backend's."""
    from node.devtools import zoo

    published = Path(__file__).resolve().parents[2] / "shared" / "data" / "model_zoo"
    if not (published / "spleen_ct_segmentation").is_dir():
        pytest.skip(f"{published} is not here (the shared data folder)")
    models = tmp_path / "models"
    card = zoo.SPLEEN_CARD + '\n[bundle]\noverrides = { "inferer#roi_size" = [32, 32, 32], "inferer#sw_batch_size" = 1 }\n'
    zoo.install_segmenter(published, "spleen_ct_segmentation", models, card)
    sink = StoreSink(tmp_path / "pacs", ae_title="SINK")

    def run(name: str, extra: str) -> list[dict[str, Any]]:
        tmp = tmp_path / name
        tmp.mkdir()
        text = node_toml(tmp / "data", free_port(), sink_port=sink.port, stable=1.0, extra=extra, models=models)
        (tmp / "node.toml").write_text(text.replace('models = ["lesion-ct-demo"]', 'models = ["spleen_ct_segmentation"]'))
        node, _ = _start(tmp, sink.port)
        try:
            _send(node, small_series)
            rois = list(_outcome(node)["job"].result.findings)
            if node.pool is not None:  # this test's own (detached) actors: not left holding the cluster's CPUs
                import ray

                for a in node.pool.actors:
                    ray.kill(a, no_restart=True)
            return rois
        finally:
            node.stop()

    try:
        local = run("local", "")
        on_ray = run("ray", _ray(ray_cluster) + 'namespace = "preannot-spleen"\n')
        assert local and all(r.confidence is not None for r in local)
        assert [(r.label, r.voxels, r.confidence) for r in on_ray] == [(r.label, r.voxels, r.confidence) for r in local]
    finally:
        sink.stop()


def _running_actor(node: Any) -> int:
    def busy() -> int | None:
        return next(iter(node.pool.busy), None) if node.pool is not None else None

    return int(wait_for(lambda: busy() is not None and str(busy()), 120, interval=0.02, what="a job on an actor"))


def test_actor_killed_mid_job_the_job_completes_once_elsewhere(tmp_path: Path, small_series: Path,
                                                               ray_cluster: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    monkeypatch.setenv("PREANNOT_MODELS__PRELOAD", "false")  # the actor loads the model inside the job: time to kill
    sink = StoreSink(tmp_path / "pacs", ae_title="SINK")
    node, _ = _start(tmp_path / "n", sink.port, _ray(ray_cluster) + 'namespace = "preannot-kill"\n')  # cold actors
    try:
        # the actors' processes, asked while they are idle (an actor answers one call at a time)
        pids = [ray.get(a.pid.remote(), timeout=120) for a in node.pool.actors]
        _send(node, small_series)
        i = _running_actor(node)
        pid = pids[i]
        os.kill(pid, signal.SIGKILL)  # the actor's process, as if its server had gone
        job = _outcome(node)["job"]
        events = [e["kind"] for e in node.store.db.query("SELECT kind FROM events WHERE job_id = ?", (job.id,))]
        assert "job.requeued" in events and events.count("job.done") == 1
        assert job.attempts == 1  # the lost attempt was not counted
        n = len([k for k in job.result.files if k != "preview"])
        wait_for(lambda: len(sink.received) == n, 60, what="the results at the PACS")
        time.sleep(1)
        assert set(sink.received.values()) == {1}  # each object once
        assert ray.get(node.pool.actors[i].pid.remote(), timeout=120) != pid  # Ray restarted the actor
        for a in node.pool.actors:  # this test's own (detached) actors: not left holding the cluster's CPUs
            ray.kill(a, no_restart=True)
    finally:
        node.stop()
        sink.stop()


def test_node_restarted_while_actors_run_loses_and_duplicates_nothing(tmp_path: Path, small_series: Path,
                                                                      ray_cluster: str) -> None:
    sink = StoreSink(tmp_path / "pacs", ae_title="SINK")
    node, _cfg = _start(tmp_path / "n", sink.port, _ray(ray_cluster))
    try:
        _send(node, small_series)
        _running_actor(node)
        node.stop(timeout=0)  # the coordinator goes away mid-job; the actors (on the cluster) stay
        node, _ = _start(tmp_path / "n", sink.port)
        job = _outcome(node)["job"]
        assert len(node.store.list_jobs()) == 1
        n = len([k for k in job.result.files if k != "preview"])
        wait_for(lambda: len(sink.received) == n, 60, what="the results at the PACS")
        time.sleep(1)
        assert set(sink.received.values()) == {1}
        assert node.pool is not None and any(c and c["loaded"] for c in node.pool.capacities())  # still warm
    finally:
        node.stop()
        sink.stop()


def test_a_model_larger_than_every_actor_is_not_placed(tmp_path: Path, small_series: Path, ray_cluster: str) -> None:
    """The pool knows each actor's memory: a model whose card says it needs more than any actor has fails
    its job with that reason instead of being loaded where it cannot run."""
    models = tmp_path / "models"
    shutil.copytree(Path(__file__).resolve().parents[1] / "models" / "lesion-ct-demo", models / "lesion-ct-demo")
    card = models / "lesion-ct-demo" / "model_card.toml"
    text = card.read_text()
    card.write_text(text.replace("[model]\n", "[model]\nmemory_mb = 100000000\n", 1))
    sink = StoreSink(tmp_path / "pacs", ae_title="SINK")
    extra = _ray(ray_cluster).replace("actors = 2", "actors = 1") + 'namespace = "preannot-fit"\n'  # its own actors
    tmp = tmp_path / "n"
    tmp.mkdir()
    (tmp / "node.toml").write_text(node_toml(tmp / "data", free_port(), sink_port=sink.port, stable=1.0, extra=extra,
                                             models=models))
    node, _ = _start(tmp, sink.port)
    try:
        _send(node, small_series)
        job = wait_for(lambda: [j for j in node.store.list_jobs() if j.error], 120, what="the job refused")[0]
        assert "needs 100000000 MB" in (job.error or "") and "largest actor" in (job.error or "")
        caps = node.pool.capacities()
        assert caps[0] is not None and caps[0]["loaded"] == []  # never loaded
        import ray

        ray.kill(node.pool.actors[0], no_restart=True)
    finally:
        node.stop()
        sink.stop()


def _copy_series(src: Path, dst: Path) -> Path:
    """The series again under new Series and SOP Instance UIDs (another series of the same study)."""
    from pydicom.uid import generate_uid

    dst.mkdir(parents=True)
    series_uid = generate_uid()
    for p in sorted(src.glob("*.dcm")):
        ds = dcmread(p)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(dst / p.name)
    return dst


def test_a_stat_job_is_not_stuck_behind_routine_jobs_leased_ahead(tmp_path: Path, small_series: Path,
                                                                  ray_cluster: str) -> None:
    """Two job threads per actor keep the actor busy while the node writes results; a job is leased only
    when an actor is free for it, so a STAT study queued after routine ones still runs next."""
    sink = StoreSink(tmp_path / "pacs", ae_title="SINK")
    extra = (_ray(ray_cluster).replace("actors = 2", "actors = 1") + 'jobs_per_actor = 2\nnamespace = "preannot-slots"\n'
             '\n[[routes]]\nname = "stat"\ncalled_ae = ["STAT"]\nmatch = { Modality = "CT" }\n'
             'models = ["lesion-ct-demo"]\nsend_to = ["pacs"]\npriority = "stat"\n')
    tmp = tmp_path / "n"
    tmp.mkdir()
    (tmp / "node.toml").write_text(node_toml(tmp / "data", free_port(), sink_port=sink.port, stable=1.0, extra=extra,
                                             route_extra='called_ae = ["PREANNOT"]'))
    node, _ = _start(tmp, sink.port)
    try:
        assert node.pool is not None and len(node.workers) == 2
        model = node.registry.get("lesion-ct-demo")
        assert node.pool.claim_slot(timeout=30)  # the test takes the only actor, as a long job would
        held = node.pool.acquire(model, job_id=0)
        routine = [_copy_series(small_series, tmp_path / f"r{n}") for n in range(3)]
        for series in routine:
            _send(node, series)
        assert all(o.ok for o in send_files([str(p) for p in sorted(small_series.glob("*.dcm"))], ae_title="STAT",
                                            host="127.0.0.1", port=node.listener.port, calling_ae="TESTSCU"))
        wait_for(lambda: node.store.counts()["queued"] == 4, 60, what="four jobs queued")
        time.sleep(1.0)  # the job threads had time to lease: they must not have (no actor is free)
        assert node.store.counts()["running"] == 0
        node.pool.release(held)
        node.pool.drop_slot()
        wait_for(lambda: node.store.counts()["done"] == 4, 180, what="the four jobs done")
        jobs = sorted(node.store.list_jobs(), key=lambda j: j.started_at or 0)
        assert [j.priority for j in jobs] == ["stat", "routine", "routine", "routine"]
        import ray

        ray.kill(node.pool.actors[0], no_restart=True)
    finally:
        node.stop()
        sink.stop()
