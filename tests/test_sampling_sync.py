"""The DDIM loop never reads the device back (issue 21) and gives the samples of the loop it replaced.

``_reference_sample`` is the loop as it was before (commit 35b7030): the timestep of each step read back with
``int(t)``, ``scheduler.step`` given the device tensor ``t`` and the generator, SAG's re-noising through
``scheduler.add_noise`` and its UNet pass alone. The new loop must give the same latents within float
tolerance, with zero host synchronisations per step.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from fmrirecon.backbones.sampling import (
    _residual_function,
    _SelfAttentionGuidance,
    count_host_syncs,
    ddim_sample,
)
from fmrirecon.backbones.world.models import tiny_latent_diffusion

STEPS = 8


@pytest.fixture(scope="module")
def ld():
    return tiny_latent_diffusion(seed=0)


@pytest.fixture(scope="module")
def context(ld):
    return ld.encode_text(["a red cat on grass", "a blue car on a road"])


def _reference_sample(ld, context, *, uncond=None, cfg_scale=1.0, num_steps=STEPS, init_latents=None,
                      strength=1.0, step_hook=None, generator=None, eta=0.0, sag_scale=0.0,
                      down_residuals=None, mid_residual=None):  # fmt: skip
    from diffusers import DDIMScheduler

    batch, device = context.shape[0], ld.device
    use_cfg = uncond is not None and cfg_scale != 1.0
    scheduler = DDIMScheduler.from_config(ld.scheduler.config)
    scheduler.set_timesteps(num_steps, device=device)
    timesteps = scheduler.timesteps
    if init_latents is None:
        latents = torch.randn((batch, *ld.latent_shape), generator=generator) * scheduler.init_noise_sigma
    else:
        timesteps = timesteps[num_steps - int(num_steps * strength) :]
        noise = torch.randn(init_latents.shape, generator=generator)
        latents = scheduler.add_noise(init_latents, noise, timesteps[:1])
    residual_fn = _residual_function(down_residuals, mid_residual, None, batch)
    both = torch.cat([uncond.expand(batch, -1, -1), context]) if use_cfg else None

    def unet(z, t, ctx, n):
        down, mid = residual_fn(z[:batch], t)
        kw = {}
        if down is not None:
            kw["down_block_additional_residuals"] = [r.repeat(n, 1, 1, 1) for r in down]
        if mid is not None:
            kw["mid_block_additional_residual"] = mid.repeat(n, 1, 1, 1)
        return ld.unet(z, t, encoder_hidden_states=ctx, **kw).sample

    prediction_type = ld.scheduler.config.prediction_type
    sag = _SelfAttentionGuidance(ld.unet, sag_scale, prediction_type) if sag_scale else None
    with sag if sag is not None else contextlib.nullcontext():
        for i, t in enumerate(timesteps):
            graph = step_hook is not None and step_hook.needs_graph(i)
            z_t = latents.detach().requires_grad_(True) if graph else latents
            if sag is not None:
                sag.keep_maps(True)
            with torch.no_grad():
                eps_uncond = None
                if use_cfg and not graph:
                    eps_uncond, eps_cond = unet(torch.cat([latents, latents]), t, both, 2).chunk(2)
                elif use_cfg:
                    eps_uncond = unet(latents, t, both[:batch], 1)
                elif not graph:
                    eps_cond = unet(latents, t, context, 1)
            probs = None
            if graph:
                if sag is not None and use_cfg:
                    probs = sag.branch_maps(batch)
                    sag.keep_maps(False)
                with torch.enable_grad():
                    eps_cond = unet(z_t, t, context, 1)
            if sag is not None:
                probs = sag.branch_maps(batch) if probs is None else probs
                sag.keep_maps(False)
            eps_c = eps_cond.detach()
            eps = eps_uncond + cfg_scale * (eps_c - eps_uncond) if use_cfg else eps_c
            if sag is not None:
                branch = eps_uncond if use_cfg else eps_c
                with torch.no_grad():
                    degraded = sag.degraded_latents(latents, branch, probs, scheduler, t)
                    eps = eps + sag.scale * (
                        branch - unet(degraded, t, both[:batch] if use_cfg else context, 1)
                    )
            if step_hook is not None:
                alpha = scheduler.alphas_cumprod[int(t)]
                replaced = step_hook.guide(z_t, eps_cond, eps, alpha, lambda z, t=t: unet(z, t, context, 1))
                eps = replaced.detach() if replaced is not None else eps
            latents = scheduler.step(eps, t, latents.detach(), eta=eta, generator=generator).prev_sample
    return latents


class _Guide:
    """A gradient-guidance hook (pulls the Tweedie ``x̂0`` toward a grey image) on its first ``steps`` steps,
    differentiating the sampler's own conditional pass; it reads nothing back from the device."""

    def __init__(self, ld, steps: int = 3):
        self.ld, self.steps = ld, steps
        self.target = torch.full((1, 3, ld.image_size, ld.image_size), 0.5)

    def needs_graph(self, i):
        return i < self.steps

    def guide(self, z, eps_cond, eps, alpha, predict):
        if not eps_cond.requires_grad:
            return None
        x0 = alpha.sqrt() * z - (1 - alpha).sqrt() * eps_cond  # v-prediction world UNet
        if self.ld.scheduler.config.prediction_type != "v_prediction":
            x0 = (z - (1 - alpha).sqrt() * eps_cond) / alpha.sqrt()
        loss = ((self.ld.decode_latents(x0) - self.target) ** 2).sum()
        (grad,) = torch.autograd.grad(loss, z)
        return eps + 3.0 * (1 - alpha).sqrt() * grad

    def __call__(self, state):
        return self.guide(
            state.latents, state.noise_pred_cond, state.noise_pred, state.alpha_prod_t, state.predict_noise
        )


CASES = {
    "noise, cfg, eta": dict(cfg=4.0, eta=0.5),
    "img2img, cfg, sag, guided": dict(cfg=4.0, sag=0.75, strength=0.75, guide=True),
    "img2img, sag, guided, no cfg": dict(sag=0.75, strength=0.75, guide=True),
    "img2img, cfg, sag, eta, residuals": dict(cfg=4.0, sag=0.75, strength=0.75, eta=0.3, residuals=True),
}


def _kwargs(ld, context, case):
    g = torch.Generator().manual_seed(11)
    kw = dict(num_steps=STEPS, eta=case.get("eta", 0.0), sag_scale=case.get("sag", 0.0))
    if "cfg" in case:
        kw.update(uncond=ld.empty_text_embedding(), cfg_scale=case["cfg"])
    if "strength" in case:
        kw.update(init_latents=torch.randn(2, *ld.latent_shape, generator=g), strength=case["strength"])
    if case.get("guide"):
        kw["step_hook"] = _Guide(ld)
    if case.get("residuals"):
        with torch.no_grad():  # residual shapes from a plain UNet pass with hooks on its down blocks
            kw["down_residuals"], kw["mid_residual"] = _residual_shapes(ld, context, g)
    return kw


def _residual_shapes(ld, context, g):
    down, mid = [], []
    z = torch.zeros(2, *ld.latent_shape)
    hooks = [b.register_forward_hook(lambda m, a, o: down.extend(o[1])) for b in ld.unet.down_blocks]
    hooks.append(ld.unet.mid_block.register_forward_hook(lambda m, a, o: mid.append(o)))
    ld.unet(z, torch.tensor(10), encoder_hidden_states=context)
    for h in hooks:
        h.remove()
    d0 = ld.unet.conv_in(z)
    down = [d0, *down]
    return [0.1 * torch.randn(r.shape, generator=g) for r in down], 0.1 * torch.randn(
        mid[0].shape, generator=g
    )


@pytest.mark.parametrize("name", list(CASES))
def test_same_latents_as_the_per_step_loop_it_replaced(ld, context, name):
    kw = _kwargs(ld, context, CASES[name])
    new = ddim_sample(ld, context, generator=torch.Generator().manual_seed(3), progress=False, **kw)
    old = _reference_sample(ld, context, generator=torch.Generator().manual_seed(3), **kw)
    torch.testing.assert_close(new, old, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(new, ddim_sample(ld, context, num_steps=STEPS, progress=False))


@pytest.mark.parametrize("name", list(CASES))
def test_no_host_synchronisation_in_any_step(ld, context, name):
    kw = _kwargs(ld, context, CASES[name])
    hook = kw.pop("step_hook", None)
    per_step, counter = [], count_host_syncs("cpu")

    def record(state):  # the counter's total at each step: the differences are the syncs of one step
        per_step.append(counter.total)
        return hook(state) if hook is not None else None

    record.needs_graph = hook.needs_graph if hook is not None else (lambda i: False)
    with counter:
        ddim_sample(
            ld, context, generator=torch.Generator().manual_seed(3), progress=False, step_hook=record, **kw
        )
    assert len(per_step) == int(STEPS * CASES[name].get("strength", 1.0))
    assert counter.total == 0, counter.counts  # setup included: on the CPU nothing is read back at all


def test_the_counter_sees_the_reads_of_the_old_loop(ld, context):
    """The reference loop reads the device every step (``int(t)``, the scheduler indexing ᾱ with a tensor,
    ``prev_timestep >= 0``): the counter must see them, or the zero above would mean nothing."""
    kw = _kwargs(ld, context, CASES["img2img, cfg, sag, guided"])
    with count_host_syncs("cpu") as counter:
        _reference_sample(ld, context, generator=torch.Generator().manual_seed(3), **kw)
    steps = int(STEPS * 0.75)
    assert counter.total >= 4 * steps, counter.counts
    with count_host_syncs("cpu") as counter:
        int(torch.tensor(3)), bool(torch.tensor(True)), torch.arange(4).nonzero()
    assert counter.counts == {"aten._local_scalar_dense": 2, "aten.nonzero": 1}


def test_samples_of_one_image_run_as_one_batch_with_per_sample_results(ld, context):
    """K samples of one context run as one UNet batch; the first equals the same seed's single sample (a
    seeded CPU generator's first draws do not depend on how many follow)."""
    ctx = context[:1].expand(3, -1, -1)
    kw = dict(
        uncond=ld.empty_text_embedding(), cfg_scale=4.0, num_steps=STEPS, progress=False, sag_scale=0.75
    )
    calls = []
    handle = ld.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        batched = ddim_sample(ld, ctx, generator=torch.Generator().manual_seed(5), **kw)
    finally:
        handle.remove()
    assert calls == [6, 3] * STEPS  # K = 3: both CFG halves in one pass, then SAG's pass for all K
    alone = ddim_sample(ld, ctx[:1], generator=torch.Generator().manual_seed(5), **kw)
    torch.testing.assert_close(batched[:1], alone, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(batched[1], batched[0])


def test_sag_pass_shares_the_batch_with_the_graph_pass_on_guided_steps(ld, context):
    """Under CFG on a step where the hook keeps the graph, SAG's pass (which needs only the unconditional
    prediction) and the conditional pass run as one batch: 2 UNet calls on such a step instead of 3."""
    kw = _kwargs(ld, context, CASES["img2img, cfg, sag, guided"])
    calls = []
    handle = ld.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        ddim_sample(ld, context, generator=torch.Generator().manual_seed(3), progress=False, **kw)
    finally:
        handle.remove()
    steps, guided = int(STEPS * 0.75), kw["step_hook"].steps
    # guided steps: uncond (B) + [cond with graph; SAG] (2B); others: [uncond; cond] (2B) + SAG (B)
    assert calls == [2, 4] * guided + [4, 2] * (steps - guided)


def _compile_case(ld, context, monkeypatch, backend: str | None):
    from fmrirecon.backbones import sampling

    if backend is not None:
        real = torch.compile
        monkeypatch.setattr(torch, "compile", lambda m, **kw: real(m, **{**kw, "backend": backend}))
    sampling._COMPILED.pop(ld.unet, None)
    kw = dict(uncond=ld.empty_text_embedding(), cfg_scale=4.0, num_steps=4, sag_scale=0.75, progress=False)
    try:
        eager = ddim_sample(ld, context[:1], generator=torch.Generator().manual_seed(0), **kw)
        fast = ddim_sample(
            ld, context[:1], generator=torch.Generator().manual_seed(0), compile_unet=True, **kw
        )
        assert ld.unet in sampling._COMPILED and not isinstance(
            ld.unet, torch._dynamo.eval_frame.OptimizedModule
        )
    finally:
        sampling._COMPILED.pop(ld.unet, None)
    torch.testing.assert_close(fast, eager, atol=5e-5, rtol=1e-4)


def test_compile_option_runs_the_no_grad_passes_through_torch_compile(ld, context, monkeypatch):
    """The wiring of ``compile_unet`` (dynamo traces the UNet, SAG's map-keeping processor included), with
    dynamo's eager backend: seconds. The inductor run is the slow test below."""
    _compile_case(ld, context, monkeypatch, backend="eager")


@pytest.mark.slow
def test_compile_option_with_inductor_equals_eager(ld, context, monkeypatch):
    """``compile_unet=True`` as users run it (inductor on the CPU): ~8 min of C++ compilation on a loaded
    2-core machine for the tiny UNet (0.25 s per sample after), within 1e-5 of eager."""
    _compile_case(ld, context, monkeypatch, backend=None)
