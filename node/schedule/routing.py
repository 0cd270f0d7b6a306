"""Route matching: which models run on a series, decided from its DICOM attributes and AE titles.

A route's ``match`` table maps a DICOM keyword to a condition; all conditions must hold:

===================  =====================================================================
condition            holds when
===================  =====================================================================
``"CT"``             the value equals (case-insensitive; numbers compare numerically)
``["CHEST", "LUNG"]``  the value (or one of its values) is in the list
``"<=2.5"``          numeric comparison; also ``<``, ``>``, ``>=``, ``==``, ``!=``
``"1..2.5"``         numeric range, both ends included
``"re:^AX"``         the regular expression is found in the value (case-insensitive)
``"contains:AXIAL"``  one of the values of a multi-valued attribute equals it
``"*"``              the attribute is present, whatever its value
``"!"``              the attribute is absent or empty
===================  =====================================================================

``called_ae`` / ``calling_ae`` restrict a route to AE titles (empty: any). A series matching no route
is kept for ``unmatched_retention_days`` and logged, not processed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from node.conditions import matches
from node.config import Priority, Route, RouteFlag
from node.errors import ConfigError
from node.store.results import JobResult

__all__ = ["RaisedFlags", "match_route", "matching_routes", "raised_flags", "validate_route"]

def validate_route(route: Route) -> None:
    """Check a route's conditions can be evaluated (regexes compile).

    Raises:
        ConfigError: naming the route, the key and the bad condition.
    """
    for key, cond in route.match.items():
        for c in cond if isinstance(cond, list) else [cond]:
            if isinstance(c, str) and c.startswith("re:"):
                try:
                    re.compile(c[3:])
                except re.error as exc:
                    raise ConfigError(f"routes[{route.name}].match.{key}: bad regular expression {c!r}: {exc}") \
                        from exc
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", key):
            raise ConfigError(f"routes[{route.name}].match: {key!r} is not a DICOM keyword")


def match_route(route: Route, attrs: Mapping[str, Any], *, called_ae: str = "", calling_ae: str = "") -> bool:
    """Whether a series with these attributes and AE titles matches the route."""
    if route.called_ae and called_ae.strip().upper() not in {a.upper() for a in route.called_ae}:
        return False
    if route.calling_ae and calling_ae.strip().upper() not in {a.upper() for a in route.calling_ae}:
        return False
    return matches(route.match, attrs)


def matching_routes(routes: Sequence[Route], attrs: Mapping[str, Any], *, called_ae: str = "",
                    calling_ae: str = "") -> list[Route]:
    """All routes the series matches, in configuration order."""
    return [r for r in routes if match_route(r, attrs, called_ae=called_ae, calling_ae=calling_ae)]


class RaisedFlags:
    """The flags a route raised on a result: what they say, the highest priority they ask, and whether
    one asks for a notification."""

    def __init__(self, raised: list[tuple[str, RouteFlag]]) -> None:
        self.raised = raised

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(what for what, _ in self.raised))

    @property
    def notify(self) -> bool:
        return any(f.notify for _, f in self.raised)

    def priority(self, base: Priority) -> Priority:
        """``base`` raised to the most urgent priority a flag asks (never lowered)."""
        asked = [f.priority for _, f in self.raised if f.priority is not None]
        return min([base, *asked], key=lambda p: p.rank)


def raised_flags(route: Route | None, result: JobResult) -> RaisedFlags:
    """The flags of ``route`` that ``result`` raises (``[[routes.flags]]``): a classifier's class, a follow-up's new
    finding or growth."""
    raised: list[tuple[str, RouteFlag]] = []
    for flag in route.flags if route is not None else []:
        wanted = {c.strip().lower() for c in flag.classes}
        for c in result.classes:  # the class name as the card names it, or its code's meaning
            if c.value.strip().lower() in wanted or (c.meaning and c.meaning.strip().lower() in wanted):
                raised.append((f"class {c.value}", flag))
        fu = result.followup or {}
        if fu.get("not_matched") is None:  # a follow-up's change (only where the findings were matched)
            changes = fu.get("changes") or []
            new = [c for c in changes if c.get("status") == "new" and c.get("kind") != "anatomy"]
            if flag.new_finding and new:
                raised.append((f"followup: {len(new)} new finding(s)", flag))
            if flag.growth_pct is not None:
                grown = [c for c in changes if c.get("kind") != "anatomy" and c.get("volume_change_pct") is not None
                         and c["volume_change_pct"] >= flag.growth_pct]
                if grown:
                    raised.append((f"followup: {len(grown)} finding(s) grown >= {flag.growth_pct:g} %", flag))
    return RaisedFlags(raised)
