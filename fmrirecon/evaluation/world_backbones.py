"""Quality figures of the world backbones on held-out scenes (``fmrirecon backbones check-world``).

It lives in the evaluation layer because it scores with the evaluation metrics; the backbones never import
evaluation (one direction: backbones <- evaluation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fmrirecon.evaluation.metrics import pixcorr, retrieval_top1, two_way_identification

__all__ = ["check_world_backbones"]


@torch.no_grad()
def check_world_backbones(
    clip,
    ld,
    heldout,
    *,
    n_generate: int = 100,
    cfg_scale: float = 4.0,
    num_steps: int = 50,
    seed: int = 0,
) -> dict:
    """Quality of the world backbones on held-out scenes (figures for benchmarks/RESULTS.md).

    - ``vae_pixcorr``: PixCorr of VAE reconstructions (encode mean -> decode) vs the scenes.
    - ``clip_retrieval_top1_100``: image -> full-caption top-1 among 100 (30 random pools).
    - ``gen_two_way_clip``: images generated from the full captions of ``n_generate`` scenes, two-way
      identification against the true scenes on world-CLIP image embeddings (chance 0.5).
    - ``gen_category_zero_shot``: generated images whose primary category wins world-CLIP zero-shot
      classification over prompts "a <category>" (the same on the true scenes and on their VAE
      reconstructions: the ceiling the VAE leaves to generation).
    """
    from fmrirecon.backbones.sampling import text_to_image
    from fmrirecon.backbones.world.train import _images_tensor, full_caption
    from fmrirecon.data.world import CATEGORIES

    images = _images_tensor(heldout)
    full = [full_caption(c) for c in heldout.captions]
    recon = torch.cat(
        [ld.decode_latents(ld.encode_images(images[i : i + 100])) for i in range(0, len(images), 100)]
    )

    def image_embeds(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([clip.image_embeds(x[i : i + 100]) for i in range(0, len(x), 100)])

    img_emb = image_embeds(images)
    txt_emb = torch.cat([clip.text_embeds(full[i : i + 100]) for i in range(0, len(full), 100)])
    retrieval = retrieval_top1(txt_emb.numpy(), img_emb.numpy(), pool_size=100, n_draws=30, seed=seed)

    gen = torch.cat(
        [
            text_to_image(
                ld,
                full[i : min(i + 50, n_generate)],
                cfg_scale=cfg_scale,
                num_steps=num_steps,
                seed=seed + i,
            )
            for i in range(0, n_generate, 50)
        ]
    )
    gen_emb = image_embeds(gen)
    two_way = two_way_identification(img_emb[:n_generate].numpy(), gen_emb.numpy())
    prompts = [f"a {category}" for category in CATEGORIES]
    classifier = F.normalize(clip.text_embeds(prompts), dim=-1)

    def zero_shot_accuracy(embeddings: torch.Tensor, n: int) -> float:
        predicted = (F.normalize(embeddings, dim=-1) @ classifier.T).argmax(1).numpy()
        return float((predicted == heldout.primary_category[:n]).mean())

    recon_emb = image_embeds(recon)
    return {
        "n_heldout": len(images),
        "vae_pixcorr": float(pixcorr(recon.numpy(), images.numpy()).mean()),
        "clip_retrieval_top1_100": retrieval["brain"]["mean"],  # brain = caption side: image -> caption
        "clip_retrieval_caption_to_image_top1_100": retrieval["image"]["mean"],
        "clip_zero_shot_category_true_images": zero_shot_accuracy(img_emb, len(images)),
        # the ceiling the VAE leaves to generated images
        "clip_zero_shot_category_vae_reconstructions": zero_shot_accuracy(recon_emb, len(images)),
        "n_generated": n_generate,
        "cfg_scale": cfg_scale,
        "num_steps": num_steps,
        "gen_two_way_clip": float(two_way.mean()),
        "gen_category_zero_shot": zero_shot_accuracy(gen_emb, n_generate),
        "caption_used": "full caption (most size/colour words of the 5: every object with size and colour, "
        "relation, "
        "background)",
    }
