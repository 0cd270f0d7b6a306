"""The dashboard page: server-rendered HTML, no build step, no external resources (works offline)."""

from __future__ import annotations

import datetime as _dt
import html
from typing import TYPE_CHECKING, Any

from node import __version__

if TYPE_CHECKING:
    from node.service import Node

__all__ = ["render_dashboard"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f4f6f8;color:#1d2530}
header{background:#17324d;color:#fff;padding:12px 20px;display:flex;justify-content:space-between;align-items:center}
header h1{font-size:20px;margin:0} header small{opacity:.8}
main{padding:16px 20px} h2{font-size:16px;margin:18px 0 8px}
.gauges{display:flex;gap:12px;flex-wrap:wrap}
.g{background:#fff;border-radius:6px;padding:10px 14px;min-width:120px;box-shadow:0 1px 2px #0002}
.g b{display:block;font-size:22px} .g span{font-size:12px;color:#5a6776}
.g.bad b{color:#b00020} .g.warn b{color:#b36b00}
table{border-collapse:collapse;width:100%;background:#fff;box-shadow:0 1px 2px #0002;font-size:13px}
th,td{padding:6px 8px;border-bottom:1px solid #e3e7eb;text-align:left} th{background:#eef1f4}
.st{padding:2px 6px;border-radius:4px;font-size:12px;color:#fff}
.done{background:#2e7d32}.running{background:#1565c0}.queued{background:#607d8b}.failed{background:#b36b00}
.dead{background:#b00020}.cancelled{background:#777}
.uid{font-family:monospace;font-size:11px;color:#45515e}
.previews{display:flex;gap:12px;flex-wrap:wrap}
.previews figure{background:#fff;margin:0;padding:8px;box-shadow:0 1px 2px #0002;border-radius:6px}
.previews img{max-width:560px;display:block} figcaption{font-size:12px;margin-top:4px}
.warnbox{background:#fff3cd;border:1px solid #e0c36a;padding:6px 10px;border-radius:4px;font-size:13px}
button{cursor:pointer}
"""

_JS = """
function tok(){return sessionStorage.getItem('preannot-token')||''}
function saveTok(){sessionStorage.setItem('preannot-token',document.getElementById('token').value)}
async function act(path){
  const r=await fetch(path,{method:'POST',headers:{'Authorization':'Bearer '+tok()}});
  const t=await r.text(); document.getElementById('msg').textContent=r.status+' '+t; if(r.ok){setTimeout(()=>location.reload(),800)}
}
window.addEventListener('load',()=>{document.getElementById('token').value=tok()});
"""


def _t(ts: float | None) -> str:
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


def _gauge(label: str, value: Any, cls: str = "") -> str:
    return f'<div class="g {cls}"><b>{html.escape(str(value))}</b><span>{html.escape(label)}</span></div>'


def render_dashboard(node: Node, now: float) -> str:
    """The dashboard HTML for the node's current state."""
    s = node.status()
    jobs = node.store.list_jobs(limit=50)
    failures = [j for j in jobs if j.state.value in ("failed", "dead")]
    done = [j for j in jobs if j.state.value == "done" and (j.result or {}).get("files", {}).get("preview")][:4]
    free_gib = s["disk_free_bytes"] / 2**30
    gauges = "".join([
        _gauge("queue (queued + retrying)", s["jobs"]["queued"] + s["jobs"]["failed"]),
        _gauge("running", s["jobs"]["running"]),
        _gauge("done", s["jobs"]["done"]),
        _gauge("dead jobs", s["jobs"]["dead"], "bad" if s["jobs"]["dead"] else ""),
        _gauge("results waiting for delivery", s["outbox"]["pending"] + s["outbox"]["sending"],
               "warn" if s["outbox"]["pending"] else ""),
        _gauge("dead-lettered results", s["outbox"]["dead"], "bad" if s["outbox"]["dead"] else ""),
        _gauge("spool (MiB)", f"{s['spool_bytes'] / 2**20:.1f}"),
        _gauge("disk free (GiB)", f"{free_gib:.1f}", "bad" if not s["disk_ok"] else ""),
        _gauge("instances received", s["instances_received"]),
        _gauge("associations refused", s["associations_refused"], "warn" if s["associations_refused"] else ""),
    ])
    rows = []
    for j in jobs[:30]:
        r = j.result or {}
        rois = r.get("summary", {}).get("roi_count", "")
        dur = r.get("timings", {}).get("total")
        inf = r.get("timings", {}).get("inference")
        rows.append(
            f"<tr><td><a href='/api/jobs/{j.id}'>{j.id}</a></td><td><span class='st {j.state.value}'>{j.state.value}"
            f"</span></td><td>{html.escape(j.model)}</td><td class='uid'>{html.escape(j.series_uid)}</td>"
            f"<td>{rois}</td><td>{'' if dur is None else f'{dur:.1f} s'}</td>"
            f"<td>{'' if inf is None else f'{inf:.1f} s'}</td><td>{j.attempts}/{j.max_attempts}</td>"
            f"<td>{_t(j.created_at)}</td></tr>")
    fail_rows = "".join(
        f"<tr><td>{j.id}</td><td><span class='st {j.state.value}'>{j.state.value}</span></td>"
        f"<td>{html.escape(j.model)}</td><td>{html.escape(j.error or '')}</td>"
        f"<td><button onclick=\"act('/api/jobs/{j.id}/retry')\">Retry</button></td></tr>" for j in failures)
    previews = "".join(
        f"<figure><img src='/api/jobs/{j.id}/preview.png' alt='preview of job {j.id}'>"
        f"<figcaption>job {j.id} &middot; {html.escape(j.model)} &middot; "
        f"{(j.result or {}).get('summary', {}).get('roi_count', 0)} ROI(s) &middot; "
        f"<span class='uid'>{html.escape(j.series_uid)}</span></figcaption></figure>" for j in done)
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="15"><title>preannot dashboard</title><style>{_CSS}</style>
<script>{_JS}</script></head><body>
<header><div><h1>preannot</h1><small>{html.escape(node.config.node.ae_title)} on port {node.listener.port}
&middot; version {__version__} &middot; models: {html.escape(", ".join(sorted(node.registry.models)) or "none")}</small></div>
<div><small>{_t(now)}</small></div></header><main>
<p class="warnbox">Results are AI pre-annotations, <b>not verified</b>: the radiologist decides.</p>
<h2>Queue and disk</h2><div class="gauges">{gauges}</div>
<h2>Failures</h2>
<p><label>Token for actions: <input id="token" type="password" size="28" onchange="saveTok()"></label>
<span id="msg" class="uid"></span></p>
<table><tr><th>job</th><th>state</th><th>model</th><th>reason</th><th></th></tr>
{fail_rows or "<tr><td colspan=5>none</td></tr>"}</table>
<h2>Recent jobs</h2>
<table><tr><th>job</th><th>state</th><th>model</th><th>series</th><th>ROIs</th><th>duration</th><th>inference</th>
<th>attempts</th><th>created</th></tr>{"".join(rows) or "<tr><td colspan=9>no job yet</td></tr>"}</table>
<h2>Latest results</h2><div class="previews">{previews or "<p>no finished job yet</p>"}</div>
<p class="uid">API: <a href="/docs">/docs</a> &middot; <a href="/metrics">/metrics</a> &middot;
<a href="/api/jobs">/api/jobs</a> &middot; <a href="/ready">/ready</a></p>
</main></body></html>"""
