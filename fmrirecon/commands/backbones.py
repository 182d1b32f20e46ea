"""``fmrirecon backbones``: inspect backbones, train the world backbones, check their quality.

fmrirecon backbones info [--sd HUB_ID_OR_DIR] [--clip HUB_ID_OR_DIR]   # sizes read from the configs
fmrirecon backbones train-world [--stages clip,clip_vision,vae,unet,vae_decoder] [--weights-dir DIR]
                                [--work-dir DIR] [--set KEY=VALUE ...]
fmrirecon backbones check-world [--weights-dir DIR] [--n-generate 100] [--cfg-scale 4] [--out JSON]
"""

from __future__ import annotations

import json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "backbones", help="inspect, train (world) and check diffusion/CLIP backbones"
    )
    sub = parser.add_subparsers(dest="backbones_command", metavar="ACTION", required=True)

    info = sub.add_parser("info", help="print image size, latent shape, context length, parameter counts")
    info.add_argument(
        "--sd", default=None, help="Stable Diffusion hub id or diffusers folder (default: world)"
    )
    info.add_argument("--clip", default=None, help="CLIP hub id or transformers folder (default: world)")
    info.set_defaults(func=_info)

    train = sub.add_parser("train-world", help="train the world CLIP, VAE and UNet on synthetic scenes")
    train.add_argument(
        "--stages",
        default="clip,clip_vision,vae,unet,vae_decoder",
        help="comma-separated subset of clip,vae,unet,vae_decoder,clip_vision (default: all five, the "
        "stages behind the shipped weights)",
    )
    train.add_argument("--weights-dir", default=None, help="output weights folder (default: the package's)")
    train.add_argument(
        "--work-dir", default=None, help="checkpoints/logs (default: DATA_HOME/world-backbones)"
    )
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    train.set_defaults(func=_train_world)

    check = sub.add_parser("check-world", help="quality of the world backbones on held-out scenes")
    check.add_argument("--weights-dir", default=None, help="weights folder (default: the package's)")
    check.add_argument("--n-heldout", type=int, default=300)
    check.add_argument("--n-generate", type=int, default=100)
    check.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale")
    check.add_argument("--steps", type=int, default=50)
    check.add_argument("--out", default=None, help="write the figures to this JSON file")
    check.set_defaults(func=_check_world)


def _parse_overrides(pairs: list[str]):
    """``KEY=VALUE`` strings (values read as YAML, typed by the field: ``false``, ``3e-4``, ``[32, 64, 128]``)
    -> a checked ``WorldTrainConfig``."""
    from fmrirecon.backbones.world.train import WorldTrainConfig
    from fmrirecon.config import apply_overrides

    return apply_overrides(WorldTrainConfig(), pairs)


def _weights_dir(arg):
    from pathlib import Path

    from fmrirecon.backbones.world import WEIGHTS_DIR

    return Path(arg) if arg else WEIGHTS_DIR


def _train_world(args) -> int:
    from fmrirecon.backbones.world.train import STAGES, train_world
    from fmrirecon.errors import ConfigError
    from fmrirecon.paths import data_home

    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    if not stages or any(s not in STAGES for s in stages):
        raise ConfigError(
            f"--stages must be a comma-separated subset of {','.join(STAGES)}, got {args.stages!r}"
        )
    cfg = _parse_overrides(args.set)
    from pathlib import Path

    work_dir = Path(args.work_dir) if args.work_dir else data_home() / "world-backbones"
    timings = train_world(cfg, _weights_dir(args.weights_dir), work_dir, stages)
    print(json.dumps(timings, indent=2))
    return 0


def _check_world(args) -> int:
    from fmrirecon.backbones.clip import ClipEmbedder
    from fmrirecon.backbones.diffusion import LatentDiffusion
    from fmrirecon.backbones.world.train import WorldTrainConfig
    from fmrirecon.data.world import make_world
    from fmrirecon.evaluation.world_backbones import check_world_backbones
    from fmrirecon.io import write_json_atomic

    if args.weights_dir:
        from fmrirecon.backbones.world.load import load_world_backbones

        clip, ld = load_world_backbones(_weights_dir(args.weights_dir))
    else:
        clip, ld = ClipEmbedder.world(), LatentDiffusion.world()
    heldout = make_world(args.n_heldout, seed=WorldTrainConfig().heldout_seed)
    figures = check_world_backbones(
        clip,
        ld,
        heldout,
        n_generate=args.n_generate,
        cfg_scale=args.cfg_scale,
        num_steps=args.steps,
    )
    print(json.dumps(figures, indent=2))
    if args.out:
        write_json_atomic(args.out, figures)
    return 0


def _info(args) -> int:
    from fmrirecon.backbones.clip import ClipEmbedder
    from fmrirecon.backbones.diffusion import LatentDiffusion

    ld = LatentDiffusion.from_pretrained(args.sd) if args.sd else LatentDiffusion.world()
    clip = ClipEmbedder.from_pretrained(args.clip) if args.clip else ClipEmbedder.world()

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    info = {
        "diffusion": {
            "image_size": ld.image_size,
            "latent_shape": list(ld.latent_shape),
            "context_length": ld.context_length,
            "scaling_factor": ld.vae.config.scaling_factor,
            "prediction_type": ld.scheduler.config.prediction_type,
            "parameters": {
                "vae": count(ld.vae),
                "unet": count(ld.unet),
                "text_encoder": count(ld.text_encoder),
            },
        },
        "clip": {
            "image_size": clip.image_size,
            "embed_dim": clip.embed_dim,
            "context_length": clip.context_length,
            "image_layers": clip.num_image_layers,
            "parameters": count(clip.model),
        },
    }
    print(json.dumps(info, indent=2))
    return 0
