"""Ridge baseline training targets (Takagi & Nishimoto 2023 §3.2; Brain-Diffuser §2.3): per training image
the VAE latent ``z`` and the text condition ``c`` averaged over its captions, through the shared target
preparation (:mod:`fmrirecon.methods.targets`)."""

from __future__ import annotations

import numpy as np

__all__ = ["image_targets", "text_targets"]


def image_targets(ld, images_uint8: np.ndarray, batch_size: int) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` → float32 ``(N, C·h·w)`` VAE latents (posterior mean, scaled)."""
    from tqdm.auto import tqdm

    from fmrirecon.methods.targets import images_to_float, vae_latents

    out = []
    for start in tqdm(range(0, len(images_uint8), batch_size), desc="VAE latents", leave=False):
        batch = images_to_float(images_uint8[start : start + batch_size])
        out.append(vae_latents(ld, batch).flatten(1).numpy())
    return np.concatenate(out)


def text_targets(ld, captions: list[list[str]], batch_size: int) -> np.ndarray:
    """N lists of captions → float32 ``(N, L·D)`` text-encoder tokens averaged over each image's captions."""
    from tqdm.auto import tqdm

    from fmrirecon.methods.targets import caption_tokens

    step = max(1, batch_size // 5)  # about batch_size captions per call
    out = [
        caption_tokens(ld, captions[start : start + step]).flatten(1).numpy()
        for start in tqdm(range(0, len(captions), step), desc="text tokens", leave=False)
    ]
    return np.concatenate(out)
