"""The audit store in OpenSearch (cluster mode).

Indices (``<prefix>`` from the settings, ``meshllm-audit`` by default):

- ``<prefix>-records``: one document per record, ``_id`` = event id, written with
  ``op_type=create`` so an event id can never be stored twice; the same fields as the SQLite
  table (``event`` base64, ``leaf_hash`` and ``seal`` hex).
- ``<prefix>-journal``: one document per appended batch, ``_id`` = the batch number (0, 1, 2,
  ... zero-padded), holding ``first_index``, ``count`` and, until the batch is applied, its
  events.
- ``<prefix>-checkpoints``, ``<prefix>-purges``, ``<prefix>-meta`` (the log id).

How leaf indices stay contiguous without transactions: OpenSearch writes one document
atomically, not a batch. So a batch is first *claimed* by creating its journal document (one
atomic write, ``op_type=create``): it takes the next batch number and the leaf indices
``[first_index, first_index + count)``, the previous batch's end. Then its records are created
(bulk, idempotent: a record already there with the same index is fine) and the journal
document is overwritten with the same numbers minus the events ("applied"). A crash or error
between claim and apply leaves a pending journal document, which the next ``append`` (or the
next process to open the store) applies first, with the indices it claimed; the redelivered
events then find their records. So a batch is all or nothing from the caller's view: when
``append`` returns, every record is durable (OpenSearch fsyncs its translog per request by
default); when it raises, the batch's records appear once it is retried.

Writers: the audit service runs one writer per log (one consumer of ``audit.events`` owns the
log). A second writer cannot corrupt the sequence: batch numbers are claimed with
``op_type=create``, so of two writers claiming the same number one gets a conflict; it then
re-reads the journal (applying what is pending, so its duplicate check sees every claimed
event) and tries once more, and raises :class:`ConcurrentWriterError` if it loses again.

Times are queried on ``occurred_at_us`` (microseconds): a query's bounds are datetimes, which
have microseconds, and doubles hold microsecond epochs exactly, where some
OpenSearch-compatible servers compare longs as doubles. A purge cut-off that is not a whole
microsecond keeps the records of its last microsecond.

Reads are near real time: a query sees an append after the index refreshes (1 s by default)
unless the store was opened with ``refresh=True`` (tests), which waits for it.

One module (~600 lines): the OpenSearch back end of :class:`~services.audit.store.
AuditStore`, as :mod:`services.audit.sqlite_store` is the SQLite one; its journal and
recovery only make sense together.
"""

from __future__ import annotations

import base64
import contextlib
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from opensearchpy import OpenSearch
from opensearchpy.exceptions import ConflictError, NotFoundError, RequestError, TransportError
from opensearchpy.helpers import bulk

from services.audit.checkpoint import Checkpoint, validate_log_id
from services.audit.records import (
    AppendResult,
    AuditQuery,
    AuditRecord,
    Page,
    ParsedEvent,
    PurgeRecord,
    Sealer,
    to_ns,
)
from services.audit.store import (
    AppendInput,
    AuditStore,
    ConcurrentWriterError,
    StoreError,
    parse_all,
)

SCHEMA_VERSION = 1
_PAGE = 5_000
_KEYWORD = {"type": "keyword"}
_LONG = {"type": "long"}
_STORED = {"type": "keyword", "index": False, "doc_values": False}
_MAPPINGS: dict[str, dict[str, Any]] = {
    "records": {
        "dynamic": "strict",
        "properties": {
            "leaf_index": _LONG,
            "event_id": _KEYWORD,
            "request_id": _KEYWORD,
            "tenant": _KEYWORD,
            "api_key_id": _KEYWORD,
            "user": _KEYWORD,
            "model": _KEYWORD,
            "model_version": _KEYWORD,
            "kind": _KEYWORD,
            "occurred_at_ns": _LONG,
            "occurred_at_us": _LONG,
            "appended_at_ns": _LONG,
            "event": {"type": "binary"},
            "leaf_hash": _STORED,
            "seal": _STORED,
            "purged_at_ns": _LONG,
        },
    },
    "journal": {
        "properties": {
            "batch": _LONG,
            "first_index": _LONG,
            "count": _LONG,
            "applied": {"type": "boolean"},
            "appended_at_ns": _LONG,
            "events": {"type": "object", "enabled": False},
        },
    },
    "checkpoints": {
        "properties": {
            "log_id": _KEYWORD,
            "tree_size": _LONG,
            "timestamp_ns": _LONG,
            "root_hash": _STORED,
            "key_id": _KEYWORD,
            "signature": _STORED,
        },
    },
    "purges": {
        "properties": {
            "tenant": _KEYWORD,
            "before_ns": _LONG,
            "purged_at_ns": _LONG,
            "count": _LONG,
        },
    },
    "meta": {"properties": {"log_id": _KEYWORD, "schema_version": _LONG}},
}


def _record_doc(event: ParsedEvent, leaf_index: int, appended_at: int, seal: str | None) -> Any:
    return {
        "leaf_index": leaf_index,
        "event_id": event.event_id,
        "request_id": event.request_id,
        "tenant": event.tenant,
        "api_key_id": event.api_key_id,
        "user": event.user,
        "model": event.model,
        "model_version": event.model_version,
        "kind": event.kind,
        "occurred_at_ns": event.occurred_at_ns,
        "occurred_at_us": event.occurred_at_ns // 1_000,
        "appended_at_ns": appended_at,
        "event": base64.b64encode(event.raw).decode(),
        "leaf_hash": event.leaf_hash.hex(),
        "seal": seal,
    }


def _record(source: dict[str, Any]) -> AuditRecord:
    raw = source.get("event")
    seal = source.get("seal")
    return AuditRecord(
        leaf_index=int(source["leaf_index"]),
        event_id=source["event_id"],
        request_id=source.get("request_id", ""),
        tenant=source.get("tenant", ""),
        api_key_id=source.get("api_key_id", ""),
        user=source.get("user", ""),
        model=source.get("model", ""),
        model_version=source.get("model_version", ""),
        kind=source.get("kind", ""),
        occurred_at_ns=int(source["occurred_at_ns"]),
        appended_at_ns=int(source["appended_at_ns"]),
        raw=None if raw is None else base64.b64decode(raw),
        leaf_hash=bytes.fromhex(source["leaf_hash"]),
        seal=None if not seal else bytes.fromhex(seal),
        purged_at_ns=source.get("purged_at_ns"),
    )


def _checkpoint(source: dict[str, Any]) -> Checkpoint:
    return Checkpoint(
        log_id=source["log_id"],
        tree_size=int(source["tree_size"]),
        root_hash=bytes.fromhex(source["root_hash"]),
        timestamp_ns=int(source["timestamp_ns"]),
        key_id=source["key_id"],
        signature=base64.b64decode(source["signature"]),
    )


class OpenSearchAuditStore(AuditStore):
    """The audit store in OpenSearch indices (see the module notes). Thread-safe."""

    def __init__(
        self,
        client: OpenSearch,
        *,
        index_prefix: str = "meshllm-audit",
        create: bool = True,
        refresh: bool = False,
        log_id: str | None = None,
    ) -> None:
        """Use ``client``'s cluster; ``create`` makes the indices when missing.

        Raises:
            StoreError: the cluster cannot be reached, or (``create`` False) holds no store.
        """
        self._client = client
        self._prefix = index_prefix
        self._refresh: bool | str = "wait_for" if refresh else False
        self._lock = threading.RLock()
        self._next_batch = 0
        self._next_index = 0
        self._dirty = True
        try:
            if create:
                self._create_indices(log_id)
            meta = self._client.get(index=self._index("meta"), id="log")
        except NotFoundError:
            raise StoreError(f"no audit store in OpenSearch under {index_prefix}-*") from None
        except TransportError as error:
            raise StoreError(f"OpenSearch: {error}") from None
        self.log_id: str = meta["_source"]["log_id"]

    @classmethod
    def connect(
        cls,
        hosts: Sequence[str],
        *,
        index_prefix: str = "meshllm-audit",
        username: str | None = None,
        password: str | None = None,
        verify_certs: bool = True,
        create: bool = True,
        refresh: bool = False,
    ) -> OpenSearchAuditStore:
        auth = (username, password) if username is not None and password is not None else None
        client = OpenSearch(
            hosts=list(hosts), http_auth=auth, verify_certs=verify_certs, timeout=30
        )
        return cls(client, index_prefix=index_prefix, create=create, refresh=refresh)

    def _index(self, name: str) -> str:
        return f"{self._prefix}-{name}"

    def _create_indices(self, log_id: str | None) -> None:
        for name, mappings in _MAPPINGS.items():
            index = self._index(name)
            if self._client.indices.exists(index=index):
                continue
            try:
                self._client.indices.create(index=index, body={"mappings": mappings})
            except RequestError as error:  # made meanwhile by another process
                if "already_exists" not in str(error.error):
                    raise
        new_id = validate_log_id(log_id or f"meshllm-audit/{uuid.uuid4().hex}")
        with contextlib.suppress(ConflictError):  # the log exists: keep its id
            self._client.index(
                index=self._index("meta"),
                id="log",
                body={"log_id": new_id, "schema_version": SCHEMA_VERSION},
                op_type="create",
                refresh="wait_for",
            )

    def close(self) -> None:
        self._client.close()

    # -- appending -------------------------------------------------------------------------

    def append(
        self, events: Sequence[AppendInput], *, seal: Sealer | None = None
    ) -> list[AppendResult]:
        parsed = parse_all(events)
        with self._lock:
            try:
                for attempt in range(2):
                    if self._dirty:
                        self._recover()
                    try:
                        return self._append(parsed, seal)
                    except ConflictError:
                        self._dirty = True
                        if attempt:
                            raise ConcurrentWriterError(
                                "another writer keeps claiming the same audit batches"
                            ) from None
            except TransportError as error:
                self._dirty = True
                raise StoreError(f"OpenSearch: {error}") from None
        raise AssertionError("unreachable")

    def _append(self, parsed: list[ParsedEvent], seal: Sealer | None) -> list[AppendResult]:
        found = self._client.mget(
            index=self._index("records"),
            body={"ids": list(dict.fromkeys(event.event_id for event in parsed))},
            _source_includes=["leaf_index", "leaf_hash"],
        )
        stored = {
            doc["_id"]: (int(doc["_source"]["leaf_index"]), doc["_source"]["leaf_hash"])
            for doc in found["docs"]
            if doc.get("found")
        }
        assigned: dict[str, int] = {}
        new: list[ParsedEvent] = []
        for event in parsed:
            if event.event_id not in stored and event.event_id not in assigned:
                assigned[event.event_id] = self._next_index + len(new)
                new.append(event)
        if new:
            self._claim_and_apply(new, seal)
        results = []
        for event in parsed:
            if event.event_id in stored:
                index, leaf = stored[event.event_id]
                results.append(
                    AppendResult(event.event_id, index, False, leaf != event.leaf_hash.hex())
                )
            else:
                index = assigned[event.event_id]
                stored[event.event_id] = (index, event.leaf_hash.hex())
                results.append(AppendResult(event.event_id, index, True))
        return results

    def _claim_and_apply(self, new: list[ParsedEvent], seal: Sealer | None) -> None:
        first, batch = self._next_index, self._next_batch
        appended_at = time.time_ns()
        journal = {
            "batch": batch,
            "first_index": first,
            "count": len(new),
            "applied": False,
            "appended_at_ns": appended_at,
            "events": [
                {
                    "event": base64.b64encode(event.raw).decode(),
                    "seal": seal(first + offset, event.leaf_hash).hex() if seal else None,
                }
                for offset, event in enumerate(new)
            ],
        }
        self._client.index(
            index=self._index("journal"), id=f"{batch:020d}", body=journal, op_type="create"
        )
        self._next_batch, self._next_index = batch + 1, first + len(new)
        self._dirty = True  # until applied: a failure below is finished by _recover
        self._apply(journal)
        self._dirty = False

    def _apply(self, journal: dict[str, Any]) -> None:
        """Create the records a claimed batch names (idempotent), then mark it applied."""
        first, appended_at = int(journal["first_index"]), int(journal["appended_at_ns"])
        parsed = parse_all([base64.b64decode(item["event"]) for item in journal["events"]])
        actions = [
            {
                "_op_type": "create",
                "_index": self._index("records"),
                "_id": event.event_id,
                "_source": _record_doc(event, first + offset, appended_at, item["seal"]),
            }
            for offset, (event, item) in enumerate(zip(parsed, journal["events"], strict=True))
        ]
        offsets = {event.event_id: offset for offset, event in enumerate(parsed)}
        _, errors = bulk(self._client, actions, raise_on_error=False, refresh=self._refresh)
        for error in errors if isinstance(errors, list) else []:
            detail = error.get("create", {})
            if detail.get("status") != 409:
                raise StoreError(f"OpenSearch refused audit record {detail.get('_id')}: {detail}")
            expected = first + offsets[detail["_id"]]
            existing = self._client.get(index=self._index("records"), id=detail["_id"])
            if int(existing["_source"]["leaf_index"]) != expected:
                raise StoreError(
                    f"audit log corrupt: event {detail['_id']} claimed leaf {expected} in batch "
                    f"{journal['batch']} but is stored at {existing['_source']['leaf_index']}"
                )
        applied = {key: value for key, value in journal.items() if key != "events"}
        applied["applied"] = True
        self._client.index(
            index=self._index("journal"),
            id=f"{int(journal['batch']):020d}",
            body=applied,
            refresh=self._refresh,
        )

    def _recover(self) -> None:
        """Re-read where the journal ends and apply every batch claimed but not applied."""
        journal = self._index("journal")
        self._client.indices.refresh(index=journal)
        last = self._search(journal, {"match_all": {}}, [{"batch": "desc"}], size=1)
        if last:
            source = last[0]["_source"]
            self._next_batch = int(source["batch"]) + 1
            self._next_index = int(source["first_index"]) + int(source["count"])
        else:
            self._next_batch = self._next_index = 0
        pending = self._search(journal, {"term": {"applied": False}}, [{"batch": "asc"}], _PAGE)
        for hit in pending:
            self._apply(hit["_source"])
        self._dirty = False

    # -- reading ---------------------------------------------------------------------------

    def _search(
        self,
        index: str,
        query: dict[str, Any],
        sort: list[dict[str, str]],
        size: int,
        *,
        search_after: list[Any] | None = None,
        source: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        body: dict[str, Any] = {"query": query, "sort": sort, "size": size}
        if search_after is not None:
            body["search_after"] = search_after
        if source is not None:
            body["_source"] = source
        hits: list[dict[str, Any]] = self._client.search(index=index, body=body)["hits"]["hits"]
        return hits

    def _scan(
        self,
        index: str,
        query: dict[str, Any],
        sort_field: str,
        source: list[str] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Every hit of ``query`` by ``sort_field`` ascending, a page at a time."""
        self._client.indices.refresh(index=index)
        after: list[Any] | None = None
        while True:
            hits = self._search(
                index, query, [{sort_field: "asc"}], _PAGE, search_after=after, source=source
            )
            for hit in hits:
                yield hit["_source"]
            if len(hits) < _PAGE:
                return
            after = hits[-1]["sort"]

    def size(self) -> int:
        index = self._index("records")
        self._client.indices.refresh(index=index)
        reply = self._client.search(
            index=index, body={"size": 0, "aggs": {"last": {"max": {"field": "leaf_index"}}}}
        )
        last = reply["aggregations"]["last"]["value"]
        return 0 if last is None else int(last) + 1

    def leaf_hashes(self, start: int = 0) -> Iterator[tuple[int, bytes]]:
        query = {"range": {"leaf_index": {"gte": start}}}
        for source in self._scan(
            self._index("records"), query, "leaf_index", ["leaf_index", "leaf_hash"]
        ):
            yield int(source["leaf_index"]), bytes.fromhex(source["leaf_hash"])

    def records(self, start: int = 0, end: int | None = None) -> Iterator[AuditRecord]:
        bounds: dict[str, int] = {"gte": start}
        if end is not None:
            bounds["lt"] = end
        query = {"range": {"leaf_index": bounds}}
        for source in self._scan(self._index("records"), query, "leaf_index"):
            yield _record(source)

    def get(self, leaf_index: int) -> AuditRecord | None:
        hits = self._search(
            self._index("records"), {"term": {"leaf_index": leaf_index}}, [], size=1
        )
        return _record(hits[0]["_source"]) if hits else None

    def get_by_event_id(self, event_id: str) -> AuditRecord | None:
        try:
            doc = self._client.get(index=self._index("records"), id=event_id)
        except NotFoundError:
            return None
        return _record(doc["_source"])

    def query(self, query: AuditQuery) -> Page:
        filters: list[dict[str, Any]] = [
            {"term": {field: value}} for field, value in query.equalities().items()
        ]
        times: dict[str, int] = {}  # datetimes have microseconds: exact on the µs field
        if query.since is not None:
            times["gte"] = to_ns(query.since) // 1_000
        if query.until is not None:
            times["lt"] = to_ns(query.until) // 1_000
        if times:
            filters.append({"range": {"occurred_at_us": times}})
        if query.after is not None:
            bound = "lt" if query.descending else "gt"
            filters.append({"range": {"leaf_index": {bound: query.after}}})
        order = "desc" if query.descending else "asc"
        hits = self._search(
            self._index("records"),
            {"bool": {"filter": filters}},
            [{"leaf_index": order}],
            query.limit + 1,
        )
        records = [_record(hit["_source"]) for hit in hits[: query.limit]]
        more = len(hits) > query.limit
        return Page(records, records[-1].leaf_index if more else None)

    # -- checkpoints -----------------------------------------------------------------------

    def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        self._client.index(
            index=self._index("checkpoints"),
            id=f"{checkpoint.tree_size:020d}-{checkpoint.timestamp_ns}-{checkpoint.key_id}",
            body={
                "log_id": checkpoint.log_id,
                "tree_size": checkpoint.tree_size,
                "timestamp_ns": checkpoint.timestamp_ns,
                "root_hash": checkpoint.root_hash.hex(),
                "key_id": checkpoint.key_id,
                "signature": base64.b64encode(checkpoint.signature).decode(),
            },
            op_type="create",
            refresh="wait_for",
        )

    def checkpoints(self) -> list[Checkpoint]:
        found = [
            _checkpoint(source)
            for source in self._scan(self._index("checkpoints"), {"match_all": {}}, "tree_size")
        ]
        found.sort(key=lambda c: (c.tree_size, c.timestamp_ns))
        return found

    def latest_checkpoint(self) -> Checkpoint | None:
        hits = self._search(
            self._index("checkpoints"),
            {"match_all": {}},
            [{"tree_size": "desc"}, {"timestamp_ns": "desc"}],
            size=1,
        )
        return _checkpoint(hits[0]["_source"]) if hits else None

    def checkpoint_at(self, tree_size: int) -> Checkpoint | None:
        hits = self._search(
            self._index("checkpoints"),
            {"term": {"tree_size": tree_size}},
            [{"timestamp_ns": "desc"}],
            size=1,
        )
        return _checkpoint(hits[0]["_source"]) if hits else None

    # -- retention -------------------------------------------------------------------------

    def tenants(self) -> list[str]:
        index = self._index("records")
        self._client.indices.refresh(index=index)
        reply = self._client.search(
            index=index,
            body={"size": 0, "aggs": {"tenants": {"terms": {"field": "tenant", "size": 65_536}}}},
        )
        return sorted(bucket["key"] for bucket in reply["aggregations"]["tenants"]["buckets"])

    def purge(self, tenant: str, before_ns: int, *, now_ns: int | None = None) -> int:
        now_ns = time.time_ns() if now_ns is None else now_ns
        query = {
            "bool": {
                "filter": [
                    {"term": {"tenant": tenant}},
                    {"range": {"occurred_at_us": {"lt": before_ns // 1_000}}},
                ],
                "must_not": [{"exists": {"field": "purged_at_ns"}}],
            }
        }
        erased = {"event": None, "request_id": "", "api_key_id": "", "user": ""}
        count = 0
        with self._lock:
            ids = [
                source["event_id"]
                for source in self._scan(
                    self._index("records"), query, "leaf_index", ["event_id", "leaf_index"]
                )
            ]
            for start in range(0, len(ids), _PAGE):
                actions = [
                    {
                        "_op_type": "update",
                        "_index": self._index("records"),
                        "_id": event_id,
                        "doc": {**erased, "purged_at_ns": now_ns},
                    }
                    for event_id in ids[start : start + _PAGE]
                ]
                done, _ = bulk(self._client, actions, refresh=self._refresh)
                count += done
            if count:
                self._client.index(
                    index=self._index("purges"),
                    body={
                        "tenant": tenant,
                        "before_ns": before_ns,
                        "purged_at_ns": now_ns,
                        "count": count,
                    },
                    refresh="wait_for",
                )
        return count

    def purges(self) -> list[PurgeRecord]:
        return [
            PurgeRecord(s["tenant"], int(s["before_ns"]), int(s["purged_at_ns"]), int(s["count"]))
            for s in self._scan(self._index("purges"), {"match_all": {}}, "purged_at_ns")
        ]
