"""The dashboard page: server-rendered with Jinja2 (autoescaped), no build step, no external resources."""

from __future__ import annotations

import datetime as _dt
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from node import __version__
from node.store.series import SeriesState
from node.web.view import NodeView

__all__ = ["render_dashboard"]

_ENV = Environment(loader=PackageLoader("node.web", "templates"), autoescape=select_autoescape(["html"]))
_ENV.filters["when"] = lambda ts: _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else ""
_ENV.filters["seconds"] = lambda v: "" if v is None else f"{v:.1f} s"


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


def render_dashboard(node: NodeView, now: float) -> str:
    """The dashboard HTML for the node's current state."""
    s = node.status()
    jobs = node.store.list_jobs(limit=50)
    held = [x for st in (SeriesState.INCOMPLETE, SeriesState.SKIPPED, SeriesState.FAILED)
            for x in node.series.list_series(state=st, limit=20)]
    return _ENV.get_template("dashboard.html").render(
        ae_title=node.config.node.ae_title, port=node.dicom_port, version=__version__,
        models=", ".join(sorted(node.registry.models)), now=now, gauges=_gauges(s),
        failures=[j for j in jobs if j.state.value in ("failed", "dead")],
        held=sorted(held, key=lambda x: -x.last_received)[:30], jobs=jobs[:30],
        previews=[j for j in jobs if j.state.value == "done" and (j.result or {}).get("files", {}).get("preview")][:4])
