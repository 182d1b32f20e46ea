"""GOD as MinD-Vis ships it: ``sbj_N.npz`` + ``images_256.npz`` (``reference/dataset-formats.md`` §3.2).

Layout (``zjc062/mind-vis`` README, ``data/Kamitani/npz/``)::

    sbj_1.npz ... sbj_5.npz        arr_0 (1200, V) training fMRI, one sample per training image
                                   arr_1 (1750, V) test fMRI, single trials (optional)
                                   arr_2 (50, V)   test fMRI averaged over the 35 repeats
                                   arr_3 (1200,)   index of each training sample into train_images
                                   arr_4 (1750,)   index of each arr_1 row into test_images
                                   arr_5, arr_6    voxel noise ceiling / SNR (not used)
                                   V1 V2 V3 V4 FFA PPA LOC LVC HVC VC   bool (V,) ROI masks
    images_256.npz                 train_images (1200, 256, 256, 3), test_images (50, 256, 256, 3), 0-255
                                   (float in [0, 1] in some copies), in the order of the image tables
    imagenet_training_label.csv    the GOD image tables (imageID_training.csv / imageID_test.csv rows)
    imagenet_testing_label.csv
    imagenet_class_index.json      {"<class>": [wnid, ..., name]} (used for class names when present)

Key meanings from WeizmannVision/SelfSuperReconst ``utils/datasets.py`` (the release MinD-Vis copied);
MinD-Vis reads ``arr_0``, ``arr_2``, ``arr_3``, optionally ``arr_1``, and ``npz[roi]``. Files are read with
``allow_pickle=False``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmrirecon.data.god_stimuli import (
    CROP_RECIPE,
    IMAGE_TABLES,
    MINDVIS_IMAGE_TABLES,
    GodStimuli,
    center_crop_resize,
    class_names_for,
    find_image_tables,
    read_class_names,
    wnid_of,
)
from fmrirecon.data.nsd import N_CAPTIONS
from fmrirecon.errors import DatasetLayoutError

IMAGES_NPZ = "images_256.npz"
CLASS_INDEX = "imagenet_class_index.json"
MINDVIS_ROIS = ("V1", "V2", "V3", "V4", "FFA", "PPA", "LOC", "LVC", "HVC", "VC")


def mindvis_subject_file(root: str | os.PathLike, subject: int) -> Path:
    return Path(root) / f"sbj_{int(subject)}.npz"


def mindvis_subjects_in(root: str | os.PathLike) -> list[int]:
    found = [
        int(m.group(1))
        for p in Path(root).glob("sbj_*.npz")
        if (m := re.fullmatch(r"sbj_(\d+)\.npz", p.name))
    ]
    return sorted(found)


@dataclass
class MindVisSubject:
    """One ``sbj_N.npz``.

    train_betas: float32 (n_train, V); train_images: int (n_train,) rows of train_images;
    test_betas: float32 (n_test, V), single trials (``arr_1``) or, without them, the averages (``arr_2``);
    test_images: int (n_test,) rows of test_images; test_averaged: whether ``test_betas`` are the averages;
    rois: ROI name (``V1`` ... ``VC``) -> bool (V,).
    """

    train_betas: np.ndarray
    train_images: np.ndarray
    test_betas: np.ndarray
    test_images: np.ndarray
    test_averaged: bool
    rois: dict[str, np.ndarray]


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DatasetLayoutError(f"missing MinD-Vis file {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as err:
        raise DatasetLayoutError(
            f"could not read {path} as a numpy .npz: {type(err).__name__}: {err}"
        ) from err


def read_mindvis_subject(path: str | os.PathLike) -> MindVisSubject:
    """Read one MinD-Vis ``sbj_N.npz`` (module docstring); checks shapes and index ranges."""
    path = Path(path)
    d = _load_npz(path)
    missing = [k for k in ("arr_0", "arr_2", "arr_3") if k not in d]
    if missing:
        raise DatasetLayoutError(
            f"{path} lacks {missing}; expected arr_0 (train fMRI), arr_2 (averaged test fMRI), arr_3 (train "
            f"image index) as in MinD-Vis' sbj_N.npz; found {sorted(d)}"
        )
    train = np.asarray(d["arr_0"], dtype=np.float32)
    if train.ndim != 2:
        raise DatasetLayoutError(f"{path}: arr_0 must be (n_train, V), got {train.shape}")
    v = train.shape[1]
    if "arr_1" in d and "arr_4" in d:
        test, test_images, averaged = d["arr_1"], d["arr_4"], False
    else:
        test, averaged = d["arr_2"], True
        test_images = np.arange(len(test))
    test = np.asarray(test, dtype=np.float32)
    train_images = np.asarray(d["arr_3"]).astype(np.int64).ravel()
    test_images = np.asarray(test_images).astype(np.int64).ravel()
    if test.ndim != 2 or test.shape[1] != v:
        raise DatasetLayoutError(f"{path}: test fMRI must be (n, {v}) like arr_0, got {test.shape}")
    if train_images.size != len(train) or test_images.size != len(test):
        raise DatasetLayoutError(
            f"{path}: image indices (arr_3 {train_images.size}, arr_4 {test_images.size}) must have one "
            f"entry per fMRI sample ({len(train)} train, {len(test)} test)"
        )
    rois = {}
    for key, value in d.items():
        if not key.startswith("arr_"):
            mask = np.asarray(value).ravel()
            if mask.size != v:
                raise DatasetLayoutError(f"{path}: ROI mask {key!r} must have {v} entries, got {mask.size}")
            rois[key] = mask.astype(bool)
    return MindVisSubject(train, train_images, test, test_images, averaged, rois)


def read_mindvis_stimuli(
    root: str | os.PathLike,
    *,
    image_size: int | None = None,
    class_names: Mapping[str, str] | None = None,
) -> GodStimuli:
    """``images_256.npz`` (train rows then test rows) with the labels of the image tables beside it.

    The tables are MinD-Vis' ``imagenet_{training,testing}_label.csv`` or GOD's ``imageID_*.csv`` in ``root``;
    class names come from ``class_names`` or else from ``imagenet_class_index.json`` in ``root``.
    """
    root = Path(root)
    d = _load_npz(root / IMAGES_NPZ)
    missing = [k for k in ("train_images", "test_images") if k not in d]
    if missing:
        raise DatasetLayoutError(f"{root / IMAGES_NPZ} lacks {missing}; found {sorted(d)}")
    parts = [_as_uint8(d[k], root / IMAGES_NPZ, k) for k in ("train_images", "test_images")]
    if parts[0].shape[1:] != parts[1].shape[1:]:
        raise DatasetLayoutError(
            f"{root / IMAGES_NPZ}: train_images {parts[0].shape} and test_images {parts[1].shape} "
            "differ in size"
        )
    images = np.concatenate(parts)
    if image_size is not None:
        images = np.stack([center_crop_resize(im, image_size) for im in images])
    names = MINDVIS_IMAGE_TABLES if all((root / n).is_file() for n in MINDVIS_IMAGE_TABLES) else IMAGE_TABLES
    table = find_image_tables([root], names)
    counts = [int((table.table == k).sum()) for k in range(2)]
    if counts != [len(parts[0]), len(parts[1])]:
        raise DatasetLayoutError(
            f"{root}: the image tables list {counts[0]} training and {counts[1]} test images but "
            f"{IMAGES_NPZ} holds "
            f"{len(parts[0])} and {len(parts[1])}"
        )
    if class_names is None and (root / CLASS_INDEX).is_file():
        class_names = read_class_names(root / CLASS_INDEX)
    wnids = wnid_of(table.stimulus_id)
    return GodStimuli(
        images=images,
        stimulus_id=table.stimulus_id,
        file_name=table.file_name,
        wnid=wnids,
        class_name=class_names_for(wnids, class_names),
        captions=np.full((len(images), N_CAPTIONS), "", dtype=object).astype(str),
        source=table.table_names(),
        manifest={
            "images": str((root / IMAGES_NPZ).resolve()),
            "tables": [str(p) for p in table.paths],
            "image_size": image_size,
            "crop": CROP_RECIPE,
        },
    )


def _as_uint8(images: np.ndarray, path: Path, key: str) -> np.ndarray:
    """(n, H, W, 3) 0-255 (or float 0-1) -> uint8."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DatasetLayoutError(f"{path}: {key} must be (n, H, W, 3), got {images.shape}")
    if images.dtype == np.uint8:
        return images
    scale = 255.0 if images.size and np.nanmax(images) <= 1.0 else 1.0  # SelfSuperReconst copies: [0, 1]
    out = np.empty(images.shape, np.uint8)
    for start in range(0, len(images), 64):  # chunks: a float64 copy of all 1250 images would be ~2 GB
        out[start : start + 64] = np.clip(np.rint(images[start : start + 64] * scale), 0, 255)
    return out
