"""HTTP delivery: DICOMweb STOW-RS (any DICOMweb server, through dicomweb-client) and Orthanc's REST API
(orthanc-api-client).

Same contract as the C-STORE sender: one outcome per file, never an exception for a refused object.
Secrets (basic password, bearer token) are read from the environment or a file at each send and never
logged; error messages carry HTTP status codes and server messages only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import requests
from dicomweb_client import DICOMwebClient
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from node.config import Destination
from node.errors import ConfigError
from node.net.dicomweb import dicomweb_client
from node.net.scu import DicomSender, Sender, SendOutcome

__all__ = ["DicomWebSender", "OrthancRestSender", "make_sender"]

logger = logging.getLogger(__name__)


class DicomWebSender:
    """STOW-RS (``POST {url}/studies``, one instance per request) through dicomweb-client."""

    def __init__(self, destination: Destination) -> None:
        self.destination = destination

    def send(self, paths: list[str]) -> list[SendOutcome]:
        try:
            client = dicomweb_client(self.destination)
        except ConfigError as exc:
            return [SendOutcome(p, False, None, str(exc)) for p in paths]
        return [self._send_one(client, p) for p in paths]

    def _send_one(self, client: DICOMwebClient, path: str) -> SendOutcome:
        url = f"{self.destination.url} (STOW-RS)"
        try:
            ds = dcmread(path)
        except (OSError, InvalidDicomError) as exc:
            return SendOutcome(path, False, None, f"cannot read {path}: {exc}")
        try:
            response = client.store_instances([ds])
        except requests.HTTPError as exc:
            r = exc.response
            code = r.status_code if r is not None else None
            text = r.text[:300] if r is not None else str(exc)
            return SendOutcome(path, False, f"HTTP {code}", f"{url} refused: HTTP {code}: {text}")
        except requests.RequestException as exc:
            return SendOutcome(path, False, None, f"{url}: {type(exc).__name__}: {exc}")
        failed = response.get("FailedSOPSequence", []) if response is not None else []
        if failed:
            reason = failed[0].get("FailureReason", "?")
            return SendOutcome(path, False, "failed", f"{url} failed the instance (reason {reason})")
        return SendOutcome(path, True, "stored")


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
