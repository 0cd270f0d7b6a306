"""Synthetic follow-up pairs: the same phantom patient scanned twice, the second time lying differently (another
frame of reference, a table shift and a few degrees of rotation), with lesions grown, shrunk, unchanged, gone and
new, and the truth of each (which lesion is which, its volume at each time point, where the prior's points lie in
the follow-up's patient coordinates).

The anatomy is the seed's (:func:`~node.devtools.synth.phantom.make_phantom`); each lesion keeps its own shape
stream, so that a lesion at the second time point is the first one scaled. Both time points are rendered without
noise in the body's coordinates, resampled into the patient's pose of the day (trilinear for the image, nearest for
the labels: the prior a fraction of a voxel off, the follow-up by the motion asked for), then given the scanner's
noise, so that neither image is smoother than the other; the truth's ``p_current = R @ p_prior + t`` composes the two
poses, and its volumes are the voxels each series really holds.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from node.devtools.synth.phantom import CaseGeometry, Phantom, PlacedLesion, make_phantom, placed_voxels
from node.devtools.synth.writer import _uid, write_series, write_tracked_truth_seg

__all__ = ["FollowUpPair", "LesionTruth", "make_followup_pair", "rotation_matrix", "write_followup_pair"]

#: what happens to each lesion between the two time points: (status, volume ratio); a new one is added after
PLAN = (("grown", 1.4), ("shrunk", 0.55), ("stable", 1.0), ("gone", 0.0))


def rotation_matrix(degrees: tuple[float, float, float]) -> np.ndarray:
    """Rotation about the patient's x, then y, then z axis (LPS), in degrees."""
    ax, ay, az = (math.radians(d) for d in degrees)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(slots=True)
class LesionTruth:
    """One lesion of the pair: its number at each time point (0: absent), its status and volumes (mm3)."""

    status: str  # grown, shrunk, stable, gone, new; "out of view": moved out of the follow-up's field of view
    prior_index: int
    current_index: int
    prior_center_mm: tuple[float, float, float] | None
    current_center_mm: tuple[float, float, float] | None
    prior_volume_mm3: float
    current_volume_mm3: float

    @property
    def volume_ratio(self) -> float | None:
        if not self.prior_volume_mm3 or not self.current_volume_mm3:
            return None
        return self.current_volume_mm3 / self.prior_volume_mm3


@dataclass(slots=True)
class FollowUpPair:
    prior: Phantom
    current: Phantom
    rotation: np.ndarray
    translation_mm: np.ndarray
    lesions: list[LesionTruth] = field(default_factory=list)
    days: int = 182

    def to_prior_frame(self, p: np.ndarray) -> np.ndarray:
        """A point in the follow-up's patient coordinates, in the prior's."""
        return self.rotation.T @ (np.asarray(p, dtype=np.float64) - self.translation_mm)

    def to_dict(self) -> dict[str, object]:
        return {"rotation": self.rotation.round(8).tolist(), "translation_mm": self.translation_mm.round(4).tolist(),
                "days": self.days, "lesions": [asdict(t) for t in self.lesions]}


def _grid_points(geom: CaseGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Index (i, j, k) -> patient (x, y, z) for the axial grid: ``p = origin + scale * (i, j, k)``."""
    scale = np.array([geom.spacing_xy, geom.spacing_xy, geom.spacing_z])
    return np.asarray(geom.origin, dtype=np.float64), scale


def _moved(phantom: Phantom, rotation: np.ndarray, translation: np.ndarray) -> Phantom:
    """The phantom as the scanner sees it after the patient moved (``p_current = R p_body + t``)."""
    geom = phantom.geometry
    origin, scale = _grid_points(geom)
    # current voxel (k, j, i) -> body voxel: body = R^T (origin + S idx - t), in index space [k, j, i]
    m_xyz = np.diag(1.0 / scale) @ rotation.T @ np.diag(scale)
    off_xyz = np.diag(1.0 / scale) @ (rotation.T @ (origin - translation) - origin)
    perm = [2, 1, 0]  # xyz <-> kji
    matrix = m_xyz[np.ix_(perm, perm)]
    offset = off_xyz[perm]
    hu = ndimage.affine_transform(phantom.hu, matrix, offset=offset, order=1, mode="constant", cval=-1000.0)
    labels = ndimage.affine_transform(phantom.labels, matrix, offset=offset, order=0, mode="constant", cval=0)
    return Phantom(geometry=geom, hu=hu.astype(np.float32), labels=labels.astype(np.uint8), lesions=phantom.lesions)


def _noisy(phantom: Phantom, rng: np.random.Generator, noise_hu: float = 18.0) -> Phantom:
    """The scanner's noise added to a noiseless phantom (as ``make_phantom`` adds it, outside air only)."""
    hu = phantom.hu + rng.normal(0.0, noise_hu, phantom.hu.shape).astype(np.float32) * (phantom.hu > -990.0)
    return Phantom(geometry=phantom.geometry, hu=np.clip(hu, -1024.0, 3071.0).astype(np.float32),
                   labels=phantom.labels, lesions=phantom.lesions)


def _volumes(phantom: Phantom) -> dict[int, tuple[float, tuple[float, float, float]]]:
    """Lesion number -> (volume mm3, centroid mm) from its labels."""
    geom = phantom.geometry
    origin, scale = _grid_points(geom)
    voxel = float(np.prod(scale))
    out: dict[int, tuple[float, tuple[float, float, float]]] = {}
    n = int(phantom.labels.max())
    if n == 0:
        return out
    counts = np.bincount(phantom.labels.ravel(), minlength=n + 1)
    present = [index for index in range(1, n + 1) if counts[index]]
    centres = ndimage.center_of_mass(phantom.labels > 0, phantom.labels, present) if present else []
    for index, (k, j, i) in zip(present, centres, strict=True):
        c = origin + scale * np.array([i, j, k])
        out[index] = (round(float(counts[index]) * voxel, 1), (float(c[0]), float(c[1]), float(c[2])))
    return out


def _scaled(spec: PlacedLesion, ratio: float, geom: CaseGeometry) -> PlacedLesion:
    """``spec`` with the diameter whose voxels on ``geom`` come closest to ``ratio`` times its own (a small lesion
    on 2.5 mm slices does not grow by the cube of its diameter)."""
    if ratio == 1.0:
        return spec
    target = placed_voxels(spec, geom) * ratio
    best = spec
    for f in np.linspace(0.8, 1.2, 41) * ratio ** (1.0 / 3.0):
        cand = PlacedLesion(spec.center, spec.diameter_mm * float(f), spec.shape_seed, spec.kind)
        if abs(placed_voxels(cand, geom) - target) < abs(placed_voxels(best, geom) - target):
            best = cand
    return best


def make_followup_pair(seed: int, geometry: CaseGeometry | None = None, *,
                       rotation_deg: tuple[float, float, float] = (2.0, 0.0, 4.0),
                       translation_mm: tuple[float, float, float] = (4.0, -3.0, -15.0),
                       diameters: tuple[float, ...] = (11.0, 15.0, 10.0, 10.0, 10.0)) -> FollowUpPair:
    """A prior and a follow-up of one phantom patient: lesion 1 grows 40 % in volume, 2 shrinks to 55 %, 3 is
    unchanged, 4 is gone, a fifth is new. ``diameters``: the prior's four and the new one (mm)."""
    geom = geometry or CaseGeometry()
    placer = make_phantom(seed, geom, diameters=diameters, noise_hu=0.0)
    if len(placer.lesions) < len(diameters):
        raise ValueError(f"seed {seed}: room for {len(placer.lesions)} of {len(diameters)} lesions in the lungs")
    kinds = ["solid"] * len(placer.lesions)  # what a follow-up measures: solid nodules
    first, later = [], []
    for n, (status, ratio) in enumerate(PLAN):
        les = placer.lesions[n]
        first.append(PlacedLesion(les.center, diameters[n], seed * 100 + n, kinds[n]))
        if ratio:
            later.append((status, n, _scaled(first[-1], ratio, geom)))
    new = placer.lesions[len(PLAN)]
    later.append(("new", -1, PlacedLesion(new.center, diameters[len(PLAN)], seed * 100 + len(PLAN), "solid")))
    # both time points go through the same steps (render without noise, the patient's pose resampled, then the
    # scanner's noise), so that neither is smoother than the other: the prior in a pose of its own a fraction of a
    # voxel and of a degree off the body's, the follow-up in the pose asked for
    rng = np.random.default_rng(seed + 99)
    pose = rotation_matrix((0.0, 0.0, 0.7)), np.array([0.37, -0.41, 0.29])
    prior = _noisy(_moved(make_phantom(seed, geom, placed=first, noise_hu=0.0), *pose), rng)
    body = make_phantom(seed, geom, placed=[p for _s, _n, p in later], noise_hu=0.0)
    moved_r = rotation_matrix(rotation_deg)
    moved_t = np.asarray(translation_mm, dtype=np.float64)
    current = _noisy(_moved(body, moved_r, moved_t), rng)
    # prior patient point -> body -> follow-up patient point
    rotation = moved_r @ pose[0].T
    t = moved_t - rotation @ pose[1]
    before, after = _volumes(prior), _volumes(current)
    pair = FollowUpPair(prior=prior, current=current, rotation=rotation, translation_mm=t)
    later_index = {n: m + 1 for m, (_s, n, _p) in enumerate(later)}
    for n, (status, _ratio) in enumerate(PLAN):
        p_vol, p_c = before.get(n + 1, (0.0, None))
        m = later_index.get(n, 0)
        c_vol, c_c = after.get(m, (0.0, None)) if m else (0.0, None)
        if m and not c_vol:  # the patient's motion took it out of the follow-up's field of view
            status, m = "out of view", 0
        pair.lesions.append(LesionTruth(status, n + 1, m, p_c, c_c, p_vol, c_vol))
    m = later_index[-1]
    c_vol, c_c = after.get(m, (0.0, None))
    pair.lesions.append(LesionTruth("new", 0, m, None, c_c, 0.0, c_vol))
    return pair


def write_followup_pair(pair: FollowUpPair, out: Path, *, seed: int, patient_id: str | None = None,
                        when: _dt.datetime | None = None, truth_segs: bool = True) -> dict[str, object]:
    """Write ``prior/`` and ``current/`` (one CT series each: one patient, two studies, two frames of reference,
    ``pair.days`` apart), ``truth.json`` and, with ``truth_segs``, ``prior_truth_seg.dcm`` and
    ``current_truth_seg.dcm`` (one segment per lesion; a lesion's tracking UID is the same in both: the
    longitudinal reference ``preannot evaluate-followup`` reads). Returns the truth."""
    pid = patient_id or f"SYNFU{seed:06d}"
    first = when or _dt.datetime(2026, 6, 1, 9, 0, 0)
    prior = write_series(pair.prior, out / "prior", seed=seed, patient_name="SYNTHETIC^FOLLOWUP", patient_id=pid,
                         when=first)
    current = write_series(pair.current, out / "current", seed=seed + 7_000_000, patient_name="SYNTHETIC^FOLLOWUP",
                           patient_id=pid, when=first + _dt.timedelta(days=pair.days))
    if truth_segs:
        uids = {n: (_uid(seed, "lesion", n), f"Lesion {n + 1} ({les.status}, truth)")
                for n, les in enumerate(pair.lesions)}
        write_tracked_truth_seg(pair.prior.labels, {les.prior_index: uids[n] for n, les in enumerate(pair.lesions)
                                                    if les.prior_index}, prior, out / "prior_truth_seg.dcm", seed=seed)
        write_tracked_truth_seg(pair.current.labels, {les.current_index: uids[n] for n, les in enumerate(pair.lesions)
                                                      if les.current_index}, current, out / "current_truth_seg.dcm",
                                seed=seed + 7_000_000)
    truth = {"seed": seed, "patient_id": pid, "prior_files": len(prior), "current_files": len(current),
             **pair.to_dict()}
    (out / "truth.json").write_text(json.dumps(truth, indent=2))
    return truth
