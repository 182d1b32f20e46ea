"""ClipEmbedder: embeddings, token sequences, per-block hidden states, preprocessing, gradients, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from fmrirecon.backbones.clip import CLIP_MEAN, CLIP_STD, ClipEmbedder
from fmrirecon.backbones.world.models import tiny_clip_embedder
from fmrirecon.errors import WeightsUnavailableError


@pytest.fixture(scope="module")
def clip():
    return tiny_clip_embedder(seed=0)


def images(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_embedding_shapes_and_normalisation(clip):
    assert clip.image_embeds(images(3)).shape == (3, clip.embed_dim)
    assert clip.text_embeds(["a red cat", "a dog"]).shape == (2, clip.embed_dim)
    norms = clip.image_embeds(images(3), normalize=True).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones(3))
    tokens = clip.text_tokens(["a red cat", "a dog"])
    assert tokens.shape == (2, clip.tokenizer.model_max_length, clip.model.config.text_config.hidden_size)
    vision = clip.image_tokens(images(2))
    n_patches = (clip.image_size // clip.model.config.vision_config.patch_size) ** 2
    assert vision.shape == (2, n_patches + 1, clip.model.config.vision_config.hidden_size)


def test_text_embedding_pools_the_eos_token(clip):
    ids = clip.tokenize(["a red cat on grass"])
    eos = int((ids[0] == clip.tokenizer.eos_token_id).nonzero()[0])
    expected = clip.model.text_projection(clip.text_tokens(["a red cat on grass"])[:, eos])
    torch.testing.assert_close(clip.text_embeds(["a red cat on grass"]), expected)


def test_hidden_states_of_selected_blocks(clip):
    x = images(2)
    blocks = clip.image_hidden_states(x, [1, 2, 3])
    assert len(blocks) == 3 and all(b.shape == clip.image_tokens(x).shape for b in blocks)
    # block outputs are the residual stream: the last one is last_hidden_state (before post_layernorm)
    with torch.no_grad():
        full = clip.model.vision_model(pixel_values=clip.preprocess(x), output_hidden_states=True)
    torch.testing.assert_close(blocks[2], full.hidden_states[3])
    mlp = clip.image_hidden_states(x, [2, 1], site="mlp")
    assert [m.shape for m in mlp] == [blocks[0].shape] * 2
    assert not torch.allclose(mlp[1], blocks[0])
    with pytest.raises(ValueError, match="block numbers in 1..3"):
        clip.image_hidden_states(x, [4])
    with pytest.raises(ValueError, match="site"):
        clip.image_hidden_states(x, [1], site="attn")


def test_preprocessing_resizes_and_uses_clip_normalisation(clip):
    grey = torch.full((1, 3, 48, 64), 0.5)  # non-square: shortest side to image_size, centre crop
    out = clip.preprocess(grey)
    assert out.shape == (1, 3, clip.image_size, clip.image_size)
    expected = (0.5 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(out[0, :, 5, 5], expected)
    with pytest.raises(ValueError, match="float"):
        clip.preprocess(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        clip.preprocess(torch.zeros(3, 32, 32))


def test_gradients_flow_to_input_images(clip):
    x = images(2, size=40).requires_grad_(True)  # resized inside: the resize must be differentiable too
    loss = clip.image_hidden_states(x, [2])[0].pow(2).mean() + clip.image_embeds(x).sum()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip.model.parameters())


def test_save_then_load_offline_round_trips(clip, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clip.save_pretrained(tmp_path / "clip")
    loaded = ClipEmbedder.from_pretrained(tmp_path / "clip")
    assert loaded.image_size == clip.image_size and loaded.context_length == clip.context_length
    torch.testing.assert_close(loaded.image_embeds(images()), clip.image_embeds(images()))
    torch.testing.assert_close(loaded.text_tokens(["a red cat"]), clip.text_tokens(["a red cat"]))
    torch.testing.assert_close(loaded.image_mean, clip.image_mean)
    # saving what was loaded from a folder writes no trace of how it was loaded
    loaded.save_pretrained(tmp_path / "again")
    tokenizer_config = json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only"} & set(tokenizer_config)
    assert tokenizer_config["model_max_length"] == clip.context_length


def test_missing_folder_or_config_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsUnavailableError, match="config.json missing"):
        ClipEmbedder.from_pretrained(tmp_path / "empty")
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        ClipEmbedder.from_pretrained(tmp_path / "no" / "such")
