"""CLIP image/text embeddings (Radford et al. 2021) behind one interface: pooled
projections, token sequences and per-block hidden states, for a transformers CLIP (hub id or folder) or
the world CLIP shipped in the package.

Preprocessing is done in torch so everything is differentiable w.r.t. the input images (NeuralDiffuser's
feature guidance back-propagates a CLIP loss into the diffusion latents): resize the shortest side to the
model's image size (bicubic, antialiased), centre-crop, normalise with the model's own mean/std (OpenAI
CLIP's by default).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from fmrirecon.backbones.hub import check_images, resolve_local_folder, tokenize_texts
from fmrirecon.backbones.normalization import CLIP_MEAN, CLIP_STD
from fmrirecon.errors import WeightsUnavailableError

# keys transformers writes into tokenizer_config.json after a load from a folder (how it was loaded, not what)
_LOAD_TIME_KEYS = ("is_local", "local_files_only", "name_or_path", "_name_or_path")


class ClipEmbedder(torch.nn.Module):
    """A frozen CLIP dual encoder with its tokenizer and image preprocessing.

    Args:
        model: transformers ``CLIPModel``.
        tokenizer: its tokenizer (``model_max_length`` = text context length).
        image_mean, image_std: per-channel normalisation applied after resizing.
        image_size: input side of the vision tower (default: ``model.config.vision_config.image_size``).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        image_mean: tuple[float, float, float] = CLIP_MEAN,
        image_std: tuple[float, float, float] = CLIP_STD,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = int(image_size or model.config.vision_config.image_size)
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, hub_id_or_dir: str | os.PathLike) -> ClipEmbedder:
        """Load ``CLIPModel`` + tokenizer (+ ``preprocessor_config.json`` settings if present), offline."""
        from transformers import AutoTokenizer, CLIPModel

        folder = resolve_local_folder(hub_id_or_dir, "CLIP")
        if not (folder / "config.json").is_file():
            raise WeightsUnavailableError(
                f"{folder / 'config.json'} missing: not a transformers CLIP folder "
                "(expected config.json, model weights, tokenizer files)"
            )
        model = CLIPModel.from_pretrained(folder, local_files_only=True)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as err:
            raise WeightsUnavailableError(f"{folder}: no usable tokenizer files ({err})") from err
        return cls(model, tokenizer, **_preprocessor_settings(folder))

    @classmethod
    def world(cls) -> ClipEmbedder:
        """The world CLIP shipped in the package (cached: repeated calls return one object)."""
        return _world_clip()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write ``config.json``, ``model.safetensors``, tokenizer files and ``preprocessor_config.json``."""
        from fmrirecon.io import atomic_path, read_json, write_json_atomic

        with atomic_path(folder) as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            # a tokenizer loaded from a folder records how it was loaded; that is not part of the tokenizer
            tokenizer_config = read_json(tmp / "tokenizer_config.json")
            dropped = [tokenizer_config.pop(key) for key in _LOAD_TIME_KEYS if key in tokenizer_config]
            if dropped:
                write_json_atomic(tmp / "tokenizer_config.json", tokenizer_config)
            write_json_atomic(
                tmp / "preprocessor_config.json",
                {
                    "image_mean": self.image_mean.flatten().tolist(),
                    "image_std": self.image_std.flatten().tolist(),
                    "crop_size": {"height": self.image_size, "width": self.image_size},
                },
            )

    # ------------------------------------------------------------------ sizes
    @property
    def embed_dim(self) -> int:
        """``D`` of the projected embeddings (``projection_dim``)."""
        return int(self.model.config.projection_dim)

    @property
    def context_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def num_image_layers(self) -> int:
        return int(self.model.config.vision_config.num_hidden_layers)

    @property
    def device(self) -> torch.device:
        return self.image_mean.device

    # ------------------------------------------------------------------ images
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> normalised ``(B, 3, S, S)``, S = ``image_size``; differentiable."""
        check_images(images)
        images = images.to(self.device)
        size = self.image_size
        h, w = images.shape[-2:]
        if (h, w) != (size, size):
            scale = size / min(h, w)
            new_hw = (max(size, round(h * scale)), max(size, round(w * scale)))
            images = F.interpolate(images, size=new_hw, mode="bicubic", align_corners=False, antialias=True)
            top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
            images = images[:, :, top : top + size, left : left + size]
        return (images - self.image_mean) / self.image_std

    def _vision(self, images: torch.Tensor, hidden_states: bool = False):
        pixel_values = self.preprocess(images).to(self.model.dtype)
        return self.model.vision_model(pixel_values=pixel_values, output_hidden_states=hidden_states)

    def image_embeds(self, images: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
        """Projected image embeddings ``(B, D)`` (pooled CLS through ``visual_projection``)."""
        out = self.model.visual_projection(self._vision(images).pooler_output)
        return F.normalize(out, dim=-1) if normalize else out

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Last hidden state of the vision tower ``(B, T, W)``, T = patches + 1 (50 for ViT-B/32, 224 px)."""
        return self._vision(images).last_hidden_state

    def image_hidden_states(
        self, images: torch.Tensor, layers: list[int], *, site: str = "block"
    ) -> list[torch.Tensor]:
        """Hidden states of selected vision transformer blocks, each ``(B, T, W)``.

        Args:
            layers: block numbers, 1-based (1..num_layers); 0 = the embeddings entering block 1.
            site: ``"block"`` = the residual-stream output of the block (transformers ``hidden_states[l]``);
                ``"mlp"`` = the block's MLP output projection before the residual add (what NeuralDiffuser's
                released code hooks for its guidance features).
        """
        n = self.num_image_layers
        bad = [layer for layer in layers if not 0 <= layer <= n or (site == "mlp" and layer == 0)]
        if bad or not layers:
            raise ValueError(
                f"layers must be block numbers in 1..{n} (0 = embeddings, site='block'), got {layers}"
            )
        if site == "block":
            hidden = self._vision(images, hidden_states=True).hidden_states
            return [hidden[layer] for layer in layers]
        if site != "mlp":
            raise ValueError(f"site must be 'block' or 'mlp', got {site!r}")
        captured: dict[int, torch.Tensor] = {}
        handles = [
            self.model.vision_model.encoder.layers[layer - 1].mlp.fc2.register_forward_hook(
                lambda _m, _i, out, layer=layer: captured.__setitem__(layer, out)
            )
            for layer in set(layers)
        ]
        try:
            self._vision(images)
        finally:
            for handle in handles:
                handle.remove()
        return [captured[layer] for layer in layers]

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: list[str] | str) -> torch.Tensor:
        """Token ids ``(B, L)`` padded/truncated to ``context_length``."""
        return tokenize_texts(self.tokenizer, texts, self.context_length).to(self.device)

    def text_embeds(self, texts: list[str] | str, *, normalize: bool = False) -> torch.Tensor:
        """Projected text embeddings ``(B, D)`` (EOS token through ``text_projection``)."""
        out = self.model.text_model(input_ids=self.tokenize(texts))
        out = self.model.text_projection(out.pooler_output)
        return F.normalize(out, dim=-1) if normalize else out

    def text_tokens(self, texts: list[str] | str) -> torch.Tensor:
        """Text token sequence ``(B, L, W)``: last hidden state after the final layer norm (SD's context)."""
        return self.model.text_model(input_ids=self.tokenize(texts)).last_hidden_state


def _preprocessor_settings(folder: Path) -> dict:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text(encoding="utf-8"))
    settings = {}
    if "image_mean" in config:
        settings["image_mean"] = tuple(config["image_mean"])
    if "image_std" in config:
        settings["image_std"] = tuple(config["image_std"])
    crop = config.get("crop_size")
    if isinstance(crop, dict) and "height" in crop:
        settings["image_size"] = int(crop["height"])
    elif isinstance(crop, int):
        settings["image_size"] = crop
    return settings


@functools.lru_cache(maxsize=1)
def _world_clip() -> ClipEmbedder:
    from fmrirecon.backbones.world import WEIGHTS_DIR

    folder = WEIGHTS_DIR / "clip"
    if not (folder / "config.json").is_file():
        raise WeightsUnavailableError(
            f"world CLIP weights missing at {folder}: run `fmrirecon backbones train-world` "
            "(or reinstall fmrirecon)"
        )
    return ClipEmbedder.from_pretrained(folder)
