"""Ridge baseline reconstruction: DDIM img2img (SDEdit) from the decoded latent ``ẑ`` under the decoded text
condition ``ĉ`` with classifier-free guidance against the empty text (Brain-Diffuser §2.3), or the VAE decode
of ``ẑ`` alone (variant ``latent``, Takagi Fig. 3 "z only")."""

from __future__ import annotations

import numpy as np

__all__ = ["sample_images"]


def sample_images(
    ld, z: np.ndarray, c: np.ndarray | None, settings, *, variant: str, samples: int, seed: int
):
    """``z (N, C, h, w)``, ``c (N, L, D)`` or None → uint8 ``(N, K, S, S, 3)``, S = the backbone's image
    size.

    ``settings``: :class:`~fmrirecon.methods.ridge.method.RidgeReconstruction` (strength, num_steps,
    cfg_scale, batch_size). Sample k draws from a generator seeded by ``(seed, k)``, so it does not depend on
    the batch size.
    """
    import torch
    from tqdm.auto import tqdm

    from fmrirecon.backbones.sampling import ddim_sample

    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    dev, dtype = ld.device, ld.dtype
    uncond = ld.empty_text_embedding()
    n, bs = len(z), settings.batch_size
    out = []
    with torch.no_grad():
        for k in range(samples if variant == "img2img" else 1):
            generator = torch.Generator().manual_seed(
                int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
            )
            images = []
            for start in tqdm(range(0, n, bs), desc=f"ridge {variant} sample {k}", leave=False):
                z_b = torch.from_numpy(z[start : start + bs]).to(dev, dtype)
                if variant == "latent":
                    latents = z_b
                else:
                    ctx = (
                        torch.from_numpy(c[start : start + bs])
                        if c is not None
                        else uncond.expand(len(z_b), -1, -1)
                    ).to(dev, dtype)
                    latents = ddim_sample(
                        ld,
                        ctx,
                        uncond=uncond,
                        cfg_scale=settings.cfg_scale,
                        num_steps=settings.num_steps,
                        init_latents=z_b,
                        strength=settings.strength,
                        generator=generator,
                        progress=False,
                    )
                images.append(ld.decode_latents(latents).float().cpu())
            out.append(torch.cat(images))
    stacked = torch.stack(out, dim=1)  # (N, K', 3, S, S)
    if variant == "latent" and samples > 1:  # deterministic: every sample is the same decode
        stacked = stacked.expand(-1, samples, -1, -1, -1)
    return stacked.permute(0, 1, 3, 4, 2).mul(255).round().clamp(0, 255).to(torch.uint8).numpy()
