"""Batches of documents -> token arrays (each document's tokens and then the end-of-document token), in order.

workers=1 encodes in this process: `tokenizers` spreads each batch over the cores with its own threads.
workers=N>1 sends batches to N worker processes, each encoding on one thread; at most 2N batches are in
flight, so memory stays bounded however large the corpus.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np

from rebased.tasks.lm.tokenizers import Tokenizer, tokenizer_from_json

_worker_tokenizer: Tokenizer | None = None  # the tokenizer of a worker process


def encode_texts(tokenizer: Tokenizer, texts: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """All texts' tokens, each followed by EOS, as one array; and each text's token count (EOS included)."""
    ids = tokenizer.encode_batch(texts)
    lengths = np.array([len(x) + 1 for x in ids], dtype=np.int64)
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    ends = np.cumsum(lengths)
    for row, end, length in zip(ids, ends, lengths):
        flat[end - length : end - 1] = row
    flat[ends - 1] = tokenizer.eos_id
    return flat, lengths


def _start_worker(json_text: str, name: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    _worker_tokenizer = tokenizer_from_json(json_text, name)


def _encode_in_worker(texts: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    assert _worker_tokenizer is not None
    return encode_texts(_worker_tokenizer, texts, dtype)


def _pieces(batch: Sequence, encoded: tuple[np.ndarray, np.ndarray]) -> list[np.ndarray | None]:
    """Each document's slice of the encoded batch; None for an empty document (which was not encoded)."""
    flat, lengths = encoded
    slices = iter(np.split(flat, np.cumsum(lengths)[:-1]))
    return [None if doc.text is None else next(slices) for doc in batch]


def encoded_batches(batches: Iterator[Sequence], tokenizer: Tokenizer, dtype: str, workers: int) -> Iterator:
    """(batch, the token array of each of its documents) for each batch of documents (with .text), in order."""
    if workers <= 1:
        for batch in batches:
            yield batch, _pieces(batch, encode_texts(tokenizer, [d.text for d in batch if d.text is not None], dtype))
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")  # fork: no re-import
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # so that forking after training a BPE prints no warning
    try:
        with context.Pool(workers, _start_worker, (tokenizer.to_json(), tokenizer.name)) as pool:
            pending: deque = deque()
            for batch in batches:
                texts = [d.text for d in batch if d.text is not None]
                pending.append((batch, pool.apply_async(_encode_in_worker, (texts, dtype))))
                if len(pending) >= 2 * workers:
                    done, result = pending.popleft()
                    yield done, _pieces(done, result.get())
            while pending:
                done, result = pending.popleft()
                yield done, _pieces(done, result.get())
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
