"""`fmrirecon reconstruct --run RUN --data STORE --out RECON_DIR [--samples K] [--seed S] [--variant V]
[--select-best] [--set key=value ...] [--device D]`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fmrirecon.commands.options import add_device_option

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "reconstruct",
        help="reconstruct images from a trained run's subject's repeat-averaged betas",
        description=(
            "Load the method trained in RUN, reconstruct K images from each repeat-averaged betas of the "
            "run's subject (shared test images by default) and write RECON_DIR: manifest.json, "
            "images/<id73k>_<k>.png and, when the method declares retrieval embeddings, brain_embeddings.npy "
            "and image_embeddings.npy. --set changes a reconstruction setting of the method (its "
            "`reconstruction` config section), e.g. --set num_steps=20."
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
        "(second-order selection; methods that declare it)",
    )
    parser.add_argument(
        "--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
        help="reconstruction setting override (repeatable); unknown keys and wrong types are refused",
    )  # fmt: skip
    add_device_option(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from fmrirecon.data.store import PreparedStore
    from fmrirecon.device import resolve_device
    from fmrirecon.io import library_versions
    from fmrirecon.runs import load_run, reconstruct_run

    if args.samples < 1:
        raise SystemExit("fmrirecon reconstruct: --samples must be >= 1")
    device = resolve_device(args.device)
    # SubjectMismatchError if RUN was trained on another store
    method, info = load_run(args.run, args.data, device=device)
    settings = method.settings_from(args.settings)
    if args.select_best and not method.capabilities.second_order_selection:
        raise SystemExit(
            f"fmrirecon reconstruct: --select-best: {info['method']} has no second-order selection"
        )
    store = PreparedStore(args.data)
    out = reconstruct_run(
        method,
        store,
        info["subject"],
        args.out,
        split=args.split,
        limit=args.limit,
        samples=args.samples,
        seed=args.seed,
        variant=args.variant,
        settings=settings,
        select_best=args.select_best,
        extra={"run": str(Path(args.run).resolve()), "versions": library_versions()},
    )
    print(f"wrote reconstructions ({info['method']}, subj{info['subject']:02d}) to {out}")
    return 0
