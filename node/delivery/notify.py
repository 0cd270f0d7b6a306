"""Telling someone that a result is ready: a FHIR DiagnosticReport and/or an HL7 v2 ORU^R01 over MLLP,
for jobs of the priorities ``[notify].priorities`` (STAT by default) and for results a route flags with
``notify = true``.

Notifications are a delivery like the result objects: when the job completes, :meth:`Notifier.messages`
writes each message into the job's folder and the job store queues it in the outbox (destination
``notify:fhir`` or ``notify:hl7``, in the same transaction as the job's completion). The deliverer sends it
with :class:`NotificationSender`, retries with backoff while the receiver is down, records every attempt in
the audit trail, and marks it sent once: each notification reaches its receiver once. Both carry a key the
receiver can de-duplicate on should the node die between the send and its record (FHIR conditional create
on the report's identifier, ``If-None-Exist``; HL7 message control ID ``PA<job>``).

The message says that an AI pre-annotation (unverified) is available for the study, with the model, its
version and the findings' labels and count, or the class; it identifies the study by its Study Instance UID
and Accession Number, and (HL7 PID-3 only, as an ORU needs it) the Patient ID. Nothing identifying is logged.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread

from node.config import NotifyConfig, Priority
from node.net.scu import SendOutcome
from node.outputs.result import write_private
from node.store.jobs import Job
from node.store.results import JobResult

__all__ = ["CHANNELS", "Message", "NotificationSender", "Notifier", "fhir_report", "hl7_oru", "is_notification"]

logger = logging.getLogger(__name__)

VT, FS, CR = b"\x0b", b"\x1c", b"\r"

#: outbox destination names of the notification channels
CHANNELS = ("notify:fhir", "notify:hl7")


def is_notification(destination: str) -> bool:
    """Whether an outbox destination is a notification channel rather than a configured destination."""
    return destination in CHANNELS


@dataclass(frozen=True, slots=True)
class Message:
    """A notification to deliver (the outbox's Deliverable): its file and its unique key."""

    path: str
    sop_uid: str
    sop_class: str = ""
    series_uid: str = ""


def study_of(files: list[Path]) -> dict[str, str]:
    """The study identifiers a notification carries, from the series' first header."""
    if not files:
        return {}
    ds = dcmread(files[0], stop_before_pixels=True)
    return {k: str(ds.get(k, "") or "") for k in ("StudyInstanceUID", "AccessionNumber", "PatientID", "StudyDescription")}


def _summary(job: Job, result: JobResult) -> str:
    model = result.model or {}
    if result.classes:
        what = "; ".join(f"{c.concept}: {c.value} (p {c.probability:.2f})" for c in result.classes)
    else:
        labels = sorted({f.label_name for f in result.findings})
        what = f"{result.roi_count} finding(s)" + (f" ({', '.join(labels)})" if labels else "")
    flags = f"; flagged: {', '.join(result.flags)}" if result.flags else ""
    return (f"AI pre-annotation ready, NOT VERIFIED: {what} proposed by {model.get('name', job.model)} "
            f"{model.get('version', '')} (priority {result.priority}{flags}){_change_text(result)}; results sent "
            "to the PACS for review.")


def _change_text(result: JobResult) -> str:
    """The follow-up in a few words: the prior's date and the count of each change (empty without a prior)."""
    fu = result.followup
    if not fu:
        return ""
    d = str(fu.get("prior_study_date") or "")
    prior = f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 else "an earlier study"
    if fu.get("not_matched"):
        return f"; follow-up of {prior}: not matched"
    counts = fu.get("counts") or {}
    return f"; follow-up of {prior}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def _change_extension(result: JobResult) -> list[dict[str, Any]]:
    """The follow-up as extensions of the report: the prior study and, per tracked finding, its status and volume
    change (the tracking UID names the finding, as in the SR)."""
    fu = result.followup
    if not fu:
        return []
    out: list[dict[str, Any]] = [{"url": "urn:preannot:followup-prior-study-instance-uid",
                                  "valueString": str(fu.get("prior_study_uid", ""))}]
    for c in fu.get("changes") or []:
        parts = [{"url": "status", "valueCode": str(c["status"]).replace(" ", "-")},
                 {"url": "tracking-uid", "valueString": str(c.get("tracking_uid") or "")},
                 {"url": "tracking-id", "valueString": str(c.get("tracking_id") or "")}]
        if c.get("volume_change_pct") is not None:
            parts.append({"url": "volume-change-pct", "valueDecimal": c["volume_change_pct"]})
        out.append({"url": "urn:preannot:followup-change", "extension": parts})
    return out


def report_identifier(job: Job) -> dict[str, str]:
    """The DiagnosticReport's business identifier: one per job (the receiver's de-duplication key)."""
    return {"system": "urn:preannot:job", "value": str(job.id)}


def fhir_report(job: Job, result: JobResult, study: dict[str, str]) -> dict[str, Any]:
    """A FHIR R4 DiagnosticReport (status preliminary) announcing the result."""
    return {
        "resourceType": "DiagnosticReport",
        "status": "preliminary",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
                                  "display": "Radiology"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}],
                 "text": "AI pre-annotation (unverified)"},
        "identifier": [report_identifier(job)],
        "issued": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "meta": {"tag": [{"system": "urn:preannot:priority", "code": str(result.priority)}]
                 + [{"system": "urn:preannot:flag", "code": f} for f in result.flags]},
        "extension": [{"url": "urn:preannot:study-instance-uid", "valueString": study.get("StudyInstanceUID", "")},
                      {"url": "urn:preannot:accession-number", "valueString": study.get("AccessionNumber", "")},
                      *_change_extension(result)],
        "conclusion": _summary(job, result),
    }


def hl7_oru(job: Job, result: JobResult, study: dict[str, str], *, sending: str, receiving: str) -> bytes:
    """An HL7 v2.5.1 ORU^R01 (result status P, preliminary); message control ID ``PA<job id>``."""
    now = _dt.datetime.now().strftime("%Y%m%d%H%M%S")

    def esc(text: str) -> str:
        return (text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\").replace("&", "\\T\\")
                .replace("~", "\\R\\"))

    segments = [
        f"MSH|^~\\&|{esc(sending)}||{esc(receiving)}||{now}||ORU^R01^ORU_R01|PA{job.id}|P|2.5.1",
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
    """Makes a job's notification messages (see the module docstring)."""

    def __init__(self, config: NotifyConfig) -> None:
        self.config = config

    @property
    def enabled(self) -> bool:
        return bool(self.config.fhir_url or (self.config.hl7_host and self.config.hl7_port))

    def wanted(self, priority: Priority | str, *, flagged: bool = False) -> bool:
        """Whether a result of this priority (or flagged by its route with ``notify``) is announced."""
        return self.enabled and (flagged or Priority(priority) in self.config.priorities)

    def messages(self, job: Job, result: JobResult, out_dir: Path, study: dict[str, str]) -> dict[str, Message]:
        """Write the job's messages into ``out_dir`` (0600) and return them by channel, for the outbox."""
        out: dict[str, Message] = {}
        if self.config.fhir_url:
            path = write_private(out_dir / "notify-fhir.json", json.dumps(fhir_report(job, result, study)))
            out["notify:fhir"] = Message(str(path), f"notify:{job.id}:fhir")
        if self.config.hl7_host and self.config.hl7_port:
            oru = hl7_oru(job, result, study, sending=self.config.sending_application,
                          receiving=self.config.receiving_application)
            path = write_private(out_dir / "notify-hl7.txt", oru.decode())
            out["notify:hl7"] = Message(str(path), f"notify:{job.id}:hl7")
        return out


class NotificationSender:
    """Delivers notification messages of one channel (the outbox's Sender)."""

    def __init__(self, config: NotifyConfig, channel: str) -> None:
        self.config = config
        self.channel = channel

    def send(self, paths: list[str]) -> list[SendOutcome]:
        return [self._one(p) for p in paths]

    def _one(self, path: str) -> SendOutcome:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            return SendOutcome(path, False, None, f"cannot read {path}: {exc.strerror}")
        try:
            if self.channel == "notify:fhir":
                return SendOutcome(path, True, self._fhir(json.loads(data)))
            if self.channel == "notify:hl7":
                return SendOutcome(path, True, self._hl7(data))
        except (OSError, httpx.HTTPError) as exc:
            return SendOutcome(path, False, None, f"{self.channel}: {type(exc).__name__}: {str(exc)[:300]}")
        return SendOutcome(path, False, None, f"unknown notification channel {self.channel!r}")

    def _fhir(self, report: dict[str, Any]) -> str:
        if not self.config.fhir_url:
            raise OSError("[notify] fhir_url is no longer configured")
        ident = report["identifier"][0]
        headers = {"Content-Type": "application/fhir+json",
                   "If-None-Exist": f"identifier={ident['system']}|{ident['value']}"}  # conditional create
        if self.config.fhir_token_env:
            headers["Authorization"] = f"Bearer {os.environ.get(self.config.fhir_token_env, '')}"
        r = httpx.post(self.config.fhir_url.rstrip("/") + "/DiagnosticReport", json=report, headers=headers,
                       timeout=self.config.timeout)
        r.raise_for_status()
        return f"HTTP {r.status_code}"

    def _hl7(self, message: bytes) -> str:
        if not (self.config.hl7_host and self.config.hl7_port):
            raise OSError("[notify] hl7_host/hl7_port are no longer configured")
        ack = send_mllp(self.config.hl7_host, self.config.hl7_port, message, timeout=self.config.timeout)
        if ack != "AA":
            raise OSError(f"the HL7 receiver answered {ack}")
        return "ACK AA"
