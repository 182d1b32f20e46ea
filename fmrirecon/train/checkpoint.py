"""Checkpoint serialisation without pickle: tensors go to safetensors, everything else to JSON.

Optimizer state is flattened to ``optim.state.{param_idx}.{name}`` tensors plus JSON ``param_groups`` (and any
non-tensor per-parameter state); RNG states are a uint8 tensor for torch and JSON for numpy / Python
``random``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim.state."


def model_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.<name>`` → tensor, cloned so tied/shared weights serialise (safetensors refuses shared
    storage)."""
    return {MODEL_PREFIX + k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def load_model_tensors(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    state = {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    module.load_state_dict(state, strict=True)


def optimizer_to_flat(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into flat tensors and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state_dict["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIM_PREFIX}{idx}.{name}"] = value.detach().cpu().clone()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    meta = {"param_groups": state_dict["param_groups"], "scalar_state": scalars}
    return tensors, meta


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith(OPTIM_PREFIX):
            continue
        idx, name = key[len(OPTIM_PREFIX) :].split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, rest in meta.get("scalar_state", {}).items():
        state.setdefault(int(idx), {}).update(rest)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Current RNG states of this process: torch (CPU, CUDA) as uint8 tensors; numpy and Python as JSON."""
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
