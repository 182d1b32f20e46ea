"""The shared trainer: ``Trainer(TrainConfig, run_dir).fit(module, train_loader, stage)`` (see
``trainer.py``)."""

from fmrirecon.train.trainer import TrainConfig, Trainer, TrainingDivergedError, TrainResult

__all__ = ["TrainConfig", "Trainer", "TrainResult", "TrainingDivergedError"]
