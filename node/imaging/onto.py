"""One series resampled onto another's grid: the inputs of a study-level model stacked as the channels of one
image (brain tumour models take T1, T1c, T2 and FLAIR voxel for voxel).

Both series must share a frame of reference (``FrameOfReferenceUID``): their patient coordinates are then the
same space, and each voxel of the reference grid is looked up in the other series by its patient position.
Series in different frames of reference are related only by a Spatial Registration object, which the node
does not apply: :func:`same_frame` says why such inputs are refused.

Interpolation is trilinear (a model's channels are intensities; the cubic B-spline of ``regrid.py`` would
cost a float32 copy of every input for texture the model cannot use across sequences of different
resolution). Voxels of the reference grid outside the other series' field of view are 0, as the zero
background of skull-stripped training data, which intensity normalisations with ``nonzero`` leave out.

Memory: the output (float32, the reference grid's size) is filled slice by slice; the other series is read
in place (a mapped scratch volume stays mapped). Peak: the output plus one slice's coordinates.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from node.errors import VolumeError
from node.imaging.regrid import regularize
from node.imaging.volume import Volume

__all__ = ["frame_of_reference", "resample_onto", "same_frame"]


def frame_of_reference(volume: Volume) -> str:
    """The series' Frame of Reference UID ("" when it has none)."""
    return str(volume.sources[0].get("FrameOfReferenceUID", "") or "")


def same_frame(volume: Volume, reference: Volume, *, name: str, reference_name: str) -> str | None:
    """Why ``volume`` cannot be placed on ``reference``'s grid (None when it can): both need the same Frame of
    Reference UID."""
    mine, theirs = frame_of_reference(volume), frame_of_reference(reference)
    if not mine or not theirs:
        return (f"input {name} (series {volume.series_uid}) and the reference input {reference_name} must both have "
                "a FrameOfReferenceUID to be placed on one grid; "
                + ("the input has none" if not mine else "the reference has none"))
    if mine != theirs:
        return (f"input {name} (series {volume.series_uid}) is in frame of reference {mine}, the reference input "
                f"{reference_name} in {theirs}: their coordinates are not the same space, and the node does not "
                "apply Spatial Registration objects (register the series on the scanner or the PACS, or use a "
                "bundle that registers its inputs itself)")
    return None


def resample_onto(volume: Volume, reference: Volume, *, out: np.ndarray | None = None) -> np.ndarray:
    """``volume``'s values on ``reference``'s grid ``[k, j, i]`` (trilinear, 0 outside its field of view), float32,
    written into ``out`` when given (a view of the reference grid's shape: a channel of a stacked image). A tilted
    or unevenly spaced ``volume`` is first made regular.

    Raises:
        VolumeError: the two grids do not overlap at all (a wrong series, or a wrong frame of reference).
    """
    grid = regularize(volume) if volume.irregular else None
    source = grid.volume if grid is not None else volume
    to_source = np.linalg.inv(source.affine)  # patient -> source (i, j, k)
    k_n, rows, cols = reference.shape
    if out is None:
        out = np.zeros((k_n, rows, cols), dtype=np.float32)
    elif out.shape != (k_n, rows, cols):
        raise VolumeError(f"resampling onto a grid of shape {reference.shape} into an array of shape {out.shape}")
    else:
        out[...] = 0.0
    jj, ii = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64), indexing="ij")
    plane = np.stack([ii.ravel(), jj.ravel(), np.zeros(ii.size)], axis=1)
    # reference voxel -> patient -> source voxel, as one affine map
    m = to_source @ reference.affine
    rot, shift = m[:3, :3], m[:3, 3]
    inside = 0
    pixels = source.pixels
    sk, sj, si = pixels.shape
    for k in range(k_n):
        plane[:, 2] = k
        s = plane @ rot.T + shift  # (i, j, k) in the source
        coords = np.stack([s[:, 2], s[:, 1], s[:, 0]])
        within = ((coords[0] > -0.5) & (coords[0] < sk - 0.5) & (coords[1] > -0.5) & (coords[1] < sj - 0.5)
                  & (coords[2] > -0.5) & (coords[2] < si - 0.5))
        if not within.any():
            continue
        inside += int(within.sum())
        values = ndimage.map_coordinates(pixels, coords, order=1, mode="nearest", output=np.float32)
        values[~within] = 0.0
        out[k] = values.reshape(rows, cols)
    if inside == 0:
        raise VolumeError(f"series {volume.series_uid} does not overlap the grid of series {reference.series_uid} "
                          "at all (same frame of reference, but another part of the body?)")
    return out
