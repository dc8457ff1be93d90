"""What a writer may replace: nothing of the user's, never its own input, never the filesystem root.

Every command that writes (``train``, ``evaluate``, ``predict``, ``generate``, ``export``,
``benchmark``, ``compare``, ``data synthetic``) checks its ``--out`` here first:

* a folder it writes into must be new, empty, or one it wrote itself, recognized by the marker file
  :data:`MARKER` (``{"kind": "run"}``, ``"benchmark"``, ...) that it leaves there, and hold only the
  names such a writer writes; anything else is an :class:`OutputError` naming the folder and a few of
  the foreign names, unless ``--overwrite``;
* a file it writes must not be one of its inputs (``predict --out`` equal to ``--query``), must not be
  a folder, and an existing file must look like one the same command wrote (its first JSON record
  has the command's keys) unless ``--overwrite``;
* ``/`` is refused always.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

__all__ = ["MARKER", "OutputError", "check_output_dir", "check_output_file", "mark_output", "refuse_root",
           "first_record_has", "marker_kind", "TEMPORARIES"]

MARKER = ".abmll.json"
_ALWAYS_OURS = (MARKER, ".lock")  # (a user's ".lock" is reported by the run lock itself)
TEMPORARIES = ".*.tmp-*"  # an interrupted writer's temporary files (ours only in a folder we wrote)


class OutputError(ValueError):
    """An output path that would lose the user's data; the message names it and says how to proceed."""


def refuse_root(path: str | Path, flag: str = "--out") -> Path:
    path = Path(path)
    resolved = path.resolve()
    if resolved == Path(resolved.anchor):
        raise OutputError(f"{flag} {path} is the filesystem root; choose a folder of its own")
    return path


def marker_kind(folder: Path) -> str | None:
    """The kind of writer whose :data:`MARKER` ``folder`` holds (None: no marker)."""
    try:
        kind = json.loads((folder / MARKER).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def check_output_dir(folder: str | Path, kinds: str | tuple[str, ...], ours: Iterable[str], overwrite: bool,
                     flag: str = "--out", legacy: Callable[[Path], bool] | None = None) -> Path:
    """Refuse ``folder`` unless it is new, empty, or was written by a writer of one of ``kinds`` (its
    :data:`MARKER`, or ``legacy(folder)`` for folders written before the marker) and holds only names
    matching the patterns ``ours``. ``overwrite`` allows any folder but the root."""
    folder = refuse_root(folder, flag)
    kinds = (kinds,) if isinstance(kinds, str) else kinds
    if not folder.exists():
        return folder
    if not folder.is_dir():
        raise OutputError(f"{flag} {folder} exists and is not a folder")
    if overwrite:
        return folder
    names = sorted(n for n in os.listdir(folder) if not _matches(n, _ALWAYS_OURS))
    if not names:
        return folder
    patterns = tuple(ours)
    written = marker_kind(folder) in kinds or (legacy is not None and marker_kind(folder) is None and legacy(folder))
    foreign = names if not written else [n for n in names if not _matches(n, patterns)]
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise OutputError(f"{flag} {folder} holds files abmll did not write there ({shown}); choose a new or empty "
                          f"folder, or pass --overwrite to write into it anyway")
    return folder


def mark_output(folder: str | Path, kind: str) -> None:
    """Leave the marker that lets the next writer of ``kind`` recognize ``folder`` as its own."""
    path = Path(folder) / MARKER
    if marker_kind(Path(folder)) != kind:
        path.write_text(json.dumps({"kind": kind, "written_by": "abmll"}) + "\n", encoding="utf-8")


def first_record_has(*keys: str) -> Callable[[Path], bool]:
    """A test for :func:`check_output_file`: the file's first line (or whole text) is a JSON object with ``keys``."""
    def test(path: Path) -> bool:
        try:
            with open(path, "rb") as f:
                head = f.read(64 << 20)  # a results JSON is one object: read it whole (up to 64 MiB)
            text = head.decode("utf-8", errors="replace")
            try:
                record = json.loads(text)
            except ValueError:
                record = json.loads(text.split("\n", 1)[0])
        except (OSError, ValueError):
            return False
        return isinstance(record, dict) and all(k in record for k in keys)

    return test


def check_output_file(path: str | Path | None, overwrite: bool, inputs: Mapping[str, str | Path | None] = {},
                      ours: Callable[[Path], bool] | None = None, flag: str = "--out") -> Path | None:
    """Refuse an output file that is an input (``inputs``: flag -> path), a folder, the root, or an
    existing file that ``ours`` does not recognize (unless ``overwrite``). None (stdout) passes."""
    if path is None:
        return None
    path = refuse_root(path, flag)
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder; give the path of a file to write")
    for name, given in inputs.items():
        if given is not None and path.exists() and Path(given).exists() and os.path.samefile(path, given):
            raise OutputError(f"{flag} {path} is the {name} file: writing it would replace the input; choose "
                              f"another {flag}")
    if (not overwrite and path.is_file() and path.stat().st_size > 0
            and not (ours is not None and ours(path))):
        raise OutputError(f"{flag} {path} exists and was not written by this command; pass --overwrite to replace "
                          f"it, or choose another {flag}")
    return path
