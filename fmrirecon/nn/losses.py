"""Contrastive losses shared by the fMRI decoders: CLIP/InfoNCE, MixCo (BiMixCo), SoftCLIP and soft contrast.

All losses take row-aligned batches ``preds: (B, D)`` and ``targets: (B, D)`` (token sets are flattened by the
caller or here, ``(B, T, D) -> (B, T*D)``) and L2-normalise them first (the ``*`` of NeuralDiffuser Eq. 1–2).

References: CLIP (Radford et al. 2021); MixCo (Kim et al. 2020, NeuralDiffuser ref. [42]); the bidirectional
MixCo and SoftCLIP losses of MindEye (Scotti et al. 2023), used by NeuralDiffuser §4.2.2 Eq. 1–2.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _normalised_pair(preds: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if preds.shape[0] != targets.shape[0]:
        raise ValueError(
            f"preds and targets must have the same batch size, got {preds.shape[0]} and {targets.shape[0]}"
        )
    preds, targets = preds.flatten(1), targets.flatten(1)
    if preds.shape[1] != targets.shape[1]:
        raise ValueError(
            f"preds and targets must have the same feature size, got {preds.shape[1]} and {targets.shape[1]}"
        )
    return F.normalize(preds.float(), dim=-1), F.normalize(targets.float(), dim=-1)


def clip_loss(
    preds: torch.Tensor, targets: torch.Tensor, temperature: float = 0.006, bidirectional: bool = True
) -> torch.Tensor:
    """InfoNCE / CLIP loss with the matching row as the only positive.

    Args:
        preds: ``(B, ...)`` brain-side embeddings.
        targets: ``(B, ...)`` image/text-side embeddings, row ``i`` pairs with ``preds[i]``.
        temperature: τ (MindEye's default 0.006 for 768-d CLIP tokens).
        bidirectional: average the brain→target and target→brain cross-entropies.

    Returns:
        scalar loss.
    """
    preds, targets = _normalised_pair(preds, targets)
    logits = preds @ targets.T / temperature  # (B, B)
    labels = torch.arange(len(logits), device=logits.device)
    loss = F.cross_entropy(logits, labels)
    if bidirectional:
        loss = (loss + F.cross_entropy(logits.T, labels)) / 2
    return loss


def mixco(
    voxels: torch.Tensor,
    beta: float = 0.15,
    select_prob: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix voxel inputs for MixCo (ref. [42]): ``v_i ← λ_i v_i + (1 − λ_i) v_perm(i)`` for a random subset.

    Args:
        voxels: ``(B, ...)`` inputs (betas or shared-space embeddings).
        beta: λ ~ Beta(beta, beta) per sample (MindEye: 0.15).
        select_prob: probability that a sample is mixed at all; unmixed samples get λ = 1.
        generator: for reproducible mixing.

    Returns:
        ``(mixed (B, ...), perm (B,) long, lambdas (B,), selected (B,) bool)``.
    """
    batch = voxels.shape[0]
    device = voxels.device
    perm = torch.randperm(batch, generator=generator).to(device)
    # torch's Beta sampler takes no generator; draw λ from numpy seeded by the torch generator instead.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lambdas = torch.from_numpy(np.random.default_rng(seed).beta(beta, beta, size=batch))
    lambdas = lambdas.to(device=device, dtype=voxels.dtype)
    selected = (torch.rand(batch, generator=generator) <= select_prob).to(device)
    lambdas = torch.where(selected, lambdas, torch.ones_like(lambdas))
    shape = (batch,) + (1,) * (voxels.dim() - 1)
    mixed = voxels * lambdas.view(shape) + voxels[perm] * (1 - lambdas.view(shape))
    return mixed, perm, lambdas, selected


def mixco_nce(
    preds: torch.Tensor,
    targets: torch.Tensor,
    perm: torch.Tensor,
    lambdas: torch.Tensor,
    temperature: float = 0.006,
    bidirectional: bool = True,
) -> torch.Tensor:
    """BiMixCo loss, NeuralDiffuser Eq. 1: soft targets ``λ_i`` on ``c_i`` and ``1 − λ_i`` on ``c_perm(i)``.

    Eq. 1 as printed sums the two directions; like the authors' (MindEye-derived) code we average them, which
    only halves the loss and keeps α = 30 (Eq. 3) at the value the code was tuned with.

    Args:
        preds: ``(B, ...)`` projector outputs ``p`` computed from mixed voxels.
        targets: ``(B, ...)`` unmixed targets ``c``.
        perm, lambdas: from :func:`mixco`.

    Returns:
        scalar loss.
    """
    preds, targets = _normalised_pair(preds, targets)
    logits = preds @ targets.T / temperature  # (B, B)
    probs = torch.diag(lambdas.float())
    probs[torch.arange(len(preds), device=preds.device), perm] += 1 - lambdas.float()
    loss = -(logits.log_softmax(-1) * probs).sum(-1).mean()
    if bidirectional:
        loss = (loss - (logits.T.log_softmax(-1) * probs.T).sum(-1).mean()) / 2
    return loss


def soft_clip_loss(
    preds: torch.Tensor, targets: torch.Tensor, temperature: float = 0.006, bidirectional: bool = True
) -> torch.Tensor:
    """SoftCLIP, NeuralDiffuser Eq. 2: cross-entropy to the target–target similarity distribution.

    ``L = −1/N Σ_i Σ_j softmax_j(c_i*·c_j*/τ) · log softmax_j(p_i*·c_j*/τ)``. ``bidirectional=False`` is Eq. 2
    exactly; ``True`` (the authors' code) averages it with the same term on the transposed logits.

    Args:
        preds: ``(B, ...)`` projector outputs ``p``.
        targets: ``(B, ...)`` targets ``c``.

    Returns:
        scalar loss.
    """
    preds, targets = _normalised_pair(preds, targets)
    target_probs = (targets @ targets.T / temperature).softmax(-1)  # (B, B)
    logits = preds @ targets.T / temperature
    loss = -(logits.log_softmax(-1) * target_probs).sum(-1).mean()
    if bidirectional:
        loss = (loss - (logits.T.log_softmax(-1) * target_probs).sum(-1).mean()) / 2
    return loss


def soft_contrastive_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    teacher_aug: torch.Tensor | None = None,
    temperature: float = 0.2,
) -> torch.Tensor:
    """Soft contrastive loss of the low-level pipeline (§4.2.2, Eq. 4's L_soft; MindEye's ``soft_cont_loss``).

    Soft labels come from teacher–teacher similarities (``teacher`` against an augmented view ``teacher_aug``;
    the un-augmented view when none is given, which reduces to bidirectional :func:`soft_clip_loss`).

    Args:
        student: ``(B, ...)`` projector outputs.
        teacher, teacher_aug: ``(B, ...)`` fixed target features.

    Returns:
        scalar loss.
    """
    teacher_aug = teacher if teacher_aug is None else teacher_aug
    student, teacher = _normalised_pair(student, teacher)
    teacher_aug = F.normalize(teacher_aug.flatten(1).float(), dim=-1)
    teacher_teacher = teacher @ teacher_aug.T / temperature
    student_teacher = student @ teacher_aug.T / temperature
    student_teacher_t = teacher_aug @ student.T / temperature
    loss1 = -(student_teacher.log_softmax(-1) * teacher_teacher.softmax(-1)).sum(-1).mean()
    loss2 = -(student_teacher_t.log_softmax(-1) * teacher_teacher.T.softmax(-1)).sum(-1).mean()
    return (loss1 + loss2) / 2
