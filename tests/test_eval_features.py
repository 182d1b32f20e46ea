"""Feature extractors: reference preprocessing, local weights only, random weights only on request."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fmrirecon.errors import WeightsUnavailableError
from fmrirecon.evaluation.features import NORMALIZATIONS, Preprocess, load_extractor

TINY_CLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    patch_size=8,
    image_size=32,
    projection_dim=16,
)


@pytest.fixture(autouse=True)
def offline_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_normalisation_constants_are_the_reference_values():
    assert NORMALIZATIONS["imagenet"] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert NORMALIZATIONS["clip"] == (
        (0.48145466, 0.4578275, 0.40821073),
        (0.26862954, 0.26130258, 0.27577711),
    )


def test_tensor_preprocess_is_interpolate_then_normalise():
    x = torch.rand(2, 3, 40, 40)
    got = Preprocess(64, "bilinear", antialias=False, normalization="imagenet").apply(x)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATIONS["imagenet"])
    expected = (
        F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=False) - mean
    ) / std
    torch.testing.assert_close(got, expected)
    down_aa = Preprocess(16, antialias=True, normalization=None).apply(x)
    down_plain = Preprocess(16, antialias=False, normalization=None).apply(x)
    assert not torch.allclose(down_aa, down_plain)  # the antialias flag is honoured, not a default


def test_pil_preprocess_resizes_the_uint8_image_with_pil():
    images = np.random.default_rng(0).integers(0, 256, (2, 30, 30, 3), dtype=np.uint8)
    got = Preprocess(20, "bilinear", backend="pil", normalization=None).apply(images)
    expected = np.asarray(Image.fromarray(images[1]).resize((20, 20), Image.Resampling.BILINEAR)) / 255.0
    np.testing.assert_allclose(got[1].permute(1, 2, 0).numpy(), expected, atol=1e-6)


def test_missing_weights_raise_with_what_was_searched(tmp_path):
    with pytest.raises(WeightsUnavailableError, match=r"alexnet-owt-7be5be79\.pth.*empty"):
        load_extractor("alexnet", ["features.4"], weights_dir=tmp_path / "empty")
    with pytest.raises(WeightsUnavailableError, match="swav_800ep_pretrain"):
        load_extractor("swav_resnet50", ["avgpool"], weights_dir=tmp_path / "empty")
    with pytest.raises(WeightsUnavailableError, match="openai/clip-vit-large-patch14"):
        load_extractor("clip_vit_l14", ["image_embeds"], weights_dir=tmp_path / "empty")


def test_random_weights_only_on_request_and_one_pass_gives_every_node():
    extractor = load_extractor("alexnet", ["features.4", "features.11"], random_weights_for_testing=True)
    assert "random" in extractor.weights
    calls = []
    extractor.module.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    out = extractor(torch.rand(2, 3, 256, 256))
    assert calls == [2]
    # AlexNet at 256 px: features.4 is 192 x 31 x 31 = 184,512 values per image (the protocol's memory note)
    assert out["features.4"].shape == (2, 192, 31, 31) and out["features.11"].shape == (2, 256, 15, 15)


def test_torchvision_weights_load_from_a_foreign_pth_file(tmp_path):
    import torchvision

    torch.manual_seed(3)
    model = torchvision.models.efficientnet_b1(weights=None).eval()
    torch.save(model.state_dict(), tmp_path / "efficientnet_b1-c27df63c.pth")  # torchvision's file name
    loaded = load_extractor("efficientnet_b1", ["avgpool"], weights_dir=tmp_path)
    assert str(tmp_path) in loaded.weights
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.avgpool(model.features(x))
    torch.testing.assert_close(loaded(x)["avgpool"], expected)


def test_swav_checkpoint_with_module_prefix_and_heads(tmp_path):
    import torchvision

    backbone = torchvision.models.resnet50(weights=None)
    backbone.fc = torch.nn.Identity()
    state = {f"module.{k}": v for k, v in backbone.state_dict().items()}
    state["module.projection_head.0.weight"] = torch.zeros(4, 4)
    state["module.prototypes.weight"] = torch.zeros(3, 4)
    torch.save(state, tmp_path / "swav_800ep_pretrain.pth.tar")
    extractor = load_extractor("swav_resnet50", ["avgpool"], weights_dir=tmp_path)
    x = torch.rand(1, 3, 64, 64)
    expected = backbone.eval()(x)
    torch.testing.assert_close(extractor(x)["avgpool"].flatten(1), expected)


def test_clip_vit_from_a_local_folder_equals_the_saved_model(tmp_path):
    random_clip = load_extractor(
        "clip_vit_l14", ["image_embeds"], random_weights_for_testing=True, clip_config=TINY_CLIP
    )
    random_clip.module.save_pretrained(tmp_path / "clip-vit-large-patch14")
    loaded = load_extractor("clip_vit_l14", ["image_embeds"], weights_dir=tmp_path)
    x = torch.rand(2, 3, 32, 32)
    assert loaded(x)["image_embeds"].shape == (2, 16)
    torch.testing.assert_close(loaded(x)["image_embeds"], random_clip(x)["image_embeds"])


def test_unknown_network_is_rejected():
    with pytest.raises(ValueError, match="unknown network"):
        load_extractor("vgg16", ["features"])


def test_world_clip_extractor_gives_embeddings_and_zero_shot_scores():
    from fmrirecon.backbones.world.models import tiny_clip_embedder
    from fmrirecon.evaluation.features import WorldClipExtractor

    embedder = tiny_clip_embedder(seed=0)
    prompts = ["a ball", "a box", "a tent"]
    extractor = WorldClipExtractor(embedder, prompts, ["image_embeds", "zero_shot"], "tiny world clip")
    images = torch.rand(2, 3, 40, 40)
    out = extractor(images)
    with torch.no_grad():
        embeds = embedder.image_embeds(images)
        text = embedder.text_embeds(prompts)
    torch.testing.assert_close(out["image_embeds"], embeds)
    # zero-shot scores are cosine similarities to each category prompt
    expected = F.normalize(embeds, dim=-1) @ F.normalize(text, dim=-1).T
    torch.testing.assert_close(out["zero_shot"], expected)


def test_inputs_are_contiguous_nchw_and_channels_last_gives_the_same_features():
    from fmrirecon.evaluation.features import to_float_tensor

    images = np.random.default_rng(0).integers(0, 256, size=(2, 40, 48, 3), dtype=np.uint8)
    x = to_float_tensor(images)
    assert x.shape == (2, 3, 40, 48) and x.is_contiguous()
    torch.testing.assert_close(x, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, rtol=0, atol=0)
    # the tensor preprocessing keeps the layout it is given: contiguous in, contiguous out to the network
    assert Preprocess(size=64).apply(x).is_contiguous()

    extractor = load_extractor("alexnet", ["features.4", "features.11"], random_weights_for_testing=True)
    pixels = Preprocess(size=64).apply(x)
    channels_last = pixels.contiguous(memory_format=torch.channels_last)
    # on the CPU the bare network takes other kernels for a channels-last input (features.4 differs at
    # ~1e-6 relative here); the extractor makes its input contiguous, so both give the reference's features
    a, b = extractor(pixels), extractor(channels_last)
    for node in a:
        assert torch.equal(a[node], b[node]), node
