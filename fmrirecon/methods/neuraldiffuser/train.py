"""NeuralDiffuser training (§4.2.3): targets, datasets, and the named, resumable stages of every decoder.

Targets per image (reference/method-notes.md; computed by the shared :mod:`fmrirecon.methods.targets`): the
VAE latent ``z`` (a sample of the posterior, as the code does), the text condition ``c`` = text-encoder tokens
averaged over the image's 5 captions, and the guidance features ``g^l`` = CLIP image-encoder layer outputs.
They are computed once per run and cached in ``RUN/targets.safetensors``, keyed by a fingerprint of the
backbones and settings they came from.

Each decoder (``semantic``, ``guidance.layer<l>``, ``latent``) trains as a resumable stage of the shared
stage runner (:func:`fmrirecon.train.stages.run_stage`): ``pretrain-<decoder>`` in a pretraining run (other
subjects, each with its own voxel encoder), ``finetune-<decoder>`` in a target run (the target's voxel encoder
plus the shared mapping, from the pretraining run). Mixed-subject batches: :mod:`fmrirecon.data.multisubject`.
The target's training trials can be limited to its first ``target_sessions`` sessions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from fmrirecon.errors import ConfigError
from fmrirecon.io import save_safetensors_atomic


# ----------------------------------------------------------------------------------------------- targets
@torch.no_grad()
def compute_targets(
    store,
    ids_73k: np.ndarray,
    ld,
    clip,
    layers: Sequence[int],
    site: str = "block",
    batch_size: int = 16,
    sample_latents: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-image targets for ``ids_73k`` (sorted or not; rows follow the given order).

    Returns:
        ``{"ids": (N,), "text": (N, L, D), "latent": (N, C, h, w), "layer<l>": (N, T, W) ...}`` on the CPU.
    """
    from tqdm.auto import tqdm

    from fmrirecon.methods.targets import caption_tokens, clip_layer_features, images_to_float, vae_latents

    ids = np.asarray(ids_73k, dtype=np.int64)
    out: dict[str, list[torch.Tensor]] = {"text": [], "latent": []} | {f"layer{l}": [] for l in layers}
    generator = torch.Generator(device=ld.device).manual_seed(seed)
    for start in tqdm(range(0, len(ids), batch_size), desc="NeuralDiffuser targets", disable=not progress):
        chunk = ids[start : start + batch_size]
        images = images_to_float(store.images(chunk))  # (B, 3, H, W)
        out["text"].append(caption_tokens(ld, store.captions(chunk)))
        out["latent"].append(vae_latents(ld, images, sample=sample_latents, generator=generator))
        for layer, feats in clip_layer_features(clip, images, layers, site).items():
            out[f"layer{layer}"].append(feats)
    result = {k: torch.cat(v) for k, v in out.items()}
    result["ids"] = torch.from_numpy(ids)
    return result


def targets_fingerprint(ld, clip, **settings) -> str:
    """SHA-256 (hex) of everything the targets depend on besides the images: the VAE, the text encoder and
    the CLIP embedder (every parameter and buffer: names, shapes, dtypes, bytes), the VAE scaling, and
    ``settings`` (layers, site, sampling, seed)."""
    import hashlib

    digest = hashlib.sha256()
    for module in (ld.vae, ld.text_encoder, clip):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    scaling = (ld.vae.config.scaling_factor, getattr(ld.vae.config, "shift_factor", None))
    digest.update(repr((scaling, sorted(settings.items()))).encode())
    return digest.hexdigest()


def cached_targets(path: Path, store, ids_73k: np.ndarray, **kwargs) -> dict[str, torch.Tensor]:
    """:func:`compute_targets`, cached in ``path``; recomputed when the cached ids or layers differ or the
    backbones or target settings changed (:func:`targets_fingerprint`, kept in the file's metadata)."""
    from safetensors import safe_open

    ids = np.asarray(ids_73k, dtype=np.int64)
    wanted = {"text", "latent", "ids"} | {f"layer{l}" for l in kwargs.get("layers", ())}
    settings = {k: v for k, v in kwargs.items() if k not in ("ld", "clip", "progress", "batch_size")}
    settings["layers"] = list(settings.get("layers", ()))
    fingerprint = targets_fingerprint(kwargs["ld"], kwargs["clip"], **settings)
    if path.is_file():
        with safe_open(path, framework="pt") as f:
            stored = (f.metadata() or {}).get("fingerprint")
        if stored == fingerprint:  # read the (possibly GB-sized) tensors only when they can be reused
            cached = load_file(path)
            if set(cached) == wanted and np.array_equal(cached["ids"].numpy(), ids):
                return cached
    targets = compute_targets(store, ids, **kwargs)
    save_safetensors_atomic(
        {k: v.contiguous() for k, v in targets.items()}, path, {"fingerprint": fingerprint}
    )
    return targets


# ----------------------------------------------------------------------------------------------- datasets
def training_rows(subject_store, max_sessions: int | None = None) -> np.ndarray:
    """Training-split trial rows (single trials, as the authors train), optionally of the first K sessions."""
    rows = subject_store.split_rows("train")
    if max_sessions is not None:
        sessions = subject_store.trials["session"]
        kept = np.unique(sessions)[: int(max_sessions)]
        rows = rows[np.isin(sessions[rows], kept)]
    if rows.size == 0:
        raise ConfigError(
            f"subj{subject_store.subject:02d} has no training trials (max_sessions={max_sessions})"
        )
    return rows
