"""Fetch the BIG-bench 1.0.0 task files from PyPI's source archive with pip (no hub needed).

``pip download --no-deps --no-binary :all: bigbench==1.0.0`` downloads the 358 MB sdist. Recent pip
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
from typing import Iterator

__all__ = ["BIGBENCH_VERSION", "download_bigbench", "list_task_dirs", "iter_task_files"]

BIGBENCH_VERSION = "1.0.0"
TASKS_DIR = "bigbench/benchmark_tasks/"


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
    raise RuntimeError(
        f"could not fetch bigbench=={BIGBENCH_VERSION} with pip (exit {result.returncode}); "
        f"command: {' '.join(cmd)}\n{result.stderr[-2000:]}"
    )


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
