"""World backbones: small models trained on the synthetic world and shipped with the package.

``weights/clip/`` is a transformers CLIP folder (tiny ``CLIPConfig`` + word-level tokenizer);
``weights/latent_diffusion/`` holds the diffusers ``vae/``, ``unet/`` and ``scheduler/`` of the world latent
diffusion model, whose text encoder is the world CLIP's text tower. ``fmrirecon backbones train-world``
rebuilds both (``fmrirecon.backbones.world.train``); ``fmrirecon.backbones.world.load.load_world_backbones``
loads a weights folder. This module holds only paths, so the backbone modules can import it.
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
