"""`fmrirecon demo [--quick] [--out DIR]`: world → store → train all → reconstruct → evaluate → report.

With no arguments it runs the default profile (≤ 20 minutes on 2 CPU cores) into ``./fmrirecon_demo`` and
prints where the report is; ``--quick`` runs a 3-minute version (one subject, fewer images/samples/steps).
"""

from __future__ import annotations

from pathlib import Path

from fmrirecon.commands.options import add_device_option


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on the synthetic world and write an HTML report",
        description=__doc__,
    )
    parser.add_argument("--quick", action="store_true", help="the 3-minute profile")
    parser.add_argument("--out", type=Path, default=Path("fmrirecon_demo"), help="output folder")
    parser.add_argument(
        "--data", type=Path, default=None,
        help="data home for the world and its store (default: $FMRIRECON_DATA or ~/.cache/fmrirecon)",
    )  # fmt: skip
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="NAME",
        help="only these methods (default: all registered)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for world, training and sampling")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="METHOD.KEY=VALUE",
        help="config override for one method, e.g. --set ridge.reconstruction.num_steps=10 (repeatable)",
    )  # fmt: skip
    add_device_option(parser)
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from fmrirecon.demo import run_demo

    result = run_demo(
        args.out,
        quick=args.quick,
        data=args.data,
        methods=args.methods,
        seed=args.seed,
        overrides=args.overrides,
        device=args.device,
    )
    print(f"report: {result.report.resolve()}")
    print(f"metrics: {result.metrics.resolve()}")
    for item in result.skipped:
        print(f"skipped {item['method']}: {item['reason']}")
    return 1 if result.failed else 0
