"""Prediction files, plain or compact: ``predictions.jsonl`` as runs write it, or ``*.jsonl.xz`` /
``*.jsonl.gz`` as results are kept in the repository.

:func:`open_predictions` reads any of the three as text (the suffix decides), so ``abmll compare`` and
everything built on :func:`~abmll_pyro.eval.compare.load_predictions` read compact files transparently.
:func:`compact_predictions` writes the compact form: every float rounded to float32 precision (the
shortest decimal that round-trips a float32: ~9 significant digits, far below any difference a table
reports) and the JSON lines compressed with xz — about 10× smaller than what a run writes.
"""

from __future__ import annotations

import gzip
import json
import lzma
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["PREDICTION_SUFFIXES", "open_predictions", "is_predictions_file", "compact_record", "compact_predictions"]

PREDICTION_SUFFIXES = (".jsonl", ".jsonl.xz", ".jsonl.gz")


def is_predictions_file(path: Path) -> bool:
    return path.name.endswith(PREDICTION_SUFFIXES)


def open_predictions(path: str | Path) -> IO[str]:
    """``path`` opened for reading as UTF-8 text, decompressed when it ends in ``.xz`` or ``.gz``."""
    path = Path(path)
    if path.name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _f32(value: float) -> float:
    return float(str(np.float32(value)))


def compact_record(record: dict[str, Any]) -> dict[str, Any]:
    """The record with every float, and every float in a list, at float32 precision."""
    out = {}
    for key, value in record.items():
        if isinstance(value, float):
            value = _f32(value)
        elif isinstance(value, list):
            value = [_f32(v) if isinstance(v, float) else v for v in value]
        out[key] = value
    return out


def compact_predictions(source: str | Path, target: str | Path | None = None) -> Path:
    """Write ``source`` (plain or compressed) as ``target`` (default ``source`` + ``.xz``, or the same
    name with ``.xz`` for a ``.gz`` file) in the compact form; return the path written."""
    source = Path(source)
    if target is None:
        stem = source.name[:-3] if source.name.endswith(".gz") else source.name
        target = source.with_name(stem[:-3] + ".xz" if stem.endswith(".xz") else stem + ".xz")
    target = Path(target)
    if target.resolve() == source.resolve():
        raise ValueError(f"{target}: the compact file would overwrite its own source")
    lines = []
    with open_predictions(source) as handle:
        for lineno, line in enumerate(handle, 1):
            if line.strip():
                try:
                    lines.append(json.dumps(compact_record(json.loads(line)), separators=(",", ":")))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{source}:{lineno}: not JSON ({err.msg})") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    with lzma.open(tmp, "wt", encoding="utf-8", preset=9) as out:
        out.write("".join(line + "\n" for line in lines))
    tmp.replace(target)
    return target
