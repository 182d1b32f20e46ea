"""Simulated fMRI subjects with a known ground-truth encoding model (DESIGN.md, "The synthetic world").

Anatomy
-------
Each subject's visual cortex lies on the shared template sheet of :mod:`fmrirecon.data.surface` (two
hemisphere discs in polar coordinates ``rho`` / ``psi`` around the occipital pole). In 3-D each hemisphere's
cortex is a shell (``SHELL_THICKNESS_MM`` thick) on a posterior spherical cap of radius ``R`` around a centre
``(+-cx, cy, 0)`` mm; a grid voxel in the shell gets native sheet coordinates from its azimuthal projection
around the pole (exactly what :func:`fmrirecon.data.surface.project_to_template` computes from positions) and
template coordinates ``sheet_xy`` = native + a smooth subject-specific warp. Areas are laid out in template
coordinates (``AREA_BANDS``, ``FLOC_PATCHES``), so the same area sits at slightly different places in each
subject. The ``n_voxels`` cortex voxels nearest the pole (smallest template ``rho``) form ``nsdgeneral``;
``R`` is chosen so that this is about ``rho <= 1``. The volume grid has 1.8 mm voxels and an LPI-saved,
identity-like affine with the origin at the slab centre (reference/dataset-formats.md §1.0).

ROIs use NSD's files, label names and value coding (-1 not cortex, 0 cortex unlabelled, 1..N labels;
dataset-formats.md §1.2): ``nsdgeneral``, ``prf-visualrois`` (V1v V1d V2v V2d V3v V3d hV4), ``floc-faces``,
``floc-bodies``, ``floc-places``, ``floc-words`` and ``streams`` (early, mid*, ventral, lateral, parietal —
the "higher-level region"), each also as ``lh.<name>`` / ``rh.<name>``.

Encoding model (``response``, pixels only)
-----------------------------------------
A fixed feature map of the image (:func:`pixel_features`), then one linear drive per voxel, standardised on
a fixed calibration set of world scenes and expressed in percent signal change (PSC)::

    z_v = (drive_v - mean_v) / sd_v
    response_v = baseline_v + amplitude_v * 3 tanh(z_v / 3)          (PSC, baseline 0.5-2)

* retinotopic voxels (V1, V2, V3, hV4 and a dorsal V3AB-like band): Gaussian receptive-field pooling of
  luminance, red-green, blue-yellow, luminance-edge and colour-edge energy maps; RF centres vary smoothly
  with the template position (eccentricity along ``rho`` with mirror reversals at area borders, polar
  angle along ``psi``, contralateral hemifield) and RF size grows V1 < V2 < V3 < hV4 (``RF_SIZE_SCALE``);
* category voxels (floc ROIs): category evidence of their tied categories (``FLOC_CATEGORIES``);
  evidence = a fixed linear readout of normalised matched filters (edge templates of each category's
  silhouette at three sizes, max over positions) and global colour statistics, fit once by ridge regression
  on the calibration scenes;
* semantic voxels (the rest of the higher band): sparse mixtures of semantic attributes computed from
  pixels (category evidence, stuff evidence, colour presence).

Measurement model (``measure``)
------------------------------
``beta = response * scale[session, v] + offset[session, v] + noise``: per-session scale drifts and offsets
(deterministic per subject and session) make per-session z-scoring necessary; trial noise is independent per
call with a voxel-specific SD ``noise_sd_v`` (~0.8-2 PSC). Each voxel's signal amplitude is
``snr_v * noise_sd_v``; a fraction of voxels has SNR 0.02 (nearly pure noise). Betas are a few PSC (well
inside +-100), so NSD's int16 x 300 storage keeps 0.003 PSC precision without overflow.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from fmrirecon.data import world as world_mod
from fmrirecon.data.nsd_facts import NSD_SUBJECTS, NSDGENERAL_VOXELS
from fmrirecon.data.surface import (
    TEMPLATE_HALF_HEIGHT,
    TEMPLATE_HALF_WIDTH,
    polar_from_template,
    template_from_polar,
)
from fmrirecon.errors import ConfigError

SPEC_FORMAT = "fmrirecon-simulated-subject"
SPEC_VERSION = 1
RESPONSE_SATURATION = 3.0  # responses saturate softly at this many signal SDs from baseline
VOXEL_SIZE_MM = 1.8
SHELL_THICKNESS_MM = 4.0
# nsdgeneral voxel counts of NSD subj01..08 (data/nsd_facts.py); simulated subjects keep their ratios.
NSD_NSDGENERAL_COUNTS = tuple(NSDGENERAL_VOXELS[s] for s in NSD_SUBJECTS)

# Template layout. Retinotopic bands along rho: (name, rho_lo, rho_hi); band area grows like rho^2, so the
# bands narrow outwards to give V1..hV4 NSD-like shares of nsdgeneral (~9/11/12/6 %). hV4 is ventral only;
# its dorsal counterpart is an unlabelled V3AB-like band.
AREA_BANDS = (("V1", 0.0, 0.3), ("V2", 0.3, 0.45), ("V3", 0.45, 0.57), ("hV4", 0.57, 0.66))
HIGHER_RHO = 0.66
MID_STREAM_RHO = 0.8  # streams: "mid*" between HIGHER_RHO and this, ventral/lateral/parietal beyond
CORTEX_RHO = 1.3  # cortex continues beyond nsdgeneral up to this template rho
RF_SIZE_SCALE = {"V1": 1.0, "V2": 1.45, "V3": 2.0, "hV4": 2.8, "V3AB": 2.4}
ROI_LABELS: dict[str, tuple[str, ...]] = {
    "nsdgeneral": ("nsdgeneral",),
    "prf-visualrois": ("V1v", "V1d", "V2v", "V2d", "V3v", "V3d", "hV4"),
    "floc-faces": ("OFA", "FFA-1", "FFA-2", "mTL-faces", "aTL-faces"),
    "floc-bodies": ("EBA", "FBA-1", "FBA-2", "mTL-bodies"),
    "floc-places": ("OPA", "PPA", "RSC"),
    "floc-words": ("OWFA", "VWFA-1", "VWFA-2", "mfs-words", "mTL-words"),
    "streams": ("early", "midventral", "midlateral", "midparietal", "ventral", "lateral", "parietal"),
}
# Category-selective patches in the higher band, posterior to anterior: label -> (psi range in degrees,
# rho range). Faces and words lie ventral, bodies lateral, places dorsal (OPA) and medial (PPA, RSC).
_RHO_STEPS = (0.66, 0.74, 0.81, 0.87, 0.93, 1.15)
FLOC_PATCHES: dict[str, dict[str, tuple[tuple[float, float], tuple[float, float]]]] = {
    "floc-faces": {
        name: ((-150, -100), (_RHO_STEPS[i], _RHO_STEPS[i + 1]))
        for i, name in enumerate(ROI_LABELS["floc-faces"])
    },
    "floc-words": {
        name: ((-95, -55), (_RHO_STEPS[i], _RHO_STEPS[i + 1]))
        for i, name in enumerate(ROI_LABELS["floc-words"])
    },
    "floc-bodies": {
        "EBA": ((-40, 10), (0.66, 0.77)),
        "FBA-1": ((-40, 10), (0.77, 0.86)),
        "FBA-2": ((-40, 10), (0.86, 0.93)),
        "mTL-bodies": ((-40, 10), (0.93, 1.15)),
    },
    "floc-places": {
        "OPA": ((40, 90), (0.66, 0.85)),
        "PPA": ((-180, -155), (0.7, 0.95)),
        "RSC": ((140, 180), (0.7, 0.95)),
    },
}
# Categories (and stuff) each floc domain responds to, with relative weights.
FLOC_CATEGORIES: dict[str, dict[str, float]] = {
    "floc-faces": {"face": 1.0, "person": 0.25},
    "floc-bodies": {"person": 1.0, "face": 0.2},
    "floc-places": {"house": 1.0, "tent": 0.5, "stuff:wall": 0.3},
    "floc-words": {"sign": 1.0},
}
VOXEL_CLASSES = ("retinotopic", "category", "semantic")

# Fixed feature map.
FEATURE_RES = 32  # images are area-resized to FEATURE_RES^2 before feature extraction
POOL_RES = 16  # low-level maps are pooled by receptive fields on this grid
LOW_LEVEL_CHANNELS = ("luminance", "red_green", "blue_yellow", "edge", "colour_edge")
CALIBRATION_SEED = 7331
CALIBRATION_IMAGES = 1000
FEATURE_BATCH = 256
REST_CHUNK = 512  # rest-run timepoints generated at once
MATCH_STRIDE = 1  # every position; stride 2 is ~30 % cheaper but drops category AUC from 0.87 to 0.81


# ============================================================================================ feature map
# Rows: R, G, B, luminance (Rec. 601), red-green and blue-yellow opponent channels from RGB.
_OPPONENT = torch.tensor(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.299, 0.587, 0.114], [1, -1, 0], [-0.5, -0.5, 1]], dtype=torch.float32
)


def _sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude of each channel, ``(N, C, H, W)`` -> ``(N, C, H, W)`` (replicate padding)."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8
    kernel = torch.stack([kx, kx.T]).unsqueeze(1)  # (2, 1, 3, 3)
    n, c, h, w = x.shape
    padded = F.pad(x.reshape(n * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    g = F.conv2d(padded, kernel).reshape(n, c, 2, h, w)
    return torch.sqrt((g**2).sum(dim=2) + 1e-12)


@functools.lru_cache(maxsize=1)
def _templates() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Matched filters per object size: every category's silhouette edge map and the size's support disc.

    Returns one ``(templates (C, 1, k, k), support (1, 1, k, k))`` pair per size in ``SIZES``; ``k`` just
    covers the silhouette plus the Sobel footprint, templates are zero-mean with unit norm.
    """
    filters = []
    for size in world_mod.SIZES:
        radius = world_mod.SIZE_RADIUS[size] * FEATURE_RES
        canvas = 2 * int(np.ceil(radius + 1.0)) + 1
        yy, xx = np.mgrid[:canvas, :canvas] - canvas // 2
        support = torch.from_numpy((np.hypot(yy, xx) <= radius * 1.15).astype(np.float32))[None, None]
        templates = []
        for category in world_mod.CATEGORIES:
            silhouette = torch.from_numpy(world_mod.shape_coverage(category, radius, canvas))[None, None]
            edges = _sobel_magnitude(silhouette)[0, 0].numpy()
            edges = edges - edges.mean()
            templates.append(edges / np.linalg.norm(edges))
        filters.append((torch.from_numpy(np.stack(templates))[:, None], support))
    return filters


def _colour_presence(x: torch.Tensor) -> torch.Tensor:
    """Fraction of pixels close to each palette colour, ``(N, 3, H, W)`` -> ``(N, len(COLOURS))``."""
    palette = torch.tensor([world_mod.COLOUR_RGB[c] for c in world_mod.COLOURS], dtype=torch.float32) / 255
    pixels = x.flatten(2).transpose(1, 2)  # (N, H*W, 3)
    d2 = (pixels**2).sum(-1, keepdim=True) - 2 * pixels @ palette.T + (palette**2).sum(-1)  # (N, H*W, K)
    return torch.exp(-d2.clamp_min(0) / (2 * 0.12**2)).mean(dim=1)


def pixel_features(images: np.ndarray) -> dict[str, torch.Tensor]:
    """The fixed feature map of the ground-truth encoding model.

    Args:
        images: uint8 ``(N, H, W, 3)``.
    Returns:
        ``low_level``: ``(N, 5, POOL_RES, POOL_RES)`` maps (``LOW_LEVEL_CHANNELS``);
        ``descriptor``: ``(N, D)`` global descriptor (max normalised matched-filter response per category
        and size, colour presence, mean colour and edge energy of the upper and lower image halves);
        ``colour``: ``(N, len(COLOURS))`` colour presence (also part of the descriptor).
    """
    images = _check_images(images)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # (N, 3, H, W)
    h, w = x.shape[-2:]
    if h == w and h % FEATURE_RES == 0:
        x = F.avg_pool2d(x, h // FEATURE_RES) if h > FEATURE_RES else x
    else:
        x = F.interpolate(x, size=(FEATURE_RES, FEATURE_RES), mode="bilinear", antialias=True)
    # R, G, B, luminance, red-green, blue-yellow: one Sobel pass for all six channels.
    channels = torch.einsum("kc,nchw->nkhw", _OPPONENT, x)
    magnitude = _sobel_magnitude(channels)  # (N, 6, H, W)
    luminance, red_green, blue_yellow = channels[:, 3], channels[:, 4], channels[:, 5]
    edge = magnitude[:, 3]
    colour_edge = magnitude[:, 4:].pow(2).sum(1).sqrt()
    maps = torch.stack([luminance - 0.5, red_green, blue_yellow, edge, colour_edge], dim=1)
    low_level = F.avg_pool2d(maps, FEATURE_RES // POOL_RES)

    # Normalised cross-correlation of the colour-edge image with every template, max over positions (the
    # position invariance of higher visual cortex).
    edges = magnitude[:, :3].pow(2).sum(1).sqrt()  # (N, H, W) colour-edge energy
    e = (edges / (edges.pow(2).mean(dim=(-2, -1), keepdim=True).sqrt() + 1e-6))[:, None]
    matches = []
    for templates, support in _templates():
        pad = templates.shape[-1] // 2
        corr = F.conv2d(e, templates, stride=MATCH_STRIDE, padding=pad)  # (N, C, h, w)
        energy = F.conv2d(e**2, support, stride=MATCH_STRIDE, padding=pad)  # (N, 1, h, w)
        matches.append((corr / torch.sqrt(energy + 1.0)).amax(dim=(-2, -1)))  # (N, C)
    matches = torch.stack(matches, dim=-1).reshape(len(e), -1)  # (N, C * S), category-major
    half = FEATURE_RES // 2
    colour_halves = torch.cat([x[..., :half, :].mean(dim=(-2, -1)), x[..., half:, :].mean(dim=(-2, -1))], 1)
    edge_halves = torch.stack([edges[:, :half].mean(dim=(-2, -1)), edges[:, half:].mean(dim=(-2, -1))], 1)
    colour = _colour_presence(F.avg_pool2d(x, FEATURE_RES // POOL_RES))
    contrast = luminance.std(dim=(-2, -1))[:, None]
    descriptor = torch.cat([matches, colour, colour_halves, edge_halves, contrast], dim=1)
    return {"low_level": low_level, "descriptor": descriptor, "colour": colour}


@dataclass(frozen=True)
class _Calibration:
    """Fixed constants of the feature map, computed once from ``CALIBRATION_IMAGES`` world scenes."""

    low_level_scale: torch.Tensor  # (5,) per-channel SD of the low-level maps
    descriptor_mean: torch.Tensor  # (D,)
    descriptor_scale: torch.Tensor  # (D,)
    readout: torch.Tensor  # (D + 1, C + S) ridge readout descriptor -> category / stuff evidence
    colour_mean: torch.Tensor  # (K,)
    colour_scale: torch.Tensor  # (K,)
    low_level: torch.Tensor  # (n, 5, POOL_RES, POOL_RES) features of the calibration scenes
    semantic: torch.Tensor  # (n, C + S + K)


@functools.lru_cache(maxsize=1)
def _calibration() -> _Calibration:
    """Calibrate the feature map on the world scenes of ``CALIBRATION_SEED`` (once per process).

    The ridge readout (penalty 1, standardised descriptor + intercept) maps the descriptor to the scenes'
    ``things`` and ``stuff`` labels; it is what makes category evidence selective.
    """
    calib = world_mod.make_world(CALIBRATION_IMAGES, image_size=64, seed=CALIBRATION_SEED)
    feats = pixel_features(calib.images)
    low_scale = feats["low_level"].std(dim=(0, 2, 3)) + 1e-6
    desc = feats["descriptor"].double()
    mean, scale = desc.mean(0), desc.std(0) + 1e-6
    design = torch.cat([(desc - mean) / scale, torch.ones(len(desc), 1, dtype=torch.float64)], 1)
    targets = torch.from_numpy(np.concatenate([calib.things, calib.stuff], 1).astype(np.float64))
    ridge = 1.0 * torch.eye(design.shape[1], dtype=torch.float64)
    readout = torch.linalg.solve(design.T @ design + ridge, design.T @ targets)
    colour = feats["colour"]
    evidence = design.float() @ readout.float()
    colour_z = (colour - colour.mean(0)) / (colour.std(0) + 1e-6)
    return _Calibration(
        low_level_scale=low_scale,
        descriptor_mean=mean.float(),
        descriptor_scale=scale.float(),
        readout=readout.float(),
        colour_mean=colour.mean(0),
        colour_scale=colour.std(0) + 1e-6,
        low_level=feats["low_level"],
        semantic=torch.cat([evidence, colour_z], 1),
    )


def semantic_features(features: dict[str, torch.Tensor]) -> torch.Tensor:
    """Pixel-derived semantic attributes ``(N, C + S + K)``: category, stuff evidence and colour presence.

    Evidence is the calibrated ridge readout of the descriptor (about 1 when present, 0 when absent).
    """
    cal = _calibration()
    desc = (features["descriptor"] - cal.descriptor_mean) / cal.descriptor_scale
    evidence = torch.cat([desc, torch.ones(len(desc), 1)], 1) @ cal.readout
    return torch.cat([evidence, (features["colour"] - cal.colour_mean) / cal.colour_scale], 1)


SEMANTIC_NAMES: tuple[str, ...] = (
    tuple(f"category:{c}" for c in world_mod.CATEGORIES)
    + tuple(f"stuff:{s}" for s in world_mod.STUFF)
    + tuple(f"colour:{c}" for c in world_mod.COLOURS)
)


def _check_images(images: np.ndarray) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.cpu().numpy()
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got dtype {images.dtype}")
    if min(images.shape[1:3]) < 8:
        raise ValueError(f"images must be at least 8x8 pixels, got {images.shape[1]}x{images.shape[2]}")
    return np.ascontiguousarray(images)  # torch.from_numpy rejects negative strides (e.g. images[::-1])


# ============================================================================================ subject
def _subject_rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *[int(k) for k in keys]])


def _smooth_warp(rng: np.random.Generator, amplitude: float, n_modes: int = 4):
    """Random smooth displacement field on the template plane: ``xy (V, 2)`` -> ``(V, 2)``."""
    freqs = rng.uniform(0.3, 0.9, size=(2, n_modes, 2)) * rng.choice([-1, 1], size=(2, n_modes, 2))
    phases = rng.uniform(0, 2 * np.pi, size=(2, n_modes))
    amps = rng.normal(0, amplitude / np.sqrt(n_modes), size=(2, n_modes))

    def warp(xy: np.ndarray) -> np.ndarray:
        # (V, 2) . (axis, mode, 2) -> (V, axis, mode)
        arg = np.einsum("vd,amd->vam", xy, freqs) * np.pi + phases[None]
        return (amps[None] * np.sin(arg)).sum(-1)

    return warp


class SimulatedSubject:
    """A simulated subject: anatomy, NSD-style ROIs, ground-truth encoding model and measurement noise.

    Args:
        subject: 1-based subject number.
        n_voxels: number of nsdgeneral voxels V.
        seed: seed of everything subject-specific (anatomy, warp, tuning, SNR, session effects).
        warp_amplitude: RMS displacement of the template warp (template units).
        noise_only_fraction: fraction of voxels with SNR ~0.02 (nearly pure noise).
        snr_range: log-uniform range of the other voxels' SNR (signal SD / trial-noise SD).
        session_offset_sd: SD (PSC) of per-session offsets (a shared part plus a voxel-specific part).
        session_scale_sd: SD of the log per-session response scale.
        rest_length: spatial correlation length of rest fluctuations (template units).
        rest_autocorrelation: AR(1) coefficient of rest fluctuations between timepoints.
    """

    def __init__(
        self,
        subject: int,
        n_voxels: int,
        seed: int,
        warp_amplitude: float = 0.05,
        noise_only_fraction: float = 0.12,
        snr_range: tuple[float, float] = (0.3, 3.0),
        session_offset_sd: float = 0.8,
        session_scale_sd: float = 0.2,
        rest_length: float = 0.15,
        rest_autocorrelation: float = 0.6,
    ):
        if subject < 1:
            raise ConfigError(f"subject numbers are 1-based, got {subject}")
        if not 200 <= n_voxels <= 40000:
            raise ConfigError(f"n_voxels must be in [200, 40000], got {n_voxels}")
        if not 0 <= noise_only_fraction < 1:
            raise ConfigError(f"noise_only_fraction must be in [0, 1), got {noise_only_fraction}")
        self.subject = int(subject)
        self.n_voxels = int(n_voxels)
        self.seed = int(seed)
        self.warp_amplitude = float(warp_amplitude)
        self.noise_only_fraction = float(noise_only_fraction)
        self.snr_range = (float(snr_range[0]), float(snr_range[1]))
        self.session_offset_sd = float(session_offset_sd)
        self.session_scale_sd = float(session_scale_sd)
        self.rest_length = float(rest_length)
        self.rest_autocorrelation = float(rest_autocorrelation)
        self._build_anatomy()
        self._build_tuning()
        self._session_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # ---------------------------------------------------------------------------------------- anatomy
    def _cortex(self, radius: float, warp) -> dict[str, np.ndarray]:
        """Grid, affine and cortex voxels for a hemisphere-sphere radius (mm)."""
        rng = _subject_rng(self.seed, 1)
        gap = 3.0 + rng.uniform(0, 2)
        cx = radius + SHELL_THICKNESS_MM / 2 + gap / 2
        margin = SHELL_THICKNESS_MM + 2 * VOXEL_SIZE_MM
        extent = np.array(
            [2 * (cx + radius) + 2 * margin, 3 * radius + 2 * margin, 2.4 * radius + 2 * margin]
        )
        grid_shape = tuple(
            int(np.ceil(e / VOXEL_SIZE_MM)) + int(j) for e, j in zip(extent, rng.integers(0, 3, 3))
        )
        affine = np.diag([VOXEL_SIZE_MM] * 3 + [1.0])
        affine[:3, 3] = -VOXEL_SIZE_MM * (np.array(grid_shape) - 1) / 2  # origin at the slab centre
        ijk = np.stack(np.meshgrid(*[np.arange(s) for s in grid_shape], indexing="ij"), -1).reshape(-1, 3)
        xyz = ijk * VOXEL_SIZE_MM + affine[:3, 3]
        cy = -radius / 2  # posterior pole at y = -1.5 R, brain extends anteriorly to +1.5 R
        theta_ref = np.deg2rad(64.0 + rng.uniform(-4, 4))
        brain = np.zeros(len(ijk), bool)
        cortex = np.zeros(len(ijk), bool)
        hemisphere = np.zeros(len(ijk), np.int64)
        rho_native = np.zeros(len(ijk))
        psi_native = np.zeros(len(ijk))
        for h in (-1, 1):
            d = xyz - np.array([h * cx, cy, 0.0])
            r = np.linalg.norm(d, axis=1)
            # Hemisphere: sphere behind the centre, ellipsoid (2R long, 1.2R high) in front of it.
            scaled = np.sqrt(
                d[:, 0] ** 2 + (d[:, 1] / np.where(d[:, 1] > 0, 2.0, 1.0)) ** 2 + (d[:, 2] / 1.2) ** 2
            )
            inside = scaled <= radius + SHELL_THICKNESS_MM / 2
            brain |= inside
            u = d / np.maximum(r, 1e-9)[:, None]
            theta = np.arccos(np.clip(-u[:, 1], -1, 1))
            shell = (
                (np.abs(r - radius) <= SHELL_THICKNESS_MM / 2)
                & (theta <= CORTEX_RHO * theta_ref)
                & (theta < 0.49 * np.pi)
            )
            cortex |= shell
            hemisphere[shell] = h
            rho_native[shell] = theta[shell] / theta_ref
            psi_native[shell] = np.arctan2(u[shell, 2], h * u[shell, 0])
        native_xy = template_from_polar(hemisphere[cortex], rho_native[cortex], psi_native[cortex])
        sheet_xy = native_xy + warp(native_xy)
        _, rho_t, psi_t = polar_from_template(sheet_xy)
        return {
            "grid_shape": grid_shape,
            "affine": affine,
            "brain": brain.reshape(grid_shape),
            "ijk": ijk[cortex],
            "hemisphere": hemisphere[cortex],
            "sheet_xy": sheet_xy,
            "rho": rho_t,
            "psi": psi_t,
        }

    def _build_anatomy(self) -> None:
        warp = _smooth_warp(_subject_rng(self.seed, 2), self.warp_amplitude)
        # Voxel density on the shell is ~constant, so the count inside rho <= 1 grows like R^2.
        radius = 0.45 * np.sqrt(self.n_voxels)
        for _ in range(3):
            cortex = self._cortex(radius, warp)
            count = int((cortex["rho"] <= 1.0).sum())
            radius *= np.sqrt(self.n_voxels / max(count, 1))
        cortex = self._cortex(radius, warp)
        if len(cortex["rho"]) < self.n_voxels:
            raise AssertionError("cortex too small for the requested nsdgeneral size")  # internal invariant
        self.radius_mm = float(radius)
        self.grid_shape: tuple[int, int, int] = cortex["grid_shape"]
        self.affine: np.ndarray = cortex["affine"]
        self._brain = cortex["brain"]
        # nsdgeneral = the n_voxels cortex voxels nearest the pole, kept in C order of the volume (the order
        # `volume[mask]` gives), so betas columns match what an NSD reader extracts.
        order = np.lexsort((np.arange(len(cortex["rho"])), cortex["rho"]))
        in_general = np.zeros(len(order), bool)
        in_general[order[: self.n_voxels]] = True
        self._cortex_ijk = cortex["ijk"]
        self._cortex_hemisphere = cortex["hemisphere"]
        self._cortex_labels = self._label_cortex(cortex["rho"], np.rad2deg(cortex["psi"]), in_general)
        self._in_general = in_general
        self.voxel_ijk: np.ndarray = cortex["ijk"][in_general]
        self.sheet_xy: np.ndarray = cortex["sheet_xy"][in_general].astype(np.float32)
        self.hemisphere: np.ndarray = cortex["hemisphere"][in_general]
        self._rho = cortex["rho"][in_general]
        self._psi = cortex["psi"][in_general]

    @staticmethod
    def _label_cortex(rho: np.ndarray, psi_deg: np.ndarray, in_general: np.ndarray) -> dict[str, np.ndarray]:
        """Label values 0..N of each ROI file for every cortex voxel."""
        labels = {name: np.zeros(len(rho), np.int16) for name in ROI_LABELS}
        labels["nsdgeneral"][in_general] = 1
        ventral = psi_deg < 0
        for k, (area, lo, hi) in enumerate(AREA_BANDS):
            band = (rho >= lo) & (rho < hi)
            if area == "hV4":
                labels["prf-visualrois"][band & ventral] = 7
            else:
                labels["prf-visualrois"][band] = np.where(ventral[band], 2 * k + 1, 2 * k + 2)
        for roi, patches in FLOC_PATCHES.items():
            for value, (psi_range, rho_range) in enumerate(patches.values(), start=1):
                inside = (psi_deg >= psi_range[0]) & (psi_deg < psi_range[1])
                inside &= (rho >= rho_range[0]) & (rho < rho_range[1])
                labels[roi][inside] = value
        stream_dir = np.where(psi_deg < -60, 0, np.where(psi_deg <= 60, 1, 2))  # ventral, lateral, parietal
        stream_dir = np.where(np.abs(psi_deg) > 150, np.where(psi_deg < 0, 0, 2), stream_dir)
        mid = (rho >= HIGHER_RHO) & (rho < MID_STREAM_RHO)
        late = rho >= MID_STREAM_RHO
        labels["streams"][rho < HIGHER_RHO] = 1
        labels["streams"][mid] = 2 + stream_dir[mid]
        labels["streams"][late] = 5 + stream_dir[late]
        return labels

    # ---------------------------------------------------------------------------------------- ROIs
    def _roi_name(self, name: str) -> tuple[str, int | None]:
        hemi = {"lh.": -1, "rh.": 1}.get(name[:3])
        base = name[3:] if hemi is not None else name
        if base not in ROI_LABELS:
            raise ConfigError(
                f"unknown ROI {name!r}; expected one of {sorted(ROI_LABELS)} (optionally prefixed lh./rh.)"
            )
        return base, hemi

    def roi_labels(self, name: str) -> list[str]:
        """Names of labels 1..N of an NSD ROI file (dataset-formats.md §1.2)."""
        return list(ROI_LABELS[self._roi_name(name)[0]])

    def roi_volume(self, name: str) -> np.ndarray:
        """NSD-coded ROI volume, float64 ``(X, Y, Z)``.

        Values: -1 not cortex (of that hemisphere for ``lh.`` / ``rh.`` names), 0 cortex unlabelled, 1..N.
        """
        base, hemi = self._roi_name(name)
        volume = np.full(self.grid_shape, -1.0)
        keep = np.ones(len(self._cortex_ijk), bool) if hemi is None else self._cortex_hemisphere == hemi
        ijk = self._cortex_ijk[keep]
        volume[ijk[:, 0], ijk[:, 1], ijk[:, 2]] = self._cortex_labels[base][keep]
        return volume

    def roi_vector(self, name: str) -> np.ndarray:
        """ROI values 0..N of the nsdgeneral voxels, int ``(V,)`` (what a prepared store keeps)."""
        base, hemi = self._roi_name(name)
        values = self._cortex_labels[base][self._in_general].astype(np.int64)
        if hemi is not None:
            values = np.where(self.hemisphere == hemi, values, -1)
        return values

    def brainmask_volume(self) -> np.ndarray:
        """Liberal brain mask, bool ``(X, Y, Z)`` (contains all cortex, white matter inside)."""
        return self._brain.copy()

    def visual_area_masks(self) -> dict[str, np.ndarray]:
        """Boolean ``(V,)`` masks of V1, V2, V3, V4 (hV4) and higher (the rest of nsdgeneral)."""
        prf = self.roi_vector("prf-visualrois")
        masks = {
            "V1": np.isin(prf, [1, 2]),
            "V2": np.isin(prf, [3, 4]),
            "V3": np.isin(prf, [5, 6]),
            "V4": prf == 7,
        }
        masks["higher"] = ~np.any(np.stack(list(masks.values())), 0)
        return masks

    # ---------------------------------------------------------------------------------------- tuning
    def _build_tuning(self) -> None:
        rng = _subject_rng(self.seed, 3)
        v = self.n_voxels
        rho, psi = self._rho, self._psi
        voxel_class = np.full(v, 2, np.int64)
        voxel_class[rho < HIGHER_RHO] = 0
        floc_domain = np.full(v, "", dtype=object)
        for roi in FLOC_PATCHES:
            selective = self._cortex_labels[roi][self._in_general] > 0
            floc_domain[selective] = roi
            voxel_class[selective & (rho >= HIGHER_RHO)] = 1
        self.voxel_class = voxel_class

        # Retinotopy (module docstring): eccentricity along rho with mirror reversals, polar angle along psi.
        retino = voxel_class == 0
        area = np.full(v, "", dtype=object)
        ecc_frac = np.zeros(v)
        for k, (name, lo, hi) in enumerate(AREA_BANDS):
            band = (rho >= lo) & (rho < hi)
            local = (rho[band] - lo) / (hi - lo)
            ecc_frac[band] = local if k % 2 == 0 else 1 - local
            area[band] = name
        area[(area == "hV4") & (psi >= 0)] = "V3AB"
        eccentricity = 0.05 + 1.25 * ecc_frac**1.5  # image half-widths
        polar = -psi / 2  # dorsal cortex (psi > 0) -> lower visual field
        rf_x = -self.hemisphere * eccentricity * np.cos(polar)  # left hemisphere sees the right hemifield
        rf_y = -eccentricity * np.sin(polar)  # image y points down
        scale = np.array([RF_SIZE_SCALE.get(a, np.nan) for a in area], dtype=np.float64)
        self.rf_xy = np.where(retino[:, None], np.stack([rf_x, rf_y], 1), np.nan).astype(np.float32)
        self.rf_sigma = np.where(retino, scale * (0.06 + 0.12 * eccentricity), np.nan).astype(np.float32)

        colour_gain = np.where(np.isin(area, ["hV4", "V3AB"]), 3.0, 1.0)
        low_weights = np.stack(
            [
                rng.normal(0, 0.3, v),  # luminance
                rng.normal(0, 0.2, v) * colour_gain,  # red-green
                rng.normal(0, 0.2, v) * colour_gain,  # blue-yellow
                rng.uniform(0.6, 1.0, v),  # luminance edges
                rng.uniform(0.0, 0.3, v) * colour_gain,  # colour edges
            ],
            1,
        )
        # Category and semantic voxels keep a weak, spatially global low-level drive.
        low_weights[~retino] *= 0.2
        self._low_weights = low_weights.astype(np.float32)

        n_sem = len(SEMANTIC_NAMES)
        semantic_weights = np.zeros((v, n_sem))
        for i in np.flatnonzero(voxel_class == 1):
            for key, w in FLOC_CATEGORIES[floc_domain[i]].items():
                name = key if key.startswith("stuff:") else f"category:{key}"
                semantic_weights[i, SEMANTIC_NAMES.index(name)] = w * rng.uniform(0.7, 1.3)
        for i in np.flatnonzero(voxel_class == 2):
            chosen = rng.choice(n_sem, size=3, replace=False)
            semantic_weights[i, chosen] = rng.uniform(0.4, 1.0, 3) * np.where(rng.random(3) < 0.8, 1, -1)
        self._semantic_weights = semantic_weights.astype(np.float32)

        self.baseline = rng.uniform(0.5, 2.0, v).astype(np.float32)
        # Noise level is set first and the signal scaled by the SNR, so noise-only voxels have a tiny signal
        # rather than a huge noise (which would overflow NSD's int16 x 300 betas).
        self.noise_sd = np.exp(rng.normal(np.log(1.2), 0.25, v)).astype(np.float32)
        log_lo, log_hi = np.log(self.snr_range[0]), np.log(self.snr_range[1])
        snr = np.exp(rng.uniform(log_lo, log_hi, v))
        snr[rng.random(v) < self.noise_only_fraction] = 0.02
        self.snr = snr.astype(np.float32)
        self.amplitude = (self.snr * self.noise_sd).astype(np.float32)

        # Standardise every voxel's drive on the fixed calibration scenes.
        cal = _calibration()
        with torch.no_grad():
            drive = self._drive_from_features(cal.low_level, cal.semantic).numpy()
        self._drive_mean = drive.mean(0)
        self._drive_sd = drive.std(0) + 1e-6

    def _pooling_matrix(self) -> torch.Tensor:
        """Gaussian RFs on the ``POOL_RES`` grid, ``(V, POOL_RES**2)``; uniform for non-retinotopic voxels."""
        centres = (np.arange(POOL_RES) + 0.5) / POOL_RES * 2 - 1
        gy, gx = np.meshgrid(centres, centres, indexing="ij")
        pix = np.stack([gx.ravel(), gy.ravel()], 1)  # (P, 2) image half-width units
        retino = self.voxel_class == 0
        # Effective width includes the pixel footprint so sub-pixel RFs still integrate to one.
        sigma = np.sqrt(np.nan_to_num(self.rf_sigma, nan=1.0) ** 2 + (1.0 / POOL_RES) ** 2)
        d2 = ((np.nan_to_num(self.rf_xy)[:, None, :] - pix[None]) ** 2).sum(-1)
        weights = np.exp(-0.5 * d2 / sigma[:, None] ** 2)
        weights[~retino] = 1.0
        weights /= weights.sum(1, keepdims=True)
        return torch.from_numpy(weights.astype(np.float32))

    @functools.cached_property
    def _readout(self) -> torch.Tensor:
        """Linear map from flattened low-level maps ``(5 * P,)`` to voxel drives ``(V,)``: ``(5 * P, V)``."""
        pool = self._pooling_matrix()  # (V, P)
        low_scale = _calibration().low_level_scale
        w = torch.from_numpy(self._low_weights) / low_scale[None]  # (V, 5)
        return (w[:, :, None] * pool[:, None, :]).reshape(self.n_voxels, -1).T.contiguous()

    def _drive_from_features(self, low_level: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        """Voxel drives ``(N, V)`` from low-level maps ``(N, 5, P, P)`` and semantic features ``(N, F)``."""
        low = low_level.reshape(len(low_level), -1) @ self._readout
        return low + semantic @ torch.from_numpy(self._semantic_weights).T

    def _drive(self, images: np.ndarray) -> np.ndarray:
        """Unstandardised voxel drives ``(N, V)`` float32 of uint8 images ``(N, H, W, 3)``."""
        images = _check_images(images)
        out = np.empty((len(images), self.n_voxels), np.float32)
        with torch.no_grad():
            for start in range(0, len(images), FEATURE_BATCH):
                feats = pixel_features(images[start : start + FEATURE_BATCH])
                drive = self._drive_from_features(feats["low_level"], semantic_features(feats))
                out[start : start + FEATURE_BATCH] = drive.numpy()
        return out

    # ---------------------------------------------------------------------------------------- responses
    def response(self, images: np.ndarray) -> np.ndarray:
        """Noiseless ground-truth response, float32 ``(N, V)`` in PSC, of uint8 images ``(N, H, W, 3)``."""
        drive = self._drive(images)
        standardised = (drive - self._drive_mean) / self._drive_sd
        # Soft saturation at +-RESPONSE_SATURATION SDs: BOLD responses saturate, and outlier images must not
        # produce betas beyond int16 x 300 storage.
        saturated = RESPONSE_SATURATION * np.tanh(standardised / RESPONSE_SATURATION)
        return (self.baseline + self.amplitude * saturated).astype(np.float32)

    def session_effects(self, session: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scale (V,), offset (V,))`` of a 1-based session; deterministic per subject and session."""
        session = int(session)
        if session < 1:
            raise ValueError(f"sessions are 1-based, got {session}")
        if session not in self._session_cache:
            rng = _subject_rng(self.seed, 4, session)
            v = self.n_voxels
            log_scale = rng.normal(0, self.session_scale_sd) + rng.normal(0, self.session_scale_sd / 2, v)
            offset = rng.normal(0, self.session_offset_sd) + rng.normal(0, self.session_offset_sd / 2, v)
            self._session_cache[session] = (np.exp(log_scale).astype(np.float32), offset.astype(np.float32))
        return self._session_cache[session]

    def measure(self, images: np.ndarray, sessions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Single-trial betas float32 ``(N, V)`` (PSC): response x session scale + session offset + noise.

        Args:
            images: uint8 ``(N, H, W, 3)``.
            sessions: int ``(N,)`` 1-based session of each trial.
            rng: source of the trial noise (independent across calls and repeats).
        """
        sessions = np.asarray(sessions)
        if sessions.shape != (len(images),):
            raise ValueError(f"sessions must be ({len(images)},) (one per image), got shape {sessions.shape}")
        betas = self.response(images)
        for session in np.unique(sessions):
            rows = sessions == session
            scale, offset = self.session_effects(int(session))
            betas[rows] = betas[rows] * scale + offset
        betas += rng.standard_normal(betas.shape).astype(np.float32) * self.noise_sd
        return betas

    def rest_run(self, n_timepoints: int, rng: np.random.Generator) -> np.ndarray:
        """Resting-state run float32 ``(T, V)``: smooth random fields on the template sheet, AR(1) in time.

        Fields are white noise on a template grid blurred by a Gaussian of SD ``rest_length`` (template
        units), sampled at the voxels' ``sheet_xy``, plus a little independent voxel noise.
        """
        if n_timepoints < 1:
            raise ValueError(f"n_timepoints must be >= 1, got {n_timepoints}")
        pixel = 0.04  # template units per grid cell
        nx, ny = int(2 * TEMPLATE_HALF_WIDTH / pixel), int(2 * TEMPLATE_HALF_HEIGHT / pixel)
        col = np.clip(((self.sheet_xy[:, 0] + TEMPLATE_HALF_WIDTH) / pixel).astype(int), 0, nx - 1)
        row = np.clip(((self.sheet_xy[:, 1] + TEMPLATE_HALF_HEIGHT) / pixel).astype(int), 0, ny - 1)
        samples = np.empty((n_timepoints, self.n_voxels), np.float32)
        for start in range(0, n_timepoints, REST_CHUNK):  # bounded memory for long runs
            stop = min(start + REST_CHUNK, n_timepoints)
            noise = rng.standard_normal((stop - start, ny, nx)).astype(np.float32)
            fields = gaussian_filter(noise, sigma=(0, self.rest_length / pixel, self.rest_length / pixel))
            samples[start:stop] = fields[:, row, col] / (fields.std() + 1e-12)  # (t, V), unit variance
        a = self.rest_autocorrelation
        for t in range(1, n_timepoints):
            samples[t] = a * samples[t - 1] + np.sqrt(1 - a**2) * samples[t]
        samples += 0.3 * rng.standard_normal(samples.shape).astype(np.float32)
        return (samples * self.noise_sd).astype(np.float32)

    # ---------------------------------------------------------------------------------------- spec
    @property
    def spec(self) -> dict:
        """JSON-able description; :meth:`from_spec` rebuilds the identical subject."""
        return {
            "format": SPEC_FORMAT,
            "version": SPEC_VERSION,
            "subject": self.subject,
            "n_voxels": self.n_voxels,
            "seed": self.seed,
            "warp_amplitude": self.warp_amplitude,
            "noise_only_fraction": self.noise_only_fraction,
            "snr_range": list(self.snr_range),
            "session_offset_sd": self.session_offset_sd,
            "session_scale_sd": self.session_scale_sd,
            "rest_length": self.rest_length,
            "rest_autocorrelation": self.rest_autocorrelation,
            "grid_shape": list(self.grid_shape),
        }

    @classmethod
    def from_spec(cls, spec: dict) -> SimulatedSubject:
        if spec.get("format") != SPEC_FORMAT or spec.get("version") != SPEC_VERSION:
            raise ConfigError(
                f"expected a simulated-subject spec (format {SPEC_FORMAT!r}, version {SPEC_VERSION}), "
                f"got format {spec.get('format')!r}, version {spec.get('version')!r}"
            )
        kwargs = {k: v for k, v in spec.items() if k not in ("format", "version", "grid_shape")}
        try:
            subject = cls(**kwargs)
        except TypeError as err:
            raise ConfigError(f"invalid simulated-subject spec: {err}") from err
        if "grid_shape" in spec and tuple(spec["grid_shape"]) != subject.grid_shape:
            raise ConfigError(
                f"spec grid_shape {tuple(spec['grid_shape'])} but rebuilt subject has {subject.grid_shape}"
            )
        return subject

    def __repr__(self) -> str:
        return f"SimulatedSubject(subject={self.subject}, n_voxels={self.n_voxels}, grid={self.grid_shape})"


def subject_voxel_counts(n_subjects: int, n_voxels_base: int = 2000) -> list[int]:
    """Pairwise-different nsdgeneral sizes following NSD's subj01..08 ratios (scaled so subj01 = base)."""
    counts: list[int] = []
    for i in range(n_subjects):
        ratio = NSD_NSDGENERAL_COUNTS[i % 8] / NSD_NSDGENERAL_COUNTS[0] * (1 + 0.03 * (i // 8))
        count = int(round(n_voxels_base * ratio))
        while count in counts:
            count += 1
        counts.append(count)
    return counts


def make_subjects(n_subjects: int, seed: int, n_voxels_base: int = 2000, **kwargs) -> list[SimulatedSubject]:
    """``n_subjects`` simulated subjects (1-based numbers) with pairwise-different voxel counts."""
    if n_subjects < 1:
        raise ConfigError(f"n_subjects must be >= 1, got {n_subjects}")
    counts = subject_voxel_counts(n_subjects, n_voxels_base)
    subjects = []
    for i, count in enumerate(counts, start=1):
        subject_seed = int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0])
        subjects.append(SimulatedSubject(i, count, subject_seed, **kwargs))
    return subjects
