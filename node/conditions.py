"""Conditions on DICOM attributes, as routes and model cards' inputs write them.

A conditions table maps a DICOM keyword to a condition; all must hold (see ``schedule/routing.py`` for the
table of forms: a value, a list, a comparison, a range, ``re:``, ``contains:``, ``*``, ``!``). Values compare
case-insensitively; numbers numerically; a multi-valued attribute matches when one of its values does.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["check", "matches"]

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, ">=": operator.ge, "==": operator.eq, "!=": operator.ne, "<": operator.lt, ">": operator.gt,
}
_OP_RE = re.compile(r"^\s*(<=|>=|==|!=|<|>)\s*(-?[0-9.]+(?:[eE][-+]?\d+)?)\s*$")
_RANGE_RE = re.compile(r"^\s*(-?[0-9.]+)\s*\.\.\s*(-?[0-9.]+)\s*$")


def _values(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, list | tuple) or (hasattr(v, "__iter__") and not isinstance(v, str | bytes)):
        return [str(x).strip() for x in v]  # a list, or pydicom's MultiValue
    return [s.strip() for s in str(v).split("\\")]


def _num(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def _eq(a: str, b: Any) -> bool:
    na, nb = _num(a), _num(str(b))
    if na is not None and nb is not None:
        return na == nb
    return a.upper() == str(b).strip().upper()


def check(cond: Any, present: Any) -> bool:
    vals = _values(present)
    has = any(v != "" for v in vals)
    if isinstance(cond, list):
        return any(_eq(v, c) for v in vals for c in cond)
    if isinstance(cond, int | float) and not isinstance(cond, bool):
        return any(_eq(v, cond) for v in vals)
    text = str(cond)
    if text == "*":
        return has
    if text == "!":
        return not has
    if text.startswith("re:"):
        rx = re.compile(text[3:], re.IGNORECASE)
        return any(rx.search(v) for v in vals)
    if text.startswith("contains:"):
        want = text[len("contains:"):].strip().upper()
        return any(v.upper() == want for v in vals)
    m = _OP_RE.match(text)
    if m:
        op, ref = _OPS[m.group(1)], float(m.group(2))
        nums = [n for n in (_num(v) for v in vals) if n is not None]
        return bool(nums) and all(op(n, ref) for n in nums)
    m = _RANGE_RE.match(text)
    if m:
        lo, hi = float(m.group(1)), float(m.group(2))
        nums = [n for n in (_num(v) for v in vals) if n is not None]
        return bool(nums) and all(lo <= n <= hi for n in nums)
    return any(_eq(v, text) for v in vals)



def matches(conditions: Mapping[str, Any], attrs: Mapping[str, Any]) -> bool:
    """Whether every condition holds for these attributes."""
    return all(check(cond, attrs.get(key)) for key, cond in conditions.items())
