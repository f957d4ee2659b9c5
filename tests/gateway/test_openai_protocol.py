"""The request contract shared by the gateway (public) and the inference service (internal)."""

from __future__ import annotations

from typing import Any

import pytest

from shared.openai_protocol import (
    MAX_NAME_LENGTH,
    InvalidRequestError,
    RateLimitError,
    parse_request,
)

CHAT: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}


def test_max_tokens_cap_is_internal() -> None:
    body = {**CHAT, "max_tokens_cap": 6}
    assert parse_request(body, "chat").max_tokens_cap == 6
    with pytest.raises(InvalidRequestError) as refused:
        parse_request(body, "chat", public=True)
    assert refused.value.param == "max_tokens_cap"


def test_token_id_prompts_are_internal() -> None:
    body = {"prompt": [[1, 2], "text"]}
    assert parse_request(body, "completion").prompts == ((1, 2), "text")
    with pytest.raises(InvalidRequestError) as refused:
        parse_request(body, "completion", public=True)
    assert refused.value.param == "prompt"


@pytest.mark.parametrize(
    ("seed", "runs_with"),
    [(0, 0), (2**63 - 1, 2**63 - 1), (-1, 2**63 - 1), (-(2**63), 0)],
)
def test_a_signed_64_bit_seed_runs_modulo_2_63(seed: int, runs_with: int) -> None:
    assert parse_request({**CHAT, "seed": seed}, "chat", public=True).seed == runs_with


def test_the_router_may_send_a_long_authenticated_subject_as_user() -> None:
    subject = "jwt:" + "s" * 400
    assert parse_request({**CHAT, "user": subject}, "chat").user == subject
    with pytest.raises(InvalidRequestError):
        parse_request({**CHAT, "user": "u" * (MAX_NAME_LENGTH + 1)}, "chat", public=True)


@pytest.mark.parametrize(("value", "off"), [(0, True), (0.0, True), (False, False), (1, False)])
def test_off_values_are_compared_with_their_json_type(value: object, off: bool) -> None:
    body = {**CHAT, "presence_penalty": value}
    if off:
        parse_request(body, "chat", public=True)
    else:
        with pytest.raises(InvalidRequestError):
            parse_request(body, "chat", public=True)


def test_errors_survive_pickling() -> None:
    import pickle

    error = RateLimitError("slow down", 2.5)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.status, copy.retry_after, copy.to_dict()) == (429, 3, error.to_dict())
