"""The results page's spec (``sections.yaml``) and the values it reads from the committed summaries.

The spec holds, per section, the question, the command that produced the summaries, the commit, a short
reading, and the tables. It never holds a measured number: a table is a block rendered from one summary
under ``docs/results/`` (``markdown``: a committed ``table.md`` / ``comparison.md`` / ``cost.md``, rows
optionally picked; ``json``: cells that are paths into JSON summaries), and prose quotes a number as
``{{name}}``, where ``values: {name: {file, path | table/row/col, fmt}}`` says which summary holds it.

Every problem with the spec or a summary is a :class:`SpecError` naming the spec key and the value.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

__all__ = ["SpecError", "Summaries", "load_spec", "fmt", "json_get", "COMMIT_IS"]

TOP_KEYS = {"title", "note", "summary", "values", "parts", "history"}
PART_KEYS = {"title", "intro", "sections"}
SECTION_KEYS = {"title", "question", "blocks", "command", "commit", "commit_is", "reading", "values", "plots",
                "also"}
BLOCK_KEYS = {
    "markdown": {"kind", "file", "tables", "rows", "prose", "caption", "command", "commit", "commit_is"},
    "json": {"kind", "columns", "rows", "caption", "command", "commit", "commit_is"},
}
COLUMN_KEYS = {"header", "label", "path", "file", "fmt", "scale", "divide", "optional"}
ROW_KEYS = {"label", "file", "at", "each", "vars"}
COMMIT_IS = {"code": "code at", "summaries": "summaries committed in"}


class SpecError(ValueError):
    """The spec or a summary it names is wrong; the message names the key and the offending value."""


def _check_keys(obj: Any, allowed: set[str], where: str, required: tuple[str, ...] = ()) -> dict:
    if not isinstance(obj, dict):
        raise SpecError(f"{where}: expected a mapping, got {obj!r}")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise SpecError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    for key in required:
        if key not in obj:
            raise SpecError(f"{where}: missing key {key!r}")
    return obj


def load_spec(path: Path) -> dict:
    """The spec, its keys checked (values and files are checked when rendered)."""
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise SpecError(f"cannot read the spec ({str(err).splitlines()[0]})") from None
    _check_keys(spec, TOP_KEYS, "top level", ("title", "summary", "parts"))
    for i, part in enumerate(spec["parts"]):
        _check_keys(part, PART_KEYS, f"parts[{i}]", ("title", "sections"))
        for j, section in enumerate(part["sections"]):
            where = f"parts[{i}].sections[{j}]"
            _check_keys(section, SECTION_KEYS, where, ("title", "question", "reading"))
            if section.get("blocks") and "command" not in section:
                raise SpecError(f"{where}: a section with tables needs its 'command'")
            if "commit" in section:
                check_commit(section, where)
            for k, block in enumerate(section.get("blocks", [])):
                kind = block.get("kind") if isinstance(block, dict) else None
                if kind not in BLOCK_KEYS:
                    raise SpecError(f"{where}.blocks[{k}].kind: {kind!r} is not one of {sorted(BLOCK_KEYS)}")
                _check_keys(block, BLOCK_KEYS[kind], f"{where}.blocks[{k}]")
                if kind == "json":
                    for c, column in enumerate(block.get("columns") or []):
                        _check_keys(column, COLUMN_KEYS, f"{where}.blocks[{k}].columns[{c}]", ("header",))
                        if not column.get("label") and "path" not in column:
                            raise SpecError(f"{where}.blocks[{k}].columns[{c}]: needs 'path' (or label: true)")
                    for r, row in enumerate(block.get("rows") or []):
                        _check_keys(row, ROW_KEYS, f"{where}.blocks[{k}].rows[{r}]")
                if "commit" in block:
                    check_commit(block, f"{where}.blocks[{k}]")
    return spec


def check_commit(obj: dict, where: str) -> None:
    if not re.fullmatch(r"[0-9a-f]{7,40}", str(obj["commit"])):
        raise SpecError(f"{where}.commit: {obj['commit']!r} is not an abbreviated commit id")
    if obj.get("commit_is", "code") not in COMMIT_IS:
        raise SpecError(f"{where}.commit_is: {obj.get('commit_is')!r} is not one of {sorted(COMMIT_IS)}")


def fmt(value: Any, spec: dict, where: str) -> str:
    """One cell: ``fmt`` is a Python format spec (``.3f``, ``+.3f``, ``.2g``, ``,.0f``), ``len`` (a list's
    length) or ``str``; ``scale`` / ``divide`` apply first; a missing value (None) is an em dash."""
    form = spec.get("fmt", "str")
    if value is None:
        return "—"
    if form == "len":
        return str(len(value))
    if form == "str":
        return str(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{where}: fmt {form!r} needs a number, the summary holds {value!r}")
    for key in ("scale", "divide"):
        factor = spec.get(key)
        if key in spec and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor == 0):
            raise SpecError(f"{where}.{key}: needs a non-zero number, got {factor!r} (YAML reads 1e-9 as text: write 1.0e-9)")
    if "scale" in spec:
        value = value * spec["scale"]
    if "divide" in spec:
        value = value / spec["divide"]
    try:
        text = format(value, form)
    except ValueError as err:
        raise SpecError(f"{where}.fmt: {form!r} ({err})") from None
    return text


_REQUIRED = object()


def json_get(obj: Any, path: str | list[str], where: str, default: Any = _REQUIRED) -> Any:
    """``a.b.0.c`` into nested dicts and lists; a list of paths: the first that exists; ``default`` when
    none does (else a :class:`SpecError`)."""
    paths = path if isinstance(path, list) else [path]
    for candidate in paths:
        node, found = obj, True
        for key in str(candidate).split("."):
            if isinstance(node, list) and key.lstrip("-").isdigit() and -len(node) <= int(key) < len(node):
                node = node[int(key)]
            elif isinstance(node, dict) and key in node:
                node = node[key]
            else:
                found = False
                break
        if found:
            return node
    if default is not _REQUIRED:
        return default
    raise SpecError(f"{where}.path: {path!r} is not in the summary")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _plain(cell: str) -> str:
    return cell.replace("**", "").strip()


class Summaries:
    """Read-only access to the committed summaries under ``root`` (``docs/results``), cached per file."""

    def __init__(self, root: Path):
        self.root = root
        self.read: list[str] = []  # every file read, in order (the section's "Summaries" line)
        self._texts: dict[str, str] = {}

    def path(self, name: str, where: str) -> Path:
        if not isinstance(name, str) or name.startswith("/") or ".." in Path(name).parts:
            raise SpecError(f"{where}: {name!r} is not a path under docs/results/")
        path = self.root / name
        if not path.is_file():
            raise SpecError(f"{where}: docs/results/{name} does not exist")
        if name not in self.read:
            self.read.append(name)
        return path

    def json(self, name: str, where: str) -> Any:
        try:
            return json.loads(self.text(name, where))
        except ValueError as err:
            raise SpecError(f"{where}: docs/results/{name} is not JSON ({err})") from None

    def text(self, name: str, where: str) -> str:
        path = self.path(name, where)
        if name not in self._texts:
            self._texts[name] = path.read_text(encoding="utf-8")
        return self._texts[name]

    def tables(self, name: str, where: str) -> list[list[str]]:
        """The markdown tables of a file, each as its lines (header, rule, rows)."""
        tables, current = [], []
        for line in self.text(name, where).splitlines():
            if line.startswith("|"):
                current.append(line)
            elif current:
                tables.append(current)
                current = []
        if current:
            tables.append(current)
        if not tables:
            raise SpecError(f"{where}: docs/results/{name} holds no table")
        return tables

    def md_cell(self, name: str, table: int, row: str, col: str, where: str) -> str:
        tables = self.tables(name, where)
        if not 0 <= table < len(tables):
            raise SpecError(f"{where}.table: {table} (docs/results/{name} has {len(tables)} tables)")
        lines = tables[table]
        header = _cells(lines[0])
        cols = [i for i, h in enumerate(header) if h == col] or [i for i, h in enumerate(header)
                                                                   if h.startswith(col + " ")]
        if not cols:
            raise SpecError(f"{where}.col: {col!r} is not a column of docs/results/{name} ({header})")
        for line in lines[2:]:
            cells = _cells(line)
            if _plain(cells[0]) == row:
                return _plain(cells[cols[0]])
        raise SpecError(f"{where}.row: {row!r} is not a row of docs/results/{name}")

    def value(self, ref: dict, where: str) -> str:
        """A ``values`` entry: ``{file, path, fmt}`` (JSON) or ``{file, table, row, col}`` (markdown; with
        ``after: "→"`` the cell's text after its last arrow, e.g. an across-seeds mean and interval)."""
        if not isinstance(ref, dict) or "file" not in ref:
            raise SpecError(f"{where}: expected {{file, path}} or {{file, row, col}}, got {ref!r}")
        if "path" in ref:
            return fmt(json_get(self.json(ref["file"], where), ref["path"], where), ref, where)
        if "row" in ref and "col" in ref:
            cell = self.md_cell(ref["file"], int(ref.get("table", 0)), str(ref["row"]), str(ref["col"]), where)
            if "after" in ref:
                if ref["after"] not in cell:
                    raise SpecError(f"{where}.after: {ref['after']!r} is not in the cell {cell!r}")
                cell = cell.rsplit(ref["after"], 1)[1].strip()
            return cell.removesuffix(" *")  # the resolved-interval mark: the prose says what is resolved
        raise SpecError(f"{where}: a value needs 'path' (JSON) or 'row' and 'col' (markdown), got {sorted(ref)}")
