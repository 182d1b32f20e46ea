"""Where backbone weights come from, how text becomes token ids and what an image input must look like: the
small pieces that both the CLIP and the latent-diffusion backbones need (so neither imports the other).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fmrirecon.errors import WeightsUnavailableError

__all__ = ["check_images", "resolve_local_folder", "tokenize_texts"]


def resolve_local_folder(hub_id_or_dir: str | os.PathLike, what: str) -> Path:
    """Return the local folder holding ``hub_id_or_dir``, never downloading.

    An existing folder is used as is. A string shaped like a hub id (``"name"`` or ``"org/name"``) is looked
    up in the local Hugging Face cache only; a miss raises :class:`WeightsUnavailableError` saying how to
    provide it.
    """
    text = str(hub_id_or_dir)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    looks_like_path = path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1
    if looks_like_path:
        raise WeightsUnavailableError(
            f"{what}: folder {text} does not exist (expected a local folder or a hub id)"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=text, local_files_only=True))
    except Exception as err:  # cache miss or malformed id; the message below is what the user needs
        raise WeightsUnavailableError(
            f"{what}: {text!r} is neither a local folder nor in the local Hugging Face cache "
            f"({type(err).__name__}); fmrirecon never downloads weights - run "
            f"`huggingface-cli download {text}` where there is network access, "
            "or pass the path of a local folder"
        ) from err


def tokenize_texts(tokenizer, texts: list[str] | str, context_length: int) -> torch.Tensor:
    """Token ids ``(B, context_length)`` from a Hugging Face tokenizer, padded or truncated."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"texts must be a non-empty list of strings, got {texts!r:.80}")
    tokens = tokenizer(
        list(texts), padding="max_length", max_length=context_length, truncation=True, return_tensors="pt"
    )
    return tokens.input_ids


def check_images(images: torch.Tensor, multiple: int = 1) -> None:
    """Raise ``ValueError`` unless ``images`` is a float ``(B, 3, H, W)`` tensor whose sides are multiples of
    ``multiple`` (the VAE's downsampling; 1 = any size)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be float (B, 3, H, W) in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(
            f"images must be float in [0, 1], got dtype {images.dtype} (convert uint8 with /255)"
        )
    if images.shape[2] % multiple or images.shape[3] % multiple:
        raise ValueError(
            f"image height and width must be multiples of {multiple}, got {tuple(images.shape[2:])}"
        )
