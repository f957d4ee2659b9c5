"""Who may see or change a stored document: the document ACL, applied to every route.

A document's ACL lists groups (the caller's roles); an empty ACL means the whole tenant.
A caller sees a document, lists it, reads its ingestion status, and replaces or deletes it
only when the ACL is empty or names one of its groups, unless it administers the
collection (policy action ``admin`` on the ``kb_collection``), which lifts the ACL.
Search applies the same rule through :class:`~services.retrieval.index.Scope`.

Names are checked with ``fullmatch``: ``$`` alone would accept a trailing newline.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

COLLECTION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DOCUMENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,199}")
"""Letters, digits and ``_ . : @ -``; no ``/``, so an id is always one URL path segment."""
COLLECTION_RULE = "use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
DOCUMENT_ID_RULE = "use 1-200 letters, digits and _ . : @ -, starting with a letter or digit"


def valid_collection(name: object) -> bool:
    return isinstance(name, str) and COLLECTION.fullmatch(name) is not None


def valid_document_id(name: object) -> bool:
    return isinstance(name, str) and DOCUMENT_ID.fullmatch(name) is not None


@dataclass(frozen=True)
class Reader:
    """A caller's right to see documents: its groups, or every document (``admin``)."""

    groups: tuple[str, ...] = ()
    admin: bool = False

    def may_see(self, acl: Iterable[str]) -> bool:
        acl = tuple(acl)
        return self.admin or not acl or not set(acl).isdisjoint(self.groups)

    @property
    def readers(self) -> tuple[str, ...] | None:
        """The index's ``readers`` filter: None (no filter) for an administrator."""
        return None if self.admin else self.groups
