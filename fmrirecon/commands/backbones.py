"""`fmrirecon backbones` (placeholder until its issue lands: registers the command and says it is not available yet)."""

from __future__ import annotations

import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser("backbones", help="(not available yet)")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    print("fmrirecon backbones is not implemented yet", file=sys.stderr)
    return 2
