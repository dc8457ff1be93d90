"""A task folder's content fingerprint: which data a result saw, in 16 hex digits.

SHA-256 over the folder's task files (``*.jsonl``) and ``splits.json``, in name order, each entered as
its name and the SHA-256 of its bytes. Two builds of a suite that wrote the same examples in the same
files and the same split have the same fingerprint wherever and however they were fetched; one changed
byte changes it. Written into a built suite's ``manifest.json`` and every run's ``results.json``
(``data_fingerprint``), and printed by ``abmll benchmark``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["folder_fingerprint", "file_sha256", "FINGERPRINT_DIGITS"]

FINGERPRINT_DIGITS = 16


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_fingerprint(root: str | Path) -> str:
    """The fingerprint of the task folder ``root`` (see the module docstring)."""
    root = Path(root)
    files = sorted(p for p in root.iterdir() if p.is_file() and (p.suffix == ".jsonl" or p.name == "splits.json"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()[:FINGERPRINT_DIGITS]
