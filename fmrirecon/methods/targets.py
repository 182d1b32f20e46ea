"""Training targets every diffusion-based method regresses, computed one way (STYLE.md §16):

- :func:`vae_latents` — an image's scaled VAE latent ``z`` ``(C, h, w)`` at the backbone's native size
  (bicubic, antialiased: a downsampled photo must not alias; a native-size world image is left as is);
- :func:`caption_tokens` — the text condition ``c`` ``(L, D)``: text-encoder tokens averaged over the image's
  captions (Takagi & Nishimoto §3.2; NeuralDiffuser averages its 5 captions the same way); any number of
  captions per image, a missing caption read as the empty text;
- :func:`clip_layer_features` — CLIP image-encoder layer outputs ``(T, W)`` (the embedder preprocesses).

Each works on one batch; the caller batches (and caches) as its method's code does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["caption_tokens", "clip_layer_features", "images_to_float", "to_native_size", "vae_latents"]


def images_to_float(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` → float ``(B, 3, H, W)`` in ``[0, 1]``."""
    return torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float() / 255.0


def to_native_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] → ``(B, 3, size, size)``: bicubic, antialiased; unchanged at that size."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(
        images, size=(size, size), mode="bicubic", antialias=True, align_corners=False
    ).clamp(0, 1)


@torch.no_grad()
def vae_latents(
    ld, images: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Scaled VAE latents ``(B, C, h, w)`` (float32, CPU) of ``(B, 3, H, W)`` images in ``[0, 1]``: the
    posterior mean, or a sample drawn with ``generator`` (``sample=True``, NeuralDiffuser's code)."""
    native = to_native_size(images, ld.image_size)
    return ld.encode_images(native, sample=sample, generator=generator).float().cpu()


@torch.no_grad()
def caption_tokens(ld, captions: Sequence[Sequence[str | None]]) -> torch.Tensor:
    """``(B, L, D)`` (float32, CPU): each image's caption tokens averaged over its captions."""
    counts = [len(caps) for caps in captions]
    if any(n == 0 for n in counts):
        empty = [i for i, n in enumerate(counts) if n == 0]
        raise ValueError(f"every image needs at least one caption; images at rows {empty} have none")
    flat = [c if c else "" for caps in captions for c in caps]
    tokens = ld.encode_text(flat).float().cpu()  # (sum of counts, L, D)
    return torch.stack([piece.mean(0) for piece in torch.split(tokens, counts)])


@torch.no_grad()
def clip_layer_features(
    clip, images: torch.Tensor, layers: Sequence[int], site: str = "block"
) -> dict[int, torch.Tensor]:
    """``{layer: (B, T, W)}`` (float32, CPU): CLIP image-encoder outputs of ``(B, 3, H, W)`` in [0, 1]."""
    feats = clip.image_hidden_states(images, list(layers), site=site)
    return {int(layer): f.float().cpu() for layer, f in zip(layers, feats, strict=True)}
