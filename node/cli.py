"""The ``preannot`` command line.

Every command accepts ``--config node.toml`` (or the ``PREANNOT_CONFIG`` variable); without it the
built-in defaults apply, overridden by ``PREANNOT_*`` variables. Exit codes: 0 success, 1 failure of
the operation, 2 invalid input or configuration.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from node import __version__
from node.config import NodeConfig, load_config
from node.errors import PreannotError

if TYPE_CHECKING:
    from node.service import Stores

app = typer.Typer(help="preannot: imaging pre-annotation DICOM node.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
config_app = typer.Typer(help="Check or create the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
audit_app = typer.Typer(help="Export and verify the audit trail.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")

logger = logging.getLogger("node.cli")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", envvar="PREANNOT_CONFIG",
                                                help="TOML configuration file")]


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    # pynetdicom logs every PDU at INFO/DEBUG; keep it to warnings unless debugging
    if level.upper() != "DEBUG":
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        logging.getLogger("highdicom").setLevel(logging.WARNING)


def _load(config: Path | None) -> NodeConfig:
    try:
        return load_config(config)
    except PreannotError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def _die(exc: Exception, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(code)


def _stores(config: Path | None) -> Stores:
    """The node's state owners, for read and act commands: never creates a data folder."""
    from node.service import open_stores

    try:
        return open_stores(_load(config))
    except PreannotError as exc:
        raise _die(exc, 2) from exc


def _version(value: bool) -> None:
    if value:
        typer.echo(f"preannot {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR")] = "INFO",
          version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit")] = False) -> None:
    _setup_logging(log_level)


@app.command()
def serve(config: ConfigOpt = None) -> None:
    """Run the node: DICOM listener, series assembly, workers, delivery (and the HTTP API when enabled)."""
    from node.service import Node

    cfg = _load(config)
    try:
        node = Node(cfg)
        node.start()
    except PreannotError as exc:
        raise _die(exc, 2) from exc
    done = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        logger.info("signal %d: stopping", signum)
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    typer.echo(f"preannot {__version__} listening as {cfg.node.ae_title} on port {node.listener.port}; "
               f"data in {cfg.data_dir}", err=True)
    while not done.wait(1.0):
        pass
    node.stop()


@app.command()
def run(
    input_dir: Annotated[Path, typer.Argument(help="Folder holding one image series")],
    output_dir: Annotated[Path, typer.Argument(help="Where SEG, SR, preview and result.json go")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model (folder name under the models folder)")],
    config: ConfigOpt = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda (default: from config)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON")] = False,
) -> None:
    """Process one series offline (no network): the whole pipeline, with a per-stage summary."""
    from node.inference.registry import Registry
    from node.inference.runner import BundleRunner, configure_torch
    from node.net.scu import iter_dicom_files
    from node.outputs.equipment import Provenance, device_uid
    from node.processing.pipeline import ModelContext, PipelineOptions, process_series

    cfg = _load(config)
    files = iter_dicom_files(input_dir)
    if not files:
        raise _die(PreannotError(f"no DICOM files under {input_dir}"), 2)
    configure_torch(cfg.models)
    try:
        info = Registry(cfg.models.dir).get(model)
        t = time.perf_counter()
        runner = BundleRunner(info, device=device or cfg.models.device, amp=cfg.models.amp)
        load_s = time.perf_counter() - t
        stages: list[str] = []

        def on_stage(name: str) -> None:
            stages.append(name)
            typer.echo(f"  [{len(stages)}] {name} ...", err=True)

        typer.echo(f"processing {len(files)} file(s) from {input_dir} with {info.name} {info.version}", err=True)
        provenance = Provenance.for_node(info, cfg.outputs,
                                         device_uid=device_uid(cfg.outputs, cfg.data_dir, create=False))
        out = process_series(files, ModelContext(info, runner, provenance), output_dir,
                             options=PipelineOptions(outputs=cfg.outputs, timeout_seconds=cfg.jobs.timeout_seconds),
                             on_stage=on_stage)
    except PreannotError as exc:
        raise _die(exc, 1) from exc
    if as_json:
        typer.echo(json.dumps({**out.to_dict(), "model_load_s": round(load_s, 3)}, indent=2))
        return
    typer.echo(f"\n{out.summary['roi_count']} region(s) of interest in series {out.summary['series_uid']}")
    for r in out.rois:
        c = ", ".join(f"{v:.1f}" for v in r.centroid_mm)
        typer.echo(f"  ROI {r.index}: {r.label_name}, {r.volume_mm3:.0f} mm3, long axis {r.diameter_inplane_mm:.1f} mm, "
                   f"3D diameter {r.diameter_3d_mm:.1f} mm, mean {r.mean:.0f}, centre ({c}) mm, slice {r.key_slice + 1}")
    typer.echo("files: " + ", ".join(f"{k}={v}" for k, v in out.files.items()))
    typer.echo("timings (s): model load " + f"{load_s:.2f}, " +
               ", ".join(f"{k} {v:.2f}" for k, v in out.timings.items()))


def _parse_peer(peer: str) -> tuple[str, str, int]:
    try:
        ae, hostport = peer.split("@", 1)
        host, port = hostport.rsplit(":", 1)
        return ae, host, int(port)
    except ValueError as exc:
        raise typer.BadParameter(f"{peer!r}: expected AE@host:port, e.g. PREANNOT@127.0.0.1:11112") from exc


@app.command()
def send(
    path: Annotated[Path, typer.Argument(help="A DICOM file or a folder (searched recursively)")],
    to: Annotated[str, typer.Option("--to", help="Destination as AE@host:port")],
    calling_ae: Annotated[str, typer.Option(help="Our AE title")] = "PREANNOT",
    batch: Annotated[int, typer.Option(help="Files per association")] = 500,
    tls: Annotated[bool, typer.Option(help="Use DICOM TLS")] = False,
    tls_ca: Annotated[Path | None, typer.Option(help="CA certificate to verify the peer")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="Our client certificate (mutual TLS)")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Our client key (mutual TLS)")] = None,
) -> None:
    """Push DICOM files to a peer by C-STORE (handy for tests and admins)."""
    from node.net.scu import iter_dicom_files, send_files
    from node.net.tls import client_context

    ae, host, port = _parse_peer(to)
    files = [str(p) for p in iter_dicom_files(path)]
    if not files:
        raise _die(PreannotError(f"no DICOM files under {path}"), 2)
    ctx = client_context(ca=tls_ca, cert=tls_cert, key=tls_key) if tls else None
    ok = failed = 0
    with typer.progressbar(length=len(files), label=f"sending to {ae}@{host}:{port}", file=sys.stderr) as bar:
        for i in range(0, len(files), batch):
            outcomes = send_files(files[i:i + batch], ae_title=ae, host=host, port=port, calling_ae=calling_ae,
                                  ssl_context=ctx)
            for o in outcomes:
                if o.ok:
                    ok += 1
                else:
                    failed += 1
                    typer.echo(f"  {o.path}: {o.error}", err=True)
            bar.update(len(outcomes))
    typer.echo(f"sent {ok} of {len(files)} file(s); {failed} failed")
    if failed:
        raise typer.Exit(1)


@app.command()
def fetch(study: Annotated[str, typer.Option("--study", help="Study Instance UID")],
          source: Annotated[str, typer.Option("--from", help="A configured destination (dicom or dicomweb)")],
          config: ConfigOpt = None) -> None:
    """Ask a PACS for a past study (C-MOVE to this node, or WADO-RS) so the running node processes it."""
    from node.net.fetch import fetch_study

    cfg = _load(config)
    try:
        result = fetch_study(cfg, source, study)
    except PreannotError as exc:
        raise _die(exc, 1) from exc
    typer.echo(f"{result.how}: {result.completed} instance(s) sent, {result.failed} failed, {result.warning} warning(s)")
    if result.failed:
        raise typer.Exit(1)
    if result.completed == 0:
        raise _die(PreannotError(f"{source} sent no instance of study {study} (unknown to it, or not "
                                 "retrievable by this node)"), 1)


@app.command()
def echo(peer: Annotated[str, typer.Argument(help="AE@host:port")],
         calling_ae: Annotated[str, typer.Option(help="Our AE title")] = "PREANNOT") -> None:
    """C-ECHO a DICOM peer."""
    from node.net.scu import echo as _echo

    ae, host, port = _parse_peer(peer)
    if _echo(ae_title=ae, host=host, port=port, calling_ae=calling_ae):
        typer.echo(f"{ae}@{host}:{port} answered C-ECHO")
    else:
        raise _die(PreannotError(f"{ae}@{host}:{port} did not answer C-ECHO"), 1)


@app.command()
def status(config: ConfigOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="JSON output")] = False) -> None:
    """Jobs, series and outbox counts, and the latest jobs."""
    stores = _stores(config)
    store = stores.jobs
    series = {k: v for k, v in stores.series.counts().items() if v}
    data: dict[str, Any] = {"series": series, "jobs": store.counts(), "outbox": store.outbox_counts(),
            "latest_jobs": [{"id": j.id, "state": j.state.value, "model": j.model, "series_uid": j.series_uid,
                             "attempts": j.attempts, "error": j.error} for j in store.list_jobs(limit=10)]}
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    typer.echo("series: " + (", ".join(f"{k} {v}" for k, v in sorted(series.items())) or "none"))
    typer.echo("jobs:   " + ", ".join(f"{k} {v}" for k, v in data["jobs"].items()))
    typer.echo("outbox: " + ", ".join(f"{k} {v}" for k, v in data["outbox"].items()))
    for j in data["latest_jobs"]:
        err = f"  ({j['error']})" if j["error"] else ""
        typer.echo(f"  job {j['id']:>5} {j['state']:<9} {j['model']:<20} {j['series_uid']}{err}")


@app.command()
def jobs(config: ConfigOpt = None,
         state: Annotated[str | None, typer.Option(help="queued, running, done, failed, dead, cancelled")] = None,
         model: Annotated[str | None, typer.Option(help="Only this model")] = None,
         limit: Annotated[int, typer.Option(help="At most this many")] = 50) -> None:
    """List jobs, newest first."""
    store = _stores(config).jobs
    try:
        rows = store.list_jobs(state=state, model=model, limit=limit)
    except ValueError as exc:
        raise _die(PreannotError(f"unknown state {state!r}"), 2) from exc
    for j in rows:
        rois = (j.result or {}).get("summary", {}).get("roi_count", "")
        typer.echo(f"{j.id:>6} {j.state.value:<9} {j.model:<20} attempts {j.attempts}/{j.max_attempts} "
                   f"rois {rois!s:<3} {j.series_uid}" + (f"  error: {j.error}" if j.error else ""))


def _job_action(config: Path | None, action: str, job_id: int) -> Any:
    """Apply a JobStore action as the operator "cli"; a refused action exits 1 with the reason."""
    store = _stores(config).jobs
    try:
        return getattr(store, action)(job_id, actor="cli")
    except PreannotError as exc:
        raise _die(exc, 1) from exc


@app.command()
def retry(job_id: Annotated[int, typer.Argument(help="Job id")], config: ConfigOpt = None) -> None:
    """Queue a failed, dead or cancelled job again (a done job is refused: reprocess its series)."""
    _job_action(config, "retry", job_id)
    typer.echo(f"job {job_id} queued again")


@app.command()
def cancel(job_id: Annotated[int, typer.Argument(help="Job id")], config: ConfigOpt = None) -> None:
    """Cancel a queued or failed job."""
    _job_action(config, "cancel", job_id)
    typer.echo(f"job {job_id} cancelled")


@app.command()
def resend(job_id: Annotated[int, typer.Argument(help="Job id")], config: ConfigOpt = None) -> None:
    """Queue a job's result objects for delivery again."""
    n = _job_action(config, "resend", job_id)
    typer.echo(f"{n} object(s) of job {job_id} queued for delivery again")


@app.command()
def models(config: ConfigOpt = None) -> None:
    """List the models in the models folder with version and weights SHA-256; broken bundles with the reason."""
    from node.inference.registry import Registry

    cfg = _load(config)
    reg = Registry(cfg.models.dir)
    for name, m in reg.models.items():
        labels = ", ".join(f"{lab.value}={lab.name}" for lab in m.card.labels)
        typer.echo(f"{name}  version {m.version}  sha256 {m.sha256}  labels: {labels}  ({m.weights.name})")
    for name, reason in reg.broken.items():
        typer.echo(f"{name}  BROKEN: {reason}")
    if not reg.models:
        typer.echo(f"no usable model in {cfg.models.dir}", err=True)
        raise typer.Exit(1)


@config_app.command("check")
def config_check(config: ConfigOpt = None) -> None:
    """Validate the configuration, the routes and the models they name."""
    from node.errors import ConfigError
    from node.inference.registry import Registry
    from node.schedule.routing import validate_route

    cfg = _load(config)
    try:
        for r in cfg.routes:
            validate_route(r)
    except ConfigError as exc:
        raise _die(exc, 2) from exc
    reg = Registry(cfg.models.dir)
    problems = [f"routes[{r.name}] names model {m!r}: " + reg.broken.get(m, f"not found in {cfg.models.dir}")
                for r in cfg.routes for m in r.models if m not in reg.models]
    for p in problems:
        typer.echo(f"error: {p}", err=True)
    if problems:
        raise typer.Exit(2)
    typer.echo(f"configuration {cfg.source} is valid (version {cfg.version()}): {len(cfg.routes)} route(s), "
               f"{len(cfg.destinations)} destination(s), models {sorted(reg.models)}")


@config_app.command("init")
def config_init(output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the file here "
                                                            "(its folder is created) instead of printing it")] = None,
                force: Annotated[bool, typer.Option(help="Overwrite an existing --output file")] = False) -> None:
    """Print (or write) a commented default configuration."""
    from node.config_template import render_template

    text = render_template()
    if output is None:
        typer.echo(text)
        return
    if output.exists() and not force:
        raise _die(PreannotError(f"{output} exists; use --force to overwrite it"), 1)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text + "\n")
    typer.echo(f"configuration written to {output}; edit it, then: preannot config check --config {output}")


@app.command()
def evaluate(
    dataset: Annotated[Path, typer.Argument(help="Folder of image series with reference SEG (or NIfTI) beside them")],
    out: Annotated[Path, typer.Option("--out", help="Report folder (report.html, metrics.csv, summary.json)")],
    model: Annotated[list[str], typer.Option("--model", "-m", help="Model to evaluate; repeat to compare")],
    config: ConfigOpt = None,
    tolerance_mm: Annotated[float, typer.Option(help="Surface Dice tolerance (mm)")] = 2.0,
    detection: Annotated[str, typer.Option(help="Lesion matching: overlap or centroid")] = "overlap",
    centroid_mm: Annotated[float, typer.Option(help="Centroid rule distance (mm)")] = 5.0,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs")] = 2000,
) -> None:
    """Evaluate models on labelled data: overlap, surface distances, detection, FROC, volumes, speed."""
    from node.evaluate.run import EvalOptions
    from node.evaluate.run import evaluate as run_evaluation
    from node.inference.registry import Registry

    cfg = _load(config)
    if detection not in ("overlap", "centroid"):
        raise _die(PreannotError(f"--detection must be overlap or centroid (found {detection!r})"), 2)
    try:
        reg = Registry(cfg.models.dir)
        infos = [reg.get(m) for m in model]
        summary = run_evaluation(dataset, infos, out, options=EvalOptions(
            tolerance_mm=tolerance_mm, detection=detection, centroid_mm=centroid_mm, bootstrap=bootstrap),
            progress=lambda msg: typer.echo(msg, err=True))
    except PreannotError as exc:
        raise _die(exc, 1) from exc
    for name, m in summary["models"].items():
        for lab, entry in m["labels"].items():
            d = entry["voxel"]["dice"]
            line = f"{name} / {lab}: Dice {d['mean']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]"
            det = entry.get("detection")
            if det:
                line += (f", sensitivity {det['sensitivity']:.3f} ({det['detected']}/{det['lesions']}), "
                         f"FP/scan {det['fp_per_scan']:.2f}")
            typer.echo(line)
    for c in summary["comparisons"]:
        typer.echo(f"{c['b']} - {c['a']} ({c['label']}, {c['metric']}): {c['mean_difference_b_minus_a']:+.3f} "
                   f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}], Wilcoxon p = {c['wilcoxon_p']:.4f}")
    if summary["problems"]:
        typer.echo(f"{len(summary['problems'])} problem(s) in the dataset, listed in the report", err=True)
    typer.echo(f"report: {out / 'report.html'}")


def _when(value: str | None) -> float | None:
    """ISO date/time (2026-11-22, 2026-11-22T08:00) or epoch seconds -> epoch seconds."""
    import datetime as dt

    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return dt.datetime.fromisoformat(value).timestamp()
    except ValueError as exc:
        raise typer.BadParameter(f"{value!r}: expected an ISO date/time such as 2026-11-22T08:00") from exc


@audit_app.command("export")
def audit_export(config: ConfigOpt = None,
                 since: Annotated[str | None, typer.Option(help="From (ISO date/time or epoch s)")] = None,
                 until: Annotated[str | None, typer.Option(help="Until (ISO date/time or epoch s)")] = None,
                 out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout")] = None) -> None:
    """Export audit records as JSON lines, oldest first."""
    from node.store.audit import export

    db = _stores(config).db
    lines = (json.dumps(r, sort_keys=True) for r in export(db, since=_when(since), until=_when(until)))
    if out is None:
        for line in lines:
            typer.echo(line)
    else:
        n = 0
        with out.open("w") as f:
            for line in lines:
                f.write(line + "\n")
                n += 1
        typer.echo(f"{n} record(s) written to {out}", err=True)


@audit_app.command("verify")
def audit_verify(config: ConfigOpt = None) -> None:
    """Check the hash chain of the audit trail; exit 1 at the first modified, missing or reordered record."""
    from node.store.audit import verify

    result = verify(_stores(config).db)
    if result.ok:
        typer.echo(f"audit trail intact: {result.records} record(s), hash chain verified")
        return
    typer.echo(f"audit trail BROKEN at record {result.first_bad_id}: {result.reason}", err=True)
    raise typer.Exit(1)


@app.command()
def purge(config: ConfigOpt = None,
          dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would be removed")] = False) -> None:
    """Remove spooled instances and result files past their retention (never while a job needs them)."""
    from node.retention import execute_purge, plan_purge
    cfg = _load(config)
    stores = _stores(config)
    if dry_run:
        plan = plan_purge(stores.series, stores.jobs, cfg)
        typer.echo(f"would remove {plan.summary()}")
        for uid in plan.series:
            typer.echo(f"  series {uid}")
        for job_id, d in plan.job_dirs.items():
            typer.echo(f"  job {job_id} outputs {d}")
        return
    plan = execute_purge(stores.series, stores.jobs, cfg, actor="cli")
    typer.echo(f"removed {plan.summary()}")


def _synth() -> None:
    from node.devtools.synth.cli import app as synth_app

    app.add_typer(synth_app, name="synth")


_synth()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
