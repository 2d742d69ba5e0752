"""Corpus readers: every supported layout as a stream of (record index, text) that can start at any record.

A SOURCE given to `rebased data prepare` is a file or a folder. In a folder (walked in name order, hidden
entries skipped) each of these is one source:
  * the .txt files of one folder, together: one document per file; record i is the i-th file by name
  * a .jsonl, .jsonl.gz or .jsonl.zst file (the Pile's format): one JSON object per line, the document in its
    "text" field; record i is line i + 1 (blank lines are no record)
  * a .parquet file with a "text" column (FineWeb's format), read one row group at a time; record i is row i
  * a Hugging Face `datasets` folder written by save_to_disk, read with load_from_disk; its splits in name
    order, record i the i-th row of them all
A null text reads as "" (an empty document, which prepare skips). Starting at a record is what lets a killed
prepare resume. zstandard, pyarrow and datasets are imported only when a source of theirs is read.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rebased.files import file_sha256
from rebased.tasks.lm import DataError

SUFFIXES = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".jsonl.zst": "jsonl", ".parquet": "parquet", ".txt": "txt"}
RERUN = "then rerun the same command (what is already prepared is kept)"


@dataclass(frozen=True)
class Source:
    path: str  # relative to the corpus root, "/"-separated; "." is the root itself
    kind: str  # txt, jsonl, parquet or hf
    files: tuple[str, ...]  # the files it reads, relative to the root
    bytes: int
    mtime: float  # of its newest file

    def describe(self) -> dict:
        return {"path": self.path, "kind": self.kind, "files": len(self.files), "bytes": self.bytes,
                "mtime": self.mtime}  # fmt: skip


def _kind(name: str) -> str | None:
    return next((kind for suffix, kind in SUFFIXES.items() if name.endswith(suffix)), None)


def _is_saved_dataset(folder: Path) -> bool:
    """What `datasets` save_to_disk leaves: state.json + dataset_info.json, or dataset_dict.json for splits."""
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()
    )


def find_sources(source: str | Path) -> tuple[Path, list[Source]]:
    """The corpus root and its sources, in the fixed order prepare reads them."""
    source = Path(source)
    if source.is_file():
        if _kind(source.name) is None:
            raise DataError(f"{source}: not a .txt, .jsonl, .jsonl.gz, .jsonl.zst or .parquet file")
        return source.parent, [_make_source(source.parent, source.name, _kind(source.name), [source.name])]
    if not source.is_dir():
        raise DataError(f"{source}: no such file or folder")
    sources = []
    for folder, subfolders, names in os.walk(source):
        folder = Path(folder)
        relative = folder.relative_to(source).as_posix()
        if _is_saved_dataset(folder):
            files = sorted(p.relative_to(source).as_posix() for p in folder.rglob("*") if p.is_file())
            sources.append(_make_source(source, relative, "hf", files))
            subfolders[:] = []
            continue
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        names = sorted(n for n in names if not n.startswith("."))
        texts = [_join(relative, n) for n in names if _kind(n) == "txt"]
        if texts:
            sources.append(_make_source(source, relative, "txt", texts))
        sources += [_make_source(source, _join(relative, n), _kind(n), [_join(relative, n)])
                    for n in names if _kind(n) not in (None, "txt")]  # fmt: skip
    if not sources:
        raise DataError(
            f"{source}: found no .txt, .jsonl, .jsonl.gz, .jsonl.zst or .parquet files and no saved Hugging Face "
            f"dataset in it"
        )
    return source, sources


def _join(folder: str, name: str) -> str:
    return name if folder == "." else f"{folder}/{name}"


def _make_source(root: Path, path: str, kind: str, files: list[str]) -> Source:
    sizes, mtimes = [], []
    for name in files:
        try:
            stat = (root / name).stat()
        except OSError as error:
            raise DataError(f"{root / name}: cannot read it ({error.strerror}): fix or remove it, {RERUN}") from None
        if stat.st_size == 0 and kind != "hf":
            raise DataError(f"{root / name} is empty: remove it from {root} or put text in it, {RERUN}")
        sizes.append(stat.st_size)
        mtimes.append(stat.st_mtime)
    return Source(path, kind, tuple(files), sum(sizes), max(mtimes, default=0.0))


def source_sha256(root: Path, source: Source) -> str:
    """sha256 of a one-file source's bytes (what sha256sum prints); for several files, of the sha256sum-style
    listing "HASH  PATH" of its files, one a line."""
    digests = [file_sha256(root / name) for name in source.files]
    if len(digests) == 1:
        return digests[0]
    listing = "".join(f"{digest}  {name}\n" for digest, name in zip(digests, source.files))
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def read_records(root: Path, source: Source, start: int = 0) -> Iterator[tuple[int, str]]:
    """(record index, text) for every record of source from record `start` on."""
    readers = {"txt": _read_texts, "jsonl": _read_jsonl, "parquet": _read_parquet, "hf": _read_saved_dataset}
    try:
        yield from readers[source.kind](root, source, start)
    except PermissionError as error:
        raise DataError(f"{error.filename}: cannot read it ({error.strerror}): fix its permissions, {RERUN}") from None


def _read_texts(root: Path, source: Source, start: int) -> Iterator[tuple[int, str]]:
    for index in range(start, len(source.files)):
        path = root / source.files[index]
        yield index, _decode(path.read_bytes(), str(path), "")


def _decode(data: bytes, where: str, unit: str) -> str:
    try:
        return data.decode("utf-8-sig")  # a byte-order mark is not text
    except UnicodeDecodeError as error:
        bad = data[error.start : error.start + 4]
        raise DataError(
            f"{where}: not UTF-8 text (byte {error.start}{unit} is {bad!r}): convert it to UTF-8 "
            f"(e.g. iconv -f latin1 -t utf-8) or remove it, {RERUN}"
        ) from None


@contextmanager
def _open_binary(path: Path):
    """The decompressed bytes of a .jsonl, .jsonl.gz or .jsonl.zst file."""
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading .zst needs the `zstandard` package: pip install zstandard") from None
        with open(path, "rb") as raw:
            yield io.BufferedReader(_ZstdFrames(raw, zstandard), buffer_size=1 << 20)
    elif path.name.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            yield f
    else:
        with open(path, "rb") as f:
            yield f


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of one zstd frame after another. Unlike zstandard's stream_reader, it raises
    EOFError when the file ends inside a frame: a truncated download is an error, not a shorter corpus."""

    def __init__(self, raw, zstandard):
        # The Pile's files use long matching windows: allow up to 2 GB.
        self._raw, self._decompressor = raw, zstandard.ZstdDecompressor(max_window_size=2**31)
        self._frame, self._in_frame, self._out, self._at = self._decompressor.decompressobj(), False, b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._at == len(self._out):
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the compressed data ends inside a zstd frame")
                return 0
            self._out, self._at = self._decompress(chunk), 0
        size = min(len(buffer), len(self._out) - self._at)
        buffer[:size] = self._out[self._at : self._at + size]
        self._at += size
        return size

    def _decompress(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            out.append(self._frame.decompress(chunk))
            self._in_frame, chunk = not self._frame.eof, b""
            if self._frame.eof:  # what follows the frame starts the next one
                chunk, self._frame = self._frame.unused_data, self._decompressor.decompressobj()
        return b"".join(out)


def _read_jsonl(root: Path, source: Source, start: int) -> Iterator[tuple[int, str]]:
    path = root / source.files[0]
    number = 0
    try:
        with _open_binary(path) as lines:
            for number, line in enumerate(lines):
                if number >= start and line.strip():
                    yield number, _text_of_line(path, number, line)
    except PermissionError:
        raise
    except _damage_errors() as error:  # damaged or truncated compressed data
        raise DataError(
            f"{path}: the file is damaged after line {number + 1} ({type(error).__name__}: {error}): "
            f"download or copy it again, {RERUN}"
        ) from None


def _damage_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def _text_of_line(path: Path, number: int, line: bytes) -> str:
    where = f"{path}, line {number + 1}"
    try:
        record = json.loads(_decode(line.rstrip(b"\r\n"), where, " of the line"))
    except json.JSONDecodeError as error:
        problem = f"not JSON ({error.msg}, column {error.colno})"
        if not line.endswith(b"\n"):  # the last line, cut short: most likely a truncated file
            raise DataError(f"{where}: {problem}; the file ends there, probably truncated: copy it again") from None
        raise DataError(f"{where}: {problem}: fix or remove the line, {RERUN}") from None
    if not isinstance(record, dict) or "text" not in record:
        keys = ", ".join(map(repr, record)) if isinstance(record, dict) else type(record).__name__
        raise DataError(
            f'{where}: no "text" field (it has {keys or "none"}): every line must be a JSON object with the document '
            f'in "text"; fix or remove the line, {RERUN}'
        )
    return _text_value(record["text"], where)


def _text_value(value, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f'{where}: "text" is a {type(value).__name__}, not a string: fix it, {RERUN}')
    return value


def _read_parquet(root: Path, source: Source, start: int) -> Iterator[tuple[int, str]]:
    path = root / source.files[0]
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet files needs the `pyarrow` package: pip install pyarrow") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow's ArrowInvalid and OSError
        raise DataError(f"{path}: not a parquet file, or a damaged one ({error}): copy it again, {RERUN}") from None
    if "text" not in parquet.schema_arrow.names:
        raise DataError(f'{path}: no "text" column (it has {", ".join(parquet.schema_arrow.names)})')
    row = 0
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if row + rows > start:  # row groups wholly before `start` are skipped unread
            for batch in parquet.iter_batches(batch_size=4096, row_groups=[group], columns=["text"]):
                for text in batch.column(0).to_pylist():
                    if row >= start:
                        yield row, _text_value(text, f"{path}, row {row}")
                    row += 1
        else:
            row += rows


def _read_saved_dataset(root: Path, source: Source, start: int) -> Iterator[tuple[int, str]]:
    path = root / source.path
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path} is a Hugging Face dataset saved with save_to_disk; reading it needs the `datasets` package: "
            f"pip install datasets"
        ) from None
    loaded = datasets.load_from_disk(str(path))
    parts = [loaded[name] for name in sorted(loaded)] if isinstance(loaded, datasets.DatasetDict) else [loaded]
    offset = 0
    for part in parts:
        if "text" not in part.column_names:
            raise DataError(f'{path}: no "text" column (it has {", ".join(part.column_names)})')
        texts = part.select_columns(["text"])
        for begin in range(max(start - offset, 0), len(part), 1024):
            for index, text in enumerate(texts[begin : begin + 1024]["text"], offset + begin):
                yield index, _text_value(text, f"{path}, row {index}")
        offset += len(part)
