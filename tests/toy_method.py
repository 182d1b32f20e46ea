"""A tiny reconstruction method defined outside the package: the template of docs/adding-a-method.md, run by
tests/test_toy_method.py through every shared layer (registered at test time, no shared module edited).

Model: least squares from voxels to the image's 4×4 colour grid (mean of each 8×8 cell of a 32 px image),
``(N, V) @ (V, 48) → (N, 4, 4, 3)``, nearest-upsampled to the store's image size. A ``pretrain`` run (any
subjects but the target) stores the mean training grid; a target run that starts from it (``--init-from``)
predicts the residual around that mean.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmrirecon.io import read_json, write_json_atomic
from fmrirecon.methods.base import PRETRAIN, TARGET, Capabilities, ReconMethod, RunData, read_run

GRID = 4


@dataclass
class ToyReconstruction:
    """Reconstruction settings: ``noise`` (sd, 0..255 units) added per sample, seeded; ``gain`` on the
    grid."""

    noise: float = 8.0
    gain: float = 1.0


@dataclass
class ToyConfig:
    """``ridge``: the L2 penalty of the least-squares map; ``reconstruction``: :class:`ToyReconstruction`."""

    ridge: float = 1.0
    reconstruction: ToyReconstruction = field(default_factory=ToyReconstruction)


def _grids(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) → float (N, GRID·GRID·3): mean colour of each cell."""
    n, h, w, _ = images.shape
    cells = images.reshape(n, GRID, h // GRID, GRID, w // GRID, 3).astype(np.float64)
    return cells.mean(axis=(2, 4)).reshape(n, -1)


class ToyMethod(ReconMethod):
    name = "toy"
    Config = ToyConfig
    Settings = ToyReconstruction
    capabilities = Capabilities(
        variants=("grid", "flat"), stages=(TARGET, PRETRAIN), pretrain_holds_out_targets=True
    )

    def fit(self, data: RunData, run_dir: str | os.PathLike, *, seed: int = 0) -> None:
        self.check_run_data(data)
        run_dir = Path(run_dir)
        if data.stage == PRETRAIN:
            grids = [
                _grids(data.store.images(data.store.subject(s).averaged("train")[0])) for s in data.subjects
            ]
            write_json_atomic(run_dir / "toy_prior.json", {"mean": np.concatenate(grids).mean(0).tolist()})
            return
        ids, betas = data.store.subject(data.subject).averaged("train")
        targets = _grids(data.store.images(ids))
        prior = (
            np.asarray(read_json(data.init_from / "toy_prior.json")["mean"])
            if data.init_from
            else np.zeros(48)
        )
        x = betas.astype(np.float64)
        weights = np.linalg.solve(x.T @ x + self.config.ridge * np.eye(x.shape[1]), x.T @ (targets - prior))
        np.save(run_dir / "toy_weights.npy", weights)
        np.save(run_dir / "toy_prior.npy", prior)
        self.weights, self.prior = weights, prior
        self.subject, self.n_voxels = data.subject, betas.shape[1]
        self.image_size = data.store.images(ids[:1]).shape[1]

    @classmethod
    def load(cls, run_dir, *, device=None) -> ToyMethod:
        run_dir = Path(run_dir)
        info = read_run(run_dir)
        method = cls(cls.read_run_config(run_dir))
        method.weights, method.prior = (
            np.load(run_dir / "toy_weights.npy"),
            np.load(run_dir / "toy_prior.npy"),
        )
        method.subject, method.n_voxels = info["subject"], method.weights.shape[0]
        from fmrirecon.data.store import PreparedStore

        method.image_size = PreparedStore(info["store"]).image_shape[0]
        return method.to(device or "cpu")

    def reconstruct(self, betas, samples=1, seed=0, *, variant=None, settings=None) -> np.ndarray:
        variant, settings = self.resolve_variant(variant), self.resolve_settings(settings)
        betas = self.check_betas(betas)
        grid = (betas @ self.weights + self.prior) * settings.gain  # (N, 48)
        if variant == "flat":
            grid = np.repeat(grid.reshape(len(betas), -1, 3).mean(1, keepdims=True), GRID * GRID, axis=1)
        cells = grid.reshape(len(betas), GRID, GRID, 3)
        scale = self.image_size // GRID
        images = np.kron(cells, np.ones((1, scale, scale, 1)))  # (N, H, W, 3)
        rng = np.random.default_rng(seed)
        out = images[:, None] + rng.normal(0, settings.noise, (len(betas), samples, *images.shape[1:]))
        return np.clip(out, 0, 255).round().astype(np.uint8)
