"""One target preparation for every method: VAE latents, caption-averaged text tokens, CLIP layer features."""

import numpy as np
import pytest
import torch

from fmrirecon.backbones.world.models import tiny_latent_diffusion
from fmrirecon.methods.targets import caption_tokens, images_to_float, to_native_size, vae_latents


@pytest.fixture(scope="module")
def ld():
    return tiny_latent_diffusion(seed=0)


def test_caption_tokens_average_each_images_own_captions(ld):
    captions = [["a red ball", "a ball"], ["a dog"], [None, "a cat", "a small cat"]]
    tokens = caption_tokens(ld, captions)
    assert tokens.shape == (3, *ld.encode_text(["x"]).shape[1:])
    for row, caps in zip(tokens, captions, strict=True):
        expected = ld.encode_text([c or "" for c in caps]).float().mean(0)
        torch.testing.assert_close(row, expected)
    with pytest.raises(ValueError, match="at least one caption"):
        caption_tokens(ld, [["a"], []])


def test_vae_latents_resize_to_native_size_and_keep_native_images(ld):
    rng = np.random.default_rng(0)
    size = ld.image_size
    native = images_to_float(rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8))
    assert to_native_size(native, size) is native  # no resampling at the native size
    torch.testing.assert_close(vae_latents(ld, native), ld.encode_images(native).float())
    big = torch.nn.functional.interpolate(native, scale_factor=2, mode="nearest")
    assert vae_latents(ld, big).shape == (2, *ld.latent_shape)
    # antialiased 2x downsampling of a nearest-neighbour 2x upsampling is close to the original
    assert (to_native_size(big, size) - native).abs().mean() < 0.1


def test_sampled_latents_follow_the_generator(ld):
    images = images_to_float(np.full((2, ld.image_size, ld.image_size, 3), 128, np.uint8))
    a = vae_latents(ld, images, sample=True, generator=torch.Generator().manual_seed(1))
    b = vae_latents(ld, images, sample=True, generator=torch.Generator().manual_seed(1))
    c = vae_latents(ld, images, sample=True, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
