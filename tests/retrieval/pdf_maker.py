"""Minimal valid PDF files written by hand, so the parser is tested without a PDF library.

Latin text uses the standard Helvetica font; other text (Chinese) uses a Type0 font whose
ToUnicode map gives each character its own code, which is all text extraction reads.
"""

from __future__ import annotations


def make_pdf(pages: list[list[str]], *, title: str | None = None) -> bytes:
    """A PDF with one page per item of ``pages``, each a list of text lines (may be empty)."""
    chars = sorted({ch for page in pages for line in page for ch in line if ord(ch) > 126})
    codes = {ch: index + 1 for index, ch in enumerate(chars)}
    objects: list[bytes] = []

    def add(body: bytes) -> int:
        objects.append(body)
        return len(objects)

    catalog = add(b"")  # filled in once the pages are known
    pages_id = add(b"")
    latin = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    fonts = f"/F1 {latin} 0 R".encode()
    if chars:
        cmap = _to_unicode(codes)
        cmap_id = add(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(cmap), cmap))
        descendant = add(
            b"<< /Type /Font /Subtype /CIDFontType2 /BaseFont /Song /CIDSystemInfo"
            b" << /Registry (Adobe) /Ordering (Identity) /Supplement 0 >> /DW 1000 >>"
        )
        cjk = add(
            b"<< /Type /Font /Subtype /Type0 /BaseFont /Song /Encoding /Identity-H"
            b" /DescendantFonts [%d 0 R] /ToUnicode %d 0 R >>" % (descendant, cmap_id)
        )
        fonts += f" /F2 {cjk} 0 R".encode()
    kids = []
    for lines in pages:
        stream = _content(lines, codes)
        content = add(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
        kids.append(
            add(
                b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 612 792] /Contents %d 0 R"
                b" /Resources << /Font << %s >> >> >>" % (pages_id, content, fonts)
            )
        )
    objects[catalog - 1] = b"<< /Type /Catalog /Pages %d 0 R >>" % pages_id
    objects[pages_id - 1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (
        b" ".join(b"%d 0 R" % kid for kid in kids),
        len(kids),
    )
    info = add(b"<< /Title (%s) >>" % _escape(title).encode()) if title else None

    return write_pdf(objects, root=catalog, info=info)


def write_pdf(objects: list[bytes], *, root: int, info: int | None = None) -> bytes:
    """A PDF file of ``objects`` (numbered from 1): header, bodies, cross-reference table,
    trailer naming the catalog ``root`` (and the ``info`` dictionary)."""
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    trailer = b"<< /Size %d /Root %d 0 R" % (len(objects) + 1, root)
    if info:
        trailer += b" /Info %d 0 R" % info
    out += b"trailer\n%s >>\nstartxref\n%d\n%%%%EOF\n" % (trailer, xref)
    return bytes(out)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def _content(lines: list[str], codes: dict[str, int]) -> bytes:
    ops = [b"BT", b"14 TL", b"72 720 Td"]
    for line in lines:
        if any(ch in codes for ch in line):
            hex_codes = "".join(
                f"{codes[ch]:04X}" if ch in codes else f"{ord(ch):04X}" for ch in line
            )
            ops += [b"/F2 12 Tf", b"<%s> Tj" % hex_codes.encode(), b"T*"]
        else:
            ops += [b"/F1 12 Tf", b"(%s) Tj" % _escape(line).encode("latin-1"), b"T*"]
    ops.append(b"ET")
    return b"\n".join(ops)


def _to_unicode(codes: dict[str, int]) -> bytes:
    pairs = "\n".join(f"<{code:04X}> <{ord(ch):04X}>" for ch, code in codes.items())
    ascii_range = "<0020> <007E> <0020>"
    return (
        "/CIDInit /ProcSet findresource begin\n12 dict begin\nbegincmap\n"
        "/CIDSystemInfo << /Registry (Adobe) /Ordering (UCS) /Supplement 0 >> def\n"
        "/CMapName /Adobe-Identity-UCS def\n/CMapType 2 def\n"
        "1 begincodespacerange\n<0000> <FFFF>\nendcodespacerange\n"
        f"1 beginbfrange\n{ascii_range}\nendbfrange\n"
        f"{len(codes)} beginbfchar\n{pairs}\nendbfchar\n"
        "endcmap\nCMapName currentdict /CMap defineresource pop\nend\nend"
    ).encode()
