"""Readers for the data files that Debian packages ship, each returning ``(label, text)`` records.

Every reader takes the root of an unpacked package tree (``<root>/usr/share/...``) and yields real
text with the label the source file itself carries; nothing is generated:

* fortune files (``fortunes``, ``fortunes-min``, ``fortunes-de``/``-it``/``-es``/``-br``): records
  separated by a line ``%``; the label is the file (its topic) or the package (its language);
* WordNet 3.0 ``data.{noun,verb,adj,adv}`` (``wordnet-base``): one synset a line,
  ``offset lex_filenum ss_type w_cnt word lex_id ... | gloss``; the label is the lexicographer file
  (:data:`LEXNAMES`, e.g. ``noun.animal``) or the part of speech; the gloss is a definition followed
  by quoted example sentences (``def; "example one"; "example two"``);
* dictd databases (``dict-gcide``, ``dict-foldoc``): ``<name>.dict.dz`` is gzip-compatible
  (dictzip); a sense that starts with a field label -- GCIDE's ``(Zool.)``, FOLDOC's
  ``<networking>`` -- gives that label and the sense's first paragraph.

Text is whitespace-normalized (one line); the label marker itself is removed from the text.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path
from typing import Iterator

__all__ = [
    "LEXNAMES", "clean", "read_fortune_file", "iter_fortunes", "iter_wordnet", "split_gloss",
    "iter_dict_senses", "GCIDE_SENSE", "FOLDOC_SENSE",
]

# WordNet 3.0 lexicographer files by number (lexnames(5WN)); lex_filenum in data.* indexes this list
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change",
    "verb.cognition", "verb.communication", "verb.competition", "verb.consumption", "verb.contact",
    "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social",
    "verb.stative", "verb.weather", "adj.ppl",
)
WORDNET_DIR = "usr/share/wordnet"
POS_FILES = {"noun": "data.noun", "verb": "data.verb", "adjective": "data.adj", "adverb": "data.adv"}

# a sense paragraph that starts (after an optional sense number) with a field label
GCIDE_SENSE = re.compile(r"^[ \t]+(?:\d+\.\s+)?\(([A-Z][a-z]+)\.?\)\s+(.*?)(?=\n\s*\n|\n\s*\[|\Z)", re.M | re.S)
FOLDOC_SENSE = re.compile(r"^[ \t]+(?:\d+\.\s+)?<([a-z][a-z ]*)>\s+(.*?)(?=\n\s*\n|\Z)", re.M | re.S)


def clean(text: str) -> str:
    """One line: dictd cross-reference braces and bracketed notes dropped, citations (``--Name``)
    cut, whitespace collapsed."""
    text = re.sub(r"\[[^\]]*\]", "", text.replace("{", "").replace("}", ""))
    text = re.split(r"\s--\s?[A-Z]", text, maxsplit=1)[0]
    return " ".join(text.split())


def read_fortune_file(path: Path) -> list[str]:
    """The records of one fortune file (UTF-8, Latin-1 as a fallback), each on one line."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    records = re.split(r"^%[ \t]*$", text, flags=re.M)
    return [" ".join(r.split()) for r in records if r.strip()]


def iter_fortunes(folder: Path, names: tuple[str, ...] | None = None) -> Iterator[tuple[str, str]]:
    """``(file name, record)`` for the fortune files in ``folder`` (all plain files, or ``names``);
    ``.dat``/``.u8`` index files and sub-folders are skipped; a ``.fortunes`` suffix is dropped."""
    paths = [folder / n for n in names] if names is not None else sorted(folder.iterdir())
    for path in paths:
        if not path.is_file():
            if names is not None:
                raise FileNotFoundError(f"fortune file {path} is missing")
            continue
        if path.suffix in (".dat", ".u8", ".fortunes-pre"):
            continue
        label = path.name.removesuffix(".fortunes")
        for record in read_fortune_file(path):
            yield label, record


def split_gloss(gloss: str) -> tuple[str, list[str]]:
    """``(definition, [example sentences])`` of a WordNet gloss ``def; "ex one"; "ex two"``."""
    examples = re.findall(r'"([^"]+)"', gloss)
    definition = gloss.split('"', 1)[0].strip().rstrip(";").strip()
    return definition, [e.strip() for e in examples]


def iter_wordnet(root: Path, pos: str) -> Iterator[tuple[str, str, str]]:
    """``(lexicographer file, definition, gloss)`` of every synset of ``data.<pos>``."""
    path = root / WORDNET_DIR / POS_FILES[pos]
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if line.startswith("  ") or "|" not in line:
                continue  # the licence header lines start with two spaces
            head, gloss = line.split("|", 1)
            fields = head.split()
            try:
                lexname = LEXNAMES[int(fields[1])]
            except (IndexError, ValueError):
                raise ValueError(f"{path}:{number}: not a WordNet data line: {line[:80]!r}") from None
            definition, _ = split_gloss(gloss.strip())
            yield lexname, definition, gloss.strip()


def iter_dict_senses(path: Path, sense: re.Pattern) -> Iterator[tuple[str, str]]:
    """``(field label, cleaned sense text)`` for every labelled sense of a dictd ``.dict.dz``."""
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    for match in sense.finditer(text):
        yield match.group(1), clean(match.group(2))
