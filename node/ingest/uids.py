"""UIDs at the door: validated on receipt, and made safe before they name a file.

A DICOM UID (PS3.5 §9.1) is at most 64 characters of digits and dots, in components with no leading
zero (except "0" itself) and no empty component. An instance whose identifying UIDs break that is
refused on receipt, so nothing invalid ever reaches the index, a path or an output.
"""

from __future__ import annotations

import hashlib
import re

from pydicom.dataset import Dataset

from node.errors import InvalidInstanceError

__all__ = ["check_uid", "is_valid_uid", "safe_uid"]

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_LOOSE_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_valid_uid(value: str) -> bool:
    """True for a well-formed UID: digits and dots, components without leading zeros, 1-64 characters."""
    return 0 < len(value) <= 64 and bool(_UID_RE.match(value))


def check_uid(ds: Dataset, keyword: str) -> str:
    """The value of a UID attribute of ``ds``, checked.

    Raises:
        InvalidInstanceError: the attribute is missing, empty, unreadable or not a valid UID; the message
            names the attribute and shows (a prefix of) the value.
    """
    try:
        raw = ds.get(keyword)
    except Exception as exc:
        raise InvalidInstanceError(f"{keyword} is unreadable: {exc}") from exc
    if raw is None:
        raise InvalidInstanceError(f"{keyword} is missing")
    value = str(raw).strip().rstrip("\x00")
    if not value:
        raise InvalidInstanceError(f"{keyword} is empty")
    if len(value) > 64:
        raise InvalidInstanceError(f"{keyword} is {len(value)} characters long ({value[:24]!r}...); a UID has at "
                                   "most 64")
    if not _UID_RE.match(value):
        raise InvalidInstanceError(f"{keyword} {value!r} is not a UID (digits and dots, no leading zeros, "
                                   "no empty component)")
    return value


def safe_uid(uid: str) -> str:
    """A file-system-safe name for a UID.

    A UID made of digits and dots (at most 64 characters) is used as is; anything else (path characters,
    spaces, overlong values) is replaced by ``x`` + the SHA-256 of the value, so it can never escape the
    spool folder or collide with a real UID. Received instances are checked with :func:`check_uid` first;
    this is the second line of defence for every other value that names a file.
    """
    value = uid.strip().rstrip("\x00")
    if _LOOSE_RE.match(value) and len(value) <= 64:
        return value
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]
