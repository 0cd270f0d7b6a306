"""``preannot evaluate``: run one or more models over a labelled dataset and write the report.

Every model runs through the node's own path (``predict_findings``: the same resampling, the same finding
selection as a route), whatever its kind; what is measured follows what the model gives and what the case's
reference holds:

- **regions** (segmentation components or organs): voxel metrics per label (Dice, HD95, ASD, surface
  Dice, volumes) on the reported findings;
- **lesions** (every label the card marks as a finding, a detector's boxes included): candidates matched to
  reference lesions; sensitivity and false positives per scan at the operating point (the findings the
  node would report), the FROC curve over the candidates' scores (confidence when the model gives one, else
  volume) and the sensitivity at 1, 2, 4 and 8 false positives per scan;
- **classes**: per concept, the confusion matrix, accuracy, per-class sensitivity and specificity (Wilson
  intervals) and the one-vs-rest ROC AUC per class and macro-averaged.

Per case and model the result is cached in ``OUT/cases/<case>__<model>.json`` (with an overlay PNG for
regions): a second run skips what is done (resumable). Aggregates carry bootstrap 95 % confidence intervals
(resampling cases); two models are compared case by case (Dice and surface Dice: mean difference with its
bootstrap CI and the Wilcoxon signed-rank test; lesions: the difference in sensitivity at 2 false positives
per scan, bootstrap CI; classes: the difference in macro AUC, bootstrap CI, and in accuracy, exact McNemar).
"""

from __future__ import annotations

import csv
import json
import math
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from node.errors import PreannotError
from node.evaluate.dataset import Case, Dataset, discover, load_reference
from node.evaluate.metrics import (
    FrocData,
    froc_curve,
    label_metrics,
    region_hits,
    roc_auc,
    sensitivity_at,
    wilson,
)
from node.imaging.volume import display_window, load_series
from node.inference.prediction import Runner
from node.inference.registry import ModelInfo
from node.processing.findings import FindingOptions, predict_findings

__all__ = ["FP_RATES", "EvalOptions", "evaluate"]

METRICS = ("dice", "hd95_mm", "asd_mm", "nsd", "abs_volume_diff_mm3")
#: false positives per scan at which the sensitivity is reported
FP_RATES = (1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class EvalOptions:
    tolerance_mm: float = 2.0
    detection: str = "overlap"  # or "centroid"
    centroid_mm: float = 5.0
    bootstrap: int = 2000
    seed: int = 0
    #: which findings count as reported (a route's selection), as the node would apply it
    findings: FindingOptions = field(default_factory=FindingOptions)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:120]


def _overlay(volume: Any, ref: np.ndarray, pred: np.ndarray, path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    err = (ref > 0) ^ (pred > 0)
    k = int(np.argmax(err.sum(axis=(1, 2)))) if err.any() else int(np.argmax((ref > 0).sum(axis=(1, 2))))
    fig = Figure(figsize=(3.2, 3.4))
    ax = fig.subplots()
    lo, hi = display_window(volume.pixels[k], volume.modality)
    ax.imshow(volume.pixels[k], cmap="gray", vmin=lo, vmax=hi)
    if (ref[k] > 0).any():
        ax.contour(ref[k] > 0, levels=[0.5], colors=["#00d000"], linewidths=1.0)
    if (pred[k] > 0).any():
        ax.contour(pred[k] > 0, levels=[0.5], colors=["#ff3030"], linewidths=1.0)
    ax.set_title(f"{title}\nslice {k + 1}: green reference, red model", fontsize=7)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def _label_map(model: ModelInfo) -> dict[str, int]:
    out = {}
    for lab in model.card.labels:
        out[lab.name.lower()] = lab.value
        out[lab.type.meaning.lower()] = lab.value
    return out


def _case(case: Case, model: ModelInfo, runner: Runner, opts: EvalOptions, out: Path) -> dict[str, Any]:
    try:
        import torch

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
    except ImportError:  # pragma: no cover
        cuda = False
    t0 = time.perf_counter()
    volume = load_series(case.image_files, volume=model.card.model.volume)
    t1 = time.perf_counter()
    ref = load_reference(case, volume, label_map=_label_map(model)) if case.reference is not None else None
    t2 = time.perf_counter()
    found = predict_findings(volume, runner, model, options=opts.findings)
    t3 = time.perf_counter()
    sx, sy, sz = volume.spacing
    spacing = (sz, sy, sx)
    labels: dict[str, Any] = {}
    lesions: dict[str, Any] = {}
    reported = {id(r) for r in found.rois}
    pred = found.labels if found.labels is not None else np.zeros(volume.shape, dtype=np.uint8)
    overlay = None
    if ref is not None:
        for lab in model.card.labels:
            cands = [r for r in found.candidates if r.label == lab.value]
            if not any(r.kind == "box" for r in cands):  # boxes have no voxel-wise outline to score
                m = label_metrics(pred == lab.value, ref == lab.value, spacing, tolerance_mm=opts.tolerance_mm)
                m["abs_volume_diff_mm3"] = abs(m["volume_diff_mm3"])
                labels[lab.name] = m
            if lab.finding:
                ref_volumes, hits = region_hits(cands, ref == lab.value, spacing, rule=opts.detection,
                                                centroid_mm=opts.centroid_mm)
                lesions[lab.name] = {
                    "ref_lesions": len(ref_volumes), "ref_volumes_mm3": [round(v, 2) for v in ref_volumes],
                    "candidates": [{"score": r.confidence, "volume_mm3": r.volume_mm3, "hits": h,
                                    "reported": id(r) in reported} for r, h in zip(cands, hits, strict=True)]}
        if labels:
            png = out / "cases" / f"{_safe(case.name)}__{_safe(model.name)}.png"
            first = next(lab for lab in model.card.labels if lab.name in labels)
            _overlay(volume, ref == first.value, pred == first.value, png, f"{case.name} - {model.name}")
            overlay = png.name
    classes = []
    for st in found.statements:
        classes.append({"concept": st.concept.meaning, "predicted": st.name, "reference": case.reference_class,
                        "probabilities": {name: float(p) for _v, name, _c, p in st.probabilities}})
    t4 = time.perf_counter()
    return {
        "case": case.name, "model": model.name, "model_version": model.version, "weights_sha256": model.sha256,
        "series_uid": case.series_uid,
        "reference": case.reference.name if case.reference is not None else None,
        "reference_class": case.reference_class,
        "labels": labels, "lesions": lesions, "classes": classes,
        "timings_s": {"load": round(t1 - t0, 3), "reference": round(t2 - t1, 3),
                      "inference": round(found.timings.get("inference", 0.0), 3),
                      "rois": round(found.timings.get("rois", 0.0), 3), "metrics": round(t4 - t3, 3)},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "overlay": overlay,
    }


def _ci(data: tuple[np.ndarray, ...], statistic: Callable[..., Any], n: int,
        rng: np.random.Generator) -> tuple[float, float]:
    """Percentile bootstrap 95 % CI of a statistic over cases (``scipy.stats.bootstrap``; several arrays
    are resampled together, case by case)."""
    res = stats.bootstrap(data, statistic, n_resamples=n, paired=len(data) > 1, vectorized=True,
                          method="percentile", confidence_level=0.95, rng=rng)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _bootstrap(values: Sequence[float], n: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """Mean and its percentile bootstrap 95 % CI (NaNs dropped)."""
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan, math.nan
    if v.size == 1 or n <= 0 or np.all(v == v[0]):
        return float(v.mean()), float(v.mean()), float(v.mean())
    lo, hi = _ci((v,), lambda x, axis: x.mean(axis=axis), n, rng)
    return float(v.mean()), lo, hi


def _resampled(n_cases: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` bootstrap resamples of case indices (rows)."""
    return rng.integers(0, n_cases, size=(n, n_cases)) if n > 0 and n_cases > 1 else np.zeros((0, n_cases), int)


def _percentile_ci(values: np.ndarray) -> list[float]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return [math.nan, math.nan]
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]


def froc_data(results: list[dict[str, Any]], label: str, *, by: str) -> FrocData:
    """The FROC inputs of one label over the cases: scores are the candidates' confidence (``by`` =
    "confidence") or volume (``by`` = "volume")."""
    refs = np.array([r["lesions"][label]["ref_lesions"] for r in results], dtype=float)
    cands = [[(float(c["score"] if by == "confidence" else c["volume_mm3"]), list(c["hits"]))
              for c in r["lesions"][label]["candidates"]] for r in results]
    return FrocData(refs=refs, candidates=cands)


def _detection(results: list[dict[str, Any]], label: str, n: int, rng: np.random.Generator) -> dict[str, Any]:
    """Lesion-wise figures of one label: the operating point, the FROC curve and the sensitivity at fixed
    false positive rates, with bootstrap intervals over cases."""
    cands = [c for r in results for c in r["lesions"][label]["candidates"]]
    by = "confidence" if cands and all(c["score"] is not None for c in cands) else "volume"
    data = froc_data(results, label, by=by)
    # the operating point: the findings the node reports
    reported = FrocData(refs=data.refs, candidates=[
        [(1.0, list(c["hits"])) for c in r["lesions"][label]["candidates"] if c["reported"]] for r in results])
    det, fps = (m[:, 0] for m in reported.matrices(np.array([0.5])))
    refs_total = float(data.refs.sum())
    sens = float(det.sum() / refs_total) if refs_total else math.nan
    thresholds, curve_sens, curve_fp = froc_curve(data)
    at = {str(rate): sensitivity_at(curve_sens, curve_fp, rate) for rate in FP_RATES}
    idx = _resampled(len(results), n, rng)
    ci: dict[str, Any] = {"sensitivity": [sens, sens], "fp_per_scan": [float(fps.mean()), float(fps.mean())],
                          "at": {k: [v, v] for k, v in at.items()}}
    if len(idx) and refs_total:
        dmat, fmat = data.matrices(thresholds)
        boot_at: dict[str, list[float]] = {str(r): [] for r in FP_RATES}
        boot_sens, boot_fp = [], []
        for rows in idx:
            total = data.refs[rows].sum()
            if total == 0:
                continue
            s = dmat[rows].sum(axis=0) / total
            f = fmat[rows].sum(axis=0) / len(rows)
            for rate in FP_RATES:
                boot_at[str(rate)].append(sensitivity_at(s, f, rate))
            boot_sens.append(det[rows].sum() / total)
            boot_fp.append(fps[rows].mean())
        ci = {"sensitivity": _percentile_ci(np.array(boot_sens)), "fp_per_scan": _percentile_ci(np.array(boot_fp)),
              "at": {k: _percentile_ci(np.array(v)) for k, v in boot_at.items()}}
    return {"lesions": int(refs_total), "detected": int(det.sum()), "sensitivity": sens,
            "sensitivity_ci": ci["sensitivity"], "fp_per_scan": float(fps.mean()), "fp_per_scan_ci": ci["fp_per_scan"],
            "scored_by": by, "sensitivity_at_fp": at, "sensitivity_at_fp_ci": ci["at"],
            "froc": [{"threshold": None if not math.isfinite(t) else float(t), "sensitivity": float(s),
                      "fp_per_scan": float(f)} for t, s, f in zip(thresholds, curve_sens, curve_fp, strict=True)]}


def class_table(results: list[dict[str, Any]], concept: str) -> tuple[list[str], list[str], np.ndarray]:
    """(class names in the card's order, reference class per case, probability matrix cases x classes) of one
    concept, over the cases that have a reference class."""
    rows = [c for r in results for c in r["classes"] if c["concept"] == concept and c["reference"] is not None]
    names = list(rows[0]["probabilities"]) if rows else []
    refs = [c["reference"] for c in rows]
    probs = np.array([[c["probabilities"][k] for k in names] for c in rows], dtype=np.float64).reshape(len(rows), -1)
    return names, refs, probs


def _macro_auc(names: list[str], refs: np.ndarray, probs: np.ndarray) -> float:
    aucs = [roc_auc(probs[:, n], refs == name) for n, name in enumerate(names)]
    finite = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(finite)) if finite else math.nan


def _classification(results: list[dict[str, Any]], concept: str, n: int, rng: np.random.Generator) -> dict[str, Any]:
    """Confusion matrix, accuracy, per-class sensitivity/specificity and ROC AUC of one concept."""
    names, ref_list, probs = class_table(results, concept)
    refs = np.array(ref_list, dtype=object)
    pred = np.array([names[int(i)] for i in probs.argmax(axis=1)], dtype=object) if len(names) else refs
    unknown = sorted({str(x) for x in refs} - set(names))
    confusion = [[int(np.sum((refs == a) & (pred == b))) for b in names] for a in names]
    correct = int(np.sum(refs == pred))
    per_class = {}
    for k, name in enumerate(names):
        pos, neg = refs == name, refs != name
        tp, fn = int(np.sum(pos & (pred == name))), int(np.sum(pos & (pred != name)))
        tn, fp = int(np.sum(neg & (pred != name))), int(np.sum(neg & (pred == name)))
        per_class[name] = {"cases": int(pos.sum()), "sensitivity": tp / (tp + fn) if tp + fn else math.nan,
                           "sensitivity_ci": list(wilson(tp, tp + fn)),
                           "specificity": tn / (tn + fp) if tn + fp else math.nan,
                           "specificity_ci": list(wilson(tn, tn + fp)),
                           "auc": roc_auc(probs[:, k], pos)}
    macro = _macro_auc(names, refs, probs)
    boot = [_macro_auc(names, refs[rows], probs[rows]) for rows in _resampled(len(refs), n, rng)]
    for k, name in enumerate(names):
        vals = [roc_auc(probs[rows, k], refs[rows] == name) for rows in _resampled(len(refs), n, rng)]
        per_class[name]["auc_ci"] = _percentile_ci(np.array(vals, dtype=float)) if vals else [math.nan, math.nan]
    return {"cases": len(refs), "classes": names, "confusion": confusion, "accuracy": correct / len(refs) if len(refs)
            else math.nan, "accuracy_ci": list(wilson(correct, len(refs))), "per_class": per_class,
            "macro_auc": macro, "macro_auc_ci": _percentile_ci(np.array(boot, dtype=float)) if boot
            else [macro, macro], "unknown_reference_classes": unknown}


def _compare(a: ModelInfo, b: ModelInfo, results: dict[str, list[dict[str, Any]]], summary: dict[str, Any],
             opts: EvalOptions, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Case-by-case comparisons of model b against model a."""
    from scipy.stats import binomtest, wilcoxon

    out: list[dict[str, Any]] = []
    ra = {r["case"]: r for r in results[a.name]}
    rb = {r["case"]: r for r in results[b.name]}
    common = sorted(set(ra) & set(rb))
    for lab in a.card.labels:
        lb = b.card.label(lab.value)
        if lb is None:
            continue
        if all(lab.name in ra[c]["labels"] and lb.name in rb[c]["labels"] for c in common) and common:
            for metric in ("dice", "nsd"):
                diffs = [rb[c]["labels"][lb.name][metric] - ra[c]["labels"][lab.name][metric] for c in common]
                mean, lo, hi = _bootstrap(diffs, opts.bootstrap, rng)
                nonzero = [d for d in diffs if not math.isnan(d) and d != 0]
                p = float(wilcoxon(nonzero).pvalue) if len(nonzero) >= 1 else math.nan
                out.append({"label": lab.name, "metric": metric, "a": a.name, "b": b.name, "cases": len(common),
                            "mean_difference_b_minus_a": mean, "ci95": [lo, hi], "test": "Wilcoxon", "p": p})
        if lab.finding and common and all(lab.name in ra[c]["lesions"] and lb.name in rb[c]["lesions"] for c in common):
            da = froc_data([ra[c] for c in common], lab.name, by=summary["models"][a.name]["labels"][lab.name]
                           ["detection"]["scored_by"])
            db = froc_data([rb[c] for c in common], lb.name, by=summary["models"][b.name]["labels"][lb.name]
                           ["detection"]["scored_by"])

            def at2(x: FrocData) -> float:
                _t, s, f = froc_curve(x)
                return sensitivity_at(s, f, 2.0)

            diff = at2(db) - at2(da)
            boot = []
            for rows in _resampled(len(common), opts.bootstrap, rng):
                pick = [int(i) for i in rows]
                sub_a = FrocData(da.refs[pick], [da.candidates[i] for i in pick])
                sub_b = FrocData(db.refs[pick], [db.candidates[i] for i in pick])
                if sub_a.refs.sum():
                    boot.append(at2(sub_b) - at2(sub_a))
            out.append({"label": lab.name, "metric": "sensitivity at 2 FP/scan", "a": a.name, "b": b.name,
                        "cases": len(common), "mean_difference_b_minus_a": diff,
                        "ci95": _percentile_ci(np.array(boot, dtype=float)) if boot else [diff, diff],
                        "test": "bootstrap", "p": math.nan})
    concepts = set(summary["models"][a.name].get("classification", {})) & \
        set(summary["models"][b.name].get("classification", {}))
    for concept in sorted(concepts):
        na, refs_a, pa = class_table([ra[c] for c in common], concept)
        nb, refs_b, pb = class_table([rb[c] for c in common], concept)
        if refs_a != refs_b or na != nb or not refs_a:
            continue
        refs = np.array(refs_a, dtype=object)
        diff = _macro_auc(nb, refs, pb) - _macro_auc(na, refs, pa)
        boot = [_macro_auc(nb, refs[rows], pb[rows]) - _macro_auc(na, refs[rows], pa[rows])
                for rows in _resampled(len(refs), opts.bootstrap, rng)]
        out.append({"label": concept, "metric": "macro AUC", "a": a.name, "b": b.name, "cases": len(refs),
                    "mean_difference_b_minus_a": diff, "ci95": _percentile_ci(np.array(boot, dtype=float)),
                    "test": "bootstrap", "p": math.nan})
        ok_a = np.array([na[int(i)] for i in pa.argmax(axis=1)], dtype=object) == refs
        ok_b = np.array([nb[int(i)] for i in pb.argmax(axis=1)], dtype=object) == refs
        only_a, only_b = int(np.sum(ok_a & ~ok_b)), int(np.sum(ok_b & ~ok_a))
        p = float(binomtest(only_b, only_a + only_b).pvalue) if only_a + only_b else 1.0
        out.append({"label": concept, "metric": "accuracy", "a": a.name, "b": b.name, "cases": len(refs),
                    "mean_difference_b_minus_a": float(ok_b.mean() - ok_a.mean()), "ci95": [math.nan, math.nan],
                    "test": "McNemar (exact)", "p": p})
    return out


def evaluate(root: Path | Dataset, models: Sequence[ModelInfo], out: Path, *, runners: dict[str, Runner] | None = None,
             runner_factory: Callable[[ModelInfo], Runner] | None = None, options: EvalOptions | None = None,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate the models on the dataset (a folder, or a :class:`Dataset` such as the verdict store's);
    write cases/, metrics.csv, summary.json and report.html.

    Returns:
        The summary (also in summary.json).

    Raises:
        PreannotError: the dataset holds no usable case.
    """
    from node.evaluate.report import write_report

    opts = options or EvalOptions()
    dataset = root if isinstance(root, Dataset) else discover(root)
    root = dataset.root
    if not dataset.cases:
        raise PreannotError(f"no (image series, reference) pair under {root}: " + "; ".join(dataset.problems[:5]))
    (out / "cases").mkdir(parents=True, exist_ok=True)
    runners = dict(runners or {})
    results: dict[str, list[dict[str, Any]]] = {m.name: [] for m in models}
    failures: list[str] = list(dataset.problems)
    total = len(dataset.cases) * len(models)
    done = 0
    for model in models:
        for case in dataset.cases:
            done += 1
            cache = out / "cases" / f"{_safe(case.name)}__{_safe(model.name)}.json"
            if cache.exists():
                cached = json.loads(cache.read_text())
                if cached.get("weights_sha256") == model.sha256 and "classes" in cached:
                    results[model.name].append(cached)
                    if progress:
                        progress(f"[{done}/{total}] {case.name} / {model.name}: already done")
                    continue
            try:
                if model.name not in runners:
                    if runner_factory is None:
                        from node.inference.kinds import load_runner

                        runners[model.name] = load_runner(model)
                    else:
                        runners[model.name] = runner_factory(model)
                r = _case(case, model, runners[model.name], opts, out)
            except PreannotError as exc:
                failures.append(f"{case.name} / {model.name}: {exc}")
                if progress:
                    progress(f"[{done}/{total}] {case.name} / {model.name}: FAILED ({exc})")
                continue
            cache.write_text(json.dumps(r, indent=1))
            results[model.name].append(r)
            if progress:
                progress(f"[{done}/{total}] {case.name} / {model.name}: {_one_line(r)}, "
                         f"inference {r['timings_s']['inference']:.1f} s")
    rng = np.random.default_rng(opts.seed)
    summary: dict[str, Any] = {"dataset": str(root), "cases": len(dataset.cases), "problems": failures,
                               "options": {**asdict(opts), "fp_rates": list(FP_RATES)}, "models": {},
                               "comparisons": []}
    rows = []
    for model in models:
        res = results[model.name]
        per_label: dict[str, Any] = {}
        for lab in model.card.labels:
            entry: dict[str, Any] = {}
            scored = [r for r in res if lab.name in r["labels"]]
            if scored:
                agg = {}
                for metric in METRICS:
                    mean, lo, hi = _bootstrap([r["labels"][lab.name][metric] for r in scored], opts.bootstrap, rng)
                    agg[metric] = {"mean": mean, "ci95": [lo, hi]}
                entry["voxel"] = agg
            with_lesions = [r for r in res if lab.name in r["lesions"]]
            if lab.finding and with_lesions:
                entry["detection"] = _detection(with_lesions, lab.name, opts.bootstrap, rng)
            if entry:
                per_label[lab.name] = entry
            for r in res:
                m = r["labels"].get(lab.name, {})
                les = r["lesions"].get(lab.name)
                if not m and les is None:
                    continue
                rows.append({"case": r["case"], "model": model.name, "label": lab.name,
                             **{k: m.get(k) for k in ("dice", "hd95_mm", "asd_mm", "nsd", "volume_ref_mm3",
                                                      "volume_pred_mm3", "volume_diff_mm3")},
                             "ref_lesions": les["ref_lesions"] if les else None,
                             "detected": len({h for c in les["candidates"] if c["reported"] for h in c["hits"]})
                             if les else None,
                             "false_positives": sum(1 for c in les["candidates"] if c["reported"] and not c["hits"])
                             if les else None,
                             "reference_class": None, "predicted_class": None,
                             **r["timings_s"], "peak_rss_mb": r["peak_rss_mb"], "peak_gpu_mb": r["peak_gpu_mb"]})
        classification = {}
        for concept in sorted({c["concept"] for r in res for c in r["classes"]}):
            classification[concept] = _classification(res, concept, opts.bootstrap, rng)
            for r in res:
                for c in r["classes"]:
                    if c["concept"] == concept:
                        rows.append({"case": r["case"], "model": model.name, "label": concept,
                                     **dict.fromkeys(("dice", "hd95_mm", "asd_mm", "nsd", "volume_ref_mm3",
                                                      "volume_pred_mm3", "volume_diff_mm3", "ref_lesions", "detected",
                                                      "false_positives")),
                                     "reference_class": c["reference"], "predicted_class": c["predicted"],
                                     **r["timings_s"], "peak_rss_mb": r["peak_rss_mb"],
                                     "peak_gpu_mb": r["peak_gpu_mb"]})
        times = {k: float(np.mean([r["timings_s"][k] for r in res])) if res else math.nan
                 for k in ("load", "inference", "rois")}
        summary["models"][model.name] = {
            "version": model.version, "weights_sha256": model.sha256, "kind": str(model.kind), "cases_done": len(res),
            "labels": per_label, "classification": classification, "mean_timings_s": times,
            "peak_rss_mb": max((r["peak_rss_mb"] for r in res), default=None),
            "peak_gpu_mb": max((r["peak_gpu_mb"] or 0 for r in res), default=None)}
    if len(models) >= 2:
        summary["comparisons"] = _compare(models[0], models[1], results, summary, opts, rng)
    if rows:
        with (out / "metrics.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    write_report(summary, results, list(models), out)
    return summary


def _one_line(r: dict[str, Any]) -> str:
    """A case's headline figure for the progress line."""
    if r["labels"]:
        name, m = next(iter(r["labels"].items()))
        return f"{name} Dice {m['dice']:.3f}"
    if r["lesions"]:
        name, les = next(iter(r["lesions"].items()))
        hit = len({h for c in les["candidates"] if c["reported"] for h in c["hits"]})
        return f"{name} {hit}/{les['ref_lesions']} lesions found"
    if r["classes"]:
        c = r["classes"][0]
        return f"{c['concept']}: {c['predicted']} (reference {c['reference']})"
    return "nothing to score"
