"""Corpus -> token shards -> windows: round trips for every source format, the document-level split, resume
after a kill, atomic files, dtype choice, each bad input's message, and the reader."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rebased.cli import main
from rebased.tasks.lm import SAMPLE_DIR, DataError
from rebased.tasks.lm import data as data_module
from rebased.tasks.lm import shards as shards_module
from rebased.tasks.lm.data import PrepareConfig, is_validation, prepare
from rebased.tasks.lm.shards import ShardWriter, TokenShards, token_dtype, verify_shards
from rebased.tasks.lm.tokenizers import BytesTokenizer, train_bpe

VAL = 0.3
SHARD = 30_000  # bytes tokens: DOCS make four checkpoints
EXTRA = ["Grüße aus Köln ✓", "   \n ", "naïve café — 日本語", "short", "<|endoftext|> is text here", "x" * 5000, "end"]
DOCS = [p.read_text() for p in sorted(SAMPLE_DIR.glob("*.txt"))] + EXTRA  # one is blank: skipped, counted
TEXT_DOCS = [d for d in DOCS if d.strip()]


def config(**changes) -> PrepareConfig:
    return PrepareConfig(**{"val_fraction": VAL, "shard_tokens": SHARD, "progress": False, **changes})


def write_txt(folder: Path, docs=DOCS) -> Path:
    folder.mkdir(parents=True)
    for i, doc in enumerate(docs):
        (folder / f"doc_{i:03d}.txt").write_text(doc, encoding="utf-8")
    return folder


def jsonl_bytes(docs=DOCS) -> bytes:
    return "".join(json.dumps({"text": d, "meta": {"n": i}}) + "\n" for i, d in enumerate(docs)).encode()


def write_source(tmp_path: Path, kind: str) -> Path:
    """DOCS in one of the supported layouts."""
    if kind == "txt":
        return write_txt(tmp_path / "txt")
    path = tmp_path / f"corpus.{kind}"
    if kind == "jsonl":
        path.write_bytes(jsonl_bytes())
    elif kind == "jsonl.gz":
        path.write_bytes(gzip.compress(jsonl_bytes()))
    elif kind == "jsonl.zst":
        zstd = pytest.importorskip("zstandard", reason="zstandard is not installed (pip install zstandard)")
        data = jsonl_bytes()
        frames = [zstd.ZstdCompressor().compress(part) for part in (data[:5000], data[5000:])]
        path.write_bytes(b"".join(frames))  # two frames, as some writers of the Pile's files make
    elif kind == "parquet":
        pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install pyarrow)")
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": list(range(len(DOCS))), "text": DOCS}), path, row_group_size=4)
    return path


def stream(out: Path, split: str) -> np.ndarray:
    shards = TokenShards(out, split)
    return shards.tokens(0, len(shards))


def expected(docs, split: str, tok=None) -> np.ndarray:
    tok = tok or BytesTokenizer()
    chosen = [d for d in docs if d.strip() and is_validation(d, VAL) == (split == "val")]
    ids = [t for d in chosen for t in tok.encode(d) + [tok.eos_id]]
    return np.array(ids)


def shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".bin", ".npy")}


def documents(out: Path, split: str) -> list[str]:
    """The split's documents read back from the shards, cut at the document offsets."""
    shards, texts = TokenShards(out, split), []
    for index in range(len(shards.files)):
        shard = shards.shard(index)
        ends = [*shards.document_starts(index)[1:], len(shard)]
        texts += [BytesTokenizer().decode(list(shard[a : b - 1])) for a, b in zip(shards.document_starts(index), ends)]
    return texts


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """DOCS prepared from a .txt folder without interruption: what every other way must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    prepare(write_txt(tmp / "txt"), tmp / "out", "bytes", config())
    return tmp / "out"


def test_round_trip_equals_direct_encoding_with_eos_after_each_document(reference):
    manifest = json.loads((reference / "manifest.json").read_text())
    for split in ("train", "val"):
        assert np.array_equal(stream(reference, split), expected(DOCS, split))
        assert manifest["splits"][split]["tokens"] == len(expected(DOCS, split))
    assert len(manifest["checkpoints"]) >= 4 and manifest["splits"]["val"]["documents"] >= 3
    source = manifest["sources"][0]
    assert (source["kind"], source["files"], source["empty_documents"]) == ("txt", len(DOCS), 1)
    assert source["documents"]["train"] + source["documents"]["val"] == len(TEXT_DOCS)
    assert manifest["tokenizer"]["sha256"] == BytesTokenizer().sha256 and manifest["dtype"] == "uint16"
    assert not list(reference.glob("*.tmp")) and not (reference / "progress.json").exists()


def test_split_is_by_document_deterministic_and_disjoint(reference, tmp_path):
    train, val = documents(reference, "train"), documents(reference, "val")
    assert not set(train) & set(val) and sorted(train + val) == sorted(TEXT_DOCS)
    shuffled = TEXT_DOCS[::-1]  # the split follows each document's text, not its place in the corpus
    prepare(write_txt(tmp_path / "txt", shuffled), tmp_path / "out", "bytes", config())
    assert set(documents(tmp_path / "out", "val")) == set(val)


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet"])
def test_every_format_gives_the_same_shards(reference, tmp_path, kind):
    prepare(write_source(tmp_path, kind), tmp_path / "out", "bytes", config())
    assert shard_files(tmp_path / "out") == shard_files(reference)


def test_a_pool_of_workers_writes_the_same_shards(reference, tmp_path):
    prepare(write_txt(tmp_path / "txt"), tmp_path / "out", "bytes", config(workers=2, batch_bytes=20_000))
    assert shard_files(tmp_path / "out") == shard_files(reference)


def test_a_saved_hugging_face_dataset(reference, tmp_path, monkeypatch):
    folder = tmp_path / "saved"
    datasets = _import_or_none("datasets")
    if datasets is None:  # the message, then; the reading itself needs the package
        folder.mkdir()
        (folder / "state.json").write_text("{}")
        (folder / "dataset_info.json").write_text("{}")
        monkeypatch.setitem(sys.modules, "datasets", None)
        with pytest.raises(DataError, match="saved with save_to_disk; reading it needs the `datasets` package"):
            prepare(folder, tmp_path / "out", "bytes", config())
        return
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(folder))
    prepare(folder, tmp_path / "out", "bytes", config())
    assert shard_files(tmp_path / "out") == shard_files(reference)


def _import_or_none(name: str):
    try:
        return __import__(name)
    except ImportError:
        return None


def simulate_kill(monkeypatch, where: str) -> None:
    """Raise KeyboardInterrupt as a kill would stop prepare: in the middle of a shard after the first checkpoint
    (its .tmp stays behind, as after kill -9), or after a shard is renamed into place but before it is recorded."""
    if where == "mid_shard":
        real_add, adds = ShardWriter.add, []

        def add(self, tokens):
            adds.append(1)
            if len(adds) == 9:  # the first checkpoint came at the fifth document
                raise KeyboardInterrupt("killed")
            real_add(self, tokens)

        monkeypatch.setattr(ShardWriter, "add", add)
        monkeypatch.setattr(ShardWriter, "abort", lambda self: None)
    else:
        real_checkpoint, calls = data_module._OpenShards.checkpoint, []

        def checkpoint(self, end):
            calls.append(real_checkpoint(self, end))
            if len(calls) == 2:
                raise KeyboardInterrupt("killed")
            return calls[-1]

        monkeypatch.setattr(data_module._OpenShards, "checkpoint", checkpoint)


@pytest.mark.parametrize("kind", ["txt", "jsonl.zst", "parquet"])
@pytest.mark.parametrize("where", ["mid_shard", "before_record"])
def test_resume_after_a_kill_gives_byte_identical_shards(reference, tmp_path, monkeypatch, kind, where):
    source, out = write_source(tmp_path, kind), tmp_path / "out"
    simulate_kill(monkeypatch, where)
    with pytest.raises(KeyboardInterrupt):
        prepare(source, out, "bytes", config(batch_bytes=1000))
    assert (out / "progress.json").exists() and not (out / "manifest.json").exists()
    assert len(json.loads((out / "progress.json").read_text())["checkpoints"]) == 1
    assert bool(list(out.glob("*.tmp"))) == (where == "mid_shard")
    with pytest.raises(DataError, match="prepare has not finished there"):
        TokenShards(out)
    monkeypatch.undo()
    (out / "val_00042.bin.tmp").write_bytes(b"left by some other kill")
    (out / "notes.md").write_text("not prepare's")

    encoded = []
    real_encode = BytesTokenizer.encode_batch
    monkeypatch.setattr(
        BytesTokenizer, "encode_batch", lambda self, texts: encoded.extend(texts) or real_encode(self, texts)
    )
    prepare(source, out, "bytes", config())
    assert shard_files(out) == shard_files(reference) and not list(out.glob("*.tmp"))
    assert (out / "notes.md").exists()  # only prepare's own files are cleared away
    assert len(encoded) < len(TEXT_DOCS)  # the first checkpoint's documents were not tokenized again
    recorded = json.loads((out / "manifest.json").read_text())["splits"]
    assert recorded == json.loads((reference / "manifest.json").read_text())["splits"]


def test_a_finished_folder_is_left_as_it_is(reference, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in reference.iterdir()}
    prepare(write_txt(tmp_path / "txt"), reference, "bytes", config())  # the same corpus, elsewhere: same bytes
    assert {p.name: p.stat().st_mtime_ns for p in reference.iterdir()} == before


def test_dtype_is_uint16_up_to_65536_tokens_else_uint32(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    pytest.importorskip("tokenizers")
    spec = json.loads(BytesTokenizer().to_json())  # the bytes tokenizer with its EOS moved to id 70000
    spec["added_tokens"][0]["id"] = spec["model"]["vocab"]["<|endoftext|>"] = 70000
    (tmp_path / "big.json").write_text(json.dumps(spec))
    manifest = prepare(write_txt(tmp_path / "txt", DOCS[-3:]), tmp_path / "out", str(tmp_path / "big.json"), config())
    assert manifest["dtype"] == "uint32" and manifest["tokenizer"]["vocab_size"] == 70001
    shard = tmp_path / "out" / manifest["splits"]["train"]["shards"][0]["file"]
    assert shard.stat().st_size == 4 * manifest["splits"]["train"]["shards"][0]["tokens"]
    tokens = stream(tmp_path / "out", "train")
    assert tokens.dtype == np.uint32 and (tokens == 70000).sum() == manifest["splits"]["train"]["documents"]


def test_bpe_trained_on_the_corpus_is_saved_and_reused(tmp_path):
    pytest.importorskip("tokenizers")
    source, out = write_txt(tmp_path / "txt"), tmp_path / "out"
    manifest = prepare(source, out, "bpe:300", config())
    tok = train_bpe([d for d in DOCS if d.strip() and not is_validation(d, VAL)], 300)
    assert manifest["tokenizer"]["sha256"] == tok.sha256  # trained on train documents only
    assert np.array_equal(stream(out, "val"), expected(DOCS, "val", tok))
    assert manifest["tokenizer"]["vocab_size"] == 300 and (out / "tokenizer.json").read_text() == tok.to_json()


# --- bad input: each message names the file and the fix; nothing prepared is lost ---


def test_empty_and_unreadable_files(tmp_path):
    write_txt(tmp_path / "a", ["one", ""])
    with pytest.raises(DataError, match=r"doc_001.txt is empty: remove it from .* or put text in it, then rerun"):
        prepare(tmp_path / "a", tmp_path / "out", "bytes", config())
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "gone.jsonl").symlink_to(tmp_path / "nowhere.jsonl")
    with pytest.raises(DataError, match=r"gone.jsonl: cannot read it \(No such file or directory\): fix or remove it"):
        prepare(tmp_path / "b", tmp_path / "out", "bytes", config())


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            [b'{"text": "a"}', b'{"text": "b"}', b'{"body": "c"}'],
            r'bad.jsonl, line 3: no "text" field \(it has \'body\'\)',
        ),
        ([b'{"text": "a"}', b'{"text": "caf\xe9"}'], r"bad.jsonl, line 2: not UTF-8 text \(byte 13 of the line is"),
        ([b'{"text": "a"}', b'{"text": '], r"bad.jsonl, line 2: not JSON \(Expecting value, column 10\)"),
        ([b'{"text": 5}'], r'bad.jsonl, line 1: "text" is a int, not a string'),
    ],
)
def test_bad_jsonl_lines_are_named(tmp_path, lines, message):
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=message):
        prepare(tmp_path / "bad.jsonl", tmp_path / "out", "bytes", config())


def test_non_utf8_text_file(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "latin1.txt").write_bytes("naïve".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not UTF-8 text \(byte 2 is b'\\xefve'\): convert it.*iconv"):
        prepare(tmp_path / "c", tmp_path / "out", "bytes", config())


def test_damaged_zst_file(tmp_path):
    zstd = pytest.importorskip("zstandard", reason="zstandard is not installed")
    (tmp_path / "cut.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress(jsonl_bytes())[:-200])
    with pytest.raises(
        DataError, match=r"cut.jsonl.zst: the file is damaged after line \d+ .*download or copy it again"
    ):
        prepare(tmp_path / "cut.jsonl.zst", tmp_path / "out", "bytes", config())


def test_a_bad_file_keeps_what_is_prepared_and_the_fixed_rerun_finishes_it(reference, tmp_path):
    source, out = write_txt(tmp_path / "txt"), tmp_path / "out"
    (source / "zz_late.jsonl").write_bytes(b'{"text": "fine"}\n{"no_text": 1}\n')
    with pytest.raises(DataError, match=r"zz_late.jsonl, line 2"):
        prepare(source, out, "bytes", config(batch_bytes=1000))  # small batches: reading runs little ahead
    kept = shard_files(out)
    assert len(kept) >= 10 and all(shard_files(reference)[name] == data for name, data in kept.items())
    (source / "zz_late.jsonl").unlink()  # the fix the message suggests (removing it)
    prepare(source, out, "bytes", config())
    assert shard_files(out) == shard_files(reference)


def test_resume_refuses_another_tokenizer_naming_both_hashes(tmp_path):
    pytest.importorskip("tokenizers")
    source, out, path = write_txt(tmp_path / "txt", DOCS[-4:]), tmp_path / "out", tmp_path / "tok.json"
    spec = json.loads(BytesTokenizer().to_json())
    path.write_text(json.dumps(spec))
    first = prepare(source, out, str(path), config(shard_tokens=100))["tokenizer"]["sha256"]
    victim = sorted(out.glob("*.bin"))[-1]
    victim.unlink()  # something to resume
    path.write_text(json.dumps(spec, indent=2))  # the same name, another file
    mismatch = f"made with tokenizer {path} of sha256 {first}; --tokenizer {{}} is {{}}: resume with the same"
    with pytest.raises(DataError, match=mismatch.format(path, "sha256 [0-9a-f]{64}")):
        prepare(source, out, str(path), config(shard_tokens=100))
    with pytest.raises(DataError, match=mismatch.format("bytes", f"sha256 {BytesTokenizer().sha256}")):
        prepare(source, out, "bytes", config(shard_tokens=100))
    with pytest.raises(DataError, match=mismatch.format("bpe:300", "a BPE trained anew")):
        prepare(source, out, "bpe:300", config(shard_tokens=100))
    prepare(source, out, str(out / "tokenizer.json"), config(shard_tokens=100))  # the fix the message names
    assert victim.exists()
    assert json.loads((out / "manifest.json").read_text())["tokenizer"]["name"] == str(path)


def test_an_output_folder_of_another_corpus_or_of_other_files_is_refused(reference, tmp_path):
    other = write_txt(tmp_path / "other", ["another corpus"])
    with pytest.raises(
        DataError, match=r"holds shards of another corpus: its source #0 \. \(\d[\d,]* bytes, sha256 [0-9a-f]{64}\)"
    ):
        prepare(other, reference, "bytes", config())
    with pytest.raises(DataError, match="was prepared with --val-fraction 0.3 --shard-tokens 30000"):
        prepare(other, reference, "bytes", config(val_fraction=0.1))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.md").write_text("mine")
    with pytest.raises(DataError, match="home is not empty and has no manifest.json or progress.json"):
        prepare(other, tmp_path / "home", "bytes", config())
    assert (tmp_path / "home" / "notes.md").read_text() == "mine"


# --- the reader ---


def test_windows_shape_dtype_and_determinism(reference):
    shards = TokenShards(reference, "train")
    whole = stream(reference, "train")
    batch = shards.sample(8, 100, torch.Generator().manual_seed(0))
    assert batch.shape == (8, 101) and batch.dtype == torch.int64
    assert torch.equal(batch, shards.sample(8, 100, torch.Generator().manual_seed(0)))
    assert not torch.equal(batch, shards.sample(8, 100, torch.Generator().manual_seed(1)))
    text = whole.tobytes()
    assert all(row.numpy().astype(np.uint16).tobytes() in text for row in batch)  # each row is a slice of the stream
    windows = torch.cat(list(shards.sequential(1000, batch_size=3)))
    assert windows.shape == ((len(whole) - 1) // 1000, 1001)
    assert torch.equal(windows[:, :-1].flatten(), torch.from_numpy(whole[: len(windows) * 1000].astype(np.int64)))
    assert torch.equal(windows[:-1, -1], windows[1:, 0])  # consecutive windows share one token


def test_a_window_across_shard_ends_and_few_mapped_shards(reference, monkeypatch):
    shards = TokenShards(reference, "train")
    end = int(shards.ends[0])
    assert np.array_equal(shards.tokens(end - 5, 10), stream(reference, "train")[end - 5 : end + 5])
    batch = shards.sample(64, 50, torch.Generator().manual_seed(3))
    monkeypatch.setattr(shards_module, "MAPPED_SHARDS", 1)  # every other read maps its shard anew
    few = TokenShards(reference, "train")
    assert torch.equal(few.sample(64, 50, torch.Generator().manual_seed(3)), batch) and len(few._maps) == 1


def test_truncated_shard_is_named_and_rebuilt_by_a_rerun(reference, tmp_path):
    source, out = write_txt(tmp_path / "txt"), tmp_path / "out"
    prepare(source, out, "bytes", config())
    shard = out / "train_00002.bin"
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(
        DataError, match=r"train_00002.bin has [\d,]+ bytes where the manifest says .* rerun `rebased data prepare`"
    ):
        TokenShards(out, "train")
    prepare(source, out, "bytes", config())
    assert shard_files(out) == shard_files(reference)


def test_cli(tmp_path, capsys):
    out = tmp_path / "sample"
    assert main(["data", "prepare", ":sample", str(out), "--tokenizer", "bytes", "--val-fraction", "0.2"]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["data", "verify", str(out)]) == 0 and main(["data", "info", str(out)]) == 0
    assert "tokenizer bytes (vocab 257, eos 256, uint16)" in capsys.readouterr().out
    shard = out / "train_00000.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 1  # same size, another byte: only the hash check sees it
    shard.write_bytes(bytes(data))
    assert main(["data", "verify", str(out)]) == 1 and len(verify_shards(out)) == 1
    assert "train_00000.bin has another sha256" in capsys.readouterr().err
    assert main(["data", "prepare", str(tmp_path / "missing"), str(out), "--tokenizer", "bytes"]) == 2
    assert "missing: no such file or folder" in capsys.readouterr().err
