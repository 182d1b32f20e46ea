"""Full-size architectures (random weights, published configs; nothing downloaded). Run with ``-m slow``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_backbones.py"

# parameter counts of the published checkpoints (diffusers / transformers ``num_parameters()``)
PUBLISHED = {
    "sd14_unet": 859_520_964,
    "sd14_vae": 83_653_863,
    "sd14_text_encoder": 123_060_480,
    "sd21_unet": 865_910_724,
    "sd21_vae": 83_653_863,
    "sd21_text_encoder": 340_387_840,
    "clip_vit_l14": 427_616_513,
    "clip_vit_b32": 151_277_313,
}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_backbones", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_parameter_counts_match_the_published_models(bench):
    assert bench.parameter_counts() == PUBLISHED


@pytest.mark.slow
def test_clip_vit_b32_hidden_states_are_50_by_768(bench):
    from fmrirecon.backbones.clip import ClipEmbedder
    from fmrirecon.backbones.world.models import tiny_clip_embedder

    tokenizer = tiny_clip_embedder().tokenizer  # any tokenizer: only the vision tower is exercised
    clip = ClipEmbedder(bench.build("clip_vit_b32"), tokenizer)
    images = torch.rand(1, 3, 256, 320)  # resized + centre-cropped to 224
    hidden = clip.image_hidden_states(images, [1, 2, 3, 4, 5, 6], site="mlp")
    assert [h.shape for h in hidden] == [(1, 50, 768)] * 6
    assert clip.image_embeds(images).shape == (1, 512)


@pytest.mark.slow
def test_one_sd14_sampling_step_at_full_size(bench):
    from diffusers import DDIMScheduler

    from fmrirecon.backbones.diffusion import LatentDiffusion
    from fmrirecon.backbones.sampling import ddim_sample
    from fmrirecon.backbones.world.models import tiny_clip_embedder

    tokenizer = tiny_clip_embedder().tokenizer
    tokenizer.model_max_length = 77
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    ld = LatentDiffusion(
        bench.build("sd14_vae"),
        bench.build("sd14_unet"),
        scheduler,
        bench.build("sd14_text_encoder"),
        tokenizer,
    )
    assert ld.image_size == 512 and ld.latent_shape == (4, 64, 64) and ld.context_length == 77
    context = ld.encode_text(["a red ball"])
    assert context.shape == (1, 77, 768)
    latents = ddim_sample(
        ld,
        context,
        uncond=ld.empty_text_embedding(),
        cfg_scale=7.5,
        num_steps=1,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert latents.shape == (1, 4, 64, 64) and torch.isfinite(latents).all()
