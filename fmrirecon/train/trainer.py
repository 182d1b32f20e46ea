"""One training loop for every method, on accelerate (STYLE.md §10; nanoGPT ``train.py``, MAE
``engine_pretrain``).

A method hands the :class:`Trainer` an ``nn.Module`` with ``training_step(batch) -> {"loss": tensor, ...}``
and a ``DataLoader``; the trainer owns everything else: AdamW + LR schedule, gradient accumulation, optional
mixed precision, multi-process data parallelism, checkpoints, resume, the JSONL metrics log and the progress
bar.

Run-dir layout written per stage (stages are named, e.g. ``pretrain``, ``finetune``, and resume
independently)::

    RUN/<stage>/metrics.jsonl                       one line per optimiser step: step, epoch, lr, losses
    RUN/<stage>/checkpoints/step_00000100.safetensors   model.* + optim.state.{param_idx}.{name} tensors
    RUN/<stage>/checkpoints/step_00000100.json          step/epoch/batch, optimiser param_groups, scheduler,
                                                        stage TrainConfig and the run's resolved config
    RUN/<stage>/checkpoints/step_00000100.rng{rank}.safetensors / .json   per-process RNG states
    RUN/<stage>/model.safetensors + done.json       final weights once the stage has finished

Example::

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.1), nn.Linear(16, 1))

        def training_step(self, batch):                       # batch from the DataLoader, on the device
            return {"loss": F.mse_loss(self.net(batch["x"]).squeeze(-1), batch["y"])}

    trainer = Trainer(TrainConfig(epochs=3, lr=1e-3, checkpoint_every=10), run_dir, seed=0)
    result = trainer.fit(Tiny(), DataLoader(dataset, batch_size=4, shuffle=True), stage="pretrain")
    # calling fit again with the same run_dir resumes from the last checkpoint (or returns a finished stage)

A module may define ``parameter_groups() -> list[dict]`` (each ``{"params": [...], "lr_scale": float,
"weight_decay": float}``, both optional) to train only part of itself or to give parts their own learning
rate; otherwise every parameter with ``requires_grad`` is trained (freeze a submodule with
``requires_grad_(False)``). Datasets should be deterministic per index (no global-RNG augmentation) for
bitwise-identical resume.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fmrirecon.config import config_to_dict, diff_configs
from fmrirecon.errors import ConfigError, FmriReconError
from fmrirecon.io import read_json, save_safetensors_atomic, write_json_atomic, write_text_atomic
from fmrirecon.train import checkpoint as ckpt

__all__ = ["TrainConfig", "Trainer", "TrainingDivergedError", "TrainResult"]

# TrainConfig keys that may change between an interrupted run and its resumption (no effect on numerics).
_RESUME_FREE_KEYS = ("progress", "tensorboard", "keep_checkpoints")


class TrainingDivergedError(FmriReconError):
    """A loss became NaN or infinite; training stops instead of writing garbage weights."""


@dataclass
class TrainConfig:
    """Optimisation settings of one training stage.

    Attributes:
        epochs: passes over the training loader (ignored when ``max_steps`` is set).
        max_steps: total optimiser steps; overrides ``epochs``.
        lr: peak learning rate (AdamW).
        weight_decay, betas, eps: AdamW hyper-parameters.
        schedule: ``"onecycle"`` (torch ``OneCycleLR``, cosine annealing, as in MindEye / NeuralDiffuser),
            ``"cosine"`` (linear warm-up over ``warmup_steps`` then cosine decay to ``min_lr_ratio * lr``) or
            ``"constant"`` (after the same warm-up).
        pct_start: fraction of steps spent increasing the LR in ``"onecycle"``.
        div_factor, final_div_factor: ``OneCycleLR`` initial (``lr / div_factor``) and final LR divisors.
        warmup_steps: linear warm-up length for ``"cosine"`` and ``"constant"``.
        min_lr_ratio: final LR of ``"cosine"`` as a fraction of ``lr``.
        grad_accum: micro-batches per optimiser step.
        max_grad_norm: clip the global gradient norm to this value (None = no clipping).
        mixed_precision: accelerate's ``"no"``, ``"fp16"`` or ``"bf16"``.
        checkpoint_every: save a checkpoint every N optimiser steps (0 = only at the end of the stage).
        keep_checkpoints: how many step checkpoints to keep (older ones are deleted).
        log_every: write a metrics line every N optimiser steps.
        tensorboard: also log to ``RUN/<stage>/tensorboard`` (needs the ``tensorboard`` package).
        progress: show a tqdm progress bar on the main process.
        find_unused_parameters: passed to DistributedDataParallel (needed when a step skips trainable params).
    """

    epochs: int = 1
    max_steps: int | None = None
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    pct_start: float = 0.1
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    max_grad_norm: float | None = None
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 1
    tensorboard: bool = False
    progress: bool = True
    find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.checkpoint_every < 0 or self.warmup_steps < 0:
            raise ValueError("checkpoint_every and warmup_steps must be >= 0")
        if not 0.0 < self.pct_start < 1.0:
            raise ValueError(f"pct_start must lie in (0, 1), got {self.pct_start}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` did: the stage, its optimiser steps, and the last logged losses."""

    stage: str
    steps: int
    epochs_completed: float
    last_losses: dict[str, float] = field(default_factory=dict)
    resumed_from: int | None = None
    already_done: bool = False


class _StepModule(nn.Module):
    """Routes ``forward`` to ``training_step`` so DistributedDataParallel sees (and syncs) the step."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        return self.module.training_step(batch)


def _cosine_lambda(warmup: int, total: int, min_ratio: float, constant: bool):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if constant:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class Trainer:
    """Train a module stage by stage with checkpoints and resume.

    Args:
        config: the stage's :class:`TrainConfig`.
        run_dir: the run folder; stage outputs go to ``run_dir/<stage>/``.
        seed: seeds Python, numpy and torch at the start of a stage, and the data order (epoch e uses
            seed + e).
        run_config: the run's fully resolved config (a dict or dataclass), stored in every checkpoint; a
            resume with a different one raises :class:`ConfigError`.
    """

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | Path,
        *,
        seed: int = 0,
        run_config: Mapping[str, Any] | Any | None = None,
    ):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.config = config
        self.run_dir = Path(run_dir)
        self.seed = int(seed)
        if run_config is not None and not isinstance(run_config, Mapping):
            run_config = config_to_dict(run_config)
        self.run_config = json.loads(json.dumps(run_config)) if run_config is not None else None
        self.accelerator = None

    # ------------------------------------------------------------------ public
    def fit(
        self, module: nn.Module, train_loader: torch.utils.data.DataLoader, stage: str = "pretrain"
    ) -> TrainResult:
        """Run, resume or (if finished) reload one named stage; ``module`` ends with the stage's weights.

        Args:
            module: defines ``training_step(batch) -> dict[str, scalar tensor]`` with a ``"loss"`` entry.
            train_loader: yields the batches ``training_step`` takes (moved to the device for you).
            stage: stage name, a folder under the run dir.

        Raises:
            TrainingDivergedError: a loss is NaN/inf (message names stage, step and all losses).
            ConfigError: the stage was started with another TrainConfig / run config.
        """
        from accelerate import Accelerator, DataLoaderConfiguration
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedDataParallelKwargs, set_seed
        from tqdm.auto import tqdm

        if not hasattr(module, "training_step"):
            raise TypeError(f"{type(module).__name__} has no training_step(batch) -> dict of losses")
        if not stage or "/" in stage or stage.startswith("."):
            raise ValueError(f"stage must be a plain folder name, got {stage!r}")
        cfg = self.config
        stage_dir = self.run_dir / stage
        ckpt_dir = stage_dir / "checkpoints"
        train_cfg_dict = config_to_dict(cfg)

        accelerator_kwargs = dict(
            # `accelerate launch --multi_gpu` on a machine without GPUs: accelerate only sets up gloo
            # data parallelism when told to run on CPU.
            cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
            gradient_accumulation_steps=cfg.grad_accum,
            mixed_precision=cfg.mixed_precision,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=self.seed),
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[
                DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)
            ],
        )
        if AcceleratorState._shared_state.get("_mixed_precision", cfg.mixed_precision) != cfg.mixed_precision:
            # Stages may differ in precision; accelerate keeps one process-wide state, so drop it (the
            # process group, held by PartialState, survives).
            AcceleratorState._reset_state()
        accelerator = Accelerator(**accelerator_kwargs)
        self.accelerator = accelerator
        is_main = accelerator.is_main_process

        done_file = stage_dir / "done.json"
        if done_file.is_file():
            done = read_json(done_file)
            self._check_same_config(done, done_file)
            from safetensors.torch import load_file

            module.load_state_dict(load_file(str(stage_dir / "model.safetensors")), strict=True)
            return TrainResult(
                stage, done["step"], done["epochs_completed"], done.get("last_losses", {}), already_done=True
            )

        set_seed(self.seed)
        groups = self._param_groups(module)
        optimizer = torch.optim.AdamW(
            groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
        wrapped, optimizer, loader = accelerator.prepare(_StepModule(module), optimizer, train_loader)
        batches_per_epoch = len(loader)
        if batches_per_epoch == 0:
            raise ValueError(f"stage '{stage}': the training loader yields no batches on this process")
        steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
        total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
        scheduler = self._make_scheduler(optimizer, groups, total_steps)

        step, epoch, batch_in_epoch = 0, 0, 0
        pending_rng = None
        resumed_from = None
        latest = self._latest_checkpoint(ckpt_dir)
        if latest is not None:
            meta = read_json(latest.with_suffix(".json"))
            self._check_same_config(meta, latest.with_suffix(".json"))
            from safetensors.torch import load_file

            tensors = load_file(str(latest))
            ckpt.load_model_tensors(accelerator.unwrap_model(wrapped).module, tensors)
            optimizer.load_state_dict(ckpt.optimizer_from_flat(tensors, meta["optimizer"]))
            scheduler.load_state_dict(meta["scheduler"])
            step, epoch, batch_in_epoch = meta["step"], meta["epoch"], meta["batch_in_epoch"]
            pending_rng = self._read_rng(latest, accelerator.process_index)
            resumed_from = step
        metrics_file = stage_dir / "metrics.jsonl"
        if is_main:
            stage_dir.mkdir(parents=True, exist_ok=True)
            self._truncate_metrics(metrics_file, step)
        writer = self._tensorboard(stage_dir) if (cfg.tensorboard and is_main) else None

        bar = tqdm(
            total=total_steps,
            initial=step,
            desc=f"train {stage}",
            disable=not (is_main and cfg.progress),
            dynamic_ncols=True,
        )
        window: dict[str, list[float]] = {}
        last_losses: dict[str, float] = {}
        t0 = time.time()
        saved_at = step if latest is not None else None

        def save():  # the loop's current position (step, epoch, batch_in_epoch) at the time of the call
            self._save(
                accelerator,
                wrapped,
                optimizer,
                scheduler,
                ckpt_dir,
                step,
                epoch,
                batch_in_epoch,
                train_cfg_dict,
                stage,
            )

        params = [p for g in optimizer.param_groups for p in g["params"]]
        while step < total_steps:
            if batch_in_epoch >= batches_per_epoch:
                epoch, batch_in_epoch = epoch + 1, 0
            mid_epoch = batch_in_epoch > 0
            if pending_rng is not None and not mid_epoch:
                ckpt.set_rng_state(*pending_rng)
                pending_rng = None
            loader.set_epoch(epoch)
            epoch_loader = accelerator.skip_first_batches(loader, batch_in_epoch) if mid_epoch else loader
            # The accumulation counter restarts with each (partial) pass, as after a full one.
            accelerator.step = 0
            for batch in epoch_loader:
                if pending_rng is not None:
                    # The loader drew its worker base seed from the global RNG when the epoch began,
                    # before the checkpointed steps: restore the RNG after that draw, where the run stopped.
                    ckpt.set_rng_state(*pending_rng)
                    pending_rng = None
                with accelerator.accumulate(wrapped):
                    losses = wrapped(batch)
                    loss_values = self._check_losses(losses, accelerator, stage, step, epoch, batch_in_epoch)
                    accelerator.backward(losses["loss"])
                    if accelerator.sync_gradients and cfg.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for name, value in loss_values.items():
                    window.setdefault(name, []).append(value)
                batch_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                step += 1
                last_losses = {k: sum(v) / len(v) for k, v in window.items()}
                window = {}
                if is_main and step % cfg.log_every == 0:
                    record = {
                        "step": step,
                        "epoch": epoch + batch_in_epoch / batches_per_epoch,
                        "lr": lr,
                        **last_losses,
                        "time": round(time.time() - t0, 3),
                    }
                    with open(metrics_file, "a", encoding="utf-8") as f:
                        f.write(json.dumps(record) + "\n")
                    if writer is not None:
                        for k, v in last_losses.items():
                            writer.add_scalar(f"{stage}/{k}", v, step)
                        writer.add_scalar(f"{stage}/lr", lr, step)
                bar.update(1)
                bar.set_postfix(loss=f"{last_losses['loss']:.4g}")
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    save()
                    saved_at = step
                if step >= total_steps:
                    if batch_in_epoch < batches_per_epoch and hasattr(epoch_loader, "end"):
                        # leaving a pass early: unregister the loader from accelerate's gradient state, as
                        # the end of a pass would, so that the next stage's accumulation is not confused
                        epoch_loader.end()
                    break
        bar.close()
        if writer is not None:
            writer.close()
        if saved_at != step:
            save()
        epochs_completed = epoch + batch_in_epoch / batches_per_epoch
        accelerator.wait_for_everyone()
        if is_main:
            save_safetensors_atomic(
                {
                    k[len(ckpt.MODEL_PREFIX) :]: v
                    for k, v in ckpt.model_tensors(accelerator.unwrap_model(wrapped).module).items()
                },
                stage_dir / "model.safetensors",
            )
            write_json_atomic(
                done_file,
                {
                    "stage": stage,
                    "step": step,
                    "epochs_completed": epochs_completed,
                    "last_losses": last_losses,
                    "train_config": train_cfg_dict,
                    "run_config": self.run_config,
                    "seed": self.seed,
                },
            )
        accelerator.wait_for_everyone()
        return TrainResult(stage, step, epochs_completed, last_losses, resumed_from=resumed_from)

    # ----------------------------------------------------------------- helpers
    def _param_groups(self, module: nn.Module) -> list[dict[str, Any]]:
        cfg = self.config
        if hasattr(module, "parameter_groups"):
            groups = []
            for i, group in enumerate(module.parameter_groups()):
                group = dict(group)
                params = [p for p in group.pop("params") if p.requires_grad]
                unknown = set(group) - {"lr_scale", "weight_decay"}
                if unknown:
                    raise ValueError(
                        f"parameter group {i}: unknown keys {sorted(unknown)} (use lr_scale, weight_decay)"
                    )
                groups.append(
                    {
                        "params": params,
                        "lr": cfg.lr * group.get("lr_scale", 1.0),
                        "weight_decay": group.get("weight_decay", cfg.weight_decay),
                    }
                )
        else:
            groups = [
                {
                    "params": [p for p in module.parameters() if p.requires_grad],
                    "lr": cfg.lr,
                    "weight_decay": cfg.weight_decay,
                }
            ]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ValueError(
                f"{type(module).__name__} has no trainable parameters (all have requires_grad=False)"
            )
        return groups

    def _make_scheduler(self, optimizer, groups, total_steps: int):
        cfg = self.config
        if cfg.schedule == "onecycle":
            # OneCycleLR needs at least one step in each phase; very short runs get a longer warm-up fraction.
            total = max(total_steps, 3)
            return torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=[g["lr"] for g in groups],
                total_steps=total,
                pct_start=min(0.5, max(cfg.pct_start, 1.5 / total)),
                div_factor=cfg.div_factor,
                final_div_factor=cfg.final_div_factor,
            )
        factor = _cosine_lambda(cfg.warmup_steps, total_steps, cfg.min_lr_ratio, cfg.schedule == "constant")
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def _check_losses(self, losses, accelerator, stage, step, epoch, batch) -> dict[str, float]:
        if not isinstance(losses, Mapping) or "loss" not in losses:
            raise TypeError(
                f"training_step must return a dict with a 'loss' entry, got {type(losses).__name__}"
                f"{' with keys ' + str(sorted(losses)) if isinstance(losses, Mapping) else ''}"
            )
        names = list(losses)
        stacked = torch.stack([torch.as_tensor(losses[k]).detach().float().reshape(()) for k in names])
        stacked = accelerator.reduce(stacked.to(accelerator.device), reduction="mean")
        values = dict(zip(names, stacked.tolist()))
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            raise TrainingDivergedError(
                f"stage '{stage}': non-finite loss at optimiser step {step + 1} "
                f"(epoch {epoch}, batch {batch}): "
                f"{values}; expected finite values — lower the learning rate (now {self.config.lr}), set "
                f"max_grad_norm, or check the input data; the last checkpoint is kept under "
                f"{self.run_dir / stage / 'checkpoints'}"
            )
        return values

    def _check_same_config(self, meta: Mapping[str, Any], path: Path) -> None:
        new_train = {k: v for k, v in config_to_dict(self.config).items() if k not in _RESUME_FREE_KEYS}
        old_train = {k: v for k, v in meta["train_config"].items() if k not in _RESUME_FREE_KEYS}
        diffs = [f"train.{d}" for d in diff_configs(old_train, new_train)]
        if self.run_config is not None and meta.get("run_config") is not None:
            diffs += diff_configs(meta["run_config"], self.run_config)
        if meta.get("seed", self.seed) != self.seed:
            diffs.append(f"seed: {meta['seed']} -> {self.seed}")
        if diffs:
            raise ConfigError(
                f"cannot resume {path.parent if path.name == 'done.json' else path}: it was written with a "
                f"different config ({'; '.join(diffs)}); use a new run dir or the original config"
            )

    @staticmethod
    def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
        if not ckpt_dir.is_dir():
            return None
        complete = [
            p.with_suffix(".safetensors")
            for p in ckpt_dir.glob("step_*.json")
            if ".rng" not in p.name and p.with_suffix(".safetensors").is_file()
        ]
        return max(complete, key=lambda p: int(p.stem.split("_")[1])) if complete else None

    @staticmethod
    def _read_rng(latest: Path, rank: int):
        from safetensors.torch import load_file

        name = latest.stem
        candidates = [rank, 0]
        for r in candidates:
            t, j = latest.parent / f"{name}.rng{r}.safetensors", latest.parent / f"{name}.rng{r}.json"
            if t.is_file() and j.is_file():
                return load_file(str(t)), read_json(j)
        raise ConfigError(f"checkpoint {latest} has no RNG state file {name}.rng{rank}.safetensors")

    @staticmethod
    def _truncate_metrics(metrics_file: Path, step: int) -> None:
        """Keep only lines up to the resumed step, so a resumed run's log equals an uninterrupted one's."""
        if not metrics_file.is_file():
            return
        kept = [
            line
            for line in metrics_file.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        write_text_atomic(metrics_file, "".join(line + "\n" for line in kept))

    def _tensorboard(self, stage_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ConfigError(
                "train.tensorboard=true needs the 'tensorboard' package (pip install tensorboard)"
            ) from err
        return SummaryWriter(str(stage_dir / "tensorboard"))

    def _save(
        self,
        accelerator,
        wrapped,
        optimizer,
        scheduler,
        ckpt_dir,
        step,
        epoch,
        batch_in_epoch,
        train_cfg_dict,
        stage,
    ) -> None:
        name = f"step_{step:08d}"
        accelerator.wait_for_everyone()
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        rank = accelerator.process_index
        rng_tensors, rng_meta = ckpt.rng_state()
        save_safetensors_atomic(rng_tensors, ckpt_dir / f"{name}.rng{rank}.safetensors")
        write_json_atomic(ckpt_dir / f"{name}.rng{rank}.json", rng_meta)
        if accelerator.is_main_process:
            tensors = ckpt.model_tensors(accelerator.unwrap_model(wrapped).module)
            optim_tensors, optim_meta = ckpt.optimizer_to_flat(optimizer.state_dict())
            tensors.update(optim_tensors)
            save_safetensors_atomic(
                tensors, ckpt_dir / f"{name}.safetensors", {"format": "fmrirecon-checkpoint"}
            )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # The JSON is written last: a checkpoint counts as complete only once it exists.
            write_json_atomic(
                ckpt_dir / f"{name}.json",
                {
                    "stage": stage,
                    "step": step,
                    "epoch": epoch,
                    "batch_in_epoch": batch_in_epoch,
                    "seed": self.seed,
                    "num_processes": accelerator.num_processes,
                    "optimizer": optim_meta,
                    "scheduler": scheduler.state_dict(),
                    "train_config": train_cfg_dict,
                    "run_config": self.run_config,
                },
            )
            steps = sorted(
                int(p.stem.split("_")[1]) for p in ckpt_dir.glob("step_*.json") if ".rng" not in p.name
            )
            for old in steps[: -self.config.keep_checkpoints]:
                for p in ckpt_dir.glob(f"step_{old:08d}.*"):
                    p.unlink(missing_ok=True)
        accelerator.wait_for_everyone()
