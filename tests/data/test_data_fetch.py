"""Sources that survive: debian-cls fetched by URL where apt-get is missing (a local HTTP server serves
fixture .debs: no network), SHA-256 checks, the candidate fallback, the content fingerprint; BIG-bench
from a local copy, and one clear line where it cannot be had."""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import shutil
import tarfile
import threading
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from abmll_pyro.cli import main
from abmll_pyro.data.fingerprint import folder_fingerprint
from abmll_pyro.data.sources import debian_cls as dc, load_tasks
from abmll_pyro.data.sources import debian_fetch as df
from abmll_pyro.data.sources.bigbench import MIN_EXAMPLES
from abmll_pyro.data.sources import bigbench_fetch as bf

from tests.data.test_debian_cls import FIXTURE, _deb  # the fixture tree and the minimal .deb writer

PACKAGE_WITH_FILES = "fortunes"  # one .deb holds the whole fixture tree; the others are empty


@pytest.fixture
def debs(tmp_path, monkeypatch) -> dict[str, bytes]:
    """Fixture .debs for every pinned package, the pins pointing at them (their real SHA-256)."""
    tree = tmp_path / "tree"
    shutil.copytree(FIXTURE, tree)
    for plain in (tree / "usr/share/dictd").glob("*.dict"):  # dictd files ship gzipped
        with gzip.open(plain.with_suffix(".dict.dz"), "wb") as f:
            f.write(plain.read_bytes())
        plain.unlink()
    files = {p.relative_to(tree).as_posix(): p.read_bytes() for p in sorted(tree.rglob("*")) if p.is_file()}
    made, pins = {}, {}
    for package, pin in df.PINNED.items():
        body = _deb(files if package == PACKAGE_WITH_FILES else {})
        made[pin.pool_path] = body
        pins[package] = df.Pin(pin.version, pin.pool_path, hashlib.sha256(body).hexdigest())
    monkeypatch.setattr(df, "PINNED", pins)
    monkeypatch.setattr(dc, "MIN_EXAMPLES", 2)
    return made


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no request log on stderr: the tests read stderr
        pass


@contextmanager
def serve(root: Path):
    """An HTTP server on 127.0.0.1 serving ``root``, for the block."""
    handler = functools.partial(_Quiet, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/debian"
    finally:
        server.shutdown()
        server.server_close()


def mirror_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, body in files.items():
        (root / "debian" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "debian" / rel).write_bytes(body)
    return root


def no_apt(monkeypatch, tmp_path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    monkeypatch.setenv("PATH", str(empty))
    assert shutil.which("apt-get") is None


def build_with_apt(debs: dict[str, bytes], cache: Path, monkeypatch, calls: list | None = None) -> dict:
    """Prepare with apt-get mocked: it writes the pinned file as apt does (the epoch's ':' as '%3a')."""
    def fake_download(spec, folder):
        if calls is not None:
            calls.append(spec)
        package = spec.split("=")[0]
        pin = df.PINNED[package]
        name = f"{package}_{pin.version.replace(':', '%3a')}_all.deb"
        (folder / name).write_bytes(debs[pin.pool_path])
        return type("R", (), {"returncode": 0, "stderr": ""})()

    monkeypatch.setattr(df, "_apt_download", fake_download)
    bin_dir = cache.parent / "apt-bin"  # an apt-get on PATH (never run: _apt_download is the fake above)
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "apt-get").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("ABMLL_CACHE", str(cache))
    out = dc.prepare_debian_cls()
    return json.loads((out / "manifest.json").read_text())


def test_prepare_with_apt_verifies_pins_and_builds_once(debs, tmp_path, monkeypatch):
    calls = []
    manifest = build_with_apt(debs, tmp_path / "cache", monkeypatch, calls)
    assert calls == [f"{p}={pin.version}" for p, pin in df.PINNED.items()]
    assert sorted(manifest["tasks"]) == sorted(dc.TASKS)
    out = tmp_path / "cache" / f"debian-cls-{dc.SUITE_VERSION}" / "tasks"
    assert not (out.parent / "staging").exists() and manifest["fingerprint"] == folder_fingerprint(out)
    tasks = load_tasks("debian-cls")
    assert {t.name for t in tasks.test} == set(dc.packaged_split()["test"]) and tasks.fingerprint == manifest["fingerprint"]
    assert dc.prepare_debian_cls() == out and len(calls) == len(df.PINNED)  # cached: no second download


def test_without_apt_the_cli_builds_the_same_fingerprint_from_a_mirror(debs, tmp_path, monkeypatch, capsys):
    with_apt = build_with_apt(debs, tmp_path / "cache-apt", monkeypatch)
    no_apt(monkeypatch, tmp_path)
    monkeypatch.setenv("ABMLL_CACHE", str(tmp_path / "cache-url"))
    with serve(mirror_tree(tmp_path / "www", debs)) as mirror:
        assert main(["data", "prepare", "debian-cls", "--mirror", mirror]) == 0
    printed = capsys.readouterr()
    folder = Path(printed.out.strip())
    by_url = json.loads((folder / "manifest.json").read_text())
    assert by_url["fingerprint"] == with_apt["fingerprint"] == folder_fingerprint(folder)
    assert f"content fingerprint {by_url['fingerprint']}" in printed.err
    assert sorted(by_url["tasks"]) == sorted(dc.TASKS)
    assert {p: v["sha256"] for p, v in by_url["packages"].items()} == {p: pin.sha256 for p, pin in df.PINNED.items()}


def test_mirror_from_the_environment_and_a_tampered_deb_refused_in_one_line(debs, tmp_path, monkeypatch, capsys):
    no_apt(monkeypatch, tmp_path)
    monkeypatch.setenv("ABMLL_CACHE", str(tmp_path / "cache"))
    tampered = dict(debs)
    gcide = df.PINNED["dict-gcide"].pool_path
    tampered[gcide] = debs[gcide] + b"x"
    with serve(mirror_tree(tmp_path / "www", tampered)) as mirror:
        monkeypatch.setenv(df.MIRROR_ENV, mirror)
        assert main(["data", "prepare", "debian-cls"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("abmll: error: ") and gcide in err and "does not match the pinned" in err
    assert not (tmp_path / "cache" / f"debian-cls-{dc.SUITE_VERSION}" / "tasks" / "manifest.json").exists()


def test_without_apt_or_mirror_one_line_says_how_to_name_one(tmp_path, monkeypatch, capsys):
    no_apt(monkeypatch, tmp_path)
    monkeypatch.delenv(df.MIRROR_ENV, raising=False)
    monkeypatch.setenv("ABMLL_CACHE", str(tmp_path / "cache"))
    assert main(["data", "prepare", "debian-cls"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and df.MIRROR_ENV in err and "--mirror" in err


def test_a_version_gone_from_the_archive_falls_back_to_the_candidate_with_a_warning(debs, tmp_path, monkeypatch):
    no_apt(monkeypatch, tmp_path)
    monkeypatch.setenv("ABMLL_CACHE", str(tmp_path / "cache"))
    foldoc = df.PINNED["dict-foldoc"]
    served = {k: v for k, v in debs.items() if k != foldoc.pool_path}
    newer = "pool/main/d/dict-foldoc/dict-foldoc_20990101-1_all.deb"
    body = _deb({"usr/share/doc/dict-foldoc/changelog": b"newer\n"})
    served[newer] = body
    index = (f"Package: dict-foldoc\nVersion: 20990101-1\nFilename: {newer}\n"
             f"SHA256: {hashlib.sha256(body).hexdigest()}\n\nPackage: other\nVersion: 1\n")
    served["dists/stable/main/binary-all/Packages"] = index.encode()
    with serve(mirror_tree(tmp_path / "www", served)) as mirror:
        with pytest.warns(UserWarning, match="dict-foldoc=20230119-1 is not in the archive; took the current candidate 20990101-1"):
            folder = dc.prepare_debian_cls(mirror=mirror)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["packages"]["dict-foldoc"]["file"] == "dict-foldoc_20990101-1_all.deb"
    assert manifest["fingerprint"] == folder_fingerprint(folder)


def test_fingerprint_follows_content_not_place(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        root.mkdir()
        (root / "t.jsonl").write_text('{"input": "x", "options": ["p", "q"], "output": "p"}\n')
        (root / "splits.json").write_text('{"train": ["t"]}')
        (root / "README.txt").write_text(str(root))  # not task data: ignored
    assert folder_fingerprint(a) == folder_fingerprint(b) and len(folder_fingerprint(a)) == 16
    (b / "t.jsonl").write_text('{"input": "y", "options": ["p", "q"], "output": "p"}\n')
    assert folder_fingerprint(a) != folder_fingerprint(b)


def test_packages_index_parsing():
    text = "Package: a\nVersion: 1\nDescription: x\n more\n\nPackage: b\nVersion: 2\nSHA256: ff\n"
    assert df.parse_packages_index(text) == {"a": {"Package": "a", "Version": "1", "Description": "x"},
                                             "b": {"Package": "b", "Version": "2", "SHA256": "ff"}}


# --- BIG-bench: optional, from a local copy -------------------------------------------------------

def _bb_task(n: int) -> dict:
    return {"keywords": ["logical reasoning"],
            "examples": [{"input": f"q{i}", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2)}} for i in range(n)]}


def _checkout(root: Path) -> Path:
    for rel in ("alpha", "beta/one"):
        path = root / "bigbench" / "benchmark_tasks" / rel / "task.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_bb_task(MIN_EXAMPLES)))
    return root


@pytest.mark.parametrize("where", ["root", "bigbench", "benchmark_tasks", "archive"])
def test_bigbench_prepared_from_a_local_copy(tmp_path, monkeypatch, capsys, where):
    checkout = _checkout(tmp_path / "BIG-bench")
    given = {"root": checkout, "bigbench": checkout / "bigbench",
             "benchmark_tasks": checkout / "bigbench" / "benchmark_tasks"}.get(where)
    if where == "archive":
        given = tmp_path / "bigbench-1.0.0.tar.gz"
        with tarfile.open(given, "w:gz") as tar:
            tar.add(checkout / "bigbench", arcname="bigbench-1.0.0/bigbench")
    monkeypatch.setenv("ABMLL_CACHE", str(tmp_path / "cache"))
    assert main(["data", "prepare", "bigbench", "--from", str(given)]) == 0
    folder = Path(capsys.readouterr().out.strip())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(manifest["tasks"]) == ["alpha", "beta.one"] and manifest["fingerprint"] == folder_fingerprint(folder)


def test_bigbench_from_a_folder_that_is_not_a_copy_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ABMLL_CACHE", str(tmp_path / "cache"))
    assert main(["data", "prepare", "bigbench", "--from", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path) in err and "--from PATH" in err


def test_bigbench_unavailable_from_the_index_is_one_line_with_where_to_get_it(tmp_path, monkeypatch, capsys):
    """What the package index answers today: only 0.0.1 (no task files). pip is mocked (no network)."""
    said = ("ERROR: Could not find a version that satisfies the requirement bigbench==1.0.0 (from versions: 0.0.1)\n"
            "ERROR: No matching distribution found for bigbench==1.0.0\n")
    monkeypatch.setattr(bf.subprocess, "run", lambda *a, **k: type("R", (), {"returncode": 1, "stderr": said})())
    monkeypatch.setenv("ABMLL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(bf.SOURCE_ENV, raising=False)
    assert main(["data", "prepare", "bigbench"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "No matching distribution found for bigbench==1.0.0" in err and "--from PATH" in err and bf.SOURCE_ENV in err
    # the same line from a run that names the suite (load_tasks), exit 2
    assert main(["evaluate", "--method", "pretrained", "--model", "tiny-llama", "--tasks", "bigbench"]) == 2
    assert "--from PATH" in capsys.readouterr().err
