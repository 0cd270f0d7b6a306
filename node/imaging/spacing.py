"""Slice spacing of a stack: regular, designed uneven spacing, or missing slices.

Scanners produce stacks whose spacing changes on purpose (a head CT at 4 mm through the skull base then
7 mm above it), and transfers lose slices. The two look alike in a list of positions; they differ in
their shape:

- a **missing slice** leaves one step that is a whole multiple (2x, 3x, ...) of the steps beside it,
  with the same slice thickness on both sides;
- **designed uneven spacing** changes the step for a run of slices (often with the slice thickness),
  or by a factor that is not a whole number.

The same classification serves the assembler (before any job: hold an incomplete series) and the volume
reader (the message a refused series gets).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Gap", "SpacingReport", "classify_spacing"]


@dataclass(frozen=True, slots=True)
class Gap:
    """A step that looks like missing slices: between positions ``start`` and ``end`` (mm along the normal)."""

    index: int
    start: float
    end: float
    step: float
    usual: float
    missing: int


@dataclass(frozen=True, slots=True)
class SpacingReport:
    """What the steps of a sorted stack say."""

    steps: np.ndarray
    gaps: list[Gap] = field(default_factory=list)
    uneven: bool = False

    @property
    def regular(self) -> bool:
        return not self.gaps and not self.uneven

    def describe_gap(self) -> str:
        g = self.gaps[0]
        return (f"a gap of {g.step:.2f} mm between slices at {g.start:.2f} and {g.end:.2f} mm where the spacing "
                f"is {g.usual:.2f} mm: {g.missing} slice(s) missing")

    def describe_uneven(self) -> str:
        return f"uneven slice spacing from {self.steps.min():.2f} to {self.steps.max():.2f} mm"


def classify_spacing(positions: Sequence[float] | np.ndarray, thicknesses: Sequence[float | None] | None = None, *,
                     rel_tol: float = 0.1, abs_tol: float = 0.05) -> SpacingReport:
    """Classify the steps of positions sorted along the slice normal (mm).

    Args:
        positions: increasing positions along the normal.
        thicknesses: SliceThickness per slice when known (a change of thickness marks designed spacing).
        rel_tol / abs_tol: how close two steps must be to count as the same spacing.
    """
    pos = np.asarray(positions, dtype=np.float64)
    steps = np.diff(pos)
    if steps.size == 0:
        return SpacingReport(steps=steps)

    def same(a: float, b: float) -> bool:
        return abs(a - b) <= max(rel_tol * min(a, b), abs_tol)

    thick = list(thicknesses) if thicknesses is not None else [None] * len(pos)
    gaps: list[Gap] = []
    for i, step in enumerate(steps):
        neighbours = [float(steps[n]) for n in (i - 1, i + 1) if 0 <= n < steps.size]
        if not neighbours:
            continue
        usual = min(neighbours)
        if usual <= 0 or not all(same(nb, usual) for nb in neighbours):
            continue  # the spacing changes around this step: not an isolated hole
        ratio = step / usual
        whole = round(ratio)
        if whole < 2 or abs(ratio - whole) > rel_tol * whole:
            continue
        t0, t1 = thick[i], thick[i + 1]
        if t0 is not None and t1 is not None and not same(float(t0), float(t1)):
            continue  # the thickness changes here too: a designed change of protocol
        gaps.append(Gap(index=i, start=float(pos[i]), end=float(pos[i + 1]), step=float(step), usual=usual,
                        missing=whole - 1))
    uneven = bool(float(steps.max() - steps.min()) > max(rel_tol * float(steps.min()), abs_tol)) and not gaps
    if gaps:  # the rest may still be uneven: judge it without the gaps
        rest = np.delete(steps, [g.index for g in gaps])
        uneven = bool(rest.size and float(rest.max() - rest.min()) > max(rel_tol * float(rest.min()), abs_tol))
    return SpacingReport(steps=steps, gaps=gaps, uneven=uneven)
