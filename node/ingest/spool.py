"""The spool: received instances on disk, exactly as they came, and their index in the database.

An instance is written to ``<data_dir>/spool/<study>/<series>/<sop>.dcm`` through a temporary file,
fsynced, renamed into place, the folder fsynced, and then indexed in one transaction. Only after all
of that may the SCP answer Success. A crash at any point leaves either no trace (temp files are
swept at start) or a complete file; an indexed instance always has its complete file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from node.errors import InvalidInstanceError, OutOfSpaceError, SpoolError
from node.ingest.uids import check_uid, is_valid_uid, safe_uid
from node.store.series import InstanceRecord, SeriesStore

__all__ = ["ROUTING_EXCLUDED", "IngestResult", "Spool", "routing_attributes", "safe_uid"]

logger = logging.getLogger(__name__)

#: Attributes never copied into the routing index (identifying or bulky).
ROUTING_EXCLUDED = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames",
    "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName", "PixelData",
})


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


def _placement(ds: Dataset) -> dict[str, Any]:
    """InstanceNumber, position along the slice normal and frame count: what the assembler needs to tell
    a complete series from one with holes, without decoding anything."""
    out: dict[str, Any] = {"instance_number": None, "position": None, "orientation": None, "frames": 1}
    try:
        if ds.get("InstanceNumber") not in (None, ""):
            number = int(ds.InstanceNumber)
            # beyond an SQLite integer ("99999999999999999999"): not a number the completeness checks can use
            out["instance_number"] = number if -(2**63) <= number < 2**63 else None
        out["frames"] = max(int(ds.get("NumberOfFrames", 1) or 1), 1)
        ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
        if ipp is not None and iop is not None and len(ipp) == 3 and len(iop) == 6:
            row, col = [float(v) for v in iop[:3]], [float(v) for v in iop[3:]]
            normal = (row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2],
                      row[0] * col[1] - row[1] * col[0])
            out["position"] = sum(float(p) * n for p, n in zip(ipp, normal, strict=True))
            out["orientation"] = ",".join(f"{v:.3f}" for v in (*row, *col))
    except (TypeError, ValueError, OverflowError, ArithmeticError):  # "1e400" is infinite, int() of it overflows
        pass  # a malformed value only weakens the completeness checks; the volume reader reports it
    return out


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What the spool did with one instance."""

    sop_uid: str
    series_uid: str
    path: Path
    duplicate: bool
    late: bool
    #: the SOP Instance UID was known with other content (see ``node.on_conflict``)
    conflict: bool = False
    replaced: bool = False


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
        series: the series store, which indexes what is written.
        reserve_bytes: refuse (OutOfSpaceError) when less than this would remain free after the write.
        fsync: fsync files and folders before answering (turn off only for throw-away test nodes).
        late_instances: "reprocess" or "ignore": what a new instance of an already processed series does.
        on_conflict: "keep" (the first copy stays; the conflict is logged and audited) or "replace" (the
            new copy replaces it and the series is processed again) when a known SOP Instance UID
            arrives with other content.
    """

    def __init__(self, root: Path, series: SeriesStore, *, reserve_bytes: int = 0, fsync: bool = True,
                 late_instances: str = "reprocess", on_conflict: str = "keep") -> None:
        self.root = root
        self.series = series
        self.reserve_bytes = reserve_bytes
        self.fsync = fsync
        self.late_instances = late_instances
        self.on_conflict = on_conflict
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
        except MemoryError:
            raise
        except Exception as exc:  # whatever the parser raises on these bytes is about the bytes, not about us:
            # truncation (EOFError), bad lengths (ValueError), deflate streams that are not (zlib.error),
            # nesting deeper than the interpreter's stack (RecursionError), ... -> 0xC000, not 0x0110
            raise InvalidInstanceError(f"cannot parse the dataset: {type(exc).__name__}: "
                                       f"{str(exc)[:200] or 'no detail'}") from exc
        try:
            _check_pixel_data(ds)
        except InvalidInstanceError as exc:
            self._refused_unreadable(ds, str(exc), calling_ae=calling_ae, now=now)
            raise
        try:
            sop_uid = check_uid(ds, "SOPInstanceUID")
            series_uid = check_uid(ds, "SeriesInstanceUID")
            study_uid = check_uid(ds, "StudyInstanceUID")
            sop_class = check_uid(ds, "SOPClassUID")
            if "FrameOfReferenceUID" in ds:
                check_uid(ds, "FrameOfReferenceUID")
        except InvalidInstanceError as exc:
            if str(exc).startswith("SOPInstanceUID"):
                raise
            raise InvalidInstanceError(f"{exc} (SOP Instance UID {str(ds.get('SOPInstanceUID', '?'))[:80]!r})") \
                from exc
        if expected_sop_uid is not None and expected_sop_uid != sop_uid:
            raise InvalidInstanceError(f"the request names SOP Instance UID {expected_sop_uid} but the dataset "
                                       f"holds {sop_uid}")
        ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))

        digest = hashlib.sha256(raw).hexdigest()
        existing = self.series.instance(sop_uid)
        replacing = False
        if existing is not None and Path(existing["path"]).exists():
            if not existing["content_hash"] or existing["content_hash"] == digest:
                logger.debug("instance %s already spooled; re-send acknowledged without rewriting", sop_uid)
                return IngestResult(sop_uid, series_uid, Path(existing["path"]), duplicate=True, late=False)
            if self.on_conflict != "replace":
                self.series.record_conflict(sop_uid, series_uid=str(existing["series_uid"]), kept="first",
                                            calling_ae=calling_ae)
                logger.warning("instance %s (series %s) received again with different content from %s: "
                               "the first copy is kept (node.on_conflict = keep)", sop_uid, series_uid, calling_ae)
                return IngestResult(sop_uid, series_uid, Path(existing["path"]), duplicate=True, late=False,
                                    conflict=True)
            replacing = True

        if self.free_bytes() - len(raw) < self.reserve_bytes:
            self._note_refusal(reason="out of resources", series_uid=series_uid, sop_uid=sop_uid,
                                       calling_ae=calling_ae, now=now)
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
            self._note_refusal(reason="out of resources" if exc.errno == 28 else "write failed",
                                       series_uid=series_uid, sop_uid=sop_uid, calling_ae=calling_ae, now=now)
            if exc.errno == 28:  # ENOSPC
                raise OutOfSpaceError(f"disk full while writing {target.name}") from exc
            raise SpoolError(f"could not write {target}: {exc}") from exc

        if replacing:
            self.series.record_conflict(sop_uid, series_uid=series_uid, kept="new", calling_ae=calling_ae)
            logger.warning("instance %s (series %s) received again with different content from %s: the new copy "
                           "replaces it (node.on_conflict = replace)", sop_uid, series_uid, calling_ae)
        try:
            rec = InstanceRecord(sop_uid=sop_uid, series_uid=series_uid, study_uid=study_uid, sop_class=sop_class,
                                 transfer_syntax=ts, path=target, size=len(raw), calling_ae=calling_ae,
                                 called_ae=called_ae, modality=str(ds.get("Modality", "")),
                                 routing_attrs=lambda: routing_attributes(ds), content_hash=digest,
                                 **_placement(ds))
            indexed = self.series.index_instance(rec, late_policy="reprocess" if replacing else self.late_instances,
                                                 now=now)
        except sqlite3.Error as exc:  # the file is written but not indexed: remove it, answer a failure
            if not replacing:
                target.unlink(missing_ok=True)
            if "full" in str(exc).lower():
                raise OutOfSpaceError(f"database full while indexing {target.name} ({exc})") from exc
            raise SpoolError(f"could not index {target.name}: {exc}") from exc
        except Exception as exc:  # a value the index cannot hold: no orphan file, and the sender is told why
            if not replacing:
                target.unlink(missing_ok=True)
            raise InvalidInstanceError(f"cannot index the instance: {type(exc).__name__}: {exc}") from exc
        if indexed.late:
            logger.info("late instance %s for already processed series %s (late_instances=%s)",
                        sop_uid, series_uid, self.late_instances)
        return IngestResult(sop_uid, series_uid, target, duplicate=False, late=indexed.late,
                            conflict=replacing, replaced=replacing)

    def _refused_unreadable(self, ds: Dataset, why: str, *, calling_ae: str, now: float) -> None:
        """An instance of a known series whose content cannot be understood: its series is incomplete."""
        try:
            series_uid, sop_uid = str(ds.get("SeriesInstanceUID", "")), str(ds.get("SOPInstanceUID", ""))
        except Exception:  # the UIDs themselves are unreadable: nothing to attach the refusal to
            return
        if is_valid_uid(series_uid) and is_valid_uid(sop_uid):
            self._note_refusal(reason="cannot understand", series_uid=series_uid, sop_uid=sop_uid,
                                       calling_ae=calling_ae, now=now)

    def _note_refusal(self, **kwargs: Any) -> None:
        """Record a refusal in the database if it can (on a full disk it cannot: the refusal still stands)."""
        try:
            self.series.record_refusal(**kwargs)
        except sqlite3.Error as exc:
            logger.debug("refusal not recorded: %s", exc)

    def record_association_refusal(self, calling_ae: str, reason: str) -> None:
        """A whole association of ``calling_ae`` was refused: what it carried may belong to a series being
        received (see the assembler's completeness checks)."""
        self._note_refusal(reason=reason, calling_ae=calling_ae)
