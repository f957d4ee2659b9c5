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


@dataclass(frozen=True)
class Row:
    request_id: str
    split: str
    line: str  # the JSON line, without its newline


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
        kept = tuple(row for row in self.rows if row.request_id not in request_ids)
        if len(kept) == len(self.rows):
            return self
        counts = replace(self.counts, erased=self.counts.erased + len(self.rows) - len(kept))
        ids = tuple(sorted({row.request_id for row in kept}))
        return BuiltDataset(kept, counts, ids, self.residue_types)


def target(example: Example, filters: DatasetFilters) -> str | None:
    """The assistant turn a row teaches: the correction, the answer if rated high enough,
    or None."""
    if example.correction and filters.corrections:
        return example.correction
    if example.stars >= filters.min_rating:
        return example.answer
    return None


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

    def add_all(self, examples: Iterable[Example]) -> None:
        for example in examples:
            self.add(example)

    def add(self, example: Example) -> None:
        """Consider one example (see the module's steps)."""
        made = self._turns(example)
        if made is None:
            return
        cleaned, sourced = made
        key = hashlib.sha256(
            json.dumps(
                [(m["role"], _SPACE.sub(" ", m["content"]).strip().casefold()) for m in cleaned],
                ensure_ascii=False,
            ).encode()
        ).hexdigest()
        if key in self._seen:
            self.counts.duplicate += 1
            return
        self._seen.add(key)
        found_types = [t for m in cleaned for t in self._scan(m["content"])]
        if found_types:
            self.counts.pii_residue += 1
            for pii_type in found_types:
                self._residue[pii_type] = self._residue.get(pii_type, 0) + 1
            return
        if len(self._chosen) >= self.spec.max_rows:
            self.counts.over_max_rows += 1
            return
        self.counts.with_sources += sourced
        line = json.dumps({"messages": cleaned}, ensure_ascii=False, separators=(",", ":"))
        split = split_of(example.request_id, self.spec.eval_fraction)
        self._chosen.append(Row(example.request_id, split, line))

    def _turns(self, example: Example) -> tuple[list[dict[str, str]], bool] | None:
        """Steps 0-2: the row's redacted turns and whether they hold sources, or None (the
        reason counted)."""
        spec, counts = self.spec, self.counts
        if not spec.filters.admits(example):
            return None
        counts.candidates += 1
        assistant = target(example, spec.filters)
        if assistant is None:
            counts.below_rating += 1
            return None
        if spec.filters.sources and example.retrieved_chunk_ids and not example.prompt:
            counts.sources_withheld += 1  # a row must not teach citing sources it does not show
            return None
        sourced = bool(example.prompt) and spec.filters.sources
        asked = example.prompt if sourced else example.messages
        cleaned = []
        for role, content in [(m.role, m.content) for m in asked] + [("assistant", assistant)]:
            text, found = self._redact(content) if content else (content, 0)
            counts.pii_redacted += found
            cleaned.append({"role": role, "content": text})
        if not assistant.strip() or not any(m["content"].strip() for m in cleaned[:-1]):
            counts.empty += 1
            return None
        if sum(len(m["content"]) for m in cleaned) > spec.max_chars:
            counts.too_long += 1
            return None
        return cleaned, sourced

    def result(self) -> BuiltDataset:
        chosen = sorted(self._chosen, key=lambda row: row.request_id)  # same rows, same bytes
        request_ids = tuple(sorted({row.request_id for row in chosen}))
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
        "format": FORMAT,
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
