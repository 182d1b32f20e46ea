"""Issue 21's table: reconstruction s/image (unguided, guided), peak memory, per precision and batch, host
synchronisations per DDIM step, and the evaluation's pairs/s.

Sizes:
- ``--size full``: random-weight SD 1.4-sized UNet (860 M) and VAE, CLIP ViT-B/32 vision tower (the issue's
  measurement), 512 px. Meant for a GPU (minutes per image on a CPU).
- ``--size reduced``: the world backbones (shipped weights, 128 px) — runs on a CPU in about a minute.

Both use the paper's settings (50 DDIM at strength 0.75 = 37 steps, CFG 7.5, κ 3e5, η 0.2, SAG 0.75) through
NeuralDiffuser's own ``reconstruct_images`` with decoded inputs drawn at random (the fMRI decoders' device
and precision are tested in ``tests/test_precision.py``). NeuroPictor and CnD are listed as not implemented
until their packages exist (``METHODS``).

Usage::

    python benchmarks/bench_gpu.py --size reduced --device cpu
    python benchmarks/bench_gpu.py --size full --device cuda --json gpu.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import torch

from fmrirecon.backbones.sampling import count_host_syncs
from fmrirecon.device import resolve_device, resolve_dtype
from fmrirecon.methods.neuraldiffuser.pipeline import ReconstructionSettings, reconstruct_images

HERE = Path(__file__).resolve().parent
PAPER_LAYERS = (2, 4, 6, 8, 10, 12)


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------- backbones
class _VisionLayers:
    """CLIP ViT-B/32 vision tower as the guidance feature extractor (block outputs of ``layers``)."""

    def __init__(self, vision):
        self.vision = vision

    def image_hidden_states(self, images, layers, site="block"):
        x = torch.nn.functional.interpolate(images, size=(224, 224), mode="bicubic", align_corners=False)
        x = x.to(self.vision.dtype)
        hidden = self.vision(pixel_values=x, output_hidden_states=True).hidden_states
        return [hidden[layer] for layer in layers]


def full_backbones(device, dtype):
    """Random-weight SD 1.4 UNet + VAE and CLIP ViT-B/32 vision (sizes from ``bench_backbones.py``)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from fmrirecon.backbones.diffusion import LatentDiffusion

    sizes = _bench_module("bench_backbones")
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**sizes.SD14_UNET)
        vae = AutoencoderKL(**sizes.SD_VAE)
        vision = CLIPVisionModel(CLIPVisionConfig(**sizes.CLIP_B32["vision_config"]))
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    empty = torch.zeros(1, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)

    class RandomSD(LatentDiffusion):
        def empty_text_embedding(self):
            return empty

    ld = RandomSD(vae, unet, scheduler, torch.nn.Identity(), None).to(dtype=dtype)
    return ld, _VisionLayers(vision.eval().requires_grad_(False).to(dtype=dtype)), PAPER_LAYERS


def reduced_backbones(device, dtype):
    """The world backbones from the shared loader (one copy per device and dtype)."""
    from fmrirecon.backbones.loader import load_clip, load_latent_diffusion

    clip = load_clip("world", device, dtype)
    return load_latent_diffusion("world", device, dtype), clip, tuple(range(1, clip.num_image_layers + 1))


# ------------------------------------------------------------------------------------------- timing
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def neuraldiffuser_case(
    ld, clip, layers, device, *, samples: int, guided: bool, repeats: int, num_steps: int = 50
) -> dict:
    """s/image and peak memory of ``reconstruct_images`` for one item with ``samples`` batched samples, and
    the host synchronisations per DDIM step (counted over one extra run)."""
    # the paper's settings (num_steps 50 unless shortened for a CPU run)
    settings = ReconstructionSettings(num_steps=num_steps, feature_guidance_scale=3e5 if guided else 0.0)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, *ld.empty_text_embedding().shape[1:], generator=g).to(device)
    latents = torch.randn(1, *ld.latent_shape, generator=g).to(device)
    with torch.no_grad():
        probe = clip.image_hidden_states(
            torch.zeros(1, 3, ld.image_size, ld.image_size, device=device), layers
        )
    targets = [torch.randn(p.shape, generator=g).to(device) for p in probe] if guided else None

    def run():
        return reconstruct_images(
            ld, text, latents, clip=clip, layers=layers, guidance_targets=targets, settings=settings,
            samples=samples, seed=0, progress=False,
        )  # fmt: skip

    run()  # warm-up: allocations, kernel selection
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        run()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    with count_host_syncs(device) as counter:
        run()
    return {
        "s_per_image": best / samples,
        "peak_gib": peak,
        "host_syncs_per_step": counter.total / max(settings.steps_run, 1),
        "host_syncs": dict(counter.counts),
    }


def bench_neuraldiffuser(
    size: str, device, precisions, batches, repeats: int, num_steps: int = 50
) -> list[dict]:
    rows = []
    for precision in precisions:
        dtype = resolve_dtype(precision, device)
        build = full_backbones if size == "full" else reduced_backbones
        ld, clip, layers = build(device, dtype)
        for samples in batches:
            row = {"precision": precision, "samples": samples}
            for guided in (False, True):
                case = neuraldiffuser_case(
                    ld,
                    clip,
                    layers,
                    device,
                    samples=samples,
                    guided=guided,
                    repeats=repeats,
                    num_steps=num_steps,
                )
                row["guided" if guided else "unguided"] = case
            row["guided_over_unguided"] = row["guided"]["s_per_image"] / row["unguided"]["s_per_image"]
            rows.append(row)
            print(_format_row("neuraldiffuser", row), flush=True)
        del ld, clip
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# NeuroPictor and CnD plug in here (a function with bench_neuraldiffuser's signature) once they exist.
METHODS = {"neuraldiffuser": bench_neuraldiffuser, "neuropictor": None, "cnd": None}


# ------------------------------------------------------------------------------------------- evaluation
def bench_evaluation(size: str, device, n: int, workers: int) -> dict:
    """Pairs/s of ``evaluate_reconstructions`` with the ``mindeye`` preset: full = its five networks at full
    size with random weights; reduced = the pixel metrics only (decode, 256 → 425 px, PixCorr, SSIM)."""
    from fmrirecon.evaluation.presets import get_preset
    from fmrirecon.evaluation.suite import evaluate_reconstructions

    preset = get_preset("mindeye")
    folders = _bench_module("bench_evaluation")
    with tempfile.TemporaryDirectory() as tmp:
        truth_dir, recon_dir = folders.write_folders(Path(tmp), n, 256)
        kw = dict(device=str(device), progress=False, loader_workers=workers, batch_size=32)
        if size == "full":
            kw["random_weights_for_testing"] = True
        else:
            kw["extractors"] = {net: _NoFeatures() for net in preset.networks}
        evaluate_reconstructions(recon_dir, truth_dir, preset, **{**kw, "loader_workers": 0})  # warm-up
        t0 = time.perf_counter()
        evaluate_reconstructions(recon_dir, truth_dir, preset, **kw)
        seconds = time.perf_counter() - t0
    what = "five networks, random weights" if size == "full" else "pixel metrics only"
    return {
        "pairs": n,
        "seconds": seconds,
        "pairs_per_s": n / seconds,
        "loader_workers": workers,
        "what": what,
    }


class _NoFeatures:
    weights = "none (pixel metrics only)"

    def __call__(self, images):
        return {}


def use_sampler_from(rev: str) -> None:
    """Replace ``ddim_sample`` by the one in ``fmrirecon/backbones/sampling.py`` at git revision ``rev`` (the
    'before' column; options it does not know are dropped)."""
    import inspect
    import subprocess
    import sys
    import types

    from fmrirecon.backbones import sampling

    source = subprocess.run(
        ["git", "show", f"{rev}:fmrirecon/backbones/sampling.py"], capture_output=True, text=True, check=True,
        cwd=HERE.parent,
    ).stdout  # fmt: skip
    old = types.ModuleType(f"sampling_{rev}")
    sys.modules[old.__name__] = old  # dataclasses look their module up
    exec(compile(source, f"sampling@{rev}", "exec"), old.__dict__)
    known = set(inspect.signature(old.ddim_sample).parameters)
    sampling.ddim_sample = lambda *a, **kw: old.ddim_sample(*a, **{k: v for k, v in kw.items() if k in known})


# ------------------------------------------------------------------------------------------- report
def _format_row(method: str, row: dict) -> str:
    u, g = row["unguided"], row["guided"]
    peak = f"{g['peak_gib']:.1f}" if g["peak_gib"] is not None else "n/a"
    return (
        f"| {method} | {row['precision']} | {row['samples']} "
        f"| {u['s_per_image']:.3f} | {g['s_per_image']:.3f} "
        f"| {row['guided_over_unguided']:.2f} | {peak} | {g['host_syncs_per_step']:.1f} |"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("reduced", "full"), default="reduced")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--precisions", default=None, help="comma list; default float32,bfloat16 (+float16 on GPU)"
    )
    parser.add_argument("--batches", default="1,4", help="samples of one image run as one batch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--num-steps", type=int, default=50, help="DDIM steps (paper 50; fewer for a CPU run)"
    )
    parser.add_argument("--eval-pairs", type=int, default=None, help="default 500 (full) / 32 (reduced)")
    parser.add_argument("--loader-workers", type=int, default=4)
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--sampler-from-rev",
        default=None,
        help="time the sampler of this git revision instead (before/after)",
    )
    args = parser.parse_args(argv)
    if args.sampler_from_rev:
        use_sampler_from(args.sampler_from_rev)
    device = resolve_device(args.device)
    precisions = args.precisions.split(",") if args.precisions else ["float32", "bfloat16"]
    if not args.precisions and device.type == "cuda":
        precisions.append("float16")
    batches = [int(b) for b in args.batches.split(",")]
    print(f"size {args.size}, device {device}, torch {torch.__version__}")
    print("| method | precision | samples | unguided s/img | guided s/img | guided/unguided "
          "| peak GiB guided | host syncs/step (guided) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    results = {"size": args.size, "device": str(device), "torch": torch.__version__, "methods": {}}
    for method, bench in METHODS.items():
        if bench is None:
            print(f"| {method} | not implemented | | | | | | |")
            results["methods"][method] = "not implemented"
            continue
        results["methods"][method] = bench(
            args.size, device, precisions, batches, args.repeats, args.num_steps
        )
    if not args.skip_eval:
        n = args.eval_pairs or (500 if args.size == "full" else 32)
        ev = bench_evaluation(args.size, device, n, args.loader_workers)
        results["evaluation"] = ev
        print(f"evaluation (mindeye, {ev['what']}): {ev['pairs']} pairs in {ev['seconds']:.1f} s = "
              f"{ev['pairs_per_s']:.1f} pairs/s, {ev['loader_workers']} loader workers")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
