"""Follow-up studies: a study's findings matched to the same patient's prior result of the same model, so that a
lesion keeps its identity (tracking identifier and UID) over time and the report says what changed.

:func:`follow` is the seam the pipeline calls once a job's findings are known and before its objects are built:
the prior (:mod:`node.followup.prior`), the rigid alignment of the two series with its quality checked
(:mod:`node.followup.register`), the one-to-one matching and the change of each finding
(:mod:`node.followup.track`). A follow-up that cannot be made (no prior images, an alignment that fails its check,
the PACS unreachable) never fails the job: the result says why there is no matching, and every finding keeps the
new identity it was given.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from node.config import FollowUpConfig
from node.errors import PreannotError
from node.followup.prior import Prior, PriorFinder, study_date
from node.followup.register import Alignment, RegistrationError, register
from node.followup.track import NEW, NOT_SEEN, Change, Current, FollowUp, PriorFinding, match_findings
from node.imaging.volume import Volume, load_series

__all__ = ["NEW", "NOT_SEEN", "Alignment", "Change", "FollowUp", "Prior", "PriorFinder", "PriorFinding", "follow",
           "follow_prior"]

logger = logging.getLogger(__name__)


def follow_prior(prior: Prior, volume: Volume, rois: Sequence[Any], config: FollowUpConfig,
                 prior_volume: Volume | None = None) -> FollowUp:
    """Align ``prior`` to ``volume`` and match its findings to ``rois`` (the job's findings, measured): matched
    findings take the prior's tracking identifier and UID (``roi.tracking_uid``, ``roi.tracking_id``)."""
    fu = FollowUp(prior_study_uid=prior.study_uid, prior_study_date=prior.study_date,
                  study_date=study_date(volume.sources[0]), prior_series_uid=prior.series_uid, source=prior.source,
                  time_point_order=prior.time_point_order + 1, rejected=prior.rejected, prior_job_id=prior.job_id)
    if prior_volume is None:
        if not prior.image_files:
            fu.not_matched = "; ".join(prior.notes) or "the prior's images are not available"
            return fu
        try:
            prior_volume = load_series(prior.image_files)
        except PreannotError as exc:
            fu.not_matched = f"the prior's series cannot be read: {exc}"
            return fu
    try:
        fu.alignment = register(prior_volume, volume, min_ncc=config.min_ncc)
    except RegistrationError as exc:
        fu.not_matched = f"no alignment with the prior: {exc}"
        return fu
    current = [Current(int(r.index), int(r.label), str(r.kind), float(r.volume_mm3),
                       float(r.diameter_3d_mm) if r.described else None, tuple(r.centroid_mm)) for r in rois]
    fu.changes, matched = match_findings(prior.findings, current, fu.alignment, min_gate_mm=config.min_gate_mm,
                                         gate_factor=config.gate_factor, growth_pct=config.growth_pct)
    by_number = {int(r.index): r for r in rois}
    for r in rois:
        p = matched.get(int(r.index))
        if p is not None:
            r.tracking_uid, r.tracking_id = p.tracking_uid, p.tracking_id
    # a new finding never takes an identifier the patient's lesions already have ("Nodule 3" stays one lesion)
    used = {p.tracking_id for p in prior.findings} | {str(r.tracking_id) for r in rois if r.tracking_id}
    for r in rois:
        if int(r.index) in matched or r.kind == "anatomy":
            continue
        if r.identifier() in used:
            n = 1
            while f"{r.label_name} {n} (AI)"[:64] in used:
                n += 1
            r.tracking_id = f"{r.label_name} {n} (AI)"[:64]
        used.add(r.identifier())
    fu.changes = [replace(c, tracking_uid=str(by_number[c.number].tracking_uid or ""),
                          tracking_id=by_number[c.number].identifier())
                  if c.status == NEW and c.number in by_number else c for c in fu.changes]
    counts = {s: sum(1 for c in fu.changes if c.status == s) for s in {c.status for c in fu.changes}}
    logger.info("follow-up of study %s: prior of %s, %s", fu.prior_study_uid, fu.prior_study_date,
                ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no findings")
    return fu


def follow(finder: PriorFinder, volume: Volume, rois: Sequence[Any], model: str, config: FollowUpConfig,
           scratch: Path, type_labels: dict[str, int] | None = None) -> FollowUp | None:
    """The follow-up of a job (None: the patient has no prior result of ``model``); see the module docstring."""
    ds = volume.sources[0]
    work = scratch / "followup"
    try:
        try:
            prior = finder.find(ds, model, work, type_labels)
        except PreannotError as exc:
            logger.warning("follow-up: no prior looked up: %s", exc)
            return FollowUp(prior_study_uid="", prior_study_date="", study_date=study_date(ds), prior_series_uid="",
                            source=config.fetch_from or "node", not_matched=f"the prior could not be looked up: {exc}")
        if prior is None:
            return None
        return follow_prior(prior, volume, rois, config)
    finally:
        shutil.rmtree(work, ignore_errors=True)
