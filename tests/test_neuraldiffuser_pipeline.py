"""Guided reconstruction (Algorithm 1) on tiny random diffusers components, and the voting retrieval."""

import numpy as np
import pytest
import torch
from tiny_sd import tiny_sd_parts
from torch import nn

from fmrirecon.methods.neuraldiffuser.pipeline import (
    FeatureGuidance,
    ReconstructionSettings,
    guidance_features,
    imagenet_as_clip_input,
    mean_pairwise_similarity,
    reconstruct_images,
    selection_losses,
)
from fmrirecon.methods.neuraldiffuser.retrieval import cosine_similarities, vote_top1, voting_retrieval


class TinyFeatures(nn.Module):
    """Stands in for the CLIP image encoder: fixed random convs, one ``(B, T, W)`` token map per layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.convs = nn.ModuleList([nn.Conv2d(3, 6, 4, stride=4), nn.Conv2d(6, 6, 2, stride=2)])
        self.requires_grad_(False)

    def image_hidden_states(self, images, layers, site="block"):
        out, h = [], images
        for conv in self.convs:
            h = torch.tanh(conv(h))
            out.append(h.flatten(2).transpose(1, 2))
        return [out[i - 1] for i in layers]


@pytest.fixture(scope="module")
def tiny_ld():
    from fmrirecon.backbones.diffusion import LatentDiffusion

    vae, unet, scheduler = tiny_sd_parts()
    empty = torch.randn(1, 5, 12)

    class Tiny(LatentDiffusion):
        def empty_text_embedding(self):
            return empty

    return Tiny(vae, unet, scheduler, nn.Identity(), None)


def _inputs(n=2):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 5, 12, generator=g), torch.randn(n, 4, 8, 8, generator=g)


def test_settings_follow_the_paper():
    s = ReconstructionSettings()
    assert (s.steps_run, s.guided_steps, s.cfg_scale, s.feature_guidance_scale) == (37, 7, 7.5, 300_000.0)


def test_zero_guidance_equals_unguided_and_seed_is_deterministic(tiny_ld):
    clip = TinyFeatures()
    text, latents = _inputs()
    targets = [torch.randn(2, 4, 6), torch.randn(2, 1, 6)]
    base = dict(num_steps=10, strength=0.8, cfg_scale=2.0)
    off = reconstruct_images(
        tiny_ld, text, latents, settings=ReconstructionSettings(**base), samples=2, seed=5, progress=False
    )
    zero = reconstruct_images(
        tiny_ld,
        text,
        latents,
        clip=clip,
        layers=(1, 2),
        guidance_targets=targets,
        settings=ReconstructionSettings(**base, feature_guidance_scale=0.0),
        samples=2,
        seed=5,
        progress=False,
    )
    again = reconstruct_images(
        tiny_ld, text, latents, settings=ReconstructionSettings(**base), samples=2, seed=5, progress=False
    )
    assert off.shape == (2, 2, 3, 16, 16)
    assert torch.equal(off, zero) and torch.equal(off, again)
    other = reconstruct_images(
        tiny_ld, text, latents, settings=ReconstructionSettings(**base), samples=2, seed=6, progress=False
    )
    assert not torch.equal(off, other)


@pytest.mark.parametrize("tweedie", ["paper", "code"])
def test_guidance_loss_decreases_along_guided_steps(tiny_ld, tweedie):
    clip = TinyFeatures()
    text, latents = _inputs(1)
    # Targets: the features of a fixed image, so the guidance pulls the reconstruction towards it.
    goal = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    targets = clip.image_hidden_states(goal, [1, 2])
    settings = ReconstructionSettings(
        num_steps=10,
        strength=1.0,
        cfg_scale=1.0,
        feature_guidance_scale=200.0,
        guidance_strength=0.6,
        tweedie=tweedie,
    )
    histories = []
    guided = reconstruct_images(
        tiny_ld,
        text,
        latents,
        clip=clip,
        layers=(1, 2),
        guidance_targets=targets,
        settings=settings,
        samples=1,
        seed=0,
        progress=False,
        histories=histories,
    )
    history = histories[0]
    assert len(history) == settings.guided_steps == 6
    assert history[-1] < history[0]
    unguided = reconstruct_images(
        tiny_ld,
        text,
        latents,
        settings=settings.__class__(**{**settings.__dict__, "feature_guidance_scale": 0.0}),
        samples=1,
        seed=0,
        progress=False,
    )
    hook = FeatureGuidance(targets, tiny_ld.decode_latents, lambda x: clip.image_hidden_states(x, [1, 2]))
    assert hook.loss(guided[:, 0]).item() < hook.loss(unguided[:, 0]).item()


def test_imagenet_option_maps_onto_clip_normalisation():
    x = torch.rand(2, 3, 4, 4)
    clip_mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    clip_std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    seen = (imagenet_as_clip_input(x) - clip_mean) / clip_std
    expected = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(seen, expected)


def test_selection_prefers_the_sample_whose_features_match_the_decoded_ones():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 4, 3, 16, 16, generator=g)
    features = guidance_features(TinyFeatures(), layers=(0, 1))
    chosen = torch.tensor([2, 0, 3])
    # brain-decoded features = those of one sample per item, slightly perturbed
    targets = [
        f + 0.01 * torch.randn(f.shape, generator=g) for f in features(images[torch.arange(3), chosen])
    ]
    losses = selection_losses(images, targets, features)
    assert losses.shape == (3, 4) and (losses >= 0).all()
    assert torch.equal(losses.argmin(1), chosen)
    # the score of a sample is the guidance loss Σ_l w_l·MSE of that sample alone
    alone = FeatureGuidance([t[1:2] for t in targets], lambda z: z, features).loss(images[1, 2:3])
    torch.testing.assert_close(losses[1, 2:3], alone)


def test_mean_pairwise_similarity():
    same = torch.rand(3, 1, 3, 4, 4).expand(3, 4, 3, 4, 4)
    assert mean_pairwise_similarity(same) == pytest.approx(1.0)
    noise = torch.randn(3, 5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert abs(mean_pairwise_similarity(noise)) < 0.1


def test_vote_top1_majority_and_tie_break():
    # 3 layers, 1 query, 3 candidates: layers vote 2, 2, 0 → candidate 2 wins.
    sims = np.array([[[0.1, 0.2, 0.9]], [[0.3, 0.1, 0.8]], [[0.9, 0.1, 0.2]]])
    assert vote_top1(sims).tolist() == [2]
    # 2 layers split 0 vs 1: the higher summed similarity decides.
    sims = np.array([[[0.9, 0.8, 0.0]], [[0.1, 0.5, 0.0]]])
    assert vote_top1(sims).tolist() == [1]


def test_voting_retrieval_perfect_chance_and_shapes():
    rng = np.random.default_rng(0)
    layers = [rng.normal(size=(40, 16)) for _ in range(3)]
    noisy = [x + 0.1 * rng.normal(size=x.shape) for x in layers]
    out = voting_retrieval(noisy, layers, pool_size=300)
    assert out["pool_size"] == 40 and out["retrieval_image"] == 1.0 and out["retrieval_brain"] == 1.0
    random = voting_retrieval([rng.normal(size=(40, 16)) for _ in range(3)], layers, pool_size=10, n_draws=20)
    assert random["retrieval_image"] < 0.3 and random["chance"] == 0.1
    assert cosine_similarities(layers[0], layers[0]).diagonal() == pytest.approx(np.ones(40))
    with pytest.raises(ValueError, match="same non-zero number of layers"):
        voting_retrieval(layers[:2], layers)


def test_voting_retrieval_per_item_hits_follow_the_items():
    rng = np.random.default_rng(1)
    layers = [rng.normal(size=(40, 16)) for _ in range(2)]
    brain = [x.copy() for x in layers]
    for b, x in zip(brain, layers):
        b[:5] = x[5:10]  # the brain side of items 0-4 points at items 5-9: those queries miss
    per_item = {}
    out = voting_retrieval(brain, layers, pool_size=300, per_item=per_item)
    expected = np.r_[np.zeros(5), np.ones(35)]
    assert per_item["retrieval_image"] == pytest.approx(expected)
    assert out["retrieval_image"] == pytest.approx(per_item["retrieval_image"].mean())
    assert out["retrieval_brain"] == pytest.approx(per_item["retrieval_brain"].mean())
    # smaller pools: each item's rate averages the draws that placed it in a pool
    per_item = {}
    out = voting_retrieval(brain, layers, pool_size=10, n_draws=5, per_item=per_item)
    assert per_item["retrieval_image"].shape == (40,)
    assert per_item["retrieval_image"][:5].max() <= per_item["retrieval_image"][5:].min()
    assert out["retrieval_image"] == pytest.approx(np.mean(per_item["retrieval_image"]))


def _one_step_guidance(tiny_ld, **hook_options):
    """A toy guided step: latents, a random ε network and a FeatureGuidance hook (κ = 50, one guided step)
    whose targets are the TinyFeatures of a fixed goal image."""
    clip = TinyFeatures()
    _, latents = _inputs(2)
    goal = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    hook = FeatureGuidance(
        clip.image_hidden_states(goal, [1, 2]),
        tiny_ld.decode_latents,
        lambda x: clip.image_hidden_states(x, [1, 2]),
        feature_guidance_scale=50.0,
        guided_steps=1,
        **hook_options,
    )
    return latents, hook


def test_bfloat16_guidance_branch_points_the_same_way_as_float32(tiny_ld):
    """``precision="bfloat16"`` only changes the arithmetic of the decode + features: the correction it adds
    to ``ε`` agrees with the float32 one (cosine ≥ 0.99) and stays float32."""
    from types import SimpleNamespace

    eps_net = nn.Conv2d(4, 4, 3, padding=1)
    torch.manual_seed(0)
    corrections = {}
    for precision in ("float32", "bfloat16"):
        latents, hook = _one_step_guidance(tiny_ld, precision=precision)
        z_t = latents.clone().requires_grad_(True)
        eps = eps_net(z_t)
        state = SimpleNamespace(
            step_index=0,
            latents=z_t,
            noise_pred_cond=eps,
            noise_pred=eps.detach(),
            alpha_prod_t=torch.tensor(0.5),
            prediction_type="epsilon",
        )
        out = hook(state)
        assert out.dtype == torch.float32
        corrections[precision] = (out - eps.detach()).flatten()
    cosine = torch.nn.functional.cosine_similarity(corrections["float32"], corrections["bfloat16"], dim=0)
    assert corrections["float32"].abs().max() > 0
    assert cosine > 0.99
    with pytest.raises(ValueError, match="precision"):
        _one_step_guidance(tiny_ld, precision="float16")


def test_v_prediction_unet_gets_the_same_guidance_as_an_epsilon_one(tiny_ld):
    """Algorithm 1 is written for ε; a v-predicting UNet (SD 2.x) is the same model in another
    parameterisation, v = √ᾱ·ε − σ·z0 = (ε − σ·z_t)/√ᾱ, so the hook must return the v that corresponds to the
    ε-model's ε̂ (and read the same Tweedie x̂0)."""
    from types import SimpleNamespace

    eps_net = nn.Conv2d(4, 4, 3, padding=1)
    alpha_bar = torch.tensor(0.3)
    sigma = (1 - alpha_bar).sqrt()
    out, histories = {}, {}
    for kind in ("epsilon", "v_prediction"):
        latents, hook = _one_step_guidance(tiny_ld)
        z_t = latents.clone().requires_grad_(True)
        eps = eps_net(z_t)
        pred = eps if kind == "epsilon" else (eps - sigma * z_t) / alpha_bar.sqrt()
        state = SimpleNamespace(
            step_index=0,
            latents=z_t,
            noise_pred_cond=pred,
            noise_pred=pred.detach(),
            alpha_prod_t=alpha_bar,
            prediction_type=kind,
        )
        out[kind] = hook(state)
        histories[kind] = hook.history
    torch.testing.assert_close(histories["v_prediction"], histories["epsilon"])
    eps_hat_from_v = alpha_bar.sqrt() * out["v_prediction"] + sigma * latents
    assert (out["epsilon"] - eps_net(latents)).abs().max() > 1e-3  # the guidance did move ε
    torch.testing.assert_close(eps_hat_from_v, out["epsilon"], atol=1e-5, rtol=1e-4)
