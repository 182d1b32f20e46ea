"""GOD stimuli as users hold them: the image tables, the ImageNet JPEG files, WordNet labels.

Real GOD (Horikawa & Kamitani 2017) ships no images. Users have the five ``SubjectN.h5`` BData files, the two
tables of the GenericObjectDecoding repository (``reference/dataset-formats.md`` §3.1)::

    imageID_training.csv   1200 rows   1518878.010042,"n01518878_10042.JPEG"
    imageID_test.csv         50 rows   <stimulus_id>,"<file name>"     (no header)

and, on request from the authors, the ImageNet images named in the second column. This module reads the
tables, finds the files below a folder (any sub-folders), decodes them with the field's centre crop + resize
(:func:`center_crop_resize`) and labels every image with its WordNet id (``n01518878``) and, where an offline
table is given, a class name. Image ``r`` of the store is row ``r`` of the training table followed by the
test table, the order of MinD-Vis' ``images_256.npz`` (§3.2) and of the synthetic world's ``images.hdf5``.

Store additions (``STORE/stimuli.hdf5``, next to ``images`` / ``ids_73k`` / ``captions``)::

    stimulus_id float64 (N,)   GOD's <WordNet number>.<6-digit image number>
    file_name   str (N,)       the file name of the image table (``n01518878_10042.JPEG``)
    wnid        str (N,)       WordNet id (``n01518878``)
    class_name  str (N,)       from the class-name table, "" where none is known
    attrs       image_source, crop

read back with :func:`read_stimulus_labels`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmrirecon.data.god import split_stimulus_id
from fmrirecon.data.nsd import N_CAPTIONS
from fmrirecon.errors import DatasetLayoutError

logger = logging.getLogger(__name__)

# GenericObjectDecoding ``data/imageID_{training,test}.csv``; training rows come first in the store.
IMAGE_TABLES = ("imageID_training.csv", "imageID_test.csv")
# The same tables as MinD-Vis names them beside its npz files (``zjc062/mind-vis`` ``code/dataset.py``).
MINDVIS_IMAGE_TABLES = ("imagenet_training_label.csv", "imagenet_testing_label.csv")
# MinD-Vis' ``images_256.npz`` (the GOD images most reconstruction work trains on) are 256 px squares.
DEFAULT_IMAGE_SIZE = 256
# Files whose stem matches a table name are accepted with any of these suffixes (ImageNet's is ``.JPEG``).
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".webp")
CROP_RECIPE = (
    "centre square crop of the shorter side, offsets floor((W-s)/2), floor((H-s)/2), then PIL bicubic resize "
    "to size x size; grey images replicated to RGB (Beliy et al. 2019, WeizmannVision/ssfmri2im "
    "kamitani_image_prepare.py image_prepare)"
)
_STIMULUS_ID_TOLERANCE = 0.5e-6  # half the last digit of the 6-digit image number
_WNID = re.compile(r"(n\d{8})_(\d+)")


@dataclass
class ImageTable:
    """The GOD image list: every row of the training table, then every row of the test table.

    stimulus_id: float64 (N,); file_name: str (N,); table: int (N,) index into ``paths`` of each row's table.
    """

    stimulus_id: np.ndarray
    file_name: np.ndarray
    table: np.ndarray
    paths: tuple[Path, ...]

    def __len__(self) -> int:
        return int(self.stimulus_id.size)

    def table_names(self) -> np.ndarray:
        """str (N,): the file name of the table each row came from."""
        return np.array([p.name for p in self.paths])[self.table]


@dataclass
class GodStimuli:
    """Stimulus images of a GOD store with their labels; row ``r`` is the store's image id ``r``.

    images: uint8 (N, H, W, 3); stimulus_id: float64 (N,); file_name, wnid, class_name: str (N,);
    captions: str (N, 5) ("" where the source has none); source: names of the rows' origin for errors
    (str (N,)); manifest: JSON-able description of where the images came from and how they were resized.
    """

    images: np.ndarray
    stimulus_id: np.ndarray
    file_name: np.ndarray
    wnid: np.ndarray
    class_name: np.ndarray
    captions: np.ndarray
    source: np.ndarray
    manifest: dict = field(default_factory=dict)


# ---- ids and labels ----------------------------------------------------------------------------------------


def wnid_of(stimulus_id: np.ndarray) -> np.ndarray:
    """WordNet ids of GOD stimulus ids: ``1518878.005958 -> 'n01518878'``; str (N,)."""
    synset, _ = split_stimulus_id(np.atleast_1d(stimulus_id))
    return np.array([f"n{int(s):08d}" for s in synset], dtype=object).astype(str)


def god_file_name(stimulus_id: np.ndarray) -> np.ndarray:
    """GOD's file name of each stimulus id: ``1518878.005958 -> 'n01518878_5958.JPEG'``; str (N,)."""
    synset, number = split_stimulus_id(np.atleast_1d(stimulus_id))
    return np.array([f"n{int(s):08d}_{int(k)}.JPEG" for s, k in zip(synset, number)], dtype=object).astype(
        str
    )


def read_image_table(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One ``imageID_*.csv``: rows ``<stimulus_id>,"<file name>"`` -> (float64 (n,), str (n,))."""
    path = Path(path)
    if not path.is_file():
        raise DatasetLayoutError(f"missing GOD image table {path}")
    ids, names = [], []
    with path.open(newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip():
                continue
            try:
                value = float(row[0])
            except ValueError:
                if line == 1:  # tolerate a header row
                    continue
                raise DatasetLayoutError(
                    f"{path} line {line}: expected '<stimulus_id>,<file name>' "
                    f'(e.g. 1518878.010042,"n01518878_10042.JPEG"), got {row}'
                ) from None
            if len(row) < 2 or not row[1].strip():
                raise DatasetLayoutError(f"{path} line {line}: no file name after stimulus_id {row[0]}")
            ids.append(value)
            names.append(row[1].strip())
    if not ids:
        raise DatasetLayoutError(f"{path} lists no images")
    return np.asarray(ids, dtype=np.float64), np.asarray(names, dtype=object).astype(str)


def find_image_tables(
    folders: Sequence[str | os.PathLike], names: Sequence[str] = IMAGE_TABLES
) -> ImageTable:
    """Read the training and test tables (``names``), each from the first of ``folders`` that holds it.

    Raises DatasetLayoutError naming the folders searched when a table is missing, and when a file name
    disagrees with its stimulus_id (``1518878.005958`` must be ``n01518878_5958.*``).
    """
    folders = [Path(f) for f in folders]
    paths, ids, file_names, table = [], [], [], []
    for k, name in enumerate(names):
        found = next((f / name for f in folders if (f / name).is_file()), None)
        if found is None:
            raise DatasetLayoutError(
                f"missing GOD image table {name}: looked in {[str(f) for f in folders]} "
                f'(GenericObjectDecoding\'s data/{name}, lines like 1518878.010042,"n01518878_10042.JPEG")'
            )
        i, n = read_image_table(found)
        paths.append(found)
        ids.append(i)
        file_names.append(n)
        table.append(np.full(i.size, k))
    result = ImageTable(np.concatenate(ids), np.concatenate(file_names), np.concatenate(table), tuple(paths))
    _check_names_match_ids(result)
    return result


def _check_names_match_ids(table: ImageTable) -> None:
    expected = god_file_name(table.stimulus_id)
    for row, (name, want) in enumerate(zip(table.file_name, expected)):
        match = _WNID.match(Path(name).stem)
        if match and f"{match.group(1)}_{int(match.group(2))}" != Path(want).stem:
            raise DatasetLayoutError(
                f"{table.paths[table.table[row]]}: file name {name!r} disagrees with its stimulus_id "
                f"{table.stimulus_id[row]:.6f} (which names {want!r})"
            )


def read_class_names(path: str | os.PathLike) -> dict[str, str]:
    """A WordNet id -> class name table read from a local file (nothing is downloaded).

    Accepted forms: JSON ``{"<index>": ["n01440764", ..., "tench"]}`` (Keras / MinD-Vis
    ``imagenet_class_index.json``: every element but the last is a WordNet id, the last the name) or
    ``{"n01440764": "tench"}``; text lines ``n01440764 tench, Tinca tinca`` (``synset_words.txt``,
    ``LOC_synset_mapping.txt``, tab-separated ``words.txt``).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetLayoutError(f"missing class-name table {path}")
    text = path.read_text(encoding="utf-8")
    names: dict[str, str] = {}
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DatasetLayoutError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(data, Mapping):
            raise DatasetLayoutError(f"{path}: expected a JSON object, got {type(data).__name__}")
        for key, value in data.items():
            if isinstance(value, str) and re.fullmatch(r"n\d{8}", key):
                names[key] = value
            elif isinstance(value, list) and len(value) >= 2 and all(isinstance(v, str) for v in value):
                for wnid in value[:-1]:
                    names.setdefault(wnid, value[-1])
            else:
                raise DatasetLayoutError(
                    f"{path}: entry {key!r} must be [wnid, ..., name] or a wnid key with a name, "
                    f"got {value!r}"
                )
    else:
        for line in text.splitlines():
            parts = line.strip().split(None, 1)
            if len(parts) == 2 and re.fullmatch(r"n\d{8}", parts[0]):
                names[parts[0]] = parts[1].strip()
    if not names:
        raise DatasetLayoutError(
            f"{path} holds no WordNet id -> name entries (expected imagenet_class_index.json or "
            "'n01440764 tench' lines)"
        )
    return names


def class_names_for(wnids: np.ndarray, table: Mapping[str, str] | None) -> np.ndarray:
    """Class name of each WordNet id, "" where ``table`` (or no table) has none; str (N,)."""
    table = table or {}
    return np.array([table.get(str(w), "") for w in wnids], dtype=object).astype(str)


# ---- images ------------------------------------------------------------------------------------------------


def center_crop_resize(image: np.ndarray, size: int | None) -> np.ndarray:
    """The field's GOD stimulus recipe: uint8 (H, W) or (H, W, C) -> uint8 (size, size, 3).

    Centre square crop of side ``s = min(H, W)`` at offsets ``floor((W - s) / 2)``, ``floor((H - s) / 2)``,
    then a PIL bicubic resize to ``size`` (no resize when ``size`` is None); grey images are replicated to
    three channels. Source: Beliy et al. 2019 (``WeizmannVision/ssfmri2im``
    ``KamitaniData/kamitani_image_prepare.py``, ``image_prepare``: "center crop and resize", scipy
    ``imresize(interp='cubic')``, i.e. PIL bicubic), whose GOD image files SelfSuperReconst and MinD-Vis
    (``images_256.npz``) took over. That code's slice keeps one extra row or column when the excess is
    >= 2 px (a non-square crop); the square crop here is what it means to do.
    """
    from PIL import Image

    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.ndim != 3 or image.shape[2] < 3 or image.dtype != np.uint8:
        raise DatasetLayoutError(f"expected a uint8 (H, W[, 3]) image, got {image.dtype} {image.shape}")
    return _crop_resize_pil(Image.fromarray(np.ascontiguousarray(image[:, :, :3])), size)


def _crop_resize_pil(im, size: int | None) -> np.ndarray:
    from PIL import Image

    im = im.convert("RGB")  # L, P, CMYK (a few ImageNet JPEGs), RGBA -> RGB
    width, height = im.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    im = im.crop((left, top, left + side, top + side))
    if size is not None and size != side:
        im = im.resize((int(size), int(size)), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def load_stimulus(path: str | os.PathLike, size: int | None) -> np.ndarray:
    """Decode one stimulus file and apply :func:`center_crop_resize`; uint8 (size, size, 3).

    Raises DatasetLayoutError naming the file when it cannot be decoded (truncated, not an image).
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            return _crop_resize_pil(im, size)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DatasetLayoutError(f"cannot decode stimulus image {path}: {type(err).__name__}: {err}") from err


def locate_stimuli(images_dir: str | os.PathLike, file_names: Sequence[str], tables: str = "") -> list[Path]:
    """Find each file name below ``images_dir`` (any depth); returns one path per name, in order.

    A name matches a file of the same name, or else a file with the same stem and another image suffix
    (``n01518878_5958.jpg`` for ``n01518878_5958.JPEG``). When a name occurs in several folders the first in
    sorted order is used (with a warning). Missing files raise DatasetLayoutError with the count and the first
    few names.
    """
    root = Path(images_dir).expanduser()
    if not root.is_dir():
        raise DatasetLayoutError(
            f"stimulus image folder {root} does not exist (expected a folder of JPEG files)"
        )
    wanted = set(file_names)
    wanted_stems = {Path(n).stem for n in file_names}
    exact: dict[str, list[Path]] = {}
    by_stem: dict[str, list[Path]] = {}
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            if name in wanted:
                exact.setdefault(name, []).append(Path(folder) / name)
            stem, suffix = os.path.splitext(name)
            if stem in wanted_stems and suffix.lower() in IMAGE_SUFFIXES:
                by_stem.setdefault(stem, []).append(Path(folder) / name)
    paths, missing, duplicated = [], [], 0
    for name in file_names:
        found = exact.get(name) or by_stem.get(Path(name).stem)
        if not found:
            missing.append(name)
            continue
        duplicated += len(found) > 1
        paths.append(found[0])
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DatasetLayoutError(
            f"{len(missing)} of {len(file_names)} stimulus images named in {tables or 'the image tables'} "
            f"were not found under {root} (searched all sub-folders): {shown}"
        )
    if duplicated:
        logger.warning(
            "%d stimulus names occur in several folders under %s; the first is used", duplicated, root
        )
    return paths


def stimuli_from_folder(
    table: ImageTable,
    images_dir: str | os.PathLike,
    *,
    image_size: int | None = DEFAULT_IMAGE_SIZE,
    class_names: Mapping[str, str] | None = None,
    progress: bool = True,
) -> GodStimuli:
    """The table's images decoded from ``images_dir`` by :func:`center_crop_resize`, with their labels."""
    from tqdm.auto import tqdm

    size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    tables = " / ".join(p.name for p in table.paths)
    paths = locate_stimuli(images_dir, list(table.file_name), tables)
    images = np.empty((len(table), size, size, 3), np.uint8)
    for row, path in enumerate(tqdm(paths, desc="GOD stimuli", disable=not progress)):
        images[row] = load_stimulus(path, size)
    wnids = wnid_of(table.stimulus_id)
    return GodStimuli(
        images=images,
        stimulus_id=table.stimulus_id,
        file_name=table.file_name,
        wnid=wnids,
        class_name=class_names_for(wnids, class_names),
        captions=np.full((len(table), N_CAPTIONS), "", dtype=object).astype(str),
        source=table.table_names(),
        manifest={
            "images": str(Path(images_dir).expanduser().resolve()),
            "tables": [str(p) for p in table.paths],
            "image_size": size,
            "crop": CROP_RECIPE,
        },
    )


def stimuli_from_images_hdf5(
    path: str | os.PathLike,
    *,
    image_size: int | None = None,
    class_names: Mapping[str, str] | None = None,
) -> GodStimuli:
    """The synthetic world's ``images.hdf5`` (``images`` uint8 (N, H, W, 3), ``stimulus_id`` (N,), optional
    ``captions`` (N, 5)); resized with :func:`center_crop_resize` when ``image_size`` is given."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise DatasetLayoutError(f"missing {path} (images and captions by stimulus_id)")
    with h5py.File(path, "r") as f:
        missing = [k for k in ("images", "stimulus_id") if k not in f]
        if missing:
            raise DatasetLayoutError(
                f"{path} lacks {missing}; expected images (N, H, W, 3) and stimulus_id (N,)"
            )
        ids = f["stimulus_id"][()].astype(np.float64)
        images = f["images"][()]
        n = len(ids)
        captions = f["captions"].asstr()[()] if "captions" in f else np.full((n, N_CAPTIONS), "")
    if image_size is not None:
        images = np.stack([center_crop_resize(im, image_size) for im in images]) if n else images
    wnids = wnid_of(ids)
    return GodStimuli(
        images=images,
        stimulus_id=ids,
        file_name=god_file_name(ids),
        wnid=wnids,
        class_name=class_names_for(wnids, class_names),
        captions=np.asarray(captions, dtype=object).astype(str),
        source=np.full(n, path.name),
        manifest={"images": str(path.resolve()), "image_size": image_size, "crop": CROP_RECIPE},
    )


# ---- matching samples to images ----------------------------------------------------------------------------


def match_stimulus_ids(sample_ids: np.ndarray, stimuli: GodStimuli, where: str | os.PathLike) -> np.ndarray:
    """Store image id (row of ``stimuli``) of each sample's stimulus_id, compared at the 6-digit precision.

    sample_ids: float64 (n,) -> int64 (n,). Raises DatasetLayoutError when a source table (e.g.
    ``imageID_test.csv``) matches no sample at all (wrong table, or ids written with another precision), and
    when samples have ids that no image carries (the count and the first few ids).
    """
    sample_ids = np.asarray(sample_ids, dtype=np.float64)
    image_ids = stimuli.stimulus_id
    if image_ids.size == 0:
        raise DatasetLayoutError(f"no stimulus images to match the samples of {where} to")
    order = np.argsort(image_ids)
    sorted_ids = image_ids[order]
    pos = np.clip(np.searchsorted(sorted_ids, sample_ids), 0, sorted_ids.size - 1)
    left = np.clip(pos - 1, 0, sorted_ids.size - 1)
    best = np.where(np.abs(sorted_ids[left] - sample_ids) < np.abs(sorted_ids[pos] - sample_ids), left, pos)
    rows = order[best]
    bad = np.abs(image_ids[rows] - sample_ids) > _STIMULUS_ID_TOLERANCE
    matched = np.zeros(image_ids.size, bool)
    matched[rows[~bad]] = True
    for source in dict.fromkeys(stimuli.source.tolist()):
        of_source = stimuli.source == source
        if not matched[of_source].any():
            first = image_ids[of_source][:3]
            raise DatasetLayoutError(
                f"{source}: none of its {int(of_source.sum())} stimulus ids "
                f"({', '.join(f'{x:.6f}' for x in first)}, ...) matches a sample of {where} "
                f"(sample ids: {', '.join(f'{x:.6f}' for x in sample_ids[:3])}, ...) — is it the table of "
                "this dataset?"
            )
    if bad.any():
        unknown = np.unique(sample_ids[bad])
        raise DatasetLayoutError(
            f"{where}: {int(bad.sum())} samples show {unknown.size} stimulus ids that no image in "
            f"{' / '.join(dict.fromkeys(stimuli.source.tolist()))} carries: "
            f"{', '.join(f'{x:.6f}' for x in unknown[:5])}{', ...' if unknown.size > 5 else ''}"
        )
    return rows.astype(np.int64)


# ---- store -------------------------------------------------------------------------------------------------


def write_store_stimuli(path: str | os.PathLike, stimuli: GodStimuli) -> None:
    """Write ``stimuli.hdf5`` of a GOD store: the common fields plus the GOD labels (module docstring)."""
    import h5py

    n = len(stimuli.stimulus_id)
    text = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        f.create_dataset("ids_73k", data=np.arange(n, dtype=np.int64))
        f.create_dataset("images", data=stimuli.images)
        f.create_dataset("captions", data=np.asarray(stimuli.captions, dtype=object), dtype=text)
        f.create_dataset("stimulus_id", data=np.asarray(stimuli.stimulus_id, dtype=np.float64))
        for name in ("file_name", "wnid", "class_name"):
            f.create_dataset(name, data=np.asarray(getattr(stimuli, name), dtype=object), dtype=text)
        f.attrs["image_source"] = json.dumps(stimuli.manifest)
        f.attrs["crop"] = CROP_RECIPE


def read_stimulus_labels(store: str | os.PathLike) -> dict[str, np.ndarray]:
    """The GOD labels of a prepared store, by image id (row = ``ids_73k`` position).

    Returns ``{"ids_73k": int64 (N,), "stimulus_id": float64 (N,), "file_name", "wnid", "class_name": str
    (N,)}``; raises DatasetLayoutError for a store without them (an NSD store, or one prepared before labels).
    """
    import h5py

    store_path = Path(getattr(store, "path", store))
    path = store_path / "stimuli.hdf5"
    if not path.is_file():
        raise DatasetLayoutError(f"missing {path}; expected a prepared store")
    with h5py.File(path, "r") as f:
        missing = [k for k in ("stimulus_id", "file_name", "wnid", "class_name") if k not in f]
        if missing:
            raise DatasetLayoutError(
                f"{path} has no GOD labels {missing}; prepare it with `fmrirecon prepare god` (a GOD store)"
            )
        return {
            "ids_73k": f["ids_73k"][()],
            "stimulus_id": f["stimulus_id"][()],
            **{k: f[k].asstr()[()].astype(str) for k in ("file_name", "wnid", "class_name")},
        }
