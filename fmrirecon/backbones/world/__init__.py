"""World backbones: small models trained on the synthetic world and shipped with the package.

``weights/clip/`` is a transformers CLIP folder (tiny ``CLIPConfig`` + word-level tokenizer);
``weights/latent_diffusion/`` holds the diffusers ``vae/``, ``unet/`` and ``scheduler/`` of the world latent
diffusion model, whose text encoder is the world CLIP's text tower. ``fmrirecon backbones train-world``
rebuilds both (``fmrirecon.backbones.world.train``).
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def load_world_backbones(weights_dir: Path = WEIGHTS_DIR, clip=None):
    """``(ClipEmbedder, LatentDiffusion)`` from a world weights folder; the diffusion model's text encoder and
    tokenizer are the CLIP's own text tower and tokenizer (one module, shared). ``clip``: reuse a loaded
    one."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from fmrirecon.backbones.clip import ClipEmbedder
    from fmrirecon.backbones.diffusion import LatentDiffusion, check_sd_folder
    from fmrirecon.errors import WeightsUnavailableError

    weights_dir = Path(weights_dir)
    if clip is None and not (weights_dir / "clip" / "config.json").is_file():
        raise WeightsUnavailableError(
            f"world CLIP weights missing at {weights_dir / 'clip'}: run `fmrirecon backbones train-world`"
        )
    clip = clip or ClipEmbedder.from_pretrained(weights_dir / "clip")
    folder = weights_dir / "latent_diffusion"
    check_sd_folder(folder, ("vae", "unet", "scheduler"))
    local = {"local_files_only": True}
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **local)
    # the UNet ships in float16 (file size); compute in float32 on CPU
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32, **local)
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler", **local)
    return clip, LatentDiffusion(vae, unet, scheduler, clip.model.text_model, clip.tokenizer)
