"""One backbone loader for every method: ``(name or folder, device, dtype) -> backbone``.

``name`` is ``"world"`` (the backbones shipped in the package), a hub id found in the local cache, or a
local folder. Loaded backbones are cached per ``(kind, name, device, dtype)`` so that two methods in one
process share one copy; the loader never moves or casts an object it has handed out: another device or dtype
gets its own copy. Callers must not call ``.to()`` on what they get (they ask the loader instead).
"""

from __future__ import annotations

import copy
import os
import threading

import torch

__all__ = ["load_clip", "load_latent_diffusion"]

_CACHE: dict[tuple[str, str, str, torch.dtype], torch.nn.Module] = {}
_LOCK = threading.Lock()


def _load(kind: str, name: str | os.PathLike, device, dtype: torch.dtype) -> torch.nn.Module:
    if kind == "diffusion":
        from fmrirecon.backbones.diffusion import LatentDiffusion as cls
    else:
        from fmrirecon.backbones.clip import ClipEmbedder as cls

    name = os.fspath(name)
    device = torch.device(device)
    key = (kind, name, str(device), dtype)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        base_key = (kind, name, "cpu", torch.float32)
        if base_key not in _CACHE:
            # "world": the package's shared object (cached by the backbone module itself), never moved here
            _CACHE[base_key] = cls.world() if name == "world" else cls.from_pretrained(name)
        base = _CACHE[base_key]
        if key != base_key:
            _CACHE[key] = copy.deepcopy(base).to(device=device, dtype=dtype)
        return _CACHE[key]


def load_latent_diffusion(name: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32):
    """The :class:`~fmrirecon.backbones.diffusion.LatentDiffusion` ``name`` on ``device`` in ``dtype``."""
    return _load("diffusion", name, device, dtype)


def load_clip(name: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32):
    """The :class:`~fmrirecon.backbones.clip.ClipEmbedder` ``name`` on ``device`` in ``dtype``."""
    return _load("clip", name, device, dtype)
