"""The prepared store written by ``fmrirecon prepare`` and the torch Datasets every method trains on.

Layout (``docs/contracts.md``, "Prepared store")::

    STORE/manifest.json   {"format": "fmrirecon-store", "version": 1, "source": {...}, "subjects": [1, ...],
                           "sessions": {"1": K, ...}, "roi": "nsdgeneral", "world": {...} | null, ...}
    STORE/stimuli.hdf5    images uint8 (N, H, W, 3); ids_73k int64 (N,) sorted; captions (N, 5) utf-8 str
    STORE/subjXX.hdf5     betas float32 (T, V) z-scored per session per voxel;
                          trials/{image_id_73k, session, repeat, shared, global_trial, trial_in_session} (T,);
                          voxel_ijk int (V, 3); affine (4, 4); rois/<name> int (V,) (NSD coding, attr labels);
                          attrs subject, n_sessions, roi, ...

Splits: ``test`` = trials of shared images (the images every subject saw, NSD's shared1000) within the
prepared sessions; ``train`` = every other trial; ``all`` = both.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

import numpy as np

from fmrirecon.errors import DatasetLayoutError, SubjectMismatchError
from fmrirecon.io import read_json

STORE_FORMAT = "fmrirecon-store"
STORE_VERSION = 1
SUBJECT_FORMAT = "fmrirecon-subject"
SPLITS = ("train", "test", "all")
TRIAL_FIELDS = ("image_id_73k", "session", "repeat", "shared", "global_trial", "trial_in_session")
# Images are kept in memory by the datasets below this size, else read per item.
_IMAGE_CACHE_BYTES = 2 * 1024**3


def subject_file_name(subject: int) -> str:
    return f"subj{int(subject):02d}.hdf5"


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise DatasetLayoutError(f"split must be one of {SPLITS}, got {split!r}")
    return split


class SubjectStore:
    """One subject's prepared betas and trial table (``STORE/subjXX.hdf5``); arrays are read once, cached."""

    def __init__(self, path: str | os.PathLike, subject: int):
        import h5py

        self.path = Path(path)
        self.subject = int(subject)
        if not self.path.is_file():
            raise DatasetLayoutError(f"missing subject file {self.path} for subject {subject}")
        try:
            with h5py.File(self.path, "r") as f:
                attrs = dict(f.attrs)
                missing = [k for k in ("betas", "trials", "voxel_ijk", "affine") if k not in f]
                if missing:
                    raise DatasetLayoutError(
                        f"{self.path} lacks {missing}; expected a file written by prepare"
                    )
                self.trials = {name: f["trials"][name][()] for name in f["trials"]}
                self.voxel_ijk = f["voxel_ijk"][()]
                self.affine = f["affine"][()]
                self.rois = {name: f["rois"][name][()] for name in f.get("rois", {})}
                self.roi_labels = {
                    name: [str(x) for x in f["rois"][name].attrs.get("labels", [])]
                    for name in f.get("rois", {})
                }
                self._betas_shape = f["betas"].shape
        except (DatasetLayoutError, SubjectMismatchError):
            raise
        except Exception as err:
            raise DatasetLayoutError(f"could not read {self.path}: {type(err).__name__}: {err}") from err
        found = int(attrs.get("subject", -1))
        if found != self.subject:
            raise SubjectMismatchError(
                f"{self.path} holds subject {found} but subject {self.subject} was asked for — "
                f"was this file prepared for subj{found:02d}?"
            )
        self.attrs = attrs
        self.trials["shared"] = self.trials["shared"].astype(bool)
        self._betas: np.ndarray | None = None

    @property
    def n_voxels(self) -> int:
        return int(self._betas_shape[1])

    @property
    def n_trials(self) -> int:
        return int(self._betas_shape[0])

    @property
    def n_sessions(self) -> int:
        return int(self.attrs["n_sessions"])

    def betas(self, rows: np.ndarray | None = None) -> np.ndarray:
        """float32 (T, V) z-scored betas, or (len(rows), V) for the given trial rows."""
        import h5py

        if self._betas is None:
            with h5py.File(self.path, "r") as f:
                self._betas = f["betas"][()]
        return self._betas if rows is None else self._betas[np.asarray(rows)]

    def split_rows(self, split: str) -> np.ndarray:
        """Trial rows (indices into ``betas``) of a split, in presentation order."""
        shared = self.trials["shared"]
        if _check_split(split) == "all":
            return np.arange(self.n_trials)
        return np.flatnonzero(shared if split == "test" else ~shared)

    def split_ids(self, split: str) -> np.ndarray:
        """Sorted unique 0-based 73k ids of a split ('test' = shared images seen in the prepared sessions)."""
        return np.unique(self.trials["image_id_73k"][self.split_rows(split)])

    def averaged(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Repeat-averaged betas: (ids_73k (n,), betas float32 (n, V)), ids sorted; 1-3 repeats per image."""
        rows = self.split_rows(split)
        ids, inverse, counts = np.unique(
            self.trials["image_id_73k"][rows], return_inverse=True, return_counts=True
        )
        sums = np.zeros((ids.size, self.n_voxels), dtype=np.float64)
        np.add.at(sums, inverse, self.betas(rows))
        return ids, (sums / counts[:, None]).astype(np.float32)

    def check_betas(self, betas: np.ndarray) -> None:
        """Raise SubjectMismatchError unless ``betas`` is (N, V) with this subject's voxel count."""
        shape = tuple(np.shape(betas))
        if len(shape) != 2 or shape[1] != self.n_voxels:
            raise SubjectMismatchError(
                f"betas for subj{self.subject:02d} must be (N, {self.n_voxels}) "
                f"({self.attrs.get('roi', 'ROI')} voxels), got {shape} — "
                "were they prepared for another subject?"
            )


class PreparedStore:
    """A prepared store folder (see the module docstring); validates its manifest on open."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            raise DatasetLayoutError(
                f"{self.path} is not a prepared store: expected {manifest_path} (run `fmrirecon prepare`)"
            )
        try:
            manifest = read_json(manifest_path)
        except Exception as err:
            raise DatasetLayoutError(f"could not read {manifest_path}: {err}") from err
        if manifest.get("format") != STORE_FORMAT or manifest.get("version") != STORE_VERSION:
            raise DatasetLayoutError(
                f"{manifest_path}: expected format {STORE_FORMAT!r} version {STORE_VERSION}, "
                f"found {manifest.get('format')!r} version {manifest.get('version')}"
            )
        self.manifest = manifest
        self._subjects: dict[int, SubjectStore] = {}

    @property
    def subjects(self) -> list[int]:
        return [int(s) for s in self.manifest["subjects"]]

    @property
    def roi(self) -> str:
        return self.manifest.get("roi", "nsdgeneral")

    def n_sessions(self, subject: int) -> int:
        return int(self.manifest["sessions"][str(int(subject))])

    def subject(self, subject: int) -> SubjectStore:
        subject = int(subject)
        if subject not in self.subjects:
            raise SubjectMismatchError(
                f"subject {subject} is not in the store {self.path}; it holds subjects {self.subjects}"
            )
        if subject not in self._subjects:
            self._subjects[subject] = SubjectStore(self.path / subject_file_name(subject), subject)
        return self._subjects[subject]

    @cached_property
    def _stimuli(self) -> tuple[np.ndarray, tuple[int, ...]]:
        import h5py

        path = self.path / "stimuli.hdf5"
        if not path.is_file():
            raise DatasetLayoutError(f"missing {path} in prepared store")
        with h5py.File(path, "r") as f:
            return f["ids_73k"][()], tuple(f["images"].shape)

    @property
    def ids_73k(self) -> np.ndarray:
        """Sorted 0-based 73k ids of every image in the store."""
        return self._stimuli[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, 3) of the stored images."""
        return self._stimuli[1][1:]  # type: ignore[return-value]

    def _rows(self, ids_73k: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids_73k, dtype=np.int64).ravel()
        stored = self.ids_73k
        rows = np.searchsorted(stored, ids)
        bad = (rows >= stored.size) | (stored[np.minimum(rows, stored.size - 1)] != ids)
        if bad.any():
            raise DatasetLayoutError(f"73k ids {ids[bad][:5].tolist()} are not in the store {self.path}")
        return rows

    def images(self, ids_73k: np.ndarray) -> np.ndarray:
        """uint8 (n, H, W, 3) for 0-based 73k ids, in the order given."""
        import h5py

        rows = self._rows(ids_73k)
        unique, inverse = np.unique(rows, return_inverse=True)
        with h5py.File(self.path / "stimuli.hdf5", "r") as f:
            return f["images"][unique][inverse]

    def captions(self, ids_73k: np.ndarray) -> list[list[str]]:
        """The 5 captions of each image (0-based 73k ids); missing captions are ''."""
        import h5py

        rows = self._rows(ids_73k)
        unique, inverse = np.unique(rows, return_inverse=True)
        with h5py.File(self.path / "stimuli.hdf5", "r") as f:
            caps = f["captions"].asstr()[unique] if unique.size else np.zeros((0, 5), dtype=object)
        return [[str(c) for c in caps[i]] for i in inverse]

    def world_subject(self, subject: int):
        """The simulated subject (ground-truth encoding model) for synthetic stores, else ``None``."""
        world = self.manifest.get("world")
        if not world:
            return None
        for entry in world.get("subjects", []):
            if int(entry["subject"]) == int(subject):
                from fmrirecon.data.brain import SimulatedSubject

                return SimulatedSubject.from_spec(entry["spec"])
        raise SubjectMismatchError(f"the world sidecar of {self.path} has no subject {subject}")


class _BetasDataset:
    """Shared item logic: betas rows held in memory, images cached or read per item."""

    def __init__(self, store: PreparedStore | str | os.PathLike, subject: int, split: str, with_images: bool):
        self.store = store if isinstance(store, PreparedStore) else PreparedStore(store)
        self.subject_store = self.store.subject(subject)
        self.split = _check_split(split)
        self.with_images = with_images
        self._image_cache: np.ndarray | None = None
        self._image_rows: np.ndarray | None = None

    def _setup_images(self, ids: np.ndarray) -> None:
        if not self.with_images:
            return
        unique, inverse = np.unique(ids, return_inverse=True)
        h, w, c = self.store.image_shape
        if unique.size * h * w * c <= _IMAGE_CACHE_BYTES:
            self._image_cache = self.store.images(unique)
            self._image_rows = inverse

    def _image(self, index: int, image_id: int):
        import torch

        if self._image_cache is not None:
            image = self._image_cache[self._image_rows[index]]
        else:
            image = self.store.images(np.array([image_id]))[0]
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)

    def _item(self, index: int, betas_row: np.ndarray, image_id: int) -> dict:
        import torch

        item = {"betas": torch.from_numpy(betas_row), "image_id": int(image_id)}
        if self.with_images:
            item["image"] = self._image(index, image_id)
        return item


class TrialDataset(_BetasDataset):
    """Single trials of one subject and split (for training on every repeat).

    item = {"betas": float32 (V,), "image_id": int (0-based 73k), "image": float32 (3, H, W) in [0, 1]}.
    """

    def __init__(self, store, subject: int, split: str = "train", with_images: bool = True):
        super().__init__(store, subject, split, with_images)
        rows = self.subject_store.split_rows(self.split)
        self.betas = self.subject_store.betas(rows)  # (n, V)
        self.image_ids = self.subject_store.trials["image_id_73k"][rows]
        self._setup_images(self.image_ids)

    def __len__(self) -> int:
        return int(self.image_ids.size)

    def __getitem__(self, index: int) -> dict:
        return self._item(index, self.betas[index], self.image_ids[index])


class AveragedDataset(_BetasDataset):
    """Repeat-averaged samples, one per image (the usual test set), ids sorted.

    item = {"betas": float32 (V,), "image_id": int (0-based 73k), "image": float32 (3, H, W) in [0, 1]}.
    """

    def __init__(self, store, subject: int, split: str = "test", with_images: bool = True):
        super().__init__(store, subject, split, with_images)
        self.image_ids, self.betas = self.subject_store.averaged(self.split)
        self._setup_images(self.image_ids)

    def __len__(self) -> int:
        return int(self.image_ids.size)

    def __getitem__(self, index: int) -> dict:
        return self._item(index, self.betas[index], self.image_ids[index])
