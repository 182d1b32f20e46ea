"""`fmrirecon train METHOD --data STORE --subject N --out RUN [--config FILE] [--seed S] [key=value ...]`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a reconstruction method on one subject of a prepared store",
        usage=(
            "fmrirecon train METHOD --data STORE --subject N --out RUN [--config FILE] [--seed S] "
            "[key=value ...]"
        ),
        description=(
            "Train METHOD on one subject. The config is the method's paper defaults, then --config (a YAML "
            "file, or a name from configs/METHOD/, e.g. 'world'), then dotted key=value overrides. RUN "
            "receives config.json (resolved config), run.json (method, subject, store, seed, versions) and "
            "the weights; rerunning the same command resumes an interrupted run."
        ),
    )
    _add_options(parser, suppress=False)
    # argparse cannot take a '*' positional after options (cpython issue 59317), so everything from METHOD on
    # is re-parsed with parse_intermixed_args: options and key=value overrides may then come in any order.
    parser.add_argument(
        "method_and_overrides",
        nargs=argparse.REMAINDER,
        metavar="METHOD [key=value ...]",
        help="method name (e.g. ridge, neuraldiffuser), then dotted config overrides",
    )
    parser.set_defaults(func=_run, _parser=parser)


def _add_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default = {"default": argparse.SUPPRESS} if suppress else {}
    parser.add_argument("--data", type=Path, metavar="STORE", help="prepared store folder", **default)
    parser.add_argument("--subject", type=int, metavar="N", help="1-based subject number", **default)
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
        setattr(args, key, value)
    missing = [f"--{k}" for k in ("data", "subject", "out") if getattr(args, k, None) is None]
    if missing:
        args._parser.error(f"the following arguments are required: {', '.join(missing)}")
    return args


def resolve_config_path(method: str, config: str | None) -> Path | None:
    """A path as given, or a config name shipped under ``fmrirecon/configs/<method>/<name>.yaml``."""
    from fmrirecon.errors import ConfigError

    if config is None:
        return None
    path = Path(config)
    if path.is_file():
        return path
    shipped_dir = Path(__file__).resolve().parent.parent / "configs" / method
    shipped = shipped_dir / f"{config.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in shipped_dir.glob("*.yaml"))
    raise ConfigError(
        f"config {config!r} is neither a file nor a shipped config of {method} (shipped: {names})"
    )


def _run(args: argparse.Namespace) -> int:
    import random

    import numpy as np
    import torch

    from fmrirecon.data.store import PreparedStore
    from fmrirecon.methods import get_method
    from fmrirecon.methods.base import init_run_dir

    args = parse_method_and_overrides(args)
    method_cls = get_method(args.method)
    config = method_cls.config_from(resolve_config_path(args.method, args.config), args.overrides)
    store = PreparedStore(args.data)
    store.subject(args.subject)  # SubjectMismatchError if the store lacks the subject
    init_run_dir(
        args.out,
        method=method_cls.name,
        config=config,
        subject=args.subject,
        store_path=args.data,
        seed=args.seed,
    )
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    method = method_cls(config)
    logger.info("training %s on subject %d of %s -> %s", method_cls.name, args.subject, args.data, args.out)
    method.fit(store, args.subject, args.out, seed=args.seed)
    print(f"trained {method_cls.name} for subject {args.subject}: {args.out}")
    return 0
