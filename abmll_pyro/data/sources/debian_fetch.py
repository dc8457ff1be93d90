"""Fetch the Debian packages ``debian-cls`` reads, verify them, and unpack their data files (no dpkg).

Two ways to fetch, the same files either way:

* **apt-get** (where it is on ``PATH``): ``apt-get download PKG=VERSION`` into a staging folder; an
  ``apt-get update`` runs once, as root, when a package is not found.
* **by URL** (where ``apt-get`` is missing: macOS, Fedora, a container without package lists): each
  pinned ``.deb`` from ``<mirror>/<pool path>``, where the mirror is ``$ABMLL_DEBIAN_MIRROR`` (or
  ``abmll data prepare debian-cls --mirror URL``): the base URL of any Debian archive mirror, the folder
  that holds ``pool/`` and ``dists/``. No mirror is built in; the error says how to name one.

Every pinned ``.deb`` is checked against :data:`PINNED`'s SHA-256 (taken from the archive's package
index for the pinned version); a mismatch is refused in one line. When a pinned version has left the
archive, the current candidate is taken with a warning (apt-get: ``apt-get download PKG``; by URL: the
``Packages`` index of ``$ABMLL_DEBIAN_SUITE``, default ``stable``), and the built suite's content
fingerprint (``manifest.json``, every run's ``results.json``) says whether two results saw the same data.

A ``.deb`` is an ``ar`` archive whose ``data.tar.{xz,gz,bz2}`` member holds the files; :func:`unpack_deb`
reads it with the standard library and extracts the regular files under ``usr/share``.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import subprocess
import tarfile
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path, PurePosixPath

from abmll_pyro.data.fingerprint import file_sha256 as sha256_file
from abmll_pyro.data.tasks import DataError

__all__ = ["Pin", "PINNED", "PACKAGES", "MIRROR_ENV", "SUITE_ENV", "download_debs", "download_by_url",
           "download_with_apt", "sha256_file", "read_ar", "unpack_deb", "parse_packages_index"]

MIRROR_ENV, SUITE_ENV = "ABMLL_DEBIAN_MIRROR", "ABMLL_DEBIAN_SUITE"


@dataclass(frozen=True)
class Pin:
    """One package at the version the suite was built and measured with: its pool path in the archive
    and the SHA-256 of its ``.deb`` (from the archive's ``Packages`` index)."""

    version: str
    pool_path: str
    sha256: str

    @property
    def filename(self) -> str:
        return PurePosixPath(self.pool_path).name


# Debian 12 (bookworm) main, Architecture: all
PINNED: dict[str, Pin] = {
    "fortunes": Pin("1:1.99.1-7.3", "pool/main/f/fortune-mod/fortunes_1.99.1-7.3_all.deb",
                    "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5"),
    "fortunes-min": Pin("1:1.99.1-7.3", "pool/main/f/fortune-mod/fortunes-min_1.99.1-7.3_all.deb",
                        "9eed5b45064e41133dae0967cf3a17588ad77c014fcc7bf1527fa3ea48e44d07"),
    "fortunes-de": Pin("0.35-1", "pool/main/f/fortunes-de/fortunes-de_0.35-1_all.deb",
                       "03fe7a7912935bd3d4e02e38d79ef32a289097f8718d4488c409595abce067a0"),
    "fortunes-it": Pin("1.99-4.1", "pool/main/f/fortunes-it/fortunes-it_1.99-4.1_all.deb",
                       "675df6ecb00c3b67d06b39ab223ff17f1ef1d0ec82a7e40f989356a2eb61a97e"),
    "fortunes-es": Pin("1.36", "pool/main/f/fortunes-es/fortunes-es_1.36_all.deb",
                       "54636edc1a4384093b68d1666c7e702ce42d1fcc8b5ab402d9646c328dcca899"),
    "fortunes-br": Pin("20220821", "pool/main/f/fortunes-br/fortunes-br_20220821_all.deb",
                       "0a181b5fdf4f9d83dd519c4a50af2e68d88c85d27ab32f665c72e5fc67331a4c"),
    "wordnet-base": Pin("1:3.0-37", "pool/main/w/wordnet/wordnet-base_3.0-37_all.deb",
                        "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752"),
    "dict-gcide": Pin("0.48.5+nmu2", "pool/main/d/dict-gcide/dict-gcide_0.48.5+nmu2_all.deb",
                      "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f"),
    "dict-foldoc": Pin("20230119-1", "pool/main/d/dict-foldoc/dict-foldoc_20230119-1_all.deb",
                       "745cbedb55c2da609cc88ee0284e9d11a67a11ae3709daf7bad0e895ac3294c3"),
}
PACKAGES = {name: pin.version for name, pin in PINNED.items()}  # {package: pinned version}


def _check(path: Path, expected: str, where: str) -> None:
    got = sha256_file(path)
    if got != expected:
        path.unlink(missing_ok=True)
        raise DataError(f"{where}: SHA-256 {got} does not match the pinned {expected}; refused (a damaged "
                        f"download or a different file under the same name)")


def download_debs(folder: Path, pins: dict[str, Pin] | None = None, mirror: str | None = None) -> dict[str, Path]:
    """``{package: .deb path}``, each pinned version verified, else (with a warning) the candidate:
    with ``apt-get`` where it is on ``PATH`` and no mirror is named, else by URL from the mirror."""
    pins = PINNED if pins is None else pins
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    if mirror is None and shutil.which("apt-get") is not None:
        return download_with_apt(folder, pins)
    if mirror is None:
        raise DataError(f"apt-get is not on PATH, so debian-cls fetches its {len(pins)} pinned .deb files by URL: "
                        f"name a Debian archive mirror (the base URL holding pool/ and dists/) with "
                        f"{MIRROR_ENV}=URL or 'abmll data prepare debian-cls --mirror URL'")
    return download_by_url(folder, mirror, pins)


# --- apt-get ---------------------------------------------------------------------------------------

def _apt_download(spec: str, folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["apt-get", "download", spec], cwd=folder, capture_output=True, text=True)


def download_with_apt(folder: Path, pins: dict[str, Pin]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    updated, debs = False, {}
    for package, pin in pins.items():
        for spec in (f"{package}={pin.version}", package):
            result = _apt_download(spec, folder)
            if result.returncode != 0 and not updated and os.geteuid() == 0:
                subprocess.run(["apt-get", "update"], capture_output=True, text=True)
                updated = True
                result = _apt_download(spec, folder)
            if result.returncode == 0:
                break
        else:
            raise DataError(f"apt-get download {package} failed (exit {result.returncode}): "
                            f"{' '.join(result.stderr.split())[-300:]}; without apt, set {MIRROR_ENV}=URL")
        found = sorted(folder.glob(f"{package}_*.deb"))  # apt writes the epoch's colon as %3a
        if not found:
            raise DataError(f"apt-get download {spec} left no {package}_*.deb in {folder}")
        if spec == package:
            warnings.warn(f"{package}={pin.version} is not in the archive; took the current candidate instead "
                          f"(compare the suite's fingerprint before comparing results)")
        else:
            _check(found[-1], pin.sha256, f"apt-get download {spec}")
        debs[package] = found[-1]
    return debs


# --- by URL ----------------------------------------------------------------------------------------

def _get(url: str, timeout: float = 60.0) -> bytes | None:
    """The body at ``url``; None on HTTP 404 (gone from the archive); DataError on anything else."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (the user's mirror)
            return response.read()
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return None
        raise DataError(f"{url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise DataError(f"{url}: {' '.join(str(reason).split())}") from None


def parse_packages_index(text: str) -> dict[str, dict[str, str]]:
    """``{package: {"Version", "Filename", "SHA256", ...}}`` of a Debian ``Packages`` index (RFC-822
    stanzas); a package listed twice keeps its last stanza."""
    out: dict[str, dict[str, str]] = {}
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, value = line.split(":", 1)
                fields[key.strip()] = value.strip()
        if "Package" in fields:
            out[fields["Package"]] = fields
    return out


def _candidates(mirror: str, suite: str) -> dict[str, dict[str, str]]:
    base = f"{mirror}/dists/{suite}/main/binary-all"
    for name, decompress in (("Packages.xz", lzma.decompress), ("Packages.gz", gzip.decompress),
                             ("Packages.bz2", bz2.decompress), ("Packages", lambda b: b)):
        body = _get(f"{base}/{name}")
        if body is not None:
            return parse_packages_index(decompress(body).decode("utf-8", "replace"))
    raise DataError(f"{base}: no Packages index (tried .xz, .gz, .bz2, plain); set {SUITE_ENV} to a suite the "
                    f"mirror serves")


def download_by_url(folder: Path, mirror: str, pins: dict[str, Pin]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    mirror = mirror.rstrip("/")
    index: dict[str, dict[str, str]] | None = None
    debs = {}
    for package, pin in pins.items():
        url = f"{mirror}/{pin.pool_path}"
        body = _get(url)
        expected = pin.sha256
        if body is None:  # the pinned version has left the archive: the suite's current candidate
            if index is None:
                index = _candidates(mirror, os.environ.get(SUITE_ENV, "stable"))
            if package not in index or "Filename" not in index[package]:
                raise DataError(f"{url} is gone and {package} is not in the mirror's Packages index")
            entry = index[package]
            url, expected = f"{mirror}/{entry['Filename']}", entry.get("SHA256", "")
            warnings.warn(f"{package}={pin.version} is not in the archive; took the current candidate "
                          f"{entry.get('Version', '?')} instead (compare the suite's fingerprint before comparing results)")
            body = _get(url)
            if body is None:
                raise DataError(f"{url}: HTTP 404, though the mirror's Packages index lists it")
        path = folder / PurePosixPath(url).name
        path.write_bytes(body)
        if expected:
            _check(path, expected, url)
        debs[package] = path
    return debs


# --- unpacking -------------------------------------------------------------------------------------

def read_ar(data: bytes) -> dict[str, bytes]:
    """The members of an ``ar`` archive (the ``.deb`` container): 8-byte magic, then 60-byte headers."""
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive (a .deb starts with '!<arch>')")
    members, offset = {}, 8
    while offset + 60 <= len(data):
        header = data[offset:offset + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        members[name] = data[offset + 60:offset + 60 + size]
        offset += 60 + size + (size % 2)  # members are 2-byte aligned
    return members


def unpack_deb(deb: Path, root: Path, prefix: str = "usr/share/") -> list[Path]:
    """Extract the regular files under ``prefix`` of a ``.deb``'s data archive into ``root``."""
    members = read_ar(deb.read_bytes())
    data = next((v for k, v in members.items() if k.startswith("data.tar")), None)
    if data is None:
        raise ValueError(f"{deb}: no data.tar.* member (members: {sorted(members)})")
    written = []
    with tarfile.open(fileobj=BytesIO(data), mode="r:*") as archive:
        for member in archive:
            rel = PurePosixPath(member.name.lstrip("./"))
            if not member.isfile() or not str(rel).startswith(prefix) or ".." in rel.parts:
                continue
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(member).read())
            written.append(target)
    return written
