"""Where fmrirecon keeps data when the user does not say: argument, then $FMRIRECON_DATA, then ~/.cache."""

from __future__ import annotations

import os
from pathlib import Path


def data_home(path: str | os.PathLike | None = None) -> Path:
    """Resolve a data directory: ``path`` if given, else ``$FMRIRECON_DATA``, else ``~/.cache/fmrirecon``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("FMRIRECON_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fmrirecon"
