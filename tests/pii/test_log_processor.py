"""The structlog processor: PII in event values is redacted before any renderer sees it."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog
from pydantic import SecretStr

from shared.pii import PiiLogProcessor, PiiMode, PiiPolicy, Purpose, TenantPiiSettings

SECRET = "acme-secret-0123456789abcdef"


def json_logger(
    processor: PiiLogProcessor, out: io.StringIO
) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.wrap_logger(
        structlog.PrintLogger(out),
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            processor,
            structlog.processors.JSONRenderer(),
        ],
    )
    return logger


@pytest.fixture
def clean_contextvars() -> Iterator[None]:
    structlog.contextvars.clear_contextvars()
    yield
    structlog.contextvars.clear_contextvars()


def test_event_values_are_redacted_nested_and_in_the_message() -> None:
    out = io.StringIO()
    log = json_logger(PiiLogProcessor(), out)
    log.info(
        "user 13812345678 logged in",
        email="zhang@example.com",
        request={"ip": "36.110.2.7", "history": ["call 13912345678"]},
        phone_number=13712345678,
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        tokens=42,
    )
    line = json.loads(out.getvalue())
    assert line["event"] == "user [PHONE:***5678] logged in"
    assert line["email"] == "[EMAIL:z***@example.com]"
    assert line["request"] == {"ip": "[IP_ADDRESS:36.110.*.*]", "history": ["call [PHONE:***5678]"]}
    assert line["phone_number"] == "[PHONE:***5678]"
    assert line["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert line["tokens"] == 42
    assert line["level"] == "info"


def test_objects_are_redacted_through_their_string() -> None:
    class Customer:
        def __str__(self) -> str:
            return "Customer(phone=13812345678)"

    event = PiiLogProcessor()(None, "info", {"event": "x", "customer": Customer(), "n": 1.5})
    assert event == {"event": "x", "customer": "Customer(phone=[PHONE:***5678])", "n": 1.5}


def test_the_tenant_of_the_event_picks_the_policy(clean_contextvars: None) -> None:
    settings = TenantPiiSettings(
        tenants={
            "acme": {Purpose.LOGS: PiiPolicy(default_mode=PiiMode.TOKENIZE, key="acme")},
            "trusted": {Purpose.LOGS: PiiPolicy(enabled=False)},
        },
        keys={"acme": SecretStr(SECRET)},
    )
    out = io.StringIO()
    log = json_logger(PiiLogProcessor(settings), out)
    structlog.contextvars.bind_contextvars(tenant="acme")
    log.info("call 13812345678")
    structlog.contextvars.bind_contextvars(tenant="trusted")
    log.info("call 13812345678")
    log.info("call 13812345678", tenant="globex")
    acme, trusted, globex = [json.loads(line) for line in out.getvalue().splitlines()]
    assert acme["event"].startswith("call [PHONE:tok_")
    assert acme["tenant"] == "acme"
    assert trusted["event"] == "call 13812345678"
    assert globex["event"] == "call [PHONE:***5678]"  # no override: the default policy masks


def test_stdlib_records_are_redacted_through_the_foreign_pre_chain() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_log_level, PiiLogProcessor()],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    logger = logging.getLogger("tests.pii.stdlib")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning("refund to card %s", "6222021234567890128")
    finally:
        logger.removeHandler(handler)
    assert json.loads(out.getvalue())["event"] == "refund to card [BANK_CARD:***0128]"
