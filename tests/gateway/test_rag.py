"""The chat request's ``rag`` extension: what is accepted and how bad input is named."""

from __future__ import annotations

from typing import Any

import pytest

from services.gateway.rag import RagRequest, parse_rag
from shared.openai_protocol import InvalidRequestError


def test_absent_is_none_and_a_good_one_is_parsed() -> None:
    assert parse_rag(None) is None
    assert parse_rag({"collections": ["handbook", "it-faq", "handbook"], "top_k": 3}) == (
        RagRequest(("handbook", "it-faq"), 3)
    )


@pytest.mark.parametrize(
    ("value", "param"),
    [
        (["handbook"], "rag"),
        ({"collections": []}, "rag.collections"),
        ({"collections": "handbook"}, "rag.collections"),
        ({"collections": ["../etc"]}, "rag.collections"),
        ({"collections": ["a"] * 9}, "rag.collections"),
        ({"collections": ["handbook"], "top_k": 0}, "rag.top_k"),
        ({"collections": ["handbook"], "top_k": 17}, "rag.top_k"),
        ({"collections": ["handbook"], "top_k": True}, "rag.top_k"),
        ({"collections": ["handbook"], "filter": {}}, "rag.filter"),
    ],
)
def test_bad_rag_fields_are_named(value: Any, param: str) -> None:
    with pytest.raises(InvalidRequestError) as error:
        parse_rag(value)
    assert error.value.param == param
