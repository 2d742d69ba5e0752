"""Corpus -> token shards: `rebased data prepare SOURCE OUT --tokenizer NAME`.

Documents stream from the sources (rebased/tasks/lm/sources.py) in a fixed order; each goes to the train or the
validation split by a hash of its text (blake2b, so reruns, resumes and duplicates agree), is tokenized in
batches (in this process, where `tokenizers` spreads a batch over the cores itself, or in a pool of worker
processes) and is appended to its split's open shard, followed by the end-of-document token
(rebased/tasks/lm/shards.py has the file format). Memory stays bounded: a few batches of text in flight and
shards written as they grow.

Resume. When a shard reaches --shard-tokens, every split's open shard is closed too, so that one position in the
source stream (source, record) marks where all finished shards end: a checkpoint, saved in progress.json. A
killed prepare restarts from the last checkpoint, skipping to that record, and writes byte-identical shards.
A rerun first checks that the folder holds this corpus (the sources already read have the same size and
mtime, or sha256), the same tokenizer (sha256) and the same settings, and rebuilds from the first missing or
truncated shard. manifest.json is written last.

Manifest fields: format, format_version, complete, created_by, tokenizer {name, file, sha256, vocab_size,
eos_id}, dtype, settings {val_fraction, shard_tokens, split_hash}, sources [{path, kind, files, bytes, mtime,
sha256, documents {train, val}, tokens {train, val}, empty_documents}], splits {train|val: {tokens, documents,
shards [{file, tokens, documents, sha256}]}}, checkpoints [{end [source, record], shards, counts}].
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

import rebased
from rebased.files import atomic_write
from rebased.tasks.lm import DataError
from rebased.tasks.lm.encode import encoded_batches
from rebased.tasks.lm.shards import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    PROGRESS,
    SPLITS,
    ShardWriter,
    documents_name,
    read_record,
    shard_problem,
    token_dtype,
)
from rebased.tasks.lm.sources import Source, find_sources, read_records, source_sha256
from rebased.tasks.lm.tokenizers import (
    TOKENIZER_FILE,
    Tokenizer,
    bpe_vocab_size,
    load_tokenizer,
    resolve_tokenizer,
    train_bpe,
)

log = logging.getLogger(__name__)
STATE_KEYS = ("format", "format_version", "complete", "created_by", "tokenizer", "dtype", "settings", "sources",
              "checkpoints")  # fmt: skip
SHARD_FILE = re.compile(r"^(train|val)_\d{5}\.(bin|docs\.npy)$")
TEMPORARY_FILE = re.compile(r"^\.?((train|val)_\d{5}\.(bin|docs\.npy)|(manifest|progress|tokenizer)\.json)\.tmp$")


@dataclass(frozen=True)
class PrepareConfig:
    val_fraction: float = 0.005  # of documents, chosen by hash
    shard_tokens: int = 50_000_000  # a checkpoint each time a shard reaches this (100 MB of uint16)
    workers: int = 1  # 1: tokenize in this process (`tokenizers` threads over the cores); N: a pool of N
    batch_bytes: int = 1 << 22  # text per tokenizer call: enough for its threads, little memory
    bpe_sample_bytes: int = 100 << 20  # text a bpe:N tokenizer is trained on (the first train documents)
    tokenizer_dir: str | None = None  # where fetched tokenizers are (default: default_cache_dir())
    progress: bool = True  # a tqdm bar on stderr


class Document(NamedTuple):
    source: int
    record: int
    split: str
    text: str | None  # None: empty, skipped
    bytes: int


def prepare(source: str | Path, out: str | Path, tokenizer: str, config: PrepareConfig = PrepareConfig()) -> dict:
    """Tokenize the corpus at `source` into token shards in `out` (resuming what is there); the manifest."""
    if not 0 <= config.val_fraction < 1 or config.shard_tokens < 1 or config.workers < 1:
        raise ValueError("need 0 <= val_fraction < 1, shard_tokens >= 1 and workers >= 1")
    root, sources = find_sources(source)
    out = Path(out)
    state = _load_state(out)
    if state is not None:
        _check_settings(out, state, config)
        _check_corpus(out, root, state, sources)
    tok = _tokenizer(tokenizer, out, state, root, sources, config)
    state = state or _new_state(tok, config)
    _repair(out, state)
    consumed = _consumed(state)
    state["sources"] = [_describe(root, s, state["sources"], i, consumed) for i, s in enumerate(sources)]
    if state["complete"] and consumed == len(sources):
        return _record(state)  # nothing new: what is there is the manifest's corpus
    state["complete"] = False
    _start_writing(out, state, tok)
    _write_shards(root, sources, out, state, tok, config)
    return _finish(out, state)


def _record(state: dict) -> dict:
    """The state with what follows from it: per split its shards and totals, per source its counts."""
    record = json.loads(json.dumps(state))
    record["splits"] = {split: {"tokens": 0, "documents": 0, "shards": []} for split in SPLITS}
    for source in record["sources"]:
        source.update(documents=dict.fromkeys(SPLITS, 0), tokens=dict.fromkeys(SPLITS, 0), empty_documents=0)
    for checkpoint in record["checkpoints"]:
        for shard in checkpoint["shards"]:
            split = record["splits"][shard["split"]]
            split["shards"].append({k: v for k, v in shard.items() if k != "split"})
            split["tokens"] += shard["tokens"]
            split["documents"] += shard["documents"]
        for index, counts in checkpoint["counts"].items():
            source = record["sources"][int(index)]
            source["empty_documents"] += counts["empty"]
            for split in SPLITS:
                source["documents"][split] += counts[split][0]
                source["tokens"][split] += counts[split][1]
    return record


def _save(out: Path, name: str, state: dict) -> None:
    atomic_write(out / name, lambda f: f.write(json.dumps(_record(state), indent=1).encode()))


def _finish(out: Path, state: dict) -> dict:
    state["complete"] = True
    _save(out, MANIFEST, state)
    (out / PROGRESS).unlink(missing_ok=True)
    return _record(state)


def _new_state(tok: Tokenizer, config: PrepareConfig) -> dict:
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "complete": False,
        "created_by": f"rebased {rebased.__version__}",
        "tokenizer": {"name": tok.name, "file": TOKENIZER_FILE, "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                      "eos_id": tok.eos_id},
        "dtype": token_dtype(tok.vocab_size).name,
        "settings": {"val_fraction": config.val_fraction, "shard_tokens": config.shard_tokens,
                     "split_hash": "val if blake2b-64 of the UTF-8 text, little-endian, < val_fraction * 2^64"},
        "sources": [], "checkpoints": [],
    }  # fmt: skip


def _load_state(out: Path) -> dict | None:
    """The record in out (progress.json first: it is the newer when both are there), None for a new folder."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file: OUT must be a folder")
    for name in (PROGRESS, MANIFEST):
        path = out / name
        if path.is_file():
            record = read_record(path, f"delete {out} and prepare again", "use another OUT")
            return {key: record[key] for key in STATE_KEYS}
    if out.is_dir() and any(out.iterdir()):
        raise DataError(
            f"{out} is not empty and has no {MANIFEST} or {PROGRESS}, so it is no token-shards folder: "
            f"choose a new or empty folder for OUT"
        )
    return None


def _check_settings(out: Path, state: dict, config: PrepareConfig) -> None:
    settings = state["settings"]
    if (settings["val_fraction"], settings["shard_tokens"]) != (config.val_fraction, config.shard_tokens):
        raise DataError(
            f"{out} was prepared with --val-fraction {settings['val_fraction']} --shard-tokens "
            f"{settings['shard_tokens']}: rerun with those to resume, or prepare into another OUT"
        )


def _position(state: dict) -> tuple[int, int]:
    """(source, record) where the last checkpoint ends: the first record not yet in a finished shard."""
    return tuple(state["checkpoints"][-1]["end"]) if state["checkpoints"] else (0, 0)


def _consumed(state: dict) -> int:
    """How many sources (from the first) have records in finished shards."""
    source, record = _position(state)
    return source + (record > 0)


def _check_corpus(out: Path, root: Path, state: dict, sources: list[Source]) -> None:
    """Refuse a folder whose finished shards came from other sources than the ones given now."""
    for index in range(_consumed(state)):
        old = state["sources"][index]
        new = sources[index] if index < len(sources) else None
        if new is None or not _same_source(root, old, new):
            now = f"is now {new.path}, {new.bytes:,} bytes" if new else "is missing"
            raise DataError(
                f"{out} holds shards of another corpus: its source #{index} {old['path']} ({old['bytes']:,} bytes, "
                f"sha256 {old.get('sha256') or 'not yet computed'}) {now} under {root}. Prepare this corpus into "
                f"another OUT (or delete {out}); to resume, give the SOURCE it was made from"
            )


def _same_source(root: Path, old: dict, new: Source) -> bool:
    if (old["path"], old["kind"], old["files"], old["bytes"]) != (new.path, new.kind, len(new.files), new.bytes):
        return False
    if old["mtime"] == new.mtime:
        return True
    return old.get("sha256") is not None and source_sha256(root, new) == old["sha256"]  # copied: same bytes?


def _describe(root: Path, source: Source, old: list[dict], index: int, consumed: int) -> dict:
    """A source's entry; a source already read keeps its sha256 (the corpus check has compared it)."""
    sha = old[index].get("sha256") if index < consumed else None
    return {**source.describe(), "sha256": sha}


def _tokenizer(name: str, out: Path, state: dict | None, root: Path, sources: list[Source], config) -> Tokenizer:
    """The tokenizer asked for; on resume, the shards' own (the same sha256, whatever it is called now)."""
    recorded = state["tokenizer"] if state else None
    vocab_size = bpe_vocab_size(name)
    if vocab_size is not None and recorded and recorded["name"] == name:
        tok = load_tokenizer(out, name=name)  # trained by the first run: the same file, never retrained
    elif vocab_size is not None:
        if recorded:  # a new BPE could only differ from the shards' tokenizer
            raise _tokenizer_mismatch(out, recorded, name, "a BPE trained anew")
        log.info("training %s on up to %d MB of the corpus", name, config.bpe_sample_bytes >> 20)
        tok = train_bpe(_bpe_texts(root, sources, config), vocab_size)
    else:
        tok = resolve_tokenizer(name, config.tokenizer_dir)
    if recorded and tok.sha256 != recorded["sha256"]:
        raise _tokenizer_mismatch(out, recorded, name, f"sha256 {tok.sha256}")
    return tok


def _tokenizer_mismatch(out: Path, recorded: dict, name: str, what: str) -> DataError:
    return DataError(
        f"{out} holds shards made with tokenizer {recorded['name']} of sha256 {recorded['sha256']}; --tokenizer "
        f"{name} is {what}: resume with the same tokenizer (--tokenizer {out / TOKENIZER_FILE} always is), "
        f"or prepare into another OUT"
    )


def _bpe_texts(root: Path, sources: list[Source], config: PrepareConfig) -> Iterator[str]:
    """The first train documents, up to config.bpe_sample_bytes of text."""
    seen = 0
    for doc in _documents(root, sources, (0, 0), config.val_fraction):
        if doc.text is not None and doc.split == "train":
            yield doc.text
            seen += doc.bytes
            if seen >= config.bpe_sample_bytes:
                return


def _repair(out: Path, state: dict) -> None:
    """Drop the checkpoints from the first one with a missing or truncated shard on (they are rewritten)."""
    dtype = np.dtype(state["dtype"])
    for index, checkpoint in enumerate(state["checkpoints"]):
        problems = [p for shard in checkpoint["shards"] if (p := shard_problem(out, shard, dtype))]
        if problems:
            log.warning("%s: rebuilding from there", problems[0])
            del state["checkpoints"][index:]
            state["complete"] = False
            return


def _start_writing(out: Path, state: dict, tok: Tokenizer) -> None:
    """Tokenizer and progress record in place, and every file of ours that no checkpoint holds removed
    (the open shards of a killed run; shards of dropped checkpoints)."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_path = out / TOKENIZER_FILE
    if not tokenizer_path.is_file() or tokenizer_path.read_text(encoding="utf-8") != tok.to_json():
        atomic_write(tokenizer_path, lambda f: f.write(tok.to_json().encode("utf-8")))
    _save(out, PROGRESS, state)
    (out / MANIFEST).unlink(missing_ok=True)
    kept = {name for c in state["checkpoints"] for s in c["shards"] for name in (s["file"], documents_name(s["file"]))}
    for path in out.iterdir():
        if TEMPORARY_FILE.match(path.name) or (SHARD_FILE.match(path.name) and path.name not in kept):
            path.unlink()


def _documents(root: Path, sources: list[Source], start: tuple[int, int], val_fraction: float,
               on_source_done=None) -> Iterator[Document]:  # fmt: skip
    """Every record from position `start` on, with its split."""
    threshold = int(val_fraction * 2**64)
    for index in range(start[0], len(sources)):
        source = sources[index]
        for record, text in read_records(root, source, start[1] if index == start[0] else 0):
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError as error:  # JSON can hold lone surrogates, which are no text
                raise DataError(f"{root / source.path}, record {record}: {error.reason}; fix or remove it") from None
            split = "val" if _split_hash(data) < threshold else "train"
            yield Document(index, record, split, text if text.strip() else None, len(data))
        if on_source_done:
            on_source_done(index)


def _split_hash(data: bytes) -> int:
    """A document's place in [0, 2^64): below val_fraction * 2^64 it is a validation document."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def is_validation(text: str, val_fraction: float) -> bool:
    return _split_hash(text.encode("utf-8")) < int(val_fraction * 2**64)


def _batches(docs: Iterator[Document], batch_bytes: int) -> Iterator[list[Document]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += doc.bytes
        if size >= batch_bytes or len(batch) >= 8192:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class _OpenShards:
    """The open shard of each split and the per-source counts since the last checkpoint."""

    def __init__(self, out: Path, state: dict, budget: int):
        done = [s["split"] for c in state["checkpoints"] for s in c["shards"]]
        dtype = np.dtype(state["dtype"])
        self.writers = {split: ShardWriter(out, split, done.count(split), dtype) for split in SPLITS}
        self.budget, self.counts = budget, {}

    def add(self, doc: Document, tokens: np.ndarray | None) -> None:
        counts = self.counts.setdefault(str(doc.source), {"train": [0, 0], "val": [0, 0], "empty": 0})
        if tokens is None:
            counts["empty"] += 1
            return
        self.writers[doc.split].add(tokens)
        counts[doc.split][0] += 1
        counts[doc.split][1] += len(tokens)

    @property
    def full(self) -> bool:
        return any(writer.tokens >= self.budget for writer in self.writers.values())

    def checkpoint(self, end: tuple[int, int]) -> dict:
        shards = [record for writer in self.writers.values() if (record := writer.close())]
        checkpoint, self.counts = {"end": list(end), "shards": shards, "counts": self.counts}, {}
        return checkpoint

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()


def _write_shards(root: Path, sources: list[Source], out: Path, state: dict, tok: Tokenizer, config) -> None:
    def hashed(index: int) -> None:  # a source read to its end: its sha256, for the manifest
        if state["sources"][index]["sha256"] is None:
            state["sources"][index]["sha256"] = source_sha256(root, sources[index])

    def save_checkpoint(end: tuple[int, int]) -> None:
        state["checkpoints"].append(shards.checkpoint(end))
        _save(out, PROGRESS, state)

    start = _position(state)
    shards = _OpenShards(out, state, config.shard_tokens)
    docs = _documents(root, sources, start, config.val_fraction, on_source_done=hashed)
    bar = tqdm(desc="prepare", unit=" docs", disable=not config.progress, dynamic_ncols=True)
    began, tokens = time.perf_counter(), 0
    try:
        for batch, pieces in encoded_batches(_batches(docs, config.batch_bytes), tok, state["dtype"], config.workers):
            for doc, piece in zip(batch, pieces):
                shards.add(doc, piece)
                if shards.full:
                    save_checkpoint((doc.source, doc.record + 1))
            tokens += sum(len(p) for p in pieces if p is not None)
            bar.update(len(batch))
            bar.set_postfix_str(f"{tokens:,} tokens, {tokens / (time.perf_counter() - began):,.0f} tokens/s")
        end = (len(sources), 0)
        if shards.counts or end != start:
            save_checkpoint(end)  # the last shards, however short
    finally:
        shards.abort()
        bar.close()
