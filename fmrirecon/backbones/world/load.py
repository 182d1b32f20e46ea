"""Load a world weights folder: ``(ClipEmbedder, LatentDiffusion)`` sharing one text tower."""

from __future__ import annotations

from pathlib import Path

from fmrirecon.backbones.clip import ClipEmbedder
from fmrirecon.backbones.diffusion import load_world_latent_diffusion
from fmrirecon.backbones.world import WEIGHTS_DIR
from fmrirecon.errors import WeightsUnavailableError

__all__ = ["load_world_backbones"]


def load_world_backbones(weights_dir: Path = WEIGHTS_DIR, clip: ClipEmbedder | None = None):
    """``(ClipEmbedder, LatentDiffusion)`` from a world weights folder; the diffusion model's text encoder and
    tokenizer are the CLIP's own text tower and tokenizer (one module, shared). ``clip``: reuse a loaded
    one."""
    weights_dir = Path(weights_dir)
    if clip is None and not (weights_dir / "clip" / "config.json").is_file():
        raise WeightsUnavailableError(
            f"world CLIP weights missing at {weights_dir / 'clip'}: run `fmrirecon backbones train-world`"
        )
    clip = clip or ClipEmbedder.from_pretrained(weights_dir / "clip")
    return clip, load_world_latent_diffusion(weights_dir, clip.model.text_model, clip.tokenizer)
