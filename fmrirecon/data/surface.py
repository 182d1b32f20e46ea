"""Voxels -> 2-D cortical activation maps on a shared template sheet (NeuroPictor's fMRI input).

NeuroPictor (Huo et al. 2024, Sec. 3.1) feeds its encoder a 1-channel 256x256 map of the visual cortex: a
full-cortex flat map cropped to the visual-cortex bounding box, resized, zero outside the cortex. The
volume -> surface -> flat-map code behind it is not public (reference/method-notes.md), so fmrirecon
defines its own projection, documented here and used for real NSD and for the synthetic world alike.

The template sheet
------------------
Two hemispheres side by side in a plane. Each hemisphere is a disc in polar coordinates around its
occipital pole: ``rho`` is the normalised geodesic distance from the pole (0 at the pole, about 1 at the
anterior edge of the visual cortex) and ``psi`` the azimuth around the pole (0 = lateral, +pi/2 = dorsal,
-pi/2 = ventral, +-pi = medial). The hemisphere discs are centred at ``x = -HEMISPHERE_OFFSET`` (left) and
``x = +HEMISPHERE_OFFSET`` (right), mirrored so that lateral points outwards and dorsal points up::

    x = h * (HEMISPHERE_OFFSET + rho * cos(psi)),   y = rho * sin(psi),   h = -1 (left) / +1 (right)

The projection (:func:`project_to_template`)
-------------------------------------------
From voxel positions in millimetres (``affine @ voxel_ijk``, RAS: +x right, +y anterior, +z superior, as
NSD's LPI-saved volumes with identity-like affine give):

1. hemisphere: split at the least-populated sagittal slice in the central half of the x range (the
   interhemispheric fissure); voxels left of it are the left hemisphere;
2. per hemisphere, a least-squares sphere fit (centre ``c``, radius ``R``) inflates the cortex to a sphere
   (when ``R`` exceeds 3x the voxel set's extent, the set is nearly flat and its centroid is used as ``c``);
3. azimuthal equidistant projection around the pole ray ``c + R * (0, -1, 0)`` (the posterior direction):
   ``theta`` = angle between ``p - c`` and the posterior axis, ``psi = atan2(up, lateral)`` of ``p - c``;
4. ``rho = theta / theta_ref`` with ``theta_ref`` the 99th percentile of ``theta`` in that hemisphere, so
   the (visual-cortex) voxel set spans ``rho`` in about ``[0, 1]`` whatever the brain size.

The simulated subjects (fmrirecon.data.brain) lay their cortex on spherical caps, so this projection
recovers their template layout up to the subject-specific warp.

The map (:class:`SheetProjector`)
--------------------------------
A fixed ``size x size`` pixel grid covers the template box ``[-TEMPLATE_HALF_WIDTH, TEMPLATE_HALF_WIDTH] x
[-TEMPLATE_HALF_HEIGHT, TEMPLATE_HALF_HEIGHT]`` (row 0 = dorsal top; pixels are twice as wide as tall in
template units) — the same grid for every subject. Each pixel value is a normalised Gaussian-weighted
average of the voxels within ``support * sigma`` template units (Gaussian splatting); pixels with no voxel
that close lie outside the cortical footprint and are 0, as in NeuroPictor. The weights form a sparse
``(size*size, V)`` matrix built once per subject, so projecting a batch is one sparse product.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import torch
from scipy.spatial import cKDTree

from fmrirecon.errors import ConfigError, SubjectMismatchError

HEMISPHERE_OFFSET = 1.15
TEMPLATE_HALF_WIDTH = 2.3
TEMPLATE_HALF_HEIGHT = 1.15
POSTERIOR = np.array([0.0, -1.0, 0.0])
SUPERIOR = np.array([0.0, 0.0, 1.0])


def template_from_polar(hemisphere: np.ndarray, rho: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """Template coordinates ``(V, 2)`` from hemisphere ``(V,)`` (-1 left, +1 right), ``rho`` and ``psi``."""
    hemisphere = np.asarray(hemisphere, dtype=np.float64)
    x = hemisphere * (HEMISPHERE_OFFSET + rho * np.cos(psi))
    return np.stack([x, rho * np.sin(psi)], axis=-1)


def polar_from_template(sheet_xy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`template_from_polar`: ``(hemisphere (V,), rho (V,), psi (V,))``."""
    sheet_xy = np.asarray(sheet_xy, dtype=np.float64)
    hemisphere = np.where(sheet_xy[:, 0] < 0, -1, 1)
    lateral = hemisphere * sheet_xy[:, 0] - HEMISPHERE_OFFSET
    return hemisphere, np.hypot(lateral, sheet_xy[:, 1]), np.arctan2(sheet_xy[:, 1], lateral)


def fit_sphere(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares sphere through ``points (n, 3)``: ``(centre (3,), radius)``.

    Algebraic fit: ``|p|^2 = 2 p.c + (R^2 - |c|^2)`` is linear in ``c`` and the constant.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.shape[0] < 4:
        raise ValueError(f"a sphere fit needs at least 4 points, got {points.shape[0]}")
    design = np.concatenate([2 * points, np.ones((len(points), 1))], axis=1)
    target = (points**2).sum(axis=1)
    solution, *_ = np.linalg.lstsq(design, target, rcond=None)
    centre = solution[:3]
    radius = float(np.sqrt(solution[3] + centre @ centre))
    return centre, radius


def voxel_positions_mm(voxel_ijk: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World positions ``(V, 3)`` in mm of voxel indices ``(V, 3)`` under a ``(4, 4)`` affine."""
    voxel_ijk = np.asarray(voxel_ijk)
    affine = np.asarray(affine, dtype=np.float64)
    if voxel_ijk.ndim != 2 or voxel_ijk.shape[1] != 3:
        raise ValueError(f"voxel_ijk must be (V, 3), got shape {voxel_ijk.shape}")
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be (4, 4), got shape {affine.shape}")
    return voxel_ijk @ affine[:3, :3].T + affine[:3, 3]


def _midline(x: np.ndarray) -> float:
    """x of the interhemispheric fissure: centre of the least-populated slice in the central half of x."""
    values = np.unique(np.round(x, 4))
    step = np.diff(values).min() if len(values) > 1 else 1.0
    edges = np.arange(values[0] - step / 2, values[-1] + step, step)
    counts, _ = np.histogram(x, bins=edges)
    centres = (edges[:-1] + edges[1:]) / 2
    span = values[-1] - values[0]
    central = np.flatnonzero(np.abs(centres - (values[0] + span / 2)) <= span / 4)
    if len(central) == 0:
        return float(np.median(x))
    emptiest = central[counts[central] == counts[central].min()]
    # Several equally empty slices (a gap wider than one voxel): take the middle one.
    return float(centres[emptiest[len(emptiest) // 2]])


def project_to_template(voxel_ijk: np.ndarray, affine: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """Template-sheet coordinates ``(V, 2)`` of voxels ``(V, 3)`` (the projection in the module docstring)."""
    xyz = voxel_positions_mm(voxel_ijk, affine)
    midline = _midline(xyz[:, 0])
    hemisphere = np.where(xyz[:, 0] < midline, -1, 1)
    rho = np.zeros(len(xyz))
    psi = np.zeros(len(xyz))
    for h in (-1, 1):
        sel = hemisphere == h
        if sel.sum() < 4:
            raise ValueError(
                f"hemisphere {h:+d} has {sel.sum()} voxels; the projection needs at least 4 per side"
            )
        centre, radius = fit_sphere(xyz[sel])
        span = np.ptp(xyz[sel], axis=0).max()
        if not np.isfinite(radius) or radius > 3 * span:
            # Nearly flat voxel sets fit huge spheres; the centroid then stands in for the centre.
            centre = xyz[sel].mean(axis=0)
        direction = xyz[sel] - centre
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        theta = np.arccos(np.clip(direction @ POSTERIOR, -1.0, 1.0))
        rho[sel] = theta / np.percentile(theta, percentile)
        psi[sel] = np.arctan2(direction @ SUPERIOR, h * direction[:, 0])
    return template_from_polar(hemisphere, rho, psi)


def template_grid(size: int) -> np.ndarray:
    """Template coordinates of the ``size x size`` map's pixel centres, ``(size, size, 2)``; row 0 on top."""
    xs = (np.arange(size) + 0.5) / size * 2 * TEMPLATE_HALF_WIDTH - TEMPLATE_HALF_WIDTH
    ys = TEMPLATE_HALF_HEIGHT - (np.arange(size) + 0.5) / size * 2 * TEMPLATE_HALF_HEIGHT
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([gx, gy], axis=-1)


class SheetProjector:
    """Voxel values -> ``(B, 1, size, size)`` activation maps on the template grid (see module docstring).

    Args:
        sheet_xy: template coordinates of the subject's voxels, ``(V, 2)``.
        size: side of the square map in pixels (NeuroPictor: 256).
        sigma: Gaussian splat width in template units; ``None`` uses 1.5 x the median distance between
            neighbouring distinct voxel positions (so sparse and dense voxel sets both fill their footprint).
        support: a pixel is inside the cortical footprint when a voxel lies within ``support * sigma``.
    """

    def __init__(
        self, sheet_xy: np.ndarray, size: int = 256, sigma: float | None = None, support: float = 2.0
    ):
        sheet_xy = np.asarray(sheet_xy, dtype=np.float64)
        if sheet_xy.ndim != 2 or sheet_xy.shape[1] != 2:
            raise ValueError(f"sheet_xy must be (V, 2), got shape {sheet_xy.shape}")
        if size < 2:
            raise ConfigError(f"map size must be >= 2 pixels, got {size}")
        self.n_voxels = len(sheet_xy)
        self.size = int(size)
        tree = cKDTree(sheet_xy)
        if sigma is None:
            unique = np.unique(np.round(sheet_xy, 6), axis=0)
            dist, _ = cKDTree(unique).query(unique, k=2)
            sigma = 1.5 * float(np.median(dist[:, 1]))
        self.sigma = float(sigma)
        self.support = float(support)
        pixels = template_grid(self.size).reshape(-1, 2)
        # (size*size, V) sparse distances within the support radius, turned into normalised Gaussian weights.
        dist = cKDTree(pixels).sparse_distance_matrix(
            tree, self.support * self.sigma, output_type="coo_matrix"
        )
        weights = np.exp(-0.5 * (dist.data / self.sigma) ** 2)
        matrix = scipy.sparse.csr_matrix((weights, (dist.row, dist.col)), shape=(len(pixels), self.n_voxels))
        row_sum = np.asarray(matrix.sum(axis=1)).ravel()
        self.footprint = (row_sum > 0).reshape(self.size, self.size)
        inv = np.divide(1.0, row_sum, out=np.zeros_like(row_sum), where=row_sum > 0)
        self.matrix = (scipy.sparse.diags(inv) @ matrix).tocsr().astype(np.float32)

    @classmethod
    def from_voxels(
        cls, voxel_ijk: np.ndarray, affine: np.ndarray, size: int = 256, **kwargs
    ) -> SheetProjector:
        """Projector for voxels given as indices ``(V, 3)`` + affine (what a prepared store holds)."""
        return cls(project_to_template(voxel_ijk, affine), size=size, **kwargs)

    def __call__(self, betas):
        """``betas (B, V)`` (numpy or torch) -> float32 maps ``(B, 1, size, size)`` of the same array type."""
        is_torch = isinstance(betas, torch.Tensor)
        values = betas.detach().cpu().numpy() if is_torch else np.asarray(betas)
        if values.ndim != 2 or values.shape[1] != self.n_voxels:
            raise SubjectMismatchError(
                f"betas must be (B, {self.n_voxels}) for this sheet (one value per voxel), "
                f"got shape {values.shape}"
            )
        maps = np.asarray(self.matrix @ values.astype(np.float32).T).T  # (B, size*size)
        maps = maps.reshape(-1, 1, self.size, self.size).astype(np.float32)
        return torch.from_numpy(maps).to(betas.device) if is_torch else maps


def activation_map(betas, sheet_xy: np.ndarray, size: int = 256, sigma: float | None = None):
    """One-shot :class:`SheetProjector`: ``betas (B, V)`` -> float32 ``(B, 1, size, size)``."""
    return SheetProjector(sheet_xy, size=size, sigma=sigma)(betas)
