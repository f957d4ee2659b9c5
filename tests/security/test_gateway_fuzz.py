"""Fuzzing the gateway from its own OpenAPI document (schemathesis): no 5xx, no answer off
the document, and every body the document calls invalid refused.

The gateway is the real one (real keys, policy, limits, audit recorder, the broker) served
on a local port (see ``conftest.py``); requests it admits go over the broker to the real
router and are answered by the fake model server, capped at two words so thousands of
them fit the time budget. Each operation is fuzzed with valid bodies and parameters
(positive) and with invalid ones (negative, which must get a 4xx), sequentially, with a
fixed seed so a failure reproduces. Hypothesis' example database is off (its caches go to
``.hypothesis/``, which ignores itself).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.security.conftest import Edge

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.slow,
    pytest.mark.timeout(420),
    # schemathesis' strategies draw from `random`, which this hypothesis release warns about
    pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning"),
]

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
GENERATING = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
FORWARDED = {
    "POST /v1/kb/search",
    "GET /v1/kb/collections",
    "GET /v1/kb/collections/{collection}/documents",
    "GET /v1/kb/collections/{collection}/documents/{document_id}",
}
"""Routes whose fields past the gateway's own checks (query text, top_k, mode, paging) are
the retrieval service's to refuse, a stub here: invalid ones are sent, but their refusal
(negative_data_rejection) is not asked of the gateway."""
EXAMPLES = {"generating": 300, "other": 40}
"""Examples per operation and mode: 3 x 2 x 300 + 13 x 2 x 40 (less where a mode has none)."""
MIN_REQUESTS = 2000
TIME_BUDGET_S = 240.0


@dataclass
class Tally:
    statuses: Counter[int] = field(default_factory=Counter)
    per_operation: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.statuses.values())


def _fuzz(url: str, secret: str) -> Tally:
    """Every operation of the document, positive then negative (runs on a worker thread)."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    session = requests.Session()
    tally = Tally()
    for result in schema.get_all_operations():
        operation = result.ok()
        examples = EXAMPLES["generating" if operation.path in GENERATING else "other"]
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzz_operation(
                    operation, mode, examples, url=url, secret=secret, session=session, tally=tally
                )
            except Unsatisfiable:  # nothing invalid to send (no body, no parameters)
                continue
    return tally


def _fuzz_operation(
    operation: Any,
    mode: GenerationMode,
    examples: int,
    *,
    url: str,
    secret: str,
    session: requests.Session,
    tally: Tally,
) -> None:
    headers = {"authorization": f"Bearer {secret}"}
    label = f"{operation.label} {mode.value}"
    checks = [
        c for c in CHECKS if operation.label not in FORWARDED or c is not negative_data_rejection
    ]

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],  # a failure is reported unshrunk
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def call(case: schemathesis.Case) -> None:
        components = case.meta.components if case.meta else {}
        negative = {k for k, v in components.items() if v.mode is GenerationMode.NEGATIVE}
        if negative != {ParameterLocation.HEADER}:
            # the real key, unless a missing or malformed credential is all that is wrong
            # (sent as generated, it must get 401): a bad body must meet the field checks
            others = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
            case.headers = {**others, **headers}
        response = case.call(base_url=url, session=session, timeout=60)
        tally.statuses[response.status_code] += 1
        tally.per_operation[f"{label} {response.status_code}"] += 1
        case.validate_response(response, checks=checks)

    call()


async def test_the_gateway_survives_its_own_document(edge: Edge) -> None:
    edge.fake.behaviour.max_words = 2
    started = time.monotonic()
    try:
        # the gateway serves on this event loop; the fuzzer blocks, so it runs on a thread
        tally = await asyncio.to_thread(_fuzz, edge.url, edge.keys["admin"])
    finally:
        edge.fake.behaviour.max_words = None
    elapsed = time.monotonic() - started
    report: dict[str, Any] = {
        "requests": tally.total,
        "seconds": round(elapsed, 1),
        "statuses": dict(sorted(tally.statuses.items())),
        "operations": dict(tally.per_operation),
    }
    print(report)
    assert tally.total >= MIN_REQUESTS, report
    assert elapsed < TIME_BUDGET_S, report
    assert not [status for status in tally.statuses if status >= 500], report
    assert tally.statuses[200] > 0, report
    assert tally.statuses[400] > 0, report
