"""Plain prose from a MediaWiki XML dump (regular expressions only, no wiki parser).

Markup is nested (links inside templates inside tables), so templates, tables and
links are removed innermost first, in a loop, until nothing changes. What is kept:
the prose paragraphs of each article, before its reference-type sections
("See also", "References", ...). Lists, headings, tables, infoboxes, references,
images and categories are dropped; links keep their visible text.
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from pathlib import Path

# Sections from which on an article is references, links and lists, not prose.
_TAIL_SECTIONS = {
    "see also", "references", "notes", "external links", "further reading", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "references and notes",
    "works cited", "primary sources", "secondary sources", "selected works", "works",
    "publications", "discography", "filmography", "gallery",
}
# Link namespaces whose links are not text: files, categories, interlanguage/interwiki.
_DROP_LINK = re.compile(
    r"^\s*:?\s*((?i:file|image|media|category|wikt|wiktionary|commons|wikipedia|portal|template|help)"
    r"|[a-z]{2,3}(-[a-z]+)?)\s*:")

_COMMENT = re.compile(r"<!--.*?(-->|$)", re.S)
_DROP_ELEMENTS = re.compile(
    r"<(ref|math|gallery|timeline|score|syntaxhighlight|source|imagemap|chem|ce|graph|hiero|templatedata)"
    r"\b[^>]*?(/>|>.*?</\1\s*>)", re.S | re.I)
_SELF_CLOSING_REF = re.compile(r"<ref\b[^>]*/>", re.I)
_TAG = re.compile(r"</?[a-zA-Z][^<>]*?/?>")
_TEMPLATE = re.compile(r"\{\{(?:(?!\{\{|\}\}).)*\}\}", re.S)
_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.S)
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_HEADING = re.compile(r"^(={2,6})\s*(.*?)\s*\1\s*$")
_QUOTES = re.compile(r"'{2,}")
_MAGIC = re.compile(r"__[A-Z]+__")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?)])")
_SPACES = re.compile(r"[ \t\u00a0]+")
_MIN_WORDS = 8


def _keep_template(match: re.Match) -> str:
    """Replace a template by its visible text where it carries prose, else remove it."""
    body = match.group(0)[2:-2]
    parts = [p.strip() for p in body.split("|")]
    name = parts[0].lower().replace("_", " ")
    args = [p for p in parts[1:] if "=" not in p]
    if name in ("convert", "cvt") and len(args) >= 2:
        return f"{args[0]} {args[1]}"
    if name.startswith("lang") and args:
        return args[-1]
    if name in ("nowrap", "nobr", "small", "smaller", "big", "em", "sic", "not a typo", "w", "transl") and args:
        return args[-1]
    return ""


def _link_text(match: re.Match) -> str:
    """`[[target|text]]` -> text; `[[target]]` -> target; files, categories, interwiki -> ''."""
    inner = match.group(1)
    if _DROP_LINK.match(inner):
        return ""
    target, pipe, text = inner.partition("|")
    if not pipe:
        return target.lstrip(":").strip()
    text = text.split("|")[-1].strip()
    return text or re.sub(r"\s*\(.*\)$", "", target).strip()  # pipe trick: [[Foo (bar)|]] -> Foo


def _repeat(pattern: re.Pattern, repl, text: str) -> str:
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def clean_markup(raw: str) -> list[str]:
    """Wiki markup of one article -> its plain-prose paragraphs."""
    text = _COMMENT.sub("", raw)
    text = _SELF_CLOSING_REF.sub("", text)
    text = _DROP_ELEMENTS.sub("", text)
    text = _repeat(_TEMPLATE, _keep_template, text)
    text = _repeat(_TABLE, "", text)
    text = _repeat(_INNER_LINK, _link_text, text)
    text = _EXTERNAL_LINK.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = _QUOTES.sub("", text)
    text = _MAGIC.sub("", text)
    text = html.unescape(text)

    paragraphs: list[str] = []
    current: list[str] = []

    def flush() -> None:
        if current:
            paragraph = _tidy(" ".join(current))
            if len(paragraph.split()) >= _MIN_WORDS and _looks_like_prose(paragraph):
                paragraphs.append(paragraph)
            current.clear()

    for line in text.split("\n"):
        stripped = line.strip()
        heading = _HEADING.match(stripped)
        if heading:
            flush()
            if heading.group(2).strip().lower() in _TAIL_SECTIONS:
                break
            continue
        if not stripped or stripped[0] in "*#:;|!{}" or stripped.startswith("----"):
            flush()
            continue
        current.append(stripped)
    flush()
    return paragraphs


def _tidy(paragraph: str) -> str:
    paragraph = _SPACES.sub(" ", paragraph)
    paragraph = _EMPTY_PARENS.sub("", paragraph)
    paragraph = _SPACES.sub(" ", paragraph)
    return _SPACE_BEFORE_PUNCT.sub(r"\1", paragraph).strip()


def _looks_like_prose(paragraph: str) -> bool:
    """Leftover markup fragments (unbalanced braces, table cells) are not prose."""
    return not any(s in paragraph for s in ("{{", "}}", "[[", "]]", "{|", "|}", "<ref", "</"))


def read_dump(path: Path) -> list[str]:
    """Articles (redirects and non-article namespaces skipped) of a .xml or .xml.bz2 dump,
    each as its prose paragraphs joined by blank lines; articles with no prose are left out."""
    opener = bz2.open if path.suffix == ".bz2" else open
    documents = []
    with opener(path, "rb") as stream:
        for _, element in ET.iterparse(stream):
            if not element.tag.endswith("}page"):
                continue
            ns = element.find("{*}ns")
            text = element.find("{*}revision/{*}text")
            if element.find("{*}redirect") is None and (ns is None or ns.text == "0") and text is not None:
                paragraphs = clean_markup(text.text or "")
                if paragraphs:
                    documents.append("\n\n".join(paragraphs))
            element.clear()
    return documents
