"""Fake report inputs in the real on-disk layouts (docs/contracts.md), for tests and for trying the report.

``write_fake_report_inputs(root)`` writes a tiny prepared-store ``stimuli.hdf5``, reconstruction folders,
a ``metrics.json`` (evaluation schema, results pointing at their ``recon_dir``) and run directories with
per-step losses. Subjects see pairwise-different numbers of test images so a subject mix-up shows up as a
wrong count.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmrirecon.io import library_versions, write_json_atomic, write_text_atomic


@dataclass
class FakeReportInputs:
    root: Path
    store: Path
    metrics: Path
    recon_dirs: list[Path] = field(default_factory=list)
    run_dirs: list[Path] = field(default_factory=list)
    # 73k ids of the test images each subject saw (what the report's image rows are drawn from).
    test_ids: dict[int, list[int]] = field(default_factory=dict)


def _scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """A coloured background with one coloured square: uint8 (size, size, 3)."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = rng.integers(0, 256, 3, dtype=np.uint8)
    side = int(rng.integers(size // 4, size // 2))
    x, y = rng.integers(0, size - side, 2)
    image[y : y + side, x : x + side] = rng.integers(0, 256, 3, dtype=np.uint8)
    return image


def write_fake_report_inputs(
    root: str | os.PathLike,
    subjects: dict[int, int] | None = None,
    methods: tuple[tuple[str, str], ...] = (("ridge", "default"), ("neuraldiffuser", "guided")),
    samples: int = 2,
    image_size: int = 32,
    loss_steps: int = 40,
    caption: str = "a red square on grass",
    seed: int = 0,
) -> FakeReportInputs:
    """Write fake store, reconstructions, metrics and runs under ``root``.

    Args:
        subjects: ``{subject: number of test images}``; default ``{1: 7, 2: 5}``.
        methods: ``(method, variant)`` pairs; one reconstruction folder and one result per pair and subject.
        caption: first caption of every image (put markup here to test escaping).
    """
    import h5py
    from PIL import Image

    subjects = subjects or {1: 7, 2: 5}
    rng = np.random.default_rng(seed)
    root = Path(root)
    n_images = max(subjects.values()) + 3
    ids_73k = np.sort(rng.choice(73000, n_images, replace=False)).astype(np.int64)
    images = np.stack([_scene(rng, image_size) for _ in range(n_images)])

    store = root / "store"
    store.mkdir(parents=True, exist_ok=True)
    with h5py.File(store / "stimuli.hdf5", "w") as h5:
        h5["images"] = images
        h5["ids_73k"] = ids_73k
        captions = [[caption] + [f"scene {i} caption {c}" for c in range(1, 5)] for i in range(n_images)]
        h5.create_dataset("captions", data=np.array(captions, dtype=object), dtype=h5py.string_dtype("utf-8"))
    write_json_atomic(
        store / "manifest.json",
        {"format": "fmrirecon-store", "version": 1, "source": {"kind": "fake"}, "subjects": sorted(subjects)},
    )

    fake = FakeReportInputs(root=root, store=store, metrics=root / "metrics.json")
    results = []
    for subject, n_test in subjects.items():
        rows = np.sort(rng.choice(n_images, n_test, replace=False))
        test_ids = [int(i) for i in ids_73k[rows]]
        fake.test_ids[subject] = test_ids
        for method, variant in methods:
            name = method + (f"_{variant}" if variant else "")
            recon_dir = root / "recon" / f"subj{subject:02d}" / name
            (recon_dir / "images").mkdir(parents=True, exist_ok=True)
            for row, image_id in zip(rows, test_ids, strict=True):
                for k in range(samples):
                    noisy = images[row].astype(float) + rng.normal(0, 40, images[row].shape)
                    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(
                        recon_dir / "images" / f"{image_id}_{k}.png"
                    )
            write_json_atomic(
                recon_dir / "manifest.json",
                {
                    "method": method,
                    "subject": subject,
                    "variant": variant,
                    "ids": test_ids,
                    "samples": samples,
                },
            )
            fake.recon_dirs.append(recon_dir)
            per_image = {
                "pixcorr": rng.uniform(0, 0.5, len(test_ids)).tolist(),
                "effnet": rng.uniform(0.6, 1, len(test_ids)).tolist(),
            }
            results.append(
                {
                    "method": method,
                    "subject": subject,
                    "variant": variant,
                    "n_images": n_test,
                    "recon_dir": os.path.relpath(recon_dir, root),
                    "metrics": {
                        "pixcorr": float(np.mean(per_image["pixcorr"])),
                        "ssim": float(rng.uniform(0.1, 0.4)),
                        "alexnet2": float(rng.uniform(0.5, 1)),
                        "clip": {"mean": float(rng.uniform(0.5, 1)), "ci": [0.5, 1.0]},
                        "effnet": float(np.mean(per_image["effnet"])),
                        "retrieval_image": float(rng.uniform(0, 1)),
                        "nway_5": {"mean": float(rng.uniform(0.2, 1)), "std": 0.05},
                    },
                    "ids": [int(i) for i in test_ids],
                    "per_image": per_image,
                }
            )

        for method, _ in dict.fromkeys((m, None) for m, _ in methods):
            run_dir = root / "runs" / f"{method}_subj{subject:02d}"
            (run_dir / "pretrain").mkdir(parents=True, exist_ok=True)
            config = {"method": method, "subject": subject, "seed": seed, "train": {"steps": loss_steps}}
            write_json_atomic(run_dir / "config.json", config)
            write_json_atomic(
                run_dir / "run.json",
                {"method": method, "subject": subject, "store": str(store), "seed": seed,
                 "versions": library_versions()},
            )  # fmt: skip
            lines = [
                json.dumps(
                    {"step": s, "loss": float(2.0 * np.exp(-s / 10) + 0.01 * rng.random()), "lr": 1e-3}
                )
                for s in range(loss_steps)
            ]
            write_text_atomic(run_dir / "pretrain" / "metrics.jsonl", "\n".join(lines) + "\n")
            fake.run_dirs.append(run_dir)

    write_json_atomic(
        fake.metrics,
        {
            "preset": "world",
            "settings": {"store": str(store), "retrieval_pool": 4},
            "versions": library_versions(),
            "results": results,
        },
    )
    return fake
