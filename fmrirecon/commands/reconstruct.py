"""`fmrirecon reconstruct --run RUN --data STORE --out RECON_DIR [--samples K] [--seed S] [--variant V]
[--select-best]`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "reconstruct",
        help="reconstruct images from a trained run's subject's repeat-averaged betas",
        description=(
            "Load the method trained in RUN, reconstruct K images from each repeat-averaged betas of the "
            "run's subject (shared test images by default) and write RECON_DIR: manifest.json, "
            "images/<id73k>_<k>.png and, when the method has them, brain_embeddings.npy and "
            "image_embeddings.npy."
        ),
    )
    parser.add_argument(
        "--run", required=True, type=Path, metavar="RUN", help="run folder from fmrirecon train"
    )
    parser.add_argument(
        "--data", required=True, type=Path, metavar="STORE", help="the store the run was trained on"
    )
    parser.add_argument("--out", required=True, type=Path, metavar="RECON_DIR", help="reconstruction folder")
    parser.add_argument("--samples", type=int, default=1, metavar="K", help="images per input (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--variant", default=None, help="method variant (default: the method's first)")
    parser.add_argument("--split", default="test", choices=("test", "train", "all"), help="default: test")
    parser.add_argument(
        "--limit", type=int, default=None, metavar="N", help="only the first N images (73k order)"
    )
    parser.add_argument(
        "--select-best",
        action="store_true",
        help="sample K images per input and keep the one the method's own brain-decoded features prefer "
        "(second-order selection; methods with select_best, e.g. neuraldiffuser)",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from fmrirecon.data.store import PreparedStore
    from fmrirecon.evaluation.io import write_recon_dir
    from fmrirecon.io import library_versions
    from fmrirecon.methods import get_method
    from fmrirecon.methods.base import check_run_store

    if args.samples < 1:
        raise SystemExit("fmrirecon reconstruct: --samples must be >= 1")
    info = check_run_store(args.run, args.data)  # SubjectMismatchError if RUN was trained on another store
    method = get_method(info["method"]).load(args.run)
    if args.select_best and not hasattr(method, "select_best"):
        raise SystemExit(
            f"fmrirecon reconstruct: --select-best: {info['method']} has no second-order selection"
        )
    variant = method.resolve_variant(args.variant)
    store = PreparedStore(args.data)
    ids, betas = store.subject(info["subject"]).averaged(args.split)
    if args.limit is not None:
        ids, betas = ids[: args.limit], betas[: args.limit]
    logger.info(
        "reconstructing %d images x %d samples (%s, %s)", len(ids), args.samples, info["method"], variant
    )
    images = method.reconstruct(betas, args.samples, args.seed, variant=variant)
    if args.select_best:
        images = method.select_best(betas, images, args.seed)
    brain = method.brain_embeddings(betas)
    image_side = method.image_embeddings(store.images(ids)) if brain is not None else None
    write_recon_dir(
        args.out,
        method=info["method"],
        subject=info["subject"],
        variant=variant,
        ids=ids,
        images=images,
        brain_embeddings=brain,
        image_embeddings=image_side,
        extra={
            "store": str(Path(args.data).resolve()),
            "store_fingerprint": info["store_fingerprint"],
            "run": str(Path(args.run).resolve()),
            "seed": args.seed,
            "split": args.split,
            "selected_of": args.samples if args.select_best else None,
            "versions": library_versions(),
        },
    )
    print(f"wrote {len(ids)} x {images.shape[1]} reconstructions to {args.out}")
    return 0
