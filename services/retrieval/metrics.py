"""The retrieval service's metrics: search and ingestion latency, by mode and outcome."""

from __future__ import annotations

from shared.instruments import get_meter
from shared.metrics import histogram

_meter = get_meter("meshllm.retrieval")
_search = histogram(
    _meter,
    "meshllm.retrieval.search.duration",
    unit="s",
    description="One knowledge-base search (embedding the query included), by mode",
)
_ingest = histogram(
    _meter,
    "meshllm.retrieval.ingest.duration",
    unit="s",
    description="One document ingested (parse, chunk, embed, index), by state",
)
_chunks = _meter.create_counter(
    "meshllm.retrieval.chunks.indexed",
    unit="{chunk}",
    description="Chunks indexed",
)


def searched(mode: str, seconds: float, error: str | None = None) -> None:
    """``mode``: one of the API's search modes (``parse_search`` refuses any other)."""
    attributes = {"mode": mode}
    if error is not None:
        attributes["error.type"] = error
    _search.record(seconds, attributes)


def ingested(state: str, seconds: float, chunks: int) -> None:
    _ingest.record(seconds, {"state": state})
    if chunks:
        _chunks.add(chunks)
