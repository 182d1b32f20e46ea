"""Stage running for decoders trained on ``(betas, subject, target)`` batches: one named, resumable
:class:`~fmrirecon.train.Trainer` stage per call.

A decoder here is an ``nn.Module`` with ``loss(betas, subject, target, progress=p) -> dict of losses`` (a
``"loss"`` entry): ``betas`` one ``(B, V)`` tensor or, for mixed subjects with different voxel counts, a list
of ``(V_s,)`` rows; ``subject (B,)``; ``target (B, ...)``; ``progress`` in ``[0, 1)``, the fraction of the
stage's micro-batches already seen (for losses that change over training, e.g. NeuralDiffuser's BiMixCo →
SoftCLIP switch after the first third, §4.2.2).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["DecoderTrainingStep", "run_stage"]


class DecoderTrainingStep(nn.Module):
    """Wraps a decoder for the :class:`~fmrirecon.train.Trainer`.

    Keeps the micro-batch counter as a buffer (so it is checkpointed and a resumed stage continues with the
    same progress) and passes the training progress to the decoder's loss.
    """

    def __init__(self, decoder: nn.Module, total_batches: int):
        super().__init__()
        self.decoder = decoder
        self.total_batches = max(1, int(total_batches))
        self.register_buffer("seen_batches", torch.zeros((), dtype=torch.long))

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        progress = float(self.seen_batches) / self.total_batches
        out = self.decoder.loss(batch["betas"], batch["subject"], batch["target"], progress=progress)
        self.seen_batches += 1
        return out


def run_stage(
    decoder: nn.Module,
    dataset: Dataset,
    train_config,
    run_dir: str | Path,
    stage: str,
    batch_size: int,
    seed: int,
    run_config=None,
    *,
    collate_fn: Callable[[list], dict] | None = None,
):
    """Train ``decoder`` on ``dataset`` as the stage ``RUN/<stage>`` (resumes; a finished stage reloads).

    Args:
        train_config: the stage's :class:`~fmrirecon.train.TrainConfig`.
        batch_size: items per micro-batch (the whole dataset when it is smaller); the last partial batch is
            dropped, as the methods' code does.
        run_config: the run's resolved config, stored in every checkpoint.
        collate_fn: builds a batch dict from items (mixed-subject data needs one that keeps betas a list).

    Returns:
        the trainer's :class:`~fmrirecon.train.TrainResult`.
    """
    from fmrirecon.train import Trainer

    loader = DataLoader(
        dataset, batch_size=min(batch_size, len(dataset)), shuffle=True, drop_last=True, collate_fn=collate_fn
    )
    total = (
        train_config.max_steps * train_config.grad_accum
        if train_config.max_steps
        else (len(loader) * train_config.epochs)
    )
    step = DecoderTrainingStep(decoder, total)
    return Trainer(train_config, run_dir, seed=seed, run_config=run_config).fit(step, loader, stage=stage)
