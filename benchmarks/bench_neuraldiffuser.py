# %% [markdown]
# # NeuralDiffuser benchmarks (synthetic world, per subject)
#
# What the issue asks to show, in order of importance; each section caches its results in ``OUT/results.json``
# so a rerun continues where it stopped:
#
# - ``params``: parameter counts of the ``nsd_paper`` configuration (paper §6), built on the meta device;
# - ``fit``: NeuralDiffuser (world.yaml) and the ridge baseline per subject;
# - ``metrics``: guided / unguided / ridge on the world test set (PixCorr, SSIM, world-CLIP 2-way);
# - ``sweep``: κ/η grid like the paper's Tab. 2 (low-level metrics), equal seeds;
# - ``consistency``: mean pairwise similarity of 5 seeds, guided vs unguided (Fig. 9);
# - ``select``: 5 samples per image, the mean over samples (Tab. 1 top) vs the best of 5 by second-order
#   selection (the sample closest to the brain-decoded guidance features, §5.2);
# - ``retrieval``: voting retrieval with the guidance features (§5.3), top-1 of min(300, N);
# - ``transfer``: leave-the-target-out pretraining + fine-tuning vs target only, target with ¼ of sessions,
#   paired over the test images (ẑ PixCorr/SSIM and each image's retrieval hit); ``--transfer-equal-steps``,
#   ``--transfer-seed``;
# - ``timing``: guided vs unguided wall time at equal steps (world backbones).
#
# Run: ``python benchmarks/bench_neuraldiffuser.py --out bench_out/neuraldiffuser [--subjects 1 2]``.
# ``--world-unique N`` builds the world with N training images per subject instead of 500 (NSD has ~9,000).

# %%
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fmrirecon.io import write_json_atomic

SECTIONS = (
    "params",
    "fullsize",
    "fit",
    "metrics",
    "sweep",
    "sag",
    "consistency",
    "select",
    "retrieval",
    "transfer",
    "timing",
)
CONFIG_DIR = Path(__file__).resolve().parents[1] / "fmrirecon" / "configs"


def load_results(out: Path) -> dict:
    path = out / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def save_results(out: Path, results: dict) -> None:
    write_json_atomic(out / "results.json", results)


# %% world store
def world_store(out: Path, seed: int = 0, n_unique: int = 500):
    """The default world (``write_synthetic_nsd(seed=0)``), or one with ``n_unique`` training images per
    subject (and 100 shared test images, drawn anew from the larger pool)."""
    from fmrirecon.data.prepare import prepare_nsd
    from fmrirecon.data.store import PreparedStore
    from fmrirecon.data.synthetic import write_synthetic_nsd

    raw = write_synthetic_nsd(out / "world", seed=seed, n_unique=n_unique, formats=("hdf5",))
    return PreparedStore(prepare_nsd(raw, out / "store", betas_format="hdf5"))


# %% parameter counts
def count_parameters() -> dict:
    from fmrirecon.data.nsd_facts import NSDGENERAL_VOXELS as NSD_VOXELS
    from fmrirecon.methods.neuraldiffuser.model import LatentDecoder, SemanticDecoder

    others = {s: v for s, v in NSD_VOXELS.items() if s != 1}
    target = {1: NSD_VOXELS[1]}
    counts = {}
    with torch.device("meta"):
        for name, tokens in (("semantic (77×768)", 77), ("guidance (50×768)", 50)):
            for stage, voxels in (("pretrain", others), ("subject", target)):
                m = SemanticDecoder(voxels, out_tokens=tokens)
                counts[f"{name} {stage}"] = {
                    "total": sum(p.numel() for p in m.parameters()) / 1e6,
                    "voxel_encoders": sum(p.numel() for p in m.voxel_encoders.parameters()) / 1e6,
                    "backbone": sum(p.numel() for p in m.backbone.parameters()) / 1e6,
                    "projector": sum(p.numel() for p in m.projector.parameters()) / 1e6,
                    "prior": sum(p.numel() for p in m.prior.parameters()) / 1e6,
                }
        lat = LatentDecoder(target)
        counts["latent (4×64×64) subject"] = {"total": sum(p.numel() for p in lat.parameters()) / 1e6}
    return counts


# %% training
def method_config(name: str, overrides=()):
    from fmrirecon.methods import get_method

    cls = get_method(name)
    path = CONFIG_DIR / name / "world.yaml"
    return cls, cls.config_from(path if path.is_file() else None, list(overrides))


def fit(
    name: str,
    store,
    subjects,
    run_dir: Path,
    overrides=(),
    seed: int = 0,
    backbones=None,
    stage: str = "target",
    init_from: Path | None = None,
):
    """Train (or reload) one run of ``name`` on ``subjects``: ``stage="pretrain"`` (several subjects; returns
    None as the method, a pretraining run does not reconstruct) or a ``target`` run, from ``init_from``."""
    from fmrirecon.methods.base import RunData, init_run_dir, mark_done
    from fmrirecon.runs import seed_everything

    cls, config = method_config(name, overrides)

    def attach(method):
        # Share one set of loaded backbones (NeuralDiffuser: LDM + CLIP; ridge: the LDM).
        if backbones is not None:
            if name == "ridge":
                method._injected = backbones[0]
            else:
                method._backbones = backbones
        return method

    done = run_dir / "done.json"
    if done.is_file():
        seconds = json.loads(done.read_text()).get("seconds", 0.0)
        return (attach(cls.load(run_dir)) if stage != "pretrain" else None), seconds
    data = RunData((store,), subjects, stage, init_from)
    init_run_dir(run_dir, method=name, config=config, data=data, seed=seed)
    seed_everything(seed)
    method = attach(cls(config))
    t0 = time.perf_counter()
    method.fit(data, run_dir, seed=seed)
    seconds = time.perf_counter() - t0
    mark_done(run_dir, stage=stage, subjects=list(data.subjects), seconds=seconds)
    return (method if stage != "pretrain" else None), seconds


def fit_neuraldiffuser(
    store, subject: int, out: Path, name: str, overrides=(), seed: int = 0, backbones=None
):
    """The paper's protocol (§4.2.3) as two runs: a leave-the-target-out ``pretrain`` run on the store's other
    subjects (when ``training.pretrain`` is on and there are any), then the ``target`` run from it. Returns
    ``(method, seconds of both runs)``."""
    _, config = method_config("neuraldiffuser", overrides)
    others = [s for s in store.subjects if s != subject]
    init, pre_seconds = None, 0.0
    if config.training.pretrain and others:
        init = out / f"{name}_pretrain"
        _, pre_seconds = fit(
            "neuraldiffuser", store, others, init, overrides, seed, backbones, stage="pretrain"
        )
    overrides = list(overrides) + ([] if init is not None else ["training.pretrain=false"])
    method, seconds = fit(
        "neuraldiffuser", store, [subject], out / name, overrides, seed, backbones, init_from=init
    )
    return method, pre_seconds + seconds


# %% metrics
def image_metrics(recons: np.ndarray, truths: np.ndarray, clip, per_image: dict | None = None) -> dict:
    """recons uint8 (N, K, H, W, 3), truths uint8 (N, H, W, 3) → means over images and samples.

    ``per_image``, if given, receives each metric's per-image value (mean over the K samples), ``(N,)``, for
    paired comparisons (:func:`paired_differences`).
    """
    from fmrirecon.evaluation.metrics import pixcorr, rgb_to_gray, ssim, two_way_identification

    n, k = recons.shape[:2]
    truth_f = truths.astype(np.float64) / 255
    out = {"pixcorr": [], "ssim": [], "clip2": []}
    with torch.no_grad():
        truth_emb = clip.image_embeds(torch.from_numpy(truth_f).permute(0, 3, 1, 2).float()).numpy()
    for j in range(k):
        rec = recons[:, j].astype(np.float64) / 255
        out["pixcorr"].append(pixcorr(rec, truth_f))
        out["ssim"].append(ssim(rgb_to_gray(rec), rgb_to_gray(truth_f)))
        with torch.no_grad():
            rec_emb = clip.image_embeds(torch.from_numpy(rec).permute(0, 3, 1, 2).float()).numpy()
        out["clip2"].append(two_way_identification(truth_emb, rec_emb))
    if per_image is not None:
        per_image.update({key: np.mean(v, axis=0) for key, v in out.items()})
    return {key: float(np.mean(v)) for key, v in out.items()} | {"n_images": n, "samples": k}


def paired_differences(a: dict, b: dict, ids: np.ndarray) -> dict:
    """Per metric, ``a − b`` over the test images ``ids`` (per-image values from :func:`image_metrics`):
    the evaluation suite's paired comparison (:func:`fmrirecon.evaluation.compare.paired_difference`)."""
    from fmrirecon.evaluation.compare import paired_difference

    def result(per_image: dict) -> dict:
        return {"subject": None, "ids": [int(i) for i in ids], "per_image": per_image}

    return paired_difference(result(a), result(b))


def decoding_metrics(
    method, betas: np.ndarray, truths: np.ndarray, ld, per_image: dict | None = None
) -> dict:
    """Without sampling: PixCorr/SSIM of the VAE-decoded, momentum-aligned latent ẑ (the img2img start);
    ``per_image``, if given, receives the per-image values (keys ``latent_pixcorr``, ``latent_ssim``)."""
    from fmrirecon.evaluation.metrics import pixcorr, rgb_to_gray, ssim

    decoded = method.decode(betas, seed=0, guided=False)
    with torch.no_grad():
        blurry = ld.decode_latents(decoded["latent"]).permute(0, 2, 3, 1).numpy().astype(np.float64)
    size = truths.shape[1]
    if blurry.shape[1] != size:
        blurry = (
            torch.nn.functional.interpolate(
                torch.from_numpy(blurry).permute(0, 3, 1, 2), size=(size, size), mode="bilinear"
            )
            .permute(0, 2, 3, 1)
            .numpy()
        )
    truth_f = truths.astype(np.float64) / 255
    values = {
        "latent_pixcorr": pixcorr(blurry, truth_f),
        "latent_ssim": ssim(rgb_to_gray(blurry), rgb_to_gray(truth_f)),
    }
    if per_image is not None:
        per_image.update(values)
    return {key: float(v.mean()) for key, v in values.items()}


def test_set(store, subject: int, n_test: int | None):
    ids, betas = store.subject(subject).averaged("test")
    if n_test:
        ids, betas = ids[:n_test], betas[:n_test]
    return ids, betas, store.images(ids)


# %% one full-size step on CPU (random SD 1.4 / ViT-B/32-sized components; no download)
def fullsize_step_timing(
    repeats: int = 2, sag_scale: float = 0.75, precisions: tuple[str, ...] = ("float32", "bfloat16")
) -> dict:
    """Seconds of one unguided and one guided DDIM step (per guidance precision) at SD 1.4 sizes (latent
    4×64×64, 512 px, CFG batch 2).

    Best of ``repeats`` per run, so the first (which pays one-off allocations and kernel selection) is only a
    warm-up. The projected ratio of a whole reconstruction uses the paper's schedule: 37 steps run, 7 of them
    guided.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from torch import nn
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from fmrirecon.backbones.diffusion import LatentDiffusion
    from fmrirecon.methods.neuraldiffuser.pipeline import ReconstructionSettings, reconstruct_images

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # SD 1.x sizes
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        latent_channels=4,
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=512,
    )
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    empty = torch.zeros(1, 77, 768)

    class RandomSD(LatentDiffusion):
        def empty_text_embedding(self):
            return empty

    ld = RandomSD(vae, unet, scheduler, nn.Identity(), None)
    vision = CLIPVisionModel(CLIPVisionConfig(patch_size=32, image_size=224)).eval().requires_grad_(False)

    class Clip:
        def image_hidden_states(self, images, layers, site="block"):
            x = torch.nn.functional.interpolate(images, size=(224, 224), mode="bicubic", align_corners=False)
            hidden = vision(pixel_values=x, output_hidden_states=True).hidden_states
            return [hidden[layer] for layer in layers]

    text = torch.randn(1, 77, 768)
    latents = torch.randn(1, 4, 64, 64)
    layers = (2, 4, 6, 8, 10, 12)
    targets = [torch.randn(1, 50, 768) for _ in layers]
    times = {}
    runs = [("unguided", 0.0, "float32")] + [(f"guided {p}", 3e5, p) for p in precisions]
    for label, kappa, precision in runs:
        # num_steps=1, strength=1 → exactly one DDIM step; guidance_strength=1 guides it.
        settings = ReconstructionSettings(
            num_steps=1,
            strength=1.0,
            feature_guidance_scale=kappa,
            guidance_strength=1.0,
            sag_scale=sag_scale,
            guidance_precision=precision,
        )
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            reconstruct_images(
                ld,
                text,
                latents,
                clip=Clip(),
                layers=layers,
                guidance_targets=targets,
                settings=settings,
                samples=1,
                progress=False,
            )
            best = min(best, time.perf_counter() - t0)
        times[label] = best
    # The VAE decode of the result is included in both; subtract it to get the per-step difference only.
    decode = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            ld.decode_latents(latents)
        decode = min(decode, time.perf_counter() - t0)
    step_u = times["unguided"] - decode
    result = {"unguided_step_s": step_u, "vae_decode_s": decode}
    for precision in precisions:
        step_g = times[f"guided {precision}"] - decode
        result[precision] = {
            "guided_step_s": step_g,
            "step_ratio": step_g / step_u,
            "projected_run_ratio_37_steps_7_guided": (37 * step_u + 7 * (step_g - step_u) + decode)
            / (37 * step_u + decode),
        }
    return result


# %% main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench_out/neuraldiffuser"))
    parser.add_argument("--store", type=Path, default=None, help="prepared world store (default: make one)")
    parser.add_argument(
        "--world-unique",
        type=int,
        default=500,
        help="training images per subject of the world made when --store is not given (default world: 500)",
    )
    parser.add_argument("--subjects", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--n-test", type=int, default=None, help="first n test images (default: all)")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--sweep-images", type=int, default=24)
    parser.add_argument(
        "--sweep-kappas", type=float, nargs="+", default=[3e3, 3e4, 3e5], help="κ grid at η = 1"
    )
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--overrides", nargs="*", default=[], help="dotted overrides of world.yaml")
    parser.add_argument(
        "--weights-dir", type=Path, default=None, help="world weights folder (default: shipped)"
    )
    parser.add_argument(
        "--transfer-equal-steps",
        action="store_true",
        help="transfer: scale the fine-tuning epochs by sessions / quarter (equal steps to full data)",
    )
    parser.add_argument(
        "--transfer-seed", type=int, default=0, help="transfer: training seed of both arms (runs suffixed)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared box)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    results = load_results(out)

    if "params" in args.only:
        results["params"] = count_parameters()
        save_results(out, results)
        print(json.dumps(results["params"], indent=1))
    if "fullsize" in args.only:
        results["fullsize_step"] = {
            f"sag {sag:g}": fullsize_step_timing(sag_scale=sag) for sag in (0.75, 0.0)
        }
        save_results(out, results)
        print(json.dumps(results["fullsize_step"], indent=1))
    if set(args.only) <= {"params", "fullsize"}:
        return 0

    from fmrirecon.data.store import PreparedStore

    store = PreparedStore(args.store) if args.store else world_store(out, n_unique=args.world_unique)
    from dataclasses import replace

    from fmrirecon.backbones.loader import load_clip, load_latent_diffusion

    _, world_cfg = method_config("neuraldiffuser", args.overrides)
    if args.weights_dir:
        from fmrirecon.backbones.world.load import load_world_backbones

        clip, ld = load_world_backbones(args.weights_dir)
    else:
        ld, clip = load_latent_diffusion(world_cfg.diffusion), load_clip(world_cfg.clip)

    # Reconstruction settings may be overridden on a trained run (κ, η, steps; not the decoders).
    settings = world_cfg.reconstruction

    def with_settings(**changes):
        return replace(settings, **changes)

    for subject in args.subjects:
        key = f"subj{subject:02d}"
        res = results.setdefault(key, {})
        nd, nd_seconds = fit_neuraldiffuser(
            store, subject, out / "runs", f"nd_{key}", args.overrides, backbones=(ld, clip)
        )
        nd._backbones = (ld, clip)
        res.setdefault("fit_seconds", {})["neuraldiffuser"] = (
            res.get("fit_seconds", {}).get("neuraldiffuser", nd_seconds) or nd_seconds
        )
        ids, betas, truths = test_set(store, subject, args.n_test)

        if "metrics" in args.only:
            ridge, ridge_seconds = fit(
                "ridge", store, [subject], out / "runs" / f"ridge_{key}", backbones=(ld, clip)
            )
            res["fit_seconds"]["ridge"] = ridge_seconds or res["fit_seconds"].get("ridge", 0.0)
            rows, per_image = {}, {}
            for variant in ("guided", "unguided"):
                t0 = time.perf_counter()
                recons = nd.reconstruct(
                    betas, samples=args.samples, seed=0, variant=variant, settings=settings
                )
                per_image[variant] = {}
                rows[variant] = image_metrics(recons, truths, clip, per_image[variant]) | {
                    "seconds": time.perf_counter() - t0
                }
                np.save(out / f"recons_{key}_{variant}.npy", recons)
            # The other guidance precision (bfloat16 = VAE decode under autocast), same seeds.
            other = "bfloat16" if settings.guidance_precision == "float32" else "float32"
            t0 = time.perf_counter()
            recons = nd.reconstruct(
                betas, samples=args.samples, seed=0, settings=with_settings(guidance_precision=other)
            )
            rows[f"guided, {other} guidance"] = image_metrics(recons, truths, clip) | {
                "seconds": time.perf_counter() - t0
            }
            per_image["ridge"] = {}
            rows["ridge"] = image_metrics(
                ridge.reconstruct(betas, samples=args.samples, seed=0), truths, clip, per_image["ridge"]
            )
            res["paired"] = {
                "guided - ridge": paired_differences(per_image["guided"], per_image["ridge"], ids),
                "guided - unguided": paired_differences(per_image["guided"], per_image["unguided"], ids),
            }
            res["metrics"] = rows
            save_results(out, results)
            print(key, json.dumps(rows, indent=1))

        if "sweep" in args.only:
            m = args.sweep_images
            kappas = args.sweep_kappas
            grid = [(0.0, 0.0)] + [(k, 1.0) for k in kappas] + [(kappas[-1], e) for e in (0.6, 0.2)]
            sweep = []
            for kappa, eta in grid:
                recons = nd.reconstruct(
                    betas[:m],
                    samples=1,
                    seed=0,
                    variant="guided",
                    settings=with_settings(feature_guidance_scale=kappa, guidance_strength=eta),
                )
                sweep.append({"kappa": kappa, "eta": eta} | image_metrics(recons, truths[:m], clip))
                print(key, sweep[-1])
            # Merge with earlier sweeps (other κ grids) by (κ, η).
            merged = {(row["kappa"], row["eta"]): row for row in res.get("sweep", []) + sweep}
            res["sweep"] = sorted(merged.values(), key=lambda row: (row["kappa"], -row["eta"]))
            save_results(out, results)

        if "sag" in args.only:
            m = args.sweep_images
            rows = {}
            for sag_scale in (0.0, 0.75):
                for variant in ("guided", "unguided"):
                    kw = dict(samples=1, seed=0, variant=variant, settings=with_settings(sag_scale=sag_scale))
                    recons = nd.reconstruct(betas[:m], **kw)
                    rows[f"{variant} sag {sag_scale:g}"] = image_metrics(recons, truths[:m], clip)
            res["sag"] = rows
            save_results(out, results)
            print(key, json.dumps(rows, indent=1))

        if "consistency" in args.only:
            from fmrirecon.methods.neuraldiffuser.pipeline import mean_pairwise_similarity

            m = args.sweep_images
            cons = {}
            for variant in ("guided", "unguided"):
                recons = nd.reconstruct(betas[:m], samples=5, seed=1, variant=variant, settings=settings)
                images = torch.from_numpy(recons).permute(0, 1, 4, 2, 3).float() / 255
                cons[variant] = mean_pairwise_similarity(images)
            res["consistency"] = cons
            save_results(out, results)
            print(key, cons)

        if "select" in args.only:
            rows = {}
            for variant in ("guided", "unguided"):
                recons = nd.reconstruct(betas, samples=5, seed=0, variant=variant, settings=settings)
                rows[f"{variant}, mean of 5"] = image_metrics(recons, truths, clip)
                best = nd.select_best(betas, recons, settings=settings)
                rows[f"{variant}, selected of 5"] = image_metrics(best, truths, clip)
            res["select"] = rows
            save_results(out, results)
            print(key, json.dumps(rows, indent=1))

        if "retrieval" in args.only:
            from fmrirecon.methods.neuraldiffuser.retrieval import voting_retrieval

            brain = nd.brain_layer_embeddings(betas)
            image = nd.image_layer_embeddings(truths)
            res["retrieval"] = voting_retrieval(brain, image, pool_size=300)
            res["retrieval"]["per_layer"] = [
                voting_retrieval([b], [i], pool_size=300)["retrieval_image"] for b, i in zip(brain, image)
            ]
            save_results(out, results)
            print(key, res["retrieval"])

        if "transfer" in args.only:
            from fmrirecon.methods.neuraldiffuser.retrieval import voting_retrieval

            sessions = store.subject(subject).n_sessions
            quarter = max(1, sessions // 4)
            # The paper's protocol: the same epochs whatever the data (15 epochs of 3 sessions are ~100
            # steps). --transfer-equal-steps scales them by sessions / quarter, so both arms take as many
            # fine-tuning steps as the full-data fine-tuning: the comparison nearer convergence.
            epochs = world_cfg.training.finetune_train.epochs
            if args.transfer_equal_steps:
                epochs = round(epochs * sessions / quarter)
            suffix = ("_equal_steps" if args.transfer_equal_steps else "") + (
                f"_seed{args.transfer_seed}" if args.transfer_seed else ""
            )
            rows, per_image = {}, {}
            for label, pretrain in (("pretrain+finetune", True), ("target only", False)):
                over = [
                    *args.overrides,
                    f"training.target_sessions={quarter}",
                    f"training.pretrain={str(pretrain).lower()}",
                    f"training.finetune_train.epochs={epochs}",
                ]
                run = f"transfer_{'pre' if pretrain else 'only'}_{key}{suffix}"
                method, _ = fit_neuraldiffuser(
                    store, subject, out / "runs", run, over, seed=args.transfer_seed, backbones=(ld, clip)
                )
                method._backbones = (ld, clip)
                per_image[label] = {}
                retrieval = voting_retrieval(
                    method.brain_layer_embeddings(betas),
                    method.image_layer_embeddings(truths),
                    per_item=per_image[label],
                )
                rows[label] = decoding_metrics(method, betas, truths, ld, per_image[label]) | retrieval
            paired = paired_differences(per_image["pretrain+finetune"], per_image["target only"], ids)
            res[f"transfer{suffix}"] = rows | {
                "target_sessions": quarter,
                "finetune_epochs": epochs,
                "pretrain+finetune - target only": paired,
            }
            save_results(out, results)
            print(key, res[f"transfer{suffix}"])

        if "timing" in args.only:
            # Interleaved repeats, best of 3 (wall and CPU), per SAG setting; samples=1 and the demo's 2.
            m = min(4, len(betas))
            times = {}
            for sag_scale in sorted({settings.sag_scale, 0.0}):
                for samples in (1, 2):
                    label = f"sag {sag_scale:g}, {samples} sample(s)"
                    best = {}
                    runs = (("unguided", "float32"), ("guided", "float32"), ("guided", "bfloat16"))
                    for variant, precision in runs * 4:
                        t0, c0 = time.perf_counter(), time.process_time()
                        run_settings = with_settings(sag_scale=sag_scale, guidance_precision=precision)
                        nd.reconstruct(
                            betas[:m], samples=samples, seed=0, variant=variant, settings=run_settings
                        )
                        wall, cpu = (time.perf_counter() - t0) / m, (time.process_time() - c0) / m
                        old = best.get((variant, precision), (np.inf, np.inf))
                        # best of 4; the first warms up
                        best[variant, precision] = (min(old[0], wall), min(old[1], cpu))
                    unguided = best["unguided", "float32"]
                    times[label] = {"unguided_s": unguided[0]}
                    for precision in ("float32", "bfloat16"):
                        guided = best["guided", precision]
                        times[label] |= {
                            f"guided_{precision}_s": guided[0],
                            f"ratio_{precision}_wall": guided[0] / unguided[0],
                            f"ratio_{precision}_cpu": guided[1] / unguided[1],
                        }
            res["timing"] = times
            save_results(out, results)
            print(key, times)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
