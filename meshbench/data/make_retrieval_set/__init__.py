"""A labelled Chinese/English retrieval set of short enterprise documents, from templates.

Regenerate ``retrieval_set.json`` (the benchmark reads the file, not this code)::

    python -m meshbench.data.make_retrieval_set

Documents are generated per *family*, each a template in English and in Chinese filled with
the entity it is about and random numbers: business travel limits per city, the warranty and
the reset/firmware notes of 36 devices, error codes of five internal applications, leave
rules per country, remote work per department, Wi-Fi, printing, canteen, parking and meeting
rooms per office, VPN and e-mail set-up per operating system, purchasing approval limits,
ten security policies, and 24 how-tos about topics without an entity (automatic replies,
mileage, probation...). Siblings of a family (the same template for another city, device,
code or country) are each other's distractors: they share almost every word of a query and
differ in the entity. Families that are never asked about add more: hotel deals,
relocation and office-move notices, maintenance windows, device catalogues and application
overviews, written to share a query's keywords without answering it.

A document is written in one language (travel rules and offices in China in Chinese,
elsewhere in English; the rest drawn at random), except the security policies and the
password reset guide, which exist in both, so their queries have two relevant documents.

Every askable fact of a document has query templates in both languages, of two kinds:
*lexical* (the document's own words, as a keyword search would be typed) and *paraphrase*
(synonyms, another word order, a question a user would ask, an alias such as a model code
without its brand, a symptom instead of an error code). Queries are drawn for a random
subset of the documents, one per document about one of its facts. With probability
:data:`CROSS_LINGUAL_SHARE` a query is asked in the language its document is not written
in (kind ``cross-lingual``), else in the document's own.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from meshbench.data.make_retrieval_set import (
    applications,
    devices,
    howtos,
    offices,
    policies,
    travel,
)
from meshbench.data.make_retrieval_set.builder import Builder, Fact
from meshbench.data.retrieval_set import DATA_FILE, LANGUAGES, Query, RetrievalSet, describe

SEED = 20261129
QUERIES = 240
CROSS_LINGUAL_SHARE = 0.3
FAMILIES = (  # in this order: each draws from the one random generator
    travel.travel,
    travel.travel_notices,
    devices.products,
    devices.catalogues,
    applications.errors,
    applications.app_overviews,
    policies.security,
    policies.leave,
    policies.remote_work,
    applications.systems,
    offices.offices,
    policies.procurement,
    howtos.howtos,
)


def build(seed: int = SEED, queries: int = QUERIES) -> RetrievalSet:
    """The documents of every family and ``queries`` queries, each about a different
    document (or bilingual pair): one of its facts, drawn at random."""
    rng = random.Random(seed)
    builder = Builder(rng)
    for family in FAMILIES:
        family(builder)
    languages = {d.doc_id: d.language for d in builder.documents}
    if len(languages) != len(builder.documents):
        raise AssertionError("two documents share an id")
    per_document: dict[tuple[str, ...], list[Fact]] = {}
    for fact in builder.facts:
        per_document.setdefault(fact.doc_ids, []).append(fact)
    candidates = [rng.choice(facts) for facts in per_document.values()]
    chosen = rng.sample(candidates, min(queries, len(candidates)))
    made = []
    for number, fact in enumerate(chosen):
        written = {languages[d] for d in fact.doc_ids}
        if len(written) > 1:
            language, crossing = rng.choice(LANGUAGES), False
        else:
            (own,) = written
            crossing = rng.random() < CROSS_LINGUAL_SHARE
            language = next(lang for lang in LANGUAGES if lang != own) if crossing else own
        kinds = [k for k in ("lexical", "paraphrase") if getattr(fact, k)[language]]
        kind = rng.choice(kinds)
        text = rng.choice(getattr(fact, kind)[language])
        made.append(
            Query(
                f"q{number:03d}",
                language,
                "cross-lingual" if crossing else kind,
                fact.family,
                text,
                fact.doc_ids,
            )
        )
    return RetrievalSet(seed, tuple(builder.documents), tuple(made))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate the retrieval benchmark's data set.")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--queries", type=int, default=QUERIES)
    parser.add_argument("--out", type=Path, default=DATA_FILE)
    args = parser.parse_args(argv)
    data = build(args.seed, args.queries)
    args.out.write_text(data.to_json(), encoding="utf-8")
    print(f"{describe(data)}\nwritten to {args.out}")
