"""The feedback service's internal API: the gateway forwards here after its policy allowed the
caller, with the tenant the caller may see fixed in the query.

Only the gateway's service identity may call it (401 without a known token, 403 for
another service), so no other process that reaches the port reads a tenant's feedback; the
trainer's may read a dataset's split files (a fine-tuning job of that tenant trains on them).

Routes (JSON; errors as ``{"error": {...}}``):

- ``GET /v1/feedback?tenant=&request_id=|model=&model_version=&limit=&after=``: ratings,
  newest first; ``after`` is the previous page's ``next_cursor``.
- ``GET /v1/feedback/quality?tenant=&model=``: up-rate and correction rate per model
  version with their 95% Wilson intervals, over the tenant's ratings.
- ``DELETE /v1/feedback?tenant=&request_id=``: erase a request's content (see
  :meth:`FeedbackStore.erase`); answers the erasure report.
- ``POST /v1/datasets?tenant=`` with a dataset build body
  (:func:`shared.feedback_requests.parse_dataset_request`): 201 and the manifest.
- ``POST /v1/datasets/upload?tenant=&name=&eval_fraction=``: the body is a chat-format
  JSONL file; 201 and the manifest, or 400 naming the first bad line.
- ``GET /v1/datasets?tenant=``, ``GET /v1/datasets/{id}?tenant=``: manifests.
- ``GET /v1/datasets/{id}/files/{split}?tenant=``: the split as JSONL (``train``, ``eval``).
- ``POST /v1/datasets/{id}/used?tenant=&by=`` (the trainer only): a job or a model was
  trained on the dataset.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.feedback.datasets import SPLITS, DatasetFilters, DatasetSpec
from services.feedback.service import FeedbackService
from services.feedback.store import FeedbackQuery
from shared.feedback_requests import (
    DATASET_ID,
    parse_dataset_request,
    parse_request_id,
)
from shared.finetune_format import FormatError
from shared.http_body import read_json_body
from shared.logging import get_logger
from shared.openai_protocol import (
    InvalidRequestError,
    NotFoundError,
    OpenAIError,
    RequestTooLargeError,
    invalid_field,
    reject_unknown,
)
from shared.service_auth import ServiceGuard

log = get_logger(__name__)
CALLERS = frozenset({"gateway"})
DATASET_READERS = CALLERS | {"trainer"}  # a fine-tuning job reads its dataset's splits
TRAINER = frozenset({"trainer"})
USED_BY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,299}")
MAX_PAGE = 500
CURSOR_PARTS = 3
MAX_INT64 = 2**63 - 1


class ContentGone(OpenAIError):
    """410: the dataset's rows were deleted under retention (the manifest stays)."""

    status = 410
    error_type = "invalid_request_error"


def _tenant(params: Mapping[str, str]) -> str:
    tenant = params.get("tenant", "")
    if not tenant or len(tenant) > 128:
        raise invalid_field("tenant", "is required")
    return tenant


def _cursor(value: str | None) -> tuple[int, str, str] | None:
    if value is None:
        return None
    parts = value.split("~", CURSOR_PARTS - 1)  # a subject may hold "~"; the rest cannot
    number = parts[0]
    if len(parts) != CURSOR_PARTS or not number.isascii() or not number.isdigit():
        raise invalid_field("after", "is not a cursor this API gave")
    if len(number) > 19 or int(number) > MAX_INT64:
        raise invalid_field("after", "is not a cursor this API gave")
    return int(number), parts[1], parts[2]


def spec_of(tenant: str, body: Mapping[str, Any], max_rows: int) -> DatasetSpec:
    """A checked dataset build body as the spec :func:`build` takes."""
    checked = parse_dataset_request(dict(body))
    filters = DatasetFilters(
        since_ns=checked["since_ns"], until_ns=checked["until_ns"],
        min_rating=checked["min_rating"], model=checked["model"],
        model_version=checked["model_version"], labels=tuple(checked["labels"]),
        corrections=checked["corrections"], sources=checked["sources"],
    )  # fmt: skip
    return DatasetSpec(
        tenant=tenant, name=checked["name"], filters=filters,
        eval_fraction=checked["eval_fraction"], max_chars=checked["max_chars"], max_rows=max_rows,
        kind=checked["kind"],
    )  # fmt: skip


class FeedbackApi:
    def __init__(self, service: FeedbackService, guard: ServiceGuard) -> None:
        self.service = service
        self.store = service.store
        self.guard = guard

    def app(self) -> Starlette:
        def route(
            path: str,
            handler: Callable[[Request], Awaitable[Response]],
            method: str,
            callers: frozenset[str] = CALLERS,
        ) -> Route:
            return self.guard.route(path, handler, method, callers, service="feedback")

        return Starlette(
            routes=[
                route("/v1/feedback", self.list_feedback, "GET"),
                route("/v1/feedback", self.erase, "DELETE"),
                route("/v1/feedback/quality", self.quality, "GET"),
                route("/v1/datasets", self.build, "POST"),
                route("/v1/datasets/upload", self.upload, "POST"),
                route("/v1/datasets", self.datasets, "GET"),
                route("/v1/datasets/{dataset_id}", self.dataset, "GET"),
                route("/v1/datasets/{dataset_id}/files/{split}", self.file, "GET", DATASET_READERS),
                route("/v1/datasets/{dataset_id}/used", self.used, "POST", TRAINER),
            ]
        )

    async def list_feedback(self, request: Request) -> Response:
        params = request.query_params
        reject_unknown(
            sorted(params),
            ("tenant", "request_id", "model", "model_version", "subject", "limit", "after"),
            what="a query parameter",
        )
        limit = params.get("limit", "100")
        if not limit.isascii() or not limit.isdigit() or not 1 <= int(limit) <= MAX_PAGE:
            raise invalid_field("limit", f"must be an integer from 1 to {MAX_PAGE}")
        request_id = params.get("request_id")
        query = FeedbackQuery(
            tenant=_tenant(params),
            request_id=None if request_id is None else parse_request_id(request_id),
            model=params.get("model"),
            model_version=params.get("model_version"),
            subject=params.get("subject"),
            limit=int(limit),
            after=_cursor(params.get("after")),
        )
        found = await self.store.query(query)
        cursor = None
        if len(found) == query.limit:
            last = found[-1]
            cursor = f"{last.rated_at_ns}~{last.request_id}~{last.subject}"
        body = {"object": "list", "data": [e.to_json() for e in found], "next_cursor": cursor}
        return JSONResponse(body)

    async def quality(self, request: Request) -> Response:
        """Up-rate and correction rate per model version, with 95% Wilson intervals, over
        the tenant's ratings (the release gate's quality signal)."""
        params = request.query_params
        reject_unknown(sorted(params), ("tenant", "model"), what="a query parameter")
        rows = await self.store.quality(_tenant(params))
        model = params.get("model")
        data = [row.to_json() for row in rows if model is None or row.model == model]
        return JSONResponse({"object": "list", "data": data})

    async def erase(self, request: Request) -> Response:
        params = request.query_params
        reject_unknown(sorted(params), ("tenant", "request_id"), what="a query parameter")
        request_id = parse_request_id(params.get("request_id"))
        return JSONResponse(await self.service.erase(_tenant(params), request_id))

    async def build(self, request: Request) -> Response:
        params = request.query_params
        reject_unknown(sorted(params), ("tenant",), what="a query parameter")
        body = await read_json_body(request, 64 * 1024, 30)
        if not isinstance(body, dict):
            raise InvalidRequestError("the body must be a JSON object")
        spec = spec_of(_tenant(params), body, self.service.settings.max_dataset_rows)
        return JSONResponse(await self.service.build_dataset(spec), status_code=201)

    async def upload(self, request: Request) -> Response:
        params = request.query_params
        reject_unknown(
            sorted(params), ("tenant", "name", "eval_fraction"), what="a query parameter"
        )
        tenant = _tenant(params)
        body: dict[str, Any] = {"name": params.get("name")}
        if "eval_fraction" in params:
            try:
                body["eval_fraction"] = float(params["eval_fraction"])
            except ValueError:
                raise invalid_field("eval_fraction", "must be a number from 0 to 0.5") from None
        spec = spec_of(tenant, body, self.service.settings.max_dataset_rows)
        most = self.service.settings.max_upload_bytes
        data = bytearray()
        async for piece in request.stream():
            data += piece
            if len(data) > most:
                raise RequestTooLargeError(f"the file is over {most} bytes")
        try:
            made = await self.service.import_dataset(spec, bytes(data))
        except FormatError as error:
            raise invalid_field("file", str(error)) from None
        return JSONResponse(made, status_code=201)

    async def datasets(self, request: Request) -> Response:
        reject_unknown(sorted(request.query_params), ("tenant",), what="a query parameter")
        found = await self.store.datasets(_tenant(request.query_params))
        summaries = [{k: v for k, v in m.items() if k != "source_request_ids"} for m in found]
        return JSONResponse({"object": "list", "data": summaries})

    async def _manifest(self, request: Request) -> tuple[str, dict[str, Any]]:
        tenant = _tenant(request.query_params)
        dataset_id = request.path_params["dataset_id"]
        if DATASET_ID.fullmatch(dataset_id) is None:
            raise invalid_field("dataset_id", "is not a dataset id (<name>-v<version>)")
        found = await self.store.dataset(tenant, dataset_id)
        if found is None:
            raise NotFoundError(f"no dataset {dataset_id}", "dataset_id", "not_found")
        return tenant, found

    async def dataset(self, request: Request) -> Response:
        reject_unknown(sorted(request.query_params), ("tenant",), what="a query parameter")
        return JSONResponse((await self._manifest(request))[1])

    async def used(self, request: Request) -> Response:
        """The trainer took the dataset's rows for a job or a model (``by``): an erasure
        leaves its rows from now on and names ``by`` instead."""
        params = request.query_params
        reject_unknown(sorted(params), ("tenant", "by"), what="a query parameter")
        by = params.get("by", "")
        if USED_BY.fullmatch(by) is None:
            raise invalid_field("by", "must name a job or a model (name:version)")
        tenant, found = await self._manifest(request)
        marked = await self.store.mark_used(tenant, found["id"], by)
        assert marked is not None  # datasets are never deleted, only emptied
        return JSONResponse({"id": found["id"], "used_by": marked["used_by"]})

    async def file(self, request: Request) -> Response:
        reject_unknown(sorted(request.query_params), ("tenant",), what="a query parameter")
        split = request.path_params["split"]
        if split not in SPLITS:
            raise invalid_field("split", f"must be one of {', '.join(SPLITS)}")
        tenant, found = await self._manifest(request)
        if found.get("content_purged_at_ns"):
            raise ContentGone(
                f"the rows of {found['id']} were deleted under the tenant's retention; "
                "its manifest stays",
                "dataset_id",
                "content_purged",
            )
        lines = await self.store.lines(tenant, found["id"], split)
        text = "".join(line + "\n" for line in lines)
        return Response(text.encode(), media_type="application/jsonl")
