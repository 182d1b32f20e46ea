"""Shapes and training behaviour of the shared blocks: MLP-Mixer, residual MLP, upsampler, diffusion prior."""

import torch

from fmrirecon.nn import (
    DiffusionPrior,
    LatentUpsampler,
    MapProjector,
    MLPMixerBackbone,
    PriorNetwork,
    ResidualMLP,
)
from fmrirecon.nn.mlp_mixer import TokenProjector


def test_mixer_backbone_and_projector_shapes():
    torch.manual_seed(0)
    backbone = MLPMixerBackbone(hidden_dim=24, out_tokens=5, out_dim=6, n_blocks=2, seq_len=2)
    out = backbone(torch.randn(3, 24))
    assert out.shape == (3, 5, 6)
    assert TokenProjector(6, hidden_dim=10)(out).shape == (3, 5, 6)


def test_residual_mlp_upsampler_projector_shapes():
    torch.manual_seed(0)
    assert ResidualMLP(hidden_dim=16, n_blocks=3)(torch.randn(2, 16)).shape == (2, 16)
    up = LatentUpsampler(in_channels=8, out_channels=4, block_channels=(8, 16, 32))
    assert up.scale == 4
    assert up(torch.randn(2, 8, 4, 4)).shape == (2, 4, 16, 16)
    assert MapProjector(8, 12, 12)(torch.randn(2, 8, 4, 4)).shape == (2, 12, 4, 4)


def test_prior_loss_goes_down_on_toy_problem():
    """Targets are a fixed linear function of the condition: the prior must learn to denoise towards them."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = PriorNetwork(dim=16, num_tokens=3, depth=2, heads=2, dim_head=8)
    prior = DiffusionPrior(net, timesteps=100, cond_drop_prob=0.2, sample_steps=10)
    mix = torch.randn(16, 16, generator=g) / 4
    opt = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    eval_cond = torch.randn(64, 3, 16, generator=g)
    eval_target = eval_cond @ mix

    def eval_loss():
        prior.eval()
        with torch.no_grad():
            return prior.loss(eval_cond, eval_target, generator=torch.Generator().manual_seed(1)).item()

    before = eval_loss()
    prior.train()
    for _ in range(150):
        cond = torch.randn(32, 3, 16, generator=g)
        loss = prior.loss(cond, cond @ mix, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.5 * before
    sample = prior.sample(eval_cond[:4], generator=torch.Generator().manual_seed(2))
    again = prior.sample(eval_cond[:4], generator=torch.Generator().manual_seed(2))
    assert sample.shape == (4, 3, 16) and torch.equal(sample, again)
    # The sampled tokens approach the targets better than the raw condition does.
    assert torch.mean((sample - eval_target[:4]) ** 2) < torch.mean((eval_cond[:4] - eval_target[:4]) ** 2)
