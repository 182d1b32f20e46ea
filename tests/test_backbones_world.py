"""World backbones: word tokenizer, short training loops, checkpoint resume, shipped weights, quality."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fmrirecon.backbones.world import WEIGHTS_DIR
from fmrirecon.backbones.world.tokenizer import build_word_tokenizer, words_of
from fmrirecon.backbones.world.train import (
    WorldTrainConfig,
    full_caption,
    save_world_weights,
    swap_categories,
    train_clip,
    train_clip_vision,
    train_unet,
    train_vae,
    train_vae_decoder,
)
from fmrirecon.data.world import CATEGORIES, make_world


def test_word_tokenizer_round_trips(tmp_path):
    from transformers import AutoTokenizer

    tok = build_word_tokenizer(["A large red ball on grass.", "two boxes"], max_length=10)
    ids = tok(["a red ball, on grass"], padding="max_length", max_length=10, truncation=True).input_ids[0]
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[:7] == ["[BOS]", "a", "red", "ball", "[UNK]", "on", "grass"]
    assert tokens[7] == "[EOS]" and tokens[8:] == ["[PAD]", "[PAD]"]
    long = tok(["ball " * 30], padding="max_length", max_length=10, truncation=True).input_ids[0]
    assert len(long) == 10 and long[-1] == tok.eos_token_id  # truncation keeps EOS (CLIP pools it)
    tok.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again(["a red ball"]).input_ids == tok(["a red ball"]).input_ids
    assert again.model_max_length == 10
    assert words_of("A ball, two.") == ["a", "ball", ",", "two", "."]


def test_full_caption_is_the_most_informative():
    world = make_world(200, seed=1000)
    for spec, captions in zip(world.specs, world.captions):
        full = full_caption(captions)
        assert all(obj.colour in full and obj.category in full for obj in spec.objects)


def test_hard_negative_swaps_every_category_and_nothing_else():
    rng = np.random.default_rng(0)
    caption = "a large red ball to the left of two small blue boxes on grass"
    for _ in range(50):
        swapped = swap_categories(caption, rng).split()
        original = caption.split()
        changed = [k for k, (a, b) in enumerate(zip(original, swapped)) if a != b]
        assert changed == [3, 11]
        assert swapped[3] in CATEGORIES and swapped[3] != "ball"
        assert swapped[11] != "boxes" and swapped[11].endswith("s") and swapped[11] not in CATEGORIES
    assert swap_categories("a photo of a clear blue sky", rng) is None


def caption_rank(clip, world, images):
    """``(N,)`` how many of the first N scenes' full captions score above the scene's own (0 = retrieved)."""
    with torch.no_grad():
        sim = (
            clip.image_embeds(images, normalize=True)
            @ clip.text_embeds([full_caption(c) for c in world.captions[: len(images)]], normalize=True).T
        )
    return (sim > sim.diag()[:, None]).sum(1).float()


def test_training_stages_learn_freeze_what_they_must_and_resume(tmp_path):
    world = make_world(48, seed=1000)
    cfg = WorldTrainConfig(
        clip_steps=20,
        clip_batch=16,
        vae_steps=6,
        vae_batch=4,
        checkpoint_every=10,
        clip_vision_steps=4,
        vae_decoder_steps=3,
        vae_decoder_batch=4,
    )
    torch.set_num_threads(1)
    clip = train_clip(cfg, world, tmp_path)
    history = (tmp_path / "clip.json").read_text()
    assert '"step": 20' in history
    images = torch.from_numpy(world.images[:16]).permute(0, 3, 1, 2).float() / 255
    # Rank of the true caption among the 16: uniform on 0..15 by chance, so mean 7.5 with a standard deviation
    # of the 16-scene mean of sqrt((16² - 1) / 12 / 16) = 1.15. 20 steps reach 1.8 (1.5-2.6 over four training
    # seeds); the untrained model (same seed, 0 steps) sits at chance (7.6) and must fail the bound.
    untrained = train_clip(replace(cfg, clip_steps=0), world, tmp_path / "untrained")
    trained_rank, untrained_rank = (caption_rank(model, world, images).mean() for model in (clip, untrained))
    assert trained_rank < 4.0 < untrained_rank, (
        f"mean rank: trained {trained_rank:.2f}, untrained {untrained_rank:.2f}"
    )
    # stage 5 moves the image side only: the text transformer (the UNet's context) must stay bit-identical
    text_before = {k: v.clone() for k, v in clip.model.text_model.state_dict().items()}
    vision_before = {k: v.clone() for k, v in clip.model.vision_model.state_dict().items()}
    train_clip_vision(cfg, world, clip, tmp_path)
    assert all(torch.equal(v, text_before[k]) for k, v in clip.model.text_model.state_dict().items())
    assert any(not torch.equal(v, vision_before[k]) for k, v in clip.model.vision_model.state_dict().items())
    vae = train_vae(cfg, world, tmp_path)
    # LDM §4.3.2: scaling_factor = 1 / std of the training latents (the posterior means of all 48 scenes)
    with torch.no_grad():
        scenes = torch.from_numpy(world.images).permute(0, 3, 1, 2).float() / 255
        latents = vae.encode(scenes * 2 - 1).latent_dist.mean.double().numpy()
    assert vae.config.scaling_factor == pytest.approx(1 / latents.std(ddof=1), rel=1e-5)
    # the autoencoder decodes posterior means, so its saved posterior is a point mass: sample() == mean
    with torch.no_grad():
        posterior = vae.encode(images[:4] * 2 - 1).latent_dist
    assert posterior.std.max() < 1e-6
    torch.testing.assert_close(posterior.sample(), posterior.mean, atol=1e-5, rtol=0)
    # stage 4 moves the decoder only: latents (the UNet's inputs) must stay bit-identical
    with torch.no_grad():
        latents_before = vae.encode(images[:4] * 2 - 1).latent_dist.mean
    vae = train_vae_decoder(cfg, world, vae, tmp_path)
    with torch.no_grad():
        assert torch.equal(vae.encode(images[:4] * 2 - 1).latent_dist.mean, latents_before)
    # resuming a finished stage does no step and returns the same weights
    again = train_vae_decoder(cfg, world, train_vae(cfg, world, tmp_path), tmp_path)
    for a, b in zip(vae.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_vae_gradient_term_sees_edges_not_offsets():
    from fmrirecon.backbones.world.train import _reconstruction_loss

    x = torch.from_numpy(make_world(2, seed=3).images).permute(0, 3, 1, 2).float() / 127.5 - 1
    shifted = x + 0.1
    blurred = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    # a constant shift has no finite differences; a blur removes them
    torch.testing.assert_close(_reconstruction_loss(shifted, x, 1.0), _reconstruction_loss(shifted, x, 0.0))
    extra = _reconstruction_loss(blurred, x, 1.0) - _reconstruction_loss(blurred, x, 0.0)
    expected = sum(F.l1_loss(blurred.diff(dim=d), x.diff(dim=d)) for d in (-1, -2))
    torch.testing.assert_close(extra, expected)
    assert extra > 0.01


@pytest.mark.parametrize(
    "prediction_type, full_resolution_attention", [("epsilon", False), ("v_prediction", True)]
)
def test_unet_stage_learns_its_parameterisation_and_saves_it(
    tmp_path, prediction_type, full_resolution_attention
):
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

    from fmrirecon.backbones.world.models import world_scheduler_config, world_unet_config
    from fmrirecon.errors import ConfigError

    world = make_world(32, seed=1000)
    cfg = WorldTrainConfig(
        clip_steps=2,
        clip_batch=8,
        vae_steps=2,
        vae_batch=4,
        unet_steps=40,
        unet_batch=8,
        unet_lr=2e-3,
        checkpoint_every=20,
        unet_prediction_type=prediction_type,
        unet_full_resolution_attention=full_resolution_attention,
    )
    torch.set_num_threads(1)
    clip, vae = train_clip(cfg, world, tmp_path), train_vae(cfg, world, tmp_path)
    unet = train_unet(cfg, world, clip, vae, tmp_path)
    torch.manual_seed(cfg.train_seed + 2)  # the stage's initialisation
    untrained = UNet2DConditionModel(
        **world_unet_config(
            clip.model.config.text_config.hidden_size,
            cfg.unet_block_out_channels,
            cfg.unet_full_resolution_attention,
        )
    )
    assert (unet.config.down_block_types[0] == "CrossAttnDownBlock2D") is full_resolution_attention
    # held batch: the loss the stage minimises (target = ε or v), before and after training
    schedule = world_scheduler_config(prediction_type)
    scheduler = DDPMScheduler(**{k: v for k, v in schedule.items() if k != "set_alpha_to_one"})
    images = torch.from_numpy(world.images[:8]).permute(0, 3, 1, 2).float() / 255
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        z0 = vae.encode(images * 2 - 1).latent_dist.mean * vae.config.scaling_factor
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (8,), generator=g)
        target = scheduler.get_velocity(z0, noise, t) if prediction_type == "v_prediction" else noise
        context = clip.text_tokens([full_caption(c) for c in world.captions[:8]])
        zt = scheduler.add_noise(z0, noise, t)
        losses = [
            F.mse_loss(model(zt, t, encoder_hidden_states=context).sample, target).item()
            for model in (untrained, unet)
        ]
    assert losses[1] < 0.8 * losses[0]
    save_world_weights(tmp_path / "weights", unet=unet, prediction_type=prediction_type)
    saved = DDIMScheduler.from_pretrained(tmp_path / "weights" / "latent_diffusion" / "scheduler")
    assert saved.config.prediction_type == prediction_type
    with pytest.raises(ConfigError, match="unet_prediction_type"):
        train_unet(WorldTrainConfig(unet_prediction_type="sample"), world, clip, vae, tmp_path / "other")


class TestShippedWeights:
    def test_loading_is_cached_offline_and_shares_the_text_tower(self, monkeypatch):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        from fmrirecon.backbones.clip import ClipEmbedder
        from fmrirecon.backbones.diffusion import LatentDiffusion

        clip, ld = ClipEmbedder.world(), LatentDiffusion.world()
        assert ClipEmbedder.world() is clip and LatentDiffusion.world() is ld
        assert ld.text_encoder is clip.model.text_model and ld.tokenizer is clip.tokenizer
        assert ld.image_size == 64 and ld.latent_shape == (4, 16, 16)
        assert ld.vae.config.scaling_factor != 1.0  # set from the training latents
        # sampled latents (NeuralDiffuser's targets) are the posterior means the UNet was trained on
        images = torch.from_numpy(make_world(4, seed=2000).images).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            sampled = ld.encode_images(images, sample=True, generator=torch.Generator().manual_seed(0))
            torch.testing.assert_close(sampled, ld.encode_images(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(ld.encode_text(["a red ball"]), clip.text_tokens(["a red ball"]))

    def test_files_are_small_safetensors(self):
        files = [p for p in WEIGHTS_DIR.rglob("*") if p.is_file()]
        weights = [p for p in files if p.suffix == ".safetensors"]
        assert len(weights) == 3 and all(p.stat().st_size < 8 * 2**20 for p in weights)
        assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl")]

    def test_quality_on_held_out_scenes(self):
        from fmrirecon.backbones.clip import ClipEmbedder
        from fmrirecon.backbones.diffusion import LatentDiffusion
        from fmrirecon.evaluation.metrics import pixcorr

        clip, ld = ClipEmbedder.world(), LatentDiffusion.world()
        heldout = make_world(100, seed=WorldTrainConfig().heldout_seed)
        images = torch.from_numpy(heldout.images).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            recon = ld.decode_latents(ld.encode_images(images))
            image_embeds = clip.image_embeds(images, normalize=True)
            captions = clip.text_embeds([full_caption(c) for c in heldout.captions], normalize=True)
            sim = image_embeds @ captions.T
            prompts = clip.text_embeds([f"a {category}" for category in CATEGORIES], normalize=True)
        assert pixcorr(recon.numpy(), images.numpy()).mean() > 0.95
        assert (sim.argmax(1) == torch.arange(100)).float().mean() > 0.8  # image -> caption among 100
        assert np.isfinite(sim.numpy()).all()

        # the CLIP sees object shape: zero-shot primary category well above chance (1/12)
        def zero_shot(embeds):
            return ((embeds @ prompts.T).argmax(1).numpy() == np.asarray(heldout.primary_category)).mean()

        assert zero_shot(image_embeds) > 0.5
        # the VAE keeps enough of the shapes for the CLIP to read most of them (0.63 on 300 scenes)
        with torch.no_grad():
            assert zero_shot(clip.image_embeds(recon, normalize=True)) > 0.5

    def test_generated_images_follow_their_captions(self):
        """Images sampled from held-out captions are told apart by world-CLIP 2-way identification against the
        captions' true scenes (chance 0.5; the shipped weights reach 0.95 on 100 captions × 50 steps)."""
        from fmrirecon.backbones.clip import ClipEmbedder
        from fmrirecon.backbones.diffusion import LatentDiffusion
        from fmrirecon.evaluation.world_backbones import check_world_backbones

        heldout = make_world(100, seed=WorldTrainConfig().heldout_seed)  # retrieval pools of 100
        figures = check_world_backbones(
            ClipEmbedder.world(), LatentDiffusion.world(), heldout, n_generate=30, num_steps=20
        )
        assert figures["gen_two_way_clip"] > 0.75
