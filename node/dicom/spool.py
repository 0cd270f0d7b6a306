"""The spool: received instances on disk, exactly as they came, and their index in the database.

An instance is written to ``<data_dir>/spool/<study>/<series>/<sop>.dcm`` through a temporary file,
fsynced, renamed into place, the folder fsynced, and then indexed in one transaction. Only after all
of that may the SCP answer Success. A crash at any point leaves either no trace (temp files are
swept at start) or a complete file; an indexed instance always has its complete file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from node.audit import append_event
from node.db import Database
from node.errors import InvalidInstanceError, OutOfSpaceError, SpoolError

__all__ = ["ROUTING_EXCLUDED", "IngestResult", "Spool", "routing_attributes", "safe_uid"]

logger = logging.getLogger(__name__)

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

#: Attributes never copied into the routing index (identifying or bulky).
ROUTING_EXCLUDED = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames",
    "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName", "PixelData",
})


def safe_uid(uid: str) -> str:
    """A file-system-safe name for a UID.

    A well-formed UID (digits and dots, at most 64 characters) is used as is; anything else (path
    characters, spaces, overlong values) is replaced by ``x`` + the SHA-256 of the value, so it can
    never escape the spool folder or collide with a real UID.
    """
    value = uid.strip().rstrip("\x00")
    if _UID_RE.match(value) and len(value) <= 64 and value not in (".", ".."):
        return value
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def routing_attributes(ds: Dataset) -> dict[str, Any]:
    """Top-level, short, non-identifying attributes of an instance, for route matching."""
    out: dict[str, Any] = {}
    for elem in ds:
        kw = elem.keyword
        if not kw or kw in ROUTING_EXCLUDED or elem.VR in ("SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"):
            continue
        if elem.tag.group in (0x0002,) or elem.tag.is_private:
            continue
        try:
            val = elem.value
        except Exception:
            continue
        if val is None or val == "":
            continue
        if hasattr(val, "__iter__") and not isinstance(val, str | bytes):
            items = [str(v) for v in val]
            if sum(len(s) for s in items) > 256:
                continue
            out[kw] = items
        else:
            s = str(val)
            if len(s) <= 256:
                out[kw] = s
    return out


_NATIVE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99")


def _check_pixel_data(ds: Dataset) -> None:
    """Refuse native pixel data that cannot hold Rows x Columns x frames x samples (truncated, absurd sizes)."""
    if "PixelData" not in ds:
        return
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        bits = int(ds.get("BitsAllocated", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (ValueError, TypeError) as exc:
        raise InvalidInstanceError(f"unreadable image pixel description: {exc}") from exc
    if rows <= 0 or cols <= 0 or bits <= 0:
        raise InvalidInstanceError(f"pixel data with Rows x Columns {rows} x {cols} and BitsAllocated {bits}")
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    if ts in _NATIVE:
        expected = (rows * cols * frames * samples * bits + 7) // 8
        found = len(ds.PixelData)
        if found < expected:
            raise InvalidInstanceError(f"pixel data is {found} bytes; Rows x Columns x frames x samples x bits "
                                       f"({rows} x {cols} x {frames} x {samples} x {bits}) needs {expected}")


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What the spool did with one instance."""

    sop_uid: str
    series_uid: str
    path: Path
    duplicate: bool
    late: bool


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Writes and indexes received instances.

    Args:
        root: the spool folder (``<data_dir>/spool``).
        db: the node database.
        reserve_bytes: refuse (OutOfSpaceError) when less than this would remain free after the write.
        fsync: fsync files and folders before answering (turn off only for throw-away test nodes).
        late_instances: "reprocess" or "ignore": what a new instance of an already processed series does.
    """

    def __init__(self, root: Path, db: Database, *, reserve_bytes: int = 0, fsync: bool = True,
                 late_instances: str = "reprocess") -> None:
        self.root = root
        self.db = db
        self.reserve_bytes = reserve_bytes
        self.fsync = fsync
        self.late_instances = late_instances
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._tmp = root / ".tmp"
        self._tmp.mkdir(exist_ok=True, mode=0o700)
        self.sweep()

    def sweep(self) -> int:
        """Remove temporary files left by a crash. Returns how many were removed."""
        n = 0
        for p in self._tmp.iterdir():
            p.unlink(missing_ok=True)
            n += 1
        if n:
            logger.info("removed %d partial spool files left by an interrupted write", n)
        return n

    def free_bytes(self) -> int:
        """Free bytes on the spool's file system."""
        return shutil.disk_usage(self.root).free

    def store(self, raw: bytes, *, calling_ae: str = "", called_ae: str = "",
              expected_sop_uid: str | None = None, now: float | None = None) -> IngestResult:
        """Persist one encoded instance (DICOM file bytes, preamble and meta included) and index it.

        Returns:
            Where it was stored and whether it was a duplicate or a late instance.

        Raises:
            InvalidInstanceError: the bytes are not a dataset with the UIDs needed to index it.
            OutOfSpaceError: the write would leave less than the free-space reserve.
            SpoolError: the write failed for another reason (nothing half-written is left).
        """
        now = time.time() if now is None else now
        try:
            ds = dcmread(BytesIO(raw))  # the whole dataset: a truncated or corrupt one is refused here
        except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, OverflowError) as exc:
            raise InvalidInstanceError(f"cannot parse the dataset: {exc}") from exc
        _check_pixel_data(ds)
        try:
            sop_uid = str(ds.SOPInstanceUID)
            series_uid = str(ds.SeriesInstanceUID)
            study_uid = str(ds.StudyInstanceUID)
            sop_class = str(ds.SOPClassUID)
        except AttributeError as exc:
            raise InvalidInstanceError(f"missing a required UID: {exc}") from exc
        except Exception as exc:
            raise InvalidInstanceError(f"unreadable UID element: {exc}") from exc
        if not (sop_uid and series_uid and study_uid and sop_class):
            raise InvalidInstanceError("SOPInstanceUID, SeriesInstanceUID, StudyInstanceUID and SOPClassUID "
                                       "must not be empty")
        if expected_sop_uid is not None and expected_sop_uid != sop_uid:
            raise InvalidInstanceError(f"the request names SOP Instance UID {expected_sop_uid} but the dataset "
                                       f"holds {sop_uid}")
        ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))

        existing = self.db.one("SELECT path FROM instances WHERE sop_uid = ?", (sop_uid,))
        if existing is not None and Path(existing["path"]).exists():
            logger.debug("instance %s already spooled; re-send acknowledged without rewriting", sop_uid)
            return IngestResult(sop_uid, series_uid, Path(existing["path"]), duplicate=True, late=False)

        if self.free_bytes() - len(raw) < self.reserve_bytes:
            raise OutOfSpaceError(f"spool {self.root}: {self.free_bytes() // 2**20} MiB free, "
                                  f"reserve is {self.reserve_bytes // 2**20} MiB")
        target_dir = self.root / safe_uid(study_uid) / safe_uid(series_uid)
        target = target_dir / f"{safe_uid(sop_uid)}.dcm"
        tmp = self._tmp / f"{safe_uid(sop_uid)}.{os.getpid()}.{time.monotonic_ns()}.part"
        try:
            target_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(raw)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
            if self.fsync:
                _fsync_dir(target_dir)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno == 28:  # ENOSPC
                raise OutOfSpaceError(f"disk full while writing {target.name}") from exc
            raise SpoolError(f"could not write {target}: {exc}") from exc

        late = self._index(ds, target, len(raw), sop_uid=sop_uid, series_uid=series_uid, study_uid=study_uid,
                           sop_class=sop_class, ts=ts, calling_ae=calling_ae, called_ae=called_ae, now=now)
        return IngestResult(sop_uid, series_uid, target, duplicate=False, late=late)

    def _index(self, ds: Dataset, path: Path, size: int, *, sop_uid: str, series_uid: str, study_uid: str,
               sop_class: str, ts: str, calling_ae: str, called_ae: str, now: float) -> bool:
        late = False
        with self.db.tx() as c:
            row = c.execute("SELECT state, version FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
            if row is None:
                attrs = json.dumps(routing_attributes(ds))
                c.execute(
                    "INSERT INTO series (series_uid, study_uid, modality, attrs, calling_ae, called_ae, "
                    "first_received, last_received, n_instances, state, version, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, 'receiving', 1, ?)",
                    (series_uid, study_uid, str(ds.get("Modality", "")), attrs, calling_ae, called_ae,
                     now, now, now))
                version = 1
                append_event(c, "series.received", {"study_uid": study_uid, "calling_ae": calling_ae,
                                                    "called_ae": called_ae, "modality": str(ds.get("Modality", "")),
                                                    "sop_class": sop_class}, series_uid=series_uid, now=now)
            else:
                version = int(row["version"])
                if row["state"] in ("dispatched", "unmatched", "purged"):
                    late = True
                    if self.late_instances == "reprocess" and row["state"] == "dispatched":
                        version += 1
                        c.execute("UPDATE series SET state = 'receiving', version = ?, updated_at = ? "
                                  "WHERE series_uid = ?", (version, now, series_uid))
                    elif row["state"] == "unmatched":
                        c.execute("UPDATE series SET state = 'receiving', updated_at = ? WHERE series_uid = ?",
                                  (now, series_uid))
            c.execute(
                "INSERT OR REPLACE INTO instances (sop_uid, series_uid, study_uid, sop_class, transfer_syntax, "
                "path, size, calling_ae, called_ae, received_at, series_version) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (sop_uid, series_uid, study_uid, sop_class, ts, str(path), size, calling_ae, called_ae,
                 now, version))
            c.execute("UPDATE series SET last_received = ?, n_instances = n_instances + 1, updated_at = ? "
                      "WHERE series_uid = ?", (now, now, series_uid))
        if late:
            logger.info("late instance %s for already processed series %s (late_instances=%s)",
                        sop_uid, series_uid, self.late_instances)
        return late

    def series_files(self, series_uid: str) -> list[Path]:
        """The spooled files of a series, in arrival order."""
        rows = self.db.query("SELECT path FROM instances WHERE series_uid = ? ORDER BY received_at, sop_uid",
                             (series_uid,))
        return [Path(r["path"]) for r in rows]
