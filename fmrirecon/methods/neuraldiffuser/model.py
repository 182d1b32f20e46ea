"""NeuralDiffuser's fMRI decoders (Li, Wu & Chen, §4.2 and §4.3): ``f_c``, ``f_g^l`` and ``f_z``.

Every decoder starts with subject-specific voxel encoders into one subject-shared space (§4.2.1, 4096-d),
so subjects with different voxel counts train together; everything after the encoder is shared.

- :class:`SemanticDecoder` — the high-level pipeline (§4.2.2): MLP-Mixer backbone → token set (77×768 text
  condition ``c``), per-token projector for the contrastive loss, diffusion prior (100 timesteps). Loss Eq. 3:
  BiMixCo (Eq. 1) for the first third of training, then SoftCLIP (Eq. 2), plus α·L_prior (α = 30). The
  guidance-feature decoders ``f_g^l`` (§4.3, Eq. 13) are the same class with a 50×768 output.
- :class:`LatentDecoder` — the low-level pipeline: residual MLP → 64×16×16 → upsampler → VAE latent 4×64×64,
  loss Eq. 4–5: MAE + β·soft contrastive on a 1×1-conv projector.
- :func:`momentum_align` — first-order momentum alignment of predicted latents (Eq. 6–7).
- :class:`NeuralDiffuserModel` — one ``f_c``, one ``f_g^l`` per selected CLIP layer, one ``f_z`` and the
  training-latent statistics, with :func:`neuraldiffuser_paper` and :func:`neuraldiffuser_world` presets.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from fmrirecon.data.nsd_facts import NSDGENERAL_VOXELS
from fmrirecon.errors import ConfigError
from fmrirecon.io import save_safetensors_atomic, write_json_atomic
from fmrirecon.nn import (
    DiffusionPrior,
    LatentUpsampler,
    MapProjector,
    MLPMixerBackbone,
    PriorNetwork,
    ResidualMLP,
    SubjectVoxelEncoders,
    TokenProjector,
    encode_mixed_batch,
    mixco,
    mixco_nce,
    soft_clip_loss,
    soft_contrastive_loss,
)

# The authors' code hooks CLIP ViT-B/32 residual blocks 1–6 (MLP outputs); the paper reads 2, 4, …, 12.
PAPER_GUIDANCE_LAYERS = (1, 2, 3, 4, 5, 6)


class SemanticDecoder(nn.Module):
    """High-level pipeline ``f_c`` (§4.2.2) and guidance-feature decoder ``f_g^l`` (§4.3, same architecture).

    Args:
        voxel_counts: ``{subject: V_s}`` for the subject-specific encoders.
        hidden_dim: shared-space width (paper: 4096).
        out_tokens, out_dim: target token grid (77×768 for ``c``, 50×768 for a CLIP ViT-B/32 layer).
        n_blocks: MLP-Mixer blocks (paper: 4). dropout: Mixer dropout (code: 0.15).
        projector_dim: projector hidden width (code: 2048; 3 hidden layers).
        prior_depth, prior_heads, prior_dim_head: prior transformer (code: 6, 14, 52).
        prior_timesteps: training timesteps of the prior (paper: 100).
        prior_sample_steps: prior steps at inference (code: 20).
        prior_cond_drop: condition dropout of the prior (code: 0.2).
        prior_weight: α in Eq. 3 (paper: 30).
        temperature: τ of Eq. 1–2 (code: 0.006).
        mixco_fraction: share of training that uses BiMixCo before SoftCLIP (paper: one third).
        mixco_beta, mixco_prob: MixCo λ ~ Beta(β, β), applied to a sample with probability mixco_prob
            (code: 0.15, 0.5).
    """

    def __init__(
        self,
        voxel_counts: dict[int, int],
        hidden_dim: int = 4096,
        out_tokens: int = 77,
        out_dim: int = 768,
        n_blocks: int = 4,
        dropout: float = 0.15,
        projector_dim: int = 2048,
        prior_depth: int = 6,
        prior_heads: int = 14,
        prior_dim_head: int = 52,
        prior_timesteps: int = 100,
        prior_sample_steps: int = 20,
        prior_cond_drop: float = 0.2,
        prior_weight: float = 30.0,
        temperature: float = 0.006,
        mixco_fraction: float = 1 / 3,
        mixco_beta: float = 0.15,
        mixco_prob: float = 0.5,
    ):
        super().__init__()
        self.out_tokens, self.out_dim = out_tokens, out_dim
        self.prior_weight, self.temperature, self.mixco_fraction = prior_weight, temperature, mixco_fraction
        self.mixco_beta, self.mixco_prob = mixco_beta, mixco_prob
        self.voxel_encoders = SubjectVoxelEncoders(voxel_counts, hidden_dim, bias=True)
        self.backbone = MLPMixerBackbone(hidden_dim, out_tokens, out_dim, n_blocks=n_blocks, dropout=dropout)
        self.projector = TokenProjector(out_dim, out_dim, projector_dim)
        net = PriorNetwork(out_dim, out_tokens, prior_depth, prior_heads, prior_dim_head)
        self.prior = DiffusionPrior(net, prior_timesteps, prior_cond_drop, prior_sample_steps)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Everything after the voxel encoders (the subject-independent mapping of §4.2.3)."""
        return [p for n, p in self.named_parameters() if not n.startswith("voxel_encoders.")]

    def forward(self, betas: torch.Tensor, subject: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``betas: (B, V_s)`` → ``(backbone tokens (B, T, D), projector output (B, T, D))``."""
        tokens = self.backbone(self.voxel_encoders(betas, subject))
        return tokens, self.projector(tokens)

    def loss(
        self,
        betas: torch.Tensor | list[torch.Tensor],
        subjects: torch.Tensor,
        target: torch.Tensor,
        progress: float,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Eq. 3: ``L_c = L_mix|soft + α·L_prior``.

        Args:
            betas: ``(B, V)`` or a list of per-row voxel vectors (mixed subjects).
            subjects: ``(B,)`` subject of each row.
            target: ``(B, T, D)`` ground-truth tokens.
            progress: fraction of training done in ``[0, 1]``; BiMixCo while ``progress < mixco_fraction``.
        """
        if target.shape[1:] != (self.out_tokens, self.out_dim):
            raise ConfigError(
                f"targets must be (B, {self.out_tokens}, {self.out_dim}), got {tuple(target.shape)} — "
                "does the backbone match the one this decoder was configured for?"
            )
        use_mixco = progress < self.mixco_fraction
        shared = encode_mixed_batch(self.voxel_encoders, betas, subjects)  # (B, H)
        if use_mixco:
            # MixCo on the shared-space inputs: equivalent to mixing betas within a subject, and well defined
            # across subjects with different voxel counts.
            shared, perm, lambdas, _ = mixco(shared, self.mixco_beta, self.mixco_prob, generator)
        tokens = self.backbone(shared)
        proj = self.projector(tokens)
        if use_mixco:
            contrastive = mixco_nce(proj, target, perm, lambdas, self.temperature)
        else:
            contrastive = soft_clip_loss(proj, target, self.temperature)
        prior = self.prior.loss(tokens, target, generator)
        loss = contrastive + self.prior_weight * prior
        return {"loss": loss, "contrastive": contrastive.detach(), "prior": prior.detach()}

    @torch.no_grad()
    def predict(
        self,
        betas: torch.Tensor,
        subject: int,
        generator: torch.Generator | None = None,
        use_prior: bool = True,
        prior_steps: int | None = None,
    ) -> torch.Tensor:
        """Decoded token set ``(B, T, D)``: the prior's sample conditioned on the backbone output
        (``prior_steps`` DDIM steps; default: the prior's ``sample_steps``)."""
        tokens, _ = self(betas, subject)
        return self.prior.sample(tokens, steps=prior_steps, generator=generator) if use_prior else tokens

    @torch.no_grad()
    def embed(self, betas: torch.Tensor, subject: int) -> torch.Tensor:
        """Retrieval embedding (§5.3: the projector output), flattened: ``(B, T*D)``."""
        return self(betas, subject)[1].flatten(1)


class LatentDecoder(nn.Module):
    """Low-level pipeline ``f_z`` (§4.2.2, Eq. 4–5).

    Args:
        voxel_counts: ``{subject: V_s}``.
        hidden_dim: shared-space width (paper: 4096).
        n_blocks: residual MLP blocks (paper: 4).
        latent_shape: VAE latent ``(C, h, w)`` (SD 1.4 at 512 px: 4×64×64).
        grid_channels, grid_size: backbone output map (paper: 64×16×16).
        upsampler_channels: upsampler widths, ``len - 1`` ×2 upsamplings (code: (64, 128, 256)).
        projector_channels: projector width (paper: 512).
        contrastive_weight: β in Eq. 4 (code: 0.1). temperature: soft-contrastive τ (code: 0.2).
        encoder_dropout, block_dropout: code: 0.5 and 0.25.

    The soft contrastive teacher is the target latent itself, folded onto the grid (pixel-unshuffle), since
    the ConvNeXt features of the authors' code are not part of our backbones.
    """

    def __init__(
        self,
        voxel_counts: dict[int, int],
        hidden_dim: int = 4096,
        n_blocks: int = 4,
        latent_shape: tuple[int, int, int] = (4, 64, 64),
        grid_channels: int = 64,
        grid_size: int = 16,
        upsampler_channels: tuple[int, ...] = (64, 128, 256),
        projector_channels: int = 512,
        contrastive_weight: float = 0.1,
        temperature: float = 0.2,
        encoder_dropout: float = 0.5,
        block_dropout: float = 0.25,
    ):
        super().__init__()
        latent_shape = tuple(int(x) for x in latent_shape)
        scale = 2 ** (len(upsampler_channels) - 1)
        if latent_shape[1] != latent_shape[2] or latent_shape[1] != grid_size * scale:
            raise ConfigError(
                f"latent_shape {latent_shape} must be square with side "
                f"grid_size·2^(len(upsampler_channels)−1) "
                f"= {grid_size}·{scale} = {grid_size * scale}"
            )
        self.latent_shape, self.grid_channels, self.grid_size = latent_shape, grid_channels, grid_size
        self.unshuffle = scale
        self.contrastive_weight, self.temperature = contrastive_weight, temperature
        self.voxel_encoders = SubjectVoxelEncoders(
            voxel_counts, hidden_dim, bias=False, norm_act_dropout=encoder_dropout
        )
        self.backbone = ResidualMLP(hidden_dim, n_blocks, block_dropout)
        self.to_grid = nn.Linear(hidden_dim, grid_channels * grid_size * grid_size, bias=False)
        self.grid_norm = nn.GroupNorm(1, grid_channels)
        self.upsampler = LatentUpsampler(grid_channels, latent_shape[0], tuple(upsampler_channels))
        self.projector = MapProjector(grid_channels, projector_channels, latent_shape[0] * scale * scale)

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("voxel_encoders.")]

    def _decode(self, shared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grid = self.to_grid(self.backbone(shared))
        grid = self.grid_norm(
            grid.view(-1, self.grid_channels, self.grid_size, self.grid_size)
        )  # (B, 64, 16, 16)
        return self.upsampler(grid), self.projector(grid)

    def forward(self, betas: torch.Tensor, subject: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``betas: (B, V_s)`` → ``(latents (B, C, h, w), projector maps (B, C·s², g, g))``."""
        return self._decode(self.voxel_encoders(betas, subject))

    def loss(
        self, betas, subjects: torch.Tensor, target: torch.Tensor, progress: float = 0.0, generator=None
    ) -> dict[str, torch.Tensor]:
        """Eq. 4: ``L_z = L_mae + β·L_soft``. ``target: (B, C, h, w)`` VAE latents."""
        if tuple(target.shape[1:]) != self.latent_shape:
            raise ConfigError(f"latent targets must be (B, {self.latent_shape}), got {tuple(target.shape)}")
        latents, proj = self._decode(encode_mixed_batch(self.voxel_encoders, betas, subjects))
        mae = F.l1_loss(latents, target)  # Eq. 5
        teacher = F.pixel_unshuffle(target, self.unshuffle)  # (B, C·s², g, g): the latent on the grid
        soft = soft_contrastive_loss(proj, teacher, temperature=self.temperature)
        return {"loss": mae + self.contrastive_weight * soft, "mae": mae.detach(), "soft": soft.detach()}

    @torch.no_grad()
    def predict(self, betas: torch.Tensor, subject: int) -> torch.Tensor:
        """Predicted (unaligned) VAE latents ``(B, C, h, w)``."""
        return self(betas, subject)[0]


def momentum_align(
    pred: torch.Tensor, train_mean: torch.Tensor, train_std: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """First-order momentum alignment, Eq. 6–7: ``ẑ ← σ_tr·(ẑ − μ_ẑ)/σ_ẑ + μ_tr``.

    Statistics are taken over the sample axis for every latent element (as Brain-Diffuser does for its ridge
    predictions); with a single prediction they fall back to scalar statistics over all its elements.

    Args:
        pred: ``(N, C, h, w)`` predicted test latents.
        train_mean, train_std: ``(C, h, w)`` statistics of the training latents (or scalars).

    Returns:
        ``(N, C, h, w)`` aligned latents.
    """
    if pred.shape[0] >= 2:
        mu, sigma = pred.mean(0, keepdim=True), pred.std(0, keepdim=True)
    else:
        mu, sigma = pred.mean(), pred.std()
        train_mean, train_std = train_mean.mean(), train_std.mean()
    return train_std * (pred - mu) / (sigma + eps) + train_mean


@dataclass
class DecoderSizes:
    """Sizes of every decoder (the method config's ``model`` section); defaults are the paper's (§4.2, §4.3).

    Shapes that come from the backbones (text condition, CLIP layer tokens, VAE latent) are not here: they
    are read from the loaded backbones (:class:`NeuralDiffuserConfig`).
    """

    hidden_dim: int = 4096  # §4.2.1 subject-shared space
    mixer_blocks: int = 4  # §4.2.2 4-layer MLP-Mixer
    projector_dim: int = 2048
    prior_depth: int = 6
    prior_heads: int = 14
    prior_dim_head: int = 52
    prior_timesteps: int = 100
    prior_sample_steps: int = 20
    prior_weight: float = 30.0  # α, Eq. 3
    temperature: float = 0.006
    resmlp_blocks: int = 4  # low-level pipeline, 4 residual blocks → 64×16×16
    grid_channels: int = 64
    grid_size: int = 16
    upsampler_channels: tuple[int, ...] = (64, 128, 256)
    latent_projector_channels: int = 512
    latent_contrastive_weight: float = 0.1  # β, Eq. 4 (code)


@dataclass
class NeuralDiffuserConfig(DecoderSizes):
    """A built model's config: :class:`DecoderSizes` plus the subjects' voxel counts and the backbone shapes
    (defaults: NSD nsdgeneral with SD 1.4 + ViT-B/32)."""

    voxel_counts: dict[int, int] = field(default_factory=lambda: dict(NSDGENERAL_VOXELS))
    text_shape: tuple[int, int] = (77, 768)
    guidance_layers: tuple[int, ...] = PAPER_GUIDANCE_LAYERS
    guidance_shape: tuple[int, int] = (50, 768)
    latent_shape: tuple[int, int, int] = (4, 64, 64)

    def __post_init__(self):
        self.voxel_counts = {int(k): int(v) for k, v in self.voxel_counts.items()}
        for name in ("text_shape", "guidance_layers", "guidance_shape", "latent_shape", "upsampler_channels"):
            setattr(self, name, tuple(int(x) for x in getattr(self, name)))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["voxel_counts"] = {str(k): v for k, v in self.voxel_counts.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> NeuralDiffuserConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown NeuralDiffuser model config keys {sorted(unknown)}")
        return cls(**d)


def guidance_key(layer: int) -> str:
    return f"layer{int(layer)}"


def build_decoder(config: NeuralDiffuserConfig, name: str, voxel_counts: dict[int, int] | None = None):
    """One decoder of ``config``: ``"semantic"`` (``f_c``), ``"guidance.layer<l>"`` (``f_g^l``) or
    ``"latent"`` (``f_z``), with voxel encoders for ``voxel_counts`` (default: the config's subjects)."""
    voxel_counts = dict(config.voxel_counts if voxel_counts is None else voxel_counts)
    if name == "latent":
        return LatentDecoder(
            voxel_counts,
            hidden_dim=config.hidden_dim,
            n_blocks=config.resmlp_blocks,
            latent_shape=config.latent_shape,
            grid_channels=config.grid_channels,
            grid_size=config.grid_size,
            upsampler_channels=config.upsampler_channels,
            projector_channels=config.latent_projector_channels,
            contrastive_weight=config.latent_contrastive_weight,
        )
    if name != "semantic" and not name.startswith("guidance."):
        raise ConfigError(f"unknown NeuralDiffuser decoder {name!r}")
    tokens, dim = config.text_shape if name == "semantic" else config.guidance_shape
    return SemanticDecoder(
        voxel_counts,
        hidden_dim=config.hidden_dim,
        out_tokens=tokens,
        out_dim=dim,
        n_blocks=config.mixer_blocks,
        projector_dim=config.projector_dim,
        prior_depth=config.prior_depth,
        prior_heads=config.prior_heads,
        prior_dim_head=config.prior_dim_head,
        prior_timesteps=config.prior_timesteps,
        prior_sample_steps=config.prior_sample_steps,
        prior_weight=config.prior_weight,
        temperature=config.temperature,
    )


def decoder_names(guidance_layers) -> list[str]:
    """Decoder names in training order: ``semantic``, ``guidance.layer<l>`` ..., ``latent``."""
    return ["semantic", *(f"guidance.{guidance_key(l)}" for l in guidance_layers), "latent"]


class NeuralDiffuserModel(nn.Module):
    """All NeuralDiffuser decoders plus the training-latent statistics used by Eq. 6–7.

    ``semantic`` = ``f_c``; ``guidance[f"layer{l}"]`` = ``f_g^l``; ``latent`` = ``f_z``.
    """

    def __init__(self, config: NeuralDiffuserConfig | None = None):
        super().__init__()
        self.config = config = config or NeuralDiffuserConfig()
        self.semantic = build_decoder(config, "semantic")
        self.guidance = nn.ModuleDict(
            {
                guidance_key(l): build_decoder(config, f"guidance.{guidance_key(l)}")
                for l in config.guidance_layers
            }
        )
        self.latent = build_decoder(config, "latent")
        self.register_buffer("latent_mean", torch.zeros(config.latent_shape))
        self.register_buffer("latent_std", torch.ones(config.latent_shape))

    def decoder(self, name: str) -> nn.Module:
        """The decoder called ``name`` (see :func:`decoder_names`)."""
        if name.startswith("guidance."):
            return self.guidance[name.split(".", 1)[1]]
        return getattr(self, name)

    @torch.no_grad()
    def set_latent_statistics(self, train_latents: torch.Tensor) -> None:
        """Store μ_tr, σ_tr of Eq. 7 from the training latents ``(N, C, h, w)``."""
        self.latent_mean.copy_(train_latents.mean(0))
        self.latent_std.copy_(train_latents.std(0))

    def save(self, directory: str | Path) -> None:
        """``config.json`` + ``model.safetensors`` (written atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(directory / "config.json", self.config.to_dict())
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_safetensors_atomic(state, directory / "model.safetensors")

    @classmethod
    def load(cls, directory: str | Path) -> NeuralDiffuserModel:
        directory = Path(directory)
        config_path, weights_path = directory / "config.json", directory / "model.safetensors"
        for path in (config_path, weights_path):
            if not path.is_file():
                raise ConfigError(
                    f"expected {path.name} in {directory} (config.json + model.safetensors), not found"
                )
        model = cls(NeuralDiffuserConfig.from_dict(json.loads(config_path.read_text())))
        model.load_state_dict(load_file(weights_path))
        return model


def neuraldiffuser_paper(voxel_counts: dict[int, int] | None = None) -> NeuralDiffuserConfig:
    """Paper sizes (§4.2, §4.3, §6): NSD nsdgeneral voxels, 4096-d shared space, SD 1.4 text condition 77×768,
    six CLIP ViT-B/32 layers of 50×768, VAE latent 4×64×64."""
    return NeuralDiffuserConfig(voxel_counts=dict(voxel_counts or NSDGENERAL_VOXELS))


def neuraldiffuser_world(
    voxel_counts: dict[int, int],
    text_shape: tuple[int, int],
    guidance_shape: tuple[int, int],
    latent_shape: tuple[int, int, int],
    guidance_layers: tuple[int, ...] = (1, 2),
    hidden_dim: int = 256,
) -> NeuralDiffuserConfig:
    """World-size decoders for the synthetic world's tiny backbones (CPU demo): same design, small widths.

    The latent grid is chosen so that one ×2 upsampling reaches the world VAE latent side.
    """
    side = int(latent_shape[1])
    grid = max(side // 2, 1)
    return NeuralDiffuserConfig(
        voxel_counts=dict(voxel_counts),
        hidden_dim=hidden_dim,
        text_shape=tuple(text_shape),
        guidance_layers=tuple(guidance_layers),
        guidance_shape=tuple(guidance_shape),
        latent_shape=tuple(latent_shape),
        mixer_blocks=2,
        projector_dim=128,
        prior_depth=2,
        prior_heads=2,
        prior_dim_head=16,
        resmlp_blocks=2,
        grid_channels=16,
        grid_size=grid,
        upsampler_channels=(16, 32) if grid * 2 == side else (16,),
        latent_projector_channels=64,
    )
