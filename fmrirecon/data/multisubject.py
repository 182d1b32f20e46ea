"""Multi-subject training data: single trials of several subjects (different voxel counts) with one target per
trial, and the collation that keeps such batches intact. Used by pretraining runs over many subjects
(NeuralDiffuser §4.2.3; the same shape serves any method with per-subject voxel encoders,
:class:`fmrirecon.nn.SubjectVoxelEncoders`)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["MultiSubjectTrials", "collate_subjects"]


class MultiSubjectTrials(Dataset):
    """Single-trial betas of one or more subjects paired with one target tensor per trial.

    Args:
        parts: ``(subject, betas (T_s, V_s), image ids_73k (T_s,))`` per subject.
        targets: ``(M, ...)`` one row per image, rows in the order of ``target_ids (M,)``.

    Items: ``{"betas": float32 (V_s,), "subject": int, "target": targets[row]}``; deterministic per index.
    """

    def __init__(self, parts: list[tuple[int, np.ndarray, np.ndarray]], targets: torch.Tensor, target_ids):
        index = {int(i): r for r, i in enumerate(np.asarray(target_ids))}
        self.items = []
        for subject, betas, ids in parts:
            missing = [int(i) for i in ids if int(i) not in index]
            if missing:
                raise ValueError(
                    f"subj{subject:02d}: no target for image ids {missing[:5]} (of {len(missing)})"
                )
            rows = np.array([index[int(i)] for i in ids])
            self.items += [(subject, betas, k, rows[k]) for k in range(len(ids))]
        self.targets = targets

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        subject, betas, k, row = self.items[i]
        return {"betas": torch.from_numpy(betas[k]), "subject": subject, "target": self.targets[row]}


def collate_subjects(items: list[dict]) -> dict:
    """Batch items of :class:`MultiSubjectTrials`: ``betas (B, V)`` when every item has the same voxel count,
    else a list of ``(V_s,)`` (mixed subjects); ``subject (B,)``; ``target (B, ...)``."""
    lengths = {len(it["betas"]) for it in items}
    betas = [it["betas"] for it in items]
    return {
        "betas": torch.stack(betas) if len(lengths) == 1 else betas,
        "subject": torch.tensor([it["subject"] for it in items]),
        "target": torch.stack([it["target"] for it in items]),
    }
