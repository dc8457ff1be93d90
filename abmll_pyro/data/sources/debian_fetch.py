"""Fetch Debian packages with ``apt-get download`` and unpack their data files (no dpkg needed).

``apt-get download PKG=VERSION`` needs only the Debian archive (and an ``apt-get update``d package
list, which :func:`download_debs` runs once, as root, when a package is not found). A ``.deb`` is an
``ar`` archive whose ``data.tar.{xz,gz,bz2}`` member holds the files; :func:`unpack_deb` reads it with
the standard library and extracts the regular files under ``usr/share`` into one root folder.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
import warnings
from io import BytesIO
from pathlib import Path, PurePosixPath

__all__ = ["PACKAGES", "download_debs", "read_ar", "unpack_deb"]

# the packages the suite reads, pinned to the versions its tasks were built and measured with
PACKAGES = {
    "fortunes": "1:1.99.1-7.3",
    "fortunes-min": "1:1.99.1-7.3",
    "fortunes-de": "0.35-1",
    "fortunes-it": "1.99-4.1",
    "fortunes-es": "1.36",
    "fortunes-br": "20220821",
    "wordnet-base": "1:3.0-37",
    "dict-gcide": "0.48.5+nmu2",
    "dict-foldoc": "20230119-1",
}


def _apt_download(spec: str, folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["apt-get", "download", spec], cwd=folder, capture_output=True, text=True)


def download_debs(folder: Path, packages: dict[str, str] = PACKAGES) -> dict[str, Path]:
    """``{package: .deb path}``: each at its pinned version, else (with a warning) the candidate."""
    folder.mkdir(parents=True, exist_ok=True)
    updated, debs = False, {}
    for package, version in packages.items():
        for spec in (f"{package}={version}", package):
            result = _apt_download(spec, folder)
            if result.returncode != 0 and not updated and os.geteuid() == 0:
                subprocess.run(["apt-get", "update"], capture_output=True, text=True)
                updated = True
                result = _apt_download(spec, folder)
            if result.returncode == 0:
                break
        else:
            raise RuntimeError(f"apt-get download {package} failed (exit {result.returncode}); is this a "
                               f"Debian-based machine with the archive reachable?\n{result.stderr[-1000:]}")
        if spec == package:
            warnings.warn(f"{package}={version} is not in the archive; took the current candidate instead")
        found = sorted(folder.glob(f"{package}_*.deb"))
        if not found:
            raise RuntimeError(f"apt-get download {spec} left no {package}_*.deb in {folder}")
        debs[package] = found[-1]
    return debs


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
