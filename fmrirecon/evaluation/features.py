"""Feature extractors behind one interface, and the input preprocessing each reference applies.

A :class:`FeatureExtractor` wraps one network and returns every requested node from **one** forward pass,
so a network runs once per image however many metrics read it (AlexNet ``features.4`` and
``features.11``; Inception's ``avgpool`` for two-way identification, n-way and FID plus its ``fc`` logits
for the Inception Score).

Networks (``NETWORKS``): torchvision AlexNet, Inception v3, EfficientNet-B1, ResNet-50 with SwAV weights,
OpenAI CLIP ViT-L/14 (transformers) and the package's world CLIP. Weights are looked up locally only --
``weights_dir`` first, then the torch hub cache (``torch.hub.get_dir()/checkpoints``) or the Hugging Face
cache -- and a missing file raises :class:`~fmrirecon.errors.WeightsUnavailableError` naming what was
searched. Random weights exist only behind the explicit ``random_weights_for_testing`` flag (tests and the
benchmark); nothing falls back to them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F

from fmrirecon.backbones.normalization import NORMALIZATIONS
from fmrirecon.errors import WeightsUnavailableError

NETWORKS = ("alexnet", "inception_v3", "efficientnet_b1", "swav_resnet50", "clip_vit_l14", "world_clip")


# facebookresearch/swav hubconf: ResNet-50 trained 800 epochs, the checkpoint Brain-Diffuser and MindEye load
SWAV_FILENAME = "swav_800ep_pretrain.pth.tar"
CLIP_VIT_L14_HUB_ID = "openai/clip-vit-large-patch14"


# ---------------------------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class Preprocess:
    """How one network's input is made from an image (one preset's field convention).

    Args:
        size: square side the image is resized to; ``None`` keeps the incoming size (the network or its
            wrapper resizes itself, e.g. the world CLIP).
        interpolation: ``"bilinear"`` or ``"bicubic"``.
        antialias: antialiased down-sampling (torchvision's tensor default before 0.17 was *no* antialias).
        normalization: ``"imagenet"``, ``"clip"`` or ``None`` (mean/std from ``NORMALIZATIONS``).
        backend: ``"tensor"`` resizes the float tensor with ``torch.nn.functional.interpolate`` (what
            ``torchvision.transforms.Resize`` does on tensors); ``"pil"`` resizes the uint8 image with PIL
            (Brain-Diffuser's ``T.functional.resize`` on PIL images, antialiased by PIL).
    """

    size: int | None
    interpolation: str = "bilinear"
    antialias: bool = False
    normalization: str | None = "imagenet"
    backend: str = "tensor"

    def __post_init__(self) -> None:
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {self.interpolation!r}")
        if self.normalization not in (None, *NORMALIZATIONS):
            raise ValueError(f"normalization must be one of {list(NORMALIZATIONS)} or None")
        if self.backend not in ("tensor", "pil"):
            raise ValueError(f"backend must be 'tensor' or 'pil', got {self.backend!r}")

    def describe(self) -> dict:
        out = asdict(self)
        if self.normalization:
            out["mean"], out["std"] = NORMALIZATIONS[self.normalization]
        return out

    def apply(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """float ``(B, 3, H, W)`` in [0, 1] (tensor backend) or uint8 ``(B, H, W, 3)`` (pil backend)
        -> float ``(B, 3, size, size)``, normalised."""
        if self.backend == "pil":
            x = to_float_tensor(resize_pil(np.asarray(images), self.size, self.interpolation))
        else:
            x = resize_tensor(images, self.size, self.interpolation, self.antialias)
        if self.normalization:
            mean, std = NORMALIZATIONS[self.normalization]
            x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        return x


def to_float_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` -> float32 ``(B, 3, H, W)`` in [0, 1], contiguous in NCHW.

    The permuted view is channels-last in memory, and resizes and normalisation keep that layout; on the CPU
    a network then takes its channels-last kernels, whose features differ from the reference's (contiguous
    NCHW) at about 1e-6 relative.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return x.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


def resize_tensor(x: torch.Tensor, size: int | None, interpolation: str, antialias: bool) -> torch.Tensor:
    """float ``(B, 3, H, W)`` -> ``(B, 3, size, size)``; no-op when ``size`` is None or already matches."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode=interpolation, align_corners=False, antialias=antialias)


def resize_pil(images: np.ndarray, size: int | None, interpolation: str) -> np.ndarray:
    """uint8 ``(B, H, W, 3)`` -> uint8 ``(B, size, size, 3)`` with PIL's resampling filter."""
    from PIL import Image

    if size is None or images.shape[1:3] == (size, size):
        return images
    resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[interpolation]
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), resample)) for im in images])


# ---------------------------------------------------------------------------------------------- extractors
class FeatureExtractor:
    """One network; ``extractor(pixels)`` returns ``{node: float32 (B, ...)}`` for every node in one pass.

    Attributes:
        name: network name (one of ``NETWORKS``).
        nodes: node names this extractor returns.
        module: the ``torch.nn.Module`` that runs once per batch (hooks can count its calls).
        weights: where the weights came from (recorded in ``metrics.json``).
    """

    def __init__(self, name: str, module: torch.nn.Module, nodes: Sequence[str], weights: str, device="cpu"):
        self.name = name
        self.module = module.eval().requires_grad_(False).to(device)
        self.nodes = tuple(nodes)
        self.weights = weights
        self.device = torch.device(device)

    def _forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.module(pixels)

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """pixels: float ``(B, 3, h, w)`` already preprocessed -> ``{node: (B, ...)}`` on the CPU.

        The input is made contiguous in NCHW, so a channels-last tensor gives the same features.
        """
        out = self._forward(pixels.to(self.device).contiguous())
        return {node: out[node].float().cpu() for node in self.nodes}


class ClipVisionExtractor(FeatureExtractor):
    """``CLIPVisionModelWithProjection``: node ``image_embeds`` (B, D) = OpenAI CLIP ``encode_image``."""

    def _forward(self, pixels):
        return {"image_embeds": self.module(pixels).image_embeds}  # positional: forward hooks see it


class WorldClipExtractor(FeatureExtractor):
    """The world CLIP (``ClipEmbedder.world()``); it preprocesses its [0, 1] input itself.

    Nodes: ``image_embeds`` (B, D) and ``zero_shot`` (B, C): cosine similarity to the text embedding of each
    category prompt, the world's zero-shot classifier (only the ranking matters for n-way classification).
    """

    def __init__(
        self, embedder, class_prompts: Sequence[str], nodes: Sequence[str], weights: str, device="cpu"
    ):
        super().__init__("world_clip", embedder, nodes, weights, device)
        self.class_prompts = tuple(class_prompts)
        with torch.inference_mode():
            self.text = F.normalize(embedder.text_embeds(list(self.class_prompts)).float(), dim=-1)  # (C, D)

    def _forward(self, pixels):
        embeds = self.module.image_embeds(pixels)
        return {"image_embeds": embeds, "zero_shot": F.normalize(embeds.float(), dim=-1) @ self.text.T}


# ---------------------------------------------------------------------------------------------- weights
def _search_dirs(weights_dir: str | os.PathLike | None) -> list[Path]:
    dirs = [Path(weights_dir).expanduser()] if weights_dir is not None else []
    return [*dirs, Path(torch.hub.get_dir()) / "checkpoints"]


def _find_file(network: str, filenames: Sequence[str], weights_dir) -> Path:
    dirs = _search_dirs(weights_dir)
    for folder in dirs:
        for filename in filenames:
            if (folder / filename).is_file():
                return folder / filename
    raise WeightsUnavailableError(
        f"{network} weights not found: looked for {list(filenames)} in {[str(d) for d in dirs]} "
        "(no download is attempted; put the file in --weights-dir)"
    )


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)  # foreign .pth: tensors only
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def _torchvision_weights_file(network: str, weights_enum, weights_dir) -> tuple[Path, str]:
    filename = Path(urlparse(weights_enum.url).path).name
    path = _find_file(network, [f"{network}.safetensors", filename], weights_dir)
    return path, f"{weights_enum} from {path}"


def _build_torchvision(network: str, weights_dir, random_weights: bool) -> tuple[torch.nn.Module, str]:
    from torchvision import models

    if network == "alexnet":
        weights_enum, model = models.AlexNet_Weights.IMAGENET1K_V1, models.alexnet(weights=None)
    elif network == "efficientnet_b1":
        weights_enum, model = models.EfficientNet_B1_Weights.DEFAULT, models.efficientnet_b1(weights=None)
    elif network == "inception_v3":
        weights_enum = models.Inception_V3_Weights.DEFAULT
        # the pretrained weights set transform_input=True (torchvision's builder does the same)
        model = models.inception_v3(
            weights=None, aux_logits=True, transform_input=True, init_weights=random_weights
        )
    elif network == "swav_resnet50":
        weights_enum, model = None, models.resnet50(weights=None)
        model.fc = torch.nn.Identity()  # facebookresearch/swav hubconf: backbone only
    else:
        raise ValueError(f"not a torchvision network: {network!r}")

    if random_weights:
        source = "random initialisation (testing only)"
    elif weights_enum is None:
        path = _find_file(network, [f"{network}.safetensors", SWAV_FILENAME], weights_dir)
        state = {
            k: v
            for k, v in _load_state_dict(path).items()
            if not k.startswith(("projection_head", "prototypes"))
        }
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise WeightsUnavailableError(
                f"{path} is not a SwAV ResNet-50 checkpoint: missing keys {missing[:5]}, "
                f"unexpected keys {unexpected[:5]}"
            )
        source = f"SwAV ResNet-50 (800 ep) from {path}"
    else:
        path, source = _torchvision_weights_file(network, weights_enum, weights_dir)
        model.load_state_dict(_load_state_dict(path))
    if network == "inception_v3":
        model.aux_logits, model.AuxLogits = False, None
    return model, source


def _build_clip_vit_l14(weights_dir, random_weights: bool, clip_config: dict | None):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if random_weights:
        # ViT-L/14 at 224 px unless a (tiny, for tests) config is given
        defaults = dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            patch_size=14,
            image_size=224,
            projection_dim=768,
        )
        config = CLIPVisionConfig(**{**defaults, **(clip_config or {})})
        torch.manual_seed(0)
        return CLIPVisionModelWithProjection(config), "random initialisation (testing only)"
    candidates = []
    if weights_dir is not None:
        candidates += [Path(weights_dir) / "clip-vit-large-patch14", Path(weights_dir)]
    for folder in candidates:
        if (folder / "config.json").is_file():
            try:
                model = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True)
            except (OSError, ValueError) as err:
                raise WeightsUnavailableError(f"{folder}: unusable CLIP ViT-L/14 folder ({err})") from err
            return model, f"CLIP ViT-L/14 from {folder}"
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(CLIP_VIT_L14_HUB_ID, local_files_only=True)
    except (OSError, ValueError) as err:
        raise WeightsUnavailableError(
            f"CLIP ViT-L/14 weights not found: no config.json in {[str(c) for c in candidates]} and "
            f"{CLIP_VIT_L14_HUB_ID} is not in the Hugging Face cache (no download is attempted)"
        ) from err
    return model, f"{CLIP_VIT_L14_HUB_ID} from the Hugging Face cache"


def load_extractor(
    network: str,
    nodes: Sequence[str],
    *,
    weights_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    random_weights_for_testing: bool = False,
    clip_config: dict | None = None,
    class_prompts: Sequence[str] | None = None,
) -> FeatureExtractor:
    """Build the extractor for ``network`` returning ``nodes`` (torchvision node names, or ``image_embeds`` /
    ``zero_shot`` for the CLIPs).

    Raises:
        WeightsUnavailableError: the weights are not on disk (the metric is then reported unavailable).
    """
    if network not in NETWORKS:
        raise ValueError(f"unknown network {network!r}; expected one of {NETWORKS}")
    if network == "world_clip":
        try:
            from fmrirecon.backbones.clip import ClipEmbedder
            from fmrirecon.data.world import CATEGORIES
        except ImportError as err:  # a partial install without the world backbones
            raise WeightsUnavailableError(f"world CLIP unavailable: {err}") from err
        embedder = ClipEmbedder.world()
        if class_prompts is None:
            class_prompts = [f"a {c}" for c in CATEGORIES]
        return WorldClipExtractor(embedder, class_prompts, nodes, "world CLIP shipped with fmrirecon", device)
    if network == "clip_vit_l14":
        model, source = _build_clip_vit_l14(weights_dir, random_weights_for_testing, clip_config)
        return ClipVisionExtractor(network, model, nodes, source, device)
    if random_weights_for_testing:
        torch.manual_seed(0)
    model, source = _build_torchvision(network, weights_dir, random_weights_for_testing)
    from torchvision.models.feature_extraction import create_feature_extractor

    return FeatureExtractor(
        network, create_feature_extractor(model.eval(), return_nodes=list(nodes)), nodes, source, device
    )
