"""A synthetic chest CT phantom with lesions of known position, size and density.

The phantom is built in physical millimetres and sampled on the requested grid, so the same case
can be rendered at any resolution. Arrays are indexed ``[k, j, i]`` = ``[slice, row, column]``;
slice ``k`` lies at patient z = ``z0 + k * spacing_z`` (LPS, z towards the head), row ``j`` at
patient y = ``y0 + j * spacing_xy`` (towards the back) and column ``i`` at x = ``x0 + i * spacing_xy``
(towards the patient's left), the geometry of an axial CT with ImageOrientationPatient 1\\0\\0\\0\\1\\0.

Tissues and approximate HU: air -1000, lung parenchyma -860, fat -100, soft tissue/muscle 45,
blood 45, cortical bone 1000, cancellous bone 300, solid lesion 15..60, ground-glass -650..-400.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

__all__ = ["CaseGeometry", "Lesion", "Phantom", "PlacedLesion", "make_phantom", "placed_voxels"]


@dataclass(frozen=True, slots=True)
class CaseGeometry:
    """Grid of a synthetic case: ``size`` x ``size`` pixels, ``slices`` slices."""

    size: int = 256
    slices: int = 96
    spacing_xy: float = 1.40625  # 360 mm field of view over 256 pixels
    spacing_z: float = 2.5

    @property
    def origin(self) -> tuple[float, float, float]:
        """Patient position (x, y, z) in mm of voxel (i=0, j=0, k=0)."""
        half = (self.size - 1) * self.spacing_xy / 2.0
        return (-half, -half, -(self.slices - 1) * self.spacing_z / 2.0)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.slices, self.size, self.size)


@dataclass(slots=True)
class Lesion:
    """One ground-truth lesion. ``center`` is in patient mm (LPS)."""

    index: int
    center: tuple[float, float, float]
    diameter_mm: float
    kind: str  # "solid" or "part-solid"
    attached_to: str  # "none", "pleura" or "vessel"
    voxels: int = 0
    volume_mm3: float = 0.0


@dataclass(frozen=True, slots=True)
class PlacedLesion:
    """A lesion painted where it is told to be (a follow-up's lesions keep their place and shape, change size).
    ``shape_seed`` draws its shape and density: the same seed at two time points gives the same lesion, scaled."""

    center: tuple[float, float, float]
    diameter_mm: float
    shape_seed: int
    kind: str = "solid"


@dataclass(slots=True)
class Phantom:
    """A rendered case: HU volume, lesion label volume (0 = background, n = lesion n) and lesions."""

    geometry: CaseGeometry
    hu: np.ndarray
    labels: np.ndarray
    lesions: list[Lesion] = field(default_factory=list)

    @property
    def mask(self) -> np.ndarray:
        """Binary lesion mask (any lesion)."""
        return self.labels > 0


def _axes(geom: CaseGeometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x0, y0, z0 = geom.origin
    x = x0 + np.arange(geom.size, dtype=np.float32) * geom.spacing_xy
    y = y0 + np.arange(geom.size, dtype=np.float32) * geom.spacing_xy
    z = z0 + np.arange(geom.slices, dtype=np.float32) * geom.spacing_z
    return x, y, z


def _segment_distance(
    px: np.ndarray, py: np.ndarray, pz: np.ndarray, a: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Distance from points to segment a-b, and the position t in [0, 1] along it."""
    ab = b - a
    denom = float(ab @ ab) or 1e-6
    t = ((px - a[0]) * ab[0] + (py - a[1]) * ab[1] + (pz - a[2]) * ab[2]) / denom
    t = np.clip(t, 0.0, 1.0)
    dx = px - (a[0] + t * ab[0])
    dy = py - (a[1] + t * ab[1])
    dz = pz - (a[2] + t * ab[2])
    return np.sqrt(dx * dx + dy * dy + dz * dz), t


class _Renderer:
    """Paints shapes into the volume, each within its bounding box only (fast)."""

    def __init__(self, geom: CaseGeometry) -> None:
        self.geom = geom
        self.x, self.y, self.z = _axes(geom)

    def box(
        self, lo: np.ndarray, hi: np.ndarray
    ) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray, np.ndarray] | None:
        """Index slices and broadcast coordinate grids for the physical box [lo, hi]."""
        g = self.geom
        x0, y0, z0 = g.origin
        i0 = max(math.floor((lo[0] - x0) / g.spacing_xy), 0)
        i1 = min(math.ceil((hi[0] - x0) / g.spacing_xy) + 1, g.size)
        j0 = max(math.floor((lo[1] - y0) / g.spacing_xy), 0)
        j1 = min(math.ceil((hi[1] - y0) / g.spacing_xy) + 1, g.size)
        k0 = max(math.floor((lo[2] - z0) / g.spacing_z), 0)
        k1 = min(math.ceil((hi[2] - z0) / g.spacing_z) + 1, g.slices)
        if i0 >= i1 or j0 >= j1 or k0 >= k1:
            return None
        sl = (slice(k0, k1), slice(j0, j1), slice(i0, i1))
        return (
            sl,
            self.x[i0:i1][None, None, :],
            self.y[j0:j1][None, :, None],
            self.z[k0:k1][:, None, None],
        )

    def tube(self, vol: np.ndarray, a: np.ndarray, b: np.ndarray, r0: float, r1: float, value: float,
             where: np.ndarray | None = None) -> None:
        """A tapered cylinder from a (radius r0) to b (radius r1), painted with ``value``."""
        r = max(r0, r1)
        found = self.box(np.minimum(a, b) - r, np.maximum(a, b) + r)
        if found is None:
            return
        sl, px, py, pz = found
        d, t = _segment_distance(px, py, pz, a, b)
        inside = d <= (r0 + (r1 - r0) * t)
        if where is not None:
            inside &= where[sl]
        vol[sl][inside] = value


def _vessel_tree(rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, radius: float,
                 depth: int) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
    """Recursive branching segments (a, b, r_a, r_b)."""
    segments: list[tuple[np.ndarray, np.ndarray, float, float]] = []
    length = 18.0 + 22.0 * rng.random() * (radius / 4.0 + 0.5)
    end = start + direction * length
    r_end = max(radius * 0.75, 0.6)
    segments.append((start, end, radius, r_end))
    if depth > 0 and r_end > 0.7:
        for _ in range(2):
            jitter = rng.normal(0.0, 0.55, 3)
            new_dir = direction + jitter
            new_dir /= np.linalg.norm(new_dir) or 1.0
            segments.extend(_vessel_tree(rng, end, new_dir, r_end * 0.8, depth - 1))
    return segments


def _lesion_shape(rng: np.random.Generator, px: np.ndarray, py: np.ndarray, pz: np.ndarray,
                  center: np.ndarray, radius: float) -> np.ndarray:
    """Normalised radial coordinate (<1 inside) of a lobulated ellipsoid."""
    axes = radius * rng.uniform(0.75, 1.25, 3)
    rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    dx, dy, dz = px - center[0], py - center[1], pz - center[2]
    u = (rot[0, 0] * dx + rot[0, 1] * dy + rot[0, 2] * dz) / axes[0]
    v = (rot[1, 0] * dx + rot[1, 1] * dy + rot[1, 2] * dz) / axes[1]
    w = (rot[2, 0] * dx + rot[2, 1] * dy + rot[2, 2] * dz) / axes[2]
    rr = np.sqrt(u * u + v * v + w * w) + 1e-6
    # lobulation: low-order angular harmonics
    lob = rng.uniform(0.0, 0.18)
    f1, f2 = rng.integers(2, 5, 2)
    ph = rng.uniform(0, 2 * math.pi, 2)
    theta = np.arctan2(v, u)
    phi = np.arccos(np.clip(w / rr, -1, 1))
    mod = 1.0 + lob * np.sin(f1 * theta + ph[0]) * np.sin(f2 * phi + ph[1])
    return rr / mod


def placed_voxels(spec: PlacedLesion, geometry: CaseGeometry) -> int:
    """How many voxels of ``geometry`` the lesion covers where nothing overlaps it (to size a follow-up's lesion)."""
    rng = np.random.default_rng(spec.shape_seed)
    center = np.asarray(spec.center, dtype=np.float64)
    radius = spec.diameter_mm / 2.0
    found = _Renderer(geometry).box(center - radius * 1.6, center + radius * 1.6)
    if found is None:
        return 0
    _sl, px, py, pz = found
    return int(np.count_nonzero(_lesion_shape(rng, px, py, pz, center, radius) <= 1.0))


def _paint_placed(ren: _Renderer, hu: np.ndarray, labels: np.ndarray, lesions: list[Lesion], tex: np.ndarray,
                  spec: PlacedLesion, geom: CaseGeometry) -> None:
    """Paint one :class:`PlacedLesion` (its own random stream: its shape does not depend on the others)."""
    rng = np.random.default_rng(spec.shape_seed)
    center = np.asarray(spec.center, dtype=np.float64)
    radius = spec.diameter_mm / 2.0
    found = ren.box(center - radius * 1.6, center + radius * 1.6)
    if found is None:
        return
    sl, px, py, pz = found
    rr = _lesion_shape(rng, px, py, pz, center, radius)
    inside = rr <= 1.0
    region = hu[sl]
    if spec.kind == "solid":
        region[inside] = rng.uniform(15.0, 60.0) + 10.0 * tex[sl][inside]
    else:
        region[inside] = rng.uniform(-650.0, -400.0) + 40.0 * tex[sl][inside]
        region[(rr <= rng.uniform(0.35, 0.6)) & inside] = rng.uniform(10.0, 50.0)
    index = len(lesions) + 1
    labels[sl][inside] = index
    voxels = int(np.count_nonzero(labels[sl] == index))
    if voxels:
        lesions.append(Lesion(index=index, center=tuple(float(c) for c in center),  # type: ignore[arg-type]
                              diameter_mm=round(spec.diameter_mm, 2), kind=spec.kind, attached_to="none",
                              voxels=voxels, volume_mm3=round(voxels * geom.spacing_xy ** 2 * geom.spacing_z, 1)))


def make_phantom(seed: int, geometry: CaseGeometry | None = None, *, n_lesions: int | None = None,
                 noise_hu: float = 18.0, diameters: Sequence[float] | None = None,
                 placed: Sequence[PlacedLesion] | None = None) -> Phantom:
    """Render one synthetic chest CT case.

    Args:
        seed: random seed; the same seed and geometry give the same case, bit for bit.
        geometry: the grid; defaults to 256 x 256 x 96 at 1.41 x 1.41 x 2.5 mm.
        n_lesions: number of lesions to place; random 0-4 when None (about 15% of cases have none).
        noise_hu: standard deviation of the image noise in HU.
        diameters: the lesions' diameters (mm), placed at random well inside the lungs and clear of the vessels
            (``n_lesions`` ignored).
        placed: lesions painted where they are given (nothing placed at random); the anatomy is the seed's.

    Returns:
        The phantom: HU volume (float32, ``[k, j, i]``), lesion labels (uint8) and lesion list.
    """
    geom = geometry or CaseGeometry()
    rng = np.random.default_rng(seed)
    ren = _Renderer(geom)
    x, y, z = ren.x, ren.y, ren.z
    X = x[None, None, :]
    Y = y[None, :, None]
    Z = z[:, None, None]
    zn = (Z - z.min()) / max(float(z.max() - z.min()), 1.0)  # 0 at the feet end, 1 at the head end

    def full(m: np.ndarray) -> np.ndarray:
        return np.broadcast_to(m, geom.shape)

    hu = np.full(geom.shape, -1000.0, dtype=np.float32)
    # body: an ellipse, slightly narrower towards the neck
    ax = 160.0 * rng.uniform(0.9, 1.05) * (1.0 - 0.12 * zn)
    ay = 112.0 * rng.uniform(0.9, 1.05) * (1.0 - 0.05 * zn)
    body_r = np.sqrt((X / ax) ** 2 + ((Y - 5.0) / ay) ** 2)
    body = full(body_r <= 1.0)
    hu[body] = -100.0  # subcutaneous fat
    muscle = full(body_r <= 1.0 - 14.0 / ax)
    hu[muscle] = 45.0

    # lungs: two half-ellipsoids with a diaphragm dome at the bottom
    lungs = np.zeros(geom.shape, dtype=bool)
    for side in (-1.0, 1.0):
        cx = side * 72.0 * rng.uniform(0.95, 1.05)
        lx = 52.0 * rng.uniform(0.9, 1.1) * (1.0 - 0.35 * zn ** 2)
        ly = 78.0 * rng.uniform(0.9, 1.1) * (1.0 - 0.3 * zn ** 2)
        r = np.sqrt(((X - cx) / lx) ** 2 + ((Y - 8.0) / ly) ** 2)
        dome = z.min() + 25.0 + 20.0 * np.sqrt(np.clip(1.0 - ((X - cx) / 60.0) ** 2 - (Y / 90.0) ** 2, 0, 1))
        top = z.max() - 8.0
        lungs |= (r <= 1.0) & (dome <= Z) & (top >= Z)
    lungs &= muscle
    tex = ndimage.gaussian_filter(rng.normal(0.0, 1.0, geom.shape).astype(np.float32), 2.0)
    hu[lungs] = -860.0 + 120.0 * tex[lungs]

    # mediastinum and heart (soft tissue) between the lungs, aorta and spine
    heart_r = np.sqrt(((X + 15.0) / 55.0) ** 2 + ((Y + 20.0) / 50.0) ** 2 + ((Z - z.min() - 60.0) / 55.0) ** 2)
    hu[full(heart_r <= 1.0) & muscle] = 50.0
    bone = np.zeros(geom.shape, dtype=bool)
    spine_c = (0.0, 78.0)
    spine_r = np.sqrt((X - spine_c[0]) ** 2 + (Y - spine_c[1]) ** 2)
    hu[full(spine_r <= 17.0)] = 1000.0
    hu[full(spine_r <= 14.0)] = 300.0
    bone |= full(spine_r <= 17.0)
    # ribs: rings near the body wall, every ~25 mm along z, 9 mm thick
    rib_phase = rng.uniform(0, 25.0)
    rib_z = (np.mod(Z - z.min() + rib_phase, 25.0) < 9.0)
    ring = (body_r > 1.0 - 24.0 / ax) & (body_r < 1.0 - 16.0 / ax) & (Y > -60.0)
    rib = full(ring & rib_z)
    hu[rib] = 750.0
    bone |= rib
    # sternum
    st = full((np.abs(X) < 12.0) & (-ay * 0.82 > Y) & (-ay * 0.95 < Y)) & body
    hu[st] = 600.0
    bone |= st
    aorta_r = np.sqrt((X - 25.0) ** 2 + (Y - 45.0) ** 2)
    hu[full(aorta_r <= 13.0)] = 45.0

    # airways: trachea in the upper part, main bronchi into each lung (air with a soft-tissue wall)
    carina = np.array([0.0, 10.0, z.min() + 0.62 * (z.max() - z.min())])
    top = np.array([0.0, 5.0, z.max() + 5.0])
    ren.tube(hu, top, carina, 10.0, 10.0, 45.0)
    ren.tube(hu, top, carina, 8.0, 8.0, -1000.0)
    for side in (-1.0, 1.0):
        end = carina + np.array([side * 45.0, 5.0, -30.0])
        ren.tube(hu, carina, end, 7.0, 4.5, 45.0)
        ren.tube(hu, carina, end, 5.5, 3.0, -1000.0)

    # pulmonary vessels: branching trees from each hilum, clipped to the lungs
    vessels = np.zeros(geom.shape, dtype=np.float32)
    for side in (-1.0, 1.0):
        hilum = np.array([side * 48.0, 8.0, carina[2] - 20.0])
        for _ in range(12):
            d = np.array([side * rng.uniform(0.3, 1.0), rng.uniform(-0.8, 0.8), rng.uniform(-0.8, 0.8)])
            d /= np.linalg.norm(d)
            for a, b, ra, rb in _vessel_tree(rng, hilum, d, rng.uniform(3.0, 4.5), depth=5):
                ren.tube(vessels, a, b, ra, rb, 1.0, where=lungs)
    vmask = vessels > 0
    hu[vmask] = 40.0 + rng.normal(0, 5.0)

    # lesions
    labels = np.zeros(geom.shape, dtype=np.uint8)
    lesions: list[Lesion] = []
    count = int(rng.choice([0, 1, 1, 2, 2, 3, 4], p=[0.15, 0.2, 0.15, 0.15, 0.15, 0.1, 0.1])) \
        if n_lesions is None else n_lesions
    clear = None
    if diameters is not None:  # chosen sizes: isolated nodules, clear of the vessels (what a follow-up measures)
        count = len(diameters)
        clear = ndimage.distance_transform_edt(~vmask, sampling=(geom.spacing_z, geom.spacing_xy, geom.spacing_xy))
    if placed is not None:
        count = 0
        for spec in placed:
            _paint_placed(ren, hu, labels, lesions, tex, spec, geom)
    lung_dist = ndimage.distance_transform_edt(lungs, sampling=(geom.spacing_z, geom.spacing_xy, geom.spacing_xy))
    vessel_near = ndimage.binary_dilation(vmask, iterations=2) & lungs
    attempts = 0
    while len(lesions) < count and attempts < 200:
        attempts += 1
        diameter = float(np.exp(rng.uniform(math.log(3.0), math.log(30.0))))
        radius = diameter / 2.0
        mode = rng.choice(["none", "pleura", "vessel"], p=[0.5, 0.25, 0.25])
        if diameters is not None:
            diameter = float(diameters[len(lesions)])
            radius, mode = diameter / 2.0, "none"
        if mode == "pleura":
            cand = np.argwhere((lung_dist > radius * 0.3) & (lung_dist < radius * 0.8 + 1.0))
        elif mode == "vessel":
            cand = np.argwhere(vessel_near & (lung_dist > radius + 2.0))
        elif clear is not None:
            cand = np.argwhere((lung_dist > radius + 4.0) & (clear > radius * 1.3 + 3.0))
        else:
            cand = np.argwhere(lung_dist > radius + 4.0)
        if len(cand) == 0:
            continue
        k, j, i = cand[rng.integers(len(cand))]
        center = np.array([x[i], y[j], z[k]], dtype=np.float64)
        if any(np.linalg.norm(center - np.array(les.center)) < (radius + les.diameter_mm / 2 + 6.0)
               for les in lesions):
            continue
        found = ren.box(center - radius * 1.6, center + radius * 1.6)
        if found is None:
            continue
        sl, px, py, pz = found
        rr = _lesion_shape(rng, px, py, pz, center, radius)
        kind = "part-solid" if (diameter > 8.0 and rng.random() < 0.35) else "solid"
        inside = rr <= 1.0
        if mode == "pleura":
            inside &= muscle[sl]  # stays inside the thorax, abuts the chest wall
        index = len(lesions) + 1
        region = hu[sl]
        if kind == "solid":
            region[inside] = rng.uniform(15.0, 60.0) + 10.0 * tex[sl][inside]
        else:
            region[inside] = rng.uniform(-650.0, -400.0) + 40.0 * tex[sl][inside]
            core = rr <= rng.uniform(0.35, 0.6)
            region[core & inside] = rng.uniform(10.0, 50.0)
        lab = labels[sl]
        lab[inside] = index
        voxels = int((labels == index).sum())
        if voxels == 0:
            continue
        lesions.append(Lesion(
            index=index, center=(float(center[0]), float(center[1]), float(center[2])),
            diameter_mm=round(diameter, 2), kind=kind, attached_to=str(mode), voxels=voxels,
            volume_mm3=round(voxels * geom.spacing_xy ** 2 * geom.spacing_z, 1)))

    # reconstruction blur and noise; the scanner's field of view is a circle
    hu = ndimage.gaussian_filter(hu, sigma=(0.4, 0.7, 0.7))
    hu += rng.normal(0.0, noise_hu, geom.shape).astype(np.float32) * (hu > -990.0)
    hu = np.clip(hu, -1024.0, 3071.0).astype(np.float32)
    return Phantom(geometry=geom, hu=hu, labels=labels, lesions=lesions)
