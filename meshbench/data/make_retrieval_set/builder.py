"""What every family module uses: the builder that collects documents and facts, names in
both languages, and a few shared tables."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import NamedTuple

from meshbench.data.retrieval_set import LANGUAGES, Document


class Name(NamedTuple):
    en: str
    zh: str


@dataclass
class Fact:
    doc_ids: tuple[str, ...]
    family: str
    lexical: dict[str, list[str]]
    paraphrase: dict[str, list[str]]


@dataclass
class Builder:
    rng: random.Random
    documents: list[Document] = field(default_factory=list)
    facts: list[Fact] = field(default_factory=list)

    def doc(self, doc_id: str, language: str, family: str, title: str, text: str) -> str:
        self.documents.append(Document(doc_id, language, family, title, text))
        return doc_id

    def fact(
        self,
        doc_ids: str | tuple[str, ...],
        family: str,
        *,
        en: tuple[list[str], list[str]],
        zh: tuple[list[str], list[str]],
    ) -> None:
        """A fact and its (lexical, paraphrase) query templates per language."""
        ids = (doc_ids,) if isinstance(doc_ids, str) else doc_ids
        self.facts.append(Fact(ids, family, {"en": en[0], "zh": zh[0]}, {"en": en[1], "zh": zh[1]}))

    def language(self) -> str:
        return self.rng.choice(LANGUAGES)

    def pick(self, choices: list[int] | range) -> int:
        return self.rng.choice(list(choices))


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


MONTHS = [Name(m, f"{i + 1}月") for i, m in enumerate(("January", "February", "March", "April"))]
MONTHS += [Name(m, f"{i + 5}月") for i, m in enumerate(("May", "June", "July", "August"))]
WEEKDAYS = [Name("Monday", "周一"), Name("Tuesday", "周二"), Name("Wednesday", "周三")]
WEEKDAYS += [Name("Thursday", "周四"), Name("Friday", "周五"), Name("Saturday", "周六")]
WEEKDAYS += [Name("Sunday", "周日")]
