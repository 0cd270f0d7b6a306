"""The dashboard page: server-rendered with Jinja2 (autoescaped), no build step, no external resources."""

from __future__ import annotations

import datetime as _dt
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from node import __version__
from node.errors import PreannotError
from node.store.series import SeriesState
from node.web.view import NodeView

__all__ = ["render_dashboard", "render_judge", "trend_png"]

_ENV = Environment(loader=PackageLoader("node.web", "templates"), autoescape=select_autoescape(["html"]))
_ENV.filters["when"] = lambda ts: _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


def _seconds(v: Any) -> str:
    """A duration for the page; anything that is not a finite number (a job still running, one that died
    before a stage, a broken row) shows as nothing rather than failing the page."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return ""
    return f"{f:.1f} s" if f == f and abs(f) != float("inf") else ""


_ENV.filters["seconds"] = _seconds


def _gauges(s: dict[str, Any]) -> list[dict[str, Any]]:
    jobs, outbox = s["jobs"], s["outbox"]
    held = s["series"].get(SeriesState.INCOMPLETE.value, 0)
    return [
        {"label": "queue (queued + retrying)", "value": jobs["queued"] + jobs["failed"], "cls": ""},
        {"label": "running", "value": jobs["running"], "cls": ""},
        {"label": "done", "value": jobs["done"], "cls": ""},
        {"label": "dead jobs", "value": jobs["dead"], "cls": "bad" if jobs["dead"] else ""},
        {"label": "results waiting for delivery", "value": outbox["pending"] + outbox["sending"],
         "cls": "warn" if outbox["pending"] else ""},
        {"label": "dead-lettered results", "value": outbox["dead"], "cls": "bad" if outbox["dead"] else ""},
        {"label": "series held incomplete", "value": held, "cls": "warn" if held else ""},
        {"label": "series skipped", "value": s["series"].get(SeriesState.SKIPPED.value, 0), "cls": ""},
        {"label": "spool (MiB)", "value": f"{s['spool_bytes'] / 2**20:.1f}", "cls": ""},
        {"label": "disk free (GiB)", "value": f"{s['disk_free_bytes'] / 2**30:.1f}", "cls": "" if s["disk_ok"] else "bad"},
        {"label": "instances received", "value": s["instances_received"], "cls": ""},
        {"label": "associations refused", "value": s["associations_refused"],
         "cls": "warn" if s["associations_refused"] else ""},
    ]


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.0f}%"


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}"


def render_judge(node: NodeView, job_id: int) -> str:
    """A page where a radiologist states a verdict on each finding of a done job."""
    job = node.store.get(job_id)
    result = job.result
    return _ENV.get_template("judge.html").render(job=job, findings=result.findings if result else (),
                                                  version=result.model.get("version", "") if result else "",
                                                  preview=bool(result and result.files.get("preview")))


def render_followup(node: NodeView, job_id: int) -> str:
    """A patient's findings over time up to a job: one line per lesion (node.followup.timeline)."""
    from node.followup.timeline import timeline

    job = node.store.get(job_id)

    def result_of(jid: int) -> Any:
        try:
            return node.store.get(jid).result
        except PreannotError:
            return None

    summary = str((job.result.followup or {}).get("summary", "")) if job.result is not None else ""
    return _ENV.get_template("followup.html").render(job=job, data=timeline(job_id, result_of), summary=summary)


def trend_png(node: NodeView) -> bytes:
    """Acceptance per ISO week and model version, with 95 % intervals (PNG)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from node.verdicts.stats import agreement

    rows = agreement(node.verdicts, by="week")
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=100)
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault(f"{r['model']} {r['model_version']}", []).append(r)
    weeks = sorted({r["week"] for r in rows})
    for name, pts in series.items():
        pts = [p for p in pts if p["acceptance"] is not None]
        x = [weeks.index(p["week"]) for p in pts]
        y = [p["acceptance"] for p in pts]
        err = [[p["acceptance"] - p["acceptance_ci"][0] for p in pts], [p["acceptance_ci"][1] - p["acceptance"] for p in pts]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
    floor = node.config.verdicts.alert_acceptance_floor
    ax.axhline(floor, color="tab:red", linestyle="--", linewidth=1, label=f"alert floor {floor:.0%}")
    ax.set_xticks(range(len(weeks)), weeks, rotation=30, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("acceptance")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _targets(node: NodeView, jobs: list[Any]) -> list[dict[str, Any]]:
    """Per priority, over the recent done jobs: how many results, how many late, the slowest."""
    out = []
    for priority, target in node.config.jobs.targets.items():
        times = [float(t) for j in jobs if j.priority == priority and j.state.value == "done"
                 and j.result is not None and (t := j.result.time_to_result_s) is not None]
        out.append({"priority": priority, "target": target, "count": len(times),
                    "late": sum(t > target for t in times), "slowest": max(times) if times else None})
    return out


def render_dashboard(node: NodeView, now: float) -> str:
    """The dashboard HTML for the node's current state."""
    from node.verdicts.stats import agreement

    s = node.status()
    agree, verdict_alerts = node.verdict_summary()
    jobs = node.store.list_jobs(limit=50)
    held = [x for st in (SeriesState.INCOMPLETE, SeriesState.SKIPPED, SeriesState.FAILED)
            for x in node.series.list_series(state=st, limit=20)]
    return _ENV.get_template("dashboard.html").render(
        ae_title=node.config.node.ae_title, port=node.dicom_port, version=__version__,
        models=", ".join(sorted(node.registry.models)), now=now, gauges=_gauges(s),
        failures=[j for j in jobs if j.state.value in ("failed", "dead")],
        held=sorted(held, key=lambda x: -x.last_received)[:30], jobs=jobs[:30],
        previews=[j for j in jobs if j.state.value == "done" and j.result and j.result.files.get("preview")][:4],
        targets=_targets(node, node.store.list_jobs(limit=500)),
        agreement=agree, verdict_alerts=verdict_alerts, by_scanner=agreement(node.verdicts, by="scanner"),
        verdicts=node.verdicts.recent(20), not_judged=node.verdicts.not_judged(10), pct=_pct, num=_num)
