"""``debian-cls``: real label-word classification tasks from data that Debian packages ship.

Seven families, each a source and a label space (:data:`FAMILIES`); a task is a 2-6-way choice
between some of its family's labels, the options are the label words (``"zoology"``, scored as
``" zoology"``), the input is the real text the source files under that label:

=====================  =================================  ==========================================
family                 input                              label (where it comes from)
=====================  =================================  ==========================================
fortune-topic          an English fortune                 its fortune file (``computers``, ``food``)
fortune-language       a fortune                          the package's language (``German``)
wordnet-noun           a noun synset's definition         its lexicographer file (``noun.animal``)
wordnet-verb           a verb synset's example sentence   its lexicographer file (``verb.motion``)
wordnet-pos            a synset's definition              its part of speech (``data.adj``)
gcide-domain           a Webster 1913 sense               its field label (``(Zool.)``)
foldoc-domain          a FOLDOC sense                     its subject tag (``<networking>``)
=====================  =================================  ==========================================

Per task: texts of 15-300 characters (fortunes also at least 60% letters, which drops ASCII art;
dictionary senses not a bare cross-reference such as ``See Hypermetropia.``; none with undecodable
bytes),
deduplicated, a text filed under two of the task's labels dropped; then the same number of texts per
label, ``min(MAX_EXAMPLES // k, smallest label's count)``, drawn and shuffled with a seed from the
task name, so chance is exactly 1/k. A task with fewer than :data:`MIN_EXAMPLES` is an error.

The split is by family (``debian_cls_split.json``, committed): the test families are held out whole,
so test asks for transfer to a new source and label space.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable

from abmll_pyro.data.sources import debian_readers as rd
from abmll_pyro.data.tasks import Example, Task

__all__ = ["FAMILIES", "TASKS", "task_name", "family_of", "build_tasks", "packaged_split", "SPLIT_FILE",
           "convert", "prepare_debian_cls",
           "MIN_EXAMPLES", "MAX_EXAMPLES"]

MIN_EXAMPLES, MAX_EXAMPLES = 64, 192
MIN_CHARS, MAX_CHARS = 15, 300
SPLIT_FILE = "debian_cls_split.json"
CROSS_REFERENCES = ("See ", "Same as ", "Same as.", "See also ")
FORTUNES = Path("usr/share/games/fortunes")

Pool = dict[str, list[str]]  # label word -> texts


def _fortune_topics(root: Path) -> Pool:
    pool: Pool = defaultdict(list)
    for label, text in rd.iter_fortunes(root / FORTUNES):
        pool[label].append(text)
    return pool


def _fortune_languages(root: Path) -> Pool:
    sources = {
        "English": (root / FORTUNES, ("fortunes", "literature", "riddles")),
        "German": (root / FORTUNES / "de", None),
        "Italian": (root / FORTUNES / "it", None),
        "Spanish": (root / FORTUNES / "es", None),
        "Portuguese": (root / FORTUNES, ("brasil",)),
    }
    return {lang: [t for _, t in rd.iter_fortunes(folder, names)] for lang, (folder, names) in sources.items()}


def _wordnet_lexfiles(root: Path, pos: str, examples: bool) -> Pool:
    pool: Pool = defaultdict(list)
    for lexname, definition, gloss in rd.iter_wordnet(root, pos):
        label = lexname.split(".", 1)[1]
        pool[label].extend(rd.split_gloss(gloss)[1] if examples else [definition])
    return pool


def _wordnet_pos(root: Path) -> Pool:
    return {pos: [d for _, d, _ in rd.iter_wordnet(root, pos)] for pos in rd.POS_FILES}


GCIDE_FIELDS = {
    "Zool": "zoology", "Bot": "botany", "Chem": "chemistry", "Med": "medicine", "Anat": "anatomy",
    "Naut": "nautical", "Mus": "music", "Arch": "architecture", "Mil": "military", "Math": "mathematics",
    "Astron": "astronomy", "Geol": "geology", "Law": "law", "Eccl": "church", "Her": "heraldry",
}


def _dict_fields(root: Path, path: str, sense, names: dict[str, str] | None) -> Pool:
    pool: Pool = defaultdict(list)
    for label, text in rd.iter_dict_senses(root / path, sense):
        word = names.get(label) if names is not None else label
        if word is not None:
            pool[word].append(text)
    return pool


# family -> (pool builder, tasks as tuples of label words); the order of labels is the option order
FAMILIES: dict[str, tuple[Callable[[Path], Pool], tuple[tuple[str, ...], ...]]] = {
    "fortune-topic": (_fortune_topics, (
        ("computers", "food"), ("love", "work"), ("science", "politics"), ("sports", "education"),
        ("kids", "drugs"), ("art", "law"), ("medicine", "pets"), ("food", "love", "work"),
        ("computers", "science", "politics", "sports"),
    )),
    "fortune-language": (_fortune_languages, (
        ("English", "German"), ("Spanish", "Italian"), ("Spanish", "Portuguese"), ("Italian", "Portuguese"),
        ("German", "Italian", "Spanish"), ("English", "German", "Italian", "Spanish", "Portuguese"),
    )),
    "wordnet-noun": (partial(_wordnet_lexfiles, pos="noun", examples=False), (
        ("animal", "plant"), ("food", "body"), ("artifact", "person"), ("location", "time"),
        ("feeling", "cognition"), ("substance", "act"), ("communication", "event"),
        ("animal", "plant", "food"), ("person", "location", "artifact", "time"),
    )),
    "wordnet-verb": (partial(_wordnet_lexfiles, pos="verb", examples=True), (
        ("motion", "communication"), ("consumption", "emotion"), ("contact", "cognition"),
        ("perception", "possession"), ("competition", "creation"), ("social", "change"),
        ("motion", "communication", "cognition"),
    )),
    "wordnet-pos": (_wordnet_pos, (
        ("noun", "verb"), ("adjective", "adverb"), ("noun", "adjective"), ("verb", "adjective", "adverb"),
    )),
    "gcide-domain": (partial(_dict_fields, path="usr/share/dictd/gcide.dict.dz", sense=rd.GCIDE_SENSE,
                             names=GCIDE_FIELDS), (
        ("zoology", "botany"), ("medicine", "law"), ("music", "nautical"), ("chemistry", "anatomy"),
        ("mathematics", "architecture"), ("military", "church"), ("geology", "astronomy"),
        ("zoology", "botany", "medicine"), ("law", "music", "chemistry", "mathematics"),
    )),
    "foldoc-domain": (partial(_dict_fields, path="usr/share/dictd/foldoc.dict.dz", sense=rd.FOLDOC_SENSE,
                              names=None), (
        ("programming", "networking"), ("hardware", "language"), ("database", "company"),
        ("mathematics", "storage"), ("operating system", "communications"),
        ("programming", "networking", "hardware"),
    )),
}


def task_name(family: str, labels: Iterable[str]) -> str:
    """``family.label1_label2`` (spaces in a label become ``-``)."""
    return f"{family}.{'_'.join(l.replace(' ', '-') for l in labels)}"


def family_of(name: str) -> str:
    return name.split(".", 1)[0]


TASKS: dict[str, tuple[str, tuple[str, ...]]] = {
    task_name(f, labels): (f, labels) for f, (_, tasks) in FAMILIES.items() for labels in tasks
}


def _usable(text: str, family: str) -> bool:
    if not MIN_CHARS <= len(text) <= MAX_CHARS or "\ufffd" in text:  # U+FFFD: undecodable bytes
        return False
    if family.startswith("fortune"):
        return sum(c.isalpha() or c.isspace() for c in text) >= 0.6 * len(text)
    return not text.startswith(CROSS_REFERENCES)  # "See Hypermetropia." says nothing on its own


def make_task(name: str, pool: Pool) -> Task:
    """One balanced task from its family's pool (see the module docstring)."""
    family, labels = TASKS[name]
    texts = {l: list(dict.fromkeys(t for t in pool.get(l, ()) if _usable(t, family))) for l in labels}
    seen: dict[str, int] = defaultdict(int)
    for label in labels:
        for t in texts[label]:
            seen[t] += 1
    texts = {l: [t for t in ts if seen[t] == 1] for l, ts in texts.items()}
    per_label = min(MAX_EXAMPLES // len(labels), *(len(ts) for ts in texts.values()))
    if per_label * len(labels) < MIN_EXAMPLES:
        counts = {l: len(ts) for l, ts in texts.items()}
        raise ValueError(f"debian-cls task {name}: too few usable texts per label {counts} "
                         f"(need {MIN_EXAMPLES} in all, the same number per label)")
    rng = random.Random(hashlib.sha256(name.encode()).hexdigest())
    examples = [Example(t, list(labels), i) for i, l in enumerate(labels) for t in rng.sample(texts[l], per_label)]
    rng.shuffle(examples)
    return Task(name, examples)


def build_tasks(root: Path, names: Iterable[str] | None = None) -> Iterable[Task]:
    """The tasks (all, or ``names``) from an unpacked package tree ``root``, one family pool at a time."""
    wanted = list(TASKS) if names is None else list(names)
    unknown = [n for n in wanted if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown debian-cls task(s) {unknown}; known: {sorted(TASKS)}")
    for family, (builder, _) in FAMILIES.items():
        members = [n for n in wanted if TASKS[n][0] == family]
        if members:
            pool = builder(root)
            for name in members:
                yield make_task(name, pool)


def packaged_split() -> dict[str, list[str]]:
    """The committed split of tasks (``abmll_pyro/data/debian_cls_split.json``)."""
    data = json.loads(resources.files("abmll_pyro.data").joinpath(SPLIT_FILE).read_text())
    return {k: data[k] for k in ("train", "dev", "test")}


SUITE_VERSION = "1"
MANIFEST = "manifest.json"


def convert(root: Path, out: Path) -> dict:
    """Every task from the unpacked tree ``root`` into the task folder ``out`` (with ``splits.json``);
    returns the manifest body (per task: family, labels, examples)."""
    from abmll_pyro.data.sources.folder import write_task_folder

    report: dict[str, dict] = {}

    def tasks():
        for task in build_tasks(root):
            family, labels = TASKS[task.name]
            report[task.name] = {"family": family, "labels": list(labels), "examples": len(task.examples)}
            yield task

    write_task_folder(tasks(), out)
    write_task_folder([], out, packaged_split())
    return {"suite": "debian-cls", "version": SUITE_VERSION, "tasks": report}


def prepare_debian_cls(root: str | Path | None = None, force: bool = False, mirror: str | None = None) -> Path:
    """The ``debian-cls`` task folder (``<cache>/debian-cls-<version>/tasks``), built on first use:
    fetch the :data:`~abmll_pyro.data.sources.debian_fetch.PINNED` packages into ``staging`` (with
    ``apt-get download``, or by URL from ``mirror`` / ``$ABMLL_DEBIAN_MIRROR`` where apt-get is missing),
    verify their SHA-256, unpack them, convert, delete the staging folder. A finished folder holds
    ``manifest.json`` (written last, with the packages fetched and the content fingerprint); later calls
    return it at once; ``force`` rebuilds it."""
    from abmll_pyro.data.cache import build_task_folder, cache_dir
    from abmll_pyro.data.sources.debian_fetch import download_debs, sha256_file, unpack_deb

    base = Path(root) if root is not None else cache_dir(f"debian-cls-{SUITE_VERSION}")

    def fetch(staging: Path) -> tuple[Path, dict]:
        debs = download_debs(staging / "debs", mirror=mirror)
        for deb in debs.values():
            unpack_deb(deb, staging / "root")
        return staging / "root", debs

    def build(fetched: tuple[Path, dict], out: Path) -> dict:
        unpacked, debs = fetched
        return {**convert(unpacked, out), "packages": {p: {"file": d.name, "sha256": sha256_file(d)} for p, d in debs.items()}}

    return build_task_folder(base, fetch, build, force)
