"""Two aiokafka adjustments the embedded broker needs; both are no-ops on Apache Kafka.

1. InitProducerId v3.

aiokafka 0.14 only speaks InitProducerId v0, which carries no producer id or
epoch. The embedded broker (Tansu) answers a v0 request from an idempotent
producer with UNKNOWN_SERVER_ERROR, so ``enable_idempotence=True`` fails there.
v3 (KIP-360) sends producer id and epoch as -1 for a fresh producer, which both
Tansu and Apache Kafka accept. The version is negotiated per connection, so a
broker that only knows v0 still gets v0.

2. Leaving a group at generation 0. Tansu numbers group generations from 0, Apache
Kafka from 1, and aiokafka only sends LeaveGroup when the generation is above 0.
So a consumer of a fresh group left without a word, and the next member to join
waited out the old member's session (about 7 s instead of 2 s on a restart).
"""

from __future__ import annotations

import logging
from typing import Any

import aiokafka.producer.sender as _sender
from aiokafka import errors as _errors
from aiokafka.consumer.group_coordinator import GroupCoordinator as _GroupCoordinator
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.group import LeaveGroupRequest
from aiokafka.protocol.transaction import InitProducerIdRequest_v0
from aiokafka.protocol.types import CompactString, Int16, Int32, Int64, Schema, TaggedFields

_log = logging.getLogger(__name__)


class InitProducerIdResponse_v3(Response):  # type: ignore[misc]
    API_KEY = 22
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("error_code", Int16),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("tags", TaggedFields),
    )


class InitProducerIdRequest_v3(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 22
    API_VERSION = 3
    RESPONSE_TYPE = InitProducerIdResponse_v3
    SCHEMA = Schema(
        ("transactional_id", CompactString("utf-8")),
        ("transaction_timeout_ms", Int32),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("tags", TaggedFields),
    )


class InitProducerIdRequest(Request[InitProducerIdRequest_v0 | InitProducerIdRequest_v3]):  # type: ignore[misc]
    API_KEY = 22

    def __init__(self, transactional_id: str | None, transaction_timeout_ms: int) -> None:
        self._transactional_id = transactional_id
        self._transaction_timeout_ms = transaction_timeout_ms

    def build(self, request_struct_class: Any) -> Any:
        if request_struct_class is InitProducerIdRequest_v3:
            return request_struct_class(
                self._transactional_id, self._transaction_timeout_ms, -1, -1, {}
            )
        return request_struct_class(self._transactional_id, self._transaction_timeout_ms)


async def _leave_group(self: Any) -> None:
    # Same as aiokafka's own, with "generation >= 0" for "generation > 0".
    if self.generation >= 0 and self.member_id and self._group_instance_id is None:
        try:
            await self._send_req(LeaveGroupRequest(self.group_id, self.member_id))
        except _errors.KafkaError as error:
            _log.warning("LeaveGroup failed: %s", error)
    self.reset_generation()


def install() -> None:
    """Apply both adjustments (idempotent: safe to call more than once)."""
    _sender.InitProducerIdRequest = InitProducerIdRequest
    _GroupCoordinator._maybe_leave_group = _leave_group
