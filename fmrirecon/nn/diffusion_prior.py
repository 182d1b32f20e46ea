"""DALL-E-2-style diffusion prior over token sets (NeuralDiffuser §4.2.2, Eq. 3; MindEye/MindEye2 prior).

The prior denoises a target token set ``x0: (B, T, D)`` (e.g. the 77×768 text condition) conditioned on the
backbone's prediction of it. Like the authors' code it predicts ``x0`` directly, uses a cosine noise schedule
with 100 training timesteps, drops the condition with probability 0.2 (replaced by a learned null condition),
has no learnable queries (positional embeddings are added to both token sets instead), and samples with 20
strided deterministic (DDIM, η = 0) steps at inference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def cosine_alphas_cumprod(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """ᾱ_t for t = 1..T of the cosine schedule (Nichol & Dhariwal 2021), betas clipped at 0.999. ``(T,)``."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0).float()


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps. ``(B,) -> (B, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([args.sin(), args.cos()], dim=-1)
    return F.pad(emb, (0, dim % 2))


class _Block(nn.Module):
    """Pre-norm transformer block (non-causal self-attention + GELU MLP)."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int, dropout: float):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.out = nn.Linear(inner, dim, bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, dim * ff_mult), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim * ff_mult, dim)
        )
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.out(attn.transpose(1, 2).reshape(b, n, -1))
        return x + self.ff(self.norm2(x))


class PriorNetwork(nn.Module):
    """Denoiser ``(x_t, t, cond) -> x̂0``: one transformer over [cond tokens, time token, noisy tokens].

    Args:
        dim: token width (768 for SD text / CLIP ViT-B/32 tokens).
        num_tokens: tokens per set (77 text, 50 CLIP layer).
        depth, heads, dim_head, ff_mult: transformer size (code: depth 6, 14 heads of 52, ×4 MLP).

    Shapes: ``x_t, cond: (B, T, D)``, ``t: (B,)`` → ``(B, T, D)``.
    """

    def __init__(
        self,
        dim: int = 768,
        num_tokens: int = 77,
        depth: int = 6,
        heads: int = 14,
        dim_head: int = 52,
        ff_mult: int = 4,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.dim, self.num_tokens = dim, num_tokens
        self.pos_emb = nn.Parameter(torch.randn(num_tokens, dim) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.null_cond = nn.Parameter(torch.randn(num_tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads, dim_head, ff_mult, dropout) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, dim)

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if cond_mask is not None:  # False = drop the condition (classifier-free training/guidance)
            cond = torch.where(cond_mask[:, None, None], cond, self.null_cond.to(cond.dtype).expand_as(cond))
        time_token = self.time_mlp(timestep_embedding(t, self.dim))[:, None]  # (B, 1, D)
        tokens = torch.cat([cond + self.pos_emb, time_token, x_t + self.pos_emb], dim=1)  # (B, 2T+1, D)
        for block in self.blocks:
            tokens = block(tokens)
        return self.proj_out(self.norm_out(tokens[:, -self.num_tokens :]))


class DiffusionPrior(nn.Module):
    """Diffusion prior: training loss and sampler around a :class:`PriorNetwork`.

    Args:
        net: the denoiser.
        timesteps: training timesteps (paper: 100).
        cond_drop_prob: probability of replacing the condition by the null condition in training (code: 0.2).
        sample_steps: strided DDIM steps at inference (code: 20).
    """

    def __init__(
        self, net: PriorNetwork, timesteps: int = 100, cond_drop_prob: float = 0.2, sample_steps: int = 20
    ):
        super().__init__()
        if not 1 <= sample_steps <= timesteps:
            raise ValueError(f"sample_steps must be in [1, {timesteps}], got {sample_steps}")
        self.net = net
        self.timesteps, self.cond_drop_prob, self.sample_steps = timesteps, cond_drop_prob, sample_steps
        self.register_buffer("alphas_cumprod", cosine_alphas_cumprod(timesteps), persistent=False)

    def loss(
        self, cond: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """MSE between the denoised and the clean target at a random timestep (the L_prior of Eq. 3).

        Args:
            cond: ``(B, T, D)`` backbone prediction (gradients flow into the backbone, as in the code).
            target: ``(B, T, D)`` ground-truth token set.
        """
        b = target.shape[0]
        t = torch.randint(0, self.timesteps, (b,), generator=generator).to(target.device)
        noise = torch.randn(target.shape, generator=generator).to(target)
        ab = self.alphas_cumprod[t].view(b, 1, 1)
        x_t = ab.sqrt() * target + (1 - ab).sqrt() * noise
        keep = (torch.rand(b, generator=generator) >= self.cond_drop_prob).to(target.device)
        return F.mse_loss(self.net(x_t, t, cond, keep), target)

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        steps: int | None = None,
        cond_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Deterministic DDIM (η = 0) sampling from noise. ``cond: (B, T, D) -> (B, T, D)``."""
        steps = self.sample_steps if steps is None else steps
        b = cond.shape[0]
        x = torch.randn(cond.shape, generator=generator).to(cond)
        times = torch.linspace(self.timesteps - 1, 0, steps).round().long().tolist()
        for i, t in enumerate(times):
            tt = torch.full((b,), t, device=cond.device, dtype=torch.long)
            x0 = self.net(x, tt, cond)
            if cond_scale != 1.0:
                null = self.net(x, tt, cond, torch.zeros(b, dtype=torch.bool, device=cond.device))
                x0 = null + cond_scale * (x0 - null)
            ab = self.alphas_cumprod[t]
            eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
            ab_prev = self.alphas_cumprod[times[i + 1]] if i + 1 < len(times) else torch.tensor(1.0)
            x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
        return x
