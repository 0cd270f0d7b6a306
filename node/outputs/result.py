"""What a job leaves behind: its result objects, written atomically in the job's own folder.

The outputs side owns these: the pipeline makes :class:`ResultObject` values, the job store queues them
for delivery (it needs only their path, SOP Instance UID and SOP class), retention removes the folders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from node.outputs.encode import encoded_sequences

__all__ = ["ResultObject", "attempt_dir", "job_dir", "save_dataset", "write_private"]


@dataclass(frozen=True, slots=True)
class ResultObject:
    """A result file of a job, to be delivered."""

    path: str
    sop_uid: str
    sop_class: str
    series_uid: str = ""

    @classmethod
    def of(cls, ds: Dataset, path: Path) -> ResultObject:
        return cls(str(path), str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.get("SeriesInstanceUID", "")))


def job_dir(data_dir: Path, job_id: int) -> Path:
    """The folder of all attempts of one job: ``<data_dir>/outputs/job-NNNNNN``."""
    return data_dir / "outputs" / f"job-{job_id:06d}"


def attempt_dir(data_dir: Path, job_id: int, attempt: int) -> Path:
    """The folder of one attempt: a retried job never overwrites what an earlier attempt queued."""
    return job_dir(data_dir, job_id) / f"attempt-{attempt}"


def save_dataset(ds: Dataset, path: Path, *, fsync: bool = True) -> Path:
    """Write a dataset atomically (temp file, fsync, rename); the file is readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(path.suffix + ".part")
    try:
        with encoded_sequences(ds):  # thousands of frames or findings: their items encoded once each (encode.py)
            ds.save_as(tmp, enforce_file_format=True)
        os.chmod(tmp, 0o600)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:  # the disk filled up, or anything else: no partial file is left behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_private(path: Path, text: str) -> Path:
    """Write a small text file readable by its owner only (mode 0600 whatever the umask)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except BaseException:  # a half-written file is worse than none
        path.unlink(missing_ok=True)
        raise
    os.chmod(path, 0o600)
    return path
