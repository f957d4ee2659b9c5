"""The sandbox's parse worker around the real parser, misbehaving on request (tests only).

Run as ``python -m tests.retrieval.hostile_parser`` in place of the real worker. A document
whose bytes start with ``HANG`` never finishes, ``HOG`` allocates until the memory limit
stops it, ``ABORT`` crashes the process; any other document goes to the real
:func:`~services.retrieval.parsing.parse_document`. ``HOSTILE_PARSER_LOG`` names a file
that gets one line per document parsed, so a test can count parser runs.
"""

from __future__ import annotations

import os
import time
from typing import Any

from services.retrieval import sandbox
from services.retrieval.parsing import ParsedDocument, parse_document


def misbehaving(
    content: bytes, content_type: str, title: str | None, **limits: Any
) -> ParsedDocument:
    log = os.environ.get("HOSTILE_PARSER_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as out:
            out.write(content[:16].decode(errors="replace").split()[0] + "\n")
    if content.startswith(b"HANG"):
        time.sleep(3600)
    if content.startswith(b"HOG"):
        held = []
        while True:
            held.append(bytearray(64 * 2**20))
    if content.startswith(b"ABORT"):
        os.abort()
    return parse_document(content, content_type, title, **limits)


if __name__ == "__main__":
    sandbox.worker(misbehaving)
