"""The trainer on two CPU processes (gloo): the run completes and both ranks end with the same weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch
    import torch.nn.functional as F
    from accelerate import PartialState
    from safetensors.torch import save_file
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from fmrirecon.train import TrainConfig, Trainer

    class TinyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Dropout(0.2), nn.Linear(12, 1))

        def training_step(self, batch):
            x, y = batch
            return {"loss": F.mse_loss(self.net(x).squeeze(-1), y)}

    out = Path(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    y = x @ torch.randn(6, generator=g)
    torch.manual_seed(0)
    model = TinyNet()
    config = TrainConfig(epochs=4, lr=1e-2, checkpoint_every=4, grad_accum=2, progress=False)
    result = Trainer(config, out / "run", seed=0).fit(model, DataLoader(TensorDataset(x, y), batch_size=4,
                                                                        shuffle=True), stage="pretrain")
    state = PartialState()
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(out / f"rank{state.process_index}.safetensors"))
    print(f"rank {state.process_index}/{state.num_processes} backend={state.backend} steps={result.steps}")
    """
)


def test_two_process_gloo_run_agrees_on_weights(tmp_path):
    script = tmp_path / "train_tiny.py"
    script.write_text(SCRIPT)
    with socket.socket() as s:  # a free port, so parallel test runs do not collide
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        port,
        str(script),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0/2 backend=gloo" in proc.stdout and "rank 1/2 backend=gloo" in proc.stdout

    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    # 64 samples split over 2 ranks -> 8 batches of 4 per rank, 4 optimiser steps per epoch (accumulation 2)
    lines = [
        json.loads(x) for x in (tmp_path / "run" / "pretrain" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in lines] == list(range(1, 17))
    assert sum(r["loss"] for r in lines[-4:]) < sum(r["loss"] for r in lines[:4])
    ckpt_dir = tmp_path / "run" / "pretrain" / "checkpoints"
    assert (ckpt_dir / "step_00000016.rng0.safetensors").is_file()
    assert (ckpt_dir / "step_00000016.rng1.safetensors").is_file()
