"""The ``preannot`` commands for administrators and physicists: models, config, evaluate, audit, purge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from node.cli_common import ConfigOpt, RouteOpt, die, load_or_exit, route_for, stores_or_exit
from node.errors import PreannotError

__all__ = ["register"]

config_app = typer.Typer(help="Check or create the configuration.", no_args_is_help=True)
audit_app = typer.Typer(help="Export and verify the audit trail.", no_args_is_help=True)
app = typer.Typer()


def register(main: typer.Typer) -> None:
    """Add these commands to the main ``preannot`` application."""
    main.add_typer(config_app, name="config")
    main.add_typer(audit_app, name="audit")
    main.add_typer(models_app, name="models")
    main.add_typer(verdicts_app, name="verdicts")
    for command in app.registered_commands:
        main.registered_commands.append(command)


models_app = typer.Typer(help="List the models, or add a bundle with a draft card.", invoke_without_command=True)


@models_app.callback()
def models(ctx: typer.Context, config: ConfigOpt = None) -> None:
    """List the models in the models folder with version and weights SHA-256; broken bundles with the reason.
    `preannot models add PATH` adds a bundle."""
    if ctx.invoked_subcommand is not None:
        return
    from node.inference.registry import Registry

    cfg = load_or_exit(config)
    reg = Registry(cfg.models.dir)
    for name, m in reg.models.items():
        labels = ", ".join(f"{lab.value}={lab.name}" for lab in m.card.labels)
        typer.echo(f"{name}  version {m.version}  sha256 {m.sha256}  labels: {labels}  ({m.weights.name}, {m.kind})")
    for name, reason in reg.broken.items():
        typer.echo(f"{name}  BROKEN: {reason}")
    if not reg.models:
        typer.echo(f"no usable model in {cfg.models.dir}", err=True)
        raise typer.Exit(1)


@models_app.command("add")
def models_add(bundle: Annotated[Path, typer.Argument(help="A MONAI bundle folder (Model Zoo layout)")],
               config: ConfigOpt = None,
               name: Annotated[str | None, typer.Option(help="Folder name in the models folder (default: the "
                                                          "bundle's)")] = None,
               force: Annotated[bool, typer.Option(help="Replace a model of the same name")] = False,
               trial: Annotated[bool, typer.Option("--try/--no-try", help="Run it once on a tiny synthetic input, as "
                                                   "the node will (finds missing packages and the like)")] = True,
               ) -> None:
    """Copy a bundle into the models folder and write a draft model_card.toml from its metadata.json
    (label names mapped to SNOMED CT codes where the node's table knows them); then validate it."""
    import shutil

    from node.inference.cards import draft_card
    from node.inference.registry import load_model

    cfg = load_or_exit(config)
    if not (bundle / "configs" / "metadata.json").is_file():
        raise die(PreannotError(f"{bundle} is not a MONAI bundle (no configs/metadata.json)"), 2)
    dest = cfg.models.dir / (name or bundle.resolve().name)
    if dest.exists():
        if not force:
            raise die(PreannotError(f"{dest} exists; --force replaces it"), 1)
        shutil.rmtree(dest)
    cfg.models.dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(bundle, dest)
    card_path = dest / "model_card.toml"
    if card_path.is_file():
        typer.echo(f"copied to {dest}; it has its own model_card.toml (kept)")
    else:
        try:
            draft = draft_card(dest)
        except ValueError as exc:
            raise die(PreannotError(str(exc)), 1) from exc
        card_path.write_text(draft.text)
        typer.echo(f"copied to {dest}; draft model_card.toml with {draft.labels} label(s)")
        if draft.unmapped:
            typer.echo(f"  {len(draft.unmapped)} label(s) not in the code table (placeholder codes, marked UNMAPPED "
                       f"in the card): {', '.join(draft.unmapped)}")
        if draft.no_laterality:
            typer.echo(f"  {len(draft.no_laterality)} label(s) coded without their laterality: "
                       f"{', '.join(draft.no_laterality)}")
        if draft.removed:
            typer.echo(f"  not accepted by the installed MONAI, removed from the config at load ([bundle] remove): "
                       f"{', '.join(draft.removed)}")
        if draft.inputs:
            typer.echo(f"  takes {len(draft.inputs)} series of a study ({', '.join(draft.inputs)}): one [[inputs]] table "
                       "each, matched by series attributes; review the rules"
                       + (f" (by name only: {', '.join(draft.unmatched_inputs)})" if draft.unmatched_inputs else ""))
        if draft.no_download:
            typer.echo(f"  would download weights when the network is built, switched off in the card ([bundle]): "
                       f"{', '.join(draft.no_download)}")
    tried_ok = True
    if trial:
        tried_ok = _try(dest)
    try:
        model = load_model(dest)
    except PreannotError as exc:
        typer.echo(f"not usable yet: {exc}")
        raise typer.Exit(1) from exc
    if not tried_ok:
        raise typer.Exit(1)
    typer.echo(f"valid: {model.name} {model.kind} version {model.version}, weights sha256 {model.sha256[:16]}; "
               "review the card, then name the model in a route")


def _try(folder: Path) -> bool:
    """Run the bundle once on a tiny input as the node will (node.inference.smoke); say what it found."""
    import tomllib

    from pydantic import ValidationError

    from node.inference.registry import ModelCard, bundle_inputs, read_inference_config
    from node.inference.smoke import try_bundle

    try:
        card = ModelCard.model_validate(tomllib.loads((folder / "model_card.toml").read_text()))
        metadata = json.loads((folder / "configs" / "metadata.json").read_text())
        if len(bundle_inputs(read_inference_config(folder), metadata)) > 1 and not card.inputs:
            return True  # refused below with the reason (its card must describe each input)
    except (OSError, ValueError, ValidationError, PreannotError):
        return True  # the card or config problem is reported below, by load_model
    typer.echo("  trying it once on a tiny synthetic input, as the node will run it ...")
    result = try_bundle(folder, card, metadata)
    weights = " (random weights: the bundle's own are not there yet)" if result.random_weights else ""
    if result.ok:
        typer.echo(f"  tried: it runs{weights} ({result.seconds:.1f} s)")
        return True
    typer.echo(f"  tried: it FAILS{weights}: {result.problem}")
    if result.fix:
        typer.echo(f"  fix: {result.fix}")
    return False


@config_app.command("check")
def config_check(config: ConfigOpt = None) -> None:
    """Validate the configuration, the routes and the models they name."""
    from node.errors import ConfigError
    from node.inference.registry import Registry
    from node.schedule.routing import validate_route

    cfg = load_or_exit(config)
    try:
        for r in cfg.routes:
            validate_route(r)
    except ConfigError as exc:
        raise die(exc, 2) from exc
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
        raise die(PreannotError(f"{output} exists; use --force to overwrite it"), 1)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text + "\n")
    typer.echo(f"configuration written to {output}; edit it, then: preannot config check --config {output}")


@app.command()
def evaluate(
    out: Annotated[Path, typer.Option("--out", help="Report folder (report.html, metrics.csv, summary.json)")],
    dataset: Annotated[Path | None, typer.Argument(
        help="Folder of image series with reference SEG (or NIfTI) beside them (not with --from-verdicts)")] = None,
    model: Annotated[list[str] | None, typer.Option(
        "--model", "-m", help="Model to run and evaluate; repeat to compare (with --from-verdicts: candidates)")] = None,
    config: ConfigOpt = None,
    from_verdicts: Annotated[str | None, typer.Option(
        "--from-verdicts", help="Use the node's verdict store as the dataset: the radiologists' final SEGs of "
        "this model's results as the reference, and this model as it was sent scored against them")] = None,
    version: Annotated[str | None, typer.Option(help="--from-verdicts: only results of this model version")] = None,
    scanner: Annotated[str | None, typer.Option(help="--from-verdicts: only this scanner (as /api/agreement names it)")] = None,
    days: Annotated[float | None, typer.Option(help="--from-verdicts: only verdicts of the last N days")] = None,
    tolerance_mm: Annotated[float, typer.Option(help="Surface Dice tolerance (mm)")] = 2.0,
    detection: Annotated[str, typer.Option(help="Lesion matching: overlap or centroid")] = "overlap",
    centroid_mm: Annotated[float, typer.Option(help="Centroid rule distance (mm)")] = 5.0,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs")] = 2000,
    route: RouteOpt = None,
    followup: Annotated[bool, typer.Option(
        "--followup", help="The dataset is longitudinal (pairs with tracked reference SEGs): score how each lesion "
                           "keeps its identity over time (as `preannot evaluate-followup`)")] = False,
) -> None:
    """Evaluate models on labelled data: overlap, surface distances, detection, FROC, volumes, speed.

    With --from-verdicts MODEL, the cases are the node's own: each result of MODEL whose latest verdict is
    the radiologist's final SEG; MODEL as it was sent is scored against it, and so is every --model given
    (a new version or a candidate run on the same series)."""
    import time

    from node.evaluate.run import EvalOptions
    from node.evaluate.run import evaluate as run_evaluation
    from node.inference.registry import Registry

    if followup:
        if dataset is None or not model or len(model) != 1:
            raise die(PreannotError("--followup takes a dataset folder and one --model"), 2)
        _evaluate_followup(dataset, model[0], out, config, None)
        return
    cfg = load_or_exit(config)
    if detection not in ("overlap", "centroid"):
        raise die(PreannotError(f"--detection must be overlap or centroid (found {detection!r})"), 2)
    if (dataset is None) == (from_verdicts is None):
        raise die(PreannotError("give a dataset folder or --from-verdicts MODEL (one of them)"), 2)
    from node.processing.findings import FindingOptions

    first = from_verdicts or (model[0] if model else "")
    options = EvalOptions(tolerance_mm=tolerance_mm, detection=detection, centroid_mm=centroid_mm, bootstrap=bootstrap,
                          findings=FindingOptions.for_route(route_for(cfg, first, route)))
    try:
        reg = Registry(cfg.models.dir)
        infos = [reg.get(m) for m in model or []]
        runners = {}
        source: Path | object = dataset
        if from_verdicts is not None:
            from node.evaluate.verdicts import as_sent, verdict_dataset

            stores = stores_or_exit(config)
            from node.verdicts.store import VerdictStore

            source = verdict_dataset(VerdictStore(stores.db), stores.series, model=from_verdicts, version=version, scanner=scanner,
                                     since=None if days is None else time.time() - days * 86400)
            sent, runner = as_sent(stores.jobs, reg.get(from_verdicts), source)  # type: ignore[arg-type]
            infos.insert(0, sent)
            runners[sent.name] = runner
        elif not infos:
            raise PreannotError("give at least one --model to evaluate")
        summary = run_evaluation(source, infos, out, options=options, runners=runners,  # type: ignore[arg-type]
                                 progress=lambda msg: typer.echo(msg, err=True))
    except PreannotError as exc:
        raise die(exc, 1) from exc
    for name, m in summary["models"].items():
        for lab, entry in m["labels"].items():
            parts = []
            if "voxel" in entry:
                d = entry["voxel"]["dice"]
                parts.append(f"Dice {d['mean']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]")
            det = entry.get("detection")
            if det:
                at = ", ".join(f"{det['sensitivity_at_fp'][k]:.2f}@{float(k):g}" for k in det["sensitivity_at_fp"])
                parts.append(f"sensitivity {det['sensitivity']:.3f} ({det['detected']}/{det['lesions']}), "
                             f"FP/scan {det['fp_per_scan']:.2f}, sensitivity at FP/scan {at}")
            typer.echo(f"{name} / {lab}: " + "; ".join(parts))
        for concept, c in m.get("classification", {}).items():
            typer.echo(f"{name} / {concept}: accuracy {c['accuracy']:.3f} ({c['cases']} cases), macro AUC "
                       f"{c['macro_auc']:.3f} [{c['macro_auc_ci'][0]:.3f}, {c['macro_auc_ci'][1]:.3f}]")
    for c in summary["comparisons"]:
        p = f", {c['test']} p = " + ("n/a (no case differs)" if c["p"] != c["p"] else f"{c['p']:.4f}") \
            if c["test"] != "bootstrap" else ""
        typer.echo(f"{c['b']} - {c['a']} ({c['label']}, {c['metric']}): {c['mean_difference_b_minus_a']:+.3f} "
                   f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]{p}")
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


@app.command("evaluate-followup")
def evaluate_followup_cmd(
    dataset: Annotated[Path, typer.Argument(help="Folder of pairs: prior/, current/, prior_truth_seg.dcm, "
                                                 "current_truth_seg.dcm (a lesion's segments share a tracking UID)")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model to run on both time points")],
    out: Annotated[Path, typer.Option("--out", help="Report folder (summary.json, report.md)")],
    config: ConfigOpt = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda (default: from config)")] = None,
) -> None:
    """Score the follow-up on a labelled longitudinal set: does each lesion keep its identity from the prior to
    the follow-up, is a gone one said not seen and a new one new; the volume change against the reference."""
    _evaluate_followup(dataset, model, out, config, device)


def _evaluate_followup(dataset: Path, model: str, out: Path, config: Path | None, device: str | None) -> None:
    from node.evaluate.followup import evaluate_followup
    from node.inference.bundle import configure_torch
    from node.inference.kinds import load_runner
    from node.inference.registry import Registry
    from node.outputs.equipment import Provenance
    from node.processing.pipeline import ModelContext

    cfg = load_or_exit(config)
    try:
        info = Registry(cfg.models.dir).get(model)
        configure_torch(cfg.models)
        runner = load_runner(info, device=device or cfg.models.device, amp=cfg.models.amp)
    except PreannotError as exc:
        raise die(exc, 2) from exc
    from node.outputs.equipment import device_uid

    ctx = ModelContext(info, runner, Provenance.for_node(info, cfg.outputs, device_uid=device_uid(
        cfg.outputs, cfg.data_dir, create=False)))
    try:
        summary = evaluate_followup(dataset, ctx, cfg, out, progress=lambda m: typer.echo(m, err=True))
    except FileNotFoundError as exc:
        raise die(PreannotError(str(exc)), 2) from exc
    rate = summary["rate"]
    typer.echo(f"identity kept right: {summary['right']}/{summary['judged']}"
               + (f" ({100 * rate:.1f} %)" if rate is not None else "") + f"; report in {out / 'report.md'}")


@audit_app.command("export")
def audit_export(config: ConfigOpt = None,
                 since: Annotated[str | None, typer.Option(help="From (ISO date/time or epoch s)")] = None,
                 until: Annotated[str | None, typer.Option(help="Until (ISO date/time or epoch s)")] = None,
                 out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout")] = None) -> None:
    """Export audit records as JSON lines, oldest first."""
    from node.store.audit import export

    db = stores_or_exit(config).db
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

    result = verify(stores_or_exit(config).db)
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
    cfg = load_or_exit(config)
    stores = stores_or_exit(config)
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


verdicts_app = typer.Typer(help="The radiologists' verdicts on the node's results (see docs/closing-the-loop.md).")


@verdicts_app.command("list")
def verdicts_list(config: ConfigOpt = None, model: Annotated[str | None, typer.Option(help="Only this model")] = None,
                  limit: Annotated[int, typer.Option(help="At most this many, newest first")] = 50) -> None:
    """The latest verdicts: source, study verdict and counts per finding outcome."""
    from node.verdicts.store import VerdictStore

    store = VerdictStore(stores_or_exit(config).db)
    rows = [r for r in store.recent(limit * 10) if model is None or r["model"] == model][:limit]
    for r in rows:
        dice = "" if r["case_dice"] is None else f"  Dice {r['case_dice']:.3f}"
        typer.echo(f"{r['id']}  job {r['job_id']}  {r['model']} {r['model_version']}  {r['source']}  "
                   f"{r['study_verdict']}  accepted {r['accepted']} edited {r['edited']} rejected {r['rejected']} "
                   f"added {r['added']}{dice}")
    if not rows:
        typer.echo("no verdict recorded", err=True)


@verdicts_app.command("export")
def verdicts_export(config: ConfigOpt = None, fmt: Annotated[str, typer.Option("--format", help="json or csv")] = "csv",
                    model: Annotated[str | None, typer.Option(help="Only this model")] = None) -> None:
    """Every verdict (CSV: one row each; JSON: with its findings) on standard output."""
    from node.verdicts.store import VerdictStore

    if fmt not in ("json", "csv"):
        raise die(PreannotError(f"--format must be json or csv (found {fmt!r})"), 2)
    typer.echo(VerdictStore(stores_or_exit(config).db).export(fmt, model=model), nl=False)


@verdicts_app.command("agreement")
def verdicts_agreement(config: ConfigOpt = None,
                       by: Annotated[str, typer.Option(help="version, scanner or week")] = "version",
                       as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """Agreement per model and version (or scanner, or week) with 95 % intervals, then the drift alerts."""
    from node.verdicts.stats import agreement, alerts
    from node.verdicts.store import VerdictStore

    if by not in ("version", "scanner", "week"):
        raise die(PreannotError(f"--by must be version, scanner or week (found {by!r})"), 2)
    cfg = load_or_exit(config)
    stores = stores_or_exit(config)
    store = VerdictStore(stores.db)
    rows, found = agreement(store, by=by), alerts(store, stores.jobs, cfg.verdicts)
    if as_json:
        typer.echo(json.dumps({"agreement": rows, "alerts": found}, indent=2, default=str))
        return
    for r in rows:
        what = " ".join(str(r[k]) for k in ("model", "model_version", "scanner", "week") if k in r)
        acc = "n/a" if r["acceptance"] is None else (f"{r['acceptance']:.0%} [{r['acceptance_ci'][0]:.0%}, "
                                                     f"{r['acceptance_ci'][1]:.0%}]")
        typer.echo(f"{what}: {r['studies']} studies, acceptance {acc}, added/study {r['added_per_study']}, "
                   f"rejected/study {r['rejected_per_study']}, edit Dice {r['edit_dice']}")
    for a in found:
        typer.echo(f"ALERT {a['kind']} {a['model']}: {a['message']}")
