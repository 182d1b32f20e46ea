"""Train the world backbones on synthetic scenes and check their quality on held-out scenes.

Five stages behind the shipped weights, each a plain loop (``fmrirecon backbones train-world``):

1. ``clip``: a tiny transformers ``CLIPModel`` trained with the symmetric InfoNCE loss of CLIP (Radford et
   al. 2021, Fig. 3) on (scene, caption) pairs plus a zero-shot prompt term on the scene's primary category
   (``clip_category_weight``); the word-level tokenizer is built from the training captions. Optional:
   category-swapped hard-negative captions (:func:`swap_categories`, ``clip_hard_negatives``).
   ``clip_vision`` then sharpens the image side with the text transformer frozen (object shape is learnt
   last, and only from many scenes: 48,000 rather than 6,000, benchmarks/RESULTS.md "World backbones").
2. ``vae``: a small diffusers ``AutoencoderKL`` (64x64x3 -> 4x16x16) trained with a pixel loss plus a tiny
   KL term (LDM's "KL-reg", Rombach et al. 2022 §3); its ``scaling_factor`` is then set to 1 / std of the
   training latents (LDM §4.3.2), as SD's 0.18215 was.
3. ``unet``: a diffusers ``UNet2DConditionModel`` on the VAE latents, conditioned on the world CLIP text
   tower's token sequence (as SD on CLIP text), epsilon-prediction loss (DDPM, Ho et al. 2020, Eq. 14; or
   v-prediction, ``unet_prediction_type``) with caption dropout (the context replaced by the empty-text
   tokens) so classifier-free guidance works (Ho & Salimans 2022), offset noise and Min-SNR-γ weighting.

Training scenes come from ``make_world(n_train, seed=1000)`` (the ``vae`` stage uses the first
``vae_n_train``; the scene sequence does not depend on its length); held-out scenes from ``seed=2000``
(the demo's world uses seed 0). Captions: each step draws, per scene, its *full* caption (the most
informative one: the longest, naming every object with size and colour, their relation and the background)
with probability ``full_caption_prob`` and one of its 5 captions uniformly otherwise. Quality checks use the
full caption.

``vae_decoder`` then fine-tunes the VAE decoder on all scenes with an edge term, the encoder (so the latents
and the UNet) frozen. Every stage checkpoints its weights (safetensors) every ``checkpoint_every`` steps under
``work_dir`` and resumes from the last checkpoint (weights and step; the optimiser restarts).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fmrirecon.io import (
    atomic_path,
    library_versions,
    read_json,
    save_safetensors_atomic,
    write_json_atomic,
)

log = logging.getLogger(__name__)

STAGES = ("clip", "vae", "unet", "vae_decoder", "clip_vision")


@dataclass
class WorldTrainConfig:
    """Hyper-parameters of ``train-world`` (defaults = the shipped weights; the UNet: see ``unet_steps``)."""

    train_seed: int = 1000
    n_train: int = 48000
    vae_n_train: int = 6000
    heldout_seed: int = 2000
    n_heldout: int = 300
    image_size: int = 64
    full_caption_prob: float = 0.5
    # CLIP
    clip_steps: int = 6000
    clip_batch: int = 64
    clip_patch_size: int = 8
    clip_lr: float = 1e-3
    # off for the shipped CLIP: in a 600-step trial on 6,000 scenes they moved zero-shot category only from
    # 10 % to 13 % (benchmarks/RESULTS.md, "World backbones")
    clip_hard_negatives: bool = False
    clip_category_weight: float = 1.0
    clip_vision_steps: int = 6000
    clip_vision_lr: float = 1e-3
    clip_vision_category_weight: float = 2.0
    # VAE
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    # L1 on the images' finite differences (horizontal and vertical): pixel losses are dominated by the
    # backgrounds, which cover most of a scene; edges carry the objects' shapes
    vae_gradient_weight: float = 0.0
    # decoder fine-tuning (encoder frozen, so the latents and the UNet stay valid), on all n_train scenes
    vae_decoder_steps: int = 3000
    vae_decoder_batch: int = 32
    vae_decoder_gradient_weight: float = 1.0
    # bfloat16 autocast of the VAE stage (2x faster on CPUs with AVX512-BF16/AMX; the weights stay float32)
    vae_bf16: bool = True
    # UNet
    # the shipped UNet: a 6000-step run, then resumed in the same work dir with unet_steps=9000 (its cosine
    # schedule restarted from the 9000-step curve at step 6000; generated 2-way 0.938 -> 0.954)
    unet_steps: int = 9000
    unet_batch: int = 32
    unet_lr: float = 5e-4
    caption_dropout: float = 0.1
    # per-channel constant noise added to the training noise (offset noise, Guttenberg 2023): without it the
    # channel means of z_t give the background away at almost every t, and the UNet learns to ignore the
    # caption's background (benchmarks/RESULTS.md, "World backbones"); 0 = plain DDPM
    unet_offset_noise: float = 0.1
    # Min-SNR-γ loss weighting (Hang et al. 2023: min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR + 1) for
    # v-prediction); 0 = uniform
    unet_min_snr_gamma: float = 5.0
    # "epsilon" (SD 1.x) or "v_prediction" (SD 2.x; Salimans & Ho 2022 §4): v-prediction trains the UNet on
    # the x0 error at high noise, where an ε error is amplified by √(1−ᾱ)/√ᾱ (≈ 15 at t = 999)
    unet_prediction_type: str = "v_prediction"
    unet_block_out_channels: tuple[int, ...] = (32, 64, 96)
    # text cross-attention also at the latents' own 16x16 resolution (else only at 8x8 and 4x4)
    unet_full_resolution_attention: bool = False
    ema_decay: float = 0.999
    # bookkeeping
    checkpoint_every: int = 100
    threads: int = 1


def full_caption(captions: list[str]) -> str:
    """The most informative of a scene's 5 captions (the "full" kind: every object with its size and colour,
    their relation, the background): most size/colour words, then most words."""
    from fmrirecon.data.world import COLOURS, SIZES

    attributes = set(COLOURS) | set(SIZES)
    return max(captions, key=lambda c: (sum(w in attributes for w in c.split()), len(c.split()), c))


# ---------------------------------------------------------------------- helpers
def _images_tensor(world, n: int | None = None) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1], of the first ``n`` scenes (all by default)."""
    return torch.from_numpy(world.images[:n]).permute(0, 3, 1, 2).float().div_(255)


def _pick_captions(world, index: np.ndarray, rng: np.random.Generator, full_prob: float) -> list[str]:
    out = []
    for i in index:
        caps = world.captions[i]
        out.append(full_caption(caps) if rng.random() < full_prob else caps[rng.integers(len(caps))])
    return out


def swap_categories(text: str, rng: np.random.Generator) -> str | None:
    """``text`` with every object category word (singular or plural) replaced by a different, random category
    in the same number; ``None`` when the caption names no category.

    Used as a hard negative for the world CLIP: a batch of world scenes is told apart by colours and
    backgrounds alone, so plain InfoNCE never has to learn object shape; a caption that differs from the
    positive only in its categories does (the hard-negative captions of NegCLIP, Yuksekgonul et al. 2023
    §4, with category swaps instead of word-order swaps).
    """
    from fmrirecon.data.world import CATEGORIES, _plural

    forms = {c: (i, False) for i, c in enumerate(CATEGORIES)} | {
        _plural(c): (i, True) for i, c in enumerate(CATEGORIES)
    }
    words = text.split()
    swapped = False
    for k, word in enumerate(words):
        if word in forms:
            index, plural = forms[word]
            other = CATEGORIES[(index + 1 + int(rng.integers(len(CATEGORIES) - 1))) % len(CATEGORIES)]
            words[k] = _plural(other) if plural else other
            swapped = True
    return " ".join(words) if swapped else None


def _cosine_lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class _Checkpoint:
    """Weights + step of one stage under ``work_dir/<stage>``, saved atomically, for resuming."""

    def __init__(self, work_dir: Path, stage: str) -> None:
        self.weights = work_dir / f"{stage}.safetensors"
        self.state = work_dir / f"{stage}.json"

    def load(self, module: torch.nn.Module) -> int:
        if not self.weights.is_file():
            return 0
        from safetensors.torch import load_file

        module.load_state_dict(load_file(self.weights))
        return int(json.loads(self.state.read_text())["step"])

    def save(self, module: torch.nn.Module, step: int, **extra) -> None:
        save_safetensors_atomic(module.state_dict(), self.weights)
        write_json_atomic(self.state, {"step": step, **extra})


def _loop(
    stage: str, total: int, start: int, step_fn, checkpoint: _Checkpoint, module, every: int, lr: float, opt
):
    losses = []
    bar = tqdm(range(start, total), desc=f"train-world {stage}", initial=start, total=total)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, total, lr)
        loss = step_fn(step)
        if not math.isfinite(loss):
            raise FloatingPointError(f"{stage}: non-finite loss {loss} at step {step}")
        losses.append(loss)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if (step + 1) % every == 0 or step + 1 == total:
            checkpoint.save(module, step + 1, loss=float(np.mean(losses[-50:])))
    return losses


# ---------------------------------------------------------------------- stage 1: CLIP
def train_clip(cfg: WorldTrainConfig, world, work_dir: Path):
    """Contrastive training of the world CLIP. Returns a :class:`ClipEmbedder`."""
    from fmrirecon.backbones.world.models import random_clip_embedder, world_clip_config
    from fmrirecon.backbones.world.tokenizer import build_word_tokenizer, words_of
    from fmrirecon.data.world import CATEGORIES, _plural

    # every category in both numbers is in the vocabulary (hard negatives and prompts use them all)
    all_captions = [c for caps in world.captions for c in caps] + [f"a {c} {_plural(c)}" for c in CATEGORIES]
    longest = max(len(words_of(c)) for c in all_captions)
    tokenizer = build_word_tokenizer(all_captions, max_length=longest + 2 + 2)  # + BOS/EOS + headroom
    clip = random_clip_embedder(tokenizer, world_clip_config, cfg.train_seed, patch_size=cfg.clip_patch_size)
    model = clip.model
    model.train().requires_grad_(True)
    checkpoint = _Checkpoint(work_dir, "clip")
    start = checkpoint.load(model)
    images = _images_tensor(world)
    rng = np.random.default_rng(cfg.train_seed + start)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.05)

    # the zero-shot prompts ride along in the text batch only when their loss term is on
    prompts = [f"a {category}" for category in CATEGORIES] if cfg.clip_category_weight else []
    primary = torch.from_numpy(np.asarray(world.primary_category))

    def step_fn(step):
        index = rng.choice(len(images), size=cfg.clip_batch, replace=False)
        texts = _pick_captions(world, index, rng, cfg.full_caption_prob)
        negatives = [swap_categories(t, rng) for t in texts] if cfg.clip_hard_negatives else []
        negatives = [t for t in negatives if t is not None]
        img = F.normalize(clip.image_embeds(images[index]), dim=-1)
        txt = F.normalize(clip.text_embeds(texts + negatives + prompts), dim=-1)
        txt, neg, classifier = txt.split([len(texts), len(negatives), len(prompts)])
        scale = model.logit_scale.exp().clamp(max=100)
        logits = scale * img @ txt.T
        # identical captions in a batch (e.g. two "a photo") are positives for each other
        same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        # image -> text over the batch's captions and the category-swapped hard negatives (never positives)
        image_logits = torch.cat([logits, scale * img @ neg.T], dim=1)
        image_target = F.pad(target, (0, len(negatives)))
        loss = (F.cross_entropy(image_logits, image_target) + F.cross_entropy(logits.T, target.T)) / 2
        if cfg.clip_category_weight:
            # CLIP's zero-shot classifier (Radford et al. 2021 §3.1.2) on the scene's primary category
            category = F.cross_entropy(scale * img @ classifier.T, primary[index])
            loss = loss + cfg.clip_category_weight * category
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    _loop("clip", cfg.clip_steps, start, step_fn, checkpoint, model, cfg.checkpoint_every, cfg.clip_lr, opt)
    model.eval().requires_grad_(False)
    return clip


def train_clip_vision(cfg: WorldTrainConfig, world, clip, work_dir: Path):
    """Stage 5: sharpen the world CLIP's image side with its text transformer frozen.

    Stage 1 learns colours, sizes and backgrounds first; object shape (the category) comes last. This stage
    trains the vision tower and both projections (the text transformer, hence the UNet's context tokens, stays
    fixed) with the same InfoNCE loss plus a prompt-classification term: cross-entropy of the image embedding
    against the text embeddings of "a <category>" for the scene's primary category (CLIP's zero-shot
    classifier, Radford et al. 2021 §3.1.2, used as a training target).
    """
    from fmrirecon.data.world import CATEGORIES

    model = clip.model
    model.requires_grad_(False)
    trainable = [
        *model.vision_model.parameters(),
        *model.visual_projection.parameters(),
        *model.text_projection.parameters(),
        model.logit_scale,
    ]
    for p in trainable:
        p.requires_grad_(True)
    checkpoint = _Checkpoint(work_dir, "clip_vision")
    start = checkpoint.load(model)
    images = _images_tensor(world)
    # frozen text transformer: pooled (EOS) states of every caption, computed once
    captions = sorted({c for caps in world.captions for c in caps} | {f"a {c}" for c in CATEGORIES})
    row = {c: i for i, c in enumerate(captions)}
    with torch.no_grad():
        pooled = torch.cat(
            [
                model.text_model(input_ids=clip.tokenize(captions[i : i + 512])).pooler_output
                for i in range(0, len(captions), 512)
            ]
        )
    prompts = torch.tensor([row[f"a {c}"] for c in CATEGORIES])
    primary = torch.from_numpy(np.asarray(world.primary_category))
    rng = np.random.default_rng(cfg.train_seed + 4 + start)
    opt = torch.optim.AdamW(trainable, lr=cfg.clip_vision_lr, weight_decay=0.05)
    model.vision_model.train()

    def step_fn(step):
        index = rng.choice(len(images), size=cfg.clip_batch, replace=False)
        texts = _pick_captions(world, index, rng, cfg.full_caption_prob)
        img = F.normalize(clip.image_embeds(images[index]), dim=-1)
        txt = F.normalize(model.text_projection(pooled[[row[t] for t in texts]]), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        logits = scale * img @ txt.T
        same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T)) / 2
        classifier = F.normalize(model.text_projection(pooled[prompts]), dim=-1)
        loss = loss + cfg.clip_vision_category_weight * F.cross_entropy(
            scale * img @ classifier.T, primary[index]
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    total = cfg.clip_vision_steps
    _loop(
        "clip_vision", total, start, step_fn, checkpoint, model, cfg.checkpoint_every, cfg.clip_vision_lr, opt
    )
    model.eval().requires_grad_(False)
    return clip


# ---------------------------------------------------------------------- stage 2: VAE
def _reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, gradient_weight: float) -> torch.Tensor:
    """MSE + 0.5·L1 on pixels, plus ``gradient_weight`` · L1 on horizontal and vertical differences."""
    loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
    if gradient_weight:
        for dim in (-1, -2):
            loss = loss + gradient_weight * F.l1_loss(recon.diff(dim=dim), x.diff(dim=dim))
    return loss


def train_vae(cfg: WorldTrainConfig, world, work_dir: Path):
    """Autoencoder training; returns the ``AutoencoderKL`` with ``scaling_factor`` set from the data."""
    from diffusers import AutoencoderKL

    from fmrirecon.backbones.world.models import world_vae_config

    torch.manual_seed(cfg.train_seed + 1)
    vae = AutoencoderKL(**world_vae_config())
    checkpoint = _Checkpoint(work_dir, "vae")
    start = checkpoint.load(vae)
    images = _images_tensor(world, cfg.vae_n_train)
    rng = np.random.default_rng(cfg.train_seed + 1 + start)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()

    def step_fn(step):
        x = images[rng.choice(len(images), size=cfg.vae_batch, replace=False)] * 2 - 1
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.vae_bf16):
            posterior = vae.encode(x).latent_dist
            # decode the posterior mean (a deterministic autoencoder; make_posterior_deterministic below
            # makes the saved posterior say so)
            recon = vae.decode(posterior.mean).sample.float()
        kl = posterior.kl().mean()
        loss = _reconstruction_loss(recon, x, cfg.vae_gradient_weight) + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    _loop("vae", cfg.vae_steps, start, step_fn, checkpoint, vae, cfg.checkpoint_every, cfg.vae_lr, opt)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat(
            [vae.encode(images[i : i + 256] * 2 - 1).latent_dist.mean for i in range(0, 2048, 256)]
        )
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    make_posterior_deterministic(vae)
    return vae


LOGVAR_MIN = -30.0  # diffusers' DiagonalGaussianDistribution clamps log-variances to [-30, 20]


@torch.no_grad()
def make_posterior_deterministic(vae) -> None:
    """Pin the VAE posterior's log-variance at ``LOGVAR_MIN`` (σ = e^-15), so ``latent_dist.sample()`` equals
    ``latent_dist.mean`` to about 1e-7; the mean is untouched.

    The world VAE decodes the posterior mean during training, so its log-variance head is shaped only by the
    tiny KL term, which pulls it toward the prior (σ = 1, i.e. 1.3 in scaled units, more than the latents'
    own spread). Sampling from that posterior (as NeuralDiffuser's targets do, following the authors' code for
    SD, whose posterior σ is negligible) would add noise the decoder never saw. Pinning the log-variance makes
    the saved model describe the autoencoder it was trained as.
    """
    channels = vae.config.latent_channels
    conv = vae.quant_conv if getattr(vae, "quant_conv", None) is not None else vae.encoder.conv_out
    conv.weight[channels:].zero_()
    conv.bias[channels:].fill_(LOGVAR_MIN)


def train_vae_decoder(cfg: WorldTrainConfig, world, vae, work_dir: Path):
    """Fine-tune the VAE decoder with the encoder frozen, on all ``n_train`` scenes, with the edge term
    (``vae_decoder_gradient_weight``).

    The latents (and so the UNet trained on them and ``scaling_factor``) do not change, so this stage can run
    after, or alongside, the UNet stage; it sharpens the reconstructions (the shipped decoder: PixCorr 0.961
    -> 0.979, world-CLIP zero-shot category on reconstructions 53 % -> 63 %, benchmarks/RESULTS.md).
    """
    images = _images_tensor(world)
    vae.requires_grad_(False)
    with torch.no_grad():
        means = torch.cat(
            [vae.encode(images[i : i + 256] * 2 - 1).latent_dist.mean for i in range(0, len(images), 256)]
        )
    trainable = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    checkpoint = _Checkpoint(work_dir, "vae_decoder")
    start = checkpoint.load(vae)
    rng = np.random.default_rng(cfg.train_seed + 3 + start)
    opt = torch.optim.AdamW(trainable, lr=cfg.vae_lr / 2, weight_decay=0.0)
    vae.decoder.train()

    def step_fn(step):
        index = rng.choice(len(images), size=cfg.vae_decoder_batch, replace=False)
        x = images[index] * 2 - 1
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.vae_bf16):
            recon = vae.decode(means[index]).sample.float()
        loss = _reconstruction_loss(recon, x, cfg.vae_decoder_gradient_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    total = cfg.vae_decoder_steps
    _loop("vae_decoder", total, start, step_fn, checkpoint, vae, cfg.checkpoint_every, cfg.vae_lr / 2, opt)
    vae.eval().requires_grad_(False)
    return vae


# ---------------------------------------------------------------------- stage 3: UNet
def train_unet(cfg: WorldTrainConfig, world, clip, vae, work_dir: Path):
    """Text-conditional denoiser on the VAE latents; returns the EMA ``UNet2DConditionModel``."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from fmrirecon.backbones.world.models import world_scheduler_config, world_unet_config
    from fmrirecon.errors import ConfigError

    images = _images_tensor(world)
    with torch.no_grad():
        latents = (
            torch.cat(
                [vae.encode(images[i : i + 256] * 2 - 1).latent_dist.mean for i in range(0, len(images), 256)]
            )
            * vae.config.scaling_factor
        )
        empty = clip.text_tokens([""])
    torch.manual_seed(cfg.train_seed + 2)
    unet = UNet2DConditionModel(
        **world_unet_config(
            clip.model.config.text_config.hidden_size,
            cfg.unet_block_out_channels,
            cfg.unet_full_resolution_attention,
        )
    )
    ema = copy.deepcopy(unet).requires_grad_(False)
    checkpoint, ema_checkpoint = _Checkpoint(work_dir, "unet"), _Checkpoint(work_dir, "unet_ema")
    start = checkpoint.load(unet)
    ema_checkpoint.load(ema)
    if cfg.unet_prediction_type not in ("epsilon", "v_prediction"):
        raise ConfigError(
            f"unet_prediction_type must be 'epsilon' or 'v_prediction', got {cfg.unet_prediction_type!r}"
        )
    schedule = world_scheduler_config(cfg.unet_prediction_type)
    noise_scheduler = DDPMScheduler(**{k: v for k, v in schedule.items() if k != "set_alpha_to_one"})
    v_prediction = cfg.unet_prediction_type == "v_prediction"
    alpha_bar = noise_scheduler.alphas_cumprod
    snr = alpha_bar / (1 - alpha_bar)
    snr_weight = torch.ones_like(snr)
    if cfg.unet_min_snr_gamma:
        snr_weight = snr.clamp(max=cfg.unet_min_snr_gamma) / (snr + 1 if v_prediction else snr)
    rng = np.random.default_rng(cfg.train_seed + 2 + start)
    gen = torch.Generator().manual_seed(cfg.train_seed + 2 + start)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.0)
    unet.train()

    def step_fn(step):
        index = rng.choice(len(images), size=cfg.unet_batch, replace=False)
        texts = _pick_captions(world, index, rng, cfg.full_caption_prob)
        with torch.no_grad():
            context = clip.text_tokens(texts)
            drop = torch.from_numpy(rng.random(len(texts)) < cfg.caption_dropout)
            context[drop] = empty[0]
        z0 = latents[index]
        noise = torch.randn(z0.shape, generator=gen)
        if cfg.unet_offset_noise:
            noise = noise + cfg.unet_offset_noise * torch.randn(*z0.shape[:2], 1, 1, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(index),), generator=gen)
        zt = noise_scheduler.add_noise(z0, noise, t)
        target = noise_scheduler.get_velocity(z0, noise, t) if v_prediction else noise
        error = (unet(zt, t, encoder_hidden_states=context).sample - target).pow(2).flatten(1).mean(1)
        loss = (error * snr_weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1 - decay)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.unet_steps:
            ema_checkpoint.save(ema, step + 1)
        return loss.item()

    _loop("unet", cfg.unet_steps, start, step_fn, checkpoint, unet, cfg.checkpoint_every, cfg.unet_lr, opt)
    return ema.eval()


# ---------------------------------------------------------------------- save / check
def save_world_weights(
    weights_dir: Path, clip=None, vae=None, unet=None, prediction_type: str = "epsilon"
) -> None:
    """Write the shipped layout: ``clip/`` (transformers) and ``latent_diffusion/{vae,unet,scheduler}``; the
    scheduler is (re)written with the UNet, in its ``prediction_type``."""
    from diffusers import DDIMScheduler

    from fmrirecon.backbones.world.models import world_scheduler_config

    if clip is not None:
        clip.save_pretrained(weights_dir / "clip")
    ld_dir = weights_dir / "latent_diffusion"
    for name, module in (("vae", vae), ("unet", unet)):
        if module is not None:
            with atomic_path(ld_dir / name) as tmp:
                # float16 keeps the UNet file under 8 MB; loading casts back to float32
                (copy.deepcopy(module).half() if name == "unet" else module).save_pretrained(tmp)
                _drop_local_path(tmp / "config.json")
    if unet is not None or not (ld_dir / "scheduler").is_dir():
        with atomic_path(ld_dir / "scheduler") as tmp:
            DDIMScheduler(**world_scheduler_config(prediction_type)).save_pretrained(tmp)


def _drop_local_path(config_path: Path) -> None:
    """Remove the ``_name_or_path`` diffusers writes for a model loaded from a folder (a local path has no
    place in shipped weights)."""
    config = read_json(config_path)
    if config.pop("_name_or_path", None) is not None:
        write_json_atomic(config_path, config)


def train_world(cfg: WorldTrainConfig, weights_dir: Path, work_dir: Path, stages=STAGES) -> dict:
    """Run the requested stages, write the weights into ``weights_dir`` and return timings (+ checks)."""
    from fmrirecon.backbones.clip import ClipEmbedder
    from fmrirecon.data.world import make_world

    torch.set_num_threads(cfg.threads)
    work_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        work_dir / "config.json", {"config": dataclasses.asdict(cfg), "versions": library_versions()}
    )
    world = make_world(cfg.n_train, image_size=cfg.image_size, seed=cfg.train_seed)
    timings = {}
    clip = vae = None
    if "clip" in stages:
        t0 = time.perf_counter()
        clip = train_clip(cfg, world, work_dir)
        save_world_weights(weights_dir, clip=clip)
        timings["clip_s"] = time.perf_counter() - t0
    if "vae" in stages:
        t0 = time.perf_counter()
        vae = train_vae(cfg, world, work_dir)
        save_world_weights(weights_dir, vae=vae)
        timings["vae_s"] = time.perf_counter() - t0
    if "unet" in stages:
        from diffusers import AutoencoderKL

        t0 = time.perf_counter()
        clip = clip or ClipEmbedder.from_pretrained(weights_dir / "clip")
        vae = vae or AutoencoderKL.from_pretrained(
            weights_dir / "latent_diffusion" / "vae", local_files_only=True
        )
        unet = train_unet(cfg, world, clip, vae, work_dir)
        save_world_weights(weights_dir, unet=unet, prediction_type=cfg.unet_prediction_type)
        timings["unet_s"] = time.perf_counter() - t0
    if "vae_decoder" in stages:
        from diffusers import AutoencoderKL

        t0 = time.perf_counter()
        vae = AutoencoderKL.from_pretrained(weights_dir / "latent_diffusion" / "vae", local_files_only=True)
        vae = train_vae_decoder(cfg, world, vae, work_dir)
        save_world_weights(weights_dir, vae=vae)
        timings["vae_decoder_s"] = time.perf_counter() - t0
    if "clip_vision" in stages:
        t0 = time.perf_counter()
        clip = train_clip_vision(cfg, world, ClipEmbedder.from_pretrained(weights_dir / "clip"), work_dir)
        save_world_weights(weights_dir, clip=clip)
        timings["clip_vision_s"] = time.perf_counter() - t0
    write_json_atomic(work_dir / "timings.json", timings)
    return timings
