"""Token shards on disk: the writer `rebased data prepare` uses (rebased/tasks/lm/data.py) and the reader that
training and evaluation use.

A shards folder holds:
  manifest.json             written last, when prepare has finished (until then progress.json, the same record
                            unfinished): tokenizer, dtype, each split's shards with token and document counts and
                            sha256, each source with its counts; data.py's docstring lists the fields
  tokenizer.json            the tokenizer in the `tokenizers` JSON format (load_tokenizer reads it)
  {split}_{i:05d}.bin       whole documents, each followed by the end-of-document token: raw little-endian
                            uint16 (vocabulary up to 65,536) or uint32, for np.memmap
  {split}_{i:05d}.docs.npy  int64: where each document starts in that shard
A split's shards in order are one token stream; where one shard ends is no boundary for the reader.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rebased.files import atomic_write, file_sha256
from rebased.tasks.lm import DataError

FORMAT = "rebased-token-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
SPLITS = ("train", "val")
MAPPED_SHARDS = 64
REBUILD = "rerun `rebased data prepare` with the same arguments: it rebuilds the shards from the first damaged one"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.bin"


def documents_name(shard_file: str) -> str:
    return shard_file.removesuffix(".bin") + ".docs.npy"


class ShardWriter:
    """Appends documents to the next shard of a split, in NAME.tmp; close() renames it into place, so a shard
    on disk is always whole."""

    def __init__(self, folder: Path, split: str, index: int, dtype: np.dtype):
        self.folder, self.split, self.index, self.dtype = folder, split, index, dtype
        self.tokens, self._file, self._starts, self._hash = 0, None, [], hashlib.sha256()

    @property
    def _tmp(self) -> Path:
        return self.folder / (shard_name(self.split, self.index) + ".tmp")

    def add(self, tokens: np.ndarray) -> None:
        if self._file is None:
            self._file = open(self._tmp, "wb")  # noqa: SIM115 (open across add() calls; close() or abort() ends it)
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self._starts.append(self.tokens)
        self.tokens += len(tokens)

    def close(self) -> dict | None:
        """Put the shard in place and start the next one; its record, or None if it had no document."""
        if self._file is None:
            return None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = shard_name(self.split, self.index)
        starts = np.asarray(self._starts, dtype=np.int64)
        atomic_write(self.folder / documents_name(name), lambda f: np.save(f, starts))
        os.replace(self._tmp, self.folder / name)
        record = {"split": self.split, "file": name, "tokens": self.tokens, "documents": len(starts),
                  "sha256": self._hash.hexdigest()}  # fmt: skip
        self.index += 1
        self.tokens, self._file, self._starts, self._hash = 0, None, [], hashlib.sha256()
        return record

    def abort(self) -> None:
        """Drop the unfinished shard (after an error: the finished ones stay)."""
        if self._file is not None:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            self._file = None


def shard_problem(folder: Path, record: dict, dtype: np.dtype, check_hash: bool = False) -> str | None:
    """What is wrong with one shard on disk against its record (None if nothing): missing, size, hash."""
    path, docs = folder / record["file"], folder / documents_name(record["file"])
    expected = record["tokens"] * dtype.itemsize
    if not path.is_file():
        return f"{path} is missing"
    if path.stat().st_size != expected:
        return (f"{path} has {path.stat().st_size:,} bytes where the manifest says {expected:,} ({record['tokens']:,} "
                f"tokens of {dtype.name}): it is truncated or damaged")  # fmt: skip
    try:
        starts = np.load(docs, mmap_mode="r")
    except (OSError, ValueError) as error:
        return f"{docs} is missing or damaged ({error})"
    if starts.shape != (record["documents"],):
        return f"{docs} holds {starts.shape} document offsets where the manifest says {record['documents']}"
    if check_hash and file_sha256(path) != record["sha256"]:
        return f"{path} has another sha256 than the manifest's {record['sha256']}: it is damaged"
    return None


def read_record(path: Path, if_damaged: str, if_other_format: str) -> dict:
    """A manifest or progress record of this format and version; DataError naming the file and the fix."""
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is damaged ({error}): {if_damaged}") from None
    if record.get("format") != FORMAT or record.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: not format {FORMAT} version {FORMAT_VERSION}: {if_other_format}")
    return record


def read_manifest(folder: str | Path) -> dict:
    """A finished shards folder's manifest, or an error that says how to finish or make one."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        if (folder / PROGRESS).is_file():
            raise DataError(f"{folder}: prepare has not finished there (no {MANIFEST}): rerun it, it resumes")
        raise DataError(
            f"{folder}: no {MANIFEST}, so not a token-shards folder: make one with "
            f"`rebased data prepare SOURCE {folder} --tokenizer NAME`"
        )
    return read_record(path, REBUILD, "prepare the corpus again")


def verify_shards(folder: str | Path) -> list[str]:
    """Every problem of a finished folder's shards, hashes included (reads every byte)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    dtype = np.dtype(manifest["dtype"])
    problems = []
    for split in manifest["splits"].values():
        problems += [p for r in split["shards"] if (p := shard_problem(folder, r, dtype, check_hash=True))]
    return problems


class TokenShards:
    """One split of a prepared folder as one memory-mapped token stream, checked against the manifest on open.

    sample() draws random windows of length + 1 tokens (inputs and next-token labels) anywhere in the stream;
    sequential() covers it in order with windows that overlap by one token, so each token is a label once.
    """

    def __init__(self, folder: str | Path, split: str = "train"):
        self.folder, self.split = Path(folder), split
        self.manifest = read_manifest(self.folder)
        if split not in self.manifest["splits"] or not self.manifest["splits"][split]["shards"]:
            hint = " (prepare it again with a larger --val-fraction)" if split == "val" else ""
            raise DataError(f"{self.folder}: the {split!r} split has no shards{hint} (splits: {self._split_sizes()})")
        self.dtype = np.dtype(self.manifest["dtype"])
        self.eos_id = self.manifest["tokenizer"]["eos_id"]
        self.vocab_size = self.manifest["tokenizer"]["vocab_size"]
        records = self.manifest["splits"][split]["shards"]
        for record in records:
            if problem := shard_problem(self.folder, record, self.dtype):
                raise DataError(f"{problem}: {REBUILD}")
        self.files = [self.folder / r["file"] for r in records]
        self.ends = np.cumsum([r["tokens"] for r in records])  # where each shard ends in the stream
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()

    def shard(self, index: int) -> np.memmap:
        """Shard `index`, memory-mapped. Only the last MAPPED_SHARDS used stay mapped: each map holds a file
        descriptor, and a corpus the size of the Pile has thousands of shards."""
        if index in self._maps:
            self._maps.move_to_end(index)
        else:
            self._maps[index] = np.memmap(self.files[index], dtype=self.dtype, mode="r")
            if len(self._maps) > MAPPED_SHARDS:
                self._maps.popitem(last=False)
        return self._maps[index]

    def _split_sizes(self) -> str:
        return ", ".join(f"{name}: {s['tokens']:,} tokens" for name, s in self.manifest["splits"].items())

    def __len__(self) -> int:
        return int(self.ends[-1])

    def tokens(self, start: int, count: int) -> np.ndarray:
        """count tokens from position start of the stream, across shard ends where needed."""
        pieces, position, end = [], start, start + count
        shard = int(np.searchsorted(self.ends, start, side="right"))
        while position < end:
            shard_start = int(self.ends[shard - 1]) if shard else 0
            take = min(end, int(self.ends[shard])) - position
            pieces.append(self.shard(shard)[position - shard_start : position - shard_start + take])
            position += take
            shard += 1
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def sample(self, batch_size: int, length: int, generator: torch.Generator | None = None) -> Tensor:
        """[batch_size, length + 1] int64 windows at uniform random positions (same generator state, same batch)."""
        if len(self) < length + 1:
            raise ValueError(f"{self.folder} {self.split}: {len(self):,} tokens, fewer than one window of {length + 1}")
        starts = torch.randint(len(self) - length, (batch_size,), generator=generator)
        return torch.from_numpy(np.stack([self.tokens(int(s), length + 1) for s in starts]).astype(np.int64))

    def sequential(self, length: int, batch_size: int = 1) -> Iterator[Tensor]:
        """[b, length + 1] int64 windows from the start of the stream, window i starting at token i * length;
        the last batch may be smaller; a tail shorter than a window is left out."""
        starts = range(0, len(self) - length, length)
        for first in range(0, len(starts), batch_size):
            rows = [self.tokens(s, length + 1) for s in starts[first : first + batch_size]]
            yield torch.from_numpy(np.stack(rows).astype(np.int64))

    def document_starts(self, shard: int) -> np.ndarray:
        """Where each document of shard `shard` starts, in that shard's positions."""
        return np.load(self.folder / documents_name(self.manifest["splits"][self.split]["shards"][shard]["file"]))
