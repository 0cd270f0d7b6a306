"""``preannot evaluate``: run one or more models over a labelled dataset and write the report.

Per case and model the result is cached in ``OUT/cases/<case>__<model>.json`` (with an overlay PNG):
a second run skips what is done (resumable). Aggregates carry bootstrap 95 % confidence intervals
(resampling cases); two models are compared case by case (mean difference with its bootstrap CI and
the Wilcoxon signed-rank test).
"""

from __future__ import annotations

import csv
import json
import math
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from node.errors import PreannotError
from node.evaluate.dataset import Case, Dataset, discover, load_reference
from node.evaluate.metrics import LesionMatch, label_metrics, lesion_matches
from node.imaging.regrid import regularize
from node.imaging.volume import display_window, load_series
from node.inference.registry import ModelInfo
from node.inference.rois import extract_rois, paint_rois, relocate_rois
from node.inference.runner import Runner

__all__ = ["EvalOptions", "evaluate"]

METRICS = ("dice", "hd95_mm", "asd_mm", "nsd", "abs_volume_diff_mm3")
FROC_MIN_VOLUMES = (0.0, 5.0, 10.0, 15.0, 25.0, 50.0, 100.0, 200.0, 500.0)


@dataclass(frozen=True)
class EvalOptions:
    tolerance_mm: float = 2.0
    detection: str = "overlap"  # or "centroid"
    centroid_mm: float = 5.0
    bootstrap: int = 2000
    seed: int = 0


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


def _case(case: Case, model: ModelInfo, runner: Runner, opts: EvalOptions, out: Path) -> dict[str, Any]:
    try:
        import torch

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
    except ImportError:  # pragma: no cover
        cuda = False
    t0 = time.perf_counter()
    volume = load_series(case.image_files)
    t1 = time.perf_counter()
    label_map = {}
    for lab in model.card.labels:
        label_map[lab.name.lower()] = lab.value
        label_map[lab.type.meaning.lower()] = lab.value
    ref = load_reference(case, volume, label_map=label_map)
    t2 = time.perf_counter()
    grid = regularize(volume)  # a tilted or unevenly spaced series: as the node processes it
    if grid is None:
        raw = runner.predict(volume)
        t3 = time.perf_counter()
        rois = extract_rois(raw, volume, model.card, outlines=False)
    else:
        raw_grid = runner.predict(grid.volume)
        t3 = time.perf_counter()
        raw = grid.to_source(raw_grid)
        rois, _ = relocate_rois(extract_rois(raw_grid, grid.volume, model.card, outlines=False), grid)
    pred = paint_rois(rois, shape=volume.shape)
    t4 = time.perf_counter()
    sx, sy, sz = volume.spacing
    spacing = (sz, sy, sx)
    labels = {}
    lesions: dict[str, Any] = {}
    for lab in model.card.labels:
        m = label_metrics(pred == lab.value, ref == lab.value, spacing, tolerance_mm=opts.tolerance_mm)
        m["abs_volume_diff_mm3"] = abs(m["volume_diff_mm3"])
        labels[lab.name] = m
        if lab.finding:
            lesions[lab.name] = lesion_matches(raw == lab.value, ref == lab.value, spacing, rule=opts.detection,
                                               centroid_mm=opts.centroid_mm).to_dict()
    t5 = time.perf_counter()
    png = out / "cases" / f"{_safe(case.name)}__{_safe(model.name)}.png"
    first = model.card.labels[0]
    _overlay(volume, ref == first.value, pred == first.value, png, f"{case.name} - {model.name}")
    result = {
        "case": case.name, "model": model.name, "model_version": model.version, "weights_sha256": model.sha256,
        "series_uid": case.series_uid, "reference": str(case.reference.relative_to(case.reference.parents[1]))
        if len(case.reference.parents) > 1 else case.reference.name,
        "labels": labels, "lesions": lesions,
        "timings_s": {"load": round(t1 - t0, 3), "reference": round(t2 - t1, 3), "inference": round(t3 - t2, 3),
                      "rois": round(t4 - t3, 3), "metrics": round(t5 - t4, 3)},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "overlay": png.name,
    }
    return result


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


def _detection(results: list[dict[str, Any]], label: str, min_volume: float, n: int,
               rng: np.random.Generator) -> dict[str, Any]:
    matches = [LesionMatch(ref_lesions=r["lesions"][label]["ref_lesions"], detected=r["lesions"][label]["detected"],
                           pred_volumes_mm3=r["lesions"][label]["pred_volumes_mm3"],
                           pred_is_tp=r["lesions"][label]["pred_is_tp"],
                           ref_detected_by_min_volume=r["lesions"][label]["ref_hits"]) for r in results]
    per_case = [m.counts_at(min_volume) for m in matches]
    refs = np.array([m.ref_lesions for m in matches], dtype=float)
    det = np.array([c[0] for c in per_case], dtype=float)
    fps = np.array([c[1] for c in per_case], dtype=float)
    sens = float(det.sum() / refs.sum()) if refs.sum() else math.nan
    if n > 0 and len(matches) > 1 and refs.sum():
        sens_ci = _ci((det, refs), lambda d, r, axis: d.sum(axis=axis) / np.maximum(r.sum(axis=axis), 1), n, rng)
        fp_ci = _ci((fps,), lambda x, axis: x.mean(axis=axis), n, rng) if np.ptp(fps) > 0 \
            else (float(fps.mean()), float(fps.mean()))
    else:
        sens_ci, fp_ci = (sens, sens), (float(fps.mean()), float(fps.mean()))
    froc = []
    for mv in FROC_MIN_VOLUMES:
        counts = [m.counts_at(mv) for m in matches]
        froc.append({"min_volume_mm3": mv, "sensitivity": sum(c[0] for c in counts) / refs.sum() if refs.sum()
                     else math.nan, "fp_per_scan": sum(c[1] for c in counts) / len(matches)})
    return {"lesions": int(refs.sum()), "detected": int(det.sum()), "sensitivity": sens, "sensitivity_ci": sens_ci,
            "fp_per_scan": float(fps.mean()), "fp_per_scan_ci": fp_ci, "operating_min_volume_mm3": min_volume,
            "froc": froc}


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
        raise PreannotError(f"no (image series, reference segmentation) pair under {root}: "
                            + "; ".join(dataset.problems[:5]))
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
                if cached.get("weights_sha256") == model.sha256:
                    results[model.name].append(cached)
                    if progress:
                        progress(f"[{done}/{total}] {case.name} / {model.name}: already done")
                    continue
            try:
                if model.name not in runners:
                    if runner_factory is None:
                        from node.inference.runner import load_runner

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
                d = next(iter(r["labels"].values()))["dice"]
                progress(f"[{done}/{total}] {case.name} / {model.name}: Dice {d:.3f}, "
                         f"inference {r['timings_s']['inference']:.1f} s")
    rng = np.random.default_rng(opts.seed)
    summary: dict[str, Any] = {"dataset": str(root), "cases": len(dataset.cases), "problems": failures,
                               "options": opts.__dict__, "models": {}, "comparisons": []}
    rows = []
    for model in models:
        res = results[model.name]
        per_label: dict[str, Any] = {}
        for lab in model.card.labels:
            agg = {}
            for metric in METRICS:
                mean, lo, hi = _bootstrap([r["labels"][lab.name][metric] for r in res], opts.bootstrap, rng)
                agg[metric] = {"mean": mean, "ci95": [lo, hi]}
            entry: dict[str, Any] = {"voxel": agg}
            if lab.finding and res:
                entry["detection"] = _detection(res, lab.name, lab.min_volume_mm3, opts.bootstrap, rng)
            per_label[lab.name] = entry
            for r in res:
                m = r["labels"][lab.name]
                les = r["lesions"].get(lab.name, {})
                rows.append({"case": r["case"], "model": model.name, "label": lab.name,
                             **{k: m[k] for k in ("dice", "hd95_mm", "asd_mm", "nsd", "volume_ref_mm3",
                                                  "volume_pred_mm3", "volume_diff_mm3")},
                             "ref_lesions": les.get("ref_lesions"), "detected": les.get("detected"),
                             "false_positives": les.get("false_positives"), **r["timings_s"],
                             "peak_rss_mb": r["peak_rss_mb"], "peak_gpu_mb": r["peak_gpu_mb"]})
        times = {k: float(np.mean([r["timings_s"][k] for r in res])) if res else math.nan
                 for k in ("load", "inference", "rois")}
        summary["models"][model.name] = {
            "version": model.version, "weights_sha256": model.sha256, "cases_done": len(res), "labels": per_label,
            "mean_timings_s": times, "peak_rss_mb": max((r["peak_rss_mb"] for r in res), default=None),
            "peak_gpu_mb": max((r["peak_gpu_mb"] or 0 for r in res), default=None)}
    if len(models) >= 2:
        from scipy.stats import wilcoxon

        a, b = models[0], models[1]
        ra = {r["case"]: r for r in results[a.name]}
        rb = {r["case"]: r for r in results[b.name]}
        common = sorted(set(ra) & set(rb))
        for lab in a.card.labels:
            if b.card.label(lab.value) is None:
                continue
            lb = b.card.label(lab.value)
            assert lb is not None
            for metric in ("dice", "nsd"):
                diffs = [rb[c]["labels"][lb.name][metric] - ra[c]["labels"][lab.name][metric] for c in common]
                mean, lo, hi = _bootstrap(diffs, opts.bootstrap, rng)
                nonzero = [d for d in diffs if not math.isnan(d) and d != 0]
                p = float(wilcoxon(nonzero).pvalue) if len(nonzero) >= 1 else math.nan
                summary["comparisons"].append({"label": lab.name, "metric": metric, "a": a.name, "b": b.name,
                                               "cases": len(common), "mean_difference_b_minus_a": mean,
                                               "ci95": [lo, hi], "wilcoxon_p": p})
    if rows:
        with (out / "metrics.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    write_report(summary, results, list(models), out)
    return summary
