"""The self-contained HTML report: plots embedded as PNG, a sortable per-case table, worst cases.

The page is a Jinja2 template (``evaluate/templates/report.html``, autoescaped); this module computes
the figures and the table cells."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape

from node.inference.registry import ModelInfo

__all__ = ["write_report"]

_ENV = Environment(loader=PackageLoader("node.evaluate", "templates"), autoescape=select_autoescape(["html"]))

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
    """A number for the report (text: the template escapes it)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


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
            cells = [n, lab] + [f"{_fmt(v[k]['mean'])} [{_fmt(v[k]['ci95'][0])}, {_fmt(v[k]['ci95'][1])}]"
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
            agg_rows.append(cells)
    comp_rows = [[c["label"], c["metric"], f"{c['b']} - {c['a']}", c["cases"],
                  f"{_fmt(c['mean_difference_b_minus_a'])} [{_fmt(c['ci95'][0])}, {_fmt(c['ci95'][1])}]",
                  _fmt(c["wilcoxon_p"], 4)] for c in summary["comparisons"]]
    case_rows = []
    for n in names:
        for r in results[n]:
            m = r["labels"][first]
            les = r["lesions"].get(first, {})
            case_rows.append([r["case"], n, _fmt(m["dice"]), _fmt(m["nsd"]), _fmt(m["hd95_mm"], 2),
                              _fmt(m["asd_mm"], 2), _fmt(m["volume_ref_mm3"], 0), _fmt(m["volume_pred_mm3"], 0),
                              les.get("ref_lesions", "–"), les.get("detected", "–"), les.get("false_positives", "–"),
                              _fmt(r["timings_s"]["inference"], 2)])
    worst = sorted((r for n in names for r in results[n]), key=lambda r: r["labels"][first]["dice"])[:6]
    worst_figs = [{"src": "data:image/png;base64," + base64.b64encode((out / "cases" / r["overlay"]).read_bytes()).decode(),
                   "caption": f"{r['case']} / {r['model']}: Dice {_fmt(r['labels'][first]['dice'])}", "case": r["case"]}
                  for r in worst if (out / "cases" / r["overlay"]).exists()]
    doc = _ENV.get_template("report.html").render(
        css=_CSS, sort_js=_SORT_JS, summary=summary, models=models, agg_rows=agg_rows, comp_rows=comp_rows,
        plots=plots, worst=worst_figs, case_rows=case_rows, problems=summary["problems"])
    path = out / "report.html"
    path.write_text(doc)
    return path
