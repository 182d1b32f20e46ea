"""Contrastive losses against hand-computed references (NeuralDiffuser Eq. 1–2)."""

import math

import pytest
import torch

from fmrirecon.nn.losses import clip_loss, mixco, mixco_nce, soft_clip_loss, soft_contrastive_loss


def _norm(x):
    return x / x.norm(dim=-1, keepdim=True)


def _reference_soft_clip(p, c, tau):
    """Eq. 2 written as explicit sums."""
    p, c = _norm(p.double()), _norm(c.double())
    n = len(p)
    total = 0.0
    for i in range(n):
        denom_c = sum(math.exp(float(c[i] @ c[m]) / tau) for m in range(n))
        denom_p = sum(math.exp(float(p[i] @ c[m]) / tau) for m in range(n))
        for j in range(n):
            soft = math.exp(float(c[i] @ c[j]) / tau) / denom_c
            total += soft * math.log(math.exp(float(p[i] @ c[j]) / tau) / denom_p)
    return -total / n


def _reference_mixco(p, c, perm, lam, tau):
    """Eq. 1 with the two directions averaged (as the code does); j = perm(i)."""
    p, c = _norm(p.double()), _norm(c.double())
    n = len(p)
    sim = p @ c.T / tau
    forward = backward = 0.0
    for i in range(n):
        j = int(perm[i])
        log_p_i = sim[i] - torch.logsumexp(sim[i], 0)  # log exp(p_i·c_m/τ)/P_i
        forward += float(lam[i] * log_p_i[i] + (1 - lam[i]) * log_p_i[j])
    # target→brain direction: column-normalised (C_j), soft labels transposed.
    col = sim - torch.logsumexp(sim, 0, keepdim=True)
    probs = torch.diag(lam.double())
    probs[torch.arange(n), perm] += 1 - lam.double()
    backward = float((col * probs).sum())
    return -(forward + backward) / (2 * n)


def test_soft_clip_matches_eq2():
    g = torch.Generator().manual_seed(0)
    p, c = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    got = soft_clip_loss(p, c, temperature=0.5, bidirectional=False)
    assert got.item() == pytest.approx(_reference_soft_clip(p, c, 0.5), rel=1e-5)


def test_soft_clip_bidirectional_is_mean_of_directions():
    g = torch.Generator().manual_seed(1)
    p, c = torch.randn(4, 3, 6, generator=g), torch.randn(4, 3, 6, generator=g)  # token sets are flattened
    one = soft_clip_loss(p, c, 0.3, bidirectional=False)
    both = soft_clip_loss(p, c, 0.3, bidirectional=True)
    pn, cn = _norm(p.flatten(1)), _norm(c.flatten(1))
    logits_t = (pn @ cn.T / 0.3).T
    other = -(logits_t.log_softmax(-1) * (cn @ cn.T / 0.3).softmax(-1)).sum(-1).mean()
    assert both.item() == pytest.approx(((one + other) / 2).item(), rel=1e-5)


def test_mixco_nce_matches_eq1():
    g = torch.Generator().manual_seed(2)
    p, c = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    lam = torch.tensor([1.0, 0.3, 0.9, 1.0, 0.05, 0.6])
    got = mixco_nce(p, c, perm, lam, temperature=0.4)
    assert got.item() == pytest.approx(_reference_mixco(p, c, perm, lam, 0.4), rel=1e-5)


def test_mixco_nce_without_mixing_is_clip_loss():
    g = torch.Generator().manual_seed(3)
    p, c = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    got = mixco_nce(p, c, torch.randperm(5, generator=g), torch.ones(5), temperature=0.2)
    assert got.item() == pytest.approx(clip_loss(p, c, 0.2).item(), rel=1e-6)


def test_clip_loss_prefers_aligned_pairs():
    g = torch.Generator().manual_seed(4)
    c = torch.randn(8, 16, generator=g)
    aligned = clip_loss(c + 0.01 * torch.randn(8, 16, generator=g), c, 0.1)
    shuffled = clip_loss(c[torch.randperm(8, generator=g)], c, 0.1)
    assert aligned < 0.05 < shuffled


def test_mixco_mixes_selected_rows_and_is_seeded():
    x = torch.arange(24.0).view(6, 4)
    mixed, perm, lam, sel = mixco(x, generator=torch.Generator().manual_seed(5))
    again = mixco(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(mixed, again[0]) and torch.equal(perm, again[1])
    expected = x * lam[:, None] + x[perm] * (1 - lam[:, None])
    torch.testing.assert_close(mixed, expected)
    assert torch.all(lam[~sel] == 1) and torch.all((lam >= 0) & (lam <= 1))


def test_soft_contrastive_without_augmentation_equals_bidirectional_soft_clip():
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(5, 2, 3, 3, generator=g), torch.randn(5, 2, 3, 3, generator=g)
    a = soft_contrastive_loss(s, t, temperature=0.2)
    b = soft_clip_loss(s, t, temperature=0.2, bidirectional=True)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_losses_reject_mismatched_batches():
    with pytest.raises(ValueError, match="batch size"):
        soft_clip_loss(torch.randn(3, 4), torch.randn(4, 4))
    with pytest.raises(ValueError, match="feature size"):
        clip_loss(torch.randn(3, 4), torch.randn(3, 5))
