"""DDIM sampling (Song et al. 2021) for :class:`~fmrirecon.backbones.diffusion.LatentDiffusion`.

One loop serves every method:
- text/brain context conditioning and classifier-free guidance with any unconditional embedding (Ho & Salimans
  2022): ``eps = eps_u + s * (eps_c - eps_u)``;
- img2img from an initial latent with ``strength`` (SDEdit, Meng et al. 2022): start at step
  ``num_steps - int(num_steps * strength)`` from the initial latent noised to that timestep;
- ControlNet-style additive UNet residuals with per-residual scales (Zhang et al. 2023; NeuroPictor's control
  scale alpha);
- a per-step hook that may replace the noise prediction (NeuralDiffuser feature guidance, its Algorithm 1).

The UNet calls of the loop itself run without autograd; the hook runs with autograd enabled and gets
:meth:`StepState.predict_noise` to re-run the UNet on latents that require grad.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from fmrirecon.backbones.diffusion import LatentDiffusion

ResidualFn = Callable[[torch.Tensor, torch.Tensor], tuple[Sequence[torch.Tensor], torch.Tensor | None]]


@dataclass
class StepState:
    """What the step hook sees at one denoising step.

    Attributes:
        step_index: 0-based index among the steps actually run (img2img skips the first ones).
        timestep: the scheduler timestep ``t`` (int tensor).
        latents: ``z_t`` ``(B, C, h, w)``.
        noise_pred: the (guided) prediction the DDIM step will use ``(B, C, h, w)``.
        noise_pred_cond: the conditional branch's prediction.
        noise_pred_uncond: the unconditional branch's prediction, or ``None`` without CFG.
        alpha_prod_t: ``alpha-bar_t`` (scalar tensor), for Tweedie estimates (NeuralDiffuser Eq. 11).
        context: the conditional context ``(B, L, D)``.
    """

    step_index: int
    timestep: torch.Tensor
    latents: torch.Tensor
    noise_pred: torch.Tensor
    noise_pred_cond: torch.Tensor
    noise_pred_uncond: torch.Tensor | None
    alpha_prod_t: torch.Tensor
    context: torch.Tensor
    _predict: Callable[[torch.Tensor], torch.Tensor] = field(repr=False, default=None)

    def predict_noise(self, latents: torch.Tensor) -> torch.Tensor:
        """Conditional UNet prediction for ``latents`` at this timestep, differentiable w.r.t. ``latents``
        (same residuals as the loop)."""
        return self._predict(latents)


StepHook = Callable[[StepState], torch.Tensor | None]


def ddim_sample(
    ld: LatentDiffusion,
    context: torch.Tensor,
    *,
    uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    num_steps: int = 50,
    init_latents: torch.Tensor | None = None,
    strength: float = 1.0,
    down_residuals: Sequence[torch.Tensor] | ResidualFn | None = None,
    mid_residual: torch.Tensor | None = None,
    residual_scales: float | Sequence[float] | None = None,
    step_hook: StepHook | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    eta: float = 0.0,
) -> torch.Tensor:
    """Sample latents with DDIM.

    Args:
        ld: the latent diffusion backbone.
        context: conditional context ``(B, L, D)`` (text tokens, or brain-predicted ones).
        uncond: unconditional context ``(1 or B, L, D)``, e.g. ``ld.empty_text_embedding()``; used when
            ``guidance_scale != 1``.
        guidance_scale: classifier-free guidance scale ``s``; 1 means the conditional prediction alone.
        num_steps: DDIM steps over the full schedule.
        init_latents: ``(B, C, h, w)`` img2img start (scaled latents); ``None`` starts from pure noise.
        strength: fraction of the schedule to run from ``init_latents`` (0 returns them unchanged, 1 = all).
        down_residuals: ControlNet down-block residuals (one tensor per UNet skip, batch ``B``), or a function
            ``(z_t, t) -> (down_residuals, mid_residual)`` evaluated at every step (a live control branch).
        mid_residual: mid-block residual ``(B, C_mid, h', w')``, with tensor ``down_residuals``.
        residual_scales: one scale for all residuals, or one per residual (down ones first, mid last).
        step_hook: called every step with a :class:`StepState`; may return a new noise prediction.
        generator: seeds the initial noise (and the DDIM noise when ``eta > 0``).
        progress: show a progress bar.
        eta: DDIM stochasticity (0 = deterministic DDIM, the field's default).
    Returns:
        latents ``z_0`` ``(B, C, h, w)``.
    """
    from diffusers import DDIMScheduler

    batch = _check_context(ld, context)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    use_cfg = uncond is not None and guidance_scale != 1.0
    if use_cfg:
        _check_context(ld, uncond, what="uncond", batch=(1, batch))
    device, dtype = ld.device, ld.dtype
    context = context.to(device=device, dtype=dtype)

    scheduler = DDIMScheduler.from_config(ld.scheduler.config)  # fresh copy: set_timesteps mutates state
    scheduler.set_timesteps(num_steps, device=device)
    timesteps = scheduler.timesteps

    shape = (batch, *ld.latent_shape)
    if init_latents is None:
        latents = torch.randn(shape, generator=generator, dtype=dtype, device="cpu").to(device)
        latents = latents * scheduler.init_noise_sigma
    else:
        if init_latents.ndim != 4 or init_latents.shape[0] != batch or init_latents.shape[1] != shape[1]:
            raise ValueError(
                f"init_latents must be ({batch}, {shape[1]}, h, w), got {tuple(init_latents.shape)}"
            )
        init_latents = init_latents.to(device=device, dtype=dtype)
        # SDEdit start: skip the first (1 - strength) of the schedule (diffusers img2img convention)
        n_run = min(int(num_steps * strength), num_steps)
        timesteps = timesteps[num_steps - n_run :]
        if n_run == 0:
            return init_latents.clone()
        noise = torch.randn(init_latents.shape, generator=generator, dtype=dtype, device="cpu").to(device)
        latents = scheduler.add_noise(init_latents, noise, timesteps[:1])

    residual_fn = _residual_function(down_residuals, mid_residual, residual_scales, batch)
    cond_and_uncond = None
    if use_cfg:
        cond_and_uncond = torch.cat([uncond.to(device=device, dtype=dtype).expand(batch, -1, -1), context])

    def unet(z: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, n_copies: int) -> torch.Tensor:
        down, mid = residual_fn(z[:batch], t)
        kwargs = {}
        if down is not None:
            kwargs["down_block_additional_residuals"] = [r.repeat(n_copies, 1, 1, 1) for r in down]
        if mid is not None:
            kwargs["mid_block_additional_residual"] = mid.repeat(n_copies, 1, 1, 1)
        return ld.unet(z, t, encoder_hidden_states=ctx, **kwargs).sample

    for i, t in enumerate(tqdm(timesteps, desc="DDIM", disable=not progress, leave=False)):
        with torch.no_grad():
            if use_cfg:
                eps_uncond, eps_cond = unet(torch.cat([latents, latents]), t, cond_and_uncond, 2).chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            else:
                eps_uncond, eps_cond = None, unet(latents, t, context, 1)
                eps = eps_cond
        if step_hook is not None:
            state = StepState(
                step_index=i,
                timestep=t,
                latents=latents,
                noise_pred=eps,
                noise_pred_cond=eps_cond,
                noise_pred_uncond=eps_uncond,
                alpha_prod_t=scheduler.alphas_cumprod[int(t)].to(device),
                context=context,
                _predict=lambda z, t=t: unet(z, t, context, 1),
            )
            with torch.enable_grad():
                replaced = step_hook(state)
            if replaced is not None:
                if replaced.shape != eps.shape:
                    raise ValueError(
                        f"step_hook returned {tuple(replaced.shape)}, expected {tuple(eps.shape)}"
                    )
                eps = replaced.detach()
        latents = scheduler.step(eps, t, latents, eta=eta, generator=generator).prev_sample
    return latents


def text_to_image(
    ld: LatentDiffusion,
    texts: list[str],
    *,
    guidance_scale: float = 7.5,
    num_steps: int = 50,
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Generate images ``(B, 3, H, W)`` in ``[0, 1]`` from captions (CFG with the empty-text embedding)."""
    generator = torch.Generator().manual_seed(seed)
    latents = ddim_sample(
        ld,
        ld.encode_text(texts),
        uncond=ld.empty_text_embedding(),
        guidance_scale=guidance_scale,
        num_steps=num_steps,
        generator=generator,
        progress=progress,
    )
    with torch.no_grad():
        return ld.decode_latents(latents)


def _check_context(ld, context, what: str = "context", batch: tuple[int, ...] | None = None) -> int:
    dim = ld.unet.config.cross_attention_dim
    if not isinstance(context, torch.Tensor) or context.ndim != 3 or context.shape[-1] != dim:
        shape = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
        raise ValueError(f"{what} must be (B, L, {dim}) (unet.config.cross_attention_dim), got {shape}")
    if batch is not None and context.shape[0] not in batch:
        raise ValueError(f"{what} batch must be one of {batch}, got {context.shape[0]}")
    return context.shape[0]


def _residual_function(down, mid, scales, batch: int) -> ResidualFn:
    """Normalise the residual arguments to one ``(z_t, t) -> (down, mid)`` function applying the scales."""
    if down is None and mid is None:
        return lambda z, t: (None, None)
    if callable(down):
        if mid is not None:
            raise ValueError("pass mid_residual from the down_residuals function, not separately")
        source = down
    else:
        fixed = (list(down) if down is not None else None, mid)
        for r in [*(fixed[0] or []), *([mid] if mid is not None else [])]:
            if r.shape[0] != batch:
                raise ValueError(f"residuals must have batch {batch} (the context's), got {tuple(r.shape)}")
        source = lambda z, t: fixed  # noqa: E731

    def scaled(z, t):
        d, m = source(z, t)
        n = (len(d) if d is not None else 0) + (m is not None)
        if scales is None:
            factors = [1.0] * n
        elif isinstance(scales, int | float):
            factors = [float(scales)] * n
        else:
            factors = [float(s) for s in scales]
            if len(factors) != n:
                raise ValueError(
                    f"residual_scales must have {n} entries (down residuals then mid), got {len(factors)}"
                )
        if d is not None:
            d = [r.to(device=z.device, dtype=z.dtype) * f for r, f in zip(d, factors)]
        if m is not None:
            m = m.to(device=z.device, dtype=z.dtype) * factors[-1]
        return d, m

    return scaled
