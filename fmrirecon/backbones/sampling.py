"""DDIM sampling (Song et al. 2021) for :class:`~fmrirecon.backbones.diffusion.LatentDiffusion`.

One loop serves every method:
- text/brain context conditioning and classifier-free guidance with any unconditional embedding (Ho & Salimans
  2022): ``eps = eps_u + s * (eps_c - eps_u)``;
- img2img from an initial latent with ``strength`` (SDEdit, Meng et al. 2022): start at step
  ``num_steps - int(num_steps * strength)`` from the initial latent noised to that timestep;
- ControlNet-style additive UNet residuals with per-residual scales (Zhang et al. 2023; NeuroPictor's control
  scale alpha);
- self-attention guidance (SAG, Hong et al. 2023, ICCV, §4): the unconditional branch's self-attention map
  of the UNet mid block masks the salient regions of the predicted ``x̂0``; those regions are Gaussian-blurred,
  re-noised to ``t`` with the branch's own noise prediction, predicted again, and the prediction is pushed
  away from the blurred one: ``eps += s_sag * (eps_u - eps_u(blurred))`` (NeuralDiffuser's setup: 0.75);
- a per-step hook that may replace the noise prediction (NeuralDiffuser feature guidance, its Algorithm 1).

The UNet calls of the loop run without autograd, except on the steps where the hook asks for the graph
(``hook.needs_graph(step_index)`` is true): there the conditional branch runs with autograd on latents that
require grad, so a gradient-guidance hook differentiates the very prediction the step uses instead of running
the UNet a second time. Other hooks get :meth:`StepState.predict_noise` to re-run the UNet with grad.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm.auto import tqdm

from fmrirecon.backbones.diffusion import LatentDiffusion

ResidualFn = Callable[[torch.Tensor, torch.Tensor], tuple[Sequence[torch.Tensor], torch.Tensor | None]]


@dataclass
class StepState:
    """What the step hook sees at one denoising step.

    Attributes:
        step_index: 0-based index among the steps actually run (img2img skips the first ones).
        timestep: the scheduler timestep ``t`` (int tensor).
        latents: ``z_t`` ``(B, C, h, w)``; a leaf that requires grad on the steps where the hook asked for the
            graph.
        noise_pred: the (guided) prediction the DDIM step will use ``(B, C, h, w)``, detached.
        noise_pred_cond: the conditional branch's prediction; differentiable w.r.t. ``latents`` on the steps
            where the hook asked for the graph.
        noise_pred_uncond: the unconditional branch's prediction, or ``None`` without CFG.
        alpha_prod_t: ``alpha-bar_t`` (scalar tensor), for Tweedie estimates (NeuralDiffuser Eq. 11).
        context: the conditional context ``(B, L, D)``.
        prediction_type: what the UNet predicts (the scheduler's ``"epsilon"`` or ``"v_prediction"``); the
            ``noise_pred*`` fields and the hook's return value are in that parameterisation.
    """

    step_index: int
    timestep: torch.Tensor
    latents: torch.Tensor
    noise_pred: torch.Tensor
    noise_pred_cond: torch.Tensor
    noise_pred_uncond: torch.Tensor | None
    alpha_prod_t: torch.Tensor
    context: torch.Tensor
    prediction_type: str = "epsilon"
    _predict: Callable[[torch.Tensor], torch.Tensor] = field(repr=False, default=None)

    def predict_noise(self, latents: torch.Tensor) -> torch.Tensor:
        """Conditional UNet prediction for ``latents`` at this timestep, differentiable w.r.t. ``latents``
        (same residuals as the loop)."""
        return self._predict(latents)


StepHook = Callable[[StepState], torch.Tensor | None]


def _hook_needs_graph(hook, step_index: int) -> bool:
    needs = getattr(hook, "needs_graph", None)
    return bool(needs(step_index)) if needs is not None else False


class _AttentionMapProcessor:
    """Self-attention processor that computes the softmax map explicitly and keeps it when asked.

    Used on the UNet mid block's first self-attention for SAG. Same arithmetic as diffusers' plain
    ``AttnProcessor`` on ``(B, L, C)`` hidden states (no group/spatial norm, which SD's transformer blocks
    don't use).
    """

    def __init__(self):
        self.keep = False
        self.probs: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None:
            raise ValueError("SAG supports transformer-block self-attention on (B, L, C) hidden states only")
        residual = hidden_states
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
        if getattr(attn, "norm_q", None) is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        probs = attn.get_attention_scores(query, key, attention_mask)
        if self.keep:
            self.probs = probs.detach()
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class _SelfAttentionGuidance:
    """SAG (Hong et al. 2023) on one UNet: installs the map-keeping processor for the sampling run."""

    def __init__(self, unet, scale: float, prediction_type: str):
        if getattr(unet, "mid_block", None) is None or not getattr(unet.mid_block, "attentions", None):
            raise ValueError("self-attention guidance needs a UNet whose mid block has attention")
        self.scale = scale
        self.prediction_type = prediction_type
        self.mid_block = unet.mid_block
        self.attn = unet.mid_block.attentions[0].transformer_blocks[0].attn1
        self.processor = _AttentionMapProcessor()
        self.map_size: tuple[int, int] | None = None

    def __enter__(self):
        self._previous = self.attn.processor
        self.attn.set_processor(self.processor)

        def record_size(module, args, output):
            self.map_size = tuple(output.shape[-2:])

        self._hook = self.mid_block.register_forward_hook(record_size)
        return self

    def __exit__(self, *exc):
        self.attn.set_processor(self._previous)
        self._hook.remove()
        return False

    def branch_maps(self, batch: int) -> torch.Tensor:
        """The kept map of the first ``batch`` items of the last pass (the unconditional half under CFG)."""
        return self.processor.probs[: batch * self.attn.heads]

    def keep_maps(self, keep: bool) -> None:
        self.processor.keep = keep
        if not keep:
            self.processor.probs = None

    def degraded_latents(
        self, latents, model_out, probs, scheduler=None, t=None, *, alpha_bar: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Blur the attended regions of ``x̂0`` and re-noise to ``t`` (SAG's ``x̂_t``), from the branch's
        prediction ``model_out`` ``(B, C, h, w)`` and its mid-block map ``probs`` ``(B·heads, L, L)``.

        ``alpha_bar``: ``ᾱ_t`` as a tensor on the latents' device (what the sampler passes: no device read);
        without it, ``ᾱ_t`` is read from ``scheduler`` at ``t``.
        """
        from torchvision.transforms.functional import gaussian_blur

        if alpha_bar is None:
            alpha_bar = scheduler.alphas_cumprod[int(t)]
        alpha_bar = alpha_bar.to(latents)
        sigma = (1 - alpha_bar).sqrt()
        if self.prediction_type == "v_prediction":
            x0 = alpha_bar.sqrt() * latents - sigma * model_out
            eps = alpha_bar.sqrt() * model_out + sigma * latents
        else:
            x0 = (latents - sigma * model_out) / alpha_bar.sqrt()
            eps = model_out
        b, c = latents.shape[:2]
        h, w = self.map_size
        # keys that receive more than the average total attention (each query's row sums to 1)
        salient = probs.reshape(b, -1, h * w, h * w).mean(1).sum(1) > 1.0
        mask = salient.reshape(b, 1, h, w).to(latents.dtype)
        mask = F.interpolate(mask, size=latents.shape[-2:], mode="nearest").expand(-1, c, -1, -1)
        k = min(9, 2 * min(latents.shape[-2:]) - 1)  # SAG's 9×9, σ = 1; reflect padding needs pad < side
        blurred = gaussian_blur(x0, kernel_size=[k, k], sigma=[1.0, 1.0])
        degraded = blurred * mask + x0 * (1 - mask)
        return alpha_bar.sqrt() * degraded + sigma * eps  # q(x_t | x̂0) with the branch's own noise


def ddim_sample(
    ld: LatentDiffusion,
    context: torch.Tensor,
    *,
    uncond: torch.Tensor | None = None,
    cfg_scale: float = 1.0,
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
    sag_scale: float = 0.0,
    compile_unet: bool = False,
) -> torch.Tensor:
    """Sample latents with DDIM.

    The loop never reads the device back (no host synchronisation per step): the timestep schedule, the
    ``ᾱ_t`` of every step and the DDIM noise (``eta > 0``) are prepared before the first step, and every
    step indexes them; the scheduler gets the step's timestep as a Python int.

    Args:
        ld: the latent diffusion backbone.
        context: conditional context ``(B, L, D)`` (text tokens, or brain-predicted ones).
        uncond: unconditional context ``(1 or B, L, D)``, e.g. ``ld.empty_text_embedding()``; used when
            ``cfg_scale != 1``.
        cfg_scale: classifier-free guidance scale ``s``; 1 means the conditional prediction alone.
        num_steps: DDIM steps over the full schedule.
        init_latents: ``(B, C, h, w)`` img2img start (scaled latents); ``None`` starts from pure noise.
        strength: fraction of the schedule to run from ``init_latents`` (0 returns them unchanged, 1 = all).
        down_residuals: ControlNet down-block residuals (one tensor per UNet skip, batch ``B``), or a function
            ``(z_t, t) -> (down_residuals, mid_residual)`` evaluated at every step (a live control branch).
        mid_residual: mid-block residual ``(B, C_mid, h', w')``, with tensor ``down_residuals``.
        residual_scales: one scale for all residuals, or one per residual (down ones first, mid last).
        step_hook: called every step with a :class:`StepState`; may return a new noise prediction.
        generator: seeds the initial noise (and the DDIM noise when ``eta > 0``), drawn on the CPU so that
            a seed gives the same noise on every device.
        progress: show a progress bar.
        eta: DDIM stochasticity (0 = deterministic DDIM, the field's default).
        sag_scale: self-attention guidance scale (0 = off; diffusers' SAG pipeline and NeuralDiffuser: 0.75).
            Costs one more UNet pass per step: SAG's input is the blurred ``x̂0`` of the same step's
            unconditional prediction and its attention map, so it follows that pass. On the steps where the
            hook asks for the graph under CFG, the conditional pass does not feed SAG, and the two run as
            one batch (``2B``, the graph kept for the conditional half only).
        compile_unet: run the no-grad UNet passes through ``torch.compile`` (CUDA graphs,
            ``mode="reduce-overhead"``, on a GPU; the default inductor mode on the CPU). A speed option:
            the first call compiles (minutes at SD size); results equal the eager ones within float
            tolerance.
    Returns:
        latents ``z_0`` ``(B, C, h, w)``.
    """
    from diffusers import DDIMScheduler

    batch = _check_context(ld, context)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    use_cfg = uncond is not None and cfg_scale != 1.0
    if use_cfg:
        _check_context(ld, uncond, what="uncond", batch=(1, batch))
    device, dtype = ld.device, ld.dtype
    context = context.to(device=device, dtype=dtype)

    scheduler = DDIMScheduler.from_config(ld.scheduler.config)  # fresh copy: set_timesteps mutates state
    scheduler.set_timesteps(num_steps)  # on the host: the schedule is read here once, never per step
    schedule = scheduler.timesteps  # (num_steps,) int64 on the CPU

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
        schedule = schedule[num_steps - n_run :]
        if n_run == 0:
            return init_latents.clone()
        noise = torch.randn(init_latents.shape, generator=generator, dtype=dtype, device="cpu").to(device)
        latents = scheduler.add_noise(init_latents, noise, schedule[:1].to(device))
    steps = schedule.tolist()  # Python ints for scheduler.step: no device read inside the loop
    timesteps = schedule.to(device)  # the UNet's t, indexed on the device
    alpha_bars = scheduler.alphas_cumprod[schedule].to(device)  # ᾱ_t of every step that runs
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)  # scheduler.step reads ᾱ on the device
    scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.to(device)
    # DDIM noise of every step, drawn now in the order the steps would draw it (same values as per step)
    step_noise = None
    if eta > 0:
        step_noise = torch.stack(
            [torch.randn(shape, generator=generator, dtype=dtype, device="cpu") for _ in steps]
        ).to(device)

    live_control = callable(down_residuals)  # evaluated at each pass's own input: SAG's stays separate
    residual_fn = _residual_function(down_residuals, mid_residual, residual_scales, batch, device)
    cond_and_uncond = None
    if use_cfg:
        cond_and_uncond = torch.cat([uncond.to(device=device, dtype=dtype).expand(batch, -1, -1), context])
    fast_unet = _compiled(ld.unet) if compile_unet else ld.unet

    def unet(z: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, n_copies: int, fast: bool = False):
        down, mid = residual_fn(z[:batch], t)
        kwargs = {}
        if down is not None:
            kwargs["down_block_additional_residuals"] = [r.repeat(n_copies, 1, 1, 1) for r in down]
        if mid is not None:
            kwargs["mid_block_additional_residual"] = mid.repeat(n_copies, 1, 1, 1)
        if fast and fast_unet is not ld.unet:
            if device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            # a CUDA-graph output is overwritten by the graph's next replay: keep a copy
            return fast_unet(z, t, encoder_hidden_states=ctx, **kwargs).sample.clone()
        return ld.unet(z, t, encoder_hidden_states=ctx, **kwargs).sample

    prediction_type = ld.scheduler.config.get("prediction_type", "epsilon")
    sag = None
    if sag_scale:
        sag = _SelfAttentionGuidance(ld.unet, float(sag_scale), prediction_type)
        sag_context = cond_and_uncond[:batch] if use_cfg else context
    uncond_batch = cond_and_uncond[:batch] if use_cfg else None

    with sag if sag is not None else contextlib.nullcontext():
        for i in tqdm(range(len(steps)), desc="DDIM", disable=not progress, leave=False):
            t, alpha_bar = timesteps[i], alpha_bars[i]
            graph = step_hook is not None and _hook_needs_graph(step_hook, i)
            z_t = latents.detach().requires_grad_(True) if graph else latents
            if sag is not None:
                sag.keep_maps(True)
            with torch.no_grad():
                if use_cfg and not graph:
                    both = unet(torch.cat([latents, latents]), t, cond_and_uncond, 2, fast=True)
                    eps_uncond, eps_cond = both.chunk(2)
                elif use_cfg:
                    eps_uncond = unet(latents, t, uncond_batch, 1, fast=True)
                else:
                    eps_uncond = None
                    if not graph:
                        eps_cond = unet(latents, t, context, 1, fast=True)
            sag_probs, sag_pred = None, None
            if graph:
                if sag is not None and use_cfg:  # the map is the unconditional pass's, just run
                    sag_probs = sag.branch_maps(batch)
                    sag.keep_maps(False)
                if sag is not None and use_cfg and not live_control:
                    with torch.no_grad():
                        degraded = sag.degraded_latents(latents, eps_uncond, sag_probs, alpha_bar=alpha_bar)
                    with torch.enable_grad():  # one batch: the graph the hook differentiates + SAG's pass
                        out = unet(torch.cat([z_t, degraded]), t, torch.cat([context, sag_context]), 2)
                    eps_cond, sag_pred = out[:batch], out[batch:].detach()
                else:
                    with torch.enable_grad():
                        eps_cond = unet(z_t, t, context, 1)  # the graph the hook differentiates
            if sag is not None:
                sag_probs = sag.branch_maps(batch) if sag_probs is None else sag_probs
                sag.keep_maps(False)
            eps_c = eps_cond.detach()
            eps = eps_uncond + cfg_scale * (eps_c - eps_uncond) if use_cfg else eps_c
            if sag is not None:
                branch = eps_uncond if use_cfg else eps_c
                if sag_pred is None:
                    with torch.no_grad():
                        degraded = sag.degraded_latents(latents, branch, sag_probs, alpha_bar=alpha_bar)
                        sag_pred = unet(degraded, t, sag_context, 1, fast=True)
                eps = eps + sag.scale * (branch - sag_pred)
            if step_hook is not None:
                state = StepState(
                    step_index=i,
                    timestep=t,
                    latents=z_t,
                    noise_pred=eps,
                    noise_pred_cond=eps_cond,
                    noise_pred_uncond=eps_uncond,
                    alpha_prod_t=alpha_bar,
                    context=context,
                    prediction_type=prediction_type,
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
            variance_noise = step_noise[i] if step_noise is not None else None
            latents = scheduler.step(
                eps, steps[i], latents.detach(), eta=eta, variance_noise=variance_noise
            ).prev_sample
    return latents


class count_host_syncs(TorchDispatchMode):  # noqa: N801 (used as a context manager)
    """Count the operations that make the host wait for ``device`` while the context is active.

    Counted (``counts``, keyed by aten op): reading a value of a tensor on ``device`` (``.item()``,
    ``int(t)``, ``float(t)``, ``bool(t)``, indexing a tensor with a 0-d tensor: ``_local_scalar_dense``),
    operations whose output size depends on values (``nonzero``, ``masked_select``, ``unique``), and
    blocking copies between ``device`` and the CPU. On a GPU these are what
    ``torch.cuda.set_sync_debug_mode`` reports; with ``device="cpu"`` every value read counts, a superset
    that lets a CPU test check a loop that must not read the device back. ``total`` sums them.
    """

    _VALUE_OPS = (
        "aten._local_scalar_dense",
        "aten.nonzero",
        "aten.masked_select",
        "aten._unique",
        "aten.unique",
    )

    def __init__(self, device="cpu"):
        super().__init__()
        self.device = torch.device(device)
        self.counts: dict[str, int] = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _on_device(self, x) -> bool:
        return isinstance(x, torch.Tensor) and x.device.type == self.device.type

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        sync = False
        if name.startswith(self._VALUE_OPS):
            sync = bool(args) and self._on_device(args[0])
        elif name in ("aten._to_copy", "aten.copy_") and self.device.type != "cpu" and args:
            src = args[1] if name == "aten.copy_" else args[0]
            dst_device = args[0].device if name == "aten.copy_" else kwargs.get("device", src.device)
            crosses = {torch.device(dst_device).type, src.device.type} == {"cpu", self.device.type}
            sync = crosses and not kwargs.get("non_blocking", False)
        if sync:
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **kwargs)


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled(unet: torch.nn.Module):
    """``torch.compile`` of ``unet`` (CUDA graphs on a GPU), built once per UNet object and kept beside it;
    the backbone itself is left as the loader handed it out."""
    if unet not in _COMPILED:
        cuda = next(unet.parameters()).device.type == "cuda"
        _COMPILED[unet] = torch.compile(unet, mode="reduce-overhead" if cuda else None, dynamic=False)
    return _COMPILED[unet]


def text_to_image(
    ld: LatentDiffusion,
    texts: list[str],
    *,
    cfg_scale: float = 7.5,
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
        cfg_scale=cfg_scale,
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


def _residual_function(down, mid, scales, batch: int, device=None) -> ResidualFn:
    """Normalise the residual arguments to one ``(z_t, t) -> (down, mid)`` function applying the scales
    (fixed residuals are moved to ``device`` once, not at every step)."""
    if down is None and mid is None:
        return lambda z, t: (None, None)
    if callable(down):
        if mid is not None:
            raise ValueError("pass mid_residual from the down_residuals function, not separately")
        source = down
    else:
        for r in [*(down or []), *([mid] if mid is not None else [])]:
            if r.shape[0] != batch:
                raise ValueError(f"residuals must have batch {batch} (the context's), got {tuple(r.shape)}")
        fixed = (
            [r.to(device) for r in down] if down is not None else None,
            mid.to(device) if mid is not None else None,
        )
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
