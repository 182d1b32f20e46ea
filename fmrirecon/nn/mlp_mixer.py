"""MLP-Mixer backbone and contrastive projector of NeuralDiffuser's high-level pipeline (§4.2.2).

The backbone follows the authors' MindEye2-derived code: the shared-space vector is treated as a sequence
of ``seq_len`` tokens of width ``hidden_dim`` (1 token in the paper); each of the ``n_blocks`` blocks mixes
channels (pre-norm MLP, residual) then tokens (pre-norm MLP over the sequence axis, residual); a final linear
layer produces ``out_tokens × out_dim`` (77×768 for the text condition, 50×768 per CLIP guidance layer).
"""

from __future__ import annotations

import torch
from torch import nn


def _mlp(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, out_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(out_dim, out_dim)
    )


class MixerBlock(nn.Module):
    """One Mixer block: channel MLP then token MLP, each pre-norm and residual. ``(B, S, H) -> (B, S, H)``."""

    def __init__(self, hidden_dim: int, seq_len: int = 1, dropout: float = 0.15):
        super().__init__()
        self.channel_norm = nn.LayerNorm(hidden_dim)
        self.channel_mlp = _mlp(hidden_dim, hidden_dim, dropout)
        self.token_norm = nn.LayerNorm(seq_len)
        self.token_mlp = _mlp(seq_len, seq_len, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.channel_mlp(self.channel_norm(x))
        mixed = self.token_mlp(self.token_norm(x.transpose(1, 2)))  # (B, H, S): MLP across tokens
        return x + mixed.transpose(1, 2)


class MLPMixerBackbone(nn.Module):
    """Shared-space embedding → token set.

    Args:
        hidden_dim: width of the subject-shared space (paper: 4096).
        out_tokens, out_dim: output token grid (paper: 77×768 text condition, 50×768 CLIP layer).
        n_blocks: Mixer blocks (paper: 4).
        seq_len: tokens the shared vector is split into (code: 1).
        dropout: MLP dropout (code: 0.15).

    Shapes: ``(B, hidden_dim) -> (B, out_tokens, out_dim)``.
    """

    def __init__(
        self,
        hidden_dim: int = 4096,
        out_tokens: int = 77,
        out_dim: int = 768,
        n_blocks: int = 4,
        seq_len: int = 1,
        dropout: float = 0.15,
    ):
        super().__init__()
        if hidden_dim % seq_len:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by seq_len ({seq_len})")
        self.seq_len, self.out_tokens, self.out_dim = seq_len, out_tokens, out_dim
        width = hidden_dim // seq_len
        self.blocks = nn.ModuleList(MixerBlock(width, seq_len, dropout) for _ in range(n_blocks))
        self.head = nn.Linear(hidden_dim, out_tokens * out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.shape[0], self.seq_len, -1)  # (B, S, H/S)
        for block in self.blocks:
            x = block(x)
        return self.head(x.flatten(1)).view(-1, self.out_tokens, self.out_dim)


class TokenProjector(nn.Module):
    """Contrastive projector, a per-token MLP with 3 hidden layers (§4.2.2; code: width 2048).

    Shapes: ``(B, T, D) -> (B, T, out_dim)``.
    """

    def __init__(self, in_dim: int = 768, out_dim: int | None = None, hidden_dim: int = 2048):
        super().__init__()
        out_dim = in_dim if out_dim is None else out_dim
        self.net = nn.Sequential(
            nn.LayerNorm(in_dim),
            nn.GELU(),
            nn.Linear(in_dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
