"""BIG-bench 1.0.0's task files: from a local copy, or from the package index's source archive with pip.

The package index no longer serves ``bigbench==1.0.0`` (only 0.0.1, which holds no task files), so
BIG-bench is an optional suite: :func:`find_source` takes a local copy (a checkout of the BIG-bench
repository, the ``bigbench-1.0.0.tar.gz`` source archive, or its unpacked tree) given as
``abmll data prepare bigbench --from PATH`` or ``$ABMLL_BIGBENCH_SOURCE``; without one,
:func:`download_bigbench` tries pip and, where the archive cannot be had, fails with one line that
says where to get the data and how to point the tool at it.

With pip: ``pip download --no-deps --no-binary :all: bigbench==1.0.0`` downloads the 358 MB sdist. Recent pip
(>= 25.x) then refuses it while preparing metadata, because the sdist declares a direct-URL
dependency (``bleurt @ file://...``); with ``--no-clean`` and ``TMPDIR`` pointed at our staging folder,
the unpacked source tree stays behind, and we read the task files from it. With an older pip the
archive itself lands in the download folder and we read it with :mod:`tarfile`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Callable, Iterator

from abmll_pyro.data.tasks import DataError

__all__ = ["BIGBENCH_VERSION", "SOURCE_ENV", "download_bigbench", "find_source", "fetcher", "list_task_dirs",
           "iter_task_files"]

BIGBENCH_VERSION = "1.0.0"
TASKS_DIR = "bigbench/benchmark_tasks/"
SOURCE_ENV = "ABMLL_BIGBENCH_SOURCE"
WHERE = (f"get BIG-bench's task files (a checkout of the BIG-bench repository, or its bigbench-{BIGBENCH_VERSION}"
         f".tar.gz source archive) and run 'abmll data prepare bigbench --from PATH' (or set {SOURCE_ENV}=PATH)")


def find_source(path: str | Path) -> Path:
    """The archive or source-tree root (the folder holding ``bigbench/benchmark_tasks``) at ``path``:
    a ``.tar.gz`` file, a checkout or unpacked archive, its ``bigbench`` folder, or its
    ``benchmark_tasks`` folder. DataError naming the path otherwise."""
    path = Path(path).expanduser()
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        return path
    if path.is_dir():
        for root in (path, path.parent, path.parent.parent):  # the root, its bigbench/, its benchmark_tasks/
            tasks = root / TASKS_DIR
            if tasks.is_dir() and tasks.resolve().is_relative_to(path.resolve()):
                return root
    raise DataError(f"{path}: not a BIG-bench checkout, source tree or .tar.gz archive (no "
                    f"{TASKS_DIR.rstrip('/')} folder in it); {WHERE}")


def fetcher(source: str | Path | None) -> Callable[[Path], Path]:
    """The ``fetch(staging)`` of a BIG-bench build: the local copy ``source`` (or ``$ABMLL_BIGBENCH_SOURCE``),
    else pip into the staging folder."""
    source = source if source is not None else os.environ.get(SOURCE_ENV) or None
    if source is not None:
        found = find_source(source)
        return lambda staging: found
    return download_bigbench


def download_bigbench(staging: Path) -> Path:
    """Run pip into ``staging``; return the archive or the unpacked source tree (error otherwise)."""
    staging.mkdir(parents=True, exist_ok=True)
    download, tmp = staging / "download", staging / "tmp"
    download.mkdir(exist_ok=True)
    tmp.mkdir(exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-clean",
        "--disable-pip-version-check", "-d", str(download), f"bigbench=={BIGBENCH_VERSION}",
    ]
    result = subprocess.run(cmd, env={**os.environ, "TMPDIR": str(tmp)}, capture_output=True, text=True)
    archives = sorted(download.glob("bigbench-*.tar.gz"))
    if archives:
        return archives[0]
    trees = sorted(p.parent.parent for p in tmp.glob(f"pip-*/*/{TASKS_DIR}"))
    if trees:
        return trees[0]
    said = [line.strip() for line in result.stderr.splitlines() if line.strip().startswith("ERROR")]
    raise DataError(f"bigbench=={BIGBENCH_VERSION} is not available from the package index here (pip: "
                    f"{said[-1] if said else f'exit {result.returncode}'}); {WHERE}")


def _rel(member_name: str) -> str:
    return member_name.split(TASKS_DIR, 1)[1].rsplit("/", 1)[0]


def _is_task_member(member: tarfile.TarInfo) -> bool:
    return member.isfile() and member.name.endswith("/task.json") and TASKS_DIR in member.name


def list_task_dirs(source: Path) -> list[str]:
    """The relative dirs of every ``task.json`` (names only; nothing is read)."""
    if source.is_file():
        with tarfile.open(source, "r:gz") as archive:
            return sorted(_rel(m.name) for m in archive if _is_task_member(m))
    root = source / TASKS_DIR
    return sorted(p.parent.relative_to(root).as_posix() for p in root.rglob("task.json"))


def iter_task_files(source: Path) -> Iterator[tuple[str, bytes]]:
    """``(relative task dir, task.json bytes)`` for every ``benchmark_tasks/**/task.json`` in an
    archive or a source tree; the relative dir is e.g. ``"logical_deduction/three_objects"``."""
    if source.is_file():
        with tarfile.open(source, "r:gz") as archive:
            for member in archive:
                if _is_task_member(member):
                    yield _rel(member.name), archive.extractfile(member).read()
        return
    root = source / TASKS_DIR
    for path in sorted(root.rglob("task.json")):
        yield path.parent.relative_to(root).as_posix(), path.read_bytes()
