"""Store integrity: checksummed HDF5 datasets, content digests, and ``fmrirecon store verify``.

Two layers catch a damaged store (a bad sector, a copy cut short and resumed, a flaky network filesystem):

1. **HDF5's own checksums.** Every dataset a store writer creates goes through :func:`write_checked_dataset`
   (or :class:`CheckedDatasetWriter`): chunked, with the Fletcher-32 filter, in files opened with
   ``libver=("v108", "latest")`` so that the object headers, B-trees and heaps carry metadata checksums as
   well (HDF5 File Format Specification v2+, "Checksum" fields). A damaged chunk fails on read, and the
   store's readers turn h5py's ``OSError`` ("filter returned failure during read") into one
   :class:`~fmrirecon.errors.StoreCorruptionError` naming the file, the dataset and the rows (:func:`guard`).
   Strings are stored fixed-length (UTF-8) so that they sit inside the checksummed chunks, not in the
   unchecked global heap of variable-length strings.
2. **Content digests.** While writing, each dataset's bytes (C order, row by row) are hashed with SHA-256
   (FIPS 180-4; chosen over BLAKE2b because CPUs with SHA extensions hash it about twice as fast, which keeps
   ``verify`` near raw-read speed); :func:`seal_store` collects the digests into ``manifest.json``
   (``"integrity"``) together with a digest of the manifest itself. :func:`store_digest` condenses them into
   one short string that runs, reconstruction folders and ``metrics.json`` record, and :func:`verify_store`
   re-reads every dataset and compares.

Every store writer ends with ``seal_store(folder, manifest)`` instead of writing ``manifest.json`` itself: it
rewrites any HDF5 file that was not written with checked datasets (a writer's legacy ``create_dataset``
calls), so all of them get the same guarantees through one call.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fmrirecon.errors import CorruptFileError, DatasetLayoutError, RunLockedError, StoreCorruptionError

DIGEST_NAME = "sha256"
DIGEST_ATTR = "fmrirecon_digest"
MANIFEST_DIGEST_KEY = "manifest_digest"
# 1 MiB chunks: small enough that a bad sector spoils few rows, large enough that Fletcher-32 and the
# chunk index cost little on a full read (benchmarks/bench_store.py).
TARGET_CHUNK_BYTES = 1 << 20
# Low bound v108: object header v2 and the v2 B-tree / fractal heap carry checksums (readable by HDF5 >= 1.8).
LIBVER = ("v108", "latest")


def _hasher():
    return hashlib.sha256()


def default_chunk_rows(row_shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Rows per chunk so that one chunk holds about :data:`TARGET_CHUNK_BYTES`."""
    row_bytes = max(1, int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
    return max(1, TARGET_CHUNK_BYTES // row_bytes)


def _storable(data: np.ndarray) -> tuple[np.ndarray, Any]:
    """(array to write, h5py dtype): strings become fixed-length UTF-8 bytes (kept in checksummed chunks)."""
    import h5py

    data = np.asarray(data)
    if data.dtype.kind in "OU" or (data.dtype.kind == "S" and data.dtype.itemsize == 0):
        encoded = np.char.encode(data.astype(str), "utf-8") if data.size else np.zeros(data.shape, "S1")
        itemsize = max(1, encoded.dtype.itemsize)
        encoded = encoded.astype(f"S{itemsize}")
        return encoded, h5py.string_dtype("utf-8", itemsize)
    if data.dtype.kind == "S":
        return data, h5py.string_dtype("utf-8", data.dtype.itemsize)
    if data.dtype == bool:
        return data, np.dtype(bool)
    return data, data.dtype


class CheckedDatasetWriter:
    """Create a checked dataset and fill it row block by row block, in order, hashing what is written.

    ``shape[0]`` is the row axis; blocks of any size are appended with :meth:`write`; :meth:`close` checks
    that every row was written, stores the digest as an attribute and returns the manifest entry
    ``{"digest", "shape", "dtype", "chunk_rows"}``.
    """

    def __init__(
        self, group, name: str, shape: tuple[int, ...], dtype, *, chunk_rows: int | None = None
    ) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        np_dtype = np.dtype(dtype) if not _is_h5_string(dtype) else np.dtype(f"S{_string_size(dtype)}")
        if not self.shape:
            raise ValueError(f"checked dataset {name!r} must have at least one axis (got a scalar)")
        rows = chunk_rows or default_chunk_rows(self.shape[1:], np_dtype)
        rows = max(1, min(int(rows), max(1, self.shape[0])))
        self.chunk_rows = rows
        chunks = (rows, *[max(1, s) for s in self.shape[1:]])
        # An empty dataset can only be chunked with an extendable row axis.
        maxshape = (None,) * len(self.shape) if not all(self.shape) else None
        self.dataset = group.create_dataset(
            name, shape=self.shape, dtype=dtype, chunks=chunks, maxshape=maxshape, fletcher32=True
        )
        self._mtype = self.dataset.id.get_type() if _is_h5_string(dtype) else None
        self._hash = _hasher()
        self._row = 0

    def write(self, block: np.ndarray) -> None:
        """Append ``block`` (n, *shape[1:]) at the next free row."""
        block = np.ascontiguousarray(block)
        n = block.shape[0] if block.ndim else 1
        if tuple(block.shape[1:]) != self.shape[1:] or self._row + n > self.shape[0]:
            raise ValueError(
                f"block {block.shape} does not fit dataset {self.dataset.name} {self.shape} "
                f"at row {self._row}"
            )
        if n == 0:
            return
        if self._mtype is not None:
            from h5py import h5s

            # Fixed-length UTF-8: write the encoded bytes with the file type (HDF5 has no ASCII->UTF-8 path).
            space = self.dataset.id.get_space()
            space.select_hyperslab((self._row, *([0] * (block.ndim - 1))), block.shape)
            self.dataset.id.write(h5s.create_simple(block.shape), space, block, mtype=self._mtype)
        else:
            self.dataset[self._row : self._row + n] = block
        self._hash.update(block.tobytes())
        self._row += n

    def close(self) -> dict[str, Any]:
        if self._row != self.shape[0]:
            raise ValueError(f"dataset {self.dataset.name}: {self._row} of {self.shape[0]} rows were written")
        entry = {
            "digest": f"{DIGEST_NAME}:{self._hash.hexdigest()}",
            "shape": list(self.shape),
            "dtype": np.dtype(self.dataset.dtype).str,
            "chunk_rows": self.chunk_rows,
        }
        self.dataset.attrs[DIGEST_ATTR] = entry["digest"]
        return entry


def _is_h5_string(dtype) -> bool:
    import h5py

    try:
        return h5py.check_string_dtype(np.dtype(dtype)) is not None
    except TypeError:
        return False


def _string_size(dtype) -> int:
    import h5py

    info = h5py.check_string_dtype(np.dtype(dtype))
    return int(info.length or 1)


def write_checked_dataset(group, name: str, data, *, chunk_rows: int | None = None) -> dict[str, Any]:
    """Write ``data`` as a chunked, Fletcher-32-checked dataset ``group[name]``; returns its manifest entry.

    data: any array (N, ...); 0-d values become shape (1,). Strings are stored as fixed-length UTF-8 (read
    them with ``.asstr()``); bool as HDF5 enum bool. The digest (SHA-256 over the C-order bytes as
    stored) is computed while writing, chunk block by chunk block.
    """
    array, h5_dtype = _storable(np.atleast_1d(np.asarray(data)))
    writer = CheckedDatasetWriter(group, name, array.shape, h5_dtype, chunk_rows=chunk_rows)
    step = writer.chunk_rows * max(1, 64 // max(1, writer.chunk_rows))
    for start in range(0, array.shape[0], step):
        writer.write(array[start : start + step])
    return writer.close()


def open_checked_file(path: str | os.PathLike, mode: str = "w"):
    """h5py.File for a store writer: metadata checksums on (see the module docstring)."""
    import h5py

    return h5py.File(path, mode, libver=LIBVER)


# ------------------------------------------------------------------ reading
def _is_corruption(err: BaseException) -> bool:
    """h5py's errors on a damaged file: OSError from a failed filter or checksum, RuntimeError from a bad
    object header met while visiting, KeyError / ValueError from a damaged link or dataspace."""
    if isinstance(err, FileNotFoundError | PermissionError):
        return False
    return isinstance(err, OSError | RuntimeError | KeyError | ValueError)


@contextlib.contextmanager
def guard(path: str | os.PathLike, dataset: str | None = None, rows: tuple[int, int] | None = None):
    """Turn h5py's read errors on a store file into one :class:`StoreCorruptionError` naming the file, the
    dataset and the rows."""
    try:
        yield
    except StoreCorruptionError:
        raise
    except Exception as err:
        if not _is_corruption(err):
            raise
        where = f" dataset {dataset!r}" if dataset else ""
        if rows is not None:
            where += f" rows {rows[0]}..{rows[1] - 1}"
        raise StoreCorruptionError(
            f"{path}{where} is corrupt or unreadable ({err}); the store is damaged — re-copy it or prepare "
            f"it again, and run `fmrirecon store verify {Path(path).parent}` to see which files are affected"
        ) from err


def read_rows(dataset, start: int, stop: int, path: str | os.PathLike) -> np.ndarray:
    """``dataset[start:stop]``; on a checksum failure, narrow the error down to the bad chunk's rows."""
    try:
        return dataset[start:stop]
    except Exception as err:
        if not _is_corruption(err):
            raise
        chunk = (dataset.chunks or (max(1, stop - start),))[0]
        first = start - start % chunk
        for lo in range(first, stop, chunk):
            hi = min(lo + chunk, dataset.shape[0])
            with guard(path, dataset.name.lstrip("/"), (lo, hi)):
                dataset[lo:hi]
        with guard(path, dataset.name.lstrip("/"), (start, stop)):
            raise


def iter_dataset_blocks(dataset, path, rows_per_block: int | None = None) -> Iterator[np.ndarray]:
    """Yield ``dataset`` in chunk-aligned row blocks (raw stored dtype)."""
    n = dataset.shape[0] if dataset.shape else 1
    if not dataset.shape:
        with guard(path, dataset.name.lstrip("/")):
            yield np.atleast_1d(dataset[()])
        return
    chunk = (dataset.chunks or (n or 1,))[0]
    step = rows_per_block or chunk * max(1, (16 * TARGET_CHUNK_BYTES) // max(1, _row_bytes(dataset) * chunk))
    step = max(chunk, step - step % chunk)
    for start in range(0, n, step):
        yield read_rows(dataset, start, min(n, start + step), path)


def _row_bytes(dataset) -> int:
    return int(np.prod(dataset.shape[1:], dtype=np.int64)) * dataset.dtype.itemsize


def dataset_digest(dataset, path) -> str:
    """SHA-256 of a dataset's content as stored (C order), read in chunk-aligned blocks."""
    from concurrent.futures import ThreadPoolExecutor

    h = _hasher()
    # Hash block k in a second thread while h5py reads block k+1: hashlib releases the GIL on large
    # buffers, so verify runs at about the speed of the read alone (benchmarks/bench_store.py).
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for block in iter_dataset_blocks(dataset, path):
            block = np.ascontiguousarray(block)
            if pending is not None:
                pending.result()
            pending = pool.submit(h.update, block)
        if pending is not None:
            pending.result()
    return f"{DIGEST_NAME}:{h.hexdigest()}"


# ------------------------------------------------------------------ sealing
def dataset_names(f) -> list[str]:
    """Sorted paths of every dataset in an open HDF5 file or group."""
    import h5py

    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return sorted(names)


def _is_checked(f, name: str) -> bool:
    ds = f[name]
    return (
        bool(ds.fletcher32)
        and DIGEST_ATTR in ds.attrs
        and not (_is_h5_string(ds.dtype) and ds.dtype.kind == "O")
    )


def _file_entries(path: Path) -> dict[str, dict[str, Any]] | None:
    """Manifest entries from the digest attributes, or None if some dataset was written unchecked."""
    with open_checked_file(path, "r") as f:
        names = dataset_names(f)
        if not all(_is_checked(f, n) for n in names) or _superblock_version(path) < 2:
            return None
        return {
            n: {
                "digest": str(f[n].attrs[DIGEST_ATTR]),
                "shape": list(f[n].shape),
                "dtype": np.dtype(f[n].dtype).str,
                "chunk_rows": int(f[n].chunks[0]),
            }
            for n in names
        }


def _superblock_version(path: Path) -> int:
    """Superblock version of an HDF5 file (>= 2 when written with metadata checksums), -1 if not found."""
    signature = b"\x89HDF\r\n\x1a\n"
    with open(path, "rb") as f:
        for offset in (0, 512, 1024, 2048):
            f.seek(offset)
            head = f.read(9)
            if head[:8] == signature:
                return head[8]
    return -1


def _copy_attrs(src, dst) -> None:
    for key, value in src.attrs.items():
        if key != DIGEST_ATTR:
            dst.attrs[key] = value


def _rewrite_checked(path: Path) -> dict[str, dict[str, Any]]:
    """Copy an HDF5 file into a checked one (same groups, attributes and values), atomically."""
    import h5py

    from fmrirecon.io import atomic_path

    entries: dict[str, dict[str, Any]] = {}
    with h5py.File(path, "r") as src, atomic_path(path, suffix=".h5") as tmp, open_checked_file(tmp) as dst:
        _copy_attrs(src, dst)
        groups: list[str] = []
        src.visititems(lambda n, o: groups.append(n) if isinstance(o, h5py.Group) else None)
        for g in groups:
            _copy_attrs(src[g], dst.require_group(g))
        for name in dataset_names(src):
            ds = src[name]
            data = ds.asstr()[()] if h5py.check_string_dtype(ds.dtype) is not None else ds[()]
            entries[name] = write_checked_dataset(dst, name, data)
            _copy_attrs(ds, dst[name])
        dst.close()
    return entries


def seal_store(folder: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, Any]:
    """Finish a store folder: check every ``*.hdf5`` file, then write ``manifest.json`` with the digests.

    Files whose datasets were all written with :func:`write_checked_dataset` only have their digests
    collected (cheap); any other file is rewritten checked first. Adds ``manifest["integrity"]`` =
    ``{"algorithm", "files": {file: {dataset: entry}}}`` and ``manifest["manifest_digest"]`` (digest of the
    rest of the manifest), writes ``manifest.json`` atomically and returns the manifest written.
    """
    from fmrirecon.io import write_json_atomic

    folder = Path(folder)
    files: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted(folder.glob("*.hdf5")):
        entries = _file_entries(path)
        files[path.name] = entries if entries is not None else _rewrite_checked(path)
    manifest = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST_KEY}
    manifest["integrity"] = {"algorithm": DIGEST_NAME, "checksum": "fletcher32", "files": files}
    manifest[MANIFEST_DIGEST_KEY] = manifest_self_digest(manifest)
    write_json_atomic(folder / "manifest.json", manifest)
    return manifest


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()


def manifest_self_digest(manifest: dict[str, Any]) -> str:
    """Digest of a manifest without its own ``manifest_digest`` key (canonical JSON)."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST_KEY}
    return f"{DIGEST_NAME}:{hashlib.sha256(_canonical(body)).hexdigest()}"


def check_manifest(
    manifest: dict[str, Any], path: str | os.PathLike, error: type[CorruptFileError] = StoreCorruptionError
) -> None:
    """Raise ``error`` if a sealed manifest no longer matches its own digest."""
    recorded = manifest.get(MANIFEST_DIGEST_KEY)
    if recorded is not None and recorded != manifest_self_digest(manifest):
        raise error(
            f"{path} does not match its own digest ({recorded}): the manifest was damaged or edited — "
            "re-copy it or produce it again"
        )


def store_digest(store_dir: str | os.PathLike) -> str:
    """One short digest of a store's content (from the manifest's per-dataset digests; reads no data).

    Stores prepared before integrity records (no ``"integrity"`` in the manifest) give ``"unsealed:"`` plus a
    digest of the manifest, so the value still changes when the manifest does.
    """
    from fmrirecon.io import read_json

    path = Path(store_dir) / "manifest.json"
    if not path.is_file():
        raise DatasetLayoutError(
            f"{store_dir} is not a prepared store: expected {path} (run fmrirecon prepare)"
        )
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as err:
        raise StoreCorruptionError(f"could not read {path}: {err}") from err
    files = (manifest.get("integrity") or {}).get("files")
    if not files:
        return "unsealed:" + hashlib.sha256(_canonical(manifest)).hexdigest()[:16]
    digests = {f: {n: e["digest"] for n, e in entries.items()} for f, entries in files.items()}
    return hashlib.sha256(_canonical(digests)).hexdigest()[:16]


# ------------------------------------------------------------------ verify
@dataclass
class FileReport:
    """Outcome of verifying one store file: ``status`` is 'intact', 'corrupt', 'missing' or 'unlisted'."""

    name: str
    status: str
    problems: list[str] = field(default_factory=list)
    bytes_read: int = 0


@dataclass
class VerifyReport:
    store: Path
    files: list[FileReport]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(f.status in ("intact", "unlisted") for f in self.files)


def verify_store(store_dir: str | os.PathLike, progress: bool = False) -> VerifyReport:
    """Read every dataset of a sealed store (Fletcher-32 checked by the read) and compare its digest.

    Raises DatasetLayoutError only if ``store_dir`` is no store at all or was never sealed; damage is
    reported per file in the returned :class:`VerifyReport`.
    """
    import h5py
    from tqdm.auto import tqdm

    from fmrirecon.io import read_json

    store = Path(store_dir).expanduser()
    start = time.perf_counter()
    manifest_path = store / "manifest.json"
    if not manifest_path.is_file():
        raise DatasetLayoutError(f"{store} is not a prepared store: expected {manifest_path}")
    reports: list[FileReport] = []
    try:
        manifest = read_json(manifest_path)
        check_manifest(manifest, manifest_path)
    except (OSError, ValueError, StoreCorruptionError) as err:
        return VerifyReport(store, [FileReport("manifest.json", "corrupt", [str(err)])], 0.0)
    files = (manifest.get("integrity") or {}).get("files")
    if files is None:
        raise DatasetLayoutError(
            f"{manifest_path} has no integrity records (prepared before fmrirecon recorded digests); "
            "prepare the store again with --force to verify it"
        )
    reports.append(FileReport("manifest.json", "intact"))
    for name in tqdm(sorted(files), desc="verify", disable=not progress):
        report = FileReport(name, "intact")
        reports.append(report)
        path = store / name
        if not path.is_file():
            report.status, report.problems = "missing", [f"{path} is missing"]
            continue
        try:
            with h5py.File(path, "r") as f:
                found = set(dataset_names(f))
                for ds_name, entry in files[name].items():
                    if ds_name not in found:
                        report.problems.append(f"dataset {ds_name!r} is missing")
                        continue
                    ds = f[ds_name]
                    try:
                        digest = dataset_digest(ds, path)
                        report.bytes_read += int(np.prod(ds.shape, dtype=np.int64)) * ds.dtype.itemsize
                    except StoreCorruptionError as err:
                        report.problems.append(str(err))
                        continue
                    if digest != entry["digest"]:
                        report.problems.append(
                            f"dataset {ds_name!r}: content digest {digest} != recorded {entry['digest']}"
                        )
                extra = sorted(found - set(files[name]))
                if extra:
                    report.problems.append(f"datasets not in the manifest: {extra}")
        except Exception as err:
            if not _is_corruption(err):
                raise
            report.problems.append(f"{path} could not be read: {err}")
        if report.problems:
            report.status = "corrupt"
    for path in sorted(store.glob("*.hdf5")):
        if path.name not in files:
            reports.append(FileReport(path.name, "unlisted", ["not recorded in manifest.json"]))
    return VerifyReport(store, reports, time.perf_counter() - start)


# ------------------------------------------------------------------ run and reconstruction folders
RUN_LOCK_FILE = ".lock"
_FILE_BLOCK = 1 << 20
_HELD_LOCKS: dict[str, int] = {}


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes."""
    h = _hasher()
    with open(path, "rb") as f:
        while block := f.read(_FILE_BLOCK):
            h.update(block)
    return f"{DIGEST_NAME}:{h.hexdigest()}"


def folder_digests(folder: str | os.PathLike, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """``{relative path: digest}`` of every regular file under ``folder`` (except ``exclude`` and locks)."""
    folder = Path(folder)
    skip = {*exclude, RUN_LOCK_FILE}
    return {
        p.relative_to(folder).as_posix(): file_digest(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() not in skip and not p.name.startswith(".")
    }


def check_folder_digests(folder: str | os.PathLike, recorded: dict[str, str] | None, what: str) -> None:
    """Raise CorruptFileError naming each recorded file of ``folder`` that is missing or changed."""
    if not recorded:
        return
    folder = Path(folder)
    bad = []
    for name, digest in recorded.items():
        path = folder / name
        if not path.is_file():
            bad.append(f"{name} (missing)")
        elif file_digest(path) != digest:
            bad.append(f"{name} (content changed)")
    if bad:
        raise CorruptFileError(
            f"{what} {folder} is damaged: {', '.join(bad)} no longer match the digests recorded when it was "
            "written; restore it from a copy or produce it again"
        )


def seal_run_files(run_dir: str | os.PathLike) -> dict[str, str]:
    """Digests of a finished run folder's files (recorded in ``done.json`` by ``mark_done``)."""
    return folder_digests(run_dir, exclude=("done.json",))


def check_run_files(run_dir: str | os.PathLike) -> None:
    """Raise CorruptFileError if a finished run's files differ from the digests in its ``done.json``."""
    from fmrirecon.io import read_json

    done = Path(run_dir) / "done.json"
    if not done.is_file():
        return
    try:
        recorded = read_json(done)
    except (OSError, ValueError) as err:
        raise CorruptFileError(
            f"{done} is damaged ({err}); restore the run from a copy or train it again"
        ) from err
    if not isinstance(recorded, dict):
        raise CorruptFileError(f"{done} holds no JSON object; restore the run from a copy or train it again")
    check_folder_digests(run_dir, recorded.get("files"), "run folder")


def lock_run_dir(run_dir: str | os.PathLike) -> None:
    """Hold an exclusive ``flock`` on ``RUN/.lock`` for this process (re-entrant; the OS frees it when the
    process ends, even on SIGKILL). Raises RunLockedError if another process holds it."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _HELD_LOCKS:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / RUN_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunLockedError(
                f"run dir {run_dir} is being trained by another process (pid {holder}); wait for it to "
                "finish, or train into another --out"
            ) from err
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _HELD_LOCKS[key] = fd


def unlock_run_dir(run_dir: str | os.PathLike) -> None:
    """Release this process's lock on ``run_dir`` (no-op if not held)."""
    fd = _HELD_LOCKS.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
