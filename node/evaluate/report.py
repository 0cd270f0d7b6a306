"""The self-contained HTML report: plots embedded as PNG, a sortable per-case table, worst cases."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from node.inference.registry import ModelInfo

__all__ = ["write_report"]

_CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#1d2530;max-width:1200px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}table{border-collapse:collapse;font-size:12px}
th,td{border:1px solid #d5dbe1;padding:4px 7px;text-align:right}th{background:#eef1f4;cursor:pointer}
td:first-child,th:first-child{text-align:left}.warn{background:#fff3cd;padding:6px 10px;border-radius:4px}
figure{display:inline-block;margin:6px}img{max-width:100%}.small{color:#5a6776;font-size:12px}"""

_SORT_JS = """document.querySelectorAll('table.sortable th').forEach((th,i)=>th.addEventListener('click',()=>{
const t=th.closest('table'),rows=[...t.querySelectorAll('tbody tr')],asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
rows.sort((a,b)=>{const x=a.children[i].textContent,y=b.children[i].textContent,nx=parseFloat(x),ny=parseFloat(y);
return (isNaN(nx)||isNaN(ny)?x.localeCompare(y):nx-ny)*(asc?1:-1)});rows.forEach(r=>t.tBodies[0].appendChild(r))}))"""


def _png(fig: Any) -> str:

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else html.escape(str(v))


def write_report(summary: dict[str, Any], results: dict[str, list[dict[str, Any]]], models: list[ModelInfo],
                 out: Path) -> Path:
    """Write ``out/report.html`` and return its path."""
    from matplotlib.figure import Figure

    first = models[0].card.labels[0].name
    names = [m.name for m in models]
    plots = []
    fig = Figure(figsize=(14, 3.4))
    axes = fig.subplots(1, 4)
    for ax, metric, title in zip(axes, ("dice", "nsd", "hd95_mm", "asd_mm"),
                                 ("Dice", "surface Dice", "HD95 (mm)", "ASD (mm)"), strict=True):
        data = [[r["labels"][first][metric] for r in results[n] if not math.isnan(r["labels"][first][metric])]
                for n in names]
        ax.boxplot(data, tick_labels=names, showmeans=True)
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"per-case metrics, label {first}", fontsize=10)
    plots.append(("Metrics per case (box: quartiles, triangle: mean)", _png(fig)))
    fig = Figure(figsize=(5 * len(names), 3.6))
    axes = fig.subplots(1, len(names), squeeze=False)
    for ax, n in zip(axes[0], names, strict=True):
        ref = np.array([r["labels"][first]["volume_ref_mm3"] for r in results[n]])
        pred = np.array([r["labels"][first]["volume_pred_mm3"] for r in results[n]])
        mean, diff = (ref + pred) / 2, pred - ref
        ax.scatter(mean, diff, s=14)
        if diff.size:
            md, sd = float(diff.mean()), float(diff.std(ddof=1)) if diff.size > 1 else 0.0
            for y, style in ((md, "-"), (md + 1.96 * sd, "--"), (md - 1.96 * sd, "--")):
                ax.axhline(y, linestyle=style, color="#b00000", linewidth=1)
            ax.set_title(f"{n}: bias {md:.0f} mm3, limits ±{1.96 * sd:.0f}", fontsize=9)
        ax.set_xlabel("mean of reference and model volume (mm3)", fontsize=8)
        ax.set_ylabel("model - reference (mm3)", fontsize=8)
    plots.append(("Bland-Altman plot of volumes per case", _png(fig)))
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    for n in names:
        det = summary["models"][n]["labels"].get(first, {}).get("detection")
        if det:
            pts = sorted(det["froc"], key=lambda p: -p["min_volume_mm3"])  # from strict to permissive
            ax.plot([p["fp_per_scan"] for p in pts], [p["sensitivity"] for p in pts], marker="o", label=n)
            ax.scatter([det["fp_per_scan"]], [det["sensitivity"]], s=90, facecolors="none", edgecolors="black")
    ax.set_xlabel("false positives per scan")
    ax.set_ylabel("lesion sensitivity")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("FROC (operating points: minimum ROI volume; circle: the model card's)", fontsize=9)
    plots.append(("FROC", _png(fig)))

    agg_rows = []
    for n in names:
        m = summary["models"][n]
        for lab, entry in m["labels"].items():
            v = entry["voxel"]
            det = entry.get("detection", {})
            cells = [html.escape(n), html.escape(lab)] + [
                f"{_fmt(v[k]['mean'])} [{_fmt(v[k]['ci95'][0])}, {_fmt(v[k]['ci95'][1])}]"
                for k in ("dice", "nsd", "hd95_mm", "asd_mm", "abs_volume_diff_mm3")]
            if det:
                cells.append(f"{_fmt(det['sensitivity'])} [{_fmt(det['sensitivity_ci'][0])}, "
                             f"{_fmt(det['sensitivity_ci'][1])}] ({det['detected']}/{det['lesions']})")
                cells.append(f"{_fmt(det['fp_per_scan'], 2)} [{_fmt(det['fp_per_scan_ci'][0], 2)}, "
                             f"{_fmt(det['fp_per_scan_ci'][1], 2)}]")
            else:
                cells += ["–", "–"]
            cells.append(f"{_fmt(m['mean_timings_s']['inference'], 2)} s")
            cells.append(f"{_fmt(m['peak_rss_mb'], 0)} MB")
            agg_rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    comp_rows = "".join(
        f"<tr><td>{html.escape(c['label'])}</td><td>{c['metric']}</td><td>{html.escape(c['b'])} - {html.escape(c['a'])}"
        f"</td><td>{c['cases']}</td><td>{_fmt(c['mean_difference_b_minus_a'])} [{_fmt(c['ci95'][0])}, "
        f"{_fmt(c['ci95'][1])}]</td><td>{_fmt(c['wilcoxon_p'], 4)}</td></tr>" for c in summary["comparisons"])
    case_rows = []
    for n in names:
        for r in results[n]:
            m = r["labels"][first]
            les = r["lesions"].get(first, {})
            case_rows.append(
                f"<tr><td>{html.escape(r['case'])}</td><td>{html.escape(n)}</td><td>{_fmt(m['dice'])}</td>"
                f"<td>{_fmt(m['nsd'])}</td><td>{_fmt(m['hd95_mm'], 2)}</td><td>{_fmt(m['asd_mm'], 2)}</td>"
                f"<td>{_fmt(m['volume_ref_mm3'], 0)}</td><td>{_fmt(m['volume_pred_mm3'], 0)}</td>"
                f"<td>{les.get('ref_lesions', '–')}</td><td>{les.get('detected', '–')}</td>"
                f"<td>{les.get('false_positives', '–')}</td><td>{_fmt(r['timings_s']['inference'], 2)}</td></tr>")
    worst = sorted((r for n in names for r in results[n]), key=lambda r: r["labels"][first]["dice"])[:6]
    worst_figs = []
    for r in worst:
        p = out / "cases" / r["overlay"]
        if p.exists():
            b64 = base64.b64encode(p.read_bytes()).decode()
            worst_figs.append(f"<figure><img src='data:image/png;base64,{b64}' alt='{html.escape(r['case'])}'>"
                              f"<figcaption class='small'>{html.escape(r['case'])} / {html.escape(r['model'])}: "
                              f"Dice {_fmt(r['labels'][first]['dice'])}</figcaption></figure>")
    problems = "".join(f"<li>{html.escape(p)}</li>" for p in summary["problems"]) or "<li>none</li>"
    model_list = "".join(f"<li>{html.escape(m.name)} {html.escape(m.version)}, weights SHA-256 "
                         f"<code>{m.sha256}</code></li>" for m in models)
    doc = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>preannot evaluation</title>
<style>{_CSS}</style></head><body>
<h1>preannot evaluation report</h1>
<p class="small">dataset {html.escape(summary['dataset'])} &middot; {summary['cases']} case(s) &middot; surface tolerance
{summary['options']['tolerance_mm']} mm &middot; lesion detection by {summary['options']['detection']} &middot;
{summary['options']['bootstrap']} bootstrap resamples (95 % CI in brackets)</p>
<ul>{model_list}</ul>
<h2>Summary</h2>
<table><thead><tr><th>model</th><th>label</th><th>Dice</th><th>surface Dice</th><th>HD95 mm</th><th>ASD mm</th>
<th>|volume diff| mm3</th><th>lesion sensitivity</th><th>FP / scan</th><th>inference</th><th>peak RAM</th></tr></thead>
<tbody>{"".join(agg_rows)}</tbody></table>
{"<h2>Paired comparison</h2><table><thead><tr><th>label</th><th>metric</th><th>difference</th><th>cases</th>"
 "<th>mean [95% CI]</th><th>Wilcoxon p</th></tr></thead><tbody>" + comp_rows + "</tbody></table>" if comp_rows else ""}
{"".join(f"<h2>{html.escape(t)}</h2><img src='{src}' alt='{html.escape(t)}'>" for t, src in plots)}
<h2>Worst cases</h2>{"".join(worst_figs) or "<p>none</p>"}
<h2>Per case (click a column to sort)</h2>
<table class="sortable"><thead><tr><th>case</th><th>model</th><th>Dice</th><th>sDice</th><th>HD95</th><th>ASD</th>
<th>ref mm3</th><th>model mm3</th><th>lesions</th><th>detected</th><th>FP</th><th>inference s</th></tr></thead>
<tbody>{"".join(case_rows)}</tbody></table>
<h2>Problems in the dataset</h2><ul class="warn">{problems}</ul>
<script>{_SORT_JS}</script></body></html>"""
    path = out / "report.html"
    path.write_text(doc)
    return path
