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

from node.evaluate.metrics import roc_auc
from node.evaluate.run import class_table
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


def _ci_text(value: Any, ci: Any, digits: int = 3) -> str:
    return f"{_fmt(value, digits)} [{_fmt(ci[0], digits)}, {_fmt(ci[1], digits)}]"


def write_report(summary: dict[str, Any], results: dict[str, list[dict[str, Any]]], models: list[ModelInfo],
                 out: Path) -> Path:
    """Write ``out/report.html`` and return its path."""
    from matplotlib.figure import Figure

    names = [m.name for m in models]
    plots = []
    # segmentation: the first label each model scores voxel-wise
    voxel_label = {n: next((lab for lab, e in summary["models"][n]["labels"].items() if "voxel" in e), None)
                   for n in names}
    seg_models = [n for n in names if voxel_label[n] is not None]
    if seg_models:
        fig = Figure(figsize=(14, 3.4))
        axes = fig.subplots(1, 4)
        for ax, metric, title in zip(axes, ("dice", "nsd", "hd95_mm", "asd_mm"),
                                     ("Dice", "surface Dice", "HD95 (mm)", "ASD (mm)"), strict=True):
            data = [[r["labels"][voxel_label[n]][metric] for r in results[n] if voxel_label[n] in r["labels"]
                     and not math.isnan(r["labels"][voxel_label[n]][metric])] for n in seg_models]
            ax.boxplot(data, tick_labels=seg_models, showmeans=True)
            ax.set_title(title, fontsize=10)
            ax.tick_params(labelsize=8)
        fig.suptitle("per-case metrics, " + ", ".join(f"{n}: {voxel_label[n]}" for n in seg_models), fontsize=10)
        plots.append(("Metrics per case (box: quartiles, triangle: mean)", _png(fig)))
        fig = Figure(figsize=(5 * len(seg_models), 3.6))
        axes = fig.subplots(1, len(seg_models), squeeze=False)
        for ax, n in zip(axes[0], seg_models, strict=True):
            lab = voxel_label[n]
            rows = [r["labels"][lab] for r in results[n] if lab in r["labels"]]
            ref = np.array([m["volume_ref_mm3"] for m in rows])
            pred = np.array([m["volume_pred_mm3"] for m in rows])
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
    detections = [(n, lab, e["detection"]) for n in names for lab, e in summary["models"][n]["labels"].items()
                  if "detection" in e]
    if detections:
        fig = Figure(figsize=(5.5, 4))
        ax = fig.subplots()
        for n, lab, det in detections:
            pts = [p for p in det["froc"] if p["fp_per_scan"] <= 16]
            ax.plot([p["fp_per_scan"] for p in pts], [p["sensitivity"] for p in pts], marker=".",
                    label=f"{n} / {lab} (by {det['scored_by']})")
            ax.scatter([det["fp_per_scan"]], [det["sensitivity"]], s=90, facecolors="none", edgecolors="black")
        for rate in summary["options"].get("fp_rates", []):
            ax.axvline(rate, color="#cccccc", linewidth=0.8)
        ax.set_xlabel("false positives per scan")
        ax.set_ylabel("lesion sensitivity")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
        ax.set_title("FROC over the candidates (circle: the reported findings)", fontsize=9)
        plots.append(("FROC", _png(fig)))
    class_tables = []
    for n in names:
        for concept, c in summary["models"][n].get("classification", {}).items():
            class_tables.append({
                "model": n, "concept": concept, "cases": c["cases"], "names": c["classes"],
                "accuracy": _ci_text(c["accuracy"], c["accuracy_ci"]),
                "macro_auc": _ci_text(c["macro_auc"], c["macro_auc_ci"]),
                "unknown": ", ".join(c["unknown_reference_classes"]),
                "confusion": [[name, *row] for name, row in zip(c["classes"], c["confusion"], strict=True)],
                "per_class": [[k, v["cases"], _ci_text(v["sensitivity"], v["sensitivity_ci"]),
                               _ci_text(v["specificity"], v["specificity_ci"]), _ci_text(v["auc"], v["auc_ci"])]
                              for k, v in c["per_class"].items()]})
            fig = Figure(figsize=(4.2, 4))
            ax = fig.subplots()
            cls, refs, probs = class_table(results[n], concept)
            refs_arr = np.array(refs, dtype=object)
            for k, name in enumerate(cls):
                pos = refs_arr == name
                if not pos.any() or pos.all():
                    continue
                order = np.argsort(-probs[:, k], kind="stable")
                tpr = np.concatenate([[0.0], np.cumsum(pos[order]) / pos.sum()])
                fpr = np.concatenate([[0.0], np.cumsum(~pos[order]) / (~pos).sum()])
                ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc(probs[:, k], pos):.2f})")
            ax.plot([0, 1], [0, 1], color="#bbbbbb", linewidth=0.8)
            ax.set_xlabel("1 - specificity")
            ax.set_ylabel("sensitivity")
            ax.legend(fontsize=7)
            ax.set_title(f"{n}: {concept}, one vs rest", fontsize=9)
            plots.append((f"ROC curves: {n} / {concept}", _png(fig)))

    agg_rows, det_rows = [], []
    fp_rates = summary["options"].get("fp_rates", [])
    for n in names:
        m = summary["models"][n]
        for lab, entry in m["labels"].items():
            if "voxel" in entry:
                v = entry["voxel"]
                agg_rows.append([n, lab] + [_ci_text(v[k]["mean"], v[k]["ci95"])
                                            for k in ("dice", "nsd", "hd95_mm", "asd_mm", "abs_volume_diff_mm3")]
                                + [f"{_fmt(m['mean_timings_s']['inference'], 2)} s", f"{_fmt(m['peak_rss_mb'], 0)} MB"])
            det = entry.get("detection")
            if det:
                det_rows.append([n, lab, det["lesions"],
                                 f"{_ci_text(det['sensitivity'], det['sensitivity_ci'])} ({det['detected']}/{det['lesions']})",
                                 _ci_text(det["fp_per_scan"], det["fp_per_scan_ci"], 2)]
                                + [_ci_text(det["sensitivity_at_fp"][str(r)], det["sensitivity_at_fp_ci"][str(r)])
                                   for r in fp_rates] + [det["scored_by"]])
    comp_rows = [[c["label"], c["metric"], f"{c['b']} - {c['a']}", c["cases"],
                  _ci_text(c["mean_difference_b_minus_a"], c["ci95"]), c.get("test", ""), _fmt(c.get("p"), 4)]
                 for c in summary["comparisons"]]
    case_rows = []
    for n in names:
        for r in results[n]:
            labels = sorted(set(r["labels"]) | set(r["lesions"]))
            for lab in labels:
                m = r["labels"].get(lab, {})
                les = r["lesions"].get(lab)
                detected = len({h for c in les["candidates"] if c["reported"] for h in c["hits"]}) if les else "–"
                fps = sum(1 for c in les["candidates"] if c["reported"] and not c["hits"]) if les else "–"
                case_rows.append([r["case"], n, lab, _fmt(m.get("dice")), _fmt(m.get("nsd")), _fmt(m.get("hd95_mm"), 2),
                                  _fmt(m.get("asd_mm"), 2), _fmt(m.get("volume_ref_mm3"), 0),
                                  _fmt(m.get("volume_pred_mm3"), 0), les["ref_lesions"] if les else "–", detected, fps,
                                  "–", "–", _fmt(r["timings_s"]["inference"], 2)])
            for c in r["classes"]:
                case_rows.append([r["case"], n, c["concept"], *(["–"] * 9), c["reference"] or "–", c["predicted"],
                                  _fmt(r["timings_s"]["inference"], 2)])
    scored = [r for n in names for r in results[n] if r["labels"] and r.get("overlay")]
    worst = sorted(scored, key=lambda r: next(iter(r["labels"].values()))["dice"])[:6]
    worst_figs = [{"src": "data:image/png;base64," + base64.b64encode((out / "cases" / r["overlay"]).read_bytes()).decode(),
                   "caption": f"{r['case']} / {r['model']}: Dice {_fmt(next(iter(r['labels'].values()))['dice'])}",
                   "case": r["case"]}
                  for r in worst if (out / "cases" / r["overlay"]).exists()]
    doc = _ENV.get_template("report.html").render(
        css=_CSS, sort_js=_SORT_JS, summary=summary, models=models, agg_rows=agg_rows, det_rows=det_rows,
        fp_rates=fp_rates, class_tables=class_tables, comp_rows=comp_rows, plots=plots, worst=worst_figs,
        case_rows=case_rows, problems=summary["problems"])
    path = out / "report.html"
    path.write_text(doc)
    return path
