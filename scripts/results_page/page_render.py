"""Render docs/RESULTS.md from the spec and the committed summaries, and check the page against them.

The page: a title, a note saying how it is made, the contents, the one-paragraph summary, then one part
per question, each section with its question, its tables (rendered from the summaries), its reading,
its command and commit, the summaries it read and the plots it links. ``render(root)`` is a pure
function of the files under ``root``; ``check`` compares it with the page on disk.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from page_spec import COMMIT_IS, SpecError, Summaries, fmt, json_get, load_spec

__all__ = ["SPEC", "PAGE", "RESULTS", "render", "check", "slug"]

SPEC = Path("scripts/results_page/sections.yaml")
PAGE = Path("docs/RESULTS.md")
RESULTS = Path("docs/results")
_VALUE = re.compile(r"\{\{\s*([\w.-]+)\s*\}\}")


def slug(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped (letters, digits, ``-``, ``_`` kept),
    spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def _fill(text: str, values: dict, summaries: Summaries, where: str) -> str:
    """Prose with each ``{{name}}`` replaced by the summary value ``values[name]`` names."""
    def one(match: re.Match) -> str:
        name = match.group(1)
        if name not in values:
            raise SpecError(f"{where}: {{{{{name}}}}} is not in 'values' ({sorted(values)})")
        return summaries.value(values[name], f"values.{name}")
    return _VALUE.sub(one, str(text).strip())


def _pick_rows(lines: list[str], rows: list[str], name: str, where: str) -> list[str]:
    """A table's header and rule, then the rows whose first cell is in ``rows``, in that order."""
    by_first = {line.split("|")[1].replace("**", "").strip(): line for line in lines[2:]}
    missing = [r for r in rows if r not in by_first]
    if missing:
        raise SpecError(f"{where}.rows: {missing[0]!r} is not a row of docs/results/{name} ({sorted(by_first)})")
    return lines[:2] + [by_first[r] for r in rows]


def _markdown_block(block: dict, summaries: Summaries, where: str) -> str:
    """A committed markdown summary's tables (``tables``: which, by index; ``rows``: which rows); with
    ``prose: true`` its paragraphs too, in the file's order."""
    name = block.get("file")
    text = summaries.text(name, f"{where}.file")
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    tables = [p for p in paragraphs if p.startswith("|")]
    picked = block.get("tables", list(range(len(tables))))
    if not isinstance(picked, list) or any(not isinstance(t, int) or not 0 <= t < len(tables) for t in picked):
        raise SpecError(f"{where}.tables: {picked!r} (docs/results/{name} has {len(tables)} tables)")
    if not picked and not block.get("prose"):
        raise SpecError(f"{where}: no table picked from docs/results/{name} and no prose asked for")
    out, index = [], 0
    for paragraph in paragraphs:
        if paragraph.startswith("|"):
            if index in picked:
                lines = paragraph.splitlines()
                out.append("\n".join(_pick_rows(lines, block["rows"], name, where) if "rows" in block else lines))
            index += 1
        elif block.get("prose"):
            out.append(paragraph)
    return "\n\n".join(out)


def _json_rows(row: dict, summaries: Summaries, where: str) -> list[tuple[str, object, dict]]:
    """(label, object the columns read from, the row's variables) for one row spec or its ``each`` list."""
    variables = dict(row.get("vars", {}))
    file = str(row.get("file", "")).format(**variables)
    node = summaries.json(file, f"{where}.file") if file else None
    if "at" in row:
        node = json_get(node, row["at"], where)
    if "each" not in row:
        return [(str(row.get("label", "")).format(**variables), node, variables)]
    items = json_get(node, row["each"], where)
    if not isinstance(items, list):
        raise SpecError(f"{where}.each: {row['each']!r} is not a list in docs/results/{file}")
    out = []
    for item in items:
        label = str(row.get("label", "")).format_map({**variables, **(item if isinstance(item, dict) else {})})
        out.append((label, item, variables))
    return out


def _json_block(block: dict, summaries: Summaries, where: str) -> str:
    columns = block.get("columns") or []
    if not columns or not block.get("rows"):
        raise SpecError(f"{where}: a json table needs 'columns' and 'rows'")
    lines = ["| " + " | ".join(str(c.get("header", "")) for c in columns) + " |",
             "|" + "---|" * len(columns)]
    for i, row in enumerate(block["rows"]):
        for label, node, variables in _json_rows(row, summaries, f"{where}.rows[{i}]"):
            cells = []
            for j, col in enumerate(columns):
                at = f"{where}.columns[{j}]"
                if col.get("label"):
                    cells.append(label)
                    continue
                source = node
                if "file" in col:
                    source = summaries.json(str(col["file"]).format(**variables, label=label), f"{at}.file")
                path = col.get("path")
                path = [str(p).format(**variables) for p in path] if isinstance(path, list) else \
                    str(path).format(**variables)
                value = json_get(source, path, at, None) if col.get("optional") else json_get(source, path, at)
                cells.append(fmt(value, col, at))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _provenance(obj: dict, label: str) -> str:
    commit = f"{COMMIT_IS[obj.get('commit_is', 'code')]} `{obj['commit']}`" if "commit" in obj else ""
    commands = obj["command"] if isinstance(obj["command"], list) else [obj["command"]]
    head = f"{label} ({commit}):" if commit else f"{label}:"
    return head + "\n\n```bash\n" + "\n".join(c.strip() for c in commands) + "\n```"


def _grouped(names: list[str]) -> list[str]:
    """``docs/results/`` paths, the files of one folder as ``folder/{a,b}`` when there are several."""
    folders: dict[str, list[str]] = {}
    for name in names:
        folder, _, file = name.rpartition("/")
        folders.setdefault(folder, []).append(file)
    return [f"`docs/results/{folder}/{files[0]}`" if len(files) == 1 else
            f"`docs/results/{folder}/{{{','.join(files)}}}`" for folder, files in folders.items()]


def _section(section: dict, number: str, values: dict, summaries: Summaries, where: str) -> str:
    summaries.read = []
    values = {**values, **section.get("values", {})}
    out = [f"### {number} {section['title']}", f"**Question.** {_fill(section['question'], values, summaries, where)}"]
    for k, block in enumerate(section.get("blocks", [])):
        at = f"{where}.blocks[{k}]"
        if block.get("caption"):
            out.append(f"*{_fill(block['caption'], values, summaries, at)}*")
        out.append(_markdown_block(block, summaries, at) if block["kind"] == "markdown"
                   else _json_block(block, summaries, at))
        if "command" in block:
            out.append(_provenance(block, "This table's command"))
    out.append(f"**Reading.** {_fill(section['reading'], values, summaries, where)}")
    if "command" in section:
        out.append(_provenance(section, "Command"))
    for name in section.get("also", []):
        summaries.path(name, f"{where}.also")
    if summaries.read:
        out.append("Summaries: " + ", ".join(_grouped(summaries.read)) + ".")
    plots = section.get("plots", [])
    if plots:
        for name in plots:
            if not str(name).endswith(".png"):
                raise SpecError(f"{where}.plots: {name!r} is not a .png")
            summaries.path(name, f"{where}.plots")
        out.append("Plots: " + ", ".join(f"[{Path(n).stem}](results/{n})" for n in plots) + ".")
    return "\n\n".join(out)


def render(root: Path) -> str:
    """The page for the repository at ``root``: a function of the spec and the summaries only."""
    spec = load_spec(root / SPEC)
    summaries = Summaries(root / RESULTS)
    values = spec.get("values", {})
    titles, bodies, seen = [], [], set()
    for i, part in enumerate(spec["parts"], start=1):
        part_title = f"{i}. {part['title']}"
        titles.append((part_title, 0))
        body = [f"## {part_title}"]
        if part.get("intro"):
            body.append(_fill(part["intro"], values, summaries, f"parts[{i - 1}].intro"))
        for j, section in enumerate(part["sections"], start=1):
            number = f"{i}.{j}"
            titles.append((f"{number} {section['title']}", 1))
            body.append(_section(section, number, values, summaries, f"parts[{i - 1}].sections[{j - 1}]"))
        bodies.append("\n\n".join(body))
    for title, _ in titles:
        if slug(title) in seen:
            raise SpecError(f"two headings share the anchor #{slug(title)}")
        seen.add(slug(title))
    summaries.read = []
    contents = ["Contents:", ""] + [f"{'  ' * depth}- [{t}](#{slug(t)})" for t, depth in titles]
    head = [f"# {spec['title']}", f"<!-- {spec['note'].strip()} -->" if spec.get("note") else "",
            "\n".join(contents), "## Summary", _fill(spec["summary"], values, summaries, "summary")]
    tail = ["## History", _fill(spec["history"], values, summaries, "history")] if spec.get("history") else []
    return "\n\n".join(p for p in head + bodies + tail if p) + "\n"


def check(root: Path) -> tuple[bool, str]:
    """(whether ``docs/RESULTS.md`` is what the summaries give, a one-line account)."""
    want = render(root)
    page = root / PAGE
    if not page.is_file():
        return False, f"{PAGE} does not exist; run python scripts/results_page/build.py"
    have = page.read_text(encoding="utf-8")
    if have == want:
        return True, f"{PAGE} is up to date ({len(want.splitlines())} lines)"
    old, new = have.splitlines(), want.splitlines()
    changed = sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in
                  difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes() if tag != "equal")
    first = next((n for n, (a, b) in enumerate(zip(old, new), start=1) if a != b), min(len(old), len(new)) + 1)
    return False, (f"{PAGE} differs from what the summaries give: {changed} line(s) differ, the first at line "
                   f"{first}; run python scripts/results_page/build.py")
