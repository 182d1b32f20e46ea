"""The shared trainer: loss goes down, bitwise-identical resume, checkpoints without pickle, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

import fmrirecon.train.trainer as trainer_module
from fmrirecon.errors import ConfigError
from fmrirecon.train import TrainConfig, Trainer, TrainingDivergedError


class PlantedRegression(Dataset):
    """37 samples (not a multiple of the batch size, so epochs end on a partial batch) of y = x·w."""

    def __init__(self, n: int = 37, dim: int = 8):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.randn(dim, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


class TinyNet(nn.Module):
    """MLP with dropout, so resume must restore the RNG to be bitwise identical."""

    def __init__(self, dim: int = 8, hidden: int = 16, nan_at_call: int | None = None):
        super().__init__()
        self.encoder = nn.Linear(dim, hidden)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(hidden, 1)
        self.nan_at_call = nan_at_call
        self.calls = 0

    def training_step(self, batch):
        self.calls += 1
        pred = self.head(self.dropout(torch.relu(self.encoder(batch["x"])))).squeeze(-1)
        loss = F.mse_loss(pred, batch["y"])
        if self.nan_at_call is not None and self.calls >= self.nan_at_call:
            loss = loss * float("nan")
        return {"loss": loss, "mae": (pred - batch["y"]).abs().mean()}


def make_loader() -> DataLoader:
    return DataLoader(PlantedRegression(), batch_size=4, shuffle=True)


def make_model(seed: int = 0, **kwargs) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kwargs)


CONFIG = TrainConfig(epochs=3, lr=1e-2, checkpoint_every=1, grad_accum=2, progress=False)


class Interrupt(Exception):
    pass


def run_interrupted(monkeypatch, run_dir, config, stop_after_step: int):
    """Train until the checkpoint at ``stop_after_step`` is written, then raise as a crash would."""
    original = trainer_module.Trainer._save

    def save_then_crash(self, accelerator, wrapped, optimizer, scheduler, ckpt_dir, step, *args):
        original(self, accelerator, wrapped, optimizer, scheduler, ckpt_dir, step, *args)
        if step >= stop_after_step:
            raise Interrupt

    monkeypatch.setattr(trainer_module.Trainer, "_save", save_then_crash)
    with pytest.raises(Interrupt):
        Trainer(config, run_dir, seed=0).fit(make_model(), make_loader(), stage="pretrain")
    monkeypatch.setattr(trainer_module.Trainer, "_save", original)


def test_loss_goes_down_and_metrics_are_logged_per_step(tmp_path):
    config = TrainConfig(epochs=20, lr=3e-2, schedule="cosine", warmup_steps=5, progress=False)
    result = Trainer(config, tmp_path, seed=0).fit(make_model(), make_loader(), stage="pretrain")
    lines = [json.loads(x) for x in (tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 20 * 10  # 37 samples / batch 4 -> 10 batches per epoch
    assert [r["step"] for r in lines] == list(range(1, 201))
    first, last = sum(r["loss"] for r in lines[:10]) / 10, sum(r["loss"] for r in lines[-10:]) / 10
    assert last < 0.2 * first
    assert set(lines[0]) >= {"step", "epoch", "lr", "loss", "mae"}
    assert lines[0]["lr"] == pytest.approx(3e-2 / 5)  # first warm-up step


@pytest.mark.parametrize("stop_after_step", [3, 5, 6])  # mid-epoch (odd batch), epoch boundary, mid-epoch
def test_resume_is_bitwise_identical_to_uninterrupted_run(tmp_path, monkeypatch, stop_after_step):
    reference = make_model()
    Trainer(CONFIG, tmp_path / "straight", seed=0).fit(reference, make_loader(), stage="pretrain")

    run_dir = tmp_path / "resumed"
    run_interrupted(monkeypatch, run_dir, CONFIG, stop_after_step)
    resumed = make_model(seed=123)  # fresh, differently initialised: everything must come from the checkpoint
    result = Trainer(CONFIG, run_dir, seed=0).fit(resumed, make_loader(), stage="pretrain")

    assert result.resumed_from == stop_after_step
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    straight = (tmp_path / "straight" / "pretrain" / "metrics.jsonl").read_text().splitlines()
    again = (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(x).items() if k != "time"} for x in straight]
    assert strip == [{k: v for k, v in json.loads(x).items() if k != "time"} for x in again]


def test_checkpoint_holds_model_optimizer_rng_and_config_without_pickle(tmp_path):
    config = TrainConfig(epochs=1, lr=1e-2, checkpoint_every=5, progress=False)
    Trainer(config, tmp_path, seed=3, run_config={"hidden": 16}).fit(make_model(), make_loader(), "pretrain")
    ckpt_dir = tmp_path / "pretrain" / "checkpoints"
    tensors = load_file(str(ckpt_dir / "step_00000010.safetensors"))
    meta = json.loads((ckpt_dir / "step_00000010.json").read_text())
    assert {"model.encoder.weight", "optim.state.0.exp_avg", "optim.state.0.step"} <= set(tensors)
    assert meta["step"] == 10 and meta["seed"] == 3 and meta["run_config"] == {"hidden": 16}
    assert meta["optimizer"]["param_groups"][0]["params"] == [0, 1, 2, 3]
    assert meta["train_config"]["lr"] == 1e-2 and "last_epoch" in meta["scheduler"]
    rng = load_file(str(ckpt_dir / "step_00000010.rng0.safetensors"))
    assert rng["rng.torch_cpu"].dtype == torch.uint8
    assert {"python", "numpy"} <= set(json.loads((ckpt_dir / "step_00000010.rng0.json").read_text()))
    assert sorted(p.name for p in ckpt_dir.glob("*.safetensors") if ".rng" not in p.name) == [
        "step_00000005.safetensors",
        "step_00000010.safetensors",
    ]
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))


def test_finished_stage_is_reloaded_not_retrained(tmp_path):
    config = TrainConfig(epochs=2, lr=1e-2, progress=False)
    trained = make_model()
    Trainer(config, tmp_path, seed=0).fit(trained, make_loader(), "pretrain")
    other = make_model(seed=7)
    result = Trainer(config, tmp_path, seed=0).fit(other, make_loader(), "pretrain")
    assert result.already_done and result.steps == 20
    for a, b in zip(trained.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_resume_with_a_different_config_is_refused(tmp_path, monkeypatch):
    run_interrupted(monkeypatch, tmp_path, CONFIG, stop_after_step=3)
    changed = TrainConfig(epochs=3, lr=5e-3, checkpoint_every=1, grad_accum=2, progress=False)
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.01 -> 0\.005"):
        Trainer(changed, tmp_path, seed=0).fit(make_model(), make_loader(), "pretrain")
    with pytest.raises(ConfigError, match="seed: 0 -> 1"):
        Trainer(CONFIG, tmp_path, seed=1).fit(make_model(), make_loader(), "pretrain")


def test_non_finite_loss_stops_with_a_message(tmp_path):
    config = TrainConfig(epochs=2, lr=1e-2, checkpoint_every=2, progress=False)
    model = make_model(nan_at_call=4)
    with pytest.raises(TrainingDivergedError, match=r"non-finite loss at optimiser step 4 .*'loss': nan"):
        Trainer(config, tmp_path, seed=0).fit(model, make_loader(), "pretrain")
    assert not (tmp_path / "pretrain" / "done.json").exists()


def test_frozen_submodule_and_parameter_groups(tmp_path):
    model = make_model()
    model.encoder.requires_grad_(False)
    frozen = model.encoder.weight.detach().clone()
    head = model.head.weight.detach().clone()
    Trainer(TrainConfig(epochs=1, lr=1e-2, progress=False), tmp_path / "a", seed=0).fit(
        model, make_loader(), "s"
    )
    assert torch.equal(model.encoder.weight, frozen) and not torch.equal(model.head.weight, head)

    class Grouped(TinyNet):
        def parameter_groups(self):
            return [
                {"params": self.encoder.parameters(), "lr_scale": 0.1},
                {"params": self.head.parameters()},
            ]

    torch.manual_seed(0)
    grouped = Grouped()
    trainer = Trainer(
        TrainConfig(epochs=1, lr=1e-2, schedule="constant", progress=False), tmp_path / "b", seed=0
    )
    trainer.fit(grouped, make_loader(), "s")
    meta = json.loads((tmp_path / "b" / "s" / "checkpoints" / "step_00000010.json").read_text())
    assert [g["lr"] for g in meta["optimizer"]["param_groups"]] == pytest.approx([1e-3, 1e-2])


def test_same_seed_same_weights_different_seed_different_weights(tmp_path):
    """The whole trained state follows the seed: every weight, every optimiser moment (the last checkpoint),
    every logged loss. Runs start from identical weights, so only the trainer's seed (data order, dropout)
    can tell them apart."""
    config = TrainConfig(epochs=1, lr=1e-2, progress=False)
    models = [make_model() for _ in range(3)]
    for i, (model, seed) in enumerate(zip(models, [0, 0, 1])):
        Trainer(config, tmp_path / str(i), seed=seed).fit(model, make_loader(), "s")
    weights = [m.state_dict() for m in models]
    checkpoints = [
        load_file(str(tmp_path / str(i) / "s" / "checkpoints" / "step_00000010.safetensors"))
        for i in range(3)
    ]
    losses = [
        [json.loads(x)["loss"] for x in (tmp_path / str(i) / "s" / "metrics.jsonl").read_text().splitlines()]
        for i in range(3)
    ]
    assert set(weights[0]) == {"encoder.weight", "encoder.bias", "head.weight", "head.bias"}
    assert any(k.startswith("optim.state.") for k in checkpoints[0]) and len(losses[0]) == 10
    for same in (weights, checkpoints):
        assert same[0].keys() == same[1].keys() == same[2].keys()
        for name in same[0]:
            assert torch.equal(same[0][name], same[1][name]), f"seed 0 twice: {name} differs"
    assert losses[0] == losses[1]
    # another seed moves every parameter and every optimiser moment (step counts aside), and the loss curve
    for name, tensor in checkpoints[0].items():
        if not name.endswith(".step"):
            assert not torch.equal(tensor, checkpoints[2][name]), f"seeds 0 and 1: {name} is identical"
    assert all(not torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    assert losses[0] != losses[2]


def test_stages_may_switch_to_bf16_autocast_in_one_process(tmp_path):
    fp32, bf16 = make_model(), make_model()
    Trainer(TrainConfig(epochs=3, lr=1e-2, progress=False), tmp_path / "a", seed=0).fit(
        fp32, make_loader(), "s"
    )
    config = TrainConfig(epochs=3, lr=1e-2, progress=False, mixed_precision="bf16")
    Trainer(config, tmp_path / "b", seed=0).fit(bf16, make_loader(), "s")
    lines = [json.loads(x) for x in (tmp_path / "b" / "s" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert bf16.head.weight.dtype == torch.float32  # autocast only: master weights stay float32
    assert not torch.equal(fp32.head.weight, bf16.head.weight)  # bf16 matmuls round differently
