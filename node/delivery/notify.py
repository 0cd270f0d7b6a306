"""Telling someone that an urgent result is ready: a FHIR DiagnosticReport POST and/or an HL7 v2 ORU^R01
over MLLP, for jobs of the priorities ``[notify].priorities`` (STAT by default).

The message says that an AI pre-annotation (unverified) is available for the study, with the model, its
version and the findings' labels and count; it identifies the study by its Study Instance UID and
Accession Number, and (HL7 PID-3 only, as an ORU needs it) the Patient ID. Nothing identifying is logged.
A failed notification is logged and audited (``notify.failed``); it never fails the job.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import socket
import uuid
from typing import Any

import httpx
from pydicom import dcmread

from node.config import NotifyConfig
from node.store.jobs import Job, JobStore
from node.store.series import SeriesStore

__all__ = ["Notifier", "fhir_report", "hl7_oru"]

logger = logging.getLogger(__name__)

VT, FS, CR = b"\x0b", b"\x1c", b"\r"


def _study(series: SeriesStore, job: Job) -> dict[str, str]:
    files = series.files(job.series_uid)
    if not files:
        return {}
    ds = dcmread(files[0], stop_before_pixels=True)
    return {k: str(ds.get(k, "") or "") for k in ("StudyInstanceUID", "AccessionNumber", "PatientID", "StudyDescription")}


def _summary(job: Job, result: dict[str, Any]) -> str:
    model = result.get("model") or {}
    rois = result.get("rois") or []
    labels = sorted({str(r.get("label_name", "")) for r in rois if r.get("label_name")})
    what = f"{len(rois)} finding(s)" + (f" ({', '.join(labels)})" if labels else "")
    return (f"AI pre-annotation ready, NOT VERIFIED: {what} proposed by {model.get('name', job.model)} "
            f"{model.get('version', '')} (priority {job.priority}); SEG and SR sent to the PACS for review.")


def fhir_report(job: Job, result: dict[str, Any], study: dict[str, str]) -> dict[str, Any]:
    """A FHIR R4 DiagnosticReport (status preliminary) announcing the result."""
    return {
        "resourceType": "DiagnosticReport",
        "id": str(uuid.uuid4()),
        "status": "preliminary",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
                                  "display": "Radiology"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}],
                 "text": "AI pre-annotation (unverified)"},
        "identifier": [{"system": "urn:preannot:job", "value": str(job.id)}],
        "issued": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "meta": {"tag": [{"system": "urn:preannot:priority", "code": job.priority}]},
        "extension": [{"url": "urn:preannot:study-instance-uid", "valueString": study.get("StudyInstanceUID", "")},
                      {"url": "urn:preannot:accession-number", "valueString": study.get("AccessionNumber", "")}],
        "conclusion": _summary(job, result),
    }


def hl7_oru(job: Job, result: dict[str, Any], study: dict[str, str], *, sending: str, receiving: str) -> bytes:
    """An HL7 v2.5.1 ORU^R01 (result status P, preliminary)."""
    now = _dt.datetime.now().strftime("%Y%m%d%H%M%S")

    def esc(text: str) -> str:
        return (text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\").replace("&", "\\T\\")
                .replace("~", "\\R\\"))

    segments = [
        f"MSH|^~\\&|{esc(sending)}||{esc(receiving)}||{now}||ORU^R01^ORU_R01|PA{job.id}{now}|P|2.5.1",
        f"PID|1||{esc(study.get('PatientID', ''))}",
        f"OBR|1||{esc(study.get('AccessionNumber', ''))}|18748-4^Diagnostic imaging study^LN|||{now}"
        + "|" * 17 + "P",
        f"OBX|1|TX|AI^AI pre-annotation^L||{esc(_summary(job, result))}||||||P",
        f"OBX|2|ST|113014^Study Instance UID^DCM||{esc(study.get('StudyInstanceUID', ''))}||||||P",
    ]
    return ("\r".join(segments) + "\r").encode()


def send_mllp(host: str, port: int, message: bytes, *, timeout: float) -> str:
    """Send one message framed by MLLP; the acknowledgement's MSA-1 (AA, AE, AR)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(VT + message + FS + CR)
        reply = b""
        while FS not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    for seg in reply.strip(VT + FS + CR).split(CR):
        if seg.startswith(b"MSA|"):
            return seg.split(b"|")[1].decode()
    raise OSError("no MSA segment in the acknowledgement")


class Notifier:
    def __init__(self, config: NotifyConfig, series: SeriesStore, jobs: JobStore) -> None:
        self.config = config
        self.series = series
        self.jobs = jobs

    @property
    def enabled(self) -> bool:
        return bool(self.config.fhir_url or (self.config.hl7_host and self.config.hl7_port))

    def result_ready(self, job: Job, result: dict[str, Any]) -> None:
        """Notify, when the job's priority asks for it (never raises)."""
        if not self.enabled or job.priority not in self.config.priorities:
            return
        try:
            study = _study(self.series, job)
        except (OSError, ValueError) as exc:
            logger.warning("job %d: notification not sent, the series header cannot be read: %s", job.id, exc)
            return
        if self.config.fhir_url:
            self._attempt(job, "fhir", lambda: self._fhir(job, result, study))
        if self.config.hl7_host and self.config.hl7_port:
            self._attempt(job, "hl7", lambda: self._hl7(job, result, study))

    def _attempt(self, job: Job, channel: str, send: Any) -> None:
        try:
            detail = send()
        except (OSError, httpx.HTTPError) as exc:
            logger.warning("job %d: %s notification failed: %s", job.id, channel, exc)
            self.jobs.record("notify.failed", {"channel": channel, "error": str(exc)[:300]},
                             series_uid=job.series_uid, job_id=job.id)
            return
        logger.info("job %d: %s result notified by %s (%s)", job.id, job.priority, channel, detail)
        self.jobs.record("notify.sent", {"channel": channel, "detail": detail}, series_uid=job.series_uid,
                         job_id=job.id)

    def _fhir(self, job: Job, result: dict[str, Any], study: dict[str, str]) -> str:
        headers = {"Content-Type": "application/fhir+json"}
        if self.config.fhir_token_env:
            headers["Authorization"] = f"Bearer {os.environ.get(self.config.fhir_token_env, '')}"
        assert self.config.fhir_url
        r = httpx.post(self.config.fhir_url.rstrip("/") + "/DiagnosticReport", json=fhir_report(job, result, study),
                       headers=headers, timeout=self.config.timeout)
        r.raise_for_status()
        return f"HTTP {r.status_code}"

    def _hl7(self, job: Job, result: dict[str, Any], study: dict[str, str]) -> str:
        assert self.config.hl7_host and self.config.hl7_port
        ack = send_mllp(self.config.hl7_host, self.config.hl7_port,
                        hl7_oru(job, result, study, sending=self.config.sending_application,
                                receiving=self.config.receiving_application), timeout=self.config.timeout)
        if ack != "AA":
            raise OSError(f"the HL7 receiver answered {ack}")
        return "ACK AA"
