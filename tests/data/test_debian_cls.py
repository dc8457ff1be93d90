"""debian-cls: readers on real-format excerpts of the packages, task building, the split, the .deb
unpacking. Fetching (apt-get mocked, or by URL from a local server) is in test_data_fetch.py."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from abmll_pyro.data.sources import debian_cls as dc
from abmll_pyro.data.sources import debian_fetch as df
from abmll_pyro.data.sources import debian_readers as rd
from abmll_pyro.data.sources import load_tasks

FIXTURE = Path(__file__).parent / "debian_fixture"  # 3 real records per label, cut from the packages


@pytest.fixture
def root(tmp_path) -> Path:
    """The fixture tree with the dictd files gzipped as the packages ship them (``.dict.dz``)."""
    tree = tmp_path / "root"
    shutil.copytree(FIXTURE, tree)
    for plain in (tree / "usr/share/dictd").glob("*.dict"):
        with gzip.open(plain.with_suffix(".dict.dz"), "wb") as f:
            f.write(plain.read_bytes())
        plain.unlink()
    return tree


def test_fortune_file_records_and_index_files_skipped(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "food").write_text("Eat.\n  More.\n%\nSecond\n%\n")
    (folder / "food.dat").write_bytes(b"\x00\x01")
    (folder / "love.fortunes").write_text("Only one\n")
    assert list(rd.iter_fortunes(folder)) == [("food", "Eat. More."), ("food", "Second"), ("love", "Only one")]
    with pytest.raises(FileNotFoundError, match="missing"):
        list(rd.iter_fortunes(folder, ("nope",)))


def test_wordnet_gloss_and_lexname():
    assert rd.split_gloss('move fast; "He ran"; "She runs daily"') == ("move fast", ["He ran", "She runs daily"])
    assert len(rd.LEXNAMES) == 45 and rd.LEXNAMES[5] == "noun.animal" and rd.LEXNAMES[38] == "verb.motion"


def test_wordnet_reader_skips_licence_and_maps_lexfiles(root):
    rows = list(rd.iter_wordnet(root, "noun"))
    assert rows and all(lex.startswith("noun.") for lex, _, _ in rows)
    lines = [l for l in (root / "usr/share/wordnet/data.noun").read_text().splitlines() if not l.startswith("  ")]
    assert len(rows) == len(lines)
    lex, definition, gloss = rows[0]
    assert rd.LEXNAMES[int(lines[0].split()[1])] == lex and gloss.startswith(definition)


def test_dict_senses_take_the_labelled_paragraph(tmp_path):
    text = ("Abdomen \\Ab*do\"men\\, n.\n   1. (Anat.) The belly, or that part\n      of the body.\n"
            "      [1913 Webster]\n\n   2. (Zool.) The posterior section. --Moore.\n      [1913 Webster]\n\n"
            "actor\n\n   1. <programming> In {object-oriented} programming,\n   an {object}.\n\n   (1994-11-08)\n")
    path = tmp_path / "x.dict.dz"
    with gzip.open(path, "wt") as f:
        f.write(text)
    assert list(rd.iter_dict_senses(path, rd.GCIDE_SENSE)) == [
        ("Anat", "The belly, or that part of the body."), ("Zool", "The posterior section.")]
    assert list(rd.iter_dict_senses(path, rd.FOLDOC_SENSE)) == [("programming", "In object-oriented programming, an object.")]


def test_suite_shape_and_split_by_family():
    families = Counter(dc.family_of(n) for n in dc.TASKS)
    assert len(dc.TASKS) >= 30 and len(families) >= 6
    assert all(2 <= len(labels) <= 6 and len(set(labels)) == len(labels) for _, labels in dc.TASKS.values())
    split = dc.packaged_split()
    named = split["train"] + split["dev"] + split["test"]
    assert sorted(named) == sorted(dc.TASKS) and len(set(named)) == len(named)
    where = {dc.family_of(n): s for s in split for n in split[s]}
    for s in split:  # a family lies wholly in one split
        assert all(where[dc.family_of(n)] == s for n in split[s])
    assert {where[f] for f in families} == {"train", "dev", "test"}


def test_make_task_balanced_deterministic_and_checked():
    name = "fortune-topic.computers_food"
    pool = {"computers": [f"Computer text number {i}." for i in range(50)] + ["Shared text here."],
            "food": [f"Food text number {i}." for i in range(40)] + ["Shared text here.", "x"]}
    task = dc.make_task(name, pool)
    assert len(task.examples) == 80 and Counter(e.gold for e in task.examples) == {0: 40, 1: 40}
    assert all(list(e.options) == ["computers", "food"] for e in task.examples)
    texts = [e.input for e in task.examples]
    assert "Shared text here." not in texts and "x" not in texts  # under two labels; too short
    assert dc.make_task(name, pool).examples == task.examples  # seeded by the task name
    with pytest.raises(ValueError, match="too few usable texts"):
        dc.make_task(name, {"computers": pool["computers"], "food": pool["food"][:20]})


def test_every_task_builds_from_the_fixture(root, monkeypatch):
    monkeypatch.setattr(dc, "MIN_EXAMPLES", 2)
    tasks = list(dc.build_tasks(root))
    assert [t.name for t in tasks] == list(dc.TASKS)
    for task in tasks:
        labels = dc.TASKS[task.name][1]
        assert Counter(e.gold for e in task.examples) == {i: len(task.examples) // len(labels) for i in range(len(labels))}
        assert all(dc.MIN_CHARS <= len(e.input) <= dc.MAX_CHARS for e in task.examples)


def _deb(files: dict[str, bytes]) -> bytes:
    """A minimal .deb: ar archive with debian-binary and a data.tar.xz holding ``files``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = b"!<arch>\n"
    for name, data in (("debian-binary", b"2.0\n"), ("data.tar.xz", buf.getvalue())):
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data + b"\n" * (len(data) % 2)
    return out


def test_unpack_deb_extracts_usr_share_only(tmp_path):
    deb = tmp_path / "p_1_all.deb"
    deb.write_bytes(_deb({"usr/share/games/fortunes/food": b"Eat.\n%\n", "usr/bin/tool": b"x", "usr/share/odd": b"abc"}))
    assert df.read_ar(deb.read_bytes())["debian-binary"] == b"2.0\n"
    written = df.unpack_deb(deb, tmp_path / "root")
    assert sorted(p.relative_to(tmp_path / "root").as_posix() for p in written) == [
        "usr/share/games/fortunes/food", "usr/share/odd"]
    with pytest.raises(ValueError, match="not an ar archive"):
        df.read_ar(b"PK\x03\x04")
