"""Residual MLP backbone and VQ-VAE-decoder-like upsampler of NeuralDiffuser's low-level pipeline (§4.2.2).

As in the authors' code (MindEye's ``Voxel2StableDiffusionModel``): blocks of Linear (no bias) → LayerNorm →
SiLU → Dropout with residual connections, a linear map to a ``grid_channels × grid × grid`` map (64×16×16), an
upsampler of ResNet blocks and nearest-neighbour ×2 upsamplings to the VAE latent (4×64×64), and a 1×1-conv
projector to 512 channels for the soft contrastive loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualMLP(nn.Module):
    """``n_blocks`` residual blocks ``x + Dropout(SiLU(LN(Linear(x))))``. ``(B, H) -> (B, H)``."""

    def __init__(self, hidden_dim: int = 4096, n_blocks: int = 4, dropout: float = 0.25):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Linear(hidden_dim, hidden_dim, bias=False),
                nn.LayerNorm(hidden_dim),
                nn.SiLU(),
                nn.Dropout(dropout),
            )
            for _ in range(n_blocks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def _group_norm(channels: int) -> nn.GroupNorm:
    groups = 32 if channels % 32 == 0 else 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """VAE-decoder ResNet block: (GN → SiLU → 3×3 conv) ×2 with a 1×1 shortcut when widths differ."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1, self.conv1 = _group_norm(in_channels), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2, self.conv2 = (
            _group_norm(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class LatentUpsampler(nn.Module):
    """Grid map → VAE latent, like a VQ-VAE decoder: conv-in, per level a ResNet block then ×2 upsampling.

    Args:
        in_channels: backbone grid channels (paper: 64).
        out_channels: VAE latent channels (SD: 4).
        block_channels: widths per level; ``len - 1`` upsamplings (code: (64, 128, 256): 16 → 64).

    Shapes: ``(B, in, g, g) -> (B, out, g·2^(L−1), g·2^(L−1))``.
    """

    def __init__(
        self, in_channels: int = 64, out_channels: int = 4, block_channels: tuple[int, ...] = (64, 128, 256)
    ):
        super().__init__()
        widths = tuple(reversed(block_channels))  # decoders go from the widest level down
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        levels = []
        for i, width in enumerate(widths):
            prev = widths[max(i - 1, 0)]
            level = nn.Module()
            level.block = ResnetBlock(prev, width)
            level.upsample = (
                nn.Conv2d(width, width, 3, padding=1) if i < len(widths) - 1 else None
            )  # conv after nearest ×2
            levels.append(level)
        self.levels = nn.ModuleList(levels)
        self.norm_out = _group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    @property
    def scale(self) -> int:
        return 2 ** (len(self.levels) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.levels:
            x = level.block(x)
            if level.upsample is not None:
                x = level.upsample(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(x)))


class MapProjector(nn.Module):
    """1×1-conv projector for the low-level soft contrastive loss (§4.2.2: output 512×16×16).

    Shapes: ``(B, in, g, g) -> (B, out, g, g)``.
    """

    def __init__(self, in_channels: int = 64, hidden_channels: int = 512, out_channels: int = 512):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 1, bias=False),
            nn.GroupNorm(1, hidden_channels),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, hidden_channels, 1, bias=False),
            nn.GroupNorm(1, hidden_channels),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, out_channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
