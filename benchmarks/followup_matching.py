"""Follow-up matching on synthetic pairs: how often each lesion keeps its identity (or is said new / not seen).

Each pair (``node.devtools.synth.followup``) is one phantom patient scanned twice: the second time in another frame
of reference, the patient moved by a random rigid motion (a table shift of 10 to 25 mm, up to 8 mm across, up to
5 degrees about each axis), one lesion grown 40 % in volume, one shrunk to 55 %, one unchanged, one gone and one
new (a lesion the motion takes out of the follow-up's field of view must be said not seen). The findings given to
the matcher are the lesions' own (the truth's volumes and centres), so the figure is
that of the alignment and the matching, not of a detector. A lesion counts as right when a tracked one is paired
with itself, the gone one is said not seen and the new one new.

    python -m benchmarks.followup_matching --pairs 50
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from node.config import FollowUpConfig
from node.devtools.synth.followup import make_followup_pair
from node.devtools.synth.phantom import Phantom
from node.followup.register import RegistrationError, register
from node.followup.track import NEW, NOT_SEEN, Current, PriorFinding, match_findings
from node.imaging.volume import Volume


def as_volume(phantom: Phantom) -> Volume:
    g = phantom.geometry
    affine = np.diag([g.spacing_xy, g.spacing_xy, g.spacing_z, 1.0])
    affine[:3, 3] = g.origin
    return Volume(pixels=phantom.hu, affine=affine, sources=[], frames=[], modality="CT")


def run(pairs: int, first_seed: int, out: Path | None) -> dict[str, object]:
    cfg = FollowUpConfig()
    rng = np.random.default_rng(first_seed)
    right = total = failed_alignments = 0
    per_status: dict[str, list[int]] = {}
    rows: list[dict[str, Any]] = []
    seconds = []
    seed = first_seed
    done = 0
    while done < pairs:
        seed += 1
        rot = tuple(float(v) for v in rng.uniform(-5.0, 5.0, 3))
        shift = (float(rng.uniform(-8, 8)), float(rng.uniform(-8, 8)), float(rng.choice([-1, 1]) * rng.uniform(10, 25)))
        try:
            pair = make_followup_pair(seed, rotation_deg=rot, translation_mm=shift)  # type: ignore[arg-type]
        except ValueError:
            continue  # no room for five lesions in this seed's lungs
        done += 1
        t = time.perf_counter()
        try:
            alignment = register(as_volume(pair.prior), as_volume(pair.current), min_ncc=cfg.min_ncc)
        except RegistrationError as exc:
            failed_alignments += 1
            total += len(pair.lesions)
            rows.append({"seed": seed, "error": str(exc)})
            continue
        seconds.append(time.perf_counter() - t)
        prior = [PriorFinding(f"p{les.prior_index}", f"Nodule {les.prior_index}", 1, "finding", les.prior_volume_mm3,
                              None, les.prior_center_mm) for les in pair.lesions if les.prior_center_mm is not None]
        current = [Current(les.current_index, 1, "finding", les.current_volume_mm3, None, les.current_center_mm)
                   for les in pair.lesions if les.current_center_mm is not None]
        changes, matched = match_findings(prior, current, alignment, min_gate_mm=cfg.min_gate_mm,
                                          gate_factor=cfg.gate_factor, growth_pct=cfg.growth_pct)
        status_of = {c.number: c.status for c in changes if c.number is not None}
        gone = {c.tracking_uid for c in changes if c.status == NOT_SEEN}
        errors = []
        for les in pair.lesions:
            if les.status in ("gone", "out of view"):  # not in the follow-up: said not seen
                ok = f"p{les.prior_index}" in gone
            elif les.status == "new":
                ok = status_of.get(les.current_index) == NEW
            else:
                p = matched.get(les.current_index)
                ok = p is not None and p.tracking_uid == f"p{les.prior_index}"
            right += ok
            total += 1
            per_status.setdefault(les.status, [0, 0])
            per_status[les.status][0] += ok
            per_status[les.status][1] += 1
            if not ok:
                errors.append(les.status)
        truth_err = [float(np.linalg.norm(alignment.to_current(np.array(les.prior_center_mm))[0]
                                          - np.array(les.current_center_mm)))
                     for les in pair.lesions if les.prior_center_mm is not None and les.current_center_mm is not None]
        rows.append({"seed": seed, "rotation_deg": [round(v, 2) for v in rot], "shift_mm": [round(v, 1) for v in shift],
                     "ncc": round(alignment.ncc, 3), "centre_error_mm_max": round(max(truth_err), 2),
                     "wrong": errors})
        print(f"pair {done}/{pairs} (seed {seed}): NCC {alignment.ncc:.3f}, centre error <= {max(truth_err):.2f} mm, "
              f"{'all right' if not errors else 'wrong: ' + ', '.join(errors)}", flush=True)
    summary = {"pairs": pairs, "lesions": total, "matched_right": right, "rate": round(right / max(total, 1), 4),
               "failed_alignments": failed_alignments,
               "per_status": {k: f"{v[0]}/{v[1]}" for k, v in per_status.items()},
               "registration_s_median": round(float(np.median(seconds)), 2) if seconds else None,
               "centre_error_mm_max": max((float(r.get("centre_error_mm_max", 0.0)) for r in rows), default=None)}
    print(json.dumps(summary, indent=2))
    if out is not None:
        out.write_text(json.dumps({"summary": summary, "pairs": rows}, indent=2))
    return summary


def markdown(summary: dict[str, object]) -> str:
    """The figures as the section ``make bench`` collects."""
    return ("## Follow-up matching (synthetic pairs)\n\n"
            f"`python -m benchmarks.followup_matching --pairs {summary['pairs']}`: {summary['matched_right']} of "
            f"{summary['lesions']} lesions right ({100 * float(summary['rate']):.1f} %), "  # type: ignore[arg-type]
            f"{summary['failed_alignments']} alignment(s) refused, per status {summary['per_status']}, "
            f"registration {summary['registration_s_median']} s (median), largest centre error after alignment "
            f"{summary['centre_error_mm_max']} mm.\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--first-seed", type=int, default=310000)
    ap.add_argument("--out", type=Path, default=None, help="write the per-pair figures here (JSON)")
    a = ap.parse_args()
    run(a.pairs, a.first_seed, a.out)


if __name__ == "__main__":
    main()
