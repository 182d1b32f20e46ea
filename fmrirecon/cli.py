"""The ``fmrirecon`` command line.

Each subcommand lives in ``fmrirecon/commands/<name>.py`` and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (called with the parsed namespace; returns an exit code). Heavy imports happen inside
``func`` so that ``fmrirecon --help`` is instant.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys

from fmrirecon import __version__
from fmrirecon.errors import FmriReconError

COMMANDS = (
    "demo", "world", "prepare", "store", "backbones", "train", "reconstruct", "evaluate", "analyze", "report",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmrirecon",
        description=(
            "Reconstruct seen images from fMRI (NeuroPictor, Mind Reader, CnD, NeuralDiffuser, ridge)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"fmrirecon {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"fmrirecon.commands.{name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FmriReconError as err:
        print(f"fmrirecon {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        print(
            f"fmrirecon {args.command}: error: no space left on device ({err}); writes are atomic, so no "
            "half-written output is left under its final name — free space and run the same command again",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
