"""Native dataset layout -> prepared store (``fmrirecon prepare``).

For each subject: mask the betas with an ROI (nsdgeneral by default), convert int16 ×300 to percent signal
change, z-score every voxel within every session (as MindEye/NeuralDiffuser do, see
``reference/method-notes.md``), and write them with the trial table (73k id, session, repeat, shared flag).
Work is done **session by session**, so peak memory is one session whatever the number of sessions. The
whole store folder is built under a temporary name and renamed into place at the end, so a failure never
leaves a store under the final name.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fmrirecon.data.integrity import (
    CheckedDatasetWriter,
    open_checked_file,
    seal_store,
    write_checked_dataset,
)
from fmrirecon.data.nsd import BETAS_FORMATS, N_CAPTIONS, NAN_POLICIES, NsdReader, zscore_session
from fmrirecon.data.store import (
    BETAS_DTYPES,
    STORE_FORMAT,
    STORE_VERSION,
    SUBJECT_FORMAT,
    betas_storage_attrs,
    encode_betas,
    subject_file_name,
)
from fmrirecon.data.synthetic import WORLD_SIDECAR
from fmrirecon.errors import DatasetLayoutError
from fmrirecon.io import atomic_path, library_versions, read_json

logger = logging.getLogger(__name__)

_IMAGE_BATCH = 256


def _request(
    kind: str, root: Path, subjects, n_sessions, betas_format: str, roi: str, nan_policy: str
) -> dict:
    return {
        "kind": kind,
        "root": str(root.resolve()),
        "subjects": None if subjects is None else [int(s) for s in subjects],
        "n_sessions": None if n_sessions is None else int(n_sessions),
        "betas_format": betas_format,
        "roi": roi,
        "nan_policy": nan_policy,
    }


def _existing_store_matches(out: Path, request: dict, force: bool) -> bool:
    """True if ``out`` already holds a store made with the same request (so there is nothing to do)."""
    if not out.exists() or force:
        return False
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        manifest = read_json(manifest_path)
        if manifest.get("request") == request:
            return True
        raise DatasetLayoutError(
            f"{out} already holds a store prepared with {manifest.get('request')}, not {request}; "
            "pass --force (force=True) to replace it"
        )
    if out.is_dir() and not any(out.iterdir()):
        return False
    raise DatasetLayoutError(
        f"{out} exists and is not a prepared store (no manifest.json); choose another --out"
    )


def prepare_nsd(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    subjects: Sequence[int] | None = None,
    n_sessions: int | None = None,
    betas_format: str = "nifti",
    roi: str = "nsdgeneral",
    nan_policy: str = "error",
    image_size: int | None = None,
    betas_dtype: str = "float32",
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Prepare NSD-layout data under ``root`` into the store folder ``out``; returns ``out``.

    subjects: 1-based subject numbers (default: every subject with betas).
    n_sessions: use the first K sessions (e.g. 37 reproduces the 982-image test set of the 37-session era;
        40 the full 1000); a subject with fewer sessions keeps all of its own. Default: all available.
    betas_format: read ``betas_sessionNN.nii.gz`` ('nifti') or ``.hdf5`` ('hdf5').
    roi: ROI file whose labels > 0 select the voxels (``nsdgeneral``).
    nan_policy: 'error' (default) raises on NaN betas in the mask; 'zero' zero-fills them with a warning.
    image_size: resize the copied stimuli to this side (NSD's 425 px x ~37k seen images is ~20 GB per store);
        default keeps the native size.
    betas_dtype: how the z-scored betas are stored (:data:`fmrirecon.data.store.BETAS_DTYPES`): 'float32'
        (default), 'float16' (half the disk and cache), or 'int16' with scale 1/300 (NSD's own storage of
        its betas); readers always return float32.
    force: rebuild even if ``out`` already holds an identical store (else re-running is a no-op).
    """
    from tqdm.auto import tqdm

    if betas_format not in BETAS_FORMATS:
        raise DatasetLayoutError(f"betas format must be one of {BETAS_FORMATS}, got {betas_format!r}")
    if nan_policy not in NAN_POLICIES:
        raise DatasetLayoutError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    root, out = Path(root).expanduser(), Path(out).expanduser()
    reader = NsdReader(root)
    request = _request("nsd", root, subjects, n_sessions, betas_format, roi, nan_policy)
    request["image_size"] = image_size
    if betas_dtype not in BETAS_DTYPES:
        raise DatasetLayoutError(f"betas dtype must be one of {tuple(BETAS_DTYPES)}, got {betas_dtype!r}")
    if betas_dtype != "float32":  # only non-default choices enter the request: older stores still match
        request["betas_dtype"] = betas_dtype
    if image_size is not None and image_size < 1:
        raise DatasetLayoutError(f"image_size must be >= 1, got {image_size}")
    if _existing_store_matches(out, request, force):
        logger.info("%s is already prepared with these settings; nothing to do (use --force to rebuild)", out)
        return out

    subject_list = [reader.check_subject(s) for s in subjects] if subjects else reader.subjects()
    if not subject_list:
        raise DatasetLayoutError(
            f"no subject found under {root / 'nsddata_betas' / 'ppdata'} (expected subjXX/)"
        )
    sessions: dict[int, int] = {}
    for subject in subject_list:
        available = reader.resolve_sessions(subject, None, betas_format)
        if n_sessions is not None and n_sessions < 1:
            raise DatasetLayoutError(f"--sessions must be >= 1, got {n_sessions}")
        sessions[subject] = available if n_sessions is None else min(int(n_sessions), available)
        if n_sessions is not None and n_sessions > available:
            logger.warning(
                "subject %d has only %d sessions; using all of them (asked for %d)",
                subject,
                available,
                n_sessions,
            )

    world_path = root / WORLD_SIDECAR
    world = read_json(world_path) if world_path.is_file() else None
    start = time.perf_counter()
    seen_ids: set[int] = set()
    with atomic_path(out, suffix=".partial") as tmp:
        tmp.mkdir()
        for subject in subject_list:
            ids = _prepare_subject(
                reader,
                tmp / subject_file_name(subject),
                subject,
                sessions[subject],
                betas_format,
                roi,
                nan_policy,
                progress,
                tqdm,
                betas_dtype,
            )
            seen_ids.update(ids.tolist())
        _write_stimuli(
            reader,
            tmp / "stimuli.hdf5",
            np.array(sorted(seen_ids), dtype=np.int64),
            progress,
            tqdm,
            image_size,
        )
        manifest = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "source": {
                "kind": "nsd",
                "root": str(root.resolve()),
                "space": reader.paths.space,
                "betas_version": reader.paths.betas_version,
                "betas_format": betas_format,
            },
            "subjects": subject_list,
            "sessions": {str(s): k for s, k in sessions.items()},
            "roi": roi,
            "world": world,
            "request": request,
            "nan_policy": nan_policy,
            "versions": library_versions(),
            "seconds": round(time.perf_counter() - start, 3),
        }
        seal_store(tmp, manifest)
    logger.info("prepared %d subject(s) into %s", len(subject_list), out)
    return out


def _prepare_subject(
    reader: NsdReader,
    path: Path,
    subject: int,
    n_sessions: int,
    betas_format: str,
    roi: str,
    nan_policy: str,
    progress: bool,
    tqdm,
    betas_dtype: str = "float32",
) -> np.ndarray:
    """Write ``subjXX.hdf5`` (checked datasets); returns the 73k ids seen in the selected sessions."""
    mask = reader.voxel_mask(subject, roi)
    reader.check_grid(subject, 1, mask.shape, betas_format)
    _, affine = reader.roi_volume(subject, roi)
    voxel_ijk = np.argwhere(mask)  # (V, 3), sorted by i, j, k — the store's voxel order
    trials = reader.trial_table(subject, n_sessions, betas_format)
    n_trials, n_voxels = trials["global_trial"].size, len(voxel_ijk)
    with open_checked_file(path) as f:
        f.attrs.update(
            {
                "format": SUBJECT_FORMAT,
                "subject": subject,
                "n_sessions": n_sessions,
                "roi": roi,
                "betas_format": betas_format,
                "betas_version": reader.paths.betas_version,
                "space": reader.paths.space,
                "normalisation": "z-score per voxel within each session",
                "nan_policy": nan_policy,
            }
        )
        betas = CheckedDatasetWriter(f, "betas", (n_trials, n_voxels), BETAS_DTYPES[betas_dtype])
        betas.dataset.attrs.update(betas_storage_attrs(betas_dtype))
        group = f.create_group("trials")
        for name, values in trials.items():
            write_checked_dataset(group, name, values)
        write_checked_dataset(f, "voxel_ijk", voxel_ijk.astype(np.int32))
        write_checked_dataset(f, "affine", np.asarray(affine, dtype=np.float64))
        rois = f.create_group("rois")
        for name in reader.roi_names(subject):
            volume, _ = reader.roi_volume(subject, name)
            if volume.shape != mask.shape:
                raise DatasetLayoutError(
                    f"ROI {reader.paths.roi(subject, name)} has grid {volume.shape}, expected {mask.shape} "
                    f"like {reader.paths.roi(subject, roi)}"
                )
            write_checked_dataset(rois, name, np.rint(volume[mask]).astype(np.int16))
            rois[name].attrs["labels"] = reader.roi_labels(subject, name)
        row = 0
        for session in tqdm(
            range(1, n_sessions + 1), desc=f"subj{subject:02d} sessions", disable=not progress
        ):
            reader.check_grid(subject, session, mask.shape, betas_format)
            session_betas = reader.read_session(
                subject, session, voxel_ijk, betas_format, nan_policy
            )  # (T_s, V)
            count = int((trials["session"] == session).sum())
            if session_betas.shape[0] != count:
                raise DatasetLayoutError(
                    f"{reader.paths.betas(subject, session, betas_format)} holds "
                    f"{session_betas.shape[0]} trials, "
                    f"its header said {count}"
                )
            betas.write(encode_betas(zscore_session(session_betas), betas_dtype))
            row += count
        betas.close()
    return np.unique(trials["image_id_73k"])


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (n, H, W, 3) -> (n, size, size, 3) with PIL's antialiased bicubic filter."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])


def _write_stimuli(
    reader: NsdReader, path: Path, ids_73k: np.ndarray, progress: bool, tqdm, image_size: int | None = None
) -> None:
    """Copy the seen images (batched, memory bounded, optionally resized) and captions into stimuli.hdf5."""
    n, height, width, channels = reader.image_shape()
    if image_size is not None:
        height = width = int(image_size)
    with open_checked_file(path) as f:
        write_checked_dataset(f, "ids_73k", ids_73k)
        # One image per chunk: images are read one by one (datasets, reports).
        images = CheckedDatasetWriter(
            f, "images", (ids_73k.size, height, width, channels), np.uint8, chunk_rows=1
        )
        for start in tqdm(range(0, ids_73k.size, _IMAGE_BATCH), desc="stimuli", disable=not progress):
            batch = reader.images(ids_73k[start : start + _IMAGE_BATCH])
            images.write(batch if image_size is None else _resize(batch, image_size))
        images.close()
        captions = reader.captions(ids_73k, N_CAPTIONS)
        write_checked_dataset(f, "captions", np.array(captions, dtype=object).reshape(-1, N_CAPTIONS))
