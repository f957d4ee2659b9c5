"""Document bytes to plain text: the first step of ingestion.

:func:`parse_document` takes the bytes and MIME type of a :class:`KbIngest` and returns the
text to chunk and, when the document names one, its title. Supported types: ``text/plain``,
``text/markdown``, ``text/html`` and ``application/pdf`` (see :data:`SUPPORTED_TYPES` for
the accepted aliases). The text keeps the document's paragraphs as blank-line-separated
blocks (headings, list items and table rows on lines of their own), which the chunker
uses as boundaries.

Every refusal is a :class:`ParseError` subclass whose message names the problem and
whose ``reason`` is a stable code for ``KbIndexed.error``.
"""

from __future__ import annotations

import codecs
import io
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

MAX_BYTES = 20 * 1024 * 1024
"""Default upper bound on a document's size (its bytes as received)."""


class ParseError(ValueError):
    """A document that cannot be indexed; the message says why."""

    reason: ClassVar[str] = "invalid_document"


class UnsupportedContentType(ParseError):
    reason = "unsupported_content_type"


class DocumentTooLarge(ParseError):
    reason = "too_large"


class EmptyDocument(ParseError):
    reason = "empty"


class UndecodableText(ParseError):
    reason = "undecodable"


class UnreadablePdf(ParseError):
    reason = "unreadable_pdf"


class PdfWithoutText(ParseError):
    reason = "no_text_layer"


class ParserKilled(ParseError):
    """The parser ran out of time or memory, or crashed, on this document (raised by
    :mod:`services.retrieval.sandbox`, which runs the parser in a child process)."""

    reason = "parser_killed"


@dataclass(frozen=True)
class ParsedDocument:
    text: str  # paragraphs separated by blank lines; never empty
    title: str | None  # the caller's, else the document's own (<title>, PDF metadata, h1…)
    content_type: str  # the canonical MIME type it was parsed as


def parse_document(
    content: bytes,
    content_type: str,
    title: str | None = None,
    *,
    max_bytes: int = MAX_BYTES,
    max_pages: int | None = None,
    max_chars: int | None = None,
) -> ParsedDocument:
    """The plain text (and title) of a document.

    Args:
        content: the document's bytes, as received.
        content_type: its MIME type, with optional parameters (``text/html; charset=gbk``);
            case-insensitive.
        title: the caller's title for the document; it wins over one found inside.
        max_bytes: documents larger than this are refused.
        max_pages: PDFs with more pages are refused (before any text is extracted).
        max_chars: documents whose text is longer are refused (a PDF as soon as its
            extracted text passes the limit).

    Hostile input can still take time and memory within these limits: the ingestion
    runs this function in a separate process with a time and a memory limit
    (:mod:`services.retrieval.sandbox`).

    Raises:
        ParseError: one of its subclasses, naming the problem: :class:`UnsupportedContentType`,
            :class:`DocumentTooLarge`, :class:`UndecodableText`, :class:`UnreadablePdf`,
            :class:`PdfWithoutText`, :class:`EmptyDocument`.
    """
    media_type, charset = _media_type(content_type)
    canonical = _ALIASES.get(media_type)
    if canonical is None:
        supported = ", ".join(sorted(set(_ALIASES.values())))
        shown = media_type or "(none given)"
        raise UnsupportedContentType(f"unsupported content type {shown}; supported: {supported}")
    if len(content) > max_bytes:
        raise DocumentTooLarge(
            f"the document has {len(content):,} bytes; the limit is {max_bytes:,} bytes"
        )
    if canonical == "application/pdf":
        text, found_title = _parse_pdf(content, charset, max_pages=max_pages, max_chars=max_chars)
    else:
        text, found_title = _PARSERS[canonical](content, charset)
    if max_chars is not None and len(text) > max_chars * 2:  # before cleaning: a rough cut
        raise _too_many_chars(len(text), max_chars)
    text = clean_text(text)
    if max_chars is not None and len(text) > max_chars:
        raise _too_many_chars(len(text), max_chars)
    if not text:
        if canonical == "application/pdf":
            raise PdfWithoutText(
                "the PDF has no text layer (scanned pages?); run OCR on it before ingesting"
            )
        raise EmptyDocument(f"the document has no text ({canonical})")
    title = " ".join((title or found_title or "").split())
    return ParsedDocument(text=text, title=title or None, content_type=canonical)


def _too_many_chars(found: int, limit: int) -> DocumentTooLarge:
    return DocumentTooLarge(
        f"the document has {found:,} characters of text; the limit is {limit:,}"
    )


# --------------------------------------------------------------------------- common

_ALIASES = {
    "text/plain": "text/plain",
    "text/markdown": "text/markdown",
    "text/x-markdown": "text/markdown",
    "text/html": "text/html",
    "application/xhtml+xml": "text/html",
    "application/pdf": "application/pdf",
}
SUPPORTED_TYPES: tuple[str, ...] = tuple(_ALIASES)

_INVISIBLE = dict.fromkeys(
    [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, 0xAD, 0x200B, 0x200C, 0x200D, 0xFEFF]
)


def _media_type(content_type: str) -> tuple[str, str | None]:
    main, *params = content_type.split(";")
    charset = None
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip():
            charset = value.strip().strip("\"'")
    return main.strip().lower(), charset


def clean_text(text: str) -> str:
    """Normalized text: NFC, ``\\n`` line ends, no control or zero-width characters, runs
    of spaces collapsed, lines stripped, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n\n")
    text = text.replace("\t", " ").translate(_INVISIBLE)
    lines = [" ".join(line.split()) for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _decode(content: bytes, charset: str | None) -> str:
    """Text from bytes: a BOM wins, then the declared charset, else strict UTF-8."""
    for bom, encoding in (
        (codecs.BOM_UTF8, "utf-8-sig"),
        (codecs.BOM_UTF32_LE, "utf-32"),
        (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16"),
    ):
        if content.startswith(bom):
            charset = encoding
            break
    charset = charset or "utf-8"
    try:
        codecs.lookup(charset)
    except LookupError:
        raise UndecodableText(f"unknown charset {charset!r}") from None
    try:
        text = content.decode(charset)
    except UnicodeDecodeError as error:
        raise UndecodableText(
            f"the text is not valid {charset} (byte {error.start}: {error.reason}); "
            "declare its charset in the content type, e.g. 'text/plain; charset=gb18030'"
        ) from None
    if "\x00" in text:
        raise UndecodableText(
            f"the text decoded as {charset} contains NUL characters: binary data, "
            "or a charset other than the one declared"
        )
    return text


# --------------------------------------------------------------------------- plain text


def _parse_plain(content: bytes, charset: str | None) -> tuple[str, str | None]:
    return _decode(content, charset), None


# --------------------------------------------------------------------------- markdown

_FRONT_MATTER = re.compile(r"\A---[ \t]*\n(.*?)\n(?:---|\.\.\.)[ \t]*(?:\n|\Z)", re.DOTALL)
_FRONT_MATTER_TITLE = re.compile(r"^title:[ \t]*(.+?)[ \t]*$", re.MULTILINE)
_MD_BLOCK_END = {
    "paragraph_close": "\n\n",
    "heading_close": "\n\n",
    "blockquote_close": "\n\n",
    "bullet_list_close": "\n\n",
    "ordered_list_close": "\n\n",
    "table_close": "\n\n",
    "list_item_close": "\n",
    "tr_close": "\n",
    "th_close": " ",
    "td_close": " ",
}


def _parse_markdown(content: bytes, charset: str | None) -> tuple[str, str | None]:
    from markdown_it import MarkdownIt

    source = _decode(content, charset).replace("\r\n", "\n")
    title: str | None = None
    front = _FRONT_MATTER.match(source)
    if front:
        named = _FRONT_MATTER_TITLE.search(front.group(1))
        title = named.group(1).strip("\"'") if named else None
        source = source[front.end() :]
    parts: list[str] = []
    heading: list[str] | None = None
    for token in MarkdownIt("commonmark").enable(["table", "strikethrough"]).parse(source):
        if token.type == "inline":
            text = _markdown_inline(token.children or [])
            parts.append(text)
            if heading is not None:
                heading.append(text)
        elif token.type in ("fence", "code_block"):
            parts.append(token.content + "\n\n")
        elif token.type == "html_block":
            parts.append(_html_text(token.content) + "\n\n")
        elif token.type == "heading_open" and token.tag == "h1" and title is None:
            heading = []
        elif token.type in _MD_BLOCK_END and not token.hidden:
            if token.type == "heading_close" and heading is not None:
                title, heading = "".join(heading), None
            parts.append(_MD_BLOCK_END[token.type])
    return "".join(parts), title


def _markdown_inline(children: list[Any]) -> str:
    parts: list[str] = []
    for child in children:
        if child.type in ("text", "code_inline"):
            parts.append(child.content)
        elif child.type == "softbreak":
            parts.append(" ")
        elif child.type == "hardbreak":
            parts.append("\n")
        elif child.type == "image":
            parts.append(_markdown_inline(child.children or []))
    return "".join(parts)


# --------------------------------------------------------------------------- HTML

_HTML_DROP = frozenset(
    {
        "head",
        "script",
        "style",
        "noscript",
        "template",
        "nav",
        "svg",
        "math",
        "iframe",
        "object",
        "embed",
        "canvas",
        "select",
        "button",
        "-comment",
        "!doctype",
    }
)
_HTML_PARAGRAPH = frozenset(
    {
        "p",
        "div",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "pre",
        "blockquote",
        "table",
        "ul",
        "ol",
        "dl",
        "section",
        "article",
        "main",
        "header",
        "footer",
        "aside",
        "figure",
        "form",
        "fieldset",
        "address",
        "details",
        "hr",
        "body",
    }
)
_HTML_LINE = frozenset({"li", "tr", "dt", "dd", "caption", "figcaption", "summary", "legend"})
_HTML_CELL = frozenset({"td", "th"})
_WHITESPACE = re.compile(r"\s+")
# Block edges are marked while walking, then each run of marks (and the whitespace around
# them) becomes one line break, or a blank line when any of them ends a paragraph.
_PARAGRAPH_MARK, _LINE_MARK = "\x1e", "\x1f"
_BREAKS = re.compile(r"[\s\x1e\x1f]*[\x1e\x1f][\s\x1e\x1f]*")
# Text a browser would not show is dropped: a page can hide instructions for a model in it
# (CSS-hidden prompt injection). Inline styles and the page's own <style> rules count.
_HIDING_STYLE = re.compile(
    r"display\s*:\s*none|visibility\s*:\s*(?:hidden|collapse)"
    r"|(?<![\w-])font-size\s*:\s*0*\.?0*(?:px|pt|em|rem|%|vw|vh)?\s*(?:;|!|$)"
    r"|(?<![\w-])opacity\s*:\s*0*\.?0*\s*(?:;|!|$)"
    r"|(?:^|;)\s*(?:left|top|right|text-indent)\s*:\s*-\d{3,}"
    r"|clip\s*:\s*rect\(\s*0[a-z]*\s*,?\s*0[a-z]*\s*,?\s*0[a-z]*\s*,?\s*0[a-z]*\s*\)"
    r"|(?:^|;)\s*(?:width|height|max-width|max-height)\s*:\s*0(?:px)?\s*(?:;|$)[^}]*overflow\s*:\s*hidden",
    re.IGNORECASE,
)
_CSS_RULE = re.compile(r"([^{}@]+)\{([^{}]*)\}")
_CSS_COMMENT = re.compile(r"/\*.*?\*/", re.DOTALL)
_CSS_AT_BLOCK = re.compile(r"@[^{};]*\{(?:[^{}]*\{[^{}]*\})*[^{}]*\}")
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_:.-]+)""", re.I)


def _parse_html(content: bytes, charset: str | None) -> tuple[str, str | None]:
    from selectolax.lexbor import LexborHTMLParser

    if charset is None:
        declared = _META_CHARSET.search(content[:4096])
        charset = declared.group(1).decode("ascii") if declared else None
    tree = LexborHTMLParser(_decode(content, charset))
    _drop_styled_hidden(tree)
    title_node = tree.css_first("title") or tree.css_first("h1")
    title = title_node.text(deep=True) if title_node is not None else None
    root = tree.body or tree.root
    return (_html_node_text(root) if root is not None else ""), title


def _html_text(html: str) -> str:
    from selectolax.lexbor import LexborHTMLParser

    tree = LexborHTMLParser(html)
    _drop_styled_hidden(tree)
    root = tree.body or tree.root
    return _html_node_text(root) if root is not None else ""


def _drop_styled_hidden(tree: Any) -> None:
    """Remove the elements that the page's <style> rules hide (display: none and the like).

    Only what a selector engine can match is removed: rules inside @media and other
    at-rules are skipped (they may not apply), and a selector lexbor refuses is ignored.
    """
    css = " ".join(node.text(deep=True) or "" for node in tree.css("style"))
    css = _CSS_AT_BLOCK.sub(" ", _CSS_COMMENT.sub(" ", css))
    for selectors, declarations in _CSS_RULE.findall(css):
        if not _HIDING_STYLE.search(declarations):
            continue
        for raw in selectors.split(","):
            selector = raw.strip()
            if not selector or ":" in selector:  # :hover, ::before... hide nothing for good
                continue
            try:
                hidden = tree.css(selector)
            except Exception:  # a selector lexbor does not support
                continue
            for node in hidden:
                if node.tag not in ("html", "body"):
                    node.decompose()


def _hidden(attributes: dict[str, str | None]) -> bool:
    if "hidden" in attributes or attributes.get("aria-hidden") == "true":
        return True
    style = attributes.get("style")
    return bool(style and _HIDING_STYLE.search(style))


def _html_node_text(root: Any) -> str:
    """The text of ``root``: whitespace collapsed (kept in ``<pre>``), blocks on lines."""
    parts: list[str] = []
    # (node, closing tag text or None, inside <pre>); an explicit stack, as pages nest deep
    stack: list[tuple[Any, str | None, bool]] = [(root, None, False)]
    while stack:
        node, closing, in_pre = stack.pop()
        if closing is not None:
            parts.append(closing)
            continue
        tag = node.tag
        if tag == "-text":
            text = node.text_content or ""
            text = text.translate(_INVISIBLE)
            parts.append(text if in_pre else _WHITESPACE.sub(" ", text))
            continue
        attributes = node.attributes
        if tag in _HTML_DROP or _hidden(attributes):
            continue
        if tag == "br":
            parts.append(_LINE_MARK)
            continue
        edge = (
            _PARAGRAPH_MARK
            if tag in _HTML_PARAGRAPH
            else _LINE_MARK
            if tag in _HTML_LINE
            else " "
            if tag in _HTML_CELL
            else ""
        )
        parts.append(edge)
        stack.append((node, edge, in_pre))
        children = list(node.iter(include_text=True))
        pre = in_pre or tag in ("pre", "textarea")
        stack.extend((child, None, pre) for child in reversed(children))
    return _BREAKS.sub(_break, "".join(parts))


def _break(match: re.Match[str]) -> str:
    return "\n\n" if _PARAGRAPH_MARK in match.group() else "\n"


# --------------------------------------------------------------------------- PDF


def _parse_pdf(
    content: bytes,
    charset: str | None,
    *,
    max_pages: int | None = None,
    max_chars: int | None = None,
) -> tuple[str, str | None]:
    from pypdf import PdfReader
    from pypdf.errors import LimitReachedError, PyPdfError

    try:
        reader = PdfReader(io.BytesIO(content))
        if reader.is_encrypted and not reader.decrypt(""):
            raise UnreadablePdf("the PDF is encrypted with a password")
        count = len(reader.pages)
        if max_pages is not None and count > max_pages:
            raise DocumentTooLarge(f"the PDF has {count:,} pages; the limit is {max_pages:,}")
        pages: list[str] = []
        length = 0
        for page in reader.pages:
            pages.append(page.extract_text() or "")
            length += len(pages[-1])
            if max_chars is not None and length > max_chars * 2:  # cleaning may shrink it
                raise _too_many_chars(length, max_chars)
        metadata = reader.metadata
        title = str(metadata.title) if metadata is not None and metadata.title else None
    except ParseError:
        raise
    except LimitReachedError as error:  # a decompression bomb, or a stream declared too long
        raise DocumentTooLarge(f"the PDF exceeds a parser limit: {error}") from None
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, OSError) as error:
        raise UnreadablePdf(f"the PDF could not be read: {type(error).__name__}: {error}") from None
    if not pages:
        raise UnreadablePdf("the PDF has no pages")
    return "\n\n".join(pages), title


_PARSERS: dict[str, Callable[[bytes, str | None], tuple[str, str | None]]] = {
    "text/plain": _parse_plain,
    "text/markdown": _parse_markdown,
    "text/html": _parse_html,
    "application/pdf": _parse_pdf,
}
