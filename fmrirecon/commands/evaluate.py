"""`fmrirecon evaluate`: score reconstruction folders with a preset, print a table, write metrics.json."""

from __future__ import annotations

from fmrirecon.commands.options import add_device_option


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score reconstruction folders against ground truth (metrics.json)",
        description="Score reconstruction folders (manifest.json + images/<id73k>_<k>.png) against a "
        "prepared store or a folder of <id73k>.png with a named preset; see docs/evaluation.md.",
    )
    parser.add_argument(
        "--recon", nargs="+", required=True, metavar="RECON_DIR", help="reconstruction folders"
    )
    parser.add_argument("--truth", required=True, metavar="STORE_OR_DIR", help="prepared store or PNG folder")
    parser.add_argument("--preset", default="world", help="world | mindeye | braindiffuser (default: world)")
    parser.add_argument("--out", default="metrics.json", help="output JSON (default: metrics.json)")
    parser.add_argument("--weights-dir", default=None, help="folder searched first for network weights")
    add_device_option(parser)
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.set_defaults(func=_run)


def _format(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_table(report: dict) -> None:
    """Print one row per metric and one column per reconstruction folder (rich)."""
    from rich.console import Console
    from rich.table import Table

    from fmrirecon.evaluation.metric_info import ordered_metrics

    settings = report["settings"]
    table = Table(title=f"fmrirecon evaluate — preset {report['preset']}")
    table.add_column("metric")
    for result in report["results"]:
        table.add_column(
            f"{result['method']}\nsubj{result['subject']:02d} {result['variant']}", justify="right"
        )
    table.add_column("chance", justify="right")
    keys = ordered_metrics(k for r in report["results"] for k in r["metrics"])
    for key in keys:
        arrow = "↑" if settings["higher_is_better"].get(key, True) else "↓"
        cells = []
        for result in report["results"]:
            value = result["metrics"].get(key)
            best = result.get("best_of_k", {}).get(key)
            cells.append(_format(value) + (f" (best {best:.3f})" if best is not None else ""))
        table.add_row(f"{key} {arrow}", *cells, _format(settings["chance"].get(key)))
    console = Console()
    console.print(table)
    for key, reason in settings["unavailable"].items():
        console.print(f"[yellow]{key} unavailable[/yellow]: {reason}", highlight=False)


def _run(args) -> int:
    from fmrirecon.device import resolve_device
    from fmrirecon.io import write_json_atomic
    from fmrirecon.runs import evaluate_runs

    report = evaluate_runs(
        args.recon,
        args.truth,
        args.preset,
        weights_dir=args.weights_dir,
        device=resolve_device(args.device),
        batch_size=args.batch_size,
    )
    write_json_atomic(args.out, report)
    print_table(report)
    print(f"wrote {args.out}")
    return 0
