"""The HTTP service inside ``preannot serve``: health, readiness, metrics, JSON API and dashboard.

Reads are open unless ``[web].auth_reads`` is set; every action (``POST /api/...``) needs a bearer token
from ``[web].tokens`` (name -> secret). Tokens are compared in constant time; the token's *name* is
recorded in the audit trail with the action. No CORS headers are sent (browsers refuse cross-origin
calls); bind to localhost (the default) or put a TLS reverse proxy in front.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as UrlPath
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field

from node import __version__
from node.errors import PreannotError
from node.store.audit import events
from node.store.jobs import Job, JobState
from node.store.series import SeriesState
from node.web.dashboard import render_dashboard, render_followup, render_judge, trend_png
from node.web.view import NodeView

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

#: a job id in a URL: an SQLite integer (a larger number is a 422, never a 500 from the database)
JobId = Annotated[int, UrlPath(ge=1, le=2**63 - 1, description="job id")]


class FindingJudgement(BaseModel):
    """One AI finding's fate, as a radiologist (or a RIS/viewer integration) states it."""

    finding: int = Field(ge=1, description="the finding's index in the result (1-based)")
    outcome: str = Field(pattern="^(accepted|edited|rejected)$")
    note: str | None = Field(None, max_length=500)


class VerdictBody(BaseModel):
    findings: list[FindingJudgement] = Field(default_factory=list, max_length=10_000)
    #: findings the model missed, as a count (each one an "added" finding)
    added: int = Field(0, ge=0, le=10_000)
    #: a classification result: the class the radiologist gives (one of the model's classes, e.g. "C")
    class_value: str | None = Field(None, max_length=64)
    #: who judged, as a role from a fixed list (never a name: names are not stored)
    observer_role: Literal["radiologist", "resident", "fellow", "physicist", "technologist", "clinician",
                           "other"] = "radiologist"


def _job_dict(job: Job, *, detail: bool = False) -> dict[str, Any]:
    result = job.result
    d: dict[str, Any] = {
        "id": job.id, "state": job.state.value, "model": job.model, "route": job.route,
        "series_uid": job.series_uid, "series_version": job.series_version, "attempts": job.attempts,
        "max_attempts": job.max_attempts, "created_at": job.created_at, "started_at": job.started_at,
        "finished_at": job.finished_at, "error": job.error, "roi_count": result.roi_count if result else None,
        "duration_s": result.timings.get("total") if result else None, "send_to": job.send_to,
        "superseded_by": job.superseded_by, "priority": str(job.priority),
        "time_to_result_s": result.time_to_result_s if result else None,
        "target_breached": result.target_breached if result else None,
        "classes": [{"concept": c.concept, "value": c.value, "probability": c.probability} for c in result.classes]
        if result else [], "flags": list(result.flags) if result else [],
    }
    if detail and result is not None:
        full = result.to_dict()
        d.update({"timings": result.timings, "outputs": result.files, "model_identification": result.model,
                  "findings": full["findings"], "classes": full["classes"], "not_reported": result.not_reported,
                  "output_dir": result.output_dir})
    return d


#: the largest request body read (bytes): verdicts and actions are small JSON documents
MAX_BODY = 1 << 20


class BodyGuard:
    """Requests that change something (any method but GET/HEAD/OPTIONS): without a valid token, refused (401/403)
    before a byte of their body is read; with one, a body over :data:`MAX_BODY` refused (413) as soon as its
    Content-Length says so or, sent in chunks, once that much has come. A hostile client can no longer make the
    node parse or hold hundreds of megabytes."""

    def __init__(self, app: Any, *, authorised: Callable[[Any], str | None]) -> None:
        self.app = app
        self.authorised = authorised

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        name = self.authorised(headers)
        if name is None or name == "":
            status, detail = (401, "a bearer token is required for this action") if name is None else \
                (403, "the token is not valid")
            await JSONResponse({"detail": detail}, status_code=status,
                               headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)(scope, receive, send)
            return
        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            declared = MAX_BODY + 1
        if declared > MAX_BODY:
            await JSONResponse({"detail": f"request body over {MAX_BODY} bytes"}, status_code=413)(scope, receive,
                                                                                                   send)
            return
        seen = 0

        async def bounded() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > MAX_BODY:
                    raise HTTPException(413, f"request body over {MAX_BODY} bytes")
            return message

        await self.app(scope, bounded, send)


def create_app(node: NodeView) -> FastAPI:
    """The FastAPI application bound to a running node."""
    cfg = node.config.web
    # FastAPIOffline serves the Swagger UI at /docs from the package, not from a CDN
    app: FastAPI = FastAPIOffline(title="preannot", version=__version__,
                  description="Imaging pre-annotation DICOM node: status, metrics, jobs and actions.")

    app.mount("/static", StaticFiles(packages=[("node.web", "static")]), name="static")
    app.add_middleware(BodyGuard, authorised=lambda headers: _token_name_of(headers))

    @app.exception_handler(PreannotError)
    def _preannot_error(_request: Request, exc: PreannotError) -> JSONResponse:
        """Each error type carries its HTTP status (404 unknown, 409 not allowed in this state, ...)."""
        return JSONResponse({"detail": str(exc)}, status_code=exc.http_status)

    def _token_name(request: Request) -> str | None:
        return _token_name_of(request.headers)

    def _token_name_of(headers: Any) -> str | None:
        header = headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            return None
        given = header[7:].strip().encode()
        for name, secret in cfg.tokens.items():
            if hmac.compare_digest(given, secret.encode()):
                return name
        return ""

    def require_token(request: Request) -> str:
        name = _token_name(request)
        if name is None:
            raise HTTPException(401, "a bearer token is required for this action",
                                headers={"WWW-Authenticate": "Bearer"})
        if name == "":
            raise HTTPException(403, "the token is not valid")
        return name

    def read_access(request: Request) -> None:
        if cfg.auth_reads:
            require_token(request)

    reads = [Depends(read_access)]

    @app.get("/health", tags=["status"])
    def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok", "version": __version__}

    @app.get("/ready", tags=["status"])
    def ready() -> JSONResponse:
        """Readiness: DICOM listener up, store writable, route models loaded, disk above the reserve."""
        checks = node.readiness()
        return JSONResponse({"ready": all(checks.values()), "checks": checks},
                            status_code=200 if all(checks.values()) else 503)

    @app.get("/metrics", tags=["status"], dependencies=reads)
    def metrics() -> Response:
        """Prometheus metrics."""
        return Response(node.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/api/status", tags=["status"], dependencies=reads)
    def status() -> dict[str, Any]:
        return node.status()

    @app.get("/api/series", tags=["series"], dependencies=reads)
    def series(state: str | None = None, limit: Annotated[int, Query(le=1000)] = 100) -> list[dict[str, Any]]:
        """Series, most recently received first; ``note`` says why one was skipped, held or failed."""
        try:
            found = node.series.list_series(state=state or None, limit=limit)
        except ValueError as exc:
            raise HTTPException(422, f"unknown state {state!r}; states: {[s.value for s in SeriesState]}") from exc
        return [s.to_dict() for s in found]

    @app.get("/api/jobs", tags=["jobs"], dependencies=reads)
    def jobs(state: str | None = None, model: str | None = None, since: float | None = None,
             until: float | None = None, limit: Annotated[int, Query(le=1000)] = 100) -> list[dict[str, Any]]:
        """Jobs, newest first; filter by state, model and creation time (epoch seconds)."""
        try:
            found = node.store.list_jobs(state=state, model=model, since=since, until=until, limit=limit)
        except ValueError as exc:
            raise HTTPException(422, f"unknown state {state!r}; states: {[s.value for s in JobState]}") from exc
        return [_job_dict(j) for j in found]

    def _get(job_id: int) -> Job:
        return node.store.get(job_id)  # JobNotFoundError -> 404 by the handler above

    @app.get("/api/jobs/{job_id}", tags=["jobs"], dependencies=reads)
    def job(job_id: JobId) -> dict[str, Any]:
        """One job: stage timings, inputs, outputs, deliveries, errors and its audit events."""
        j = _get(job_id)
        d = _job_dict(j, detail=True)
        d["inputs"] = {"instances": node.series.instance_count(j.series_uid)}
        if j.result is not None and j.result.inputs:  # a study-level model: every series it read
            d["inputs"]["series"] = [dict(i) for i in j.result.inputs]
        d["deliveries"] = [{"destination": o.destination, "sop_uid": o.sop_uid, "state": o.state.value,
                            "attempts": o.attempts, "error": o.error} for o in node.store.outbox(job_id=job_id)]
        d["events"] = [{k: e[k] for k in ("ts", "kind", "actor", "detail")} for e in events(node.db, job_id=job_id)]
        return d

    @app.get("/api/jobs/{job_id}/preview.png", tags=["jobs"], dependencies=reads)
    def preview(job_id: JobId) -> FileResponse:
        j = _get(job_id)
        path = j.result.files.get("preview") if j.result else None
        if not path or not Path(path).is_file():
            raise HTTPException(404, f"job {job_id} has no preview")
        return FileResponse(path, media_type="image/png")

    @app.get("/api/jobs/{job_id}/followup", tags=["jobs"], dependencies=reads)
    def followup(job_id: JobId) -> dict[str, Any]:
        """The patient's findings over time up to this job: its time points (oldest first) and one line per
        lesion (volume and diameter at each time point; status new, grown, shrunk, stable, not seen)."""
        from node.followup.timeline import timeline

        _get(job_id)
        return timeline(job_id, _result_of)

    @app.get("/api/jobs/{job_id}/followup.png", tags=["jobs"], dependencies=reads)
    def followup_png(job_id: JobId) -> Response:
        """The same as a plot: one line per lesion, its volume over time."""
        from node.followup.timeline import timeline, timeline_png

        _get(job_id)
        return Response(timeline_png(timeline(job_id, _result_of)), media_type="image/png")

    def _result_of(job_id: int) -> Any:
        try:
            return node.store.get(job_id).result
        except PreannotError:
            return None

    @app.get("/api/deliveries", tags=["deliveries"], dependencies=reads)
    def deliveries(state: str | None = None, limit: Annotated[int, Query(le=5000)] = 200) -> list[dict[str, Any]]:
        try:
            items = node.store.outbox(state=state, limit=limit)
        except ValueError as exc:
            raise HTTPException(422, f"unknown state {state!r}") from exc
        return [{"id": o.id, "job_id": o.job_id, "destination": o.destination, "sop_uid": o.sop_uid,
                 "state": o.state.value, "attempts": o.attempts, "error": o.error} for o in items]

    def _transition(action: Callable[..., None], job_id: int, actor: str) -> dict[str, Any]:
        """Apply a job state change (its errors answer 404 or 409 through the handler above)."""
        action(job_id, actor=actor)
        logger.info("job %d: %s by %s", job_id, action.__name__, actor)
        return _job_dict(node.store.get(job_id))

    @app.post("/api/jobs/{job_id}/retry", tags=["actions"])
    def retry(job_id: JobId, actor: str = Depends(require_token)) -> dict[str, Any]:
        """Queue a failed, dead or cancelled job again (a done job: 409; reprocess its series instead)."""
        return _transition(node.store.retry, job_id, actor)

    @app.post("/api/jobs/{job_id}/cancel", tags=["actions"])
    def cancel(job_id: JobId, actor: str = Depends(require_token)) -> dict[str, Any]:
        """Cancel a queued or failed job."""
        return _transition(node.store.cancel, job_id, actor)

    @app.post("/api/jobs/{job_id}/resend", tags=["actions"])
    def resend(job_id: JobId, actor: str = Depends(require_token)) -> dict[str, Any]:
        """Queue the job's result objects for delivery again."""
        _get(job_id)
        n = node.store.resend(job_id, actor=actor)  # wakes the deliverer
        return {"job_id": job_id, "requeued_objects": n}

    @app.post("/api/series/{series_uid}/reprocess", tags=["actions"])
    def reprocess(series_uid: str, actor: str = Depends(require_token)) -> dict[str, Any]:
        """Run the series through its routes again (a new series version, new jobs)."""
        version = node.reprocess(series_uid, actor=actor)  # NotFoundError -> 404
        return {"series_uid": series_uid, "version": version}

    @app.post("/api/jobs/{job_id}/verdict", tags=["verdicts"])
    def post_verdict(job_id: JobId, body: VerdictBody, actor: str = Depends(require_token)) -> dict[str, Any]:
        """Record the radiologist's verdict on a result, finding by finding (audited; the same body
        posted twice is recorded once)."""
        vid, new = node.record_http_verdict(job_id, body.model_dump(), actor=actor)
        logger.info("job %d: verdict %d %s by %s", job_id, vid, "recorded" if new else "already recorded", actor)
        return {"job_id": job_id, "verdict": vid, "new": new}

    @app.get("/api/verdicts", tags=["verdicts"], dependencies=reads)
    def list_verdicts(model: str | None = None,
                      format: Annotated[str, Query(pattern="^(json|csv)$")] = "json") -> Response:
        """Every verdict with its findings (JSON) or one row per verdict (CSV)."""
        text = node.verdicts.export(format, model=model)
        return Response(text, media_type="text/csv" if format == "csv" else "application/json")

    @app.get("/api/verdicts/not-judged", tags=["verdicts"], dependencies=reads)
    def verdicts_not_judged(limit: Annotated[int, Query(ge=1, le=5000)] = 100) -> list[dict[str, Any]]:
        """Objects that came back for a result and could not be judged, with the reason, newest first."""
        return node.verdicts.not_judged(limit)

    @app.get("/api/agreement", tags=["verdicts"], dependencies=reads)
    def get_agreement(by: Annotated[str, Query(pattern="^(version|scanner|week)$")] = "version",
                      model: str | None = None) -> list[dict[str, Any]]:
        """Agreement per model and version, per scanner or per week, with 95 % intervals."""
        from node.verdicts.stats import agreement

        return agreement(node.verdicts, by=by, model=model)

    @app.get("/api/alerts", tags=["verdicts"], dependencies=reads)
    def get_alerts() -> list[dict[str, Any]]:
        """Drift alerts holding now (agreement and inputs)."""
        return node.verdict_summary()[1]

    @app.get("/api/agreement/trend.png", tags=["verdicts"], dependencies=reads)
    def agreement_trend() -> Response:
        """Acceptance per week and model version, with 95 % intervals, as a PNG."""
        return Response(trend_png(node), media_type="image/png")

    @app.get("/judge/{job_id}", response_class=HTMLResponse, include_in_schema=False, dependencies=reads)
    def judge_page(job_id: JobId) -> HTMLResponse:
        _get(job_id)
        return HTMLResponse(render_judge(node, job_id))

    @app.get("/followup/{job_id}", response_class=HTMLResponse, include_in_schema=False, dependencies=reads)
    def followup_page(job_id: JobId) -> HTMLResponse:
        _get(job_id)
        return HTMLResponse(render_followup(node, job_id))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False, dependencies=reads)
    def dashboard() -> HTMLResponse:
        return HTMLResponse(render_dashboard(node, time.time()))

    return app
