"""NeuralDiffuser on the :class:`~fmrirecon.methods.base.ReconMethod` interface: config, runs, reconstruction.

One config (:class:`NeuralDiffuserMethodConfig`) with a ``model`` section (:class:`.model.DecoderSizes`), a
``training`` section (:class:`NeuralDiffuserTraining`) and a ``reconstruction`` section
(:class:`.pipeline.ReconstructionSettings`); everything else derives from it. The same code runs on the
synthetic world (``diffusion: world``, ``clip: world``) and on NSD with Stable Diffusion 1.4 and CLIP
ViT-B/32 (hub ids); only config values differ.

Runs (§4.2.3): a ``pretrain`` run fits every decoder on other subjects (leave the target out); a ``target``
run starts from it (``init_from``) and fine-tunes the target's voxel encoder with the shared mapping.

Variants: ``guided`` (κ, η from the settings) and ``unguided`` (κ = 0).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from fmrirecon.errors import ConfigError
from fmrirecon.io import read_json, save_safetensors_atomic
from fmrirecon.methods.base import PRETRAIN, TARGET, Capabilities, ReconMethod, RunData, read_run
from fmrirecon.methods.neuraldiffuser.model import (
    DecoderSizes,
    NeuralDiffuserConfig,
    NeuralDiffuserModel,
    build_decoder,
    decoder_names,
    guidance_key,
    momentum_align,
)
from fmrirecon.methods.neuraldiffuser.pipeline import (
    ReconstructionSettings,
    guidance_features,
    reconstruct_images,
    selection_losses,
)
from fmrirecon.nn import shared_weights
from fmrirecon.train import TrainConfig

__all__ = ["NeuralDiffuser", "NeuralDiffuserMethodConfig", "NeuralDiffuserTraining"]

# Paper §4.3 Eq. 13: CLIP image-encoder layers 2, 4, …, 12 (block outputs). The released code instead hooks
# the MLP outputs of blocks 1–6: guidance_layers=[1,2,3,4,5,6], guidance_site=mlp.
PAPER_LAYERS = (2, 4, 6, 8, 10, 12)
PRETRAINED_FILE = "pretrained.safetensors"


def _paper_train() -> TrainConfig:
    # §5.1: 150 epochs, AdamW, one-cycle LR with max 3e-4.
    return TrainConfig(epochs=150, lr=3e-4, schedule="onecycle")


@dataclass
class NeuralDiffuserTraining:
    """Training section (§4.2.3, §5.1).

    Attributes:
        pretrain: the paper's protocol: a target run starts from a leave-the-target-out ``pretrain`` run
            (``--init-from``); False trains the target from scratch.
        target_sessions: use only the target's first K sessions (None = all).
        batch_size: trials per optimiser step (§5.1: 42).
        sample_latents: VAE latent targets sampled from the posterior (True) or its mean.
        pretrain_train, finetune_train: the trainer settings of the two stages.
    """

    pretrain: bool = True
    target_sessions: int | None = None
    batch_size: int = 42
    sample_latents: bool = True
    pretrain_train: TrainConfig = field(default_factory=_paper_train)
    finetune_train: TrainConfig = field(default_factory=_paper_train)


@dataclass
class NeuralDiffuserMethodConfig:
    """Everything a NeuralDiffuser run needs; defaults are the paper's (§4.2, §4.3, §5.1).

    Shapes (text condition, CLIP layer tokens, VAE latent) are read from the loaded backbones, never set here.
    """

    diffusion: str = "CompVis/stable-diffusion-v1-4"  # hub id / folder, or "world"
    clip: str = "openai/clip-vit-base-patch32"  # hub id / folder, or "world"
    guidance_layers: tuple[int, ...] = PAPER_LAYERS
    guidance_site: Literal["block", "mlp"] = "block"
    model: DecoderSizes = field(default_factory=DecoderSizes)
    training: NeuralDiffuserTraining = field(default_factory=NeuralDiffuserTraining)
    reconstruction: ReconstructionSettings = field(default_factory=ReconstructionSettings)
    progress: bool = True


# what a target run must share with the pretraining run it starts from
_ARCHITECTURE_KEYS = ("diffusion", "clip", "guidance_layers", "guidance_site", "model")


class NeuralDiffuser(ReconMethod):
    """NeuralDiffuser (Li, Wu & Chen): fMRI → SD latent / text condition / CLIP-layer features, then primary
    visual feature guided img2img (``../shared/papers/neuraldiffuser.txt``)."""

    name = "neuraldiffuser"
    Config = NeuralDiffuserMethodConfig
    Settings = ReconstructionSettings
    capabilities = Capabilities(
        variants=("guided", "unguided"),
        stages=(TARGET, PRETRAIN),
        pretrain_holds_out_targets=True,
        second_order_selection=True,
        retrieval_embeddings=True,
    )

    def __init__(self, config: NeuralDiffuserMethodConfig | None = None):
        super().__init__(config)
        self.model: NeuralDiffuserModel | None = None
        self._backbones = None  # set only to bypass the loader (test doubles); then used as they are

    def uses_pretraining(self) -> bool:
        return self.config.training.pretrain

    # ------------------------------------------------------------------------------------------ backbones
    def backbones(self, precision: str = "float32"):
        """``(LatentDiffusion, ClipEmbedder)`` named by the config, on this method's device with weights in
        ``precision`` (the shared loader keeps one copy per device and dtype)."""
        from fmrirecon.backbones.loader import load_clip, load_latent_diffusion
        from fmrirecon.device import resolve_dtype

        dtype = resolve_dtype(precision, self.device)
        if self._backbones is not None:
            return self._backbones
        return (
            load_latent_diffusion(self.config.diffusion, self.device, dtype),
            load_clip(self.config.clip, self.device, dtype),
        )

    def to(self, device) -> NeuralDiffuser:
        super().to(device)
        if self.model is not None:
            self.model.to(self.device)
        if self._backbones is not None and self._backbones[0].device.type != self.device.type:
            self._backbones = None
        return self

    def model_config(self, voxel_counts: dict[int, int], text_shape, guidance_shape, latent_shape):
        return NeuralDiffuserConfig(
            **asdict(self.config.model),
            voxel_counts=voxel_counts,
            text_shape=tuple(text_shape),
            guidance_layers=tuple(self.config.guidance_layers),
            guidance_shape=tuple(guidance_shape),
            latent_shape=tuple(latent_shape),
        )

    # ------------------------------------------------------------------------------------------ training
    def fit(self, data: RunData, run_dir: str | os.PathLike, *, seed: int = 0) -> None:
        """``pretrain``: every decoder on ``data.subjects`` (each with its own voxel encoder); ``target``: the
        one target subject, starting from ``data.init_from`` when given (§4.2.3)."""
        from fmrirecon.data.multisubject import MultiSubjectTrials, collate_subjects
        from fmrirecon.methods.neuraldiffuser.train import cached_targets, training_rows
        from fmrirecon.train.stages import run_stage

        self.check_run_data(data)
        cfg, train = self.config, self.config.training
        store = data.store
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if data.stage == TARGET and train.pretrain and data.init_from is None:
            others = [s for s in store.subjects if s != data.subject]
            raise ConfigError(
                "neuraldiffuser pretrains leaving the target out (training.pretrain = true): train "
                "`fmrirecon train neuraldiffuser --stage pretrain "
                f"--subjects {','.join(map(str, others)) or 'N,M'}"
                " --data STORE --out PRE` first and pass --init-from PRE, or set training.pretrain=false"
            )
        target_sessions = train.target_sessions if data.stage == TARGET else None
        parts = {
            s: (store.subject(s), training_rows(store.subject(s), target_sessions)) for s in data.subjects
        }
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
            sample_latents=train.sample_latents,
            seed=seed,
            progress=cfg.progress,
        )
        voxel_counts = {s: st.n_voxels for s, (st, _) in parts.items()}
        layer0 = f"layer{cfg.guidance_layers[0]}"
        model_config = self.model_config(
            voxel_counts, targets["text"].shape[1:], targets[layer0].shape[1:], targets["latent"].shape[1:]
        )
        voxel_data = {s: (st.betas(rows), st.trials["image_id_73k"][rows]) for s, (st, rows) in parts.items()}
        dataset_parts = [(s, *voxel_data[s]) for s in data.subjects]
        pretrained = self._read_pretrained(data.init_from, model_config) if data.init_from else {}
        run_config = {"method": self.name, "stage": data.stage, "subjects": list(data.subjects), "seed": seed}
        stage_train = train.pretrain_train if data.stage == PRETRAIN else train.finetune_train
        stage_prefix = "pretrain" if data.stage == PRETRAIN else "finetune"
        model = NeuralDiffuserModel(model_config) if data.stage == TARGET else None
        shared_states: dict[str, torch.Tensor] = {}
        for name, decoder_target in self._decoder_targets(targets).items():
            torch.manual_seed(seed)
            decoder = build_decoder(model_config, name)
            if name in pretrained:
                missing, unexpected = decoder.load_state_dict(pretrained[name], strict=False)
                assert not unexpected and all(k.startswith("voxel_encoders.") for k in missing)
            dataset = MultiSubjectTrials(dataset_parts, decoder_target, targets["ids"].numpy())
            run_stage(
                decoder,
                dataset,
                stage_train,
                run_dir,
                f"{stage_prefix}-{name}",
                train.batch_size,
                seed,
                run_config,
                collate_fn=collate_subjects,
            )
            if model is not None:
                model.decoder(name).load_state_dict(decoder.state_dict())
            else:
                shared_states.update({f"{name}/{k}": v for k, v in shared_weights(decoder).items()})
        if model is None:  # a pretraining run keeps the subject-shared weights only (voxel encoders differ)
            save_safetensors_atomic(
                {k: v.detach().contiguous() for k, v in shared_states.items()}, run_dir / PRETRAINED_FILE
            )
            return
        subject = data.subject
        target_rows = np.searchsorted(targets["ids"].numpy(), np.unique(voxel_data[subject][1]))
        model.set_latent_statistics(targets["latent"][target_rows])
        model.save(run_dir / "model")
        self.model, self.subject, self.n_voxels = model.eval(), subject, voxel_counts[subject]

    def _read_pretrained(self, init_dir: Path, model_config: NeuralDiffuserConfig) -> dict[str, dict]:
        """The subject-shared weights of a ``pretrain`` run, per decoder, after checking the architecture."""
        from safetensors.torch import load_file

        from fmrirecon.config import diff_configs

        init_dir = Path(init_dir)
        if read_run(init_dir).get("stage") != PRETRAIN:
            raise ConfigError(
                f"--init-from {init_dir} is not a neuraldiffuser pretrain run (stage 'pretrain')"
            )
        theirs = read_json(init_dir / "config.json")
        from fmrirecon.config import config_to_dict

        ours = config_to_dict(self.config)
        diffs = diff_configs(
            {k: theirs.get(k) for k in _ARCHITECTURE_KEYS}, {k: ours[k] for k in _ARCHITECTURE_KEYS}
        )
        if diffs:
            raise ConfigError(
                f"--init-from {init_dir} was pretrained with another architecture ({'; '.join(diffs)}); "
                "a target run must use the pretraining run's backbones, guidance layers and model sizes"
            )
        flat = load_file(init_dir / PRETRAINED_FILE)
        out: dict[str, dict] = {}
        for key, value in flat.items():
            name, _, param = key.partition("/")
            out.setdefault(name, {})[param] = value
        expected = set(decoder_names(model_config.guidance_layers))
        if set(out) != expected:
            raise ConfigError(
                f"{init_dir / PRETRAINED_FILE} holds decoders {sorted(out)}, expected {sorted(expected)}"
            )
        return out

    def _decoder_targets(self, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {"semantic": targets["text"]}
        out.update({f"guidance.{guidance_key(l)}": targets[f"layer{l}"] for l in self.config.guidance_layers})
        out["latent"] = targets["latent"]
        return out

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, run_dir: str | os.PathLike, *, device=None) -> NeuralDiffuser:
        info = read_run(run_dir)
        if info.get("stage", TARGET) != TARGET:
            raise ConfigError(
                f"{run_dir} is a neuraldiffuser '{info.get('stage')}' run; reconstruct from a target run "
                "trained with --init-from it"
            )
        method = cls(cls.read_run_config(run_dir))
        method.model = NeuralDiffuserModel.load(Path(run_dir) / "model").eval()
        method.subject = int(info["subject"])
        method.n_voxels = method.model.config.voxel_counts[method.subject]
        if device is not None:
            method.to(device)
        return method

    # ------------------------------------------------------------------------------------------ inference
    def settings_for(
        self, variant: str, settings: ReconstructionSettings | None = None
    ) -> ReconstructionSettings:
        """The settings a variant samples with: ``unguided`` sets κ = 0."""
        from dataclasses import replace

        settings = self.resolve_settings(settings)
        return settings if variant == "guided" else replace(settings, feature_guidance_scale=0.0)

    def _require_model(self) -> NeuralDiffuserModel:
        if self.model is None:
            raise ConfigError(
                "this NeuralDiffuser has no trained model: call fit() or NeuralDiffuser.load(run_dir)"
            )
        return self.model

    @torch.no_grad()
    def decode(
        self,
        betas: np.ndarray,
        seed: int = 0,
        guided: bool = True,
        use_prior: bool | None = None,
        precision: str = "float32",
    ) -> dict[str, torch.Tensor]:
        """Decoded embeddings on the method's device, float32: ``text (N, L, D)``, aligned
        ``latent (N, C, h, w)``, ``layer<l> (N, T, W)``; the decoders run under autocast in ``precision``."""
        from fmrirecon.device import autocast, resolve_dtype

        with autocast(self.device, resolve_dtype(precision, self.device)):
            out = self._decode(betas, seed, guided, use_prior)
        return {k: v.float() for k, v in out.items()}

    def _decode(self, betas, seed, guided, use_prior) -> dict[str, torch.Tensor]:
        model = self._require_model()
        x = torch.from_numpy(self.check_betas(betas)).to(self.device)
        s = self.subject
        use_prior = self.config.reconstruction.use_prior if use_prior is None else use_prior
        prior_steps = self.config.model.prior_sample_steps
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
        self,
        betas: np.ndarray,
        samples: int = 5,
        seed: int = 0,
        *,
        variant: str | None = None,
        settings: ReconstructionSettings | None = None,
    ) -> np.ndarray:
        """Algorithm 1 for every row of ``betas (N, V)`` → uint8 ``(N, K, H, W, 3)``.

        ``settings`` (default: the config's ``reconstruction`` section) carries κ, η, CFG, steps (Tab. 2).
        """
        variant = self.resolve_variant(variant)
        settings = self.settings_for(variant, settings)
        guided = settings.feature_guidance_scale != 0
        decoded = self.decode(
            betas, seed, guided=guided, use_prior=settings.use_prior, precision=settings.precision
        )
        ld, clip = self.backbones(settings.precision)
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
        return (images.permute(0, 1, 3, 4, 2).float().cpu().numpy() * 255).round().astype(np.uint8)

    @torch.no_grad()
    def selection_losses(
        self,
        betas: np.ndarray,
        recons: np.ndarray,
        seed: int = 0,
        settings: ReconstructionSettings | None = None,
    ) -> np.ndarray:
        """Second-order selection scores (:func:`.pipeline.selection_losses`) of uint8 reconstructions
        ``(N, K, H, W, 3)`` of ``betas (N, V)``: ``(N, K)``, lower = closer to the brain-decoded guidance
        features (decoded with ``seed``, as :meth:`reconstruct` does)."""
        settings = self.resolve_settings(settings)
        recons = np.asarray(recons)
        if recons.ndim != 5 or recons.shape[0] != len(betas):
            raise ValueError(f"recons must be (N, K, H, W, 3) with N = {len(betas)}, got {recons.shape}")
        decoded = self.decode(betas, seed, guided=True, use_prior=settings.use_prior)
        ld, clip = self.backbones()
        layers = tuple(self.config.guidance_layers)
        images = torch.from_numpy(recons).permute(0, 1, 4, 2, 3).float().to(ld.device) / 255
        features = guidance_features(clip, layers, self.config.guidance_site, settings.clip_normalization)
        targets = [decoded[f"layer{l}"].to(ld.device) for l in layers]
        losses = selection_losses(images, targets, features, tuple(settings.layer_factors))
        return losses.cpu().numpy()

    def select_best(
        self,
        betas: np.ndarray,
        recons: np.ndarray,
        seed: int = 0,
        settings: ReconstructionSettings | None = None,
    ) -> np.ndarray:
        """The best of each item's K samples by :meth:`selection_losses`: uint8 ``(N, 1, H, W, 3)``."""
        best = self.selection_losses(betas, recons, seed, settings).argmin(axis=1)
        return np.asarray(recons)[np.arange(len(best)), best][:, None]

    # ------------------------------------------------------------------------------------------ retrieval
    @torch.no_grad()
    def brain_layer_embeddings(self, betas: np.ndarray) -> list[np.ndarray]:
        """Per guidance layer, the projector output of ``f_g^l`` flattened: ``(N, T·W)`` each (§5.3)."""
        model = self._require_model()
        x = torch.from_numpy(self.check_betas(betas)).to(self.device)
        return [
            model.guidance[guidance_key(l)].embed(x, self.subject).float().cpu().numpy()
            for l in self.config.guidance_layers
        ]

    @torch.no_grad()
    def image_layer_embeddings(self, images: np.ndarray) -> list[np.ndarray]:
        """Per guidance layer, the CLIP layer features of uint8 ``(N, H, W, 3)`` images flattened."""
        _, clip = self.backbones()
        x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float().to(self.device) / 255.0
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
