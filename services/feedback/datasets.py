"""Datasets from rated answers: which examples qualify, and the rows and manifest they make.

No I/O here: :func:`build` takes the stored examples and a :class:`DatasetSpec`, and returns
the rows of each split and the manifest; the service stores them and announces the dataset.

A row is OpenAI's fine-tuning chat format, one JSON object per line::

    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}

ending with the assistant's turn the model should learn: the **correction** when the rater
gave one, else the **answer** itself when its rating reaches ``min_rating`` (1-5; up is 5,
down is 1). An answer rated below that without a correction teaches nothing here and is
left out (counted as ``below_rating``).

Every row goes, in order, through:

0. the prompt: the caller's messages, or for an answer from the knowledge base the prompt
   the model was given, sources included (unless the filters say ``sources=False``); an
   answer from sources whose prompt was not kept (a source only some groups may read, or
   rated before prompts were kept) is left out (``sources_withheld``);
1. the tenant's PII policy for the ``training`` purpose (every message's content);
2. the length check (``max_chars`` of content per row) and the empty check;
3. deduplication (the same messages, whitespace and case folded, count once; the most
   recently rated is kept);
4. the PII residue scan: any structured PII (ID card, phone, bank card, e-mail, IP address,
   passport) still found in a row after step 1 drops the row (``pii_residue``), so the
   training split holds none;
5. the split: a row is in ``eval`` when a hash of its request id falls under
   ``eval_fraction``, so the same request lands in the same split in every version.

A **preference** dataset (``kind="preference"``, for DPO) holds pairs instead, in OpenAI's
preference format (``input.messages``, ``preferred_output``, ``non_preferred_output``):

- a **correction** is preferred to the answer it corrects;
- for the same prompt (the same messages, whitespace and case folded), an answer rated at
  least ``min_rating`` is preferred to one rated down (2 stars or fewer); each rated answer
  is in at most one pair, the newest ratings first. A rated answer left without a partner
  is counted as ``unpaired``.

Pairs go through the same steps (the prompt, the policy on every message and both answers,
length, deduplication of the whole pair, PII residue, the split by the preferred answer's
request id).

The manifest records the filters, the policy applied, the counts of each step, the source
request ids and the sha256 of each split's bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from services.feedback.examples import Example
from shared import finetune_format
from shared.finetune_format import FormatError

FORMAT = "openai-chat-jsonl"
FORMATS = {"chat": FORMAT, "preference": "openai-preference-jsonl"}
KINDS = tuple(FORMATS)
MAX_REJECTED_STARS = 2  # a rating of at most this is a rejected answer (down is 1)
SPLITS = ("train", "eval")
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
"""A dataset's name (matched whole); its id is ``<name>-v<version>``."""
_SPACE = re.compile(r"\s+")

Redact = Callable[[str], tuple[str, int]]
Scan = Callable[[str], list[str]]  # the structured PII types found in a text


@dataclass(frozen=True)
class DatasetFilters:
    """Which stored examples a dataset is built from (all combined with AND)."""

    since_ns: int | None = None  # rated at or after
    until_ns: int | None = None  # rated before
    min_rating: int = 4  # 1-5; up counts 5, down 1
    model: str | None = None
    model_version: str | None = None
    labels: tuple[str, ...] = ()  # any of them; empty: no label filter
    corrections: bool = True  # rows from corrections, whatever the rating
    # a sourced answer's row holds the prompt the model was given (the knowledge base's
    # sources in the user turn), so it teaches answering from sources; False: the
    # caller's messages only
    sources: bool = True

    def admits(self, example: Example) -> bool:
        """Whether ``example`` is a candidate (before the rating/correction rule)."""
        if self.since_ns is not None and example.rated_at_ns < self.since_ns:
            return False
        if self.until_ns is not None and example.rated_at_ns >= self.until_ns:
            return False
        if self.model is not None and example.model != self.model:
            return False
        if self.model_version is not None and example.model_version != self.model_version:
            return False
        return not self.labels or bool(set(self.labels) & set(example.labels))


@dataclass(frozen=True)
class DatasetSpec:
    tenant: str
    name: str
    filters: DatasetFilters = DatasetFilters()
    eval_fraction: float = 0.1
    max_chars: int = 32_000
    max_rows: int = 100_000
    kind: str = "chat"  # or "preference": pairs for DPO (see the module docstring)


@dataclass
class Counts:
    candidates: int = 0
    below_rating: int = 0
    empty: int = 0
    too_long: int = 0
    duplicate: int = 0
    pii_residue: int = 0
    pii_redacted: int = 0  # values the training policy replaced
    over_max_rows: int = 0
    with_sources: int = 0  # rows whose prompt holds the knowledge base's sources
    sources_withheld: int = 0  # answers from sources whose prompt was not kept (ACL, older)
    erased: int = 0  # rows whose request was erased while the dataset was being built
    unpaired: int = 0  # preference: rated answers no answer of the same prompt paired with


@dataclass(frozen=True)
class Row:
    request_id: str
    split: str
    line: str  # the JSON line, without its newline
    sources: tuple[str, ...] = ()  # every request id the row holds (a pair: two); () = itself


@dataclass(frozen=True)
class BuiltDataset:
    rows: tuple[Row, ...]
    counts: Counts
    source_request_ids: tuple[str, ...]
    residue_types: Mapping[str, int] = field(default_factory=dict)

    def lines(self, split: str) -> list[str]:
        return [row.line for row in self.rows if row.split == split]

    def without(self, request_ids: Collection[str]) -> BuiltDataset:
        """These rows less those of ``request_ids`` (erased while the build read)."""
        erased = set(request_ids)
        kept = tuple(row for row in self.rows if erased.isdisjoint(row.sources or [row.request_id]))
        if len(kept) == len(self.rows):
            return self
        counts = replace(self.counts, erased=self.counts.erased + len(self.rows) - len(kept))
        ids = tuple(sorted({i for row in kept for i in row.sources or [row.request_id]}))
        return BuiltDataset(kept, counts, ids, self.residue_types)


def target(example: Example, filters: DatasetFilters) -> str | None:
    """The assistant turn a row teaches: the correction, the answer if rated high enough,
    or None."""
    if example.correction and filters.corrections:
        return example.correction
    if example.stars >= filters.min_rating:
        return example.answer
    return None


def folded_key(turns: Iterable[tuple[str, str]]) -> str:
    """A hash of (role, text) pairs with whitespace and case folded: the same conversation
    (or pair) written twice has one key."""
    folded = [(role, _SPACE.sub(" ", text).strip().casefold()) for role, text in turns]
    return hashlib.sha256(json.dumps(folded, ensure_ascii=False).encode()).hexdigest()


def split_of(request_id: str, eval_fraction: float) -> str:
    bucket = int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big") / 2**64
    return "eval" if bucket < eval_fraction else "train"


class Builder:
    """A dataset built one example at a time, newest rating first (the order the store
    pages them in), so a build over any history holds only the rows it keeps and the
    hashes of the rows it has seen."""

    def __init__(self, spec: DatasetSpec, redact: Redact, scan: Scan) -> None:
        self.spec = spec
        self._redact = redact
        self._scan = scan
        self.counts = Counts()
        self._chosen: list[Row] = []
        self._seen: set[str] = set()
        self._residue: dict[str, int] = {}
        self._good: dict[str, Example] = {}  # preference: answers waiting for a partner
        self._bad: dict[str, Example] = {}

    def add_all(self, examples: Iterable[Example]) -> None:
        for example in examples:
            self.add(example)

    def add(self, example: Example) -> None:
        """Consider one example (see the module's steps)."""
        if self.spec.kind == "preference":
            self._add_preference(example)
            return
        made = self._turns(example)
        if made is None:
            return
        cleaned, sourced = made
        line = json.dumps({"messages": cleaned}, ensure_ascii=False, separators=(",", ":"))
        self._keep(example.request_id, (), cleaned, line, sourced)

    def _keep(
        self, request_id: str, others: tuple[str, ...], parts: list[dict[str, str]], line: str,
        sourced: bool,
    ) -> None:  # fmt: skip
        """Steps 3-5 for a made row: ``parts`` are its texts (role and content)."""
        key = folded_key([(m["role"], m["content"]) for m in parts])
        if key in self._seen:
            self.counts.duplicate += 1
            return
        self._seen.add(key)
        found_types = [t for m in parts for t in self._scan(m["content"])]
        if found_types:
            self.counts.pii_residue += 1
            for pii_type in found_types:
                self._residue[pii_type] = self._residue.get(pii_type, 0) + 1
            return
        if len(self._chosen) >= self.spec.max_rows:
            self.counts.over_max_rows += 1
            return
        self.counts.with_sources += sourced
        split = split_of(request_id, self.spec.eval_fraction)
        sources = (request_id, *others) if others else ()
        self._chosen.append(Row(request_id, split, line, sources))

    def _prompt(self, example: Example) -> tuple[list[tuple[str, str]], bool] | None:
        """Step 0: the prompt's turns and whether they hold sources; None when a sourced
        answer's prompt was not kept (counted)."""
        if self.spec.filters.sources and example.retrieved_chunk_ids and not example.prompt:
            self.counts.sources_withheld += 1  # a row must not teach sources it does not show
            return None
        sourced = bool(example.prompt) and self.spec.filters.sources
        asked = example.prompt if sourced else example.messages
        return [(m.role, m.content) for m in asked], sourced

    def _clean(self, turns: list[tuple[str, str]]) -> list[dict[str, str]]:
        """Step 1: the training policy on every text."""
        cleaned = []
        for role, content in turns:
            text, found = self._redact(content) if content else (content, 0)
            self.counts.pii_redacted += found
            cleaned.append({"role": role, "content": text})
        return cleaned

    def _fits(self, prompt: list[dict[str, str]], answers: list[str]) -> bool:
        """Step 2: something asked, something answered, and not too long (counted)."""
        if not all(a.strip() for a in answers) or not any(m["content"].strip() for m in prompt):
            self.counts.empty += 1
            return False
        if sum(len(m["content"]) for m in prompt) + sum(map(len, answers)) > self.spec.max_chars:
            self.counts.too_long += 1
            return False
        return True

    def _turns(self, example: Example) -> tuple[list[dict[str, str]], bool] | None:
        """Steps 0-2: the row's redacted turns and whether they hold sources, or None (the
        reason counted)."""
        if not self.spec.filters.admits(example):
            return None
        self.counts.candidates += 1
        assistant = target(example, self.spec.filters)
        if assistant is None:
            self.counts.below_rating += 1
            return None
        made = self._prompt(example)
        if made is None:
            return None
        turns, sourced = made
        cleaned = self._clean([*turns, ("assistant", assistant)])
        if not self._fits(cleaned[:-1], [cleaned[-1]["content"]]):
            return None
        return cleaned, sourced

    def _add_preference(self, example: Example) -> None:
        """A correction makes a pair at once; a rated answer waits for a partner of the
        opposite verdict on the same prompt."""
        filters = self.spec.filters
        if not filters.admits(example):
            return
        self.counts.candidates += 1
        made = self._prompt(example)
        if made is None:
            return
        turns, sourced = made
        answer = example.answer
        corrected = example.correction and example.correction.strip() != answer.strip()
        if corrected and filters.corrections and answer.strip():
            self._pair(example.request_id, (), turns, sourced=sourced,
                       preferred=example.correction, rejected=answer)  # fmt: skip
            return
        if example.stars >= filters.min_rating:
            side, other = self._good, self._bad
        elif example.stars <= MAX_REJECTED_STARS:
            side, other = self._bad, self._good
        else:
            self.counts.below_rating += 1
            return
        key = folded_key(turns)
        partner = other.pop(key, None)
        if partner is not None and (
            partner.request_id == example.request_id  # two raters of one answer disagree
            or _SPACE.sub(" ", partner.answer).strip() == _SPACE.sub(" ", answer).strip()
        ):
            other[key] = partner  # no pair: the same answer both preferred and not
            partner = None
        if partner is None:
            side.setdefault(key, example)  # the newest rating of each side waits
            return
        good, bad = (example, partner) if side is self._good else (partner, example)
        self._pair(good.request_id, (bad.request_id,), turns, sourced=sourced,
                   preferred=good.answer, rejected=bad.answer)  # fmt: skip

    def _pair(
        self, request_id: str, others: tuple[str, ...], turns: list[tuple[str, str]], *,
        sourced: bool, preferred: str, rejected: str,
    ) -> None:  # fmt: skip
        prompt = self._clean(turns)
        chosen, other = (m["content"] for m in self._clean([("assistant", preferred),
                                                             ("assistant", rejected)]))  # fmt: skip
        if not self._fits(prompt, [chosen, other]):
            return
        row = {"input": {"messages": prompt},
               "preferred_output": [{"role": "assistant", "content": chosen}],
               "non_preferred_output": [{"role": "assistant", "content": other}]}  # fmt: skip
        line = json.dumps(row, ensure_ascii=False, separators=(",", ":"))
        parts = [*prompt, {"role": "preferred", "content": chosen},
                 {"role": "rejected", "content": other}]  # fmt: skip
        self._keep(request_id, others, parts, line, sourced)

    def result(self) -> BuiltDataset:
        self.counts.unpaired = len(self._good) + len(self._bad)
        chosen = sorted(self._chosen, key=lambda row: row.request_id)  # same rows, same bytes
        request_ids = tuple(sorted({i for row in chosen for i in row.sources or [row.request_id]}))
        return BuiltDataset(tuple(chosen), self.counts, request_ids, dict(self._residue))


def build(
    examples: Iterable[Example], spec: DatasetSpec, redact: Redact, scan: Scan
) -> BuiltDataset:
    """The rows of the dataset ``spec`` asks for, from examples in any order."""
    builder = Builder(spec, redact, scan)
    builder.add_all(sorted(examples, key=lambda e: e.rated_at_ns, reverse=True))
    return builder.result()


def split_digest(lines: Iterable[str]) -> tuple[str, int]:
    """sha256 and byte count of a split as exported (each line ends with a newline)."""
    digest = hashlib.sha256()
    size = 0
    for line in lines:
        data = (line + "\n").encode()
        digest.update(data)
        size += len(data)
    return digest.hexdigest(), size


def whole_digest(splits: Mapping[str, Mapping[str, Any]]) -> str:
    """The dataset's sha256: over the digests of its splits, in order."""
    text = "".join(f"{split}:{splits[split]['sha256']}\n" for split in SPLITS)
    return hashlib.sha256(text.encode()).hexdigest()


def manifest(
    spec: DatasetSpec,
    built: BuiltDataset,
    *,
    dataset_id: str,
    version: int,
    created_at: str,
    pii_policy: Mapping[str, Any],
    source: str = "feedback",
) -> dict[str, Any]:
    """The dataset's manifest (what the API shows and the trainer checks)."""
    splits = {}
    for split in SPLITS:
        lines = built.lines(split)
        sha, size = split_digest(lines)
        splits[split] = {"rows": len(lines), "bytes": size, "sha256": sha}
    whole = whole_digest(splits)
    filters = asdict(spec.filters)
    filters["labels"] = list(spec.filters.labels)
    return {
        "id": dataset_id,
        "object": "dataset",
        "name": spec.name,
        "version": version,
        "tenant": spec.tenant,
        "created_at": created_at,
        "source": source,
        "format": FORMATS[spec.kind],
        "kind": spec.kind,
        "sha256": whole,
        "rows": len(built.rows),
        "splits": splits,
        "eval_fraction": spec.eval_fraction,
        "max_chars": spec.max_chars,
        "filters": filters,
        "pii_policy": {"purpose": "training", **pii_policy},
        "counts": asdict(built.counts),
        "pii_residue_types": dict(built.residue_types),
        "source_request_ids": list(built.source_request_ids),
        "used_by": [],
        "erased_request_ids": [],
    }


def examples_from_jsonl(data: bytes, tenant: str, *, uploaded_at_ns: int) -> list[Example]:
    """An uploaded chat-format JSONL file as examples :func:`build` takes: each line's last
    turn (the assistant's) is its correction, so every line qualifies whatever the rating.

    Raises:
        FormatError: a line not in OpenAI's chat fine-tuning format
            (:mod:`shared.finetune_format`), or whose last turn is not the assistant's.
    """
    from services.feedback.examples import Message

    examples = []
    lines = data.splitlines()
    for number, _kind, row in finetune_format.rows(data):
        if not isinstance(row, finetune_format.ChatRow):
            raise FormatError(number, "a dataset takes chat rows ('messages'), not preferences")
        turns = [Message(m.role, m.content) for m in row.messages]
        if len(turns) < 2 or turns[-1].role != "assistant":
            raise FormatError(number, "the last message must be the assistant's")
        raw = lines[number - 1]
        request_id = "upload-" + hashlib.sha256(raw.strip()).hexdigest()[:32]
        examples.append(
            Example(
                tenant=tenant,
                request_id=request_id,
                subject="upload",
                api_key_id="",
                rating=0,
                score=0,
                labels=(),
                correction=turns[-1].content,
                comment="",
                model="",
                model_version="",
                kind="chat",
                messages=tuple(turns[:-1]),
                answer="",
                finish_reason="",
                retrieved_chunk_ids=(),
                rated_at_ns=uploaded_at_ns,
                answered_at_ns=0,
                event_id="",
            )
        )
    if not examples:
        raise FormatError(1, "the file has no rows")
    return examples
