"""The prepared store written by ``fmrirecon prepare`` and the torch Datasets every method trains on.

Layout (``docs/contracts.md``, "Prepared store")::

    STORE/manifest.json   {"format": "fmrirecon-store", "version": 1, "source": {...}, "subjects": [1, ...],
                           "sessions": {"1": K, ...}, "roi": "nsdgeneral", "world": {...} | null, ...}
    STORE/stimuli.hdf5    images uint8 (N, H, W, 3); ids_73k int64 (N,) sorted; captions (N, 5) utf-8 str
    STORE/subjXX.hdf5     betas (T, V) z-scored per session per voxel, stored float32, float16 or int16 x
                          attr ``scale`` (NSD's own int16 x 1/300); read back as float32;
                          trials/{image_id_73k, session, repeat, shared, global_trial, trial_in_session} (T,);
                          voxel_ijk int (V, 3); affine (4, 4); rois/<name> int (V,) (NSD coding, attr labels);
                          attrs subject, n_sessions, roi, ...

Splits: ``test`` = trials of shared images (the images every subject saw, NSD's shared1000) within the
prepared sessions; ``train`` = every other trial; ``all`` = both.

Integrity and memory (``fmrirecon.data.integrity``): every dataset is chunked with a Fletcher-32 checksum and
the manifest records a content digest per dataset; a damaged chunk raises
:class:`~fmrirecon.errors.StoreCorruptionError` naming file, dataset and rows. Betas are read in row blocks
aligned to the HDF5 chunks through a per-subject cache of a set size (``cache_bytes``), so the memory of a
multi-subject run grows with the cache, not with the number of subjects; the HDF5 handle is reopened in each
process (data-loader workers), never shared across ``fork``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import numpy as np

from fmrirecon.data import integrity
from fmrirecon.errors import DatasetLayoutError, StoreCorruptionError, SubjectMismatchError
from fmrirecon.io import read_json

STORE_FORMAT = "fmrirecon-store"
STORE_VERSION = 1
SUBJECT_FORMAT = "fmrirecon-subject"
SPLITS = ("train", "test", "all")
TRIAL_FIELDS = ("image_id_73k", "session", "repeat", "shared", "global_trial", "trial_in_session")
# Images are kept in memory by the datasets below this size, else read per item.
_IMAGE_CACHE_BYTES = 2 * 1024**3
# Default betas cache per subject (row blocks of decoded float32); set per store with ``cache_bytes``.
DEFAULT_CACHE_BYTES = 256 * 1024**2
# How betas may be stored: dtype on disk; int16 carries ``scale`` (NSD stores its betas as int16 x 1/300).
BETAS_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "int16": np.dtype(np.int16)}
INT16_SCALE = 1.0 / 300.0


def betas_storage_attrs(betas_dtype: str) -> dict:
    """Attributes of the ``betas`` dataset for a storage dtype (``scale`` multiplies the stored values)."""
    return {"storage": betas_dtype, "scale": INT16_SCALE if betas_dtype == "int16" else 1.0}


def encode_betas(betas: np.ndarray, betas_dtype: str) -> np.ndarray:
    """float (n, V) -> the storage dtype; int16 rounds betas / scale and clips to the int16 range."""
    if betas_dtype == "int16":
        info = np.iinfo(np.int16)
        return np.clip(np.rint(np.asarray(betas) / INT16_SCALE), info.min, info.max).astype(np.int16)
    return np.asarray(betas).astype(BETAS_DTYPES[betas_dtype])


def _decode_betas(raw: np.ndarray, scale: float) -> np.ndarray:
    out = raw.astype(np.float32)
    if scale != 1.0:
        out *= np.float32(scale)
    return out


def subject_file_name(subject: int) -> str:
    return f"subj{int(subject):02d}.hdf5"


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise DatasetLayoutError(f"split must be one of {SPLITS}, got {split!r}")
    return split


class SubjectStore:
    """One subject's prepared betas and trial table (``STORE/subjXX.hdf5``).

    The trial table, voxel coordinates and ROIs are read on open; betas are read on demand in chunk-aligned
    row blocks, decoded to float32 and kept in an LRU cache of at most ``cache_bytes`` (0 disables it).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        subject: int,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        expected_datasets: list[str] | None = None,
    ):
        """expected_datasets: the datasets the manifest's integrity record lists for this file; a damaged
        group index that hides some of them (h5py then iterates an empty group) raises
        StoreCorruptionError instead of silently dropping, e.g., the ROIs."""
        import h5py

        self.path = Path(path)
        self.subject = int(subject)
        self.cache_bytes = int(cache_bytes)
        if not self.path.is_file():
            raise DatasetLayoutError(f"missing subject file {self.path} for subject {subject}")
        try:
            with integrity.guard(self.path), h5py.File(self.path, "r") as f:
                attrs = dict(f.attrs)
                missing = [k for k in ("betas", "trials", "voxel_ijk", "affine") if k not in f]
                if missing:
                    raise DatasetLayoutError(
                        f"{self.path} lacks {missing}; expected a file written by prepare"
                    )
                lost = sorted(set(expected_datasets or ()) - set(integrity.dataset_names(f)))
                if lost:
                    raise StoreCorruptionError(
                        f"{self.path} lacks datasets {lost} that manifest.json records: the file is "
                        "damaged — re-copy it or prepare the store again"
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
                self._block_rows = int((f["betas"].chunks or f["betas"].shape)[0] or 1)
                self._scale = float(f["betas"].attrs.get("scale", 1.0))
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
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._handle = None
        self._handle_pid: int | None = None

    def __getstate__(self) -> dict:
        # Pickled into spawned data-loader workers: no HDF5 handle, no cache.
        state = dict(self.__dict__)
        state.update(_handle=None, _handle_pid=None, _cache=OrderedDict(), _cached_bytes=0)
        return state

    def _betas_dataset(self):
        """The open ``betas`` dataset of this process (reopened after a fork: handles are never shared)."""
        import h5py

        if self._handle is None or self._handle_pid != os.getpid():
            self._cache.clear()
            self._cached_bytes = 0
            with integrity.guard(self.path, "betas"):
                self._handle = h5py.File(self.path, "r")
            self._handle_pid = os.getpid()
        return self._handle["betas"]

    def close(self) -> None:
        """Close the HDF5 handle and drop the cache."""
        if self._handle is not None and self._handle_pid == os.getpid():
            self._handle.close()
        self._handle, self._handle_pid = None, None
        self._cache.clear()
        self._cached_bytes = 0

    @property
    def block_rows(self) -> int:
        """Rows per block: the HDF5 chunk height of ``betas``."""
        return self._block_rows

    def _block(self, index: int) -> np.ndarray:
        """float32 (<= block_rows, V): block ``index`` of the betas, from the cache or the file."""
        block = self._cache.get(index)
        if block is not None:
            self._cache.move_to_end(index)
            return block
        start = index * self._block_rows
        stop = min(self.n_trials, start + self._block_rows)
        block = _decode_betas(integrity.read_rows(self._betas_dataset(), start, stop, self.path), self._scale)
        if block.nbytes <= self.cache_bytes:
            self._cache[index] = block
            self._cached_bytes += block.nbytes
            while self._cached_bytes > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.nbytes
        return block

    def iter_blocks(self, rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(positions, betas)`` block by block: ``betas`` float32 (n, V) are the trial rows
        ``rows[positions]`` (all rows if None), in file order; memory is one block plus the cache."""
        rows = np.arange(self.n_trials) if rows is None else np.asarray(rows, dtype=np.int64).ravel()
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_trials):
            raise DatasetLayoutError(f"trial rows must be in 0..{self.n_trials - 1} for {self.path}")
        order = np.argsort(rows, kind="stable")
        blocks = rows[order] // self._block_rows
        bounds = np.flatnonzero(np.diff(blocks)) + 1
        for part in np.split(np.arange(rows.size), bounds) if rows.size else []:
            index = int(blocks[part[0]])
            positions = order[part]
            yield positions, self._block(index)[rows[positions] - index * self._block_rows]

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
        """float32 (T, V) z-scored betas, or (len(rows), V) for the given trial rows (in the order given).

        Read block by block (:meth:`iter_blocks`); the result itself is a new array of the rows asked for.
        """
        rows = np.arange(self.n_trials) if rows is None else np.asarray(rows, dtype=np.int64).ravel()
        out = np.empty((rows.size, self.n_voxels), dtype=np.float32)
        for positions, block in self.iter_blocks(rows):
            out[positions] = block
        return out

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
        for positions, block in self.iter_blocks(rows):
            np.add.at(sums, inverse[positions], block)
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
    """A prepared store folder (see the module docstring); validates its manifest on open.

    cache_bytes: the betas cache of each subject (:class:`SubjectStore`).
    """

    def __init__(self, path: str | os.PathLike, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.path = Path(path).expanduser()
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            raise DatasetLayoutError(
                f"{self.path} is not a prepared store: expected {manifest_path} (run `fmrirecon prepare`)"
            )
        try:
            manifest = read_json(manifest_path)
        except Exception as err:
            raise StoreCorruptionError(f"could not read {manifest_path}: {err}") from err
        if not isinstance(manifest, dict):
            raise StoreCorruptionError(f"{manifest_path} holds no JSON object")
        integrity.check_manifest(manifest, manifest_path)
        if manifest.get("format") != STORE_FORMAT or manifest.get("version") != STORE_VERSION:
            raise DatasetLayoutError(
                f"{manifest_path}: expected format {STORE_FORMAT!r} version {STORE_VERSION}, "
                f"found {manifest.get('format')!r} version {manifest.get('version')}"
            )
        self.manifest = manifest
        self.cache_bytes = int(cache_bytes)
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
            name = subject_file_name(subject)
            recorded = ((self.manifest.get("integrity") or {}).get("files") or {}).get(name)
            self._subjects[subject] = SubjectStore(
                self.path / name,
                subject,
                cache_bytes=self.cache_bytes,
                expected_datasets=list(recorded) if recorded is not None else None,
            )
        return self._subjects[subject]

    @cached_property
    def _stimuli(self) -> tuple[np.ndarray, tuple[int, ...]]:
        import h5py

        path = self.path / "stimuli.hdf5"
        if not path.is_file():
            raise DatasetLayoutError(f"missing {path} in prepared store")
        with integrity.guard(path, "ids_73k"), h5py.File(path, "r") as f:
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
        path = self.path / "stimuli.hdf5"
        with integrity.guard(path, "images"), h5py.File(path, "r") as f:
            return f["images"][unique][inverse]

    def captions(self, ids_73k: np.ndarray) -> list[list[str]]:
        """The 5 captions of each image (0-based 73k ids); missing captions are ''."""
        import h5py

        rows = self._rows(ids_73k)
        unique, inverse = np.unique(rows, return_inverse=True)
        path = self.path / "stimuli.hdf5"
        with integrity.guard(path, "captions"), h5py.File(path, "r") as f:
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
        self.rows = self.subject_store.split_rows(self.split)  # trial rows, read lazily through the cache
        self.image_ids = self.subject_store.trials["image_id_73k"][self.rows]
        self._setup_images(self.image_ids)

    @property
    def betas(self) -> np.ndarray:
        """float32 (n, V): every item's betas at once (reads the whole split; items read only their row)."""
        return self.subject_store.betas(self.rows)

    def __len__(self) -> int:
        return int(self.image_ids.size)

    def __getitem__(self, index: int) -> dict:
        row = self.subject_store.betas(self.rows[index : index + 1])[0]
        return self._item(index, row, self.image_ids[index])


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
