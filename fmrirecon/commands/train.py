"""`fmrirecon train METHOD --data STORE (--subject N | --subjects 2,3,4) --out RUN [--stage S]
[--init-from RUN] [--config FILE] [--seed S] [--device D] [key=value ...]`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fmrirecon.commands.options import add_device_option

logger = logging.getLogger(__name__)

USAGE = (
    "fmrirecon train METHOD --data STORE (--subject N | --subjects N,M,...) --out RUN [--stage STAGE] "
    "[--init-from RUN] [--config FILE] [--seed S] [--device auto|cpu|cuda[:N]] [key=value ...]"
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train one stage of a reconstruction method (a run) on subjects of prepared stores",
        usage=USAGE,
        description=(
            "Train one stage of METHOD (a run). The config is the method's paper defaults, then --config (a "
            "YAML file, or a name from configs/METHOD/, e.g. 'world'), then dotted key=value overrides. RUN "
            "receives config.json (resolved config), run.json (method, stage, subjects, stores, init run, "
            "seed, "
            "versions), the weights and done.json; rerunning the same command resumes an interrupted run. "
            "A pretraining stage is a run of its own (--stage pretrain --subjects 2,3,4) that target runs "
            "start "
            "from (--init-from RUN)."
        ),
    )
    _add_options(parser, suppress=False)
    # argparse cannot take a '*' positional after options (cpython issue 59317), so everything from METHOD on
    # is re-parsed with parse_intermixed_args: options and key=value overrides may then come in any order.
    parser.add_argument(
        "method_and_overrides",
        nargs=argparse.REMAINDER,
        metavar="METHOD [key=value ...]",
        help="a registered method name, then dotted config overrides",
    )
    parser.set_defaults(func=_run, _parser=parser)


def _subjects(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated subject numbers, got {text!r}") from None


def _add_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default = {"default": argparse.SUPPRESS} if suppress else {}
    parser.add_argument(
        "--data", type=Path, metavar="STORE", action="append",
        help="prepared store folder (repeat for several stores; the first is the primary one)", **default,
    )  # fmt: skip
    parser.add_argument("--subject", type=int, metavar="N", help="the one subject (1-based)", **default)
    parser.add_argument(
        "--subjects",
        type=_subjects,
        metavar="N,M,...",
        help="several subjects (e.g. a pretraining run)",
        **default,
    )
    parser.add_argument("--stage", help="training stage (default: target)", **default)
    parser.add_argument("--init-from", type=Path, metavar="RUN", help="finished run to start from", **default)
    parser.add_argument("--out", type=Path, metavar="RUN", help="run folder to create or resume", **default)
    parser.add_argument(
        "--config", metavar="FILE", help="YAML override file or configs/METHOD name", **default
    )
    parser.add_argument(
        "--seed",
        type=int,
        help="seed for initialisation, data order and sampling (default: 0)",
        **(default or {"default": 0}),
    )
    add_device_option(parser, **default)


def parse_method_and_overrides(args: argparse.Namespace) -> argparse.Namespace:
    """Split ``args.method_and_overrides`` into ``method``, ``overrides`` and options placed among them."""
    inner = argparse.ArgumentParser(prog="fmrirecon train", add_help=False)
    _add_options(inner, suppress=True)
    inner.add_argument("method")
    inner.add_argument("overrides", nargs="*")
    if not args.method_and_overrides:
        args._parser.error("METHOD is required")
    parsed, unknown = inner.parse_known_intermixed_args(args.method_and_overrides)
    if unknown:
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    for key, value in vars(parsed).items():
        if key == "data" and getattr(args, "data", None):
            value = [*args.data, *value]
        setattr(args, key, value)
    missing = [f"--{k}" for k in ("data", "out") if getattr(args, k, None) is None]
    if getattr(args, "subject", None) is None and getattr(args, "subjects", None) is None:
        missing.append("--subject or --subjects")
    if missing:
        args._parser.error(f"the following arguments are required: {', '.join(missing)}")
    if args.subject is not None and args.subjects is not None:
        args._parser.error("give --subject N or --subjects N,M,..., not both")
    return args


def _run(args: argparse.Namespace) -> int:
    from fmrirecon.device import resolve_device
    from fmrirecon.methods import get_method
    from fmrirecon.methods.base import TARGET, RunData
    from fmrirecon.runs import method_config, train_run

    args = parse_method_and_overrides(args)
    device = resolve_device(args.device)
    method_cls = get_method(args.method)
    config = method_config(method_cls, args.config, args.overrides)
    subjects = [args.subject] if args.subject is not None else args.subjects
    data = RunData(args.data, subjects, args.stage or TARGET, args.init_from)
    method_cls(config).check_run_data(data)  # stage, subjects, init run: refused before anything is written
    train_run(method_cls, config, data, args.out, seed=args.seed, device=device)
    print(f"trained {method_cls.name} ({data.stage}) on subject(s) {list(data.subjects)}: {args.out}")
    return 0
