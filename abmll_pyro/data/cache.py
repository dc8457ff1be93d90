"""The user cache: ``$ABMLL_CACHE`` if set, else ``~/.cache/abmll_pyro``. Nothing here is in git."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir(*parts: str, create: bool = True) -> Path:
    """``<cache root>/<parts...>``, created unless ``create=False``."""
    root = Path(os.environ.get("ABMLL_CACHE") or Path.home() / ".cache" / "abmll_pyro").expanduser()
    path = root.joinpath(*parts)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path
