"""One writer per run directory: ``<run>/.lock`` holds the writer's pid, host and start time.

The lock file is created with ``O_CREAT | O_EXCL`` (atomic on local file systems), so of two runs
started on one ``--out`` exactly one gets it; the other fails at once with a :class:`RunLockedError`
naming the holder. A lock whose holder is a dead process on this host (a run killed with SIGKILL, a
machine that lost power) is stale: it is reported with a warning and taken over. A lock held from
another host cannot be checked and is never broken automatically; the message says which file to
delete once that run is known to be gone.

Under a launcher (torchrun, accelerate launch) one run is several processes: rank 0 (``RANK``) holds
the lock for all of them, and the other ranks' locks are no-ops.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
import warnings
from pathlib import Path

__all__ = ["RunLock", "RunLockedError", "LOCK_FILE"]

LOCK_FILE = ".lock"


class RunLockedError(ValueError):
    """Another process writes to this run directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}  # half-written by a writer killed between create and write: no pid to check


class RunLock:
    """``with RunLock(run_dir):`` holds the run directory's lock for the block (context manager), or
    ``acquire()`` / ``release()``. Releasing removes the file only if it is still ours."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.held = False

    def _create(self) -> bool:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me) + "\n")
        return True

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if int(os.environ.get("RANK", "0")) != 0:  # rank 0 holds the lock for the whole launch
            return self
        for _ in range(3):  # a stale lock removed by a concurrent starter: try again
            if self._create():
                self.held = True
                return self
            holder = _read(self.path)
            pid, host = holder.get("pid"), holder.get("host")
            if host == socket.gethostname() and isinstance(pid, int) and pid != os.getpid() and not _alive(pid):
                warnings.warn(f"{self.path}: stale lock of process {pid} on {host} (no longer running, "
                              f"started {holder.get('started', '?')}); taking it over")
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            if not holder:
                raise RunLockedError(f"{self.run_dir} is locked by an unreadable {self.path}; if no run is "
                                     f"writing there, delete that file")
            where = "this process" if pid == os.getpid() and host == socket.gethostname() else f"process {pid} on {host}"
            raise RunLockedError(f"{self.run_dir} is in use by {where} (since {holder.get('started', '?')}); wait "
                                 f"for it, or choose another --out (if that run is gone, delete {self.path})")
        raise RunLockedError(f"{self.run_dir}: could not take the lock {self.path}")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = _read(self.path)
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            try:
                self.path.unlink()
            except OSError as err:
                if err.errno != errno.ENOENT:
                    raise

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
