"""DDIM sampler: CFG, img2img strength, control residuals, step hook (incl. gradients), determinism."""

from __future__ import annotations

import pytest
import torch

from fmrirecon.backbones.sampling import StepState, ddim_sample, text_to_image
from fmrirecon.backbones.world.models import tiny_latent_diffusion

STEPS = 6


@pytest.fixture(scope="module")
def ld():
    return tiny_latent_diffusion(seed=0)


@pytest.fixture(scope="module")
def context(ld):
    return ld.encode_text(["a red cat on grass", "a blue car on a road"])


def sample(ld, context, seed=0, **kwargs):
    kwargs.setdefault("num_steps", STEPS)
    return ddim_sample(ld, context, generator=torch.Generator().manual_seed(seed), progress=False, **kwargs)


def test_same_seed_same_latents_other_seed_differs(ld, context):
    a, b, c = sample(ld, context, 0), sample(ld, context, 0), sample(ld, context, 1)
    assert a.shape == (2, *ld.latent_shape)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    stochastic = [sample(ld, context, 3, eta=1.0) for _ in range(2)]
    assert torch.equal(*stochastic)


def test_guidance_scale_one_equals_conditional_prediction(ld, context):
    uncond = ld.empty_text_embedding()
    assert torch.equal(sample(ld, context, uncond=uncond, cfg_scale=1.0), sample(ld, context))
    assert not torch.allclose(sample(ld, context, uncond=uncond, cfg_scale=4.0), sample(ld, context))


def test_cfg_combines_the_two_branches(ld, context):
    seen: list[StepState] = []
    sample(ld, context, uncond=ld.empty_text_embedding(), cfg_scale=4.0, step_hook=seen.append)
    for state in seen:
        expected = state.noise_pred_uncond + 4.0 * (state.noise_pred_cond - state.noise_pred_uncond)
        torch.testing.assert_close(state.noise_pred, expected)
        # the conditional branch of the batched CFG call equals a separate conditional call
        torch.testing.assert_close(
            state.predict_noise(state.latents), state.noise_pred_cond, atol=1e-5, rtol=1e-4
        )


def test_img2img_strength(ld, context):
    init = torch.randn(2, *ld.latent_shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(sample(ld, context, init_latents=init, strength=0.0), init)
    seen: list[StepState] = []
    out = sample(ld, context, init_latents=init, strength=0.5, num_steps=10, step_hook=seen.append)
    # diffusers img2img convention: the last int(10 * 0.5) = 5 steps of the 10-step schedule. SD's DDIM
    # config ("leading" spacing, steps_offset 1) puts step k of 10 at t = 100 k + 1: 901, ..., 1 in full.
    config = ld.scheduler.config
    assert (config.timestep_spacing, config.beta_schedule, config.num_train_timesteps) == (
        "leading",
        "scaled_linear",
        1000,
    )
    ratio = config.num_train_timesteps // 10
    assert [int(s.timestep) for s in seen] == [k * ratio + config.steps_offset for k in (4, 3, 2, 1, 0)]
    # the run starts from the initial latents noised to t = 401 (DDPM Eq. 4) by the generator's first draw
    noise = torch.randn(init.shape, generator=torch.Generator().manual_seed(0))
    betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps) ** 2
    alpha_bar = torch.cumprod(1 - betas.double(), 0)[int(seen[0].timestep)].float()
    torch.testing.assert_close(seen[0].latents, alpha_bar.sqrt() * init + (1 - alpha_bar).sqrt() * noise)
    assert not torch.allclose(out, init)
    with pytest.raises(ValueError, match="strength"):
        sample(ld, context, init_latents=init, strength=1.5)


def hint_size(ld):
    """ControlNet's hint encoder downsamples by 8 (SD: 512 px hint for 64x64 latents)."""
    return ld.latent_shape[1] * 8, ld.latent_shape[2] * 8


def control_residuals(ld, batch, seed=0):
    """Residuals shaped like a real ControlNet's (diffusers ControlNetModel built from the UNet)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(ld.unet, conditioning_channels=3)
    for p in controlnet.parameters():  # random, not zero-initialised: residuals must matter
        torch.nn.init.normal_(p, std=0.02)
    z = torch.randn(batch, *ld.latent_shape)
    cond = torch.rand(batch, 3, *hint_size(ld))
    with torch.no_grad():
        down, mid = controlnet(z, 500, ld.encode_text(["x"] * batch), controlnet_cond=cond, return_dict=False)
    return controlnet, list(down), mid


def test_residual_scales_zero_equal_the_plain_unet(ld, context):
    _, down, mid = control_residuals(ld, batch=2)
    plain = sample(ld, context)
    zero = sample(ld, context, down_residuals=down, mid_residual=mid, residual_scales=0.0)
    torch.testing.assert_close(zero, plain, rtol=0, atol=0)
    per_residual = [0.0] * (len(down) + 1)
    assert torch.equal(
        sample(ld, context, down_residuals=down, mid_residual=mid, residual_scales=per_residual), plain
    )
    assert not torch.allclose(
        sample(ld, context, down_residuals=down, mid_residual=mid, residual_scales=1.0), plain
    )
    only_mid = [0.0] * len(down) + [1.0]
    assert not torch.allclose(
        sample(ld, context, down_residuals=down, mid_residual=mid, residual_scales=only_mid), plain
    )
    with pytest.raises(ValueError, match="residual_scales"):
        sample(ld, context, down_residuals=down, mid_residual=mid, residual_scales=[1.0, 1.0])


def test_live_control_branch_is_called_every_step(ld, context):
    controlnet, _, _ = control_residuals(ld, batch=2)
    hint = torch.rand(2, 3, *hint_size(ld))
    calls = []

    def control(z, t):
        calls.append(int(t))
        down, mid = controlnet(z, t, context, controlnet_cond=hint, return_dict=False)
        return down, mid

    with torch.no_grad():
        out = sample(
            ld, context, down_residuals=control, uncond=ld.empty_text_embedding(), cfg_scale=3.0
        )
    assert len(calls) == STEPS and calls == sorted(calls, reverse=True)
    assert not torch.allclose(out, sample(ld, context, uncond=ld.empty_text_embedding(), cfg_scale=3.0))


def test_step_hook_sees_every_step_and_its_change_takes_effect(ld, context):
    seen: list[StepState] = []
    plain = sample(ld, context, step_hook=seen.append)
    assert [s.step_index for s in seen] == list(range(STEPS))
    assert all(s.latents.shape == (2, *ld.latent_shape) for s in seen)
    assert [int(s.timestep) for s in seen] == sorted({int(s.timestep) for s in seen}, reverse=True)
    identity = sample(ld, context, step_hook=lambda s: s.noise_pred)
    assert torch.equal(identity, plain)
    zeroed = sample(ld, context, step_hook=lambda s: torch.zeros_like(s.noise_pred))
    assert not torch.allclose(zeroed, plain)
    with pytest.raises(ValueError, match="step_hook returned"):
        sample(ld, context, step_hook=lambda s: s.noise_pred[:1])


def test_step_hook_can_take_gradients_wrt_latents(ld, context):
    """NeuralDiffuser Algorithm 1 shape: Tweedie x0 from a differentiable noise prediction, loss on the
    decoded image, gradient w.r.t. z_t added to the noise prediction; the step must lower the loss."""
    target = torch.zeros(2, 3, ld.image_size, ld.image_size)
    grads = []

    def guide(state: StepState):
        z = state.latents.detach().requires_grad_(True)
        eps = state.predict_noise(z)
        a = state.alpha_prod_t
        x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()  # Eq. 11, Tweedie
        loss = ((ld.decode_latents(x0) - target) ** 2).mean()
        (grad,) = torch.autograd.grad(loss, z)
        grads.append(grad)
        return state.noise_pred + 50.0 * (1 - a).sqrt() * grad

    guided = sample(ld, context, step_hook=guide)
    assert len(grads) == STEPS and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        loss_plain = (ld.decode_latents(sample(ld, context)) - target).pow(2).mean()
        loss_guided = (ld.decode_latents(guided) - target).pow(2).mean()
    assert loss_guided < loss_plain


def test_bad_context_is_rejected(ld):
    with pytest.raises(ValueError, match="cross_attention_dim"):
        sample(ld, torch.zeros(1, 12, 7))


def test_text_to_image_is_deterministic(ld):
    a = text_to_image(ld, ["a red cat"], num_steps=3, seed=4, progress=False)
    b = text_to_image(ld, ["a red cat"], num_steps=3, seed=4, progress=False)
    assert a.shape == (1, 3, ld.image_size, ld.image_size) and torch.equal(a, b)


class _GradGuide:
    """Gradient guidance on the decoded image (Algorithm 1's shape); ``reuse`` takes the sampler's graph."""

    def __init__(self, ld, reuse: bool, steps: int = 3):
        self.ld, self.reuse, self.steps = ld, reuse, steps
        self.target = torch.zeros(2, 3, ld.image_size, ld.image_size)
        self.graph_seen = []

    def needs_graph(self, step_index):
        return self.reuse and step_index < self.steps

    def __call__(self, state: StepState):
        if state.step_index >= self.steps:
            return None
        self.graph_seen.append(state.noise_pred_cond.requires_grad)
        if self.reuse:
            z, eps = state.latents, state.noise_pred_cond
        else:
            z = state.latents.detach().requires_grad_(True)
            eps = state.predict_noise(z)
        a = state.alpha_prod_t
        loss = ((self.ld.decode_latents((z - (1 - a).sqrt() * eps) / a.sqrt()) - self.target) ** 2).sum()
        (grad,) = torch.autograd.grad(loss, z)
        return state.noise_pred + 5.0 * (1 - a).sqrt() * grad


@pytest.mark.parametrize("cfg", [1.0, 4.0])
@pytest.mark.parametrize("sag_scale", [0.0, 0.75])
def test_reusing_the_conditional_graph_equals_a_second_unet_pass(ld, context, cfg, sag_scale):
    """A hook that asks for the graph differentiates the step's own conditional pass: same result as
    re-running the UNet with grad, one UNet pass fewer per guided step."""
    kwargs = dict(uncond=ld.empty_text_embedding(), cfg_scale=cfg, sag_scale=sag_scale)
    reuse, rerun = _GradGuide(ld, True), _GradGuide(ld, False)
    a = sample(ld, context, step_hook=reuse, **kwargs)
    b = sample(ld, context, step_hook=rerun, **kwargs)
    assert reuse.graph_seen == [True] * 3 and rerun.graph_seen == [False] * 3
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(a, sample(ld, context, **kwargs))


def _mid_attention(ld):
    return ld.unet.mid_block.attentions[0].transformer_blocks[0].attn1


def test_sag_attention_processor_matches_the_default_and_keeps_a_softmax_map(ld, context):
    from fmrirecon.backbones.sampling import _AttentionMapProcessor

    z = torch.randn(2, *ld.latent_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(400)
    attn = _mid_attention(ld)
    original = attn.processor
    with torch.no_grad():
        expected = ld.unet(z, t, encoder_hidden_states=context).sample
        processor = _AttentionMapProcessor()
        processor.keep = True
        attn.set_processor(processor)
        try:
            got = ld.unet(z, t, encoder_hidden_states=context).sample
        finally:
            attn.set_processor(original)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    probs = processor.probs
    assert probs.shape[0] == 2 * attn.heads and probs.shape[1] == probs.shape[2]
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:2]))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sag_degrades_only_the_salient_region(ld, prediction_type):
    """Uniform attention → nothing salient → re-noising x̂0 with the branch's own noise gives z_t back;
    every query on key 0 → only key 0's upsampled cell changes (Hong et al. 2023, SAG's masked blur)."""
    from diffusers import DDIMScheduler

    from fmrirecon.backbones.sampling import _SelfAttentionGuidance

    scheduler = DDIMScheduler.from_config(ld.scheduler.config)
    sag = _SelfAttentionGuidance(ld.unet, 0.75, prediction_type)
    h = w = 2
    sag.map_size = (h, w)
    heads, b, c, size = _mid_attention(ld).heads, 1, ld.latent_shape[0], ld.latent_shape[-1]
    g = torch.Generator().manual_seed(2)
    z_t, out = torch.randn(b, c, size, size, generator=g), torch.randn(b, c, size, size, generator=g)
    t = torch.tensor(500)
    uniform = torch.full((b * heads, h * w, h * w), 1.0 / (h * w))
    torch.testing.assert_close(sag.degraded_latents(z_t, out, uniform, scheduler, t), z_t)
    focused = torch.zeros(b * heads, h * w, h * w)
    focused[:, :, 0] = 1.0
    changed = (sag.degraded_latents(z_t, out, focused, scheduler, t) - z_t).abs() > 1e-6
    cell = torch.zeros(size, size, dtype=torch.bool)
    cell[: size // h, : size // w] = True
    assert changed[:, :, ~cell].sum() == 0 and changed[:, :, cell].float().mean() > 0.5


def test_sag_changes_samples_deterministically_and_restores_the_unet(ld, context):
    attn = _mid_attention(ld)
    original = attn.processor
    uncond = ld.empty_text_embedding()
    plain = sample(ld, context, uncond=uncond, cfg_scale=4.0)
    a = sample(ld, context, uncond=uncond, cfg_scale=4.0, sag_scale=0.75)
    b = sample(ld, context, uncond=uncond, cfg_scale=4.0, sag_scale=0.75)
    assert torch.equal(a, b) and not torch.allclose(a, plain)
    assert attn.processor is original
    assert not torch.allclose(sample(ld, context, sag_scale=0.75), sample(ld, context))
