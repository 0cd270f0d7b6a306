"""Agreement between the models and the radiologists over time, and drift alerts.

Computed from every verdict on each judged result, merged finding by finding (``store.merge_evidence``: a
SEG's outline is not undone by a later signed SR; an SR that drops a finding rejects it). Rates carry a 95 %
Wilson interval, means a 95 % t interval.

Alerts (per model and version):
- ``acceptance_floor``: acceptance over the last ``alert_window`` judged studies below the floor;
- ``acceptance_drop``: acceptance of the studies after the baseline period (the first ``baseline_days``
  of verdicts) lower than during it, two-proportion z-test at ``alert_p``;
- ``input_shift``: the distribution of a source-series attribute (manufacturer, scanner model, kernel,
  slice thickness, kVp, contrast) of the processed series after the baseline period differs from the
  baseline's, chi-square test at ``alert_p``; or a percentile of their values (HU for CT: 5th, median,
  95th, from each job's ``intensity`` profile) is distributed differently, two-sample Kolmogorov-Smirnov
  test at ``alert_p``.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

from node.config import VerdictsConfig
from node.store.jobs import JobStore
from node.verdicts.store import VerdictStore

__all__ = ["INPUT_ATTRIBUTES", "agreement", "alerts", "mean_ci", "wilson"]

INPUT_ATTRIBUTES = ("Manufacturer", "ManufacturerModelName", "ConvolutionKernel", "SliceThickness", "KVP",
                    "ContrastBolusAgent")
#: percentiles of each processed series' values (the job result's ``intensity``) watched for drift
INTENSITY_STATISTICS = ("p5", "p50", "p95")
_DAY = 86400.0


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float | None, float | None]:
    """95 % Wilson score interval of a proportion k / n."""
    if n == 0:
        return None, None
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)


def mean_ci(values: list[float]) -> tuple[float | None, float | None, float | None]:
    """Mean and 95 % t interval (None where there are too few values)."""
    if not values:
        return None, None, None
    m = statistics.fmean(values)
    if len(values) < 2:
        return round(m, 4), None, None
    from scipy.stats import t

    half = float(t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return round(m, 4), round(m - half, 4), round(m + half, 4)


def _summary(rows: list[dict[str, Any]], store: VerdictStore) -> dict[str, Any]:
    n_ai = sum(r["n_ai"] for r in rows)
    acc = sum(r["accepted"] for r in rows)
    edited = sum(r["edited"] for r in rows)
    lo, hi = wilson(acc, n_ai)
    rej_mean, rej_lo, rej_hi = mean_ci([float(r["rejected"]) for r in rows])
    add_mean, add_lo, add_hi = mean_ci([float(r["added"]) for r in rows])
    dice_mean, dice_lo, dice_hi = mean_ci([d for r in rows for d in r["edit_dice"]])
    times = [r["time_to_verdict_s"] for r in rows if r["time_to_verdict_s"] is not None]
    return {
        "studies": len(rows), "ai_findings": n_ai, "accepted": acc, "edited": edited,
        "acceptance": round(acc / n_ai, 4) if n_ai else None, "acceptance_ci": [lo, hi],
        "edit_dice": dice_mean, "edit_dice_ci": [dice_lo, dice_hi],
        "rejected_per_study": rej_mean, "rejected_per_study_ci": [rej_lo, rej_hi],
        "added_per_study": add_mean, "added_per_study_ci": [add_lo, add_hi],
        "median_time_to_verdict_s": round(statistics.median(times), 1) if times else None,
        "study_verdicts": dict(Counter(r["study_verdict"] for r in rows)),
    }


def agreement(store: VerdictStore, *, by: str = "version", model: str | None = None,
              window: int | None = None) -> list[dict[str, Any]]:
    """One row per model and version (``by="version"``), per model and scanner (``"scanner"``) or per
    model, version and ISO week (``"week"``, for trends); ``window``: only each group's last ``window`` judged
    studies (the gauges, over the alert window)."""
    import time

    groups: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in store.merged_per_job(model=model):
        if by == "scanner":
            key: tuple[str, ...] = (r["model"], r["scanner"])
        elif by == "week":
            key = (r["model"], r["model_version"], time.strftime("%G-W%V", time.gmtime(r["received_at"])))
        else:
            key = (r["model"], r["model_version"])
        groups[key].append(r)
    names = {"version": ("model", "model_version"), "scanner": ("model", "scanner"),
             "week": ("model", "model_version", "week")}[by]
    return [{**dict(zip(names, key, strict=True)), **_summary(rows[-window:] if window else rows, store)}
            for key, rows in sorted(groups.items())]


def _two_proportion_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """One-sided p-value that proportion 2 is lower than proportion 1 (pooled z-test)."""
    if n1 == 0 or n2 == 0:
        return 1.0
    p = (k1 + k2) / (n1 + n2)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    z = (k1 / n1 - k2 / n2) / se
    from scipy.stats import norm

    return float(norm.sf(z))


def _periods(rows: list[dict[str, Any]], ts_key: str, days: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if not rows:
        return [], []
    start = min(r[ts_key] for r in rows)
    return ([r for r in rows if r[ts_key] < start + days * _DAY], [r for r in rows if r[ts_key] >= start + days * _DAY])


def _by_scanner(rows: Iterable[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in rows:
        out[r["scanner"]][0] += r["accepted"]
        out[r["scanner"]][1] += r["n_ai"]
    return {k: (v[0], v[1]) for k, v in out.items()}


def alerts(store: VerdictStore, jobs: JobStore, config: VerdictsConfig) -> list[dict[str, Any]]:
    """The drift alerts that hold now (see the module doc), most severe first."""
    out: list[dict[str, Any]] = []
    by_version: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in store.merged_per_job():
        by_version[(r["model"], r["model_version"])].append(r)
    for (model, version), rows in sorted(by_version.items()):
        recent = rows[-config.alert_window:]
        n_ai = sum(r["n_ai"] for r in recent)
        acc = sum(r["accepted"] for r in recent)
        if len(recent) >= min(config.alert_window, 5) and n_ai and acc / n_ai < config.alert_acceptance_floor:
            out.append({"kind": "acceptance_floor", "model": model, "version": version, "severity": "critical",
                        "message": f"acceptance {acc / n_ai:.0%} over the last {len(recent)} studies is below the "
                                   f"floor {config.alert_acceptance_floor:.0%}",
                        "value": round(acc / n_ai, 4), "studies": len(recent)})
        base, after = _periods(rows, "received_at", config.baseline_days)
        after = after[-config.alert_window:]
        kb, nb = sum(r["accepted"] for r in base), sum(r["n_ai"] for r in base)
        ka, na = sum(r["accepted"] for r in after), sum(r["n_ai"] for r in after)
        p = _two_proportion_p(kb, nb, ka, na)
        if after and p < config.alert_p:
            base_sc, after_sc = _by_scanner(base), _by_scanner(after)
            table = [{"scanner": s, "baseline": round(base_sc[s][0] / base_sc[s][1], 4) if base_sc.get(s, (0, 0))[1] else None,
                      "recent": round(after_sc[s][0] / after_sc[s][1], 4) if after_sc.get(s, (0, 0))[1] else None,
                      "recent_findings": after_sc.get(s, (0, 0))[1]} for s in sorted(set(base_sc) | set(after_sc))]
            out.append({"kind": "acceptance_drop", "model": model, "version": version, "severity": "warning",
                        "message": f"acceptance fell from {kb / nb:.0%} (baseline, {len(base)} studies) to "
                                   f"{ka / na:.0%} (last {len(after)} studies), p = {p:.2g}",
                        "p": p, "by_scanner": table})
    out.extend(_input_shifts(jobs, config))
    order = {"critical": 0, "warning": 1}
    return sorted(out, key=lambda a: order.get(a["severity"], 2))


def _input_shifts(jobs: JobStore, config: VerdictsConfig) -> list[dict[str, Any]]:
    """Chi-square per attribute, Kolmogorov-Smirnov per intensity percentile: baseline period vs the latest series."""
    from scipy.stats import chi2_contingency, ks_2samp

    rows = jobs.processed_inputs()
    per_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        per_model[r["model"]].append(r)
    out = []
    for model, mrows in sorted(per_model.items()):
        base, after = _periods(mrows, "created_at", config.baseline_days)
        after = after[-max(config.alert_window, 5):]
        if len(base) < 5 or len(after) < 5:
            continue
        for attr in INPUT_ATTRIBUTES:
            def value(r: dict[str, Any], attr: str = attr) -> str:
                v = r["attrs"].get(attr)
                return "\\".join(v) if isinstance(v, list) else ("(none)" if v in (None, "") else str(v))
            cb, ca = Counter(value(r) for r in base), Counter(value(r) for r in after)
            cats = sorted(set(cb) | set(ca))
            if len(cats) < 2:
                continue
            _, p, _, _ = chi2_contingency([[cb[c] for c in cats], [ca[c] for c in cats]])
            if p < config.alert_p:
                shares = sorted(cats, key=lambda c: abs(ca[c] / len(after) - cb[c] / len(base)), reverse=True)
                top = shares[0]
                out.append({"kind": "input_shift", "model": model, "attribute": attr, "severity": "warning",
                            "p": float(p),
                            "message": f"{attr} of the series processed by {model} changed: {top!r} is "
                                       f"{ca[top] / len(after):.0%} of the last {len(after)} series, "
                                       f"{cb[top] / len(base):.0%} in the baseline ({len(base)} series), p = {p:.2g}",
                            "baseline": dict(cb), "recent": dict(ca)})
        for stat in INTENSITY_STATISTICS:
            xb = [float(r["intensity"][stat]) for r in base if stat in r["intensity"]]
            xa = [float(r["intensity"][stat]) for r in after if stat in r["intensity"]]
            if len(xb) < 5 or len(xa) < 5:
                continue
            p = float(ks_2samp(xb, xa).pvalue)
            if p < config.alert_p:
                mb, ma = statistics.median(xb), statistics.median(xa)
                out.append({"kind": "input_shift", "model": model, "attribute": f"intensity {stat}",
                            "severity": "warning", "p": p,
                            "message": f"the {stat} of the values of the series processed by {model} moved from "
                                       f"{mb:.0f} (baseline median, {len(xb)} series) to {ma:.0f} (last {len(xa)}), "
                                       f"p = {p:.2g}"})
    return out
