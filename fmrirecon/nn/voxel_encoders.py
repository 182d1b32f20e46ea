"""Subject-specific voxel encoders into one subject-shared space, and encoding of mixed-subject batches.

Every multi-subject decoder starts this way (NeuralDiffuser §4.2.1, MindEye2's shared-subject latent): each
subject's betas ``(B, V_s)`` (voxel counts differ) go through that subject's own linear layer into a
``hidden_dim`` space that everything after it shares, so subjects train together and a new subject needs only
a new encoder.
"""

from __future__ import annotations

import torch
from torch import nn

from fmrirecon.errors import SubjectMismatchError

__all__ = ["SubjectVoxelEncoders", "encode_mixed_batch", "shared_weights", "subject_key"]


def subject_key(subject: int) -> str:
    """Module key of a subject's encoder: ``subj01``."""
    return f"subj{int(subject):02d}"


class SubjectVoxelEncoders(nn.Module):
    """One encoder per subject, voxels → subject-shared space (NeuralDiffuser §4.2.1: one linear layer).

    Args:
        voxel_counts: ``{subject: V_s}``.
        hidden_dim: shared-space width d (paper: 4096).
        bias: linear bias (high-level code: yes; low-level code: no).
        norm_act_dropout: follow the linear layer by LayerNorm → SiLU → Dropout(p) (low-level code: 0.5);
            ``None`` keeps the plain linear layer.

    Shapes: ``betas: (B, V_s)`` with one subject per call → ``(B, hidden_dim)``.
    """

    def __init__(
        self,
        voxel_counts: dict[int, int],
        hidden_dim: int = 4096,
        bias: bool = True,
        norm_act_dropout: float | None = None,
    ):
        super().__init__()
        self.voxel_counts = {int(s): int(v) for s, v in voxel_counts.items()}
        self.hidden_dim = hidden_dim
        self.encoders = nn.ModuleDict()
        for subject, n_voxels in sorted(self.voxel_counts.items()):
            layers: list[nn.Module] = [nn.Linear(n_voxels, hidden_dim, bias=bias)]
            if norm_act_dropout is not None:
                layers += [nn.LayerNorm(hidden_dim), nn.SiLU(), nn.Dropout(norm_act_dropout)]
            self.encoders[subject_key(subject)] = nn.Sequential(*layers)

    def check(self, betas: torch.Tensor, subject: int) -> None:
        if int(subject) not in self.voxel_counts:
            raise SubjectMismatchError(
                f"no voxel encoder for subj{int(subject):02d}; this model has encoders for "
                f"{[subject_key(s) for s in sorted(self.voxel_counts)]}"
            )
        expected = self.voxel_counts[int(subject)]
        if betas.dim() != 2 or betas.shape[1] != expected:
            raise SubjectMismatchError(
                f"betas for subj{int(subject):02d} must be (N, {expected}), got {tuple(betas.shape)} — "
                "were they prepared for another subject or ROI?"
            )

    def forward(self, betas: torch.Tensor, subject: int) -> torch.Tensor:
        self.check(betas, subject)
        return self.encoders[subject_key(subject)](betas)


def _by_subject(subjects: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """Row indices grouped per subject, so mixed-subject batches go through their own encoders."""
    return [(int(s), (subjects == s).nonzero(as_tuple=True)[0]) for s in torch.unique(subjects)]


def encode_mixed_batch(encoders: SubjectVoxelEncoders, betas: list[torch.Tensor], subjects: torch.Tensor):
    """Encode a batch whose rows may come from several subjects (each with its own voxel count).

    Args:
        betas: list of ``(V_s,)`` rows (lengths differ across subjects) or one ``(B, V)`` tensor.
        subjects: ``(B,)`` subject per row.

    Returns:
        ``(B, hidden_dim)`` in the input row order.
    """
    out = None
    for subject, rows in _by_subject(subjects):
        if isinstance(betas, torch.Tensor):
            x = betas[rows]
        else:
            x = torch.stack([betas[int(i)] for i in rows])
        h = encoders(x, subject)
        if out is None:
            out = h.new_zeros(len(subjects), h.shape[1])
        out[rows] = h
    return out


def shared_weights(decoder: nn.Module) -> dict[str, torch.Tensor]:
    """``decoder``'s state dict without its ``voxel_encoders.*`` entries: the subject-shared weights a later
    run starts from (a subject it has not seen gets a new encoder)."""
    return {k: v for k, v in decoder.state_dict().items() if not k.startswith("voxel_encoders.")}
