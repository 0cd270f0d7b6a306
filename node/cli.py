"""The ``preannot`` command line.

Every command accepts ``--config node.toml`` (or the ``PREANNOT_CONFIG`` variable); without it the
built-in defaults apply, overridden by ``PREANNOT_*`` variables. Exit codes: 0 success, 1 failure of
the operation, 2 invalid input or configuration.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from node import __version__
from node.cli_admin import register as register_admin
from node.cli_common import ConfigOpt, RouteOpt, die, load_or_exit, route_for, stores_or_exit
from node.errors import PreannotError

if TYPE_CHECKING:
    pass

app = typer.Typer(help="preannot: imaging pre-annotation DICOM node.", no_args_is_help=True,
                  pretty_exceptions_enable=False)

logger = logging.getLogger("node.cli")



def _library_warnings_to_log() -> None:
    """Libraries' warnings (pydicom's value checks, highdicom's person names, MONAI's deprecations) go to the log at
    DEBUG, one line per kind (category and place), instead of burying a command's output."""
    seen: set[tuple[str, str, int]] = set()
    log = logging.getLogger("py.warnings")

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        key = (category.__name__, filename, lineno)
        if key in seen:
            return
        seen.add(key)
        log.debug("%s (%s:%d): %s", category.__name__, filename, lineno, str(message).splitlines()[0][:300])

    warnings.showwarning = show


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    _library_warnings_to_log()
    # pynetdicom logs every PDU at INFO/DEBUG; keep it to warnings unless debugging; pydicom repeats its value
    # checks' warnings through its logger
    if level.upper() != "DEBUG":
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        logging.getLogger("highdicom").setLevel(logging.WARNING)
        logging.getLogger("pydicom").setLevel(logging.ERROR)


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

    cfg = load_or_exit(config)
    try:
        node = Node(cfg)
        node.start()
    except PreannotError as exc:
        raise die(exc, 2) from exc
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
    if not node.stop():
        # a job was still inside the model (native threads): it is requeued; end here rather than let the
        # interpreter tear those threads down (which aborts with a C++ message and a non-zero status)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@app.command()
def run(
    paths: Annotated[list[Path], typer.Argument(
        help="INPUT OUTPUT: a series folder, or a scanner/CD/study folder (DICOMDIR is skipped), and where SEG, SR, "
             "preview and result.json go; only OUTPUT when every input is given with --input",
        metavar="[INPUT] OUTPUT")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model (folder name under the models folder)")],
    config: ConfigOpt = None,
    series: Annotated[str | None, typer.Option("--series", help="Process this Series Instance UID only")] = None,
    route: RouteOpt = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda (default: from config)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON")] = False,
    inputs: Annotated[list[str] | None, typer.Option(
        "--input", "-i", help="NAME=SERIES_FOLDER: a study-level model's input, named as in its card's [[inputs]] "
                              "(repeatable)")] = None,
) -> None:
    """Process the series of a folder offline (no network): the whole pipeline, with a per-stage summary.

    The series found are listed; scouts, secondary captures, non-images and series with too few images
    are skipped with the reason, as a node route would. Several eligible series each get a sub-folder.
    The route options (minimum confidence, cap per label, extra outputs) are those the node applies.

    A model that takes several series of a study ([[inputs]] in its card) takes them from INPUT by its
    card's match rules (each input's series is said), or from --input NAME=FOLDER, one per input.
    """
    from node.config import Route
    from node.inference.registry import Registry
    from node.ingest.uids import safe_uid
    from node.processing.offline import discover_series
    from node.processing.pipeline import ModelContext, PipelineOptions, process_series

    cfg = load_or_exit(config)
    if len(paths) not in (1, 2) or (len(paths) == 1 and not inputs):
        raise die(PreannotError("give INPUT and OUTPUT folders, or only OUTPUT with one --input NAME=FOLDER per "
                                "input of a study-level model"), 2)
    output_dir = paths[-1]
    input_dir = paths[0] if len(paths) == 2 else None
    for folder in [p for p in (input_dir,) if p is not None]:
        if not folder.exists():
            raise die(PreannotError(f"{folder}: no such file or folder"), 2)
    try:  # the model first: a wrong name is said before the folder is scanned
        info = Registry(cfg.models.dir).get(model)
    except PreannotError as exc:
        raise die(exc, 2) from exc
    chosen_route = route_for(cfg, model, route)
    if info.card.inputs or inputs:
        _run_study(info, cfg, chosen_route, input_dir, output_dir, inputs or [], device=device, as_json=as_json)
        return
    assert input_dir is not None
    found, left_out = discover_series(input_dir, chosen_route or Route(name="run", models=[model]), card=info.card,
                                      model=model)
    for line in left_out:
        typer.echo(f"  left out {line}", err=True)
    if not found:
        raise die(PreannotError(f"no DICOM series under {input_dir} ({len(left_out)} file(s) left out)"), 2)
    typer.echo(f"{len(found)} series under {input_dir}:", err=True)
    for f in found:
        typer.echo(f"  {f.describe()}" + (f"  -> skipped: {f.skipped}" if f.skipped else ""), err=True)
    if series is not None:
        chosen = [f for f in found if f.series_uid == series]
        if not chosen:
            raise die(PreannotError(f"no series {series} under {input_dir}"), 2)
    else:
        chosen = [f for f in found if f.skipped is None]
        if not chosen:
            raise die(PreannotError("no series can be processed (see the reasons above); name one with --series "
                                     "to force it"), 2)
    options = PipelineOptions.for_route(chosen_route, cfg)
    if chosen_route is not None:
        typer.echo(f"route {chosen_route.name}'s options apply", err=True)
    runner, load_s, provenance = _load_for_run(info, cfg, device)
    results, failures = [], []
    for f in chosen:  # every series; one that fails is said and the others go on
        stages: list[str] = []

        def on_stage(name: str, _stages: list[str] = stages) -> None:
            _stages.append(name)
            typer.echo(f"  [{len(_stages)}] {name} ...", err=True)

        out_dir = output_dir if len(chosen) == 1 else output_dir / safe_uid(f.series_uid)
        typer.echo(f"processing series {f.series_uid} ({len(f.files)} file(s)) with {info.name} {info.version}",
                   err=True)
        try:
            results.append(process_series(f.files, ModelContext(info, runner, provenance), out_dir,
                                          options=options, on_stage=on_stage))
        except PreannotError as exc:
            failures.append((f, exc))
            typer.echo(f"  FAILED: {type(exc).__name__}: {exc}", err=True)
    if as_json:
        docs = [{**out.result.to_dict(), "model_load_s": round(load_s, 3)} for out in results]
        docs += [{"series_uid": f.series_uid, "error": f"{type(err).__name__}: {err}"} for f, err in failures]
        typer.echo(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
    else:
        for out in results:
            _print_result(out, load_s)
    if len(chosen) > 1 or failures:
        skipped = [f for f in found if f.skipped is not None and f not in chosen]
        typer.echo(f"\n{len(results)} of {len(chosen)} series processed, {len(failures)} failed, {len(skipped)} "
                   f"skipped, {len(left_out)} file(s) left out", err=True)
        for f, err in failures:
            typer.echo(f"  failed {f.series_uid}: {err}", err=True)
    if failures:
        raise typer.Exit(1)


def _load_for_run(info: Any, cfg: Any, device: str | None) -> tuple[Any, float, Any]:
    """`preannot run`'s model: torch set up, the runner loaded (its load time), and the provenance its outputs
    carry; a model that cannot be loaded ends the command with the reason."""
    from node.inference.bundle import configure_torch
    from node.inference.kinds import load_runner
    from node.outputs.equipment import Provenance, device_uid

    configure_torch(cfg.models)
    try:
        t = time.perf_counter()
        runner = load_runner(info, device=device or cfg.models.device, amp=cfg.models.amp)
        load_s = time.perf_counter() - t
    except PreannotError as exc:
        raise die(exc, 1) from exc
    return runner, load_s, Provenance.for_node(info, cfg.outputs, device_uid=device_uid(cfg.outputs, cfg.data_dir,
                                                                                        create=False))


def _run_study(info: Any, cfg: Any, chosen_route: Any, input_dir: Path | None, output_dir: Path,
               given: list[str], *, device: str | None, as_json: bool) -> None:
    """``preannot run`` of a study-level model: its inputs from ``--input NAME=FOLDER`` or, by its card's match
    rules, from the series of one study folder; one result on the reference input's series."""
    from node.config import Route
    from node.processing.offline import FoundSeries, assign_inputs, discover_series
    from node.processing.pipeline import ModelContext, PipelineOptions, process_series

    card = info.card
    if not card.inputs:
        raise die(PreannotError(f"model {info.name} takes one series (its card has no [[inputs]]); --input is for "
                                "models that take several series of a study"), 2)
    names = [i.name for i in card.inputs]
    route = chosen_route or Route(name="run", models=[info.name])
    chosen: dict[str, FoundSeries] = {}
    for item in given:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise die(PreannotError(f"--input {item!r}: expected NAME=SERIES_FOLDER"), 2)
        if name not in names:
            raise die(PreannotError(f"model {info.name} has no input {name!r} (its inputs: {', '.join(names)})"), 2)
        path = Path(folder)
        if not path.exists():
            raise die(PreannotError(f"--input {name}: {path}: no such file or folder"), 2)
        found, _left = discover_series(path, route)
        usable = [f for f in found if f.skipped is None] or found
        if not usable:
            raise die(PreannotError(f"--input {name}: no DICOM series under {path}"), 2)
        if len(usable) > 1:
            typer.echo(f"  input {name}: {len(usable)} series under {path}; the one with the most images taken",
                       err=True)
        chosen[name] = usable[0]
    if input_dir is not None:
        found, left_out = discover_series(input_dir, route, card=card, model=info.name)
        for line in left_out:
            typer.echo(f"  left out {line}", err=True)
        typer.echo(f"{len(found)} series under {input_dir}:", err=True)
        for f in found:
            typer.echo(f"  {f.describe()}" + (f"  -> skipped: {f.skipped}" if f.skipped else ""), err=True)
        picked, _missing = assign_inputs(found, card)
        for name, f in picked.items():
            chosen.setdefault(name, f)
    missing = [i for i in card.inputs if i.required and i.name not in chosen]
    for name in names:
        if name in chosen:
            typer.echo(f"input {name} <- series {chosen[name].describe()}", err=True)
    if missing:
        raise die(PreannotError("; ".join(f"no series for input {i.name} of model {info.name} (its card's match: "
                                          f"{i.match or 'none'})" for i in missing)), 2)
    reference = card.reference_input.name
    if reference not in chosen:
        raise die(PreannotError(f"no series for the reference input {reference} of model {info.name}"), 2)
    runner, load_s, provenance = _load_for_run(info, cfg, device)
    stages: list[str] = []

    def on_stage(name: str) -> None:
        stages.append(name)
        typer.echo(f"  [{len(stages)}] {name} ...", err=True)

    typer.echo(f"processing study with {info.name} {info.version}: results on input {reference} "
               f"(series {chosen[reference].series_uid})", err=True)
    try:
        out = process_series(chosen[reference].files, ModelContext(info, runner, provenance), output_dir,
                             options=PipelineOptions.for_route(chosen_route, cfg), on_stage=on_stage,
                             inputs={n: f.files for n, f in chosen.items() if n != reference})
    except PreannotError as exc:
        typer.echo(f"  FAILED: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from exc
    if as_json:
        typer.echo(json.dumps({**out.result.to_dict(), "model_load_s": round(load_s, 3)}, indent=2))
    else:
        _print_result(out, load_s)


def _print_result(out: Any, load_s: float) -> None:
    result = out.result
    typer.echo(f"\n{result.roi_count} region(s) of interest in series {result.series_uid}")
    if result.resampled:
        typer.echo(f"  ({result.resampled['reason']}: the model saw an orthogonal resampling)")
    for c in result.classes:
        probs = ", ".join(f"{k} {v:.2f}" for k, v in c.probabilities.items())
        typer.echo(f"  {c.concept}: {c.value} (probability {c.probability:.2f}; {probs})")
    shown = result.findings[:50]
    for r in shown:
        c = ", ".join(f"{v:.1f}" for v in r.centroid_mm)
        sizes = (f"long axis {r.diameter_inplane_mm:.1f} mm, 3D diameter {r.diameter_3d_mm:.1f} mm"
                 if r.diameter_3d_mm is not None and r.diameter_inplane_mm is not None else "in the SEG only")
        typer.echo(f"  ROI {r.number}: {r.label_name}, {r.volume_mm3:.0f} mm3, {sizes}, mean {r.mean:.0f}, "
                   f"centre ({c}) mm, slice {r.key_slice + 1}")
    if len(result.findings) > len(shown):
        typer.echo(f"  ... and {len(result.findings) - len(shown)} more (result.json lists them all)")
    if result.not_reported:
        typer.echo("  not reported: " + ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in result.not_reported.items()))
    typer.echo("files: " + ", ".join(f"{k}={v}" for k, v in result.files.items()))
    typer.echo("timings (s): model load " + f"{load_s:.2f}, " +
               ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items()))


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
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from node.net.scu import iter_dicom_files, send_files, unsendable
    from node.net.tls import client_context

    ae, host, port = _parse_peer(to)
    if not path.exists():
        raise die(PreannotError(f"{path}: no such file or folder"), 2)
    all_files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    candidates = iter_dicom_files(path)
    not_dicom = len(all_files) - len(candidates)
    files, skipped = [], 0
    for p in candidates:  # what cannot be sent is said once, and the rest goes
        try:
            why = unsendable(dcmread(p, stop_before_pixels=True))
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            why = f"unreadable ({exc})"
        if why is None:
            files.append(str(p))
        else:
            skipped += 1
            typer.echo(f"  skipped {p}: {why}", err=True)
    if not files:
        raise die(PreannotError(f"no sendable DICOM instance under {path} ({not_dicom} file(s) not DICOM, "
                                f"{skipped} skipped)"), 2)
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
    extra = ", ".join(part for part in (f"{not_dicom} file(s) not DICOM" if not_dicom else "",
                                        f"{skipped} not sendable" if skipped else "") if part)
    typer.echo(f"sent {ok} of {len(files)} instance(s); {failed} failed" + (f" ({extra}, left out)" if extra else ""))
    if failed:
        raise typer.Exit(1)


@app.command()
def fetch(study: Annotated[str, typer.Option("--study", help="Study Instance UID")],
          source: Annotated[str, typer.Option("--from", help="A configured destination (dicom or dicomweb)")],
          config: ConfigOpt = None) -> None:
    """Ask a PACS for a past study (C-MOVE to this node, or WADO-RS) so the running node processes it."""
    from node.net.fetch import fetch_study

    cfg = load_or_exit(config)
    try:
        result = fetch_study(cfg, source, study)
    except PreannotError as exc:
        raise die(exc, 1) from exc
    typer.echo(f"{result.how}: {result.completed} instance(s) sent, {result.failed} failed, {result.warning} warning(s)")
    if result.failed:
        raise typer.Exit(1)
    if result.completed == 0:
        raise die(PreannotError(f"{source} sent no instance of study {study} (unknown to it, or not "
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
        raise die(PreannotError(f"{ae}@{host}:{port} did not answer C-ECHO"), 1)


@app.command()
def status(config: ConfigOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="JSON output")] = False) -> None:
    """Jobs, series and outbox counts, and the latest jobs."""
    stores = stores_or_exit(config)
    store = stores.jobs
    series = {k: v for k, v in stores.series.counts().items() if v}
    data: dict[str, Any] = {"series": series, "jobs": store.counts(), "outbox": store.outbox_counts(),
            "latest_jobs": [{"id": j.id, "state": j.state.value, "model": j.model, "series_uid": j.series_uid,
                             "attempts": j.attempts, "error": j.error, "superseded_by": j.superseded_by}
                            for j in store.list_jobs(limit=10)]}
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    typer.echo("series: " + (", ".join(f"{k} {v}" for k, v in sorted(series.items())) or "none"))
    typer.echo("jobs:   " + ", ".join(f"{k} {v}" for k, v in data["jobs"].items()))
    typer.echo("outbox: " + ", ".join(f"{k} {v}" for k, v in data["outbox"].items()))
    for j in data["latest_jobs"]:
        err = f"  ({j['error']})" if j["error"] else ""
        sup = f"  superseded by job {j['superseded_by']}" if j["superseded_by"] else ""
        typer.echo(f"  job {j['id']:>5} {j['state']:<9} {j['model']:<20} {j['series_uid']}{sup}{err}")


@app.command()
def jobs(config: ConfigOpt = None,
         state: Annotated[str | None, typer.Option(help="queued, running, done, failed, dead, cancelled")] = None,
         model: Annotated[str | None, typer.Option(help="Only this model")] = None,
         limit: Annotated[int, typer.Option(help="At most this many")] = 50) -> None:
    """List jobs, newest first."""
    store = stores_or_exit(config).jobs
    try:
        rows = store.list_jobs(state=state, model=model, limit=limit)
    except ValueError as exc:
        raise die(PreannotError(f"unknown state {state!r}"), 2) from exc
    for j in rows:
        rois = j.result.roi_count if j.result is not None else ""
        typer.echo(f"{j.id:>6} {j.state.value:<9} {j.model:<20} attempts {j.attempts}/{j.max_attempts} "
                   f"rois {rois!s:<3} {j.series_uid}" + (f"  error: {j.error}" if j.error else "")
                   + (f"  superseded by job {j.superseded_by}" if j.superseded_by else ""))


def _job_action(config: Path | None, action: str, job_id: int) -> Any:
    """Apply a JobStore action as the operator "cli"; a refused action exits 1 with the reason."""
    store = stores_or_exit(config).jobs
    try:
        return getattr(store, action)(job_id, actor="cli")
    except PreannotError as exc:
        raise die(exc, 1) from exc


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
def reprocess(series_uid: Annotated[str, typer.Argument(help="Series Instance UID")], config: ConfigOpt = None) -> None:
    """Run a series through its routes again as a new version; its earlier results are superseded
    (withdrawn by an IOCM rejection note where they were delivered)."""
    stores = stores_or_exit(config)
    try:
        version = stores.series.reopen_for_reprocess(series_uid, actor="cli")
    except PreannotError as exc:
        raise die(exc, 1) from exc
    typer.echo(f"series {series_uid} queued again as version {version}; the running node picks it up, and the "
               "earlier results are withdrawn once the new ones are delivered")


register_admin(app)


def _synth() -> None:
    from node.devtools.synth.cli import app as synth_app

    app.add_typer(synth_app, name="synth")


_synth()


#: commands whose process ends as soon as they have: their results are written and fsynced by then, and the
#: interpreter's teardown of torch and MONAI (1.2 s on the project's VM, 1.9 s after a job of 2,900 findings) is
#: time a user waits for nothing
QUICK_EXIT = frozenset({"run"})


def main() -> None:
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if command not in QUICK_EXIT:
        app()
        return
    try:
        app()
        code = 0
    except SystemExit as exc:  # click ends every command with one
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    main()
