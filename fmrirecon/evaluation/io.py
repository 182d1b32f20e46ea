"""Reconstruction folders and ground-truth sources, read and checked at the boundary.

Reconstruction folder (written by ``fmrirecon reconstruct`` or any other tool; see ``docs/evaluation.md``)::

    RECON_DIR/manifest.json          {"method": str, "subject": int, "variant": str, "ids": [73k ids],
                                      "samples": K, ...extra keys allowed}
    RECON_DIR/images/<id73k>_<k>.png k = 0..K-1, RGB, one size for the whole folder
    RECON_DIR/brain_embeddings.npy   optional (N, D): the method's predicted embeddings, rows in ``ids`` order
    RECON_DIR/image_embeddings.npy   optional (N, D): target-space embeddings of the true images, same order

:func:`write_recon_dir` writes one; :class:`ReconSet` reads and checks one.

Ground truth: a prepared store (``STORE/manifest.json`` with ``"format": "fmrirecon-store"``) or a folder of
``<id73k>.png``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmrirecon.errors import EvaluationInputError
from fmrirecon.io import read_json

MANIFEST_KEYS = {"method": str, "subject": int, "variant": str, "ids": list, "samples": int}


def _describe_ids(ids) -> str:
    ids = sorted(int(i) for i in ids)
    shown = ", ".join(str(i) for i in ids[:10])
    return f"{len(ids)} ids ({shown}{', ...' if len(ids) > 10 else ''})"


def read_png(path: Path) -> np.ndarray:
    """One PNG -> uint8 ``(H, W, 3)``; ``EvaluationInputError`` if it cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise EvaluationInputError(f"cannot read image {path}: expected a readable PNG ({err})") from err


def _png_size(path: Path) -> tuple[int, int]:
    """(H, W) from the PNG header without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            width, height = im.size
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise EvaluationInputError(f"cannot read image {path}: expected a readable PNG ({err})") from err
    return height, width


def _check_one_size(paths: list[Path], what: str) -> tuple[int, int]:
    sizes: dict[tuple[int, int], Path] = {}
    for path in paths:
        sizes.setdefault(_png_size(path), path)
    if len(sizes) > 1:
        listing = "; ".join(f"{h}x{w} px e.g. {p.name}" for (h, w), p in sizes.items())
        raise EvaluationInputError(
            f"{what}: all images must have one size, found {len(sizes)} sizes: {listing}"
        )
    return next(iter(sizes))


@dataclass
class ReconSet:
    """A checked reconstruction folder.

    Attributes:
        ids: int64 (N,) 73k ids in manifest order; samples: K reconstructions per id; image_size: (H, W).
        brain_embeddings, image_embeddings: (N, D) float arrays or None (``retrieval_reason`` says why).
    """

    path: Path
    method: str
    subject: int
    variant: str
    ids: np.ndarray
    samples: int
    image_size: tuple[int, int]
    manifest: dict
    brain_embeddings: np.ndarray | None = None
    image_embeddings: np.ndarray | None = None
    retrieval_reason: str | None = field(default=None)

    @property
    def label(self) -> str:
        return f"{self.method}/subj{self.subject:02d}/{self.variant}"

    def image_path(self, image_id: int, sample: int) -> Path:
        return self.path / "images" / f"{int(image_id)}_{int(sample)}.png"

    def load_images(self, index: slice | np.ndarray, sample: int) -> np.ndarray:
        """uint8 ``(B, H, W, 3)`` for ``ids[index]``, reconstruction number ``sample``."""
        images = [read_png(self.image_path(i, sample)) for i in self.ids[index]]
        for image, image_id in zip(images, self.ids[index]):
            if image.shape[:2] != self.image_size:
                raise EvaluationInputError(
                    f"{self.image_path(image_id, sample)}: expected {self.image_size} px like the rest of "
                    f"{self.path}, found {image.shape[:2]}"
                )
        return np.stack(images)


def _load_embeddings(path: Path, n: int) -> tuple[np.ndarray | None, str | None]:
    if not path.is_file():
        return None, f"{path} missing"
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise EvaluationInputError(f"cannot read {path}: expected a .npy float array (N, D) ({err})") from err
    if array.ndim < 2 or array.shape[0] != n:
        raise EvaluationInputError(
            f"{path}: expected shape ({n}, D) (one row per manifest id), got {array.shape}"
        )
    return array.reshape(n, -1).astype(np.float32), None


def read_recon_dir(path: str | os.PathLike) -> ReconSet:
    """Read and check ``RECON_DIR`` (manifest keys and types, every image present, one image size)."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise EvaluationInputError(
            f"{manifest_path} missing: a reconstruction folder holds manifest.json and images/<id73k>_<k>.png"
        )
    try:
        manifest = read_json(manifest_path)
    except ValueError as err:
        raise EvaluationInputError(f"{manifest_path}: not valid JSON ({err})") from err
    if isinstance(manifest, dict):  # digests recorded by write_recon_dir (fmrirecon.data.integrity)
        from fmrirecon.data.integrity import check_folder_digests, check_manifest
        from fmrirecon.errors import CorruptFileError

        check_manifest(manifest, manifest_path, error=CorruptFileError)
        check_folder_digests(path, manifest.get("files"), "reconstruction folder")
    for key, kind in MANIFEST_KEYS.items():
        if key not in manifest:
            raise EvaluationInputError(
                f"{manifest_path}: key {key!r} missing (expected {sorted(MANIFEST_KEYS)})"
            )
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            raise EvaluationInputError(
                f"{manifest_path}: {key!r} must be {kind.__name__}, got {type(manifest[key]).__name__}"
            )
    ids = np.asarray(manifest["ids"], dtype=np.int64)
    if len(ids) == 0 or len(set(ids.tolist())) != len(ids):
        raise EvaluationInputError(f"{manifest_path}: 'ids' must be a non-empty list of distinct 73k ids")
    samples = manifest["samples"]
    if samples < 1:
        raise EvaluationInputError(f"{manifest_path}: 'samples' must be >= 1, got {samples}")
    recon = ReconSet(
        path=path,
        method=manifest["method"],
        subject=manifest["subject"],
        variant=manifest["variant"],
        ids=ids,
        samples=samples,
        image_size=(0, 0),
        manifest=manifest,
    )
    paths = [recon.image_path(i, k) for i in ids for k in range(samples)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        names = ", ".join(p.name for p in missing[:10])
        raise EvaluationInputError(
            f"{path / 'images'}: {len(missing)} of {len(paths)} expected images missing ({names}"
            f"{', ...' if len(missing) > 10 else ''}); expected <id73k>_<k>.png for k = 0..{samples - 1}"
        )
    recon.image_size = _check_one_size(paths, f"reconstructions in {path / 'images'}")
    recon.brain_embeddings, brain_reason = _load_embeddings(path / "brain_embeddings.npy", len(ids))
    recon.image_embeddings, image_reason = _load_embeddings(path / "image_embeddings.npy", len(ids))
    if brain_reason or image_reason:
        recon.retrieval_reason = "; ".join(r for r in (brain_reason, image_reason) if r)
    elif recon.brain_embeddings.shape[1] != recon.image_embeddings.shape[1]:
        raise EvaluationInputError(
            f"{path}: brain_embeddings.npy and image_embeddings.npy must share D, got "
            f"{recon.brain_embeddings.shape[1]} and {recon.image_embeddings.shape[1]}"
        )
    return recon


class Truth:
    """Ground-truth images by 73k id, from a prepared store or a folder of ``<id73k>.png``.

    Attributes:
        store: the ``PreparedStore`` or None (folder truth: store-only metrics are unavailable).
        available_ids: set of ids it can provide.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.store = None
        if not self.path.is_dir():
            raise EvaluationInputError(
                f"ground truth {self.path} not found: expected a prepared store or PNG folder"
            )
        manifest = self.path / "manifest.json"
        if manifest.is_file() and _is_store_manifest(manifest):
            from fmrirecon.data.store import PreparedStore

            self.store = PreparedStore(self.path)
            self.available_ids = {int(i) for i in self.store.ids_73k}
            self.kind = "store"
            self._size = None
        else:
            files = {}
            for p in self.path.glob("*.png"):
                if p.stem.isdigit():
                    files[int(p.stem)] = p
            if not files:
                raise EvaluationInputError(
                    f"{self.path}: expected a prepared store (manifest.json with format fmrirecon-store) "
                    "or PNGs named <id73k>.png; found neither"
                )
            self._files = files
            self.available_ids = set(files)
            self.kind = "folder"

    def check_ids(self, ids: np.ndarray, what: str) -> None:
        """Raise ``EvaluationInputError`` naming the ids of ``what`` that the ground truth lacks."""
        missing = set(int(i) for i in ids) - self.available_ids
        if missing:
            raise EvaluationInputError(
                f"{what}: ground truth {self.path} has no image for {_describe_ids(missing)}; "
                "reconstruction and ground-truth ids must match"
            )
        if self.kind == "folder":
            _check_one_size([self._files[int(i)] for i in ids], f"ground truth in {self.path}")

    def images(self, ids: np.ndarray) -> np.ndarray:
        """uint8 ``(n, H, W, 3)`` in the order of ``ids``."""
        if self.store is not None:
            return np.asarray(self.store.images(np.asarray(ids, dtype=np.int64)))
        return np.stack([read_png(self._files[int(i)]) for i in ids])


def _is_store_manifest(path: Path) -> bool:
    try:
        return read_json(path).get("format") == "fmrirecon-store"
    except (ValueError, AttributeError):
        return False


def _store_digest_of(store: str | os.PathLike) -> str | None:
    from fmrirecon.data.integrity import store_digest

    return store_digest(store) if (Path(store) / "manifest.json").is_file() else None


def write_recon_dir(
    recon_dir: str | os.PathLike,
    *,
    method: str,
    subject: int,
    variant: str,
    ids: np.ndarray,
    images: np.ndarray,
    brain_embeddings: np.ndarray | None = None,
    image_embeddings: np.ndarray | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a reconstruction folder (layout above): ``images`` uint8 ``(N, K, H, W, 3)`` by 73k ``ids (N,)``;
    ``extra`` keys go into the manifest. Atomic: the folder appears complete or not at all."""
    from PIL import Image

    from fmrirecon.io import atomic_path, write_json_atomic

    recon_dir = Path(recon_dir)
    images = np.asarray(images)
    if images.ndim != 5 or images.shape[0] != len(ids) or images.dtype != np.uint8:
        raise ValueError(
            f"images must be uint8 (N={len(ids)}, K, H, W, 3), got {images.dtype} {images.shape}"
        )
    with atomic_path(recon_dir) as tmp:
        (tmp / "images").mkdir(parents=True)
        for image_id, samples in zip(ids, images, strict=True):
            for k, image in enumerate(samples):
                Image.fromarray(image).save(tmp / "images" / f"{int(image_id)}_{k}.png")
        if brain_embeddings is not None:
            np.save(tmp / "brain_embeddings.npy", brain_embeddings)
        if image_embeddings is not None:
            np.save(tmp / "image_embeddings.npy", image_embeddings)
        manifest = {
            "method": method,
            "subject": int(subject),
            "variant": variant,
            "ids": [int(i) for i in ids],
            "samples": int(images.shape[1]),
            **(extra or {}),
        }
        if manifest.get("store") and "store_digest" not in manifest:  # the store's content digest
            manifest["store_digest"] = _store_digest_of(manifest["store"])
        # Digests of the images and embeddings, and of the manifest itself: read_recon_dir checks them.
        from fmrirecon.data.integrity import MANIFEST_DIGEST_KEY, folder_digests, manifest_self_digest

        manifest["files"] = folder_digests(tmp, exclude=("manifest.json",))
        manifest[MANIFEST_DIGEST_KEY] = manifest_self_digest(manifest)
        write_json_atomic(tmp / "manifest.json", manifest)
    return recon_dir
