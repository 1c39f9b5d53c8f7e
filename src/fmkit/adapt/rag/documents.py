"""Reading documents for the RAG index: text, markdown and HTML files (visible text and title), decoding with
reasons for what is skipped, and token windows cut from the original text."""
from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}


class Skip(Exception):
    """A document that is counted and reported, not indexed; the message is the reason."""


class HTMLText(HTMLParser):
    """Visible text of an HTML page (script/style dropped, block elements on their own lines) and its <title>."""

    SKIP = {"script", "style", "noscript", "template", "svg"}
    BLOCK = {"p", "div", "br", "li", "tr", "td", "th", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article",
             "header", "footer", "nav", "pre", "blockquote", "table", "ul", "ol", "dl", "dt", "dd", "hr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title = ""
        self._skip = 0
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self._in_title = True
        elif tag in self.SKIP:
            self._skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        elif tag in self.SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        elif not self._skip:
            self.parts.append(data)


def decode(data: bytes) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        codec = "utf-16"
    else:
        codec = "utf-8-sig"
    try:
        text = data.decode(codec)
    except UnicodeDecodeError:
        raise Skip("undecodable") from None
    if "\x00" in text:   # binary that happens to be valid UTF-8
        raise Skip("undecodable")
    return text


def read_document(path: Path) -> tuple[str, str]:
    """(title, text) of one document."""
    try:
        text = decode(path.read_bytes())
    except OSError:
        raise Skip("unreadable") from None
    title = ""
    if path.suffix.lower() in HTML_SUFFIXES:
        parser = HTMLText()
        parser.feed(text)
        parser.close()
        title = " ".join(parser.title.split())
        text = re.sub(r"[ \t\r\f\v]+", " ", "".join(parser.parts))
        text = re.sub(r"\s*\n\s*", "\n", text)
    else:
        heading = re.search(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)
        if heading and path.suffix.lower() in {".md", ".markdown"}:
            title = heading.group(1)
    text = text.strip()
    if not text:
        raise Skip("empty")
    return title or path.stem, text


def find_documents(docs: Path) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """(path, source) of each document to read, and (source, reason) of each file passed over."""
    if docs.is_file():
        return [(docs, docs.name)], []
    found, passed = [], []
    for p in sorted(docs.rglob("*")):
        rel = p.relative_to(docs)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue   # hidden files and folders (.git, .DS_Store) are never documents
        if p.suffix.lower() in TEXT_SUFFIXES | HTML_SUFFIXES:
            found.append((p, rel.as_posix()))
        else:
            passed.append((rel.as_posix(), "not text, markdown or HTML"))
    return found, passed


def chunk_text(text: str, tokenizer, size: int, overlap: int) -> list[str]:
    """Windows of `size` tokens, each starting `size - overlap` tokens after the last, cut from the original text
    at token boundaries (so chunks keep their case, spacing and punctuation)."""
    spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]
    step = size - overlap
    chunks = []
    for start in range(0, max(len(spans) - overlap, 1), step):
        window = spans[start:start + size]
        chunks.append(text[window[0][0]:window[-1][1]].strip())
    return [c for c in chunks if c]
