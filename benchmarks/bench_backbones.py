"""Backbone benchmarks: world sampling time per image, full-size (SD 1.4) UNet step time on CPU, parameter
counts of the published full-size architectures (random weights, built from the configs below; nothing
downloaded).

    python benchmarks/bench_backbones.py --world --full --counts [--threads 2] [--out results.json]

The configs are the published diffusers/transformers ``config.json`` values of each model, written out
here.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime

import torch

SD14_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    act_fn="silu",
    center_input_sample=False,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
)
SD21_UNET = dict(
    SD14_UNET,
    sample_size=96,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
)
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=512,
    scaling_factor=0.18215,
)
SD21_VAE = dict(SD_VAE, sample_size=768)
# SD 1.x text encoder = OpenAI CLIP ViT-L/14 text tower
CLIP_L14_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
# SD 2.x text encoder = OpenCLIP ViT-H/14 text tower, 23 of 24 layers (SD 2 uses the penultimate layer)
OPENCLIP_H_TEXT_SD2 = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=512,
)
CLIP_L14 = dict(
    text_config=CLIP_L14_TEXT,
    vision_config=dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="quick_gelu",
        projection_dim=768,
    ),
    projection_dim=768,
)
CLIP_B32 = dict(
    text_config=dict(
        vocab_size=49408,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=8,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=512,
    ),
    vision_config=dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=32,
        hidden_act="quick_gelu",
        projection_dim=512,
    ),
    projection_dim=512,
)


def build(name: str):
    """Instantiate one full-size component (on the current default device; use ``torch.device('meta')`` to
    count parameters without allocating)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

    if name == "sd14_unet":
        return UNet2DConditionModel(**SD14_UNET)
    if name == "sd21_unet":
        return UNet2DConditionModel(**SD21_UNET)
    if name in ("sd14_vae", "sd21_vae"):
        return AutoencoderKL(**(SD_VAE if name == "sd14_vae" else SD21_VAE))
    if name == "sd14_text_encoder":
        return CLIPTextModel(CLIPTextConfig(**CLIP_L14_TEXT))
    if name == "sd21_text_encoder":
        return CLIPTextModel(CLIPTextConfig(**OPENCLIP_H_TEXT_SD2))
    if name == "clip_vit_l14":
        return CLIPModel(CLIPConfig(**CLIP_L14))
    if name == "clip_vit_b32":
        return CLIPModel(CLIPConfig(**CLIP_B32))
    raise KeyError(name)


COMPONENTS = (
    "sd14_unet",
    "sd14_vae",
    "sd14_text_encoder",
    "sd21_unet",
    "sd21_vae",
    "sd21_text_encoder",
    "clip_vit_l14",
    "clip_vit_b32",
)


def parameter_counts() -> dict[str, int]:
    counts = {}
    for name in COMPONENTS:
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in build(name).parameters())
    return counts


def bench_world(n_images: int = 8, num_steps: int = 50, cfg_scale: float = 4.0) -> dict:
    from fmrirecon.backbones.diffusion import LatentDiffusion
    from fmrirecon.backbones.sampling import text_to_image
    from fmrirecon.backbones.world.train import WorldTrainConfig, full_caption
    from fmrirecon.data.world import make_world

    ld = LatentDiffusion.world()
    captions = [full_caption(c) for c in make_world(n_images, seed=WorldTrainConfig().heldout_seed).captions]
    text_to_image(ld, captions[:1], num_steps=2, progress=False)  # warm-up
    t0 = time.perf_counter()
    text_to_image(ld, captions, num_steps=num_steps, cfg_scale=cfg_scale, progress=False)
    elapsed = time.perf_counter() - t0
    return {
        "world_batch": n_images,
        "world_steps": num_steps,
        "world_cfg": True,
        "world_s_per_image": elapsed / n_images,
    }


def bench_full_unet_step(repeats: int = 2) -> dict:
    """Time per SD 1.4 UNet step for one image with CFG (batch 2, 64x64 latents, 77x768 context)."""
    unet = build("sd14_unet").eval()
    z = torch.randn(2, 4, 64, 64)
    context = torch.randn(2, 77, 768)
    with torch.no_grad():
        unet(z, 500, encoder_hidden_states=context)  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            unet(z, 500, encoder_hidden_states=context)
    return {"sd14_unet_s_per_step_cfg_batch2": (time.perf_counter() - t0) / repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", action="store_true")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--counts", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.processor() or ''} torch threads={args.threads}".strip(),
        "torch": torch.__version__,
    }
    if args.counts:
        results["parameter_counts"] = parameter_counts()
    if args.world:
        results.update(bench_world())
    if args.full:
        results.update(bench_full_unet_step())
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
