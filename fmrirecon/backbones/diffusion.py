"""Latent diffusion backbone: VAE + UNet + scheduler + text encoder/tokenizer behind one small interface.

Real users load Stable Diffusion 1.x / 2.x from a diffusers-format folder or a hub id already in the local
cache (``LatentDiffusion.from_pretrained``); the embedded default is the world backbone shipped with the
package (``LatentDiffusion.world()``), whose text encoder is the world CLIP's text tower, as SD uses
OpenAI/Open CLIP text (Rombach et al. 2022, §3.3). Nothing is ever downloaded.

Every constant comes from the components: the latent scaling from ``vae.config.scaling_factor``, the image
size from ``unet.config.sample_size`` times the VAE's downsampling, the token count from
``tokenizer.model_max_length``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from fmrirecon.backbones.hub import check_images, resolve_local_folder, tokenize_texts
from fmrirecon.errors import WeightsUnavailableError

# diffusers' Stable Diffusion folder layout: component -> the file that must be there
SD_COMPONENTS = {
    "vae": "config.json",
    "unet": "config.json",
    "scheduler": "scheduler_config.json",
    "text_encoder": "config.json",
    "tokenizer": "tokenizer_config.json",
}
SD_LAYOUT = "expected vae/, unet/, scheduler/, text_encoder/, tokenizer/"


def check_sd_folder(folder: Path, components: tuple[str, ...] = tuple(SD_COMPONENTS)) -> None:
    """Raise :class:`WeightsUnavailableError` naming the first missing component of a diffusers SD folder."""
    for name in components:
        needed = folder / name / SD_COMPONENTS[name]
        if name == "tokenizer" and (folder / name).is_dir() and any((folder / name).iterdir()):
            continue  # tokenizers come as vocab.json+merges.txt, tokenizer.json or tokenizer_config.json
        if not needed.is_file():
            raise WeightsUnavailableError(
                f"{needed} missing: not a diffusers Stable Diffusion folder ({SD_LAYOUT})"
            )


class LatentDiffusion(torch.nn.Module):
    """A latent diffusion model (LDM, Rombach et al. 2022): VAE, denoising UNet, DDIM scheduler, text encoder.

    Args:
        vae: diffusers ``AutoencoderKL``; ``vae.config.scaling_factor`` scales latents to unit variance
            (LDM §4.3.2).
        unet: diffusers ``UNet2DConditionModel`` predicting noise (or v, see
            ``scheduler.config.prediction_type``).
        scheduler: a diffusers scheduler (config source); sampling builds a fresh ``DDIMScheduler`` from it.
        text_encoder: transformers ``CLIPTextModel`` (or any model whose output ``[0]`` is ``(B, L, D)``).
        tokenizer: a transformers tokenizer; ``model_max_length`` is the context length ``L``.
    """

    def __init__(self, vae, unet, scheduler, text_encoder, tokenizer) -> None:
        super().__init__()
        self.vae = vae
        self.unet = unet
        self.text_encoder = text_encoder
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        for module in (vae, unet, text_encoder):
            module.requires_grad_(False)
        self.eval()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, hub_id_or_dir: str | os.PathLike) -> LatentDiffusion:
        """Build from a diffusers-format Stable Diffusion folder (SD 1.x or 2.x) or a cached hub id, offline.

        Raises:
            WeightsUnavailableError: the folder lacks a component (the message names it) or the hub id is not
                in the local cache.
        """
        folder = resolve_local_folder(hub_id_or_dir, "Stable Diffusion")
        check_sd_folder(folder)
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        local = {"local_files_only": True}
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **local)
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **local)
        # SD folders ship a PNDM config; DDIM reads the same beta schedule and prediction type from it.
        scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler", **local)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **local)
        tokenizer = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer", **local)
        return cls(vae, unet, scheduler, text_encoder, tokenizer)

    @classmethod
    def world(cls) -> LatentDiffusion:
        """The world latent diffusion model shipped in the package (cached: repeated calls return one object).

        Its text encoder is the world CLIP's text tower (shared with ``ClipEmbedder.world()``).
        """
        return _world_latent_diffusion()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write a diffusers folder (``vae/ unet/ scheduler/ text_encoder/ tokenizer/``), atomically."""
        from fmrirecon.io import atomic_path

        with atomic_path(folder) as tmp:
            self.vae.save_pretrained(tmp / "vae")
            self.unet.save_pretrained(tmp / "unet")
            self.scheduler.save_pretrained(tmp / "scheduler")
            self.text_encoder.save_pretrained(tmp / "text_encoder")
            self.tokenizer.save_pretrained(tmp / "tokenizer")

    # ------------------------------------------------------------------ sizes read from the configs
    @property
    def vae_scale_factor(self) -> int:
        """Spatial downsampling of the VAE: 2 ** (number of encoder blocks - 1) (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of the UNet's latents, from ``unet.config`` (SD 1.x: (4, 64, 64))."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, h, w)

    @property
    def image_size(self) -> int:
        """Native image side in pixels: latent side times the VAE downsampling (SD 1.x: 512, SD 2.1: 768)."""
        return self.latent_shape[1] * self.vae_scale_factor

    @property
    def context_length(self) -> int:
        """Number of text tokens ``L`` (tokenizer ``model_max_length``)."""
        return int(self.tokenizer.model_max_length)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    # ------------------------------------------------------------------ operations
    def encode_images(self, images: torch.Tensor, *, sample: bool = False, generator=None) -> torch.Tensor:
        """Encode images to scaled latents.

        Args:
            images: float ``(B, 3, H, W)`` in ``[0, 1]``; H and W multiples of ``vae_scale_factor``.
            sample: draw from the posterior (the NeuralDiffuser targets do) instead of taking its mean.
        Returns:
            latents ``(B, C, H/f, W/f)`` times ``vae.config.scaling_factor`` (minus ``shift_factor`` if set).
        """
        check_images(images, self.vae_scale_factor)
        images = images.to(device=self.device, dtype=self.vae.dtype)
        posterior = self.vae.encode(images * 2 - 1).latent_dist
        latents = posterior.sample(generator=generator) if sample else posterior.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode scaled latents ``(B, C, h, w)`` to images float ``(B, 3, h*f, w*f)`` in ``[0, 1]``.

        Differentiable (feature guidance back-propagates through the decoder); wrap in ``torch.no_grad()``
        when no gradient is needed.
        """
        channels = self.vae.config.latent_channels
        if latents.ndim != 4 or latents.shape[1] != channels:
            raise ValueError(f"latents must be (B, {channels}, h, w), got {tuple(latents.shape)}")
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = (
            latents.to(device=self.device, dtype=self.vae.dtype) / self.vae.config.scaling_factor + shift
        )
        images = self.vae.decode(latents).sample
        return ((images + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def encode_text(self, texts: list[str] | str) -> torch.Tensor:
        """Text -> context ``(B, L, D)``: last hidden state after the final layer norm, as SD uses it."""
        input_ids = tokenize_texts(self.tokenizer, texts, self.context_length)
        return self.text_encoder(input_ids.to(self.device))[0]

    def empty_text_embedding(self) -> torch.Tensor:
        """The unconditional context: encoding of the empty string, ``(1, L, D)`` (cached per instance)."""
        cached = self.__dict__.get("_empty_text")
        if cached is None or cached.device != self.device:
            cached = self.encode_text([""])
            self.__dict__["_empty_text"] = cached
        return cached


def load_world_latent_diffusion(weights_dir: Path, text_encoder, tokenizer) -> LatentDiffusion:
    """The world latent diffusion model in ``weights_dir/latent_diffusion`` (diffusers ``vae/``, ``unet/``,
    ``scheduler/``) with the given text encoder and tokenizer (the world CLIP's text tower: one module)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    folder = Path(weights_dir) / "latent_diffusion"
    check_sd_folder(folder, ("vae", "unet", "scheduler"))
    local = {"local_files_only": True}
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **local)
    # the UNet ships in float16 (file size); compute in float32 on CPU
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32, **local)
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler", **local)
    return LatentDiffusion(vae, unet, scheduler, text_encoder, tokenizer)


@functools.lru_cache(maxsize=1)
def _world_latent_diffusion() -> LatentDiffusion:
    from fmrirecon.backbones.clip import ClipEmbedder
    from fmrirecon.backbones.world import WEIGHTS_DIR

    clip = ClipEmbedder.world()
    return load_world_latent_diffusion(WEIGHTS_DIR, clip.model.text_model, clip.tokenizer)
