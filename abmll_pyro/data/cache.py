"""The user cache: ``$ABMLL_CACHE`` if set, else ``~/.cache/abmll_pyro``. Nothing here is in git.

Entries are built once and read many times, possibly by several processes at once (``abmll benchmark
--jobs``, two runs started side by side on an empty cache). :func:`cache_lock` serializes the builders
of one entry: the first builds it, the others wait on the lock and then find it finished. A finished
entry is marked by a file written last (``manifest.json``, ``abmll_complete``), so a half-built entry
(a builder killed midway) is never read and is rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from abmll_pyro.data.fingerprint import folder_fingerprint

__all__ = ["cache_dir", "cache_lock", "build_task_folder"]

MANIFEST = "manifest.json"


def cache_dir(*parts: str, create: bool = True) -> Path:
    """``<cache root>/<parts...>``, created unless ``create=False``."""
    root = Path(os.environ.get("ABMLL_CACHE") or Path.home() / ".cache" / "abmll_pyro").expanduser()
    path = root.joinpath(*parts)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def cache_lock(entry: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<entry>.lock`` (beside ``entry``) for the block: one builder of
    ``entry`` at a time among this machine's processes. Where ``fcntl`` is missing (Windows) the block
    runs unlocked."""
    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(entry.with_name(entry.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_task_folder(base: Path, fetch: Callable[[Path], Any], convert: Callable[[Any, Path], dict],
                      force: bool = False) -> Path:
    """``base/tasks``, built unless a finished one (``manifest.json``, written last) is there: under
    :func:`cache_lock`, ``fetch(base / "staging")`` gets the sources, the old folder is removed,
    ``convert(fetched, base / "tasks")`` writes the tasks and returns the manifest (to which the folder's
    content fingerprint is added, :func:`~abmll_pyro.data.fingerprint.folder_fingerprint`); the staging folder is
    deleted whatever happens. ``force`` rebuilds it."""
    out = base / "tasks"
    if (out / MANIFEST).exists() and not force:
        return out
    with cache_lock(base):
        if (out / MANIFEST).exists() and not force:  # another process built it while this one waited
            return out
        staging = base / "staging"
        try:
            fetched = fetch(staging)
            if out.exists():
                shutil.rmtree(out)
            manifest = convert(fetched, out)
            manifest["fingerprint"] = folder_fingerprint(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out
