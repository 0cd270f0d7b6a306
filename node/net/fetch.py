"""Fetching a past study from a PACS so it is processed again: C-MOVE to the node, or WADO-RS + C-STORE.

- ``kind = "dicom"`` destinations: a C-MOVE (Study Root) asks the PACS to send the study to the node's
  own AE title; the PACS must know that AE (it already does when it routes to the node).
- ``kind = "dicomweb"`` destinations: the study is retrieved by WADO-RS and pushed to the node by
  C-STORE, so it enters through the same durable ingest as everything else.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove  # type: ignore[attr-defined]

from node.config import Destination, NodeConfig
from node.errors import DeliveryError
from node.net.dicomweb import dicomweb_client
from node.net.scu import send_files

__all__ = ["FetchResult", "cfind", "cget", "cmove", "fetch_study", "wado_to_node"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FetchResult:
    completed: int
    failed: int
    warning: int
    how: str


def cmove(src: Destination, study_uid: str, move_to: str, calling_ae: str, *,
          series_uid: str | None = None) -> FetchResult:
    """C-MOVE (Study Root) of a study, or of one of its series, to AE ``move_to``.

    Raises:
        DeliveryError: no association, no response, or a failure status (with what was sent).
    """
    what = f"series {series_uid}" if series_uid else f"study {study_uid}"
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = max(src.timeout, 60.0)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assert src.host and src.port and src.ae_title
    assoc = ae.associate(src.host, src.port, ae_title=src.ae_title)
    if not assoc.is_established:
        raise DeliveryError(f"{src.describe()}: no association for C-MOVE (down, or our AE {calling_ae} not allowed)")
    ident = Dataset()
    ident.QueryRetrieveLevel = "SERIES" if series_uid else "STUDY"
    ident.StudyInstanceUID = study_uid
    if series_uid:
        ident.SeriesInstanceUID = series_uid
    completed = failed = warning = 0
    last = None
    try:
        for status, _ in assoc.send_c_move(ident, move_to, StudyRootQueryRetrieveInformationModelMove):
            if status is None:
                raise DeliveryError(f"{src.describe()}: C-MOVE got no response (timeout)")
            last = int(status.Status)
            completed = int(status.get("NumberOfCompletedSuboperations", completed) or completed)
            failed = int(status.get("NumberOfFailedSuboperations", failed) or failed)
            warning = int(status.get("NumberOfWarningSuboperations", warning) or warning)
    finally:
        assoc.release()
    if last not in (0x0000, 0xB000) and completed == failed == 0:
        raise DeliveryError(f"{src.describe()}: C-MOVE of {what} ended with status 0x{(last or 0):04X} "
                            f"and no instance was sent: the PACS holds no such {what.split()[0]}, or does not know "
                            f"AE {move_to}")
    if last not in (0x0000, 0xB000):
        raise DeliveryError(f"{src.describe()}: C-MOVE of {what} to {move_to} ended with status "
                            f"0x{(last or 0):04X} ({completed} sent, {failed} failed); does the PACS know AE {move_to}?")
    return FetchResult(completed, failed, warning, f"C-MOVE from {src.describe()} to {move_to}")


def wado_to_node(src: Destination, study_uid: str, node_host: str, node_port: int, node_ae: str, calling_ae: str,
                 *, series_uid: str | None = None) -> FetchResult:
    """WADO-RS retrieval of a study (or one of its series), pushed to the node by C-STORE so that it enters
    through the durable ingest. A study or series the source does not know gives an empty result.

    Raises:
        DeliveryError: the source failed.
    """
    client = dicomweb_client(src, timeout=max(src.timeout, 120.0))
    how = f"WADO-RS from {src.url}, C-STORE to {node_ae}"
    where = f"{src.url}/studies/{study_uid}" + (f"/series/{series_uid}" if series_uid else "")
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        try:
            items = client.iter_series(study_uid, series_uid) if series_uid else client.iter_study(study_uid)
            for n, ds in enumerate(items):
                p = Path(tmp) / f"{n:05d}.dcm"
                ds.save_as(p, enforce_file_format=True)
                paths.append(str(p))
        except requests.HTTPError as exc:
            if exc.response is not None and exc.response.status_code == 404:
                return FetchResult(0, 0, 0, how)  # the source does not know it
            raise DeliveryError(f"WADO-RS {where}: {exc}") from exc
        except requests.RequestException as exc:
            raise DeliveryError(f"WADO-RS {where}: {type(exc).__name__}: {exc}") from exc
        if not paths:
            return FetchResult(0, 0, 0, how)
        outcomes = send_files(paths, ae_title=node_ae, host=node_host, port=node_port, calling_ae=calling_ae)
    ok = sum(o.ok for o in outcomes)
    return FetchResult(ok, len(outcomes) - ok, 0, how)


def fetch_study(config: NodeConfig, source: str, study_uid: str, *, node_host: str = "127.0.0.1") -> FetchResult:
    """Have the study sent to this node (which must be running) so its series are processed.

    Raises:
        ConfigError: no such destination.
        DeliveryError: the PACS refused or could not be reached.
    """
    src = config.destination(source)
    if src.kind == "dicom":
        return cmove(src, study_uid, config.node.ae_title, src.calling_ae_title or config.node.ae_title)
    if src.kind == "dicomweb":
        return wado_to_node(src, study_uid, node_host, config.node.port, config.node.ae_title,
                     src.calling_ae_title or src.name.upper()[:16])
    raise DeliveryError(f"destination {source!r} is of kind {src.kind}; fetch needs a dicom or dicomweb source")


def _associate(src: Destination, calling_ae: str, contexts: list[Any], **kwargs: Any) -> Any:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = max(src.timeout, 60.0)
    for cx in contexts:
        ae.add_requested_context(cx)
    assert src.host and src.port and src.ae_title
    assoc = ae.associate(src.host, src.port, ae_title=src.ae_title, **kwargs)
    if not assoc.is_established:
        raise DeliveryError(f"{src.describe()}: no association (down, or our AE {calling_ae} not allowed)")
    return assoc


def cfind(src: Destination, query: Dataset, calling_ae: str) -> list[Dataset]:
    """C-FIND (Study Root) of ``query``; the matches.

    Raises:
        DeliveryError: no association, or a failure status.
    """
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

    assoc = _associate(src, calling_ae, [StudyRootQueryRetrieveInformationModelFind])
    found: list[Dataset] = []
    try:
        for status, ident in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if not status:
                raise DeliveryError(f"{src.describe()}: C-FIND got no response")
            if status.Status in (0xFF00, 0xFF01) and ident is not None:
                found.append(ident)
            elif status.Status != 0x0000:
                raise DeliveryError(f"{src.describe()}: C-FIND failed with status 0x{status.Status:04X}")
    finally:
        assoc.release()
    return found


#: what a prior's retrieval receives: the images a model reads and the node's own result objects
_GET_CLASSES = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.4",
                "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.130",
                "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7", "1.2.840.10008.5.1.4.1.1.88.34",
                "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.22")


def cget(src: Destination, study_uid: str, series_uid: str, out_dir: Path, calling_ae: str) -> list[Path]:
    """C-GET (Study Root) of one series into ``out_dir`` (one file per instance, named by its sanitised SOP
    Instance UID); the files written.

    Raises:
        DeliveryError: no association, a failure status, or nothing received.
    """
    from pynetdicom import build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]

    from node.ingest.uids import safe_uid

    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    written: list[Path] = []

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        path = out_dir / f"{safe_uid(str(ds.SOPInstanceUID))}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
        return 0x0000

    roles = [build_role(uid, scp_role=True) for uid in _GET_CLASSES]
    assoc = _associate(src, calling_ae, [StudyRootQueryRetrieveInformationModelGet, *_GET_CLASSES],
                       ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = series_uid
    failed = 0
    try:
        for status, _ident in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            if not status:
                raise DeliveryError(f"{src.describe()}: C-GET of series {series_uid} got no response")
            if status.Status not in (0x0000, 0xFF00, 0xFF01, 0xB000):
                raise DeliveryError(f"{src.describe()}: C-GET of series {series_uid} failed with status "
                                    f"0x{status.Status:04X}")
            failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
    finally:
        assoc.release()
    if not written:
        raise DeliveryError(f"{src.describe()}: C-GET of series {series_uid} sent nothing ({failed} failed)")
    return written
