"""The synthetic world written in the real NSD layout (``fmrirecon world make``).

Glue between the world (:mod:`fmrirecon.data.world`), the simulated subjects (:mod:`fmrirecon.data.brain`)
and the NSD writer (:mod:`fmrirecon.data.nsd`). The experiment mirrors NSD at a small scale:

- every subject sees ``n_shared`` shared images (the test split, NSD's shared1000) and ``n_unique`` images
  of its own, each ``n_repeats`` times (3 in NSD);
- one ``masterordering`` is common to all subjects; subjects differ in how many sessions they completed, in
  NSD's proportions ``[40, 40, 32, 30, 40, 32, 40, 30]`` scaled to ``max_sessions`` (``[15, 15, 12, 11]``);
- new images keep appearing until the last session (first presentations are spread over the whole
  experiment, denser early), so using only the first K sessions drops some shared images and repeats, as
  using 37 of 40 NSD sessions gives 982 instead of 1000 test images;
- voxels in the brain mask but outside nsdgeneral get noise betas.

A sidecar ``fmrirecon_world.json`` (not part of NSD) records the world parameters and each subject's ``spec``
so the ground-truth encoding model can be rebuilt from a prepared store.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmrirecon.data import nsd
from fmrirecon.errors import ConfigError, DatasetLayoutError
from fmrirecon.io import atomic_path, read_json, write_json_atomic

logger = logging.getLogger(__name__)

WORLD_SIDECAR = "fmrirecon_world.json"
NSD_SESSIONS = (40, 40, 32, 30, 40, 32, 40, 30)  # sessions completed by subj01..08 (reference §1.0)
NSD_MAX_SESSIONS = 40
COCO_SPLITS = ("train2017", "val2017")


def session_counts(n_subjects: int, max_sessions: int) -> list[int]:
    """Sessions per subject in NSD's proportions, e.g. ``(4, 15) -> [15, 15, 12, 11]``."""
    return [max(1, round(max_sessions * NSD_SESSIONS[i % 8] / NSD_MAX_SESSIONS)) for i in range(n_subjects)]


@dataclass(frozen=True)
class SyntheticDesign:
    """An NSD-like experiment design, **0-based** (the writer adds 1).

    masterordering: (n_trials,) index into each subject's image list; subjectim: (n_subjects, n_list) 73k ids
    whose first n_shared columns are ``sharedix``; sessions: trials-per-session and sessions per subject.
    """

    masterordering: np.ndarray
    subjectim: np.ndarray
    sharedix: np.ndarray
    trials_per_session: int
    sessions: tuple[int, ...]

    def subject_trial_ids(self, subject: int) -> np.ndarray:
        """(sessions[subject-1] * trials_per_session,) 0-based 73k ids in presentation order."""
        n = self.sessions[subject - 1] * self.trials_per_session
        return self.subjectim[subject - 1, self.masterordering[:n]]


def make_design(
    n_subjects: int,
    n_shared: int,
    n_unique: int,
    n_repeats: int = 3,
    max_sessions: int = 15,
    n_images: int | None = None,
    seed: int = 0,
) -> SyntheticDesign:
    """Draw the design; ``n_images`` (>= n_shared + n_subjects * n_unique) is the 73k-like pool size."""
    n_list = n_shared + n_unique
    n_trials = n_list * n_repeats
    if n_trials % max_sessions:
        raise ConfigError(
            f"{n_list} images x {n_repeats} repeats = {n_trials} trials do not split into {max_sessions} "
            "equal sessions; choose n_unique so that (n_shared + n_unique) * n_repeats is a multiple of "
            f"{max_sessions}"
        )
    n_pool = n_shared + n_subjects * n_unique
    n_images = n_pool if n_images is None else n_images
    if n_images < n_pool:
        raise ConfigError(f"n_images must be >= n_shared + n_subjects * n_unique = {n_pool}, got {n_images}")
    rng = np.random.default_rng([seed, 7301])
    pool = rng.permutation(n_images)
    sharedix = np.sort(pool[:n_shared])
    subjectim = np.stack(
        [
            np.concatenate([sharedix, np.sort(pool[n_shared + s * n_unique : n_shared + (s + 1) * n_unique])])
            for s in range(n_subjects)
        ]
    )
    # Presentation times in [0, 1): first presentation u = U^2 (new images until the end, denser early), the
    # later repeats uniformly in [u, 1). Sorting all times gives one ordering common to all subjects.
    first = rng.random(n_list) ** 2
    later = np.sort(rng.random((n_list, n_repeats - 1)), axis=1)
    times = np.concatenate([first[:, None], first[:, None] + (1 - first[:, None]) * later], axis=1)
    order = np.argsort(times.ravel(), kind="stable")
    masterordering = (order // n_repeats).astype(np.int64)
    return SyntheticDesign(
        masterordering=masterordering,
        subjectim=subjectim.astype(np.int64),
        sharedix=sharedix.astype(np.int64),
        trials_per_session=n_trials // max_sessions,
        sessions=tuple(session_counts(n_subjects, max_sessions)),
    )


def write_nsd_tree(
    root: str | os.PathLike,
    images: np.ndarray,
    captions: Sequence[Sequence[str]],
    subjects: Sequence,
    design: SyntheticDesign,
    *,
    seed: int = 0,
    formats: Sequence[str] = nsd.BETAS_FORMATS,
    outside_noise_psc: float = 1.0,
    rois: Sequence[str] | None = None,
    sidecar: dict | None = None,
    progress: bool = True,
) -> Path:
    """Write a complete NSD tree under ``root`` (which should not hold another dataset).

    images: uint8 (N, H, W, 3), row = 0-based 73k id; captions: N lists of strings.
    subjects: objects with the ``SimulatedSubject`` interface (grid_shape, affine, voxel_ijk, roi_volume,
        roi_labels, brainmask_volume, measure); ``subjects[s-1]`` is subject s.
    outside_noise_psc: sd (percent signal change) of the noise betas of brain-mask voxels outside nsdgeneral.
    rois: ROI files to write besides nsdgeneral (default: every ROI of ``fmrirecon.data.brain.ROI_LABELS``).
    """
    from tqdm.auto import tqdm

    root = Path(root)
    images = np.asarray(images)
    n_images = len(images)
    rng = np.random.default_rng([seed, 7302])
    coco_ids = np.sort(rng.choice(600_000, size=n_images, replace=False)) + 1
    coco_splits = np.where(rng.random(n_images) < 0.125, COCO_SPLITS[1], COCO_SPLITS[0])

    # 1-based global trial of each repeat per subject and image (§1.5), 0 = never presented.
    subject_trials: dict[int, np.ndarray] = {}
    n_repeats = int(np.bincount(design.masterordering).max())
    for subject in range(1, len(subjects) + 1):
        table = np.zeros((n_images, n_repeats), dtype=np.int64)
        counts = np.zeros(n_images, dtype=np.int64)
        for g, image_id in enumerate(design.subject_trial_ids(subject)):
            table[image_id, counts[image_id]] = g + 1
            counts[image_id] += 1
        subject_trials[subject] = table
    shared = np.zeros(n_images, dtype=bool)
    shared[design.sharedix] = True

    nsd.write_expdesign(root, design.masterordering + 1, design.subjectim + 1, design.sharedix + 1)
    nsd.write_stim_info(root, coco_ids, list(coco_splits), shared, subject_trials)
    nsd.write_stimuli(root, images)
    nsd.write_captions(root, coco_ids, list(coco_splits), captions, images.shape[1:3])

    for number, subject in enumerate(subjects, start=1):
        affine = np.asarray(subject.affine)
        grid = tuple(subject.grid_shape)
        voxel_ijk = np.asarray(subject.voxel_ijk)
        brainmask = np.asarray(subject.brainmask_volume(), dtype=bool)
        nsd.write_brainmask(root, number, brainmask, affine)
        names = list(rois) if rois is not None else _default_rois()
        if "nsdgeneral" not in names:
            names.insert(0, "nsdgeneral")
        for name in names:
            nsd.write_roi(root, number, name, subject.roi_volume(name), affine, subject.roi_labels(name))
        inside = np.zeros(grid, dtype=bool)
        inside[tuple(voxel_ijk.T)] = True
        noise_ijk = np.argwhere(brainmask & ~inside)
        general_flat = np.ravel_multi_index(tuple(voxel_ijk.T), grid, order="F")
        noise_flat = np.ravel_multi_index(tuple(noise_ijk.T), grid, order="F")
        trial_ids = design.subject_trial_ids(number)
        sessions = np.repeat(np.arange(1, design.sessions[number - 1] + 1), design.trials_per_session)
        subject_rng = np.random.default_rng([seed, 7303, number])
        measured = _with_cached_responses(subject, images, np.unique(trial_ids))
        for session in tqdm(
            range(1, design.sessions[number - 1] + 1), desc=f"subj{number:02d} sessions", disable=not progress
        ):
            rows = np.flatnonzero(sessions == session)
            betas = measured(trial_ids[rows], sessions[rows], subject_rng)  # (T, V) PSC
            # int16 and Fortran order from the start: NIfTI writes it as is, the HDF5 axis reversal is a view.
            volume = np.zeros((*grid, rows.size), dtype=np.int16, order="F")  # (X, Y, Z, T)
            by_trial = volume.T.reshape(rows.size, -1)  # (T, X*Y*Z) view; column = Fortran flat voxel index
            by_trial[:, general_flat] = nsd.psc_to_int16(betas)
            noise = subject_rng.standard_normal((rows.size, noise_flat.size), dtype=np.float32)
            by_trial[:, noise_flat] = nsd.psc_to_int16(noise * np.float32(outside_noise_psc))
            nsd.write_betas_session(root, number, session, volume, affine, formats)
    if sidecar is not None:
        write_json_atomic(root / WORLD_SIDECAR, sidecar)
    return root


def _default_rois() -> list[str]:
    from fmrirecon.data.brain import ROI_LABELS

    return list(ROI_LABELS)


class _PrecomputedResponses:
    """Stands in for a SimulatedSubject inside its own ``measure``: ``response`` looks up precomputed rows.

    Each image is shown ``n_repeats`` times; computing its noiseless response once instead of once per
    presentation makes ``world make`` ~3x faster while ``measure``'s noise model stays the one in brain.py.
    """

    def __init__(self, subject, responses: np.ndarray, row_of_id: np.ndarray):
        self._subject = subject
        self._responses = responses
        self._row_of_id = row_of_id

    def response(self, image_ids: np.ndarray) -> np.ndarray:
        return self._responses[self._row_of_id[image_ids]].copy()

    def __getattr__(self, name: str):
        return getattr(self._subject, name)


def _with_cached_responses(subject, images: np.ndarray, image_ids: np.ndarray):
    """``measure(image_ids, sessions, rng) -> (N, V)`` computing each image's response once."""
    if not hasattr(subject, "response"):
        return lambda ids, sessions, rng: subject.measure(images[ids], sessions, rng)
    row_of_id = np.full(len(images), -1, dtype=np.int64)
    row_of_id[image_ids] = np.arange(image_ids.size)
    proxy = _PrecomputedResponses(subject, subject.response(images[image_ids]), row_of_id)
    return lambda ids, sessions, rng: type(subject).measure(proxy, ids, sessions, rng)


def write_synthetic_nsd(
    out: str | os.PathLike,
    *,
    n_subjects: int = 4,
    image_size: int = 64,
    seed: int = 0,
    n_shared: int = 100,
    n_unique: int = 500,
    n_repeats: int = 3,
    max_sessions: int = 15,
    n_voxels_base: int = 2000,
    formats: Sequence[str] = nsd.BETAS_FORMATS,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Generate the synthetic world + subjects and write them in NSD layout under ``out`` (atomically).

    Re-running with the same parameters is a no-op; other parameters need ``force=True``.
    Defaults: 4 subjects, 100 shared + 500 unique images each, 3 repeats, 120 trials per session,
    sessions ``[15, 15, 12, 11]``; ``n_voxels_base`` nsdgeneral voxels for subject 1 (others in NSD's ratios).
    """
    from fmrirecon.data.brain import make_subjects
    from fmrirecon.data.world import make_world

    for name, value in (
        ("n_subjects", n_subjects),
        ("n_shared", n_shared),
        ("n_unique", n_unique),
        ("n_repeats", n_repeats),
        ("max_sessions", max_sessions),
        ("image_size", image_size),
    ):
        if int(value) < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    for betas_format in formats:
        nsd._check_format(betas_format)
    out = Path(out).expanduser()
    params = {
        "n_subjects": n_subjects,
        "image_size": image_size,
        "seed": seed,
        "n_shared": n_shared,
        "n_unique": n_unique,
        "n_repeats": n_repeats,
        "max_sessions": max_sessions,
        "n_voxels_base": n_voxels_base,
        "formats": list(formats),
    }
    sidecar_path = out / WORLD_SIDECAR
    if out.exists() and not force:
        if sidecar_path.is_file() and read_json(sidecar_path).get("params") == params:
            logger.info("%s already holds this world; nothing to do (use --force to rewrite)", out)
            return out
        if not out.is_dir() or any(out.iterdir()):
            raise DatasetLayoutError(f"{out} exists and holds other data; pass --force to replace it")

    design = make_design(n_subjects, n_shared, n_unique, n_repeats, max_sessions, seed=seed)
    n_images = design.subjectim.max() + 1
    world = make_world(int(n_images), image_size=image_size, seed=seed, progress=progress)
    subjects = make_subjects(n_subjects, seed=seed, n_voxels_base=n_voxels_base)
    sidecar = {
        "format": "fmrirecon-world",
        "version": 1,
        "params": params,
        "n_images": int(n_images),
        "trials_per_session": design.trials_per_session,
        "sessions": {str(s): k for s, k in enumerate(design.sessions, start=1)},
        "subjects": [{"subject": s.subject, "spec": s.spec} for s in subjects],
    }
    with atomic_path(out, suffix=".partial") as tmp:
        tmp.mkdir()
        write_nsd_tree(
            tmp,
            world.images,
            world.captions,
            subjects,
            design,
            seed=seed,
            formats=formats,
            sidecar=sidecar,
            progress=progress,
        )
    return out
