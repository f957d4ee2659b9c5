"""The inference service's metrics: each chat replica's engine as its last status said.

The engines run in Ray Serve replicas, other processes than this service's; the service
asks a replica for its status every probe (:class:`services.inference.__main__.Readiness`)
and these instruments report the latest answer of each replica, labelled by its Serve tag
and model version. Counters (tokens, steps, busy seconds, prefix-cache lookups) count
since the replica started, so Prometheus' ``rate()`` gives tokens/s and, as
``rate(busy) / rate(steps)``, the mean engine step time. A replica not heard from for
three probes is dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation

from shared.instruments import get_meter

_meter = get_meter("meshllm.inference")

STALE_AFTER_PROBES = 3


class ReplicaStatuses:
    """The last status of each chat replica (``ChatService.status()`` plus ``replica``)."""

    def __init__(self, probe_interval_s: float, clock: Callable[[], float] = time.monotonic):
        self._statuses: dict[str, tuple[float, Mapping[str, Any]]] = {}
        self._stale_s = probe_interval_s * STALE_AFTER_PROBES
        self._clock = clock

    def note(self, status: Mapping[str, Any]) -> None:
        self._statuses[str(status.get("replica", "unknown"))] = (self._clock(), status)

    def current(self) -> Iterator[tuple[dict[str, str], Mapping[str, Any]]]:
        """(labels, status) of each replica heard from lately."""
        now = self._clock()
        for replica, (at, status) in list(self._statuses.items()):
            if now - at > self._stale_s:
                self._statuses.pop(replica, None)  # another thread may drop it too
                continue
            yield {"replica": replica, "model": str(status.get("model", ""))}, status


_reported: list[ReplicaStatuses] = []


def report(statuses: ReplicaStatuses) -> None:
    """Report ``statuses`` from now on (one set per process: the latest)."""
    _reported[:] = [statuses]


def _reader(read: Callable[[Mapping[str, Any]], float | None]) -> Callable[..., Any]:
    def observe(options: CallbackOptions) -> Iterator[Observation]:
        for statuses in _reported:
            for labels, status in statuses.current():
                value = read(status)
                if value is not None:
                    yield Observation(value, labels)

    return observe


def _engine(key: str) -> Callable[[Mapping[str, Any]], float | None]:
    def read(status: Mapping[str, Any]) -> float | None:
        value = (status.get("engine") or {}).get(key)
        return float(value) if value is not None else None

    return read


def _ratio(used: str, capacity: str) -> Callable[[Mapping[str, Any]], float | None]:
    def read(status: Mapping[str, Any]) -> float | None:
        engine = status.get("engine") or {}
        total = engine.get(capacity) or 0
        return float(engine.get(used, 0)) / total if total else None

    return read


_GAUGES = {
    "meshllm.inference.batch.active": (
        "{sequence}", "Sequences generating now (the engine's batch)",
        lambda s: float(s.get("active", 0)),
    ),
    "meshllm.inference.requests.waiting": (
        "{request}", "Requests accepted by the engine, not generating yet",
        lambda s: float(s.get("waiting", 0)),
    ),
    "meshllm.inference.kv_cache.usage": (
        "1", "Share of the engine's KV cache slots' tokens in use",
        _ratio("kv_used_tokens", "kv_capacity_tokens"),
    ),
}  # fmt: skip
_COUNTERS = {
    "meshllm.inference.tokens.generated": (
        "{token}", "Output tokens generated", "generated_tokens",
    ),
    "meshllm.inference.tokens.prefilled": (
        "{token}", "Prompt tokens computed (prefix-cache hits not included)", "prompt_tokens",
    ),
    "meshllm.inference.engine.steps": ("{step}", "Engine steps (one batch's token)", "steps"),
    "meshllm.inference.engine.busy": ("s", "Time the engine spent in steps", "busy_s"),
    "meshllm.inference.prefix_cache.lookups": (
        "{lookup}", "Prefix-cache lookups", "prefix_lookups",
    ),
    "meshllm.inference.prefix_cache.hits": ("{lookup}", "Prefix-cache hits", "prefix_hits"),
}  # fmt: skip

for _name, (_unit, _description, _read) in _GAUGES.items():
    _meter.create_observable_gauge(
        _name, callbacks=[_reader(_read)], unit=_unit, description=_description
    )
for _name, (_unit, _description, _key) in _COUNTERS.items():
    _meter.create_observable_counter(
        _name, callbacks=[_reader(_engine(_key))], unit=_unit, description=_description
    )
