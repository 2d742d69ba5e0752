"""Markup -> plain text for `rebased data corpus`: HTML, roff (man pages), POD (Perl), Vim help, the tagged Brown
corpus; and the cleaning every document gets. Standard library only (html.parser, re).

What each step removes:
  * html_to_text: the <head>; script, style, noscript, template, svg, button, form, nav, header, footer and aside
    elements; elements marked as navigation or page furniture by role="navigation" or by a class in
    FURNITURE_CLASSES or FURNITURE_IDS (Sphinx sidebars, "related" bars and page tables of contents, mdBook menus,
    DocBook navheader / navfooter, SQLite's, Django's and Haddock's page headers, previous / next links, headerlink
    pilcrows, copy buttons); every tag. Entities are decoded. Block elements end lines;
    <pre> keeps its whitespace, elsewhere runs of spaces collapse to one.
  * roff_to_text: comments, requests and macros that only lay out (.TH, .PP, .RS, .nf, .sp, .in, ...), .so
    links, tbl format lines, font and size escapes; .SH / .SS / .B / .I / .IP / .TP keep their words; the
    character escapes (\\-, \\(em, \\(aq, \\[lq], \\e, ...) become their characters.
  * pod_to_text: POD commands (=over, =back, =cut, =begin/=end blocks of other formats, =for, =encoding) and
    formatting codes (B<> C<> I<> F<> S<> L<> E<> X<> Z<>), keeping their text (X<> index entries are dropped).
  * vim_help_to_text: *tag* anchors, the |bars| around links, and the modeline (`vim:tw=78:...`).
  * brown_to_text: the part-of-speech tags (word/tag), with `` and '' turned into quotes and the space before
    punctuation removed.
  * clean_text (every document, last): carriage returns, control characters other than newline and tab,
    trailing spaces, and blank lines beyond one in a row; leading and trailing blank lines.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

SKIPPED_TAGS = frozenset(
    {"head", "script", "style", "noscript", "template", "svg", "button", "form", "nav", "header", "footer", "aside"}
)
FURNITURE_CLASSES = frozenset({
    "sphinxsidebar", "related", "navigation", "navheader", "navfooter", "breadcrumbs", "headerlink", "copybutton",
    "sidebar", "sidebar-elems", "nav-chapters", "nav-wrapper", "menu-bar", "toctree-wrapper", "footer", "skip-link",
    "nav", "nosearch", "tocsection", "toc-item", "prev-next-area", "prev-next-info", "topbar-expand",
})  # fmt: skip
FURNITURE_IDS = frozenset({
    "hd", "ft", "global-nav", "searchbox", "leftnav", "sidebar", "prev-link", "next-link", "package-header",
    "page-menu", "footer",
})  # fmt: skip
BLOCK_TAGS = frozenset({
    "p", "div", "section", "article", "main", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol", "dl", "dt",
    "dd", "tr", "table", "blockquote", "pre", "hr", "br", "figure", "figcaption", "caption", "body", "title",
})  # fmt: skip
CELL_TAGS = frozenset({"td", "th"})


class _TextExtractor(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping: str | None = None  # the tag whose element is being skipped
        self.skip_depth = 0
        self.pre_depth = 0

    def handle_starttag(self, tag, attrs):
        if self.skipping:
            self.skip_depth += tag == self.skipping
            return
        attributes = dict(attrs)
        classes = set((attributes.get("class") or "").split())
        furniture = classes & FURNITURE_CLASSES or attributes.get("id") in FURNITURE_IDS
        if tag in SKIPPED_TAGS or furniture or attributes.get("role") == "navigation":
            if tag not in ("br", "hr", "img", "input", "meta", "link"):  # void elements have no content to skip
                self.skipping, self.skip_depth = tag, 1
            return
        self.pre_depth += tag == "pre"
        if tag in BLOCK_TAGS:
            self.parts.append("\n")
        elif tag in CELL_TAGS:
            self.parts.append(" ")

    def handle_endtag(self, tag):
        if self.skipping:
            self.skip_depth -= tag == self.skipping
            if self.skip_depth == 0:
                self.skipping = None
            return
        if tag == "pre" and self.pre_depth:
            self.pre_depth -= 1
        if tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.skipping:
            return
        self.parts.append(data if self.pre_depth else re.sub(r"[ \t\r\n\f\v]+", " ", data))


def html_to_text(html: str) -> str:
    """The readable text of an HTML page, without its navigation (see the module docstring)."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    lines = (
        line.strip(" ") if not line.startswith("    ") else line.rstrip() for line in "".join(parser.parts).split("\n")
    )
    return clean_text("\n".join(lines))


ROFF_CHARACTERS = {
    "em": "\u2014", "en": "\u2013", "hy": "-", "aq": "'", "dq": '"', "lq": "\u201c", "rq": "\u201d", "oq": "\u2018",
    "cq": "\u2019", "bu": "\u2022", "co": "\u00a9", "rg": "\u00ae", "tm": "\u2122", "de": "\u00b0", "mu": "\u00d7",
    "+-": "\u00b1", "<=": "\u2264", ">=": "\u2265", "!=": "\u2260", "->": "\u2192", "<-": "\u2190", "ti": "~",
    "ha": "^", "rs": "\\", "ga": "`", "sl": "/", "ba": "|", "lB": "[", "rB": "]", "lC": "{", "rC": "}", "Fo": "\u00ab",
    "Fc": "\u00bb", "at": "@", "sh": "#", "Do": "$", "ss": "\u00df", "'e": "\u00e9", ":u": "\u00fc", ":o": "\u00f6",
    ":a": "\u00e4",
}  # fmt: skip
ROFF_HEADINGS = ("SH", "SS", "SY")
ROFF_FONT_MACROS = ("B", "I", "BR", "RB", "IR", "RI", "BI", "IB", "SM", "SB")
ROFF_ESCAPE = re.compile(
    r"\\(?:f(?:\[[^\]]*\]|\(..|.)|s[+-]?(?:\d|\(\d\d|\[\d+\])|\((..)|\[([^\]]*)\]|\*(?:\((..)|\[([^\]]*)\]|(.))|(.))"
)
ROFF_STRINGS = {"R": "\u00ae", "lq": "\u201c", "rq": "\u201d", "Tm": "\u2122"}


def _roff_escape(match: re.Match) -> str:
    two, named, string2, string_named, string1, single = match.groups()
    if two or named:
        return ROFF_CHARACTERS.get(two or named, "")
    if string2 or string_named or string1:
        return ROFF_STRINGS.get(string2 or string_named or string1, "")
    if single is None:  # a font or size change
        return ""
    return {"-": "-", "e": "\\", "\\": "\\", "~": " ", " ": " ", "0": " ", "'": "\u00b4", "`": "`", ".": "."}.get(
        single, ""
    )  # \& \| \^ \c \% \: and unknown escapes print nothing


def _roff_inline(text: str) -> str:
    return ROFF_ESCAPE.sub(_roff_escape, text)


def _macro_words(arguments: str) -> list[str]:
    """A macro line's arguments: words, or "quoted phrases" as one."""
    return [quoted if quoted else word for quoted, word in re.findall(r'"([^"]*)"|(\S+)', arguments)]


ROFF_BREAKS = ("PP", "P", "LP", "sp", "br", "TP", "IP", "TQ", "HP", "RS", "RE", "EX", "EE", "nf", "fi", "TS", "TE")


class _RoffText:
    """Filled paragraphs, as roff sets them: text lines join into one line until a break; .nf / .EX keep lines."""

    def __init__(self):
        self.lines: list[str] = []
        self.paragraph: list[str] = []
        self.filling = True
        self.tag_next = False  # after .TP the next line is a tag, set on a line of its own

    def text(self, words: str) -> None:
        if not self.filling:
            self.lines.append(words)
        elif self.tag_next:
            self.tag_next = False
            self.lines.append(words)
        elif words.strip():
            self.paragraph.append(words.strip())
        else:  # a blank line is a paragraph break
            self.brk(blank=True)

    def brk(self, blank: bool = False) -> None:
        if self.paragraph:
            self.lines.append(" ".join(self.paragraph))
            self.paragraph = []
        if blank and self.lines and self.lines[-1]:
            self.lines.append("")


def roff_to_text(source: str) -> str:
    """A man page's text, without its roff markup (see the module docstring)."""
    out, in_table_format, cell_separator = _RoffText(), False, "\t"
    source = re.sub(r"(?<!\\)\\\n", "", source)  # a backslash at the end of a line continues it
    for line in source.split("\n"):
        line = re.sub(r'\\".*', "", line)  # comments, whole-line or trailing
        if in_table_format:  # tbl: options (tab(X) names the cell separator) and format lines, up to a "."
            if separator := re.search(r"tab\s*\((.)\)", line):
                cell_separator = separator.group(1)
            in_table_format = not line.rstrip().endswith(".")
            continue
        if not line.startswith((".", "'")):
            line = line.replace(cell_separator, " ") if not out.filling else line
            out.text(_roff_inline(line.replace("\t", " ").replace("T{", "").replace("T}", "")))
            continue
        name, _, arguments = line[1:].strip().partition(" ")
        if name in ROFF_BREAKS or name in ROFF_HEADINGS:
            out.brk(blank=name not in ("br", "RS", "RE", "nf", "fi", "EX", "EE"))
            out.filling = {"nf": False, "EX": False, "TS": False, "fi": True, "EE": True, "TE": True}.get(
                name, out.filling
            )
            out.tag_next = name in ("TP", "TQ")
        if name == "TS":
            in_table_format, cell_separator = True, "\t"
        if name in ROFF_HEADINGS:
            out.lines.append(_roff_inline(" ".join(_macro_words(arguments))))
            out.lines.append("")
        elif name in ROFF_FONT_MACROS:
            joiner = " " if name in ("B", "I", "SM", "SB") else ""  # alternating fonts join their words
            out.text(_roff_inline(joiner.join(_macro_words(arguments))))
        elif name == "IP" and arguments:
            out.lines.append(_roff_inline(_macro_words(arguments)[0]))
        elif name in ("UR", "MT") and arguments:
            out.text(_roff_inline(arguments.strip()))
    out.brk()
    return clean_text("\n".join(out.lines))


POD_CODE = re.compile(r"([BCEFILSXZ])<([^<>]*)>")
POD_MULTI_CODE = re.compile(r"([BCEFILSXZ])<{2,}\s+(.*?)\s+>{2,}", re.DOTALL)
POD_ENTITIES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&", "apos": "'"}


def _pod_code(match: re.Match) -> str:
    code, text = match.groups()
    if code in "XZ":
        return ""
    if code == "E":
        if text.isdigit() or text.lower().startswith("0x"):
            return chr(int(text, 0))
        return POD_ENTITIES.get(text, "")
    if code == "L":  # L<text|target>, L<target>, L<name/"section">
        text = text.split("|", 1)[0]
        return text.replace('/"', " ").replace('"', "")
    return text


def _pod_inline(text: str) -> str:
    # E<lt> and E<gt> become stand-ins first, so the brackets they make do not end the codes around them
    text = text.replace("E<lt>", "\ue000").replace("E<gt>", "\ue001")
    text = POD_MULTI_CODE.sub(_pod_code, text)
    while True:  # innermost codes first, until none is left
        replaced = POD_CODE.sub(_pod_code, text)
        if replaced == text:
            return replaced.replace("\ue000", "<").replace("\ue001", ">")
        text = replaced


def pod_to_text(source: str) -> str:
    """A POD document's text, without its commands and formatting codes (see the module docstring)."""
    out, foreign_block, in_pod = [], False, False
    for paragraph in re.split(r"\n[ \t]*\n", source):
        if paragraph.startswith("="):
            command, _, text = paragraph[1:].partition(" ")
            command = command.split("\n", 1)[0]
            in_pod = command != "cut"
            if command == "begin":
                foreign_block = text.split()[:1] not in (["text"], ["pod"])
            elif command == "end":
                foreign_block = False
            elif command.startswith("head") or command == "item":
                out.append(_pod_inline(text.strip()))
            continue
        if in_pod and not foreign_block:
            out.append(paragraph if paragraph[:1] in (" ", "\t") else _pod_inline(paragraph))
    return clean_text("\n\n".join(out))


VIM_TAG = re.compile(r"(?<![^\s(])\*([^\s*|]+)\*(?=\s|$)")
VIM_LINK = re.compile(r"\|([^\s|]+)\|")
VIM_MODELINE = re.compile(r"^\s*vim?:.*:\s*$", re.MULTILINE)


def vim_help_to_text(source: str) -> str:
    """A Vim help file's text without *tag* anchors, link bars and modeline (see the module docstring)."""
    text = VIM_MODELINE.sub("", source)
    text = VIM_TAG.sub("", text)
    return clean_text(VIM_LINK.sub(r"\1", text))


BROWN_QUOTES = {"``": '"', "''": '"'}
NO_SPACE_BEFORE = frozenset({".", ",", ";", ":", "?", "!", ")", "]", "''", "'s", "n't"})


def _brown_sentence(line: str) -> str:
    words = [word.rsplit("/", 1)[0] for word in line.split()]
    out, previous = [], None
    for word in words:
        glue = previous is None or word in NO_SPACE_BEFORE or previous in ("``", "(", "[")
        out.append(("" if glue else " ") + BROWN_QUOTES.get(word, word))
        previous = word
    return "".join(out)


def brown_to_text(source: str) -> str:
    """Brown corpus text (`The/at jury/nn said/vbd ./.`; a blank line between paragraphs, one sentence a line)
    without its tags: each paragraph one line of sentences, a blank line between paragraphs."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", source):
        sentences = [_brown_sentence(line) for line in block.split("\n") if line.strip()]
        if sentences:
            paragraphs.append(" ".join(sentences))
    return clean_text("\n\n".join(paragraphs))


CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_text(text: str) -> str:
    """Normalise a document's whitespace (see the module docstring); the last step for every document."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = CONTROL_CHARACTERS.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def decode(data: bytes) -> str:
    """UTF-8, or Latin-1 for the few old files that are not UTF-8 (every byte is a Latin-1 character)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")
