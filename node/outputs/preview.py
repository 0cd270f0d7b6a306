"""A PNG preview: the key slice of each ROI (up to 6) with the segmentation outlined and labelled."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from node.imaging.volume import Volume, display_window
from node.inference.rois import ROI

__all__ = ["write_preview"]


def write_preview(volume: Volume, labels: np.ndarray, rois: list[ROI], path: Path, *, title: str = "",
                  max_panels: int = 6) -> Path:
    """Write the preview PNG and return its path. Without ROIs, shows the middle slice with "no ROI found"."""
    from matplotlib.figure import Figure

    shown = rois[:max_panels]
    slices = [r.key_slice for r in shown] or [volume.shape[0] // 2]
    n = len(slices)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    width, height = 4.2 * cols, 4.4 * rows + 0.4
    fig = Figure(figsize=(width, height))
    # a fixed layout in inches (0.1 in margins, 0.45 in under each panel's two-line title, 0.5 in for the
    # figure's title): tight_layout would draw the whole figure once more only to measure the titles
    grid = fig.subplots(rows, cols, squeeze=False,
                        gridspec_kw={"left": 0.1 / width, "right": 1 - 0.1 / width, "bottom": 0.1 / height,
                                     "top": 1 - (0.5 + 0.45) / height, "wspace": 0.05,
                                     "hspace": 0.45 / ((4.4 * rows - 0.1 - 0.45 * rows) / rows)})
    axes = [list(grid.ravel())]
    for extra in axes[0][n:]:
        extra.axis("off")
    window = display_window(volume.pixels, volume.modality)
    sx, sy, _ = volume.spacing
    panels: list[ROI | None] = list(shown) or [None]
    for ax, k, roi in zip(axes[0], slices, panels, strict=False):
        ax.imshow(volume.pixels[k], cmap="gray", vmin=window[0], vmax=window[1], aspect=sy / sx,
                  interpolation="nearest")
        mask = labels[k] > 0
        if mask.any():
            ax.contour(mask, levels=[0.5], colors=["#ff3030"], linewidths=1.2)
        if roi is not None:
            (x0, y0), (x1, y1) = roi.key_axis_ij
            ax.plot([x0, x1], [y0, y1], color="#ffd000", linewidth=1.0)
            ax.set_title(f"ROI {roi.index}: {roi.volume_mm3:.0f} mm³, {roi.diameter_inplane_mm:.1f} mm\n"
                         f"slice {k + 1}/{volume.shape[0]}", fontsize=9)
        else:
            ax.set_title(f"no region of interest found\nslice {k + 1}/{volume.shape[0]}", fontsize=9)
        ax.axis("off")
    fig.suptitle((title + "\n" if title else "") + "AI pre-annotation - NOT VERIFIED", fontsize=10, color="#b00000")
    path.parent.mkdir(parents=True, exist_ok=True)
    # written aside and renamed: the dashboard and the API may serve it while it is being drawn
    tmp = path.with_name(f".{path.name}.part")
    fig.savefig(tmp, dpi=80, format="png")
    os.replace(tmp, path)
    return path
