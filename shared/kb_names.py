"""How knowledge-base collections and documents may be named: part of the contract between
the gateway, which checks names at the edge, and the retrieval service, which checks them
again on its own API and on ``kb.ingest``.

Names are matched with ``fullmatch``: ``$`` alone would accept a trailing newline. A
document id has no ``/``, so it is always one URL path segment.
"""

from __future__ import annotations

import re

COLLECTION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DOCUMENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,199}")
COLLECTION_RULE = "use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
DOCUMENT_ID_RULE = "use 1-200 letters, digits and _ . : @ -, starting with a letter or digit"


def valid_collection(name: object) -> bool:
    return isinstance(name, str) and COLLECTION.fullmatch(name) is not None


def valid_document_id(name: object) -> bool:
    return isinstance(name, str) and DOCUMENT_ID.fullmatch(name) is not None
