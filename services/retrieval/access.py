"""Who may see or change a stored document: the document ACL, applied to every route.

A document's ACL lists groups (the caller's roles); an empty ACL means the whole tenant.
A caller sees a document, lists it, reads its ingestion status, and replaces or deletes it
only when the ACL is empty or names one of its groups, unless it administers the
collection (policy action ``admin`` on the ``kb_collection``), which lifts the ACL.
Search applies the same rule through :class:`~services.retrieval.index.Scope`.

The names themselves: :mod:`shared.kb_names`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


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
