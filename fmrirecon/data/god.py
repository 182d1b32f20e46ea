"""Generic Object Decoding (Horikawa & Kamitani 2017) in the bdpy "BData" HDF5 layout: reader, writer for the
synthetic world, and ``prepare_god`` into the common prepared store.

BData layout (``reference/dataset-formats.md`` §3.1)::

    /dataset               float64 (n_samples, n_columns)   voxels and per-sample labels side by side
    /metadata/key          bytes   (n_keys,)
    /metadata/description  bytes   (n_keys,)
    /metadata/value        float64 (n_keys, n_columns)      1 / value / NaN per column

``select(key)`` means ``dataset[:, metadata.value[key] == 1]``. Voxel columns carry ``VoxelData = 1``,
coordinates ``voxel_x/y/z`` (and ``voxel_i/j/k``) and ROI flags ``ROI_V1 ... ROI_VC``; per-sample columns
are ``DataType`` (1 training perception, 2 test perception, 3 imagery), ``Run``, ``Block`` and
``stimulus_id``, a float ``<WordNet number>.<6-digit image number>`` (``1518878.005958`` <->
``n01518878_5958.JPEG``). Old BrainLiner files use ``dataSet`` / ``metaData``; the reader accepts both.

The synthetic world writes ``SubjectN.h5`` with 1000 + primary category as the "WordNet number" and the
world image index as the image number, plus ``images.hdf5`` (not part of GOD: real GOD images are ImageNet
files that are not redistributed) holding the images and captions by ``stimulus_id``.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmrirecon.data.nsd import zscore_session
from fmrirecon.data.store import STORE_FORMAT, STORE_VERSION, SUBJECT_FORMAT, subject_file_name
from fmrirecon.errors import ConfigError, DatasetLayoutError, SubjectMismatchError
from fmrirecon.io import atomic_path, library_versions, read_json, write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

DATA_TYPES = {1: "training perception", 2: "test perception", 3: "test imagery"}
GOD_ROIS = (
    "ROI_V1",
    "ROI_V2",
    "ROI_V3",
    "ROI_V4",
    "ROI_LOC",
    "ROI_FFA",
    "ROI_PPA",
    "ROI_LVC",
    "ROI_HVC",
    "ROI_VC",
)
SAMPLE_KEYS = ("DataType", "Run", "Block", "stimulus_id")
IMAGE_NUMBER_SCALE = 1e6  # stimulus_id fraction holds a 6-digit image number
SYNTHETIC_SYNSET_BASE = 1000
IMAGES_FILE = "images.hdf5"


def subject_file(root: str | os.PathLike, subject: int) -> Path:
    return Path(root) / f"Subject{int(subject)}.h5"


def stimulus_id(synset: np.ndarray, image_number: np.ndarray) -> np.ndarray:
    """``<synset>.<image number, 6 digits>`` as float64, e.g. ``(1518878, 5958) -> 1518878.005958``."""
    return (
        np.asarray(synset, dtype=np.float64) + np.asarray(image_number, dtype=np.float64) / IMAGE_NUMBER_SCALE
    )


def split_stimulus_id(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`stimulus_id`: (synset int, image number int)."""
    ids = np.asarray(ids, dtype=np.float64)
    synset = np.floor(ids + 0.5 / IMAGE_NUMBER_SCALE).astype(np.int64)
    return synset, np.rint((ids - synset) * IMAGE_NUMBER_SCALE).astype(np.int64)


@dataclass
class GodSubject:
    """One GOD subject read from BData.

    betas: float32 (n_samples, V); data_type, run, block: int (n_samples,); stimulus_id: float64 (n_samples,);
    rois: ROI key -> bool (V,); voxel_xyz: float (V, 3); voxel_ijk: int (V, 3) or None.
    """

    betas: np.ndarray
    data_type: np.ndarray
    run: np.ndarray
    block: np.ndarray
    stimulus_id: np.ndarray
    rois: dict[str, np.ndarray]
    voxel_xyz: np.ndarray
    voxel_ijk: np.ndarray | None


# ---- writer ------------------------------------------------------------------------------------------------


def write_bdata(
    path: str | os.PathLike,
    betas: np.ndarray,
    samples: dict[str, np.ndarray],
    voxel_meta: dict[str, np.ndarray],
    descriptions: dict[str, str] | None = None,
) -> Path:
    """Write a BData HDF5 file.

    betas: (n, V) voxel columns (``VoxelData``); samples: per-sample key -> (n,) (one column each, in order);
    voxel_meta: key -> (V,) values on the voxel columns (``voxel_x``, ``ROI_V1`` ...), NaN on the others.
    """
    import h5py

    betas = np.asarray(betas, dtype=np.float64)
    n, v = betas.shape
    keys = ["VoxelData", *samples, *voxel_meta]
    n_columns = v + len(samples)
    value = np.full((len(keys), n_columns), np.nan)
    value[0, :v] = 1
    dataset = np.empty((n, n_columns))
    dataset[:, :v] = betas
    for c, (key, column) in enumerate(samples.items()):
        column = np.asarray(column, dtype=np.float64)
        if column.shape != (n,):
            raise DatasetLayoutError(f"sample column {key!r} must be ({n},), got {column.shape}")
        dataset[:, v + c] = column
        value[1 + c, v + c] = 1
    for r, (key, values) in enumerate(voxel_meta.items(), start=1 + len(samples)):
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (v,):
            raise DatasetLayoutError(f"voxel metadata {key!r} must be ({v},), got {values.shape}")
        value[r, :v] = values
    descriptions = descriptions or {}
    desc = [descriptions.get(k, f"1 = {k} column" if k in samples or k == "VoxelData" else k) for k in keys]
    with atomic_path(path, suffix=".h5") as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("dataset", data=dataset)
        f.create_dataset("metadata/key", data=np.array([k.encode() for k in keys]))
        f.create_dataset("metadata/description", data=np.array([d.encode() for d in desc]))
        f.create_dataset("metadata/value", data=value)
    return Path(path)


def _god_rois(subject) -> dict[str, np.ndarray]:
    """GOD ROI flags from the simulated subject's NSD-style ROIs (V,) bool."""
    prf = subject.roi_vector("prf-visualrois")
    streams = subject.roi_vector("streams")
    rois = {
        "ROI_V1": np.isin(prf, [1, 2]),
        "ROI_V2": np.isin(prf, [3, 4]),
        "ROI_V3": np.isin(prf, [5, 6]),
        "ROI_V4": prf == 7,
        "ROI_FFA": np.isin(subject.roi_vector("floc-faces"), [2, 3]),
        "ROI_PPA": subject.roi_vector("floc-places") == 2,
        # LOC: lateral occipital = the mid/high lateral stream beyond the retinotopic areas.
        "ROI_LOC": np.isin(streams, [3, 6]),
    }
    rois["ROI_LVC"] = rois["ROI_V1"] | rois["ROI_V2"] | rois["ROI_V3"]
    rois["ROI_HVC"] = rois["ROI_V4"] | rois["ROI_LOC"] | rois["ROI_FFA"] | rois["ROI_PPA"]
    rois["ROI_VC"] = np.ones(subject.n_voxels, bool)
    return rois


def write_synthetic_god(
    out: str | os.PathLike,
    *,
    n_subjects: int = 2,
    n_train: int = 200,
    n_test: int = 10,
    test_repeats: int = 10,
    run_length: int = 50,
    image_size: int = 64,
    seed: int = 0,
    n_voxels_base: int = 2000,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Write the synthetic world as GOD BData files (``Subject1.h5`` ...), ``imageID_{training,test}.csv`` and
    ``images.hdf5``. GOD's design scaled down: training images shown once, test images ``test_repeats`` times
    (1200 x 1 and 50 x 35 in GOD), grouped in runs of ``run_length`` samples.
    """
    import h5py
    from tqdm.auto import tqdm

    from fmrirecon.data.brain import make_subjects
    from fmrirecon.data.world import make_world

    out = Path(out).expanduser()
    for name, value in (("n_subjects", n_subjects), ("n_train", n_train), ("n_test", n_test),
                        ("test_repeats", test_repeats), ("run_length", run_length)):  # fmt: skip
        if int(value) < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise DatasetLayoutError(f"{out} exists and holds other data; pass --force to replace it")
    world = make_world(n_train + n_test, image_size=image_size, seed=seed)
    subjects = make_subjects(n_subjects, seed=seed, n_voxels_base=n_voxels_base)
    synset = SYNTHETIC_SYNSET_BASE + np.asarray(world.primary_category, dtype=np.int64)
    ids = stimulus_id(synset, np.arange(len(world.images)))
    rng = np.random.default_rng([seed, 4242])
    with atomic_path(out, suffix=".partial") as tmp:
        tmp.mkdir()
        for split, rows in (("training", np.arange(n_train)), ("test", np.arange(n_train, n_train + n_test))):
            lines = [f'{ids[r]:.6f},"n{synset[r]:08d}_{r}.JPEG"' for r in rows]
            write_text_atomic(tmp / f"imageID_{split}.csv", "\n".join(lines) + "\n")
        with h5py.File(tmp / IMAGES_FILE, "w") as f:
            f.create_dataset("images", data=world.images)
            f.create_dataset("stimulus_id", data=ids)
            f.create_dataset(
                "captions", data=np.array(world.captions, dtype=object), dtype=h5py.string_dtype()
            )
        for subject in tqdm(subjects, desc="GOD subjects", disable=not progress):
            order_train = rng.permutation(n_train)
            order_test = np.concatenate([n_train + rng.permutation(n_test) for _ in range(test_repeats)])
            image_rows = np.concatenate([order_train, order_test])
            data_type = np.concatenate([np.ones(n_train, int), np.full(order_test.size, 2)])
            run = np.concatenate([np.arange(n_train) // run_length, np.arange(order_test.size) // run_length])
            run += (
                np.concatenate([np.zeros(n_train, int), np.full(order_test.size, run[n_train - 1] + 1)]) + 1
            )
            block = np.arange(image_rows.size) % run_length + 1
            betas = subject.measure(world.images[image_rows], run, rng)
            xyz = subject.voxel_ijk @ subject.affine[:3, :3].T + subject.affine[:3, 3]
            voxel_meta = {
                "voxel_x": xyz[:, 0],
                "voxel_y": xyz[:, 1],
                "voxel_z": xyz[:, 2],
                "voxel_i": subject.voxel_ijk[:, 0],
                "voxel_j": subject.voxel_ijk[:, 1],
                "voxel_k": subject.voxel_ijk[:, 2],
            }
            voxel_meta.update({k: v.astype(np.float64) for k, v in _god_rois(subject).items()})
            samples = {"DataType": data_type, "Run": run, "Block": block, "stimulus_id": ids[image_rows]}
            write_bdata(subject_file(tmp, subject.subject), betas, samples, voxel_meta)
        write_json_atomic(
            tmp / "fmrirecon_world.json",
            {
                "format": "fmrirecon-world",
                "version": 1,
                "layout": "god",
                "params": {
                    "n_subjects": n_subjects,
                    "n_train": n_train,
                    "n_test": n_test,
                    "test_repeats": test_repeats,
                    "image_size": image_size,
                    "seed": seed,
                    "n_voxels_base": n_voxels_base,
                },
                "subjects": [{"subject": s.subject, "spec": s.spec} for s in subjects],
            },
        )
    return out


# ---- reader ------------------------------------------------------------------------------------------------


def subjects_in(root: str | os.PathLike) -> list[int]:
    root = Path(root)
    found = [
        int(m.group(1)) for p in root.glob("Subject*.h5") if (m := re.fullmatch(r"Subject(\d+)\.h5", p.name))
    ]
    return sorted(found)


def read_god(path: str | os.PathLike) -> GodSubject:
    """Read one BData file with bdpy's rules (``select(key)`` = the columns where the key's value is 1)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise DatasetLayoutError(f"missing GOD BData file: expected {path}")
    try:
        with h5py.File(path, "r") as f:
            data_name = "dataset" if "dataset" in f else "dataSet" if "dataSet" in f else None
            meta_name = "metadata" if "metadata" in f else "metaData" if "metaData" in f else None
            if data_name is None or meta_name is None:
                raise DatasetLayoutError(
                    f"{path} is not a BData file: expected /dataset and /metadata (or dataSet/metaData), "
                    f"found {sorted(f.keys())}"
                )
            dataset = f[data_name][()]
            keys = [k.decode() if isinstance(k, bytes) else str(k) for k in f[meta_name]["key"][()]]
            value = f[meta_name]["value"][()]
    except DatasetLayoutError:
        raise
    except Exception as err:
        raise DatasetLayoutError(f"could not read GOD BData {path}: {type(err).__name__}: {err}") from err
    if value.shape != (len(keys), dataset.shape[1]):
        raise DatasetLayoutError(
            f"{path}: metadata/value must be (n_keys={len(keys)}, n_columns={dataset.shape[1]}), "
            f"got {value.shape}"
        )
    meta = dict(zip(keys, value))

    def column(key: str) -> np.ndarray:
        if key not in meta:
            raise DatasetLayoutError(f"{path}: metadata key {key!r} missing; keys found: {keys}")
        cols = np.flatnonzero(meta[key] == 1)
        if cols.size != 1:
            raise DatasetLayoutError(f"{path}: key {key!r} must mark exactly one column, marks {cols.size}")
        return dataset[:, cols[0]]

    voxel_cols = np.flatnonzero(meta.get("VoxelData", np.zeros(0)) == 1)
    if voxel_cols.size == 0:
        raise DatasetLayoutError(f"{path}: no column is marked VoxelData = 1")
    rois = {k: meta[k][voxel_cols] == 1 for k in keys if k.startswith("ROI_")}
    xyz = (
        np.stack([meta[k][voxel_cols] for k in ("voxel_x", "voxel_y", "voxel_z")], 1)
        if "voxel_x" in meta
        else None
    )
    ijk = None
    if all(k in meta for k in ("voxel_i", "voxel_j", "voxel_k")):
        ijk = np.stack([meta[k][voxel_cols] for k in ("voxel_i", "voxel_j", "voxel_k")], 1).astype(np.int64)
    return GodSubject(
        betas=dataset[:, voxel_cols].astype(np.float32),
        data_type=column("DataType").astype(np.int64),
        run=column("Run").astype(np.int64),
        block=column("Block").astype(np.int64) if "Block" in meta else np.zeros(len(dataset), np.int64),
        stimulus_id=column("stimulus_id") if "stimulus_id" in meta else column("Label"),
        rois=rois,
        voxel_xyz=np.zeros((voxel_cols.size, 3)) if xyz is None else xyz,
        voxel_ijk=ijk,
    )


# ---- prepare -----------------------------------------------------------------------------------------------

FORMATS = ("bdata", "mindvis")


@dataclass
class _PreparedSubject:
    """One subject ready for the store: betas float32 (T, V) z-scored; trials: TRIAL_FIELDS -> (T,);
    voxel_ijk int (V, 3); affine (4, 4); rois name -> bool (V,); n_sessions; normalisation (text)."""

    betas: np.ndarray
    trials: dict[str, np.ndarray]
    voxel_ijk: np.ndarray
    affine: np.ndarray
    rois: dict[str, np.ndarray]
    n_sessions: int
    normalisation: str


def prepare_god(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    subjects: Sequence[int] | None = None,
    roi: str = "ROI_VC",
    images: str | os.PathLike | None = None,
    image_size: int | None = None,
    class_names: str | os.PathLike | None = None,
    format: str = "bdata",
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Prepare GOD into the common store layout (``fmrirecon.data.store``).

    format ``"bdata"``: ``SubjectN.h5`` BData files in ``root``. Stimuli come from ``images`` when given — the
    ImageNet files named in ``imageID_training.csv`` / ``imageID_test.csv`` (read from ``root``, else from
    ``images``), found in any sub-folder of ``images``, centre-cropped and resized to ``image_size`` (default
    256, :data:`fmrirecon.data.god_stimuli.DEFAULT_IMAGE_SIZE`) by
    :func:`fmrirecon.data.god_stimuli.center_crop_resize` — else from the synthetic world's ``images.hdf5``
    (native size unless ``image_size``). Split: DataType 1 -> train, DataType 2 -> test ("shared"); imagery
    (DataType 3) is left out. Betas are z-scored per voxel within each run.

    format ``"mindvis"``: MinD-Vis' ``sbj_N.npz`` + ``images_256.npz`` + label tables in ``root``
    (:mod:`fmrirecon.data.god_mindvis`); ``roi`` ``ROI_VC`` reads the npz mask ``VC``. The npz has no runs, so
    the training samples and the test samples are each one z-scoring block (sessions 1 and 2).

    Image id ``r`` of the store is row ``r`` of the training table followed by the test table (of
    ``images.hdf5`` for the synthetic world). ``stimuli.hdf5`` also records each image's ``stimulus_id``,
    ``file_name``, WordNet id ``wnid`` and ``class_name`` (from the ``class_names`` table file, "" otherwise;
    :func:`fmrirecon.data.god_stimuli.read_stimulus_labels`).
    """
    from tqdm.auto import tqdm

    from fmrirecon.data.god_stimuli import read_class_names, write_store_stimuli
    from fmrirecon.data.integrity import seal_store

    root, out = Path(root).expanduser(), Path(out).expanduser()
    if format not in FORMATS:
        raise ConfigError(f"GOD format must be one of {FORMATS}, got {format!r}")
    if image_size is not None and int(image_size) < 1:
        raise ConfigError(f"image_size must be >= 1, got {image_size}")
    if format == "mindvis" and images is not None:
        raise ConfigError("--images reads BData + JPEG stimuli; the MinD-Vis format takes its images_256.npz")
    if not root.is_dir():
        raise DatasetLayoutError(f"GOD root {root} is not a folder")
    request = {
        "kind": "god",
        "root": str(root.resolve()),
        "subjects": subjects and [int(s) for s in subjects],
        "roi": roi,
    }
    # Only non-default choices enter the request, so stores prepared before these options still match.
    extra = {
        "format": format if format != "bdata" else None,
        "images": str(Path(images).expanduser().resolve()) if images is not None else None,
        "image_size": image_size,
        "class_names": str(Path(class_names).expanduser().resolve()) if class_names is not None else None,
    }
    request.update({k: v for k, v in extra.items() if v is not None})
    if out.exists() and not force:
        manifest_path = out / "manifest.json"
        if manifest_path.is_file() and read_json(manifest_path).get("request") == request:
            logger.info("%s is already prepared with these settings; nothing to do", out)
            return out
        raise DatasetLayoutError(f"{out} exists with other content or settings; pass --force to replace it")
    if format == "bdata":
        available, file_of = subjects_in(root), subject_file
    else:
        from fmrirecon.data.god_mindvis import mindvis_subject_file, mindvis_subjects_in

        available, file_of = mindvis_subjects_in(root), mindvis_subject_file
    if not available:
        expected = "SubjectN.h5 (BData)" if format == "bdata" else "sbj_N.npz (MinD-Vis)"
        raise DatasetLayoutError(f"no GOD subject files in {root}: expected {expected}")
    chosen = [int(s) for s in subjects] if subjects else available
    for s in chosen:
        if s not in available:
            raise SubjectMismatchError(
                f"unknown GOD subject {s}: expected {file_of(root, s)}; found subjects {available}"
            )
    class_table = read_class_names(class_names) if class_names is not None else None
    start = time.perf_counter()
    stimuli = _god_stimuli(root, format, images, image_size, class_table, progress)
    world_path = root / "fmrirecon_world.json"
    sessions: dict[str, int] = {}
    with atomic_path(out, suffix=".partial") as tmp:
        tmp.mkdir()
        for s in tqdm(chosen, desc="GOD subjects", disable=not progress):
            if format == "bdata":
                prepared = _bdata_subject(subject_file(root, s), roi, stimuli)
            else:
                prepared = _mindvis_subject(file_of(root, s), roi, stimuli)
            sessions[str(s)] = prepared.n_sessions
            _write_subject(tmp / subject_file_name(s), s, roi, prepared)
        write_store_stimuli(tmp / "stimuli.hdf5", stimuli)
        # Checksummed datasets + per-dataset digests in the manifest (rewrites the files written unchecked).
        seal_store(
            tmp,
            {
                "format": STORE_FORMAT,
                "version": STORE_VERSION,
                "source": {"kind": "god", "root": str(root.resolve()), "format": format},
                "subjects": chosen,
                "sessions": sessions,
                "roi": roi,
                "stimuli": stimuli.manifest,
                "world": read_json(world_path) if world_path.is_file() else None,
                "request": request,
                "versions": library_versions(),
                "seconds": round(time.perf_counter() - start, 3),
            },
        )
    return out


def _god_stimuli(root: Path, format: str, images, image_size, class_table, progress: bool):
    from fmrirecon.data import god_stimuli

    if format == "mindvis":
        from fmrirecon.data.god_mindvis import read_mindvis_stimuli

        return read_mindvis_stimuli(root, image_size=image_size, class_names=class_table)
    if images is not None:
        images = Path(images).expanduser()
        table = god_stimuli.find_image_tables([root, images])
        return god_stimuli.stimuli_from_folder(
            table, images, image_size=image_size, class_names=class_table, progress=progress
        )
    if not (root / IMAGES_FILE).is_file():
        raise DatasetLayoutError(
            f"no stimuli for {root}: pass --images DIR (the ImageNet files named in imageID_training.csv / "
            f"imageID_test.csv), or use the synthetic world's {IMAGES_FILE} (missing: {root / IMAGES_FILE})"
        )
    return god_stimuli.stimuli_from_images_hdf5(
        root / IMAGES_FILE, image_size=image_size, class_names=class_table
    )


def _bdata_subject(path: Path, roi: str, stimuli) -> _PreparedSubject:
    from fmrirecon.data.god_stimuli import match_stimulus_ids

    data = read_god(path)
    if roi not in data.rois:
        raise DatasetLayoutError(f"{path} has no ROI {roi!r}; found {sorted(data.rois)}")
    keep = np.isin(data.data_type, [1, 2])
    voxels = data.rois[roi]
    betas = data.betas[keep][:, voxels]
    run = data.run[keep]
    if not np.isfinite(betas).all():
        raise DatasetLayoutError(f"{path} holds non-finite betas in {roi}")
    for r in np.unique(run):
        betas[run == r] = zscore_session(betas[run == r])
    rows = match_stimulus_ids(data.stimulus_id[keep], stimuli, path)
    ijk = data.voxel_ijk[voxels] if data.voxel_ijk is not None else np.zeros((int(voxels.sum()), 3), int)
    trials = {
        "image_id_73k": rows,
        "session": run,
        "repeat": _repeat_index(rows),
        "shared": data.data_type[keep] == 2,
        "global_trial": np.arange(rows.size),
        "trial_in_session": data.block[keep] - 1,
    }
    return _PreparedSubject(
        betas=betas,
        trials=trials,
        voxel_ijk=ijk,
        affine=_affine_from(ijk, data.voxel_xyz[voxels]),
        rois={name: mask[voxels] for name, mask in data.rois.items()},
        n_sessions=int(np.unique(run).size),
        normalisation="z-score per voxel within each run",
    )


def _mindvis_subject(path: Path, roi: str, stimuli) -> _PreparedSubject:
    from fmrirecon.data.god_mindvis import read_mindvis_subject

    data = read_mindvis_subject(path)
    key = roi[len("ROI_") :] if roi.startswith("ROI_") else roi
    if key not in data.rois:
        raise DatasetLayoutError(f"{path} has no ROI {key!r} (asked for {roi!r}); found {sorted(data.rois)}")
    n_train = int((stimuli.source == stimuli.source[0]).sum())
    for name, index, limit in (("arr_3", data.train_images, n_train),
                               ("arr_4", data.test_images, len(stimuli.stimulus_id) - n_train)):  # fmt: skip
        if index.size and (index.min() < 0 or index.max() >= limit):
            raise DatasetLayoutError(
                f"{path}: {name} indexes images 0..{limit - 1}, found {index.min()}..{index.max()}"
            )
    voxels = data.rois[key]
    blocks = [data.train_betas[:, voxels], data.test_betas[:, voxels]]
    if not all(np.isfinite(b).all() for b in blocks):
        raise DatasetLayoutError(f"{path} holds non-finite fMRI values in {key}")
    rows = np.concatenate([data.train_images, n_train + data.test_images])
    n = [len(b) for b in blocks]
    trials = {
        "image_id_73k": rows,
        "session": np.repeat([1, 2], n),
        "repeat": _repeat_index(rows),
        "shared": np.repeat([False, True], n),
        "global_trial": np.arange(rows.size),
        "trial_in_session": np.concatenate([np.arange(k) for k in n]),
    }
    test = "averaged test samples (arr_2)" if data.test_averaged else "single test trials (arr_1)"
    return _PreparedSubject(
        betas=np.concatenate([zscore_session(b) for b in blocks]),
        trials=trials,
        voxel_ijk=np.zeros((int(voxels.sum()), 3), np.int64),
        affine=np.eye(4),
        rois={f"ROI_{name}": mask[voxels] for name, mask in data.rois.items()},
        n_sessions=2,
        normalisation=f"z-score per voxel within the training samples and within the {test}",
    )


def _repeat_index(rows: np.ndarray) -> np.ndarray:
    """0-based presentation count of each trial's image up to that trial; int64 (T,)."""
    repeat = np.zeros(rows.size, np.int64)
    counts: dict[int, int] = {}
    for n, image in enumerate(rows.tolist()):
        repeat[n] = counts.get(image, 0)
        counts[image] = repeat[n] + 1
    return repeat


def _write_subject(path: Path, subject: int, roi: str, prepared: _PreparedSubject) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs.update(
            {
                "format": SUBJECT_FORMAT,
                "subject": subject,
                "n_sessions": prepared.n_sessions,
                "roi": roi,
                "normalisation": prepared.normalisation,
            }
        )
        f.create_dataset("betas", data=prepared.betas.astype(np.float32))
        for name, values in prepared.trials.items():
            f.create_dataset(f"trials/{name}", data=values)
        f.create_dataset("voxel_ijk", data=prepared.voxel_ijk.astype(np.int32))
        f.create_dataset("affine", data=prepared.affine)
        for name, mask in prepared.rois.items():
            f.create_dataset(f"rois/{name}", data=mask.astype(np.int16))


def _affine_from(ijk: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Voxel-to-world affine fitted from voxel_i/j/k and voxel_x/y/z (identity if they do not fix it)."""
    if len(ijk) < 4 or not np.isfinite(xyz).all():
        return np.eye(4)
    design = np.hstack([ijk, np.ones((len(ijk), 1))])
    coef, *_ = np.linalg.lstsq(design, xyz, rcond=None)
    affine = np.eye(4)
    affine[:3, :] = coef.T
    return affine
