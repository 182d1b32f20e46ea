"""Architectures of the world backbones (and of the tiny random ones used by tests), as diffusers/transformers
configs: the world backbones are the real SD/CLIP classes at small sizes, so the code paths are the real ones.

World scenes are 64x64 RGB. The VAE maps them to 4x16x16 latents (downsampling 4, SD uses 8 at 512 px); the
UNet denoises those latents conditioned on the world CLIP's text tokens (cross-attention width = text width).
"""

from __future__ import annotations

WORLD_IMAGE_SIZE = 64


def world_vae_config() -> dict:
    """AutoencoderKL 64x64x3 -> 4x16x16 (0.65 M parameters)."""
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=WORLD_IMAGE_SIZE,
        mid_block_add_attention=False,
        scaling_factor=1.0,  # replaced after training by 1 / std of the training latents (LDM §4.3.2)
    )


def world_unet_config(
    cross_attention_dim: int,
    block_out_channels: tuple[int, ...] = (32, 64, 96),
    full_resolution_attention: bool = False,
) -> dict:
    """UNet2DConditionModel on 4x16x16 latents with text cross-attention at 8x8 and 4x4, and also at 16x16
    when ``full_resolution_attention`` (the latents' own resolution, where a small object spans two or three
    latent pixels)."""
    first_down, last_up = ("DownBlock2D", "UpBlock2D")
    if full_resolution_attention:
        first_down, last_up = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D")
    return dict(
        sample_size=WORLD_IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=tuple(block_out_channels),
        down_block_types=(first_down, "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", last_up),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=32,
    )


def world_scheduler_config(prediction_type: str = "epsilon") -> dict:
    """SD's training schedule (scaled-linear betas 0.00085..0.012, 1000 steps); epsilon prediction as SD 1.x,
    or ``"v_prediction"`` as SD 2.x."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def clip_config(
    vocab_size: int,
    max_length: int,
    *,
    eos_token_id: int,
    pad_token_id: int,
    bos_token_id: int,
    image_size: int,
    patch_size: int,
    width: int,
    mlp_width: int,
    text_layers: int,
    vision_layers: int,
    heads: int,
    projection_dim: int,
) -> dict:
    """A ``CLIPConfig`` dict: a text and a vision transformer of one width, head count and MLP width."""

    def tower(layers: int) -> dict:
        return dict(
            hidden_size=width,
            intermediate_size=mlp_width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
        )

    text = tower(text_layers) | dict(
        vocab_size=vocab_size,
        max_position_embeddings=max_length,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
    )
    vision = dict(image_size=image_size, patch_size=patch_size) | tower(vision_layers)
    return dict(text_config=text, vision_config=vision, projection_dim=projection_dim)


def world_clip_config(
    vocab_size: int,
    max_length: int,
    *,
    eos_token_id: int,
    pad_token_id: int,
    bos_token_id: int,
    patch_size: int = 8,
) -> dict:
    """A tiny ViT/transformer CLIP for 64 px scenes (patch 8 -> 64 patches + CLS) and world captions."""
    return clip_config(
        vocab_size,
        max_length,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        image_size=WORLD_IMAGE_SIZE,
        patch_size=patch_size,
        width=128,
        mlp_width=512,
        text_layers=3,
        vision_layers=3,
        heads=4,
        projection_dim=128,
    )


# ---------------------------------------------------------------------------------------- tiny (tests only)
TINY_WORDS = (
    "a an the red green blue yellow purple orange white black circle square triangle star cat dog car house "
    "tree person on in of and with left right top bottom small large big grass sky sea road room photo . ,"
)


def tiny_clip_config(
    vocab_size: int, max_length: int, *, eos_token_id: int, pad_token_id: int, bos_token_id: int
) -> dict:
    return clip_config(
        vocab_size,
        max_length,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        image_size=32,
        patch_size=8,
        width=32,
        mlp_width=37,
        text_layers=2,
        vision_layers=3,
        heads=4,
        projection_dim=24,
    )


def tiny_vae_config() -> dict:
    """32x32x3 -> 4x16x16 (downsampling 2)."""
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.5,
    )


def tiny_unet_config(cross_attention_dim: int) -> dict:
    return dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
        norm_num_groups=4,
    )


def random_clip_embedder(tokenizer, config_fn, seed: int, **config_kwargs):
    """A random-weight ``ClipEmbedder`` for ``tokenizer`` (vocabulary, length and special tokens from it) with
    the architecture ``config_fn`` returns (``world_clip_config``, ``tiny_clip_config``)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from fmrirecon.backbones.clip import ClipEmbedder

    config = CLIPConfig(
        **config_fn(
            len(tokenizer),
            tokenizer.model_max_length,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            **config_kwargs,
        )
    )
    torch.manual_seed(seed)
    return ClipEmbedder(CLIPModel(config), tokenizer)


def tiny_clip_embedder(seed: int = 0):
    """A random-weight ClipEmbedder (32 px images, 12-token captions) for hermetic tests."""
    from fmrirecon.backbones.world.tokenizer import build_word_tokenizer

    return random_clip_embedder(build_word_tokenizer([TINY_WORDS], max_length=12), tiny_clip_config, seed)


def tiny_latent_diffusion(seed: int = 0):
    """A random-weight LatentDiffusion (32 px images, 4x16x16 latents, tiny CLIP text encoder) for tests."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from fmrirecon.backbones.diffusion import LatentDiffusion

    clip = tiny_clip_embedder(seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**tiny_vae_config())
    unet = UNet2DConditionModel(**tiny_unet_config(clip.model.config.text_config.hidden_size))
    scheduler = DDIMScheduler(**world_scheduler_config())
    return LatentDiffusion(vae, unet, scheduler, clip.model.text_model, clip.tokenizer)
