"""Where loraplex keeps models, adapters and runs on disk."""

import os
from pathlib import Path


def loraplex_home() -> Path:
    """`$LORAPLEX_HOME`, default `~/.cache/loraplex`."""
    return Path(os.environ.get("LORAPLEX_HOME") or Path.home() / ".cache" / "loraplex").expanduser()


def models_dir() -> Path:
    return loraplex_home() / "models"


def default_adapters_dir() -> Path:
    return loraplex_home() / "adapters"
