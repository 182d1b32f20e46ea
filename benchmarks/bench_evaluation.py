"""Benchmark the evaluation suite: N reconstruction/truth pairs at 256 px, the ``mindeye`` preset's five
networks at full size with random weights (benchmark-only flag), on the CPU.

Shows that
- each network runs exactly once per image (forward pre-hooks count the images every network sees:
  N ground truths + N reconstructions);
- the suite's total time stays close to the sum of bare forward passes of the same networks on inputs of
  the same sizes (target <= 1.2x): resizing, PNG decoding, pixel metrics and the chunked two-way
  identification add little. On a shared, loaded machine the separate bare pass runs under another load,
  so the time spent inside the networks *during* the suite (forward hooks) is reported too;
- peak memory (max RSS of the process) with AlexNet ``features.4`` (184,512 values per image) held for
  every image of both sets.

Usage::

    python benchmarks/bench_evaluation.py --n 1000          # the full benchmark
    python benchmarks/bench_evaluation.py --n 100 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fmrirecon.evaluation.features import load_extractor
from fmrirecon.evaluation.presets import get_preset
from fmrirecon.evaluation.suite import evaluate_reconstructions


def smooth_images(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (n, size, size, 3): low-frequency random images (compressible PNGs, like photographs)."""
    coarse = torch.from_numpy(rng.random((n, 3, 8, 8), dtype=np.float32))
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def write_folders(root: Path, n: int, size: int, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(73000, size=n, replace=False))
    truth, recon = root / "truth", root / "recon"
    (recon / "images").mkdir(parents=True)
    truth.mkdir()
    for start in range(0, n, 100):
        chunk = ids[start : start + 100]
        truth_images = smooth_images(len(chunk), size, rng)
        noise = rng.integers(-40, 40, size=truth_images.shape)
        recon_images = np.clip(truth_images.astype(int) + noise, 0, 255).astype(np.uint8)
        for image_id, t, r in zip(chunk, truth_images, recon_images):
            Image.fromarray(t).save(truth / f"{image_id}.png")
            Image.fromarray(r).save(recon / "images" / f"{image_id}_0.png")
    manifest = {"method": "bench", "subject": 1, "variant": "noisy", "ids": ids.tolist(), "samples": 1}
    (recon / "manifest.json").write_text(json.dumps(manifest))
    return truth, recon


def bare_forward_seconds(extractors, preset, n_images: int, batch_size: int) -> dict[str, float]:
    """Time each network alone on random already-preprocessed inputs of its preset size."""
    seconds = {}
    for net, extractor in extractors.items():
        size = preset.networks[net].size
        start = time.perf_counter()
        with torch.inference_mode():
            for first in range(0, n_images, batch_size):
                batch = min(batch_size, n_images - first)
                extractor.module(torch.rand(batch, 3, size, size))
        seconds[net] = time.perf_counter() - start
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="reconstruction/truth pairs (default 1000)")
    parser.add_argument("--size", type=int, default=256, help="image side in px (default 256)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument(
        "--networks", nargs="+", default=None, help="subset of the preset's networks (default: all five)"
    )
    parser.add_argument(
        "--bare-images",
        type=int,
        default=None,
        help="time the bare forward passes on this many images and scale linearly to 2N (default: all 2N)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    preset = get_preset("mindeye")
    if args.networks:
        unknown = set(args.networks) - set(preset.networks)
        if unknown:
            parser.error(f"unknown networks {sorted(unknown)}; the preset has {sorted(preset.networks)}")
        preset = dataclasses.replace(
            preset,
            networks={k: v for k, v in preset.networks.items() if k in args.networks},
            feature_metrics=tuple(m for m in preset.feature_metrics if m.network in args.networks),
        )
    extractors = {
        net: load_extractor(net, preset.nodes(net), random_weights_for_testing=True)
        for net in preset.networks
    }
    counts = dict.fromkeys(extractors, 0)
    forward_seconds = dict.fromkeys(extractors, 0.0)
    started: dict[str, float] = {}
    for net, extractor in extractors.items():

        def count(module, inputs, net=net):  # a counting hook: images entering the network's forward
            counts[net] += inputs[0].shape[0]
            started[net] = time.perf_counter()

        def clock(module, inputs, output, net=net):  # time spent inside the network during the suite
            forward_seconds[net] += time.perf_counter() - started[net]

        extractor.module.register_forward_pre_hook(count)
        extractor.module.register_forward_hook(clock)

    with tempfile.TemporaryDirectory() as tmp:
        truth, recon = write_folders(Path(tmp), args.n, args.size)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        report = evaluate_reconstructions(
            recon, truth, preset, extractors=extractors, batch_size=args.batch_size
        )
        suite_seconds = time.perf_counter() - start
        rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    images_per_network = dict(counts)
    in_suite_forward = dict(forward_seconds)
    expected = 2 * args.n
    assert all(c == expected for c in images_per_network.values()), (images_per_network, expected)

    bare_images = min(args.bare_images or 2 * args.n, 2 * args.n)
    bare = bare_forward_seconds(extractors, preset, bare_images, args.batch_size)
    bare = {net: seconds * (2 * args.n) / bare_images for net, seconds in bare.items()}
    figures = {
        "n_pairs": args.n,
        "networks": sorted(extractors),
        "image_size": args.size,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "images_per_network": images_per_network,
        "suite_seconds": round(suite_seconds, 1),
        "bare_forward_seconds": {k: round(v, 1) for k, v in bare.items()},
        "bare_forward_images_timed": bare_images,  # < 2N: scaled linearly to 2N (same batch size)
        "bare_forward_total_seconds": round(sum(bare.values()), 1),
        "ratio_suite_to_bare": round(suite_seconds / sum(bare.values()), 3),
        # same run, same load: the suite's wall time over the time spent inside the networks' forwards
        "in_suite_forward_seconds": {k: round(v, 1) for k, v in in_suite_forward.items()},
        "ratio_suite_to_in_suite_forward": round(suite_seconds / sum(in_suite_forward.values()), 3),
        "peak_rss_gib": round(rss_peak / 2**20, 2),
        "rss_before_suite_gib": round(rss_before / 2**20, 2),
        "metrics": report["results"][0]["metrics"],
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
