"""Write docs/RESULTS.md from scripts/results_page/sections.yaml and the summaries under docs/results/.

    python scripts/results_page/build.py            # write the page
    python scripts/results_page/build.py --check    # exit 1, with one line, if the page is stale

Exit status 2, with one line naming the spec key or the summary, when the spec or a summary is wrong.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from page_render import PAGE, SPEC, check, render
from page_spec import SpecError

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare the page with the summaries; write nothing")
    p.add_argument("--root", type=Path, default=ROOT, help="the repository root (default: this checkout)")
    args = p.parse_args(argv)
    try:
        if args.check:
            ok, line = check(args.root)
            print(line, file=sys.stdout if ok else sys.stderr)
            return 0 if ok else 1
        text = render(args.root)
    except SpecError as err:
        print(f"{SPEC}: {err}", file=sys.stderr)
        return 2
    (args.root / PAGE).write_text(text, encoding="utf-8")
    print(f"wrote {PAGE} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
