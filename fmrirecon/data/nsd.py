"""Natural Scenes Dataset (Allen et al. 2022) in its native on-disk layout: a reader for the real files and a
writer that puts a synthetic dataset in exactly the same layout.

Layout facts follow ``reference/dataset-formats.md`` §1 (section numbers below refer to it):

- ``nsd_expdesign.mat`` (§1.4): ``masterordering`` (1, n_trials) **1-based** indices into a subject's image
  list, ``subjectim`` (n_subjects, n_list) **1-based** 73k ids, ``sharedix`` (1, n_shared) **1-based** 73k
  ids; the first ``n_shared`` columns of every ``subjectim`` row are the shared images.
- Betas (§1.3): ``betas_sessionNN.nii.gz`` int16 ``(X, Y, Z, T)`` = percent signal change × 300, and
  ``betas_sessionNN.hdf5`` with dataset ``betas`` int16 ``(T, Z, Y, X)`` (MATLAB column-major: axes reversed).
- ROI volumes (§1.2): values −1 (not cortex), 0 (cortex, unlabelled), 1..N (label); compare values, not dtype.
- Global trial ``g`` (0-based) of session ``s`` row ``t``: ``g = sum(T_1..T_{s-1}) + t`` (``(s-1)*750 + t``
  in NSD); its image is ``subjectim[subj-1, masterordering[g]-1] - 1`` (0-based 73k id).
- ``nsd_stimuli.hdf5`` (§1.7): ``imgBrick`` (N, H, W, 3) uint8, row = 0-based 73k id.
- ``nsd_stim_info_merged.csv`` (§1.5) and COCO caption JSON keyed by ``cocoId`` (§1.8).

Voxel order everywhere is ``np.nonzero(mask)`` on the (X, Y, Z) grid, i.e. sorted by i, then j, then k.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmrirecon.errors import DatasetLayoutError
from fmrirecon.io import atomic_path, write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

BETAS_VERSION = "betas_fithrf_GLMdenoise_RR"
SPACE = "func1pt8mm"
PSC_SCALE = 300.0  # §1.3: "betas have been multiplied by 300 and converted to int16"
BETAS_FORMATS = ("nifti", "hdf5")
NAN_POLICIES = ("error", "zero")
N_CAPTIONS = 5
_INT16 = np.iinfo(np.int16)


def subject_dir_name(subject: int) -> str:
    """``1 -> 'subj01'`` (NSD subject folders are zero-padded to two digits)."""
    return f"subj{int(subject):02d}"


# ------------------------------------------------------------------------------------------------------------
# Paths (§1.1)
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NsdPaths:
    """Every path of the NSD tree this toolkit reads or writes, relative to the NSD root."""

    root: Path
    space: str = SPACE
    betas_version: str = BETAS_VERSION

    @property
    def expdesign(self) -> Path:
        return self.root / "nsddata" / "experiments" / "nsd" / "nsd_expdesign.mat"

    @property
    def stim_info(self) -> Path:
        return self.root / "nsddata" / "experiments" / "nsd" / "nsd_stim_info_merged.csv"

    @property
    def stimuli(self) -> Path:
        return self.root / "nsddata_stimuli" / "stimuli" / "nsd" / "nsd_stimuli.hdf5"

    def captions(self, coco_split: str) -> Path:
        return (
            self.root / "nsddata_stimuli" / "stimuli" / "nsd" / "annotations" / f"captions_{coco_split}.json"
        )

    def func_dir(self, subject: int) -> Path:
        return self.root / "nsddata" / "ppdata" / subject_dir_name(subject) / self.space

    def roi(self, subject: int, name: str) -> Path:
        return self.func_dir(subject) / "roi" / f"{name}.nii.gz"

    def roi_ctab(self, subject: int, name: str) -> Path:
        return self.root / "nsddata" / "freesurfer" / subject_dir_name(subject) / "label" / f"{name}.mgz.ctab"

    def brainmask(self, subject: int) -> Path:
        return self.func_dir(subject) / "brainmask.nii.gz"

    def betas_subject_dir(self, subject: int) -> Path:
        return self.root / "nsddata_betas" / "ppdata" / subject_dir_name(subject)

    def betas_dir(self, subject: int) -> Path:
        return self.betas_subject_dir(subject) / self.space / self.betas_version

    def betas(self, subject: int, session: int, betas_format: str = "nifti") -> Path:
        suffix = {"nifti": ".nii.gz", "hdf5": ".hdf5"}[_check_format(betas_format)]
        # §1.1: session suffix is 1-based, zero-padded to two digits.
        return self.betas_dir(subject) / f"betas_session{int(session):02d}{suffix}"


def _check_format(betas_format: str) -> str:
    if betas_format not in BETAS_FORMATS:
        raise DatasetLayoutError(f"betas format must be one of {BETAS_FORMATS}, got {betas_format!r}")
    return betas_format


# ------------------------------------------------------------------------------------------------------------
# Writer (synthetic data in the real layout)
# ------------------------------------------------------------------------------------------------------------


def psc_to_int16(betas_psc: np.ndarray) -> np.ndarray:
    """Percent signal change -> NSD int16 (×300, rounded, saturated at the int16 range)."""
    # float32 holds every int16 value exactly, so no float64 copy of a whole session is needed.
    scaled = np.rint(np.asarray(betas_psc, dtype=np.float32) * np.float32(PSC_SCALE))
    return np.clip(scaled, _INT16.min, _INT16.max).astype(np.int16)


def _nifti(data: np.ndarray, affine: np.ndarray, tr: float | None = None):
    import nibabel as nib

    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.header.set_data_dtype(data.dtype)
    if tr is not None:
        zooms = tuple(img.header.get_zooms()[:3]) + (float(tr),)
        img.header.set_zooms(zooms)
        img.header.set_xyzt_units("mm", "sec")
    return img


def _save_nifti_atomic(img, path: Path) -> None:
    import nibabel as nib

    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, str(tmp))


def write_expdesign(
    root: str | os.PathLike, masterordering: np.ndarray, subjectim: np.ndarray, sharedix: np.ndarray
) -> Path:
    """Write ``nsd_expdesign.mat`` (§1.4). All three arrays must already be **1-based**.

    masterordering: (n_trials,) indices into a subject's image list, values 1..n_list.
    subjectim: (n_subjects, n_list) 73k ids (1-based); its first n_shared columns are ``sharedix``.
    sharedix: (n_shared,) 73k ids (1-based).
    """
    from scipy.io import savemat

    masterordering = np.asarray(masterordering)
    subjectim = np.asarray(subjectim)
    sharedix = np.asarray(sharedix)
    if masterordering.min() < 1 or subjectim.min() < 1 or sharedix.min() < 1:
        raise DatasetLayoutError("nsd_expdesign arrays are 1-based: found a value < 1")
    if masterordering.max() > subjectim.shape[1]:
        raise DatasetLayoutError(
            f"masterordering indexes a list of {subjectim.shape[1]} images per subject, "
            f"found value {masterordering.max()}"
        )
    if not np.array_equal(
        subjectim[:, : sharedix.size], np.broadcast_to(sharedix, (len(subjectim), sharedix.size))
    ):
        raise DatasetLayoutError("the first len(sharedix) columns of every subjectim row must equal sharedix")
    path = NsdPaths(Path(root)).expdesign
    with atomic_path(path, suffix=".mat") as tmp:
        # MATLAB stores these as double row vectors / matrices.
        savemat(
            str(tmp),
            {
                "masterordering": masterordering.reshape(1, -1).astype(np.float64),
                "subjectim": subjectim.astype(np.float64),
                "sharedix": sharedix.reshape(1, -1).astype(np.float64),
            },
        )
    return path


def write_stim_info(
    root: str | os.PathLike,
    coco_ids: np.ndarray,
    coco_splits: Sequence[str],
    shared: np.ndarray,
    subject_trials: dict[int, np.ndarray],
) -> Path:
    """Write ``nsd_stim_info_merged.csv`` (§1.5), one row per 73k image (row = 0-based ``nsdId``).

    coco_ids: (N,) int; coco_splits: N strings ('train2017' | 'val2017'); shared: (N,) bool.
    subject_trials: subject -> (N, 3) int, **1-based** global trial number of each repeat, 0 = not presented.
    """
    import pandas as pd

    n = len(coco_ids)
    columns: dict[str, object] = {
        "cocoId": np.asarray(coco_ids, dtype=np.int64),
        "cocoSplit": list(coco_splits),
        "cropBox": ["(0, 0, 0, 0)"] * n,
        "loss": np.zeros(n),
        "nsdId": np.arange(n),
        "flagged": np.zeros(n, dtype=bool),
        "BOLD5000": np.zeros(n, dtype=bool),
        "shared1000": np.asarray(shared, dtype=bool),
    }
    for subject, trials in sorted(subject_trials.items()):
        columns[f"subject{subject}"] = (np.asarray(trials) > 0).any(axis=1)
    for subject, trials in sorted(subject_trials.items()):
        for rep in range(trials.shape[1]):
            columns[f"subject{subject}_rep{rep}"] = np.asarray(trials[:, rep], dtype=np.int64)
    table = pd.DataFrame(columns)
    path = NsdPaths(Path(root)).stim_info
    # pandas-written index column with a blank header, read back as "Unnamed: 0" (§1.5).
    write_text_atomic(path, table.to_csv(index=True))
    return path


def write_stimuli(root: str | os.PathLike, images: np.ndarray) -> Path:
    """Write ``nsd_stimuli.hdf5`` with ``imgBrick`` (N, H, W, 3) uint8, row = 0-based 73k id (§1.7)."""
    import h5py

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DatasetLayoutError(f"imgBrick must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    path = NsdPaths(Path(root)).stimuli
    with atomic_path(path, suffix=".hdf5") as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("imgBrick", data=images, chunks=(1, *images.shape[1:]))
    return path


def write_captions(
    root: str | os.PathLike,
    coco_ids: np.ndarray,
    coco_splits: Sequence[str],
    captions: Sequence[Sequence[str]],
    image_size: tuple[int, int],
) -> list[Path]:
    """Write COCO-style ``captions_<split>.json`` (§1.8): ``images`` and ``annotations`` keyed by cocoId."""
    height, width = image_size
    by_split: dict[str, dict] = {}
    ann_id = 0
    for coco_id, split, caps in zip(coco_ids, coco_splits, captions):
        doc = by_split.setdefault(
            split,
            {
                "info": {"description": "fmrirecon synthetic world"},
                "licenses": [],
                "images": [],
                "annotations": [],
            },
        )
        doc["images"].append(
            {
                "license": 0,
                "file_name": f"{int(coco_id):012d}.jpg",
                "coco_url": "",
                "height": int(height),
                "width": int(width),
                "date_captured": "",
                "flickr_url": "",
                "id": int(coco_id),
            }
        )
        for caption in caps:
            ann_id += 1
            doc["annotations"].append({"image_id": int(coco_id), "id": ann_id, "caption": str(caption)})
    paths = []
    for split, doc in sorted(by_split.items()):
        path = NsdPaths(Path(root)).captions(split)
        write_json_atomic(path, doc)
        paths.append(path)
    return paths


def write_roi(
    root: str | os.PathLike,
    subject: int,
    name: str,
    volume: np.ndarray,
    affine: np.ndarray,
    labels: Sequence[str] | None = None,
) -> Path:
    """Write ``roi/<name>.nii.gz`` (float, NSD coding −1/0/1..N, §1.2) and its ``<name>.mgz.ctab`` labels."""
    volume = np.asarray(volume, dtype=np.float64)
    values = np.unique(volume)
    if values.min() < -1 or not np.all(values == np.round(values)):
        raise DatasetLayoutError(f"ROI {name!r} must hold integers in {{-1, 0, 1..N}}, found {values[:10]}")
    paths = NsdPaths(Path(root))
    path = paths.roi(subject, name)
    _save_nifti_atomic(_nifti(volume, affine), path)
    if labels is not None:
        lines = ["0 Unknown"] + [f"{i} {label}" for i, label in enumerate(labels, start=1)]
        write_text_atomic(paths.roi_ctab(subject, name), "\n".join(lines) + "\n")
    return path


def write_brainmask(root: str | os.PathLike, subject: int, mask: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``brainmask.nii.gz`` (binary, liberal mask on the functional grid)."""
    path = NsdPaths(Path(root)).brainmask(subject)
    _save_nifti_atomic(_nifti(np.asarray(mask).astype(np.int16), affine), path)
    return path


def write_betas_session(
    root: str | os.PathLike,
    subject: int,
    session: int,
    betas: np.ndarray,
    affine: np.ndarray,
    formats: Sequence[str] = BETAS_FORMATS,
    tr: float = 1.0,
    hdf5_chunks: str = "plane",
) -> list[Path]:
    """Write one session of single-trial betas in NSD form (§1.3).

    betas: (X, Y, Z, T) — int16 already ×300, or float percent signal change (converted by ``psc_to_int16``);
        a Fortran-ordered int16 array is written without any copy.
    Writes ``betas_sessionNN.nii.gz`` as (X, Y, Z, T) int16 and/or ``betas_sessionNN.hdf5`` with ``betas``
    (T, Z, Y, X) int16.
    hdf5_chunks: ``"nsd"`` chunks (T, 1, 1, 1) and no compression, as the MATLAB writer's
        ``ChunkSize [1 1 1 750]``; ``"plane"`` (default) chunks (T, 1, Y, X) with gzip level 1 — same dataset,
        shape, dtype and axis order for any reader, but ~30x faster to write and ~4x smaller.
    """
    import h5py

    betas = np.asarray(betas)
    if betas.ndim != 4:
        raise DatasetLayoutError(f"session betas must be (X, Y, Z, T), got shape {betas.shape}")
    if hdf5_chunks not in ("nsd", "plane"):
        raise DatasetLayoutError(f"hdf5_chunks must be 'nsd' or 'plane', got {hdf5_chunks!r}")
    volume = betas if betas.dtype == np.int16 else psc_to_int16(betas)
    paths = NsdPaths(Path(root))
    written = []
    for betas_format in formats:
        path = paths.betas(subject, session, betas_format)
        if betas_format == "nifti":
            _save_nifti_atomic(_nifti(volume, affine, tr=tr), path)
        else:
            reversed_axes = np.ascontiguousarray(
                volume.transpose(3, 2, 1, 0)
            )  # (T, Z, Y, X); free if F-ordered
            t, _, y, x = reversed_axes.shape
            options = (
                {"chunks": (t, 1, 1, 1)}
                if hdf5_chunks == "nsd"
                else {"chunks": (t, 1, y, x), "compression": "gzip", "compression_opts": 1}
            )
            with atomic_path(path, suffix=".hdf5") as tmp, h5py.File(tmp, "w") as f:
                f.create_dataset("betas", data=reversed_axes, **options)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------------------------
# Reader
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpDesign:
    """``nsd_expdesign.mat`` converted to **0-based** numpy arrays.

    masterordering: (n_trials,) index into a subject's image list; subjectim: (n_subjects, n_list) 73k ids;
    sharedix: (n_shared,) 73k ids of the shared images.
    """

    masterordering: np.ndarray
    subjectim: np.ndarray
    sharedix: np.ndarray

    @property
    def n_shared(self) -> int:
        return int(self.sharedix.size)


def _wrap_read_error(path: Path, what: str, err: Exception) -> DatasetLayoutError:
    return DatasetLayoutError(
        f"could not read {what} {path}: {type(err).__name__}: {err} (truncated or corrupt?)"
    )


class NsdReader:
    """Read the NSD native layout under ``root`` (real NSD or the synthetic world written by this module).

    Parameters
    ----------
    root: the NSD root folder (holding ``nsddata/``, ``nsddata_betas/``, ``nsddata_stimuli/``).
    space: functional space folder; ``func1pt8mm`` (the 1.8 mm grid every reconstruction paper uses).
    betas_version: GLM version folder; ``betas_fithrf_GLMdenoise_RR`` ("b3").
    """

    def __init__(self, root: str | os.PathLike, space: str = SPACE, betas_version: str = BETAS_VERSION):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetLayoutError(
                f"NSD root {self.root} does not exist (expected a folder with nsddata/ ...)"
            )
        self.paths = NsdPaths(self.root, space, betas_version)
        self._expdesign: ExpDesign | None = None
        self._stim_info = None

    # ---- experiment design ---------------------------------------------------------------------------------
    def expdesign(self) -> ExpDesign:
        if self._expdesign is None:
            from scipy.io import loadmat

            path = self.paths.expdesign
            _require(path, "the NSD experiment design")
            try:
                mat = loadmat(str(path))
            except Exception as err:
                raise _wrap_read_error(path, "experiment design", err) from err
            missing = [k for k in ("masterordering", "subjectim", "sharedix") if k not in mat]
            if missing:
                raise DatasetLayoutError(
                    f"{path} lacks {missing}; expected masterordering, subjectim, sharedix"
                )
            # §1.4 / §7: all three are 1-based in the file.
            self._expdesign = ExpDesign(
                masterordering=np.asarray(mat["masterordering"]).ravel().astype(np.int64) - 1,
                subjectim=np.atleast_2d(np.asarray(mat["subjectim"])).astype(np.int64) - 1,
                sharedix=np.asarray(mat["sharedix"]).ravel().astype(np.int64) - 1,
            )
        return self._expdesign

    def stim_info(self):
        """The 73k-row stimulus table (pandas DataFrame, row = 0-based nsdId)."""
        if self._stim_info is None:
            import pandas as pd

            path = self.paths.stim_info
            _require(path, "the stimulus info table")
            table = pd.read_csv(path, index_col=0)
            for column in ("cocoId", "cocoSplit", "nsdId", "shared1000"):
                if column not in table.columns:
                    raise DatasetLayoutError(
                        f"{path} lacks column {column!r}; found {list(table.columns)[:12]}"
                    )
            self._stim_info = table
        return self._stim_info

    # ---- subjects and sessions -----------------------------------------------------------------------------
    def subjects(self) -> list[int]:
        """Subjects with a betas folder, e.g. ``[1, 2, 5, 7]``."""
        base = self.root / "nsddata_betas" / "ppdata"
        found = []
        if base.is_dir():
            for child in base.iterdir():
                match = re.fullmatch(r"subj(\d\d)", child.name)
                if match and (child / self.paths.space / self.paths.betas_version).is_dir():
                    found.append(int(match.group(1)))
        return sorted(found)

    def check_subject(self, subject: int) -> int:
        subject = int(subject)
        if not self.paths.betas_dir(subject).is_dir():
            raise DatasetLayoutError(
                f"unknown subject {subject}: expected betas folder {self.paths.betas_dir(subject)}; "
                f"subjects found under {self.root}: {self.subjects()}"
            )
        return subject

    def available_sessions(self, subject: int, betas_format: str = "nifti") -> int:
        """Number of consecutive ``betas_sessionNN`` files from session 1 on (e.g. 40, 32, 30 in NSD)."""
        self.check_subject(subject)
        n = 0
        while self.paths.betas(subject, n + 1, betas_format).is_file():
            n += 1
        suffix = {"nifti": r"\.nii\.gz", "hdf5": r"\.hdf5"}[betas_format]
        numbers = [
            int(m.group(1))
            for p in self.paths.betas_dir(subject).iterdir()
            if (m := re.fullmatch(r"betas_session(\d+)" + suffix, p.name))
        ]
        if numbers and max(numbers) > n:
            raise DatasetLayoutError(
                f"missing session file {self.paths.betas(subject, n + 1, betas_format)}: sessions must run "
                f"1..N without gaps, found session {max(numbers)} but not session {n + 1}"
            )
        return n

    def resolve_sessions(self, subject: int, n_sessions: int | None, betas_format: str = "nifti") -> int:
        """Check that sessions 1..K exist; ``None`` means every available session."""
        available = self.available_sessions(subject, betas_format)
        if n_sessions is None:
            if available == 0:
                raise DatasetLayoutError(
                    f"no betas for subject {subject}: expected {self.paths.betas(subject, 1, betas_format)}"
                )
            return available
        if n_sessions < 1:
            raise DatasetLayoutError(f"number of sessions must be >= 1, got {n_sessions}")
        if n_sessions > available:
            raise DatasetLayoutError(
                f"missing session file {self.paths.betas(subject, available + 1, betas_format)}: asked for "
                f"{n_sessions} sessions of subject {subject}, found {available}"
            )
        return int(n_sessions)

    def session_shape(
        self, subject: int, session: int, betas_format: str = "nifti"
    ) -> tuple[int, int, int, int]:
        """(X, Y, Z, T) of one session file, read from its header only."""
        path = self.paths.betas(subject, session, betas_format)
        _require(path, f"betas of subject {subject} session {session}")
        try:
            if betas_format == "nifti":
                import nibabel as nib

                shape = tuple(int(s) for s in nib.load(str(path)).shape)
            else:
                import h5py

                with h5py.File(path, "r") as f:
                    if "betas" not in f:
                        raise DatasetLayoutError(f"{path} has no dataset 'betas' (found {list(f.keys())})")
                    t, z, y, x = f["betas"].shape  # §1.3: h5py sees (T, Z, Y, X)
                    shape = (x, y, z, t)
        except DatasetLayoutError:
            raise
        except Exception as err:
            raise _wrap_read_error(path, "betas", err) from err
        if len(shape) != 4:
            raise DatasetLayoutError(f"{path} must be a 4-D (X, Y, Z, trials) volume, found shape {shape}")
        return shape  # type: ignore[return-value]

    def trials_per_session(self, subject: int, n_sessions: int, betas_format: str = "nifti") -> np.ndarray:
        """(K,) trial counts read from the files (750 each in NSD; never assumed)."""
        return np.array(
            [self.session_shape(subject, s, betas_format)[3] for s in range(1, n_sessions + 1)],
            dtype=np.int64,
        )

    def trial_table(self, subject: int, n_sessions: int | None = None, betas_format: str = "nifti") -> dict:
        """Trial table of the first K sessions, one row per trial in presentation order.

        Returns a dict of (T,) arrays: ``image_id_73k`` (0-based), ``session`` (1-based), ``trial_in_session``
        (0-based row of the session file), ``global_trial`` (0-based, §1.3), ``repeat`` (0-based presentation
        count of this image over the whole design), ``shared`` (bool, image in ``sharedix``).
        """
        subject = self.check_subject(subject)
        n_sessions = self.resolve_sessions(subject, n_sessions, betas_format)
        design = self.expdesign()
        if subject > design.subjectim.shape[0]:
            raise DatasetLayoutError(
                f"{self.paths.expdesign}: subjectim has {design.subjectim.shape[0]} rows, "
                f"no row for subject {subject}"
            )
        counts = self.trials_per_session(subject, n_sessions, betas_format)
        n_trials = int(counts.sum())
        if n_trials > design.masterordering.size:
            raise DatasetLayoutError(
                f"{n_sessions} sessions hold {n_trials} trials but masterordering in {self.paths.expdesign} "
                f"has only {design.masterordering.size}"
            )
        order = design.masterordering
        list_index = order[:n_trials]
        image_ids = design.subjectim[subject - 1, list_index]
        # Repeat number over the whole design, so dropping sessions drops later repeats, not relabels them.
        repeat_all = np.zeros(order.size, dtype=np.int64)
        seen: dict[int, int] = {}
        for g, idx in enumerate(order.tolist()):
            repeat_all[g] = seen.get(idx, 0)
            seen[idx] = repeat_all[g] + 1
        session = np.repeat(np.arange(1, n_sessions + 1), counts)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        trial_in_session = np.arange(n_trials) - np.repeat(starts, counts)
        return {
            "image_id_73k": image_ids.astype(np.int64),
            "session": session.astype(np.int64),
            "trial_in_session": trial_in_session.astype(np.int64),
            "global_trial": np.arange(n_trials, dtype=np.int64),
            "repeat": repeat_all[:n_trials],
            # masterordering <= n_shared (1-based) is the shared set (§1.4, brain-diffuser's test rule).
            "shared": list_index < design.n_shared,
        }

    # ---- ROIs ----------------------------------------------------------------------------------------------
    def roi_volume(self, subject: int, name: str = "nsdgeneral") -> tuple[np.ndarray, np.ndarray]:
        """ROI volume (X, Y, Z) float in NSD coding and its affine (4, 4)."""
        self.check_subject(subject)
        return _load_volume(self.paths.roi(subject, name), f"ROI {name!r}")

    def roi_labels(self, subject: int, name: str) -> list[str]:
        """Label names 1..N from ``<name>.mgz.ctab`` if present, else ``['<name>_1', ...]``."""
        path = self.paths.roi_ctab(subject, name)
        if path.is_file():
            rows = [line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip()]
            table = {int(k): v.strip() for k, v in rows}
            n = max(table)
            return [table.get(i, f"{name}_{i}") for i in range(1, n + 1)]
        volume, _ = self.roi_volume(subject, name)
        return [f"{name}_{i}" for i in range(1, int(volume.max()) + 1)]

    def roi_names(self, subject: int) -> list[str]:
        """Combined (not ``lh.``/``rh.``) ROI files present for the subject."""
        roi_dir = self.paths.func_dir(subject) / "roi"
        if not roi_dir.is_dir():
            return []
        names = [p.name[: -len(".nii.gz")] for p in roi_dir.glob("*.nii.gz")]
        return sorted(n for n in names if not n.startswith(("lh.", "rh.")))

    def voxel_mask(
        self, subject: int, roi: str = "nsdgeneral", labels: Sequence[int] | None = None
    ) -> np.ndarray:
        """Boolean (X, Y, Z) mask: ROI value in ``labels`` (default: any label > 0)."""
        volume, _ = self.roi_volume(subject, roi)
        mask = volume > 0 if labels is None else np.isin(np.rint(volume), list(labels))
        if not mask.any():
            raise DatasetLayoutError(
                f"ROI {roi!r} of subject {subject} selects no voxel ({self.paths.roi(subject, roi)})"
            )
        return mask

    def brainmask(self, subject: int) -> np.ndarray:
        volume, _ = _load_volume(self.paths.brainmask(subject), "brain mask")
        return volume > 0

    # ---- betas ---------------------------------------------------------------------------------------------
    def read_session(
        self,
        subject: int,
        session: int,
        voxel_ijk: np.ndarray,
        betas_format: str = "nifti",
        nan_policy: str = "error",
    ) -> np.ndarray:
        """Betas of one session at the given voxels, in percent signal change.

        voxel_ijk: (V, 3) int voxel indices on the functional grid.
        Returns float32 (T, V) = int16 file values / 300.

        NaN policy: the int16 NSD files cannot hold NaN, but converted or float files can. ``"error"``
        (default) raises :class:`DatasetLayoutError` naming the file and the number of NaN values; ``"zero"``
        replaces them with 0 and emits a warning.
        """
        _check_format(betas_format)
        if nan_policy not in NAN_POLICIES:
            raise DatasetLayoutError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        path = self.paths.betas(subject, session, betas_format)
        _require(path, f"betas of subject {subject} session {session}")
        voxel_ijk = np.asarray(voxel_ijk, dtype=np.int64)
        try:
            if betas_format == "nifti":
                raw = _read_nifti_voxels(path, voxel_ijk)
            else:
                raw = _read_hdf5_voxels(path, voxel_ijk)
        except DatasetLayoutError:
            raise
        except Exception as err:
            raise _wrap_read_error(path, "betas", err) from err
        betas = raw.astype(np.float32)
        if np.issubdtype(raw.dtype, np.integer):
            betas /= np.float32(PSC_SCALE)
        n_nan = int(np.isnan(betas).sum())
        if n_nan:
            if nan_policy == "error":
                raise DatasetLayoutError(
                    f"{path} holds {n_nan} NaN betas inside the voxel mask; expected finite values "
                    "(use nan_policy='zero' / --nan-policy zero to zero-fill them)"
                )
            warnings.warn(f"{path}: replaced {n_nan} NaN betas with 0", stacklevel=2)
            np.nan_to_num(betas, copy=False, nan=0.0)
        return betas

    def check_grid(
        self, subject: int, session: int, grid_shape: tuple[int, int, int], betas_format: str
    ) -> None:
        shape = self.session_shape(subject, session, betas_format)
        if tuple(shape[:3]) != tuple(grid_shape):
            raise DatasetLayoutError(
                f"{self.paths.betas(subject, session, betas_format)} has grid {tuple(shape[:3])} but the ROI "
                "volume "
                f"has grid {tuple(grid_shape)}; ROI and betas must be on the same {self.paths.space} grid"
            )

    # ---- stimuli and captions ------------------------------------------------------------------------------
    def image_shape(self) -> tuple[int, int, int, int]:
        import h5py

        path = self.paths.stimuli
        _require(path, "the stimulus images")
        try:
            with h5py.File(path, "r") as f:
                shape = tuple(f["imgBrick"].shape)
        except Exception as err:
            raise _wrap_read_error(path, "stimuli", err) from err
        return shape  # type: ignore[return-value]

    def images(self, ids_73k: np.ndarray) -> np.ndarray:
        """uint8 (n, H, W, 3) rows of ``imgBrick`` for 0-based 73k ids (any order)."""
        import h5py

        ids = np.asarray(ids_73k, dtype=np.int64)
        path = self.paths.stimuli
        _require(path, "the stimulus images")
        unique, inverse = np.unique(ids, return_inverse=True)
        try:
            with h5py.File(path, "r") as f:
                brick = f["imgBrick"]
                if unique.size and (unique[0] < 0 or unique[-1] >= brick.shape[0]):
                    raise DatasetLayoutError(
                        f"{path}: imgBrick has {brick.shape[0]} images, asked for id {unique[-1]}"
                    )
                rows = brick[unique] if unique.size else np.zeros((0, *brick.shape[1:]), np.uint8)
        except DatasetLayoutError:
            raise
        except Exception as err:
            raise _wrap_read_error(path, "stimuli", err) from err
        return rows[inverse]

    def captions(self, ids_73k: np.ndarray, n_captions: int = N_CAPTIONS) -> list[list[str]]:
        """Captions per image (0-based 73k ids) via cocoId/cocoSplit, padded with '' or cut to n_captions."""
        table = self.stim_info()
        ids = np.asarray(ids_73k, dtype=np.int64)
        rows = table.iloc[ids]
        by_split: dict[str, dict[int, list[str]]] = {}
        for split in sorted(set(rows["cocoSplit"])):
            path = self.paths.captions(split)
            _require(path, f"COCO captions for {split}")
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except Exception as err:
                raise _wrap_read_error(path, "captions", err) from err
            lookup: dict[int, list[tuple[int, str]]] = {}
            for ann in doc.get("annotations", []):
                lookup.setdefault(int(ann["image_id"]), []).append(
                    (int(ann["id"]), str(ann["caption"]).strip())
                )
            by_split[split] = {k: [c for _, c in sorted(v)] for k, v in lookup.items()}
        out = []
        for coco_id, split in zip(rows["cocoId"], rows["cocoSplit"]):
            caps = by_split[split].get(int(coco_id), [])[:n_captions]
            out.append(caps + [""] * (n_captions - len(caps)))
        return out


def _require(path: Path, what: str) -> None:
    if not path.is_file():
        raise DatasetLayoutError(f"missing {what}: expected file {path}")


def _load_volume(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    _require(path, what)
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as err:
        raise _wrap_read_error(path, what, err) from err
    if data.ndim != 3:
        raise DatasetLayoutError(f"{what} {path} must be a 3-D volume, found shape {data.shape}")
    return data, img.affine


def _read_nifti_voxels(path: Path, voxel_ijk: np.ndarray) -> np.ndarray:
    """(T, V) raw values in the file's own dtype (int16 for NSD, never float64).

    A ``.nii.gz`` is streamed a block of trials at a time and masked on the fly, so the whole (X, Y, Z, T)
    volume (1 GB for an NSD session) is never held in memory; other files go through nibabel's array proxy.
    """
    import nibabel as nib

    img = nib.load(str(path))
    if len(img.shape) != 4:
        raise DatasetLayoutError(f"{path} must be a 4-D (X, Y, Z, trials) volume, found shape {img.shape}")
    x, y, z, t = img.shape
    _check_ijk(path, voxel_ijk, (x, y, z))
    # Fortran flat index i + X*(j + Y*k): the position of a voxel inside one trial's volume on disk.
    flat = voxel_ijk[:, 0] + x * (voxel_ijk[:, 1] + y * voxel_ijk[:, 2])
    proxy = img.dataobj
    if not str(path).endswith(".gz") or getattr(proxy, "order", "F") != "F":
        data = np.asanyarray(proxy)  # (X, Y, Z, T)
        return np.ascontiguousarray(data.reshape(x * y * z, t, order="F")[flat].T)
    out = np.empty((t, len(flat)), dtype=proxy.dtype)
    _stream_gz_trials(path, proxy.offset, proxy.dtype, x * y * z, t, flat, out)
    slope, inter = float(proxy.slope), float(proxy.inter)
    if slope != 1.0 or inter != 0.0:
        return out * slope + inter
    return out


def _stream_gz_trials(
    path: Path, offset: int, dtype: np.dtype, n_voxels: int, n_trials: int, flat: np.ndarray, out: np.ndarray
) -> None:
    """Fill ``out`` (T, V) from a gzipped NIfTI whose trials are stored one (X, Y, Z) volume after another."""
    import gzip

    block = max(1, (32 * 2**20) // max(1, n_voxels * dtype.itemsize))  # ~32 MB of trials per read
    buffer = np.empty(n_voxels * block, dtype=dtype)
    with gzip.open(path, "rb") as f:
        f.seek(offset)
        for start in range(0, n_trials, block):
            count = min(block, n_trials - start)
            view = memoryview(buffer[: n_voxels * count]).cast("B")
            filled = 0
            while filled < view.nbytes:
                got = f.readinto(view[filled:])
                if not got:
                    raise DatasetLayoutError(
                        f"{path} ends after {start + filled // (n_voxels * dtype.itemsize)} of {n_trials} "
                        "trials (truncated file?)"
                    )
                filled += got
            out[start : start + count] = buffer[: n_voxels * count].reshape(count, n_voxels)[:, flat]


def _read_hdf5_voxels(path: Path, voxel_ijk: np.ndarray) -> np.ndarray:
    """(T, V) raw values, reading only the z-planes and in-plane bounding box the voxels occupy."""
    import h5py

    with h5py.File(path, "r") as f:
        if "betas" not in f:
            raise DatasetLayoutError(f"{path} has no dataset 'betas' (found {list(f.keys())})")
        ds = f["betas"]
        if ds.ndim != 4:
            raise DatasetLayoutError(f"{path}: 'betas' must be (trials, Z, Y, X), found shape {ds.shape}")
        t, z, y, x = ds.shape
        _check_ijk(path, voxel_ijk, (x, y, z))
        i, j, k = voxel_ijk.T
        out = np.empty((t, len(voxel_ijk)), dtype=ds.dtype)
        if len(voxel_ijk) == 0:
            return out
        j0, j1, i0, i1 = j.min(), j.max() + 1, i.min(), i.max() + 1
        for plane in np.unique(k):
            sel = np.flatnonzero(k == plane)
            slab = ds[:, int(plane), j0:j1, i0:i1]  # (T, dy, dx)
            out[:, sel] = slab[:, j[sel] - j0, i[sel] - i0]
    return out


def _check_ijk(path: Path, voxel_ijk: np.ndarray, grid: tuple[int, int, int]) -> None:
    if voxel_ijk.ndim != 2 or voxel_ijk.shape[1] != 3:
        raise DatasetLayoutError(f"voxel_ijk must be (V, 3), got {voxel_ijk.shape}")
    if len(voxel_ijk) and (voxel_ijk.min() < 0 or np.any(voxel_ijk.max(axis=0) >= np.asarray(grid))):
        raise DatasetLayoutError(
            f"{path} has grid {grid} but voxel indices reach {tuple(voxel_ijk.max(axis=0))}; "
            "ROI and betas must be on the same grid"
        )


def zscore_session(betas: np.ndarray) -> np.ndarray:
    """Z-score each voxel within one session: (T, V) -> float32 (T, V), mean 0 and sd 1 over the T trials.

    Voxels with zero variance in the session (e.g. outside the acquired slab) become 0 rather than NaN.
    """
    betas = np.asarray(betas, dtype=np.float32)
    mean = betas.mean(axis=0, dtype=np.float64).astype(np.float32)
    sd = betas.std(axis=0, dtype=np.float64).astype(np.float32)
    out = betas - mean
    safe = sd > 0
    out[:, safe] /= sd[safe]
    out[:, ~safe] = 0.0
    return out
