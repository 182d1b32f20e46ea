"""NeuralDiffuser reconstruction with primary visual feature guidance (§4.3, Algorithm 1).

img2img from the decoded, momentum-aligned latent ``ẑ`` (strength 0.75 of 50 DDIM steps), classifier-free
guidance with the decoded text condition ``ĉ`` against the empty-text embedding, and on the first ``η`` of the
steps that run, the feature-guidance correction of the noise prediction:

    ẑ0 = (z_t − √(1−ᾱ_t)·ε) / √ᾱ_t                    (Eq. 11, Tweedie, with s(z_t) = −ε/√(1−ᾱ_t))
    ẑ_t = √(1−ᾱ_t)·ẑ0 + (1 − √(1−ᾱ_t))·z_t            (Eq. 12)
    L_g = κ · Σ_l w_l · MSE(f^l(D(ẑ_t)), ĝ^l)            (Eq. 14; w_l ∝ 1/‖ĝ^l‖ × layer factors, as the code)
    ε̂ = ε + √(1−ᾱ_t) · ∇_{z_t} L_g                     (Algorithm 1 line 8), then the DDIM step with ε̂.

``ε`` for the Tweedie estimate is the conditional branch's prediction; on guided steps the sampler runs that
branch with autograd (:meth:`FeatureGuidance.needs_graph`), so ``∇_{z_t}`` flows through the UNet, the VAE
decoder ``D`` and the CLIP image encoder ``f`` without a second UNet pass. A v-predicting UNet (SD 2.x) is
handled in ε-space: ``ε = √ᾱ_t·v + √(1−ᾱ_t)·z_t`` going in, ``v̂ = v + √(1−ᾱ_t)·∇/√ᾱ_t`` coming out.
The released code's variant of Eq. 11 (``(1−ᾱ_t)`` in place of ``√(1−ᾱ_t)``) and its ImageNet normalisation
of CLIP inputs are options (``tweedie="code"``, ``clip_normalization="imagenet"``). Self-attention guidance
(SAG, 0.75 in the released code's setup) runs in the sampler on every step, guided or not (``sag_scale``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from fmrirecon.backbones.normalization import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

PAPER_LAYER_FACTORS = (1.5, 1.2, 1.0, 1.0, 1.0, 1.0)


def imagenet_as_clip_input(images: torch.Tensor) -> torch.Tensor:
    """Images the CLIP embedder (which applies CLIP's normalisation) sees as ImageNet-normalised.

    ``(B, 3, H, W)`` in ``[0, 1]`` → ``x'`` with ``(x' − μ_clip)/σ_clip = (x − μ_in)/σ_in`` (released code).
    """
    shape = (1, 3, 1, 1)
    mean_in, std_in = (
        torch.tensor(v, dtype=images.dtype, device=images.device).view(shape)
        for v in (IMAGENET_MEAN, IMAGENET_STD)
    )
    mean_c, std_c = (
        torch.tensor(v, dtype=images.dtype, device=images.device).view(shape) for v in (CLIP_MEAN, CLIP_STD)
    )
    return (images - mean_in) / std_in * std_c + mean_c


def layer_weights(targets: Sequence[torch.Tensor], factors: Sequence[float] = PAPER_LAYER_FACTORS) -> list:
    """``w_l = factor_l / ‖ĝ^l‖`` per sample (the code's weighting); ``(B,)`` per layer.

    Layers beyond ``len(factors)`` get factor 1.
    """
    out = []
    for i, target in enumerate(targets):
        factor = factors[i] if i < len(factors) else 1.0
        out.append(factor / target.flatten(1).norm(dim=1).clamp_min(1e-8))
    return out


def weighted_feature_loss(
    feats: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Per-sample ``Σ_l w_l · MSE(f^l, ĝ^l)`` in float32 (Eq. 14 without κ): ``(B,)``."""
    if len(feats) != len(targets):
        raise ValueError(f"feature extractor returned {len(feats)} layers, expected {len(targets)}")
    total = 0.0
    for feat, target, weight in zip(feats, targets, weights):
        feat = feat.float()
        total = total + weight.to(feat) * ((feat - target.to(feat)) ** 2).flatten(1).mean(1)
    return total


@dataclass
class FeatureGuidance:
    """Step hook of :func:`fmrirecon.backbones.sampling.ddim_sample` implementing Algorithm 1 lines 4–9.

    Attributes:
        targets: decoded guidance features ``ĝ^l``, one ``(B, T, W)`` per layer.
        decode: VAE decoder ``D``: latents ``(B, C, h, w)`` → images ``(B, 3, H, W)`` in ``[0, 1]``,
            differentiable.
        features: guidance feature extractor ``f``: images → list of ``(B, T, W)`` (same layer order).
        feature_guidance_scale: κ (paper: 300 000).
        guided_steps: how many of the steps that run are guided (``⌊η · steps run⌋``; η = 0.2 of 37 → 7).
        tweedie: ``"paper"`` (Eq. 11) or ``"code"`` (``1 − ᾱ_t`` in place of its square root).
        factors: per-layer weight factors (code: 1.5, 1.2, 1, 1, 1, 1).
        precision: ``"float32"``, or ``"bfloat16"`` to run the guidance branch's VAE decode (forward and
            backward) under bfloat16 autocast, the dominant cost of the branch at every size; the UNet pass,
            the CLIP features (cheaper in float32 at world size, ~1 % of the step at SD size), the loss and
            the gradient that enters ``ε̂`` stay float32. A speed option, not in the paper.
        history: the unscaled guidance loss ``Σ_l w_l·MSE_l`` (batch mean) at each guided step, filled in
            as 0-d tensors on the sampling device (a float here would make the host wait for the GPU at
            every guided step); ``float(h)`` reads one.
    """

    targets: list[torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]
    features: Callable[[torch.Tensor], list[torch.Tensor]]
    feature_guidance_scale: float = 300_000.0
    guided_steps: int = 7
    tweedie: Literal["paper", "code"] = "paper"
    factors: Sequence[float] = PAPER_LAYER_FACTORS
    precision: Literal["float32", "bfloat16"] = "float32"
    history: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self):
        if self.tweedie not in ("paper", "code"):
            raise ValueError(f"tweedie must be 'paper' or 'code', got {self.tweedie!r}")
        if self.precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be 'float32' or 'bfloat16', got {self.precision!r}")
        self.weights = layer_weights(self.targets, self.factors)

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """Per-sample ``Σ_l w_l · MSE(f^l(images), ĝ^l)``: ``(B,)``."""
        return self.feature_loss(self.features(images))

    def feature_loss(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-sample ``Σ_l w_l · MSE(feats_l, ĝ^l)`` in float32: ``(B,)``."""
        return weighted_feature_loss(feats, self.targets, self.weights)

    def needs_graph(self, step_index: int) -> bool:
        """The sampler keeps the conditional branch's graph on the guided steps (no second UNet pass)."""
        return step_index < self.guided_steps and self.feature_guidance_scale != 0

    def __call__(self, state) -> torch.Tensor | None:
        if not self.needs_graph(state.step_index):
            return None
        if state.latents.requires_grad and state.noise_pred_cond.requires_grad:
            z_t, eps = state.latents, state.noise_pred_cond  # the sampler's own conditional pass
        else:
            z_t = state.latents.detach().requires_grad_(True)
            eps = state.predict_noise(z_t)  # conditional branch, differentiable w.r.t. z_t
        alpha_bar = state.alpha_prod_t.to(z_t)
        sigma = (1 - alpha_bar).sqrt()
        v_prediction = state.prediction_type == "v_prediction"
        if v_prediction:  # the UNet predicts v = √ᾱ·ε − σ·z0 (SD 2.x); Algorithm 1 is written for ε
            eps = alpha_bar.sqrt() * eps + sigma * z_t
        noise_coef = sigma if self.tweedie == "paper" else 1 - alpha_bar
        z0_hat = (z_t - noise_coef * eps) / alpha_bar.sqrt()  # Eq. 11
        z_t_hat = sigma * z0_hat + (1 - sigma) * z_t  # Eq. 12
        with torch.autocast(z_t.device.type, torch.bfloat16, enabled=self.precision == "bfloat16"):
            images = self.decode(z_t_hat)
        feats = self.features(images.float())
        per_sample = self.feature_loss(feats)
        self.history.append(per_sample.mean().detach())
        # Summing over the batch keeps each sample's gradient independent of the batch size.
        (grad,) = torch.autograd.grad(self.feature_guidance_scale * per_sample.sum(), z_t)
        # Algorithm 1 line 8, ε̂ = ε + σ·∇; for a v-predicting UNet the same shift of ε is v + σ·∇/√ᾱ
        return state.noise_pred + sigma * grad / (alpha_bar.sqrt() if v_prediction else 1)


@dataclass
class ReconstructionSettings:
    """Sampling settings of Algorithm 1 / §5.1 (paper defaults).

    Attributes:
        num_steps: DDIM steps over the full schedule (50). strength: img2img strength (0.75 → 37 steps run).
        cfg_scale: classifier-free guidance weight (7.5).
        feature_guidance_scale: κ (300 000; 0 disables feature guidance). guidance_strength: η (0.2).
        sag_scale: self-attention guidance on every step, both variants (released code: 0.75; 0 = off).
        tweedie, clip_normalization: the paper's formula and CLIP normalisation, or the released code's.
        layer_factors: per-layer weight factors of the guidance loss.
        guidance_precision: ``"bfloat16"`` runs the guidance branch's VAE decode under autocast
            (:class:`FeatureGuidance`); ``"float32"`` (default) everywhere.
        use_prior: decode the text / guidance embeddings through the diffusion prior (§4.2.2); False uses the
            MLP-Mixer backbone's tokens directly.
        precision: the backbones' weights (UNet, VAE, CLIP) in ``"float32"``, ``"bfloat16"`` or ``"float16"``
            (GPU only), and the fMRI decoders under autocast in that type (issue 21; not in the paper, which
            ran float32). The guidance loss and its gradient stay float32.
        compile_unet: the sampler's no-grad UNet passes through ``torch.compile`` (CUDA graphs on a GPU).
    """

    num_steps: int = 50
    strength: float = 0.75
    cfg_scale: float = 7.5
    feature_guidance_scale: float = 300_000.0
    guidance_strength: float = 0.2
    sag_scale: float = 0.75
    tweedie: Literal["paper", "code"] = "paper"
    clip_normalization: Literal["clip", "imagenet"] = "clip"
    layer_factors: tuple[float, ...] = PAPER_LAYER_FACTORS
    guidance_precision: Literal["float32", "bfloat16"] = "float32"
    use_prior: bool = True
    precision: Literal["float32", "bfloat16", "float16"] = "float32"
    compile_unet: bool = False

    @property
    def steps_run(self) -> int:
        return min(int(self.num_steps * self.strength), self.num_steps)

    @property
    def guided_steps(self) -> int:
        return int(self.guidance_strength * self.steps_run)


def guidance_features(
    clip, layers: Sequence[int], site: str = "block", normalization: str = "clip"
) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """The guidance feature extractor ``f``: images ``(B, 3, H, W)`` in ``[0, 1]`` → CLIP image-layer features
    ``(B, T, W)`` per layer in ``layers`` (``normalization="imagenet"``: the released code's inputs)."""
    layers = list(layers)

    def features(images: torch.Tensor) -> list[torch.Tensor]:
        if normalization == "imagenet":
            images = imagenet_as_clip_input(images)
        return clip.image_hidden_states(images, layers, site=site)

    return features


def reconstruct_images(
    ld,
    text_condition: torch.Tensor,
    init_latents: torch.Tensor,
    *,
    clip=None,
    layers: Sequence[int] = (),
    guidance_targets: Sequence[torch.Tensor] | None = None,
    settings: ReconstructionSettings | None = None,
    samples: int = 5,
    seed: int = 0,
    progress: bool = True,
    histories: list | None = None,
    site: str = "block",
) -> torch.Tensor:
    """Reconstruct ``samples`` images per fMRI item (Algorithm 1).

    Args:
        ld: :class:`~fmrirecon.backbones.diffusion.LatentDiffusion`.
        text_condition: decoded ``ĉ`` ``(N, L, D)``.
        init_latents: decoded, momentum-aligned ``ẑ`` ``(N, C, h, w)``.
        clip: :class:`~fmrirecon.backbones.clip.ClipEmbedder` for ``f`` (needed when guided).
        layers: CLIP layers of ``guidance_targets``.
        guidance_targets: decoded ``ĝ^l``, one ``(N, T, W)`` per layer; ``None`` or κ = 0 → unguided.
        settings: sampling settings (paper defaults).
        samples: K images per item (paper: 5).
        seed: item ``i``'s K samples are one batch seeded with ``seed + i``, so they are reproducible and
            independent of the other items; guided and unguided runs share the noise at equal seeds.
        histories: if given, receives each item's guidance-loss history.
        site: where the CLIP layer features are read (``"block"`` outputs, or ``"mlp"`` as the released code).

    Returns:
        ``(N, K, 3, H, W)`` float images in ``[0, 1]``.
    """
    from fmrirecon.backbones.sampling import ddim_sample

    settings = settings or ReconstructionSettings()
    n = text_condition.shape[0]
    if init_latents.shape[0] != n:
        raise ValueError(f"text_condition has {n} items but init_latents has {init_latents.shape[0]}")
    guided = (
        guidance_targets is not None and settings.feature_guidance_scale != 0 and settings.guided_steps > 0
    )
    if guided and (clip is None or len(guidance_targets) != len(layers)):
        raise ValueError("guided reconstruction needs `clip` and one guidance target per layer in `layers`")
    uncond = ld.empty_text_embedding()
    outputs = []
    for i in range(n):
        context = text_condition[i : i + 1].expand(samples, -1, -1).to(ld.dtype)
        start = init_latents[i : i + 1].expand(samples, -1, -1, -1)
        hook = None
        if guided:
            targets = [t[i : i + 1].expand(samples, -1, -1) for t in guidance_targets]
            hook = FeatureGuidance(
                targets,
                ld.decode_latents,
                guidance_features(clip, layers, site, settings.clip_normalization),
                settings.feature_guidance_scale,
                settings.guided_steps,
                settings.tweedie,
                settings.layer_factors,
                settings.guidance_precision,
            )
        latents = ddim_sample(
            ld,
            context,
            uncond=uncond,
            cfg_scale=settings.cfg_scale,
            num_steps=settings.num_steps,
            init_latents=start,
            strength=settings.strength,
            step_hook=hook,
            sag_scale=settings.sag_scale,
            generator=torch.Generator().manual_seed(seed + i),
            progress=progress,
            compile_unet=settings.compile_unet,
        )
        if histories is not None:
            histories.append([float(h) for h in hook.history] if hook is not None else [])
        with torch.no_grad():
            outputs.append(ld.decode_latents(latents).float().clamp(0, 1).cpu())
    return torch.stack(outputs)


@torch.no_grad()
def selection_losses(
    images: torch.Tensor,
    guidance_targets: Sequence[torch.Tensor],
    features: Callable[[torch.Tensor], list[torch.Tensor]],
    factors: Sequence[float] = PAPER_LAYER_FACTORS,
) -> torch.Tensor:
    """Second-order selection (§5.2: "the best reconstruction through second-order selection", as MindEye's
    selection of the sample closest to the brain-decoded CLIP embedding): the guidance loss
    ``Σ_l w_l · MSE(f^l(x), ĝ^l)`` of each finished sample against its item's brain-decoded features.

    ``images (N, K, 3, H, W)``, ``guidance_targets`` one ``(N, T, W)`` per layer → ``(N, K)``, lower is
    closer.
    No ground truth is used, so the best-of-K reconstruction is a legitimate decoder output.
    """
    n, k = images.shape[:2]
    targets = [t.repeat_interleave(k, dim=0) for t in guidance_targets]
    loss = weighted_feature_loss(features(images.flatten(0, 1)), targets, layer_weights(targets, factors))
    return loss.view(n, k)


def mean_pairwise_similarity(images: torch.Tensor) -> float:
    """Consistency of repeated reconstructions (Fig. 9): mean Pearson correlation over pixel pairs of samples.

    ``images: (N, K, 3, H, W)`` → mean over items and sample pairs ``k < k'``.
    """
    n, k = images.shape[:2]
    if k < 2:
        raise ValueError(f"need at least 2 samples per item, got {k}")
    flat = images.reshape(n, k, -1).double()
    flat = flat - flat.mean(-1, keepdim=True)
    flat = F.normalize(flat, dim=-1)
    corr = flat @ flat.transpose(1, 2)  # (N, K, K)
    iu = torch.triu_indices(k, k, offset=1)
    return float(corr[:, iu[0], iu[1]].mean())
