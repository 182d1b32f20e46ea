"""Options several subcommands share, defined once (their meaning and help text are the same everywhere)."""

from __future__ import annotations

import argparse

__all__ = ["DEVICE_HELP", "add_device_option"]

DEVICE_HELP = "auto | cpu | cuda | cuda:N (default: auto = the GPU if there is one)"


def add_device_option(parser: argparse.ArgumentParser, **kwargs) -> None:
    """``--device``, resolved by :func:`fmrirecon.device.resolve_device` (``kwargs`` override the default)."""
    parser.add_argument("--device", help=DEVICE_HELP, **({"default": "auto"} | kwargs))
