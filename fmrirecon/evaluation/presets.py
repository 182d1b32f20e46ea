"""Named evaluation presets: every resize, normalisation and network choice of a protocol, in one place.

- ``mindeye``: MindEye / MindEye2 / NeuroPictor ``Reconstruction_Metrics.py`` (the field's 8-metric
  table), plus extras read from the same Inception pass (Mind Reader n-way, CnD-style n-way
  classification with Inception's ImageNet logits, FID, IS), retrieval and brain correlation when their
  inputs exist.
- ``braindiffuser``: Brain-Diffuser ``eval_extract_features.py`` + ``evaluate_reconstruction.py``: PIL
  inputs at 224 px for every network, pixel metrics at 425 px (PIL bicubic), per-column SSIM (its
  scikit-image 0.17).
- ``world``: the synthetic world: pixel metrics at the ground truth's own size, the world CLIP for
  two-way identification, n-way identification and zero-shot n-way classification, retrieval, brain
  correlation with the simulator's noiseless encoding model.

Facts are from ``shared/reference/evaluation-protocol.md``; a preset is data, ``suite.py`` runs it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from fmrirecon.errors import EvaluationInputError
from fmrirecon.evaluation.features import Preprocess


@dataclass(frozen=True)
class FeatureMetric:
    """A metric read from one network node: ``score`` is ``"two_way"`` (higher is better, chance 0.5) or
    ``"correlation_distance"`` (lower is better)."""

    key: str
    network: str
    node: str
    score: str


@dataclass(frozen=True)
class Preset:
    """An evaluation protocol.

    Args:
        name, description: shown in ``metrics.json`` and the report.
        backend: ``"tensor"`` (float tensors, torch interpolation) or ``"pil"`` (uint8 PIL resizes per image).
        common_size: tensor backend only: every image is first resized to this square side (MindEye stores all
            images at 256 px); ``None`` = the ground truth's own size (reconstructions are resized to it).
        common_antialias: antialias of that first resize (MindEye's pinned torchvision: none).
        pixel: how PixCorr/SSIM inputs are made from the common image (MindEye: 425 px bilinear).
        ssim_variant: ``"2d"`` or ``"per_column"`` (see ``metrics.ssim``).
        networks: network -> its input preprocessing (applied to the common image, or the uint8 original with
            the PIL backend).
        feature_metrics: metrics read from network nodes.
        nway_identification: (network, node) whose embeddings Mind Reader's n-way compares by cosine.
        nway_classification: (network, node) giving class scores for CnD's n-way classification.
        fid_is: (network, feature node, logits node) for FID and Inception Score.
        retrieval, brain_correlation: whether to score them when their inputs exist.
    """

    name: str
    description: str
    backend: str
    common_size: int | None
    common_antialias: bool
    pixel: Preprocess
    ssim_variant: str
    networks: dict[str, Preprocess]
    feature_metrics: tuple[FeatureMetric, ...]
    nway_identification: tuple[str, str] | None = None
    nway_ns: tuple[int, ...] = (2, 5, 10, 50)
    nway_repeats: int = 10  # Mind Reader A.4
    nway_classification: tuple[str, str] | None = None
    nway_class_ns: tuple[int, ...] = (2, 5, 10, 50, 100)
    nway_class_trials: int = 50  # MinD-Vis / CnD: N trials per image
    fid_is: tuple[str, str, str] | None = None
    retrieval: bool = True
    retrieval_pool_size: int = 300
    retrieval_draws: int = 30
    retrieval_seed: int = 42  # MindEye2
    brain_correlation: bool = True
    seed: int = 0
    notes: tuple[str, ...] = field(default=())

    def nodes(self, network: str) -> list[str]:
        """Every node of ``network`` this preset reads (all from one forward pass)."""
        nodes = [m.node for m in self.feature_metrics if m.network == network]
        for spec in (self.nway_identification, self.nway_classification):
            if spec and spec[0] == network:
                nodes.append(spec[1])
        if self.fid_is and self.fid_is[0] == network:
            nodes += list(self.fid_is[1:])
        return list(dict.fromkeys(nodes))

    def settings(self) -> dict:
        """JSON-able record of every choice (written into ``metrics.json``)."""
        out = asdict(self)
        out["pixel"] = self.pixel.describe()
        out["networks"] = {name: pre.describe() for name, pre in self.networks.items()}
        out["network_nodes"] = {name: self.nodes(name) for name in self.networks}
        return out


_ALEXNET_AND_CO = (
    FeatureMetric("alexnet2", "alexnet", "features.4", "two_way"),
    FeatureMetric("alexnet5", "alexnet", "features.11", "two_way"),
    FeatureMetric("inception", "inception_v3", "avgpool", "two_way"),
    FeatureMetric("clip", "clip_vit_l14", "image_embeds", "two_way"),
    FeatureMetric("effnet", "efficientnet_b1", "avgpool", "correlation_distance"),
    FeatureMetric("swav", "swav_resnet50", "avgpool", "correlation_distance"),
)


def mindeye() -> Preset:
    """MindEye's ``Reconstruction_Metrics.py``: tensors resized without antialias (its pinned torchvision)."""
    no_aa = dict(interpolation="bilinear", antialias=False)
    return Preset(
        name="mindeye",
        description="MindEye/MindEye2/NeuroPictor: 256 px pre-resize (no antialias), 2-D SSIM at 425 px",
        backend="tensor",
        common_size=256,
        common_antialias=False,
        pixel=Preprocess(425, normalization=None, **no_aa),
        ssim_variant="2d",
        networks={
            "alexnet": Preprocess(256, normalization="imagenet", **no_aa),
            "inception_v3": Preprocess(342, normalization="imagenet", **no_aa),
            "clip_vit_l14": Preprocess(224, normalization="clip", **no_aa),
            "efficientnet_b1": Preprocess(255, normalization="imagenet", **no_aa),
            "swav_resnet50": Preprocess(224, normalization="imagenet", **no_aa),
        },
        feature_metrics=_ALEXNET_AND_CO,
        nway_identification=("inception_v3", "avgpool"),
        nway_classification=("inception_v3", "fc"),
        fid_is=("inception_v3", "avgpool", "fc"),
        notes=(
            "NeuroPictor resizes CLIP inputs bicubic; MindEye bilinear (used here).",
            "FID/IS use torchvision's Inception v3 at the preset's 342 px in the same pass as the Inception "
            "metric, not pytorch-fid's FID-specific weights at 299 px: compare FID only within this preset.",
            "n-way classification uses Inception v3's ImageNet logits as the classifier (CnD used another "
            "ImageNet classifier).",
        ),
    )


def braindiffuser() -> Preset:
    """Brain-Diffuser's evaluation: PIL ``T.functional.resize(img, (224, 224))`` for every network."""
    pil = dict(interpolation="bilinear", antialias=True, backend="pil")
    return Preset(
        name="braindiffuser",
        description="Brain-Diffuser metrics: PIL inputs at 224 px, per-column SSIM at 425 px",
        backend="pil",
        common_size=None,
        common_antialias=True,
        # PIL Image.resize((425, 425)) with its default filter (bicubic); NSD truths are already 425 px
        pixel=Preprocess(425, interpolation="bicubic", antialias=True, normalization=None, backend="pil"),
        ssim_variant="per_column",
        networks={
            "alexnet": Preprocess(224, normalization="imagenet", **pil),
            "inception_v3": Preprocess(224, normalization="imagenet", **pil),
            "clip_vit_l14": Preprocess(224, normalization="clip", **pil),
            "efficientnet_b1": Preprocess(224, normalization="imagenet", **pil),
            "swav_resnet50": Preprocess(224, normalization="imagenet", **pil),
        },
        feature_metrics=_ALEXNET_AND_CO,
        retrieval=False,
        brain_correlation=False,
        notes=("PixCorr flattens H, W, C order; Pearson r does not depend on the order.",),
    )


def world() -> Preset:
    """The synthetic world: world CLIP features and the simulator as the perfect encoding model."""
    return Preset(
        name="world",
        description="Synthetic world: pixels at truth size, world CLIP 2-way/n-way, retrieval, brain corr",
        backend="tensor",
        common_size=None,
        common_antialias=True,
        pixel=Preprocess(None, normalization=None),
        ssim_variant="2d",
        # the world CLIP resizes and normalises its [0, 1] input itself (ClipEmbedder.preprocess)
        networks={"world_clip": Preprocess(None, normalization=None)},
        feature_metrics=(FeatureMetric("clip", "world_clip", "image_embeds", "two_way"),),
        nway_identification=("world_clip", "image_embeds"),
        nway_classification=("world_clip", "zero_shot"),
        nway_class_ns=(2, 5, 10),
        notes=("n-way classification: world CLIP zero-shot scores against the prompts 'a <category>'.",),
    )


PRESETS = {"mindeye": mindeye, "braindiffuser": braindiffuser, "world": world}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; raises ``EvaluationInputError`` for an unknown name."""
    if name not in PRESETS:
        raise EvaluationInputError(f"unknown evaluation preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]()
