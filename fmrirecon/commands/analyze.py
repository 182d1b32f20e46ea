"""`fmrirecon analyze NAME --run RUN --data STORE [--out DIR] [--set key=value ...] [--seed S] [--device D]`:
run a registered analysis on a trained run; writes DIR/analysis.json, PNG figures and NIfTI maps."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    from fmrirecon.analysis import available_analyses

    parser = subparsers.add_parser(
        "analyze",
        help="run an analysis of a trained run (JSON, figures, NIfTI maps in the subject's space)",
        description=(
            "Run the analysis NAME on the run RUN and its store. The results go to DIR (default: "
            "RUN/analyses/NAME, where `fmrirecon report RUN` finds them): analysis.json, PNG figures "
            "and, for voxel-wise results, NIfTI volumes in the subject's own space (open them over the "
            "subject's anatomy "
            f"in any viewer). Analyses: {', '.join(available_analyses())}."
        ),
    )
    parser.add_argument("name", metavar="NAME", help="a registered analysis")
    parser.add_argument(
        "--run", required=True, type=Path, metavar="RUN", help="run folder from fmrirecon train"
    )
    parser.add_argument(
        "--data", required=True, type=Path, metavar="STORE", help="the store the run was trained on"
    )
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help="default: RUN/analyses/NAME")
    parser.add_argument(
        "--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
        help="analysis setting override (repeatable)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of any random split (default: 0)")
    parser.add_argument(
        "--device",
        default="auto",
        help="auto | cpu | cuda | cuda:N (default: auto = the GPU if there is one)",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from fmrirecon.runs import analyze_run

    out = analyze_run(
        args.name, args.run, args.data, args.out, settings=args.settings, seed=args.seed, device=args.device
    )
    print(f"wrote {args.name} of {args.run} to {out}")
    return 0
