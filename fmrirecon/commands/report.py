"""`fmrirecon report RUN_OR_METRICS... --out report.html`: one self-contained HTML file.

Sources are metrics.json files, run directories (run.json + per-stage metrics.jsonl), reconstruction folders,
or folders holding any of them (searched recursively, e.g. the demo's output folder).
"""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write a self-contained HTML report (reconstructions, metrics, losses, settings)",
        description=__doc__,
    )
    parser.add_argument(
        "sources", nargs="+", metavar="RUN_OR_METRICS", help="metrics.json, run dir, recon dir"
    )
    parser.add_argument("--out", type=Path, default=Path("report.html"), help="HTML file to write")
    parser.add_argument(
        "--recon", nargs="+", default=[], metavar="DIR",
        help="reconstruction folders not named by a result's 'recon_dir'",
    )  # fmt: skip
    parser.add_argument(
        "--truth", type=Path, default=None,
        help="prepared store or folder of <id73k>.png ground truth (default: the store the inputs name)",
    )  # fmt: skip
    parser.add_argument("--max-images", type=int, default=12, help="image rows per subject (default 12)")
    parser.add_argument("--samples", type=int, default=1, help="reconstructions shown per image and method")
    parser.add_argument("--title", default="fmrirecon report")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from fmrirecon.report import build_report

    if args.max_images < 1 or args.samples < 1:
        raise SystemExit(f"--max-images and --samples must be >= 1, got {args.max_images} and {args.samples}")
    out = build_report(
        args.sources,
        args.out,
        recon_dirs=args.recon,
        truth=args.truth,
        max_images=args.max_images,
        samples_per_cell=args.samples,
        title=args.title,
    )
    print(f"report written to {out.resolve()}")
    return 0
