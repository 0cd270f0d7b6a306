"""Sending results: the Sender protocol and its DICOM C-STORE implementation.

A sender takes the files of one destination and returns one outcome per file; it never raises for a
refused object (the outcome says why), only the delivery loop decides about retries.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.config import Destination

__all__ = ["DICOMDIR_CLASS", "DicomSender", "SendOutcome", "Sender", "count_series_instances", "echo", "iter_dicom_files",
           "send_files", "unsendable"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """Result of sending one file: ok, the DICOM status (hex) or None, and an error message."""

    path: str
    ok: bool
    status: str | None
    error: str | None = None


class Sender(Protocol):
    """Delivers files to one destination."""

    def send(self, paths: list[str]) -> list[SendOutcome]: ...


def _status_text(status: int) -> str:
    return f"0x{status:04X}"


def send_files(paths: list[str], *, ae_title: str, host: str, port: int, calling_ae: str = "PREANNOT",
               max_pdu: int = 0, timeout: float = 30.0, ssl_context: ssl.SSLContext | None = None,
               server_hostname: str | None = None) -> list[SendOutcome]:
    """C-STORE each file over one association (contexts proposed from the files' SOP classes and syntaxes).

    Returns:
        One outcome per path, in order. If the association cannot be established, every outcome says so.
    """
    outcomes: list[SendOutcome] = []
    datasets = {}
    contexts: dict[str, set[str]] = {}
    for p in paths:
        try:
            ds = dcmread(p)
        except Exception as exc:
            outcomes.append(SendOutcome(p, False, None, f"cannot read {p}: {exc}"))
            continue
        why = unsendable(ds)
        if why is not None:
            outcomes.append(SendOutcome(p, False, None, f"not sendable: {why}"))
            continue
        datasets[p] = ds
        contexts.setdefault(str(ds.SOPClassUID), set()).add(str(ds.file_meta.TransferSyntaxUID))
    if not datasets:
        return outcomes
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.maximum_pdu_size = max_pdu
    # one context per (SOP class, transfer syntax) so the peer can accept each syntax as sent
    requested: list[Any] = []
    for sop, syntaxes in contexts.items():
        requested.extend(build_context(sop, [ts]) for ts in sorted(syntaxes))
        if not syntaxes & {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2"}:
            requested.append(build_context(sop, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]))
    requested = requested[:128]
    tls_args = (ssl_context, server_hostname or host) if ssl_context is not None else None
    try:
        assoc = ae.associate(host, port, contexts=requested, ae_title=ae_title, tls_args=tls_args)
    except (OSError, ValueError) as exc:  # e.g. a TLS handshake failure
        return outcomes + [SendOutcome(p, False, None, f"{ae_title}@{host}:{port}: {exc}") for p in datasets]
    if not assoc.is_established:
        reason = "association rejected by the destination" if assoc.is_rejected \
            else "no association: connection refused or aborted (destination down or unreachable)"
        return outcomes + [SendOutcome(p, False, None, f"{ae_title}@{host}:{port}: {reason}") for p in datasets]
    try:
        for p, ds in datasets.items():
            try:
                status = assoc.send_c_store(ds)
            except Exception as exc:
                outcomes.append(SendOutcome(p, False, None, f"C-STORE failed: {exc}"))
                continue
            code = int(getattr(status, "Status", -1)) if status else -1
            if code == -1:
                outcomes.append(SendOutcome(p, False, None, "no response (connection lost or timeout)"))
            elif code == 0x0000 or 0xB000 <= code <= 0xBFFF:
                outcomes.append(SendOutcome(p, True, _status_text(code)))
            else:
                outcomes.append(SendOutcome(p, False, _status_text(code), f"refused with status {_status_text(code)}"))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


class DicomSender:
    """C-STORE SCU to one configured destination."""

    def __init__(self, destination: Destination, *, calling_ae: str) -> None:
        self.destination = destination
        self.calling_ae = destination.calling_ae_title or calling_ae

    def send(self, paths: list[str]) -> list[SendOutcome]:
        d = self.destination
        assert d.ae_title and d.host and d.port  # validated by the configuration
        ctx = None
        if d.tls:
            from node.net.tls import client_context

            ctx = client_context(ca=d.tls_ca, cert=d.tls_cert, key=d.tls_key, verify=d.verify_tls)
        return send_files(paths, ae_title=d.ae_title, host=d.host, port=d.port, calling_ae=self.calling_ae,
                          max_pdu=d.max_pdu, timeout=d.timeout, ssl_context=ctx)


def echo(*, ae_title: str, host: str, port: int, calling_ae: str = "PREANNOT", timeout: float = 10.0) -> bool:
    """C-ECHO a peer; True when it answered Success."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.Status) == 0
    finally:
        assoc.release()


#: Media Storage Directory (DICOMDIR): an index of the files on a medium, not an instance
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"


def unsendable(ds: Any) -> str | None:
    """Why a dataset read from a file cannot be sent by C-STORE (a DICOMDIR, a vendor's index file such as a
    Philips DIRFILE, an object without SOP Class or Instance UID), or None."""
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    if sop_class == DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
        return "a DICOMDIR (an index of the files), not an instance"
    missing = [kw for kw in ("SOPClassUID", "SOPInstanceUID") if not ds.get(kw)]
    if missing:
        return f"no {' or '.join(missing)} (an index or vendor file, not a DICOM instance)"
    if meta is None or not meta.get("TransferSyntaxUID"):
        return "no transfer syntax in its file meta information"
    return None


def iter_dicom_files(root: Path) -> list[Path]:
    """Every file under ``root`` (or ``root`` itself) that starts like a DICOM file (DICM at 128)."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    out = []
    for p in files:
        try:
            with p.open("rb") as f:
                head = f.read(132)
        except OSError:
            continue
        if len(head) == 132 and head[128:132] == b"DICM":
            out.append(p)
    return out


def count_series_instances(*, ae_title: str, host: str, port: int, calling_ae: str, study_uid: str,
                           series_uid: str, timeout: float = 10.0) -> int | None:
    """NumberOfSeriesRelatedInstances of a series, asked by C-FIND (Study Root, SERIES level); None when
    the peer cannot be asked or does not say."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    try:
        assoc = ae.associate(host, port, ae_title=ae_title)
    except (OSError, ValueError) as exc:
        logger.warning("C-FIND to %s@%s:%d failed: %s", ae_title, host, port, exc)
        return None
    if not assoc.is_established:
        logger.warning("C-FIND to %s@%s:%d: no association", ae_title, host, port)
        return None
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = series_uid
    query.NumberOfSeriesRelatedInstances = ""
    found: int | None = None
    try:
        for status, ident in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if status is not None and int(status.Status) in (0xFF00, 0xFF01) and ident is not None:
                value = ident.get("NumberOfSeriesRelatedInstances")
                if value not in (None, ""):
                    found = int(value)
    except (ValueError, TypeError) as exc:
        logger.warning("C-FIND to %s@%s:%d: unreadable answer: %s", ae_title, host, port, exc)
    finally:
        assoc.release()
    return found
