"""NeuralDiffuser (Li, Wu & Chen): fMRI → SD latent / text condition / CLIP-layer features, then primary
visual feature guided img2img (``../shared/papers/neuraldiffuser.txt``).

Read in order: ``model.py`` (decoders, §4.2–4.3), ``train.py`` (targets and stages, §4.2.3), ``pipeline.py``
(Algorithm 1), ``retrieval.py`` (§5.3). This module ties them to the :class:`ReconMethod` interface; the same
code runs on the synthetic world (``diffusion: world``, ``clip: world``) and on NSD with Stable Diffusion 1.4
and CLIP ViT-B/32 (hub ids), only config values differ.

Variants: ``guided`` (κ, η from the config) and ``unguided`` (κ = 0).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from fmrirecon.errors import ConfigError
from fmrirecon.methods.base import ReconMethod, read_run
from fmrirecon.methods.neuraldiffuser.model import (
    NeuralDiffuserConfig,
    NeuralDiffuserModel,
    guidance_key,
    momentum_align,
)
from fmrirecon.methods.neuraldiffuser.pipeline import (
    PAPER_LAYER_FACTORS,
    ReconstructionSettings,
    guidance_features,
    reconstruct_images,
    selection_losses,
)
from fmrirecon.train import TrainConfig

__all__ = ["NeuralDiffuser", "NeuralDiffuserMethodConfig"]

# Paper §4.3 Eq. 13: CLIP image-encoder layers 2, 4, …, 12 (block outputs). The released code instead hooks
# the MLP outputs of blocks 1–6: guidance_layers=[1,2,3,4,5,6], guidance_site=mlp.
PAPER_LAYERS = (2, 4, 6, 8, 10, 12)


def _paper_train() -> TrainConfig:
    # §5.1: 150 epochs, AdamW, one-cycle LR with max 3e-4.
    return TrainConfig(epochs=150, lr=3e-4, schedule="onecycle")


@dataclass
class NeuralDiffuserMethodConfig:
    """Everything a NeuralDiffuser run needs; defaults are the paper's (§4.2, §4.3, §5.1).

    Shapes (text condition, CLIP layer tokens, VAE latent) are read from the loaded backbones, never set here.
    """

    diffusion: str = "CompVis/stable-diffusion-v1-4"  # hub id / folder, or "world"
    clip: str = "openai/clip-vit-base-patch32"  # hub id / folder, or "world"
    guidance_layers: tuple[int, ...] = PAPER_LAYERS
    guidance_site: Literal["block", "mlp"] = "block"
    # decoders (model.NeuralDiffuserConfig)
    hidden_dim: int = 4096
    mixer_blocks: int = 4
    projector_dim: int = 2048
    prior_depth: int = 6
    prior_heads: int = 14
    prior_dim_head: int = 52
    prior_timesteps: int = 100
    prior_sample_steps: int = 20
    prior_weight: float = 30.0
    temperature: float = 0.006
    resmlp_blocks: int = 4
    grid_channels: int = 64
    grid_size: int = 16
    upsampler_channels: tuple[int, ...] = (64, 128, 256)
    latent_projector_channels: int = 512
    latent_contrastive_weight: float = 0.1
    # training (§4.2.3, §5.1)
    pretrain: bool = True
    target_sessions: int | None = None
    batch_size: int = 42
    sample_latents: bool = True
    pretrain_train: TrainConfig = field(default_factory=_paper_train)
    finetune_train: TrainConfig = field(default_factory=_paper_train)
    # reconstruction (§5.1, Algorithm 1)
    num_steps: int = 50
    strength: float = 0.75
    cfg_scale: float = 7.5
    guidance_scale: float = 300_000.0
    guidance_strength: float = 0.2
    sag_scale: float = 0.75
    tweedie: Literal["paper", "code"] = "paper"
    clip_normalization: Literal["clip", "imagenet"] = "clip"
    layer_factors: tuple[float, ...] = PAPER_LAYER_FACTORS
    guidance_precision: Literal["float32", "bfloat16"] = "float32"
    use_prior: bool = True
    progress: bool = True


def load_backbones(config: NeuralDiffuserMethodConfig):
    """``(LatentDiffusion, ClipEmbedder)`` named by the config (``world`` or a hub id / local folder)."""
    from fmrirecon.backbones.clip import ClipEmbedder
    from fmrirecon.backbones.diffusion import LatentDiffusion

    ld = (
        LatentDiffusion.world()
        if config.diffusion == "world"
        else LatentDiffusion.from_pretrained(config.diffusion)
    )
    clip = ClipEmbedder.world() if config.clip == "world" else ClipEmbedder.from_pretrained(config.clip)
    return ld, clip


class NeuralDiffuser(ReconMethod):
    """NeuralDiffuser on the :class:`ReconMethod` interface (``fit`` / ``load`` / ``reconstruct``)."""

    name = "neuraldiffuser"
    Config = NeuralDiffuserMethodConfig

    def __init__(self, config: NeuralDiffuserMethodConfig | None = None):
        super().__init__(config)
        self.model: NeuralDiffuserModel | None = None
        self._backbones = None

    # ------------------------------------------------------------------------------------------ backbones
    def backbones(self):
        if self._backbones is None:
            self._backbones = load_backbones(self.config)
        return self._backbones

    def model_config(self, voxel_counts: dict[int, int], text_shape, guidance_shape, latent_shape):
        names = {f.name for f in fields(NeuralDiffuserConfig)}
        shared = {f.name: getattr(self.config, f.name) for f in fields(self.config) if f.name in names}
        shared.pop("guidance_shape", None)
        return NeuralDiffuserConfig(
            **shared,
            voxel_counts=voxel_counts,
            text_shape=tuple(text_shape),
            guidance_shape=tuple(guidance_shape),
            latent_shape=tuple(latent_shape),
        )

    # ------------------------------------------------------------------------------------------ training
    def fit(self, store, subject: int, run_dir: str | os.PathLike, *, seed: int = 0) -> None:
        """Compute targets, then pretrain (other subjects) and fine-tune (target) each decoder (§4.2.3)."""
        from fmrirecon.data.store import PreparedStore
        from fmrirecon.methods.neuraldiffuser.model import LatentDecoder, SemanticDecoder
        from fmrirecon.methods.neuraldiffuser.train import (
            DecoderDataset,
            cached_targets,
            run_stage,
            shared_state,
            training_rows,
        )

        cfg = self.config
        store = store if isinstance(store, PreparedStore) else PreparedStore(store)
        subject = int(subject)
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        target_store = store.subject(subject)
        others = [s for s in store.subjects if s != subject] if cfg.pretrain else []

        parts = {subject: (target_store, training_rows(target_store, cfg.target_sessions))}
        for s in others:
            parts[s] = (store.subject(s), training_rows(store.subject(s)))
        ids = np.unique(np.concatenate([st.trials["image_id_73k"][rows] for st, rows in parts.values()]))
        ld, clip = self.backbones()
        torch.manual_seed(seed)
        targets = cached_targets(
            run_dir / "targets.safetensors",
            store,
            ids,
            ld=ld,
            clip=clip,
            layers=cfg.guidance_layers,
            site=cfg.guidance_site,
            sample_latents=cfg.sample_latents,
            seed=seed,
            progress=cfg.progress,
        )
        layer0 = f"layer{cfg.guidance_layers[0]}"
        model_config = self.model_config(
            {subject: target_store.n_voxels},
            targets["text"].shape[1:],
            targets[layer0].shape[1:],
            targets["latent"].shape[1:],
        )
        voxel_data = {s: (st.betas(rows), st.trials["image_id_73k"][rows]) for s, (st, rows) in parts.items()}

        def build(name: str, voxel_counts: dict[int, int]):
            full = self.model_config(
                voxel_counts, model_config.text_shape, model_config.guidance_shape, model_config.latent_shape
            )
            if name == "latent":
                torch.manual_seed(seed)
                return LatentDecoder(
                    voxel_counts,
                    hidden_dim=full.hidden_dim,
                    n_blocks=full.resmlp_blocks,
                    latent_shape=full.latent_shape,
                    grid_channels=full.grid_channels,
                    grid_size=full.grid_size,
                    upsampler_channels=full.upsampler_channels,
                    projector_channels=full.latent_projector_channels,
                    contrastive_weight=full.latent_contrastive_weight,
                )
            tokens, dim = full.text_shape if name == "semantic" else full.guidance_shape
            torch.manual_seed(seed)
            return SemanticDecoder(
                voxel_counts,
                hidden_dim=full.hidden_dim,
                out_tokens=tokens,
                out_dim=dim,
                n_blocks=full.mixer_blocks,
                projector_dim=full.projector_dim,
                prior_depth=full.prior_depth,
                prior_heads=full.prior_heads,
                prior_dim_head=full.prior_dim_head,
                prior_timesteps=full.prior_timesteps,
                prior_sample_steps=full.prior_sample_steps,
                prior_weight=full.prior_weight,
                temperature=full.temperature,
            )

        model = NeuralDiffuserModel(model_config)
        run_config = {"method": self.name, "subject": subject, "seed": seed}
        for name, decoder_target in self._decoder_targets(targets).items():
            shared = None
            if others:
                pre = build(name, {s: parts[s][0].n_voxels for s in others})
                dataset = DecoderDataset(
                    [(s, *voxel_data[s]) for s in others], decoder_target, targets["ids"].numpy()
                )
                run_stage(
                    pre,
                    dataset,
                    cfg.pretrain_train,
                    run_dir,
                    f"pretrain-{name}",
                    cfg.batch_size,
                    seed,
                    run_config,
                )
                shared = shared_state(pre)
            fine = build(name, {subject: target_store.n_voxels})
            if shared is not None:
                missing, unexpected = fine.load_state_dict(shared, strict=False)
                assert not unexpected and all(k.startswith("voxel_encoders.") for k in missing)
            dataset = DecoderDataset(
                [(subject, *voxel_data[subject])], decoder_target, targets["ids"].numpy()
            )
            run_stage(
                fine,
                dataset,
                cfg.finetune_train,
                run_dir,
                f"finetune-{name}",
                cfg.batch_size,
                seed,
                run_config,
            )
            self._decoder(model, name).load_state_dict(fine.state_dict())
        target_rows = np.searchsorted(targets["ids"].numpy(), np.unique(voxel_data[subject][1]))
        model.set_latent_statistics(targets["latent"][target_rows])
        model.save(run_dir / "model")
        self.model, self.subject, self.n_voxels = model.eval(), subject, target_store.n_voxels

    def _decoder_targets(self, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {"semantic": targets["text"]}
        out.update({f"guidance.{guidance_key(l)}": targets[f"layer{l}"] for l in self.config.guidance_layers})
        out["latent"] = targets["latent"]
        return out

    @staticmethod
    def _decoder(model: NeuralDiffuserModel, name: str):
        if name.startswith("guidance."):
            return model.guidance[name.split(".", 1)[1]]
        return getattr(model, name)

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> NeuralDiffuser:
        method = cls(cls.read_run_config(run_dir))
        method.model = NeuralDiffuserModel.load(Path(run_dir) / "model").eval()
        info = read_run(run_dir)
        method.subject = int(info["subject"])
        method.n_voxels = method.model.config.voxel_counts[method.subject]
        return method

    # ------------------------------------------------------------------------------------------ inference
    def variants(self) -> list[str]:
        return ["guided", "unguided"]

    def settings(self, variant: str = "guided", **overrides) -> ReconstructionSettings:
        cfg = self.config
        settings = ReconstructionSettings(
            num_steps=cfg.num_steps,
            strength=cfg.strength,
            cfg_scale=cfg.cfg_scale,
            guidance_scale=cfg.guidance_scale if variant == "guided" else 0.0,
            guidance_strength=cfg.guidance_strength,
            sag_scale=cfg.sag_scale,
            tweedie=cfg.tweedie,
            clip_normalization=cfg.clip_normalization,
            layer_factors=tuple(cfg.layer_factors),
            guidance_precision=cfg.guidance_precision,
        )
        for key, value in overrides.items():
            if not hasattr(settings, key):
                raise ConfigError(f"unknown reconstruction setting {key!r}")
            setattr(settings, key, value)
        return settings

    def _require_model(self) -> NeuralDiffuserModel:
        if self.model is None:
            raise ConfigError(
                "this NeuralDiffuser has no trained model: call fit() or NeuralDiffuser.load(run_dir)"
            )
        return self.model

    @torch.no_grad()
    def decode(self, betas: np.ndarray, seed: int = 0, guided: bool = True) -> dict[str, torch.Tensor]:
        """Decoded embeddings: ``text (N, L, D)``, aligned ``latent (N, C, h, w)``, ``layer<l> (N, T, W)``."""
        model = self._require_model()
        x = torch.from_numpy(self.check_betas(betas))
        s, use_prior, prior_steps = self.subject, self.config.use_prior, self.config.prior_sample_steps
        out = {
            "text": model.semantic.predict(x, s, torch.Generator().manual_seed(seed), use_prior, prior_steps),
            "latent": momentum_align(
                model.latent.predict(x, s), model.latent_mean, model.latent_std
            ),  # Eq. 6-7
        }
        if guided:
            for l in self.config.guidance_layers:
                out[f"layer{l}"] = model.guidance[guidance_key(l)].predict(
                    x, s, torch.Generator().manual_seed(seed + l), use_prior, prior_steps
                )
        return out

    def reconstruct(
        self, betas: np.ndarray, samples: int = 5, seed: int = 0, *, variant: str | None = None, **overrides
    ) -> np.ndarray:
        """Algorithm 1 for every row of ``betas (N, V)`` → uint8 ``(N, K, H, W, 3)``.

        ``overrides`` change :class:`ReconstructionSettings` fields (e.g. ``guidance_scale``,
        ``guidance_strength`` for the κ/η sweep of Tab. 2).
        """
        variant = self.resolve_variant(variant)
        settings = self.settings(variant, **overrides)
        guided = variant == "guided" and settings.guidance_scale != 0
        decoded = self.decode(betas, seed, guided=guided)
        ld, clip = self.backbones()
        layers = tuple(self.config.guidance_layers)
        images = reconstruct_images(
            ld,
            decoded["text"].to(ld.device),
            decoded["latent"].to(ld.device),
            clip=clip,
            layers=layers,
            guidance_targets=[decoded[f"layer{l}"].to(ld.device) for l in layers] if guided else None,
            settings=settings,
            samples=samples,
            seed=seed,
            progress=self.config.progress,
            site=self.config.guidance_site,
        )
        return (images.permute(0, 1, 3, 4, 2).numpy() * 255).round().astype(np.uint8)

    @torch.no_grad()
    def selection_losses(self, betas: np.ndarray, recons: np.ndarray, seed: int = 0) -> np.ndarray:
        """Second-order selection scores (:func:`.pipeline.selection_losses`) of uint8 reconstructions
        ``(N, K, H, W, 3)`` of ``betas (N, V)``: ``(N, K)``, lower = closer to the brain-decoded guidance
        features (decoded with ``seed``, as :meth:`reconstruct` does)."""
        recons = np.asarray(recons)
        if recons.ndim != 5 or recons.shape[0] != len(betas):
            raise ValueError(f"recons must be (N, K, H, W, 3) with N = {len(betas)}, got {recons.shape}")
        decoded = self.decode(betas, seed, guided=True)
        ld, clip = self.backbones()
        layers = tuple(self.config.guidance_layers)
        images = torch.from_numpy(recons).permute(0, 1, 4, 2, 3).float().to(ld.device) / 255
        features = guidance_features(clip, layers, self.config.guidance_site, self.config.clip_normalization)
        targets = [decoded[f"layer{l}"].to(ld.device) for l in layers]
        losses = selection_losses(images, targets, features, tuple(self.config.layer_factors))
        return losses.cpu().numpy()

    def select_best(self, betas: np.ndarray, recons: np.ndarray, seed: int = 0) -> np.ndarray:
        """The best of each item's K samples by :meth:`selection_losses`: uint8 ``(N, 1, H, W, 3)``."""
        best = self.selection_losses(betas, recons, seed).argmin(axis=1)
        return np.asarray(recons)[np.arange(len(best)), best][:, None]

    # ------------------------------------------------------------------------------------------ retrieval
    @torch.no_grad()
    def brain_layer_embeddings(self, betas: np.ndarray) -> list[np.ndarray]:
        """Per guidance layer, the projector output of ``f_g^l`` flattened: ``(N, T·W)`` each (§5.3)."""
        model = self._require_model()
        x = torch.from_numpy(self.check_betas(betas))
        return [
            model.guidance[guidance_key(l)].embed(x, self.subject).numpy()
            for l in self.config.guidance_layers
        ]

    @torch.no_grad()
    def image_layer_embeddings(self, images: np.ndarray) -> list[np.ndarray]:
        """Per guidance layer, the CLIP layer features of uint8 ``(N, H, W, 3)`` images flattened."""
        _, clip = self.backbones()
        x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0
        feats = clip.image_hidden_states(x, list(self.config.guidance_layers), site=self.config.guidance_site)
        return [f.flatten(1).float().cpu().numpy() for f in feats]

    @staticmethod
    def _joint(layers: list[np.ndarray]) -> np.ndarray:
        # Concatenated unit vectors / √L: a cosine in this space is the mean per-layer cosine (soft voting).
        unit = [x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12) for x in layers]
        return (np.concatenate(unit, axis=1) / np.sqrt(len(unit))).astype(np.float32)

    def brain_embeddings(self, betas: np.ndarray) -> np.ndarray:
        """``(N, D)`` brain side for the evaluation suite; hard per-layer voting: :mod:`.retrieval`."""
        return self._joint(self.brain_layer_embeddings(betas))

    def image_embeddings(self, images: np.ndarray) -> np.ndarray:
        return self._joint(self.image_layer_embeddings(images))
