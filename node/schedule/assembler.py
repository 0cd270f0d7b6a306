"""Series assembly: decide when a series is complete ("stable") and queue its jobs.

A series is stable once no instance arrived for ``stable_seconds`` (the node default, or the largest
``stable_seconds`` of the routes it matches), whatever the number of associations it came in. Then:

1. routes: none matches -> ``unmatched`` (kept for the retention period, never processed);
2. eligibility (``schedule/eligibility.py``): no matching route can use it (a scout, a secondary
   capture, a PDF, too few images) -> ``skipped`` with the reason, never processed, no result sent;
3. completeness: evidence that instances are missing (refused instances, an association of its sender
   refused while it arrived, holes in InstanceNumber or in the slice positions, fewer instances than the
   PACS reports by C-FIND, asked off this loop by ``schedule/counts.py``) -> ``incomplete``, re-evaluated
   when instances arrive (they reopen it) and every ``_RECHECK_SECONDS``; once nothing arrived for
   ``[node].incomplete_hold_minutes`` -> ``failed`` with the reason, without a result;
4. otherwise one job per (series, series version, model) of each eligible route -> ``dispatched``. A
   study-level model (``[[inputs]]`` in its card) gets its job on the series of its reference input only;
   the series of its other inputs are dispatched without a job (the worker gathers them from the study when
   the job runs, waiting for them a bounded time). A new version of such an input series after the model's
   result was made sends the reference series through again, so a new result supersedes the old one.

The series' transition and its jobs commit in one transaction.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from node.config import NodeConfig, Route
from node.imaging.spacing import classify_spacing
from node.inference.registry import ModelCard
from node.schedule.counts import ASKING, InstanceCounter
from node.schedule.eligibility import ineligibility, model_ineligibility
from node.schedule.routing import matching_routes
from node.store.jobs import JobStore
from node.store.series import SeriesInfo, SeriesState, SeriesStore
from node.verdicts.intake import VerdictIntake

__all__ = ["Assembler", "Dispatch"]

logger = logging.getLogger(__name__)

#: how often a series held incomplete is looked at again when nothing arrives (a C-FIND at most this often)
_RECHECK_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class Dispatch:
    """What the assembler decided for one stable series."""

    series_uid: str
    version: int
    routes: list[str]
    jobs: list[int]
    #: what happened: dispatched, unmatched, skipped, incomplete, failed or verdict
    outcome: str = "dispatched"
    reason: str = ""


class Assembler:
    """Turns stable series into jobs. Call :meth:`tick` periodically (the node does, every ~0.5 s)."""

    def __init__(self, config: NodeConfig, series: SeriesStore, jobs: JobStore,
                 verdicts: VerdictIntake | None = None, counter: InstanceCounter | None = None,
                 cards: Callable[[str], ModelCard | None] | None = None, started: float | None = None) -> None:
        self.config = config
        #: when this node process started (the node passes it): a series counts as quiet only from then on, so one
        #: cut off by a stop or a kill -9 while it arrived waits a full quiet period after the restart (for the
        #: PACS to send the rest) instead of being dispatched at once with the downtime counted as quiet
        self._started = started if started is not None else float("-inf")
        #: a model's card by name (None: unknown model, its job fails with the reason); decides what it may run on
        self.cards = cards or (lambda _name: None)
        #: C-FIND instance counts (expected_count_from), asked off this loop
        self.counter = counter or InstanceCounter(config)
        #: SEG/SR/KO series of a study with results go there instead of to a model
        self.verdicts = verdicts
        self.series = series
        self.jobs = jobs
        route_waits = [r.stable_seconds for r in config.routes if r.stable_seconds is not None]
        self._min_wait = min([config.node.stable_seconds, *route_waits])
        self._config_version = config.version()
        self._next_check: dict[str, float] = {}  # series held incomplete -> when to look again

    def tick(self, now: float | None = None) -> list[Dispatch]:
        """Decide for every series that became stable (or is held and due). Returns what was decided."""
        now = time.time() if now is None else now
        out = []
        for info in self.series.waiting(last_received_before=now - self._min_wait):
            if info.state == SeriesState.INCOMPLETE and now < self._next_check.get(info.series_uid, 0.0):
                continue
            quiet = now - max(info.last_received, self._started)
            if self.verdicts is not None and quiet >= self.config.node.stable_seconds \
                    and self.verdicts.is_candidate(info):
                d = self._commit(info, now, outcome="verdict")
                if d is not None:
                    out.append(d)
                continue
            routes = matching_routes(self.config.routes, info.attrs, called_ae=info.called_ae,
                                     calling_ae=info.calling_ae)
            waits = [r.stable_seconds if r.stable_seconds is not None else self.config.node.stable_seconds
                     for r in routes] or [self.config.node.stable_seconds]
            if quiet < max(waits):
                continue
            d = self._decide(info, routes, now)
            if d is not None:
                out.append(d)
                if d.outcome != "incomplete":
                    self._next_check.pop(info.series_uid, None)
        return out

    def _incompleteness(self, info: SeriesInfo, routes: list[Route]) -> str | object | None:
        """Why the series looks incomplete, None, or :data:`ASKING` while a PACS is being asked how many
        instances it has (the checks of the eligible routes together)."""
        checks = {c for r in routes for c in r.completeness_checks}
        uid = info.series_uid
        if "refused" in checks:
            refused = self.series.unresolved_refusals(uid)
            if refused:
                what = ", ".join(f"{n} ({reason})" for reason, n in refused.items())
                return f"instances of it were refused and have not arrived since: {what}"
            reason = self.series.association_refusal_during(info, window=self.config.node.stable_seconds)
            if reason is not None:
                return f"an association of {info.calling_ae} was refused ({reason}) while it was arriving"
        if "instance_number" in checks:
            nums = self.series.instance_numbers(uid)
            holes = [(a, b) for a, b in itertools.pairwise(nums) if b - a > 1]
            if holes:
                missing = sum(b - a - 1 for a, b in holes)
                return (f"InstanceNumber runs from {nums[0]} to {nums[-1]} with {missing} missing "
                        f"(first hole: {holes[0][0] + 1}-{holes[0][1] - 1})")
        if "spacing" in checks:
            positions = self.series.slice_positions(uid)
            if len(set(positions)) == len(positions):  # several slices at one position: not a hole (the reader says)
                report = classify_spacing(positions)
                if report.gaps:
                    return f"the slice positions have {report.describe_gap()}"
        for r in routes:
            if r.expected_count_from is None:
                continue
            expected = self.counter.expected(r.expected_count_from, info.study_uid, uid)
            if expected is ASKING:
                return ASKING
            have = self.series.instance_count(uid)
            if isinstance(expected, int) and expected > have:
                return f"{r.expected_count_from} reports {expected} instances by C-FIND; {have} received"
        return None

    def _decide(self, seen: SeriesInfo, routes: list[Route], now: float) -> Dispatch | None:
        if not routes:
            return self._commit(seen, now, outcome="unmatched")
        frames = self.series.frame_count(seen.series_uid)
        reasons = {r.name: ineligibility(r, seen.attrs, frames=frames) for r in routes}
        for r in routes:  # a route none of whose models may run on the series (the cards' modality) is skipped
            if reasons[r.name] is None:
                refused = [model_ineligibility(m, card, seen.attrs) for m in r.models
                           if (card := self.cards(m)) is not None]
                if refused and len(refused) == len(r.models) and all(refused):
                    reasons[r.name] = "; ".join(w for w in refused if w)
        eligible = [r for r in routes if reasons[r.name] is None]
        if not eligible and self.series.unresolved_refusals(seen.series_uid):
            # too few images *because* the others were refused (a full disk, malformed copies): not a scout
            # but a series with missing instances, held for them like any other
            eligible = [r for r in routes if "refused" in r.completeness_checks
                        and "(min_slices)" in str(reasons[r.name] or "")]
        if not eligible:
            why = "; ".join(dict.fromkeys(str(v) for v in reasons.values()))
            return self._commit(seen, now, outcome="skipped", reason=why, routes=routes)
        evidence = self._incompleteness(seen, eligible)
        if evidence is ASKING:
            return None  # looked at again at the next tick, once the PACS has answered
        if isinstance(evidence, str):
            hold = self.config.node.incomplete_hold_minutes * 60
            if now - seen.last_received >= hold:
                return self._commit(seen, now, outcome="failed", reason=(
                    f"incomplete: {evidence}; nothing arrived for {hold / 60:.0f} min (incomplete_hold_minutes)"))
            # looked at again in a while, or when the hold runs out if that comes first
            left = hold - (now - seen.last_received)
            self._next_check[seen.series_uid] = now + max(min(_RECHECK_SECONDS, left), 0.5)
            if seen.state == SeriesState.INCOMPLETE and seen.note == evidence:
                return None  # still held for the same reason
            return self._commit(seen, now, outcome="incomplete", reason=evidence)
        skipped = {name: why for name, why in reasons.items() if why is not None}
        return self._commit(seen, now, outcome="dispatched", routes=eligible, skipped_routes=skipped)

    @staticmethod
    def _stale_results(c: Any, info: SeriesInfo, model: str) -> list[str]:
        """Reference series of ``info``'s study whose latest done result of ``model`` was made without this
        version of ``info`` (an earlier version of it, or without it at all): they run again."""
        rows = c.execute(
            "SELECT j.series_uid, j.result FROM jobs j JOIN series s ON s.series_uid = j.series_uid "
            "WHERE s.study_uid = ? AND j.model = ? AND j.state = 'done' AND j.superseded_by IS NULL "
            "AND s.state = 'dispatched'", (info.study_uid, model)).fetchall()
        out = []
        # a job that gave up waiting for an input runs again once one arrives
        out += [str(r[0]) for r in c.execute(
            "SELECT DISTINCT j.series_uid FROM jobs j JOIN series s ON s.series_uid = j.series_uid "
            "WHERE s.study_uid = ? AND j.model = ? AND j.state = 'dead' AND j.error LIKE '%no series for input%' "
            "AND s.state = 'dispatched' AND NOT EXISTS (SELECT 1 FROM jobs k WHERE k.series_uid = j.series_uid "
            "AND k.model = j.model AND k.id > j.id)", (info.study_uid, model)).fetchall()]
        for r in rows:
            try:
                used = json.loads(r["result"] or "{}").get("inputs") or []
            except ValueError:
                continue
            versions = {u.get("series_uid"): u.get("version") for u in used if isinstance(u, dict)}
            if versions.get(info.series_uid) != info.version:
                out.append(str(r["series_uid"]))
        return out

    def _commit(self, seen: SeriesInfo, now: float, *, outcome: str, reason: str = "",
                routes: list[Route] | None = None, skipped_routes: dict[str, str] | None = None) -> Dispatch | None:
        job_ids: list[int] = []
        names = [r.name for r in routes or []]
        rerun: set[str] = set()  # reference series whose study-level results this series' new version outdates
        with self.series.db.tx() as c:
            info = self.series.claim_stable(c, seen.series_uid, version=seen.version,
                                            last_received=seen.last_received)
            if info is None:
                return None  # changed since we looked: a new instance arrived
            if outcome == "unmatched":
                self.series.mark_unmatched(c, info, now=now)
            elif outcome == "skipped":
                self.series.mark_skipped(c, info, reason=reason, routes=names, now=now)
            elif outcome == "incomplete":
                self.series.mark_incomplete(c, info, reason=reason, now=now)
            elif outcome == "failed":
                self.series.mark_failed(c, info, reason=reason, now=now)
            elif outcome == "verdict":
                self.series.mark_verdict(c, info, now=now)
            else:
                for route in routes or []:
                    for model in route.models:
                        card = self.cards(model)
                        why = model_ineligibility(model, card, info.attrs) if card is not None else None
                        if why is not None:
                            logger.info("series %s: %s; no job for it", info.series_uid, why)
                            continue
                        role = card.input_of(info.attrs) if card is not None and card.inputs else None
                        if card is not None and role is not None and role.name != card.reference_input.name:
                            logger.info("series %s is input %s of model %s: its job runs on the study's %s series",
                                        info.series_uid, role.name, model, card.reference_input.name)
                            rerun.update(self._stale_results(c, info, model))
                            continue
                        jid = self.jobs.create(c, series_uid=info.series_uid, series_version=info.version,
                                               model=model, route=route.name, send_to=list(route.send_to),
                                               max_attempts=self.config.jobs.max_attempts,
                                               config_version=self._config_version, now=now,
                                               priority=route.priority)
                        if jid is not None:
                            job_ids.append(jid)
                self.series.mark_dispatched(c, info, routes=names, jobs=job_ids, now=now,
                                            skipped_routes=skipped_routes or {})
        for ref in sorted(rerun):
            version = self.series.reopen_for_reprocess(ref, actor="assembler", now=now)
            logger.info("series %s: new version %d, its study-level results made without series %s version %d",
                        ref, version, info.series_uid, info.version)
        if outcome in ("dispatched", "failed", "skipped", "unmatched"):
            self.counter.forget(info.series_uid)
        if outcome == "dispatched":
            logger.info("series %s stable (%d instances, version %d): routes %s -> jobs %s", info.series_uid,
                        info.instances, info.version, names, job_ids)
        elif outcome == "unmatched":
            logger.info("series %s stable (%d instances, modality %s): no route matched; kept, not processed",
                        info.series_uid, info.instances, info.modality)
        elif outcome == "verdict":
            logger.info("series %s stable (%d instances, modality %s): examined as a verdict on the node's results",
                        info.series_uid, info.instances, info.modality)
        elif outcome == "incomplete":
            logger.warning("series %s held incomplete (%d instances): %s", info.series_uid, info.instances, reason)
        else:
            log = logger.warning if outcome == "failed" else logger.info
            log("series %s %s (%d instances): %s", info.series_uid, outcome, info.instances, reason)
        return Dispatch(info.series_uid, info.version, names, job_ids, outcome=outcome, reason=reason)
