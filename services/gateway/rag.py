"""The ``rag`` extension of a chat request: answer from the tenant's knowledge base.

``{"rag": {"collections": ["handbook", "policies"], "top_k": 4}}`` beside the usual
fields (with the OpenAI SDK: ``extra_body={"rag": {...}}``). The router retrieves the
best chunks of those collections that the caller may read, puts them into the prompt,
and the answer carries them as ``citations`` (see the README).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.kb_names import COLLECTION
from shared.openai_protocol import invalid_field, reject_unknown

MAX_COLLECTIONS = 8
MAX_TOP_K = 16
FIELDS = frozenset({"collections", "top_k"})


@dataclass(frozen=True)
class RagRequest:
    collections: tuple[str, ...]
    top_k: int | None = None


def parse_rag(value: Any) -> RagRequest | None:
    """The validated ``rag`` field (None when absent); 400 naming the field at fault."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid_field("rag", "must be an object with collections (and optionally top_k)")
    reject_unknown(value, FIELDS, what="a field of rag", prefix="rag.")
    collections = value.get("collections")
    if not isinstance(collections, list) or not 1 <= len(collections) <= MAX_COLLECTIONS:
        raise invalid_field("rag.collections", f"must be a list of 1 to {MAX_COLLECTIONS} names")
    for name in collections:
        if not isinstance(name, str) or not COLLECTION.fullmatch(name):
            raise invalid_field(
                "rag.collections",
                "names are 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit",
            )
    top_k = value.get("top_k")
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K
    ):
        raise invalid_field("rag.top_k", f"must be an integer from 1 to {MAX_TOP_K}")
    return RagRequest(tuple(dict.fromkeys(collections)), top_k)
