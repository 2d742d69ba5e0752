"""MQAR data: the invariants of every example, determinism, the samplers' laws, splits, and bad input.

Statistical tests use fixed seeds (so they cannot flake) and bounds a correct sampler meets with a wide
margin for almost any seed (5 standard deviations or more), so they still catch a wrong law.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from rebased.tasks.mqar.data import (
    IGNORE_INDEX,
    MQARConfig,
    generate_mqar,
    make_mqar_splits,
    power_law,
    sample_distinct,
    sample_weighted_distinct,
)

MODES = [pytest.param(False, id="fast"), pytest.param(True, id="compat")]


def check_examples(inputs: torch.Tensor, labels: torch.Tensor, config: MQARConfig) -> None:
    """Every property of one MQAR segment: keys from the lower half of the vocabulary and values from the upper,
    distinct within an example, N key-value pairs first, then each key queried once on an even offset of the
    query region with its value as the label, zeros (or noise) elsewhere."""
    n, L, N, V = config.num_examples, config.seq_len, config.num_kv_pairs, config.vocab_size
    assert inputs.shape == labels.shape == (n, L)
    assert inputs.dtype == labels.dtype == torch.long
    x, y = inputs.numpy(), labels.numpy()
    keys, values = x[:, 0 : 2 * N : 2], x[:, 1 : 2 * N : 2]
    assert ((keys >= 1) & (keys < V // 2)).all()
    assert ((values >= V // 2) & (values < V)).all()
    assert (np.diff(np.sort(keys, axis=1), axis=1) > 0).all(), "keys repeat within an example"
    assert (np.diff(np.sort(values, axis=1), axis=1) > 0).all(), "values repeat within an example"
    assert (y[:, : 2 * N] == IGNORE_INDEX).all()
    labelled = y != IGNORE_INDEX
    assert (labelled.sum(axis=1) == N).all()
    rows, pos = np.nonzero(labelled)
    assert ((pos - 2 * N) % 2 == 0).all(), "queries sit on the even offsets of the query region"
    # Each label is the value paired with the key read at that position, and every key is queried once.
    pair = {(r, k): v for r in range(n) for k, v in zip(keys[r], values[r])}
    assert all(pair[(r, x[r, p])] == y[r, p] for r, p in zip(rows, pos))
    queried = np.sort(x[labelled].reshape(n, N), axis=1)
    assert (queried == np.sort(keys, axis=1)).all()
    if not config.random_non_queries:
        query_region = x[:, 2 * N :]
        assert (query_region[~labelled[:, 2 * N :]] == 0).all()
    else:
        assert ((x >= 0) & (x < V)).all()


@pytest.mark.parametrize("compat", MODES)
@pytest.mark.parametrize(
    "config",
    [
        MQARConfig(seq_len=64, num_kv_pairs=4, num_examples=300, seed=1),
        MQARConfig(seq_len=256, num_kv_pairs=64, num_examples=200, seed=2),  # 4N = L: every slot is a query
        MQARConfig(seq_len=128, num_kv_pairs=16, num_examples=200, vocab_size=40, power_a=1.0, seed=3),
        MQARConfig(seq_len=96, num_kv_pairs=8, num_examples=200, random_non_queries=True, seed=4),
    ],
    ids=lambda c: f"{c.name},V={c.vocab_size},a={c.power_a},rnq={c.random_non_queries}",
)
def test_invariants(config, compat):
    torch.manual_seed(0)  # compat noise comes from torch's global RNG
    data = generate_mqar(config, compat=compat)
    check_examples(data.inputs, data.labels, config)
    assert [(s.name, s.start, s.stop) for s in data.slices] == [(config.name, 0, config.num_examples)]


@pytest.mark.parametrize("compat", MODES)
def test_same_seed_same_data_other_seed_other_data(compat):
    config = MQARConfig(seq_len=128, num_kv_pairs=16, num_examples=100, seed=5)
    first = generate_mqar(config, compat=compat)
    np.random.seed(12345)  # compat reseeds the global RNG itself; the fast path never reads it
    second = generate_mqar(config, compat=compat)
    other = generate_mqar(MQARConfig(seq_len=128, num_kv_pairs=16, num_examples=100, seed=6), compat=compat)
    assert torch.equal(first.inputs, second.inputs) and torch.equal(first.labels, second.labels)
    assert not torch.equal(first.inputs, other.inputs)


def test_chunk_boundaries_keep_the_invariants(monkeypatch):
    """The fast path samples in row chunks; at one row per chunk every row sits on a boundary."""
    config = MQARConfig(seq_len=64, num_kv_pairs=8, num_examples=50, seed=7)
    monkeypatch.setattr("rebased.tasks.mqar.data._CHUNK_ELEMENTS", 1)
    data = generate_mqar(config)
    check_examples(data.inputs, data.labels, config)


@pytest.mark.parametrize("compat", MODES)
def test_noise_only_replaces_the_zeros(compat):
    base = MQARConfig(seq_len=128, num_kv_pairs=16, num_examples=100, seed=8)
    noisy = MQARConfig(seq_len=128, num_kv_pairs=16, num_examples=100, seed=8, random_non_queries=True)
    clean, rnq = generate_mqar(base, compat=compat), generate_mqar(noisy, compat=compat)
    zero = clean.inputs == 0
    assert torch.equal(clean.labels, rnq.labels)
    assert torch.equal(clean.inputs[~zero], rnq.inputs[~zero])
    assert (rnq.inputs[zero] != 0).float().mean() > 0.99  # 0 is one token in V = 8192


def test_compat_follows_zoologys_call_order():
    """An independent spelling of the documented calls: seed; per row, choice without p over the key pool
    (which RandomState implements as permutation(len(pool))[:N]); then the value rows; then per row,
    choice with p over the slots. Equal arrays bind the order and the number of draws."""
    config = MQARConfig(seq_len=96, num_kv_pairs=8, num_examples=40, vocab_size=512, seed=9)
    n, N, V, S = 40, 8, 512, config.num_slots
    rs = np.random.RandomState(config.seed)
    keys = np.stack([np.arange(1, V // 2)[rs.permutation(V // 2 - 1)[:N]] for _ in range(n)])
    values = np.stack([np.arange(V // 2, V)[rs.permutation(V - V // 2)[:N]] for _ in range(n)])
    slots = np.stack([rs.choice(S, N, replace=False, p=power_law(S, config.power_a)) for _ in range(n)])
    inputs = np.zeros((n, config.seq_len), dtype=np.int64)
    labels = np.full((n, config.seq_len), IGNORE_INDEX, dtype=np.int64)
    inputs[:, 0 : 2 * N : 2], inputs[:, 1 : 2 * N : 2] = keys, values
    for r, c in itertools.product(range(n), range(N)):
        inputs[r, 2 * N + 2 * slots[r, c]] = keys[r, c]
        labels[r, 2 * N + 2 * slots[r, c]] = values[r, c]
    data = generate_mqar(config, compat=True)
    np.testing.assert_array_equal(data.inputs.numpy(), inputs)
    np.testing.assert_array_equal(data.labels.numpy(), labels)


def test_compat_noise_is_one_full_draw_from_torchs_global_rng():
    config = MQARConfig(seq_len=64, num_kv_pairs=4, num_examples=30, random_non_queries=True, seed=10)
    clean = generate_mqar(MQARConfig(seq_len=64, num_kv_pairs=4, num_examples=30, seed=10), compat=True)
    torch.manual_seed(3)
    noise = torch.randint(config.vocab_size, size=(30, 64))
    torch.manual_seed(3)
    noisy = generate_mqar(config, compat=True)
    zero = clean.inputs == 0
    assert torch.equal(noisy.inputs[zero], noise[zero])


@pytest.mark.parametrize("compat", MODES)
def test_single_query_slot_follows_the_power_law(compat):
    """With N = 1 the query's slot is one draw from p: compare the histogram to p, 5 sigma per slot."""
    n = 20_000 if not compat else 6_000
    config = MQARConfig(seq_len=64, num_kv_pairs=1, num_examples=n, seed=11)
    data = generate_mqar(config, compat=compat)
    slot = (np.nonzero(data.labels.numpy() != IGNORE_INDEX)[1] - 2) // 2
    freq = np.bincount(slot, minlength=config.num_slots) / n
    p = power_law(config.num_slots, config.power_a)
    assert (np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-12).all()
    assert freq[:8].sum() > 2 * freq[-8:].sum()  # a = 0.01: early slots clearly favoured


@pytest.mark.parametrize("power_a, early_over_late", [(0.01, 4.0), (1.0, None)])
def test_many_queries_favour_early_slots(power_a, early_over_late):
    config = MQARConfig(seq_len=512, num_kv_pairs=32, num_examples=4000, power_a=power_a, seed=12)
    labelled = generate_mqar(config).labels.numpy()[:, 2 * 32 :: 2] != IGNORE_INDEX  # [n, S]
    per_slot = labelled.mean(axis=0)
    quarter = config.num_slots // 4
    early, late = per_slot[:quarter].mean(), per_slot[-quarter:].mean()
    if early_over_late is None:  # a = 1: uniform, every slot holds a query with probability N / S
        assert abs(early - late) < 0.01
    else:
        assert early > early_over_late * late


def test_fast_and_compat_fill_each_slot_equally_often():
    """Same law, other streams: per-slot query frequencies agree within 5 sigma of their difference."""
    n, N = 4000, 32
    per_slot = [
        (
            generate_mqar(MQARConfig(512, N, n, seed=18), compat=compat).labels.numpy()[:, 2 * N :: 2] != IGNORE_INDEX
        ).mean(axis=0)
        for compat in (False, True)
    ]
    pooled = (per_slot[0] + per_slot[1]) / 2
    sigma = np.sqrt(2 * pooled * (1 - pooled) / n)
    assert (np.abs(per_slot[0] - per_slot[1]) <= 5 * sigma + 1e-12).all()


def test_weighted_sampler_matches_sequential_sampling_without_replacement():
    """Ordered triples from 5 indices: chi-square against the exact sequential probabilities."""
    p = np.array([0.4, 0.25, 0.2, 0.1, 0.05])
    triples = list(itertools.permutations(range(5), 3))

    def exact(t):
        left, prob = 1.0, 1.0
        for i in t:
            prob, left = prob * p[i] / left, left - p[i]
        return prob

    expected = np.array([exact(t) for t in triples])
    assert abs(expected.sum() - 1) < 1e-12
    n = 100_000
    draws = sample_weighted_distinct(np.random.default_rng(13), n, p, 3)
    index = {t: i for i, t in enumerate(triples)}
    counts = np.bincount([index[tuple(row)] for row in draws.tolist()], minlength=len(triples))
    chi2 = ((counts - n * expected) ** 2 / (n * expected)).sum()
    df = len(triples) - 1
    assert chi2 < df + 6 * np.sqrt(2 * df)


@pytest.mark.parametrize("k, size", [(50, 5), (12, 4)], ids=["sparse", "dense"])
def test_distinct_sampler_is_uniform_over_ordered_pairs(k, size):
    """The first two entries of a row: uniform over the k (k - 1) ordered pairs of distinct values."""
    n = 150_000
    draws = sample_distinct(np.random.default_rng(14), n, k, size)
    assert draws.shape == (n, size) and draws.min() >= 0 and draws.max() < k
    assert (np.diff(np.sort(draws, axis=1), axis=1) > 0).all()
    counts = np.bincount(draws[:, 0] * k + draws[:, 1], minlength=k * k).reshape(k, k)
    assert (np.diag(counts) == 0).all()
    cells = counts[~np.eye(k, dtype=bool)]
    mean = n / cells.size
    chi2 = ((cells - mean) ** 2 / mean).sum()
    df = cells.size - 1
    assert chi2 < df + 6 * np.sqrt(2 * df)


def test_splits_mix_segments_with_slices_and_padding():
    splits = make_mqar_splits([(64, 4, 120), (128, 16, 80)], [(128, 16, 50), (256, 32, 40)], seed=15)
    train, test = splits.train, splits.test
    assert [(s.name, s.start, s.stop) for s in train.slices] == [("L=64,N=4", 0, 120), ("L=128,N=16", 120, 200)]
    assert [(s.name, s.start, s.stop) for s in test.slices] == [("L=128,N=16", 0, 50), ("L=256,N=32", 50, 90)]
    assert train.inputs.shape == (200, 128) and test.inputs.shape == (90, 256)
    assert (train.inputs[:120, 64:] == 0).all() and (train.labels[:120, 64:] == IGNORE_INDEX).all()
    for data in (train, test):
        for s in data.slices:
            inputs, labels = data.segment(s.name)
            config = MQARConfig(s.seq_len, s.num_kv_pairs, s.stop - s.start)
            check_examples(inputs, labels, config)
    again = make_mqar_splits([(64, 4, 120), (128, 16, 80)], [(128, 16, 50), (256, 32, 40)], seed=15)
    assert torch.equal(again.train.inputs, train.inputs) and torch.equal(again.test.labels, test.labels)
    with pytest.raises(ValueError, match="no segment named 'L=1,N=1'"):
        train.segment("L=1,N=1")


@pytest.mark.parametrize("compat", MODES)
def test_test_split_is_disjoint_from_train(compat):
    splits = make_mqar_splits([(64, 4, 300)], [(64, 4, 200)], seed=16, compat=compat)
    seen = {row.tobytes() for row in splits.train.inputs.numpy()}
    assert not any(row.tobytes() in seen for row in splits.test.inputs.numpy())
    assert len(splits.test) == 200  # at V = 8192 nothing collides, so nothing was dropped


def test_test_examples_seen_in_training_are_dropped():
    """A grid of 12 possible sequences (3 keys x 4 values x 1 slot): collisions are certain."""
    splits = make_mqar_splits([(4, 1, 300)], [(4, 1, 40)], vocab_size=8, seed=17)
    seen = {row.tobytes() for row in splits.train.inputs.numpy()}
    assert not any(row.tobytes() in seen for row in splits.test.inputs.numpy())
    assert len(splits.test) < 40 and splits.test.slices[0].stop == len(splits.test)
    assert len(seen) == 12  # 40 draws from 12 sequences: all seen (a miss: probability below 1e-10)
    assert len(splits.test) == 0


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"seq_len": 255, "num_kv_pairs": 4}, "seq_len must be even.*255"),
        ({"seq_len": 256, "num_kv_pairs": 65}, "num_kv_pairs.*4 \\* num_kv_pairs <= seq_len.*num_kv_pairs=65"),
        ({"seq_len": 256, "num_kv_pairs": 64, "vocab_size": 100}, "vocab_size=100 has 49 keys.*num_kv_pairs=64"),
        ({"num_examples": 0}, "num_examples must be >= 1, got 0"),
        ({"power_a": 0.0}, "power_a must be finite and > 0, got 0.0"),
        ({"seed": -1}, "seed must be in \\[0, 2\\*\\*32\\), got -1"),
        ({"seq_len": 64.0}, "seq_len must be an int, got 64.0"),
    ],
)
def test_bad_config_names_the_field_and_value(fields, message):
    with pytest.raises(ValueError, match=message):
        MQARConfig(**fields)


def test_bad_segments_are_refused():
    with pytest.raises(ValueError, match="train_segments must list at least one"):
        make_mqar_splits([], [(64, 4, 10)])
    with pytest.raises(ValueError, match=r"test_segments\[0\] must be \(seq_len, num_kv_pairs, num_examples\)"):
        make_mqar_splits([(64, 4, 10)], [(64, 4)])
    with pytest.raises(ValueError, match=r"train_segments lists \['L=64,N=4'\] more than once"):
        make_mqar_splits([(64, 4, 10), (64, 4, 5)], [(64, 4, 10)])
    with pytest.raises(ValueError, match="seq_len must be even.*63"):
        make_mqar_splits([(63, 4, 10)], [(64, 4, 10)])
    with pytest.raises(ValueError, match="seed must be an int >= 0, got -3"):
        make_mqar_splits([(64, 4, 10)], [(64, 4, 10)], seed=-3)
