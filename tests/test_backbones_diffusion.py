"""LatentDiffusion: encode/decode, text context, sizes from configs, diffusers-folder loading offline."""

from __future__ import annotations

import shutil

import pytest
import torch

from fmrirecon.backbones.diffusion import LatentDiffusion
from fmrirecon.backbones.world.models import tiny_latent_diffusion
from fmrirecon.errors import WeightsUnavailableError


@pytest.fixture(scope="module")
def ld():
    return tiny_latent_diffusion(seed=0)


def test_sizes_come_from_the_configs(ld):
    assert ld.latent_shape == (
        ld.unet.config.in_channels,
        ld.unet.config.sample_size,
        ld.unet.config.sample_size,
    )
    assert ld.image_size == ld.unet.config.sample_size * 2 ** (len(ld.vae.config.block_out_channels) - 1)
    assert ld.context_length == ld.tokenizer.model_max_length


def test_encode_decode_shapes_and_scaling(ld):
    images = torch.rand(3, 3, ld.image_size, ld.image_size, generator=torch.Generator().manual_seed(1))
    latents = ld.encode_images(images)
    assert latents.shape == (3, *ld.latent_shape)
    with torch.no_grad():
        mean = ld.vae.encode(images * 2 - 1).latent_dist.mean
    torch.testing.assert_close(latents, mean * ld.vae.config.scaling_factor)
    decoded = ld.decode_latents(latents)
    assert decoded.shape == images.shape
    assert decoded.min() >= 0 and decoded.max() <= 1
    sampled = ld.encode_images(images, sample=True, generator=torch.Generator().manual_seed(0))
    again = ld.encode_images(images, sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, again) and not torch.equal(sampled, latents)


def test_decode_is_differentiable(ld):
    latents = torch.randn(1, *ld.latent_shape, requires_grad=True)
    ld.decode_latents(latents).mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0


def test_text_context_and_empty_embedding(ld):
    context = ld.encode_text(["a red cat on grass", "a blue car"])
    assert context.shape == (2, ld.context_length, ld.text_encoder.config.hidden_size)
    empty = ld.empty_text_embedding()
    assert empty.shape == (1, ld.context_length, context.shape[-1])
    torch.testing.assert_close(empty, ld.encode_text([""]))
    assert not torch.allclose(context[0], context[1])


@pytest.mark.parametrize(
    "bad", [torch.rand(2, 1, 32, 32), torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.rand(2, 3, 31, 32)]
)
def test_bad_images_are_rejected(ld, bad):
    with pytest.raises(ValueError, match="images|multiples"):
        ld.encode_images(bad)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])  # SD 1.x / SD 2.x (768-v) schedulers
def test_save_then_load_offline_round_trips(ld, tmp_path, monkeypatch, prediction_type):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ld.scheduler.register_to_config(prediction_type=prediction_type)
    try:
        ld.save_pretrained(tmp_path / "sd")
    finally:
        ld.scheduler.register_to_config(prediction_type="epsilon")
    loaded = LatentDiffusion.from_pretrained(tmp_path / "sd")
    assert loaded.scheduler.config.prediction_type == prediction_type
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    images = torch.rand(1, 3, ld.image_size, ld.image_size)
    torch.testing.assert_close(loaded.encode_images(images), ld.encode_images(images))
    torch.testing.assert_close(loaded.encode_text(["a red cat"]), ld.encode_text(["a red cat"]))
    z = torch.randn(1, *ld.latent_shape)
    ctx = ld.encode_text(["a red cat"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.unet(z, 10, ctx).sample, ld.unet(z, 10, ctx).sample)


@pytest.mark.parametrize(
    "component", ["unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"]
)
def test_incomplete_folder_names_the_missing_component(ld, tmp_path, component):
    ld.save_pretrained(tmp_path / "sd")
    (tmp_path / "sd" / component).unlink()
    with pytest.raises(WeightsUnavailableError, match=f"{component} missing.*expected vae/, unet/"):
        LatentDiffusion.from_pretrained(tmp_path / "sd")


def test_missing_tokenizer_folder_is_named(ld, tmp_path):
    ld.save_pretrained(tmp_path / "sd")
    shutil.rmtree(tmp_path / "sd" / "tokenizer")
    with pytest.raises(WeightsUnavailableError, match="tokenizer"):
        LatentDiffusion.from_pretrained(tmp_path / "sd")


def test_uncached_hub_id_raises_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(WeightsUnavailableError, match="CompVis/stable-diffusion-v1-4.*never downloads"):
        LatentDiffusion.from_pretrained("CompVis/stable-diffusion-v1-4")


def test_missing_folder_path_raises(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        LatentDiffusion.from_pretrained(tmp_path / "nowhere" / "sd")
