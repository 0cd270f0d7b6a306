"""Outlines of 2D masks as polygons (marching squares through contourpy, matplotlib's contour engine)."""

from __future__ import annotations

import numpy as np
from contourpy import contour_generator

__all__ = ["MAX_OUTLINE_POINTS", "mask_outline"]

#: an SR's graphic data is one FL value of at most 64 KiB (16,384 floats): longer outlines are thinned to
#: this many points, evenly along the polygon (only a ragged outline of a huge region gets there)
MAX_OUTLINE_POINTS = 4000


def mask_outline(mask2d: np.ndarray) -> list[tuple[float, float]]:
    """The longest closed outline of a 2D mask, as (column, row) pixel-index coordinates.

    The polygon runs half-way between inside and outside pixel centres; the first point is repeated
    at the end. A single pixel gives a small diamond around its centre. At most ``MAX_OUTLINE_POINTS``.
    """
    padded = np.pad(mask2d.astype(np.float64), 1)
    lines = contour_generator(z=padded, line_type="Separate").lines(0.5)
    if not lines:
        return []
    arrays = [np.asarray(line, dtype=np.float64) for line in lines]
    best = max(arrays, key=len) - 1.0  # undo the padding
    if len(best) > MAX_OUTLINE_POINTS:
        best = best[np.linspace(0, len(best) - 1, MAX_OUTLINE_POINTS - 1).astype(int)]
    pts = [(float(x), float(y)) for x, y in best]
    if pts and pts[0] != pts[-1]:
        pts.append(pts[0])
    return pts
