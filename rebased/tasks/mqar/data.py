"""MQAR (multi-query associative recall), the Zoology generator: token sequences and their labels.

One example of length L with N key-value pairs, vocabulary V (docs/paper.md section 4):

    keys   k_1..k_N  distinct, from [1, V/2)        values v_1..v_N  distinct, from [V/2, V)
    inputs  = k_1 v_1 k_2 v_2 ... k_N v_N | S = (L - 2N)/2 slots of two tokens, all 0
    slot g_j of key j drawn without replacement with p(i) ~ a * i^(a-1), i = 1..S (a = power_a: early slots)
    inputs[2N + 2 g_j] = k_j,  labels[2N + 2 g_j] = v_j,  labels = -100 everywhere else

So the model reads key k_j at the query position and must predict v_j there (the label sits on the query
key itself: Zoology builds labels one step ahead and drops the first). With random_non_queries the zeros
become uniform tokens from [0, V).

Two samplers of the same distribution:
  compat=True  Zoology's own calls on numpy's global RNG, in its order (np.random.seed, then one
               np.random.choice per example for keys, then for values, then for the slots; torch's global
               RNG for random_non_queries), so a seed gives Zoology's arrays bit for bit. Slow: Python per row.
  compat=False (default) batched numpy on its own np.random.Generator(seed): another stream, same law.

Shape letters: n examples, L sequence length, N key-value pairs, S query slots.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from rebased.train.labels import IGNORE_INDEX

# Rows per batch of the fast sampler: bounds its temporaries to about this many int64/float64 elements.
_CHUNK_ELEMENTS = 1 << 22

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MQARConfig:
    """One MQAR segment: num_examples sequences of seq_len tokens with num_kv_pairs pairs each."""

    seq_len: int = 256
    num_kv_pairs: int = 64
    num_examples: int = 1000
    vocab_size: int = 8192
    power_a: float = 0.01
    random_non_queries: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("seq_len", "num_kv_pairs", "num_examples", "vocab_size", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"MQARConfig.{name} must be an int, got {value!r}")
        for name in ("seq_len", "num_kv_pairs", "num_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"MQARConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len % 2:
            raise ValueError(f"MQARConfig.seq_len must be even (key-value pairs and query slots), got {self.seq_len}")
        if 4 * self.num_kv_pairs > self.seq_len:
            raise ValueError(
                f"MQARConfig.num_kv_pairs must satisfy 4 * num_kv_pairs <= seq_len (room for N pairs and N query "
                f"slots), got num_kv_pairs={self.num_kv_pairs} with seq_len={self.seq_len}"
            )
        if self.vocab_size // 2 - 1 < self.num_kv_pairs:
            raise ValueError(
                f"MQARConfig.vocab_size={self.vocab_size} has {max(self.vocab_size // 2 - 1, 0)} keys in "
                f"[1, vocab_size // 2), fewer than num_kv_pairs={self.num_kv_pairs} distinct keys"
            )
        if not (math.isfinite(self.power_a) and self.power_a > 0):
            raise ValueError(f"MQARConfig.power_a must be finite and > 0, got {self.power_a!r}")
        if not 0 <= self.seed < 2**32:  # np.random.seed's range, kept for both samplers
            raise ValueError(f"MQARConfig.seed must be in [0, 2**32), got {self.seed}")

    @property
    def num_slots(self) -> int:
        """S: two-token query slots after the 2N context tokens."""
        return (self.seq_len - 2 * self.num_kv_pairs) // 2

    @property
    def name(self) -> str:
        return f"L={self.seq_len},N={self.num_kv_pairs}"


@dataclass(frozen=True)
class MQARSlice:
    """Rows [start, stop) of an MQARData hold one segment; its sequences are seq_len long (then padding)."""

    name: str
    start: int
    stop: int
    seq_len: int
    num_kv_pairs: int


@dataclass(frozen=True)
class MQARData:
    """inputs, labels: LongTensor [n, L]; rows of a shorter segment are padded to the longest L with
    0 (inputs) and -100 (labels), so padding is never scored. slices: one per segment, in row order."""

    inputs: Tensor
    labels: Tensor
    slices: tuple[MQARSlice, ...]

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def segment(self, name: str) -> tuple[Tensor, Tensor]:
        """(inputs, labels) of the named segment, without padding: [rows, seq_len]."""
        for s in self.slices:
            if s.name == name:
                return self.inputs[s.start : s.stop, : s.seq_len], self.labels[s.start : s.stop, : s.seq_len]
        raise ValueError(f"MQARData.segment: no segment named {name!r}; have {[s.name for s in self.slices]}")


@dataclass(frozen=True)
class MQARSplits:
    train: MQARData
    test: MQARData


def power_law(num_slots: int, power_a: float) -> np.ndarray:
    """p(i) proportional to a * i^(a-1) for slots i = 1..S, normalised as Zoology does: [S]."""
    p = power_a * np.arange(1, num_slots + 1) ** (power_a - 1)
    return p / p.sum()


def generate_mqar(config: MQARConfig, compat: bool = False) -> MQARData:
    """Sample one segment; compat=True reproduces Zoology's arrays for config.seed (see the module doc)."""
    n, L = config.num_examples, config.seq_len
    # torch allocates: first-touching these n*L*8-byte buffers through numpy costs several times more.
    inputs = torch.zeros((n, L), dtype=torch.long)
    labels = torch.full((n, L), IGNORE_INDEX, dtype=torch.long)
    chunks = [(0, n, _sample_compat(config))] if compat else _sample_fast(config)
    for start, stop, (keys, values, slots) in chunks:
        _assemble(inputs[start:stop], labels[start:stop], keys, values, slots)
    if config.random_non_queries:
        _fill_non_queries(inputs, config, compat)
    slice_ = MQARSlice(config.name, 0, n, L, config.num_kv_pairs)
    return MQARData(inputs, labels, (slice_,))


def _sample_compat(config: MQARConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zoology's draws on the global RNG: every key row, then every value row, then every slot row: [n, N] x3."""
    n, N, V = config.num_examples, config.num_kv_pairs, config.vocab_size
    np.random.seed(config.seed)
    key_pool = np.arange(1, V // 2)
    value_pool = np.arange(V // 2, V)
    slot_pool = np.arange(config.num_slots)
    p = power_law(config.num_slots, config.power_a)
    keys = np.stack([np.random.choice(key_pool, size=N, replace=False) for _ in range(n)])
    values = np.stack([np.random.choice(value_pool, size=N, replace=False) for _ in range(n)])
    slots = np.stack([np.random.choice(slot_pool, size=N, replace=False, p=p) for _ in range(n)])
    return keys, values, slots


def _sample_fast(config: MQARConfig) -> Iterator[tuple[int, int, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Same law as _sample_compat, batched: (start, stop, (keys, values, slots)) for row chunks fixed by the
    config alone, so a seed fixes the data whatever the machine."""
    n, N, V, S = config.num_examples, config.num_kv_pairs, config.vocab_size, config.num_slots
    rng = np.random.Generator(np.random.PCG64(config.seed))
    p = power_law(S, config.power_a)
    rows = max(1, _CHUNK_ELEMENTS // max(S, V // 2))  # V // 2: the widest row sample_distinct may draw
    for start in range(0, n, rows):
        m = min(rows, n - start)
        keys = 1 + sample_distinct(rng, m, V // 2 - 1, N)
        values = V // 2 + sample_distinct(rng, m, V - V // 2, N)
        slots = sample_weighted_distinct(rng, m, p, N)
        yield start, start + m, (keys, values, slots)


def sample_distinct(rng: np.random.Generator, n: int, k: int, size: int) -> np.ndarray:
    """n rows of `size` distinct integers from [0, k), each row a uniform random ordered sample: [n, size].

    Sparse case (size << k): the first `size` distinct values in a row of m iid uniform draws, found with two
    integer sorts, O(m log m) per row instead of O(k); a row with too few distinct draws is drawn again. The
    event "enough distinct" is symmetric in the k values, so conditioning on it keeps the sample uniform.
    """
    needed = sum(k / (k - i) for i in range(size))  # expected draws to see `size` distinct values
    spread = math.sqrt(sum(k * i / (k - i) ** 2 for i in range(size)))
    m = math.ceil(needed + 4 * spread) + 1
    if 2 * m >= k:  # dense: a random permutation of the whole range costs about the same
        return np.argsort(rng.random((n, k)), axis=1)[:, :size]
    pos_bits, value_bits = (m - 1).bit_length(), (k - 1).bit_length()
    code = np.int32 if pos_bits + value_bits < 31 else np.int64  # (value, position) in one sortable int
    last = np.iinfo(code).max
    out = np.empty((n, size), dtype=np.int64)
    todo = np.arange(n)
    while todo.size:  # about 3e-5 of rows fall short of `size` distinct values and go round again
        draws = rng.integers(0, k, size=(todo.size, m), dtype=code)
        by_value = np.sort((draws << pos_bits) | np.arange(m, dtype=code), axis=1)  # ties: draw order
        value, pos = by_value >> pos_bits, by_value & ((1 << pos_bits) - 1)
        first = np.ones(value.shape, dtype=bool)
        first[:, 1:] = value[:, 1:] != value[:, :-1]
        by_pos = np.sort(np.where(first, (pos << value_bits) | value, last), axis=1)[:, :size]
        full = by_pos[:, -1] != last
        out[todo[full]] = by_pos[full] & ((1 << value_bits) - 1)
        todo = todo[~full]
    return out


def sample_weighted_distinct(rng: np.random.Generator, n: int, p: np.ndarray, size: int) -> np.ndarray:
    """n rows of `size` distinct indices drawn one after another with probability p among those left: [n, size].

    An exponential race: index i finishes at E_i / p_i, E_i ~ Exp(1); the first to finish is i with
    probability p_i / sum(p) and, memoryless, so on among the rest. That is the law np.random.choice(
    replace=False, p=p) samples (draw from p, discard repeats), and Gumbel-top-k on log p in other words.
    """
    race = rng.standard_exponential((n, p.shape[0])) / p  # [n, S]
    if 2 * size > p.shape[0]:
        return np.argsort(race, axis=1)[:, :size]
    top = np.argpartition(race, size - 1, axis=1)[:, :size]
    return np.take_along_axis(top, np.argsort(np.take_along_axis(race, top, axis=1), axis=1), axis=1)


def _assemble(inputs: Tensor, labels: Tensor, keys: np.ndarray, values: np.ndarray, slots: np.ndarray) -> None:
    """Context pairs, then key j at 2N + 2 slot_j with its value as the label there; in place on [n, L]."""
    keys, values, slots = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)) for a in (keys, values, slots))
    N = keys.shape[1]
    inputs[:, 0 : 2 * N : 2] = keys
    inputs[:, 1 : 2 * N : 2] = values
    query_pos = 2 * N + 2 * slots
    inputs.scatter_(1, query_pos, keys)
    labels.scatter_(1, query_pos, values)


def _fill_non_queries(inputs: Tensor, config: MQARConfig, compat: bool) -> None:
    """Replace every 0 by a uniform token from [0, V), in place (as in Zoology: noise may be 0 or a key)."""
    zero = inputs == 0
    if compat:  # Zoology draws a full [n, L] from torch's global RNG, which it leaves to its caller to seed
        inputs[zero] = torch.randint(config.vocab_size, size=inputs.shape)[zero]
    else:
        rng = np.random.Generator(np.random.PCG64([config.seed, 1]))  # a stream apart from the sampler's
        inputs[zero] = torch.from_numpy(rng.integers(0, config.vocab_size, size=int(zero.sum())))


def make_mqar_splits(
    train_segments: Iterable[tuple[int, int, int]],
    test_segments: Iterable[tuple[int, int, int]],
    *,
    vocab_size: int = 8192,
    power_a: float = 0.01,
    random_non_queries: bool = False,
    seed: int = 0,
    compat: bool = False,
) -> MQARSplits:
    """Train and test mixtures of (seq_len, num_kv_pairs, num_examples) segments, one slice per segment.

    Every segment gets its own seed from (seed, split, index), so train and test never share a stream.
    Disjointness: a test example whose inputs equal those of any train example of the same seq_len is
    dropped (logged; at V = 8192 this takes a grid far smaller than any in the paper), so no test sequence
    was seen in training. A split may not list the same (seq_len, num_kv_pairs) twice.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"make_mqar_splits: seed must be an int >= 0, got {seed!r}")
    common = {"vocab_size": vocab_size, "power_a": power_a, "random_non_queries": random_non_queries}
    train = [generate_mqar(c, compat) for c in _segment_configs(train_segments, "train", 0, seed, common)]
    test = [generate_mqar(c, compat) for c in _segment_configs(test_segments, "test", 1, seed, common)]
    test = [_drop_seen(part, train) for part in test]
    return MQARSplits(train=_concat(train), test=_concat(test))


def _segment_configs(segments: Iterable, split: str, split_id: int, seed: int, common: dict) -> list[MQARConfig]:
    segments = [tuple(s) for s in segments]
    if not segments:
        raise ValueError(f"{split}_segments must list at least one (seq_len, num_kv_pairs, num_examples)")
    configs = []
    for index, segment in enumerate(segments):
        if len(segment) != 3:
            raise ValueError(f"{split}_segments[{index}] must be (seq_len, num_kv_pairs, num_examples), got {segment}")
        seq_len, num_kv_pairs, num_examples = segment
        # One 32-bit seed per (seed, split, index): what np.random.seed accepts in compat mode.
        segment_seed = int(np.random.SeedSequence(seed, spawn_key=(split_id, index)).generate_state(1)[0])
        configs.append(MQARConfig(seq_len, num_kv_pairs, num_examples, seed=segment_seed, **common))
    names = [c.name for c in configs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{split}_segments lists {repeated} more than once; give one segment more examples instead")
    return configs


def _row_hashes(rows: np.ndarray) -> np.ndarray:
    """A 64-bit hash per row (wrapping arithmetic); equal rows hash equal, unequal ones rarely do: [n]."""
    weights = np.random.Generator(np.random.PCG64(0)).integers(0, 2**63, size=rows.shape[1], dtype=np.uint64) | 1
    step = max(1, _CHUNK_ELEMENTS // max(rows.shape[1], 1))  # bounds the uint64 temporary
    hashes = [(rows[i : i + step].astype(np.uint64) * weights).sum(axis=1) for i in range(0, len(rows), step)]
    return np.concatenate([np.empty(0, dtype=np.uint64), *hashes])  # sums wrap mod 2^64


def _drop_seen(part: MQARData, train: Sequence[MQARData]) -> MQARData:
    """part without the rows whose inputs equal a train row of the same seq_len (hash, then exact check)."""
    s = part.slices[0]
    rows = part.inputs.numpy()
    hashes = _row_hashes(rows)
    drop: set[int] = set()
    for seen in (t.inputs.numpy() for t in train if t.slices[0].seq_len == s.seq_len):
        seen_hashes = _row_hashes(seen)
        for i in np.nonzero(np.isin(hashes, seen_hashes))[0]:
            if (seen[seen_hashes == hashes[i]] == rows[i]).all(axis=1).any():
                drop.add(int(i))
    if not drop:
        return part
    log.warning("MQAR %s: dropped %d test examples equal to train examples", s.name, len(drop))
    keep = torch.from_numpy(np.setdiff1d(np.arange(len(part)), sorted(drop)))
    return MQARData(part.inputs[keep], part.labels[keep], (MQARSlice(s.name, 0, len(keep), s.seq_len, s.num_kv_pairs),))


def _concat(parts: Sequence[MQARData]) -> MQARData:
    """Stack single-segment parts, padding to the longest seq_len; slices follow the row order. One part is
    returned as it is (a paper-scale split is 1.6 GB: a padded copy took seconds)."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.inputs.shape[1] for p in parts)
    inputs, labels, slices, start = [], [], [], 0
    for p in parts:
        pad = width - p.inputs.shape[1]
        inputs.append(torch.nn.functional.pad(p.inputs, (0, pad), value=0) if pad else p.inputs)
        labels.append(torch.nn.functional.pad(p.labels, (0, pad), value=IGNORE_INDEX) if pad else p.labels)
        s = p.slices[0]
        slices.append(MQARSlice(s.name, start, start + len(p), s.seq_len, s.num_kv_pairs))
        start += len(p)
    return MQARData(torch.cat(inputs), torch.cat(labels), tuple(slices))
