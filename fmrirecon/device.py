"""``--device auto|cpu|cuda[:N]`` and the precision setting, resolved once for every command (DESIGN.md).

``auto`` is the GPU when torch sees one, else the CPU. Asking for ``cuda`` on a machine without one is an
error, never a silent fall back to the CPU: a run meant for a GPU that quietly takes a day on a CPU is worse
than a message.
"""

from __future__ import annotations

from typing import Literal

import torch

from fmrirecon.errors import ConfigError

__all__ = ["DTYPES", "Precision", "autocast", "resolve_device", "resolve_dtype"]

Precision = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` / None → ``cuda`` if available else ``cpu``; ``"cpu"``; ``"cuda"`` / ``"cuda:N"``.

    Raises:
        ConfigError: an unknown spelling, or a CUDA device this machine does not have.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    kind, _, index = text.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ConfigError(f"--device expects auto, cpu, cuda or cuda:N, got {spec!r}")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"--device {spec}: torch sees no CUDA GPU on this machine (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda}); use --device cpu or auto"
        )
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        raise ConfigError(
            f"--device {spec}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
        )
    return torch.device(text)


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The torch dtype of a precision setting (``float32``, ``bfloat16``, ``float16``).

    Raises:
        ConfigError: an unknown name, or ``float16`` on the CPU (no CPU kernels for most half-precision ops).
    """
    if name not in DTYPES:
        raise ConfigError(f"precision expects one of {sorted(DTYPES)}, got {name!r}")
    dtype = DTYPES[name]
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        raise ConfigError("precision float16 needs a GPU; use bfloat16 or float32 on the CPU")
    return dtype


def autocast(device: torch.device | str, dtype: torch.dtype):
    """Autocast for the trained decoders (float32 weights, matmuls and convolutions in ``dtype``); off for
    float32, so the float32 path is bit-identical to no context (issue 21: precision as a setting)."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32)
