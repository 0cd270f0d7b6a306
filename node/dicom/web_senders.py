"""HTTP delivery: DICOMweb STOW-RS (any DICOMweb server) and Orthanc's REST API (orthanc-api-client).

Same contract as the C-STORE sender: one outcome per file, never an exception for a refused object.
Secrets (basic password, bearer token) are read from the environment or a file at each send and never
logged; error messages carry HTTP status codes and server messages only.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import httpx

from node.config import Destination
from node.dicom.scu import DicomSender, Sender, SendOutcome
from node.errors import ConfigError

__all__ = ["DicomWebSender", "OrthancRestSender", "http_auth", "make_sender"]

logger = logging.getLogger(__name__)

_REFERENCED_SOP = "00081199"
_FAILED_SOP = "00081198"
_FAILURE_REASON = "00081197"
_SOP_INSTANCE = "00081155"


def http_auth(dest: Destination) -> tuple[httpx.Auth | None, dict[str, str]]:
    """httpx auth and headers for a destination's basic or bearer authentication (secret read now)."""
    secret = dest.secret()
    if dest.auth == "basic":
        return httpx.BasicAuth(dest.username or "", secret or ""), {}
    if dest.auth == "bearer":
        return None, {"Authorization": f"Bearer {secret}"}
    return None, {}


class DicomWebSender:
    """STOW-RS: ``POST {url}/studies`` with one ``multipart/related; type="application/dicom"`` part per file."""

    def __init__(self, destination: Destination) -> None:
        self.destination = destination

    def send(self, paths: list[str]) -> list[SendOutcome]:
        d = self.destination
        try:
            auth, headers = http_auth(d)
        except ConfigError as exc:
            return [SendOutcome(p, False, None, str(exc)) for p in paths]
        url = str(d.url).rstrip("/") + "/studies"
        out: list[SendOutcome] = []
        with httpx.Client(auth=auth, headers=headers, timeout=d.timeout, verify=d.verify_tls) as client:
            for p in paths:
                out.append(self._send_one(client, url, p))
        return out

    def _send_one(self, client: httpx.Client, url: str, path: str) -> SendOutcome:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            return SendOutcome(path, False, None, f"cannot read {path}: {exc.strerror}")
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data +
                f"\r\n--{boundary}--\r\n".encode())
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                   "Accept": "application/dicom+json"}
        try:
            r = client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return SendOutcome(path, False, None, f"STOW-RS to {url}: {type(exc).__name__}: {exc}")
        if r.status_code not in (200, 202):
            return SendOutcome(path, False, f"HTTP {r.status_code}", f"STOW-RS refused: HTTP {r.status_code} "
                               f"{r.reason_phrase}: {r.text[:300]}")
        try:
            doc: Any = r.json()
        except ValueError:
            doc = {}
        failed = (doc or {}).get(_FAILED_SOP, {}).get("Value", []) if isinstance(doc, dict) else []
        if failed:
            reason = failed[0].get(_FAILURE_REASON, {}).get("Value", ["?"])[0]
            return SendOutcome(path, False, f"HTTP {r.status_code}", f"STOW-RS failed the instance (reason {reason})")
        return SendOutcome(path, True, f"HTTP {r.status_code}")


class OrthancRestSender:
    """Orthanc REST: ``POST {url}/instances`` through orthanc-api-client."""

    def __init__(self, destination: Destination) -> None:
        self.destination = destination

    def send(self, paths: list[str]) -> list[SendOutcome]:
        from orthanc_api_client import OrthancApiClient

        d = self.destination
        try:
            secret = d.secret()
        except ConfigError as exc:
            return [SendOutcome(p, False, None, str(exc)) for p in paths]
        kwargs: dict[str, Any] = {}
        if d.auth == "basic":
            kwargs = {"user": d.username, "pwd": secret}
        elif d.auth == "bearer":
            kwargs = {"headers": {"Authorization": f"Bearer {secret}"}}
        client = OrthancApiClient(str(d.url), **kwargs)
        out = []
        try:
            for p in paths:
                try:
                    ids = client.upload(Path(p).read_bytes())
                    out.append(SendOutcome(p, bool(ids), "uploaded" if ids else None,
                                           None if ids else "Orthanc returned no instance id"))
                except OSError as exc:
                    out.append(SendOutcome(p, False, None, f"cannot read {p}: {exc.strerror}"))
                except Exception as exc:
                    out.append(SendOutcome(p, False, None, f"Orthanc REST upload to {d.url}: "
                                                           f"{type(exc).__name__}: {str(exc)[:300]}"))
        finally:
            client.close()
        return out


def make_sender(destination: Destination, *, calling_ae: str) -> Sender:
    """The sender for a destination's kind."""
    if destination.kind == "dicomweb":
        return DicomWebSender(destination)
    if destination.kind == "orthanc":
        return OrthancRestSender(destination)
    return DicomSender(destination, calling_ae=calling_ae)
