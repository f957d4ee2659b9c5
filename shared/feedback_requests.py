"""The bodies of the feedback and dataset routes, checked the same way at the gateway (a 400
naming the field, before anything is charged) and again at the feedback service.

- A rating: ``request_id`` (the ``x-request-id`` of an answer), ``rating`` (``"up"``,
  ``"down"`` or a score 1-5), optional ``correction``, ``labels``, ``comment``.
- A dataset build: ``name``, optional ``since``/``until`` (ISO 8601 with a zone, or Unix
  seconds), ``min_rating`` (1-5, default 4), ``model``, ``model_version``, ``labels``,
  ``corrections`` (default true), ``sources`` (default true: a row of an answer from the
  knowledge base keeps the sources the model was given), ``eval_fraction`` (0-0.5, default
  0.1), ``max_chars``, ``kind`` (``chat``, the default, or ``preference``: pairs for DPO).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shared.openai_protocol import invalid_field, reject_unknown

REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
"""An answer's request id (the gateway's are 32 hex digits); matched whole."""
DATASET_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
DATASET_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}-v[0-9]{1,9}")
MAX_CORRECTION_CHARS = 32_000
MAX_COMMENT_CHARS = 4_000
MAX_LABELS = 16
MAX_LABEL_CHARS = 64
MAX_MODEL_CHARS = 256
RATING_FIELDS = frozenset({"request_id", "rating", "correction", "labels", "comment"})
DATASET_FIELDS = frozenset(
    {"name", "since", "until", "min_rating", "model", "model_version", "labels", "corrections",
     "sources", "eval_fraction", "max_chars", "kind"}
)  # fmt: skip
DATASET_KINDS = ("chat", "preference")


@dataclass(frozen=True)
class Rating:
    request_id: str
    rating: int  # -1, 0, +1
    score: int  # 1-5, or 0 for up/down
    labels: tuple[str, ...]
    correction: str
    comment: str


def parse_request_id(value: Any, field: str = "request_id") -> str:
    if not isinstance(value, str) or REQUEST_ID.fullmatch(value) is None:
        raise invalid_field(
            field, "must be the x-request-id of an answer (1-128 letters, digits, _.:-)"
        )
    return value


def _text(body: dict[str, Any], field: str, most: int) -> str:
    value = body.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise invalid_field(field, "must be text")
    if len(value) > most:
        raise invalid_field(field, f"must have at most {most} characters (it has {len(value)})")
    return value


def _labels(body: dict[str, Any]) -> tuple[str, ...]:
    labels = body.get("labels")
    if labels is None:
        return ()
    if (
        not isinstance(labels, list)
        or len(labels) > MAX_LABELS
        or not all(isinstance(x, str) and 0 < len(x) <= MAX_LABEL_CHARS for x in labels)
    ):
        raise invalid_field(
            "labels",
            f"must be a list of at most {MAX_LABELS} labels of 1-{MAX_LABEL_CHARS} characters",
        )
    return tuple(dict.fromkeys(labels))


def parse_rating(body: dict[str, Any]) -> Rating:
    reject_unknown(body, RATING_FIELDS)
    if "request_id" not in body:
        raise invalid_field("request_id", "is required: the x-request-id of the answer rated")
    request_id = parse_request_id(body["request_id"])
    given = body.get("rating")
    if given == "up":
        rating, score = 1, 0
    elif given == "down":
        rating, score = -1, 0
    elif isinstance(given, int) and not isinstance(given, bool) and 1 <= given <= 5:
        score = given
        rating = -1 if score <= 2 else (0 if score == 3 else 1)
    else:
        raise invalid_field("rating", 'must be "up", "down" or an integer score from 1 to 5')
    return Rating(
        request_id=request_id,
        rating=rating,
        score=score,
        labels=_labels(body),
        correction=_text(body, "correction", MAX_CORRECTION_CHARS),
        comment=_text(body, "comment", MAX_COMMENT_CHARS),
    )


def iso_ns(text: object) -> int | None:
    """ISO 8601 text with a zone, 1970-2261, as nanoseconds since the epoch; None for
    anything else (no zone, out of range, not a time)."""
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None or not 1970 <= moment.year < 2262:
        return None
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1_000


def moment_ns(value: Any, field: str) -> int | None:
    """ISO 8601 with a zone, or Unix seconds, as nanoseconds since the epoch."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value) or not 0 <= value < 2**33:
            raise invalid_field(field, "must be Unix seconds after 1970 and before 2242")
        return int(value * 1_000_000_000)
    found = iso_ns(value)
    if found is not None:
        return found
    raise invalid_field(field, "must be ISO 8601 with a time zone (1970-2261) or Unix seconds")


def parse_dataset_request(body: dict[str, Any]) -> dict[str, Any]:
    """A dataset build's body, normalized (times as ``since_ns``/``until_ns``)."""
    reject_unknown(body, DATASET_FIELDS)
    name = body.get("name")
    if not isinstance(name, str) or DATASET_NAME.fullmatch(name) is None:
        raise invalid_field("name", "is required: 1-64 lower-case letters, digits and ._- ")
    since, until = moment_ns(body.get("since"), "since"), moment_ns(body.get("until"), "until")
    if since is not None and until is not None and until <= since:
        raise invalid_field("until", "must be after since")
    min_rating = body.get("min_rating", 4)
    if isinstance(min_rating, bool) or not isinstance(min_rating, int) or not 1 <= min_rating <= 5:
        raise invalid_field("min_rating", "must be an integer from 1 to 5")
    spec: dict[str, Any] = {"name": name, "since_ns": since, "until_ns": until,
                            "min_rating": min_rating, "labels": list(_labels(body))}  # fmt: skip
    for field in ("model", "model_version"):
        value = body.get(field)
        if value is not None and (
            not isinstance(value, str) or not 0 < len(value) <= MAX_MODEL_CHARS
        ):
            raise invalid_field(field, f"must be text of 1-{MAX_MODEL_CHARS} characters")
        spec[field] = value
    for flag in ("corrections", "sources"):
        value = body.get(flag, True)
        if not isinstance(value, bool):
            raise invalid_field(flag, "must be true or false")
        spec[flag] = value
    fraction = body.get("eval_fraction", 0.1)
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not 0 <= fraction <= 0.5
    ):
        raise invalid_field("eval_fraction", "must be a number from 0 to 0.5")
    spec["eval_fraction"] = float(fraction)
    max_chars = body.get("max_chars", 32_000)
    if (
        isinstance(max_chars, bool)
        or not isinstance(max_chars, int)
        or not 100 <= max_chars <= 1_000_000
    ):
        raise invalid_field("max_chars", "must be an integer from 100 to 1000000")
    spec["max_chars"] = max_chars
    kind = body.get("kind", "chat")
    if kind not in DATASET_KINDS:
        raise invalid_field("kind", "must be 'chat' or 'preference' (pairs for dpo)")
    spec["kind"] = kind
    if kind == "preference" and min_rating <= 2:
        raise invalid_field(
            "min_rating", "must be 3-5 for preference pairs: 1-2 stars are the rejected side"
        )
    return spec
