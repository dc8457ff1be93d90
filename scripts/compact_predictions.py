"""Rewrite prediction files in the compact form kept in the repository (float32 precision, xz).

    python scripts/compact_predictions.py docs/results            # every *predictions.jsonl under it
    python scripts/compact_predictions.py runs/long --keep        # keep the plain files beside them

``abmll compare`` reads ``*.jsonl.xz`` as it reads ``*.jsonl``; a table recomputed from the compact
files agrees with the plain files' to float32 round-off (tests/measure/test_predictions_io.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from abmll_pyro.eval.predictions_io import compact_predictions


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("paths", nargs="+", help="prediction files or folders to search for *predictions.jsonl")
    p.add_argument("--keep", action="store_true", help="keep the plain files (default: remove them once written)")
    args = p.parse_args(argv)
    files = []
    for raw in args.paths:
        path = Path(raw)
        if not path.exists():
            p.error(f"{path} does not exist")
        files.extend([path] if path.is_file() else sorted(path.rglob("*predictions.jsonl")))
    before = after = 0
    for file in files:
        target = compact_predictions(file)
        before, after = before + file.stat().st_size, after + target.stat().st_size
        if not args.keep:
            file.unlink()
    print(f"{len(files)} files: {before:,} -> {after:,} bytes")


if __name__ == "__main__":
    main()
