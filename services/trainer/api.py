"""The trainer's internal API: the gateway forwards here after its policy allowed the caller,
with the caller's tenant (and subject) fixed in the query.

Only the gateway's service identity may call it (401 without a known token, 403 for
another service).

Routes (JSON; errors as ``{"error": {...}}``):

- ``POST /v1/files?tenant=&subject=&filename=&purpose=``: the body is the file; 200 and the
  ``file`` object, or 400 naming the first bad line.
- ``GET /v1/files?tenant=&purpose=&limit=``, ``GET /v1/files/{id}?tenant=``,
  ``GET /v1/files/{id}/content?tenant=``, ``DELETE /v1/files/{id}?tenant=``.
- ``POST /v1/fine_tuning/jobs?tenant=&subject=`` with OpenAI's create body (and ours, see
  :mod:`services.trainer.jobs`): 200 and the job.
- ``GET /v1/fine_tuning/jobs?tenant=&limit=&after=``, ``GET /v1/fine_tuning/jobs/{id}``,
  ``GET .../{id}/events?limit=&after=``, ``GET .../{id}/checkpoints?limit=``,
  ``POST .../{id}/cancel``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.trainer.jobs import (
    FILE_ID,
    JOB_ID,
    checkpoint_json,
    event_json,
    file_json,
    job_json,
    parse_job_request,
)
from services.trainer.service import TrainerService
from shared.http_body import read_json_body
from shared.logging import get_logger
from shared.openai_protocol import (
    RequestTooLargeError,
    invalid_field,
    reject_unknown,
)
from shared.service_auth import ServiceGuard

log = get_logger(__name__)
CALLERS = frozenset({"gateway"})
MAX_PAGE = 100


def _tenant(params: Mapping[str, str]) -> str:
    tenant = params.get("tenant", "")
    if not tenant or len(tenant) > 128:
        raise invalid_field("tenant", "is required")
    return tenant


def _limit(params: Mapping[str, str], default: int = 20) -> int:
    limit = params.get("limit", str(default))
    if not limit.isascii() or not limit.isdigit() or not 1 <= int(limit) <= MAX_PAGE:
        raise invalid_field("limit", f"must be an integer from 1 to {MAX_PAGE}")
    return int(limit)


def _id(request: Request, name: str) -> str:
    value = str(request.path_params[name])
    pattern = FILE_ID if name == "file_id" else JOB_ID
    if pattern.fullmatch(value) is None:
        raise invalid_field(name, "is not an id this API gave")
    return value


def _step(params: Mapping[str, str]) -> int | None:
    """The step of a checkpoint id given as ``after`` (ftckpt-<job>-<step>)."""
    after = params.get("after")
    if after is None:
        return None
    tail = after.rsplit("-", 1)[-1]
    if not after.startswith("ftckpt-") or not tail.isascii() or not tail.isdigit():
        raise invalid_field("after", "is not a checkpoint id")
    return int(tail[:18])


class TrainerApi:
    def __init__(self, service: TrainerService, guard: ServiceGuard) -> None:
        self.service = service
        self.guard = guard

    def app(self) -> Starlette:
        def route(
            path: str, handler: Callable[[Request], Awaitable[Response]], method: str
        ) -> Route:
            return self.guard.route(path, handler, method, CALLERS, service="trainer")

        job = "/v1/fine_tuning/jobs/{job_id}"
        return Starlette(
            routes=[
                route("/v1/files", self.upload, "POST"),
                route("/v1/files", self.files, "GET"),
                route("/v1/files/{file_id}", self.file, "GET"),
                route("/v1/files/{file_id}", self.delete_file, "DELETE"),
                route("/v1/files/{file_id}/content", self.content, "GET"),
                route("/v1/fine_tuning/jobs", self.create_job, "POST"),
                route("/v1/fine_tuning/jobs", self.jobs, "GET"),
                route(job, self.job, "GET"),
                route(job + "/events", self.events, "GET"),
                route(job + "/checkpoints", self.checkpoints, "GET"),
                route(job + "/cancel", self.cancel, "POST"),
            ]
        )

    # ------------------------------------------------------------------ files

    async def upload(self, request: Request) -> Response:
        params = request.query_params
        reject_unknown(
            sorted(params), ("tenant", "subject", "filename", "purpose"), what="a query parameter"
        )
        tenant = _tenant(params)
        most = self.service.settings.max_file_bytes
        data = bytearray()
        async for piece in request.stream():
            data += piece
            if len(data) > most:
                raise RequestTooLargeError(f"the file is over {most} bytes")
        made = await self.service.add_file(
            tenant, params.get("subject", ""), params.get("filename", ""),
            params.get("purpose", ""), bytes(data),
        )  # fmt: skip
        return JSONResponse(made)

    async def files(self, request: Request) -> Response:
        params = request.query_params
        reject_unknown(sorted(params), ("tenant", "purpose", "limit"), what="a query parameter")
        rows = await self.service.store.files(
            _tenant(params), params.get("purpose"), _limit(params, MAX_PAGE)
        )
        return JSONResponse({"object": "list", "data": [file_json(r) for r in rows]})

    async def file(self, request: Request) -> Response:
        reject_unknown(sorted(request.query_params), ("tenant",), what="a query parameter")
        row = await self.service.file(_tenant(request.query_params), _id(request, "file_id"))
        return JSONResponse(file_json(row))

    async def content(self, request: Request) -> Response:
        reject_unknown(sorted(request.query_params), ("tenant",), what="a query parameter")
        tenant = _tenant(request.query_params)
        file_id = _id(request, "file_id")
        await self.service.file(tenant, file_id)
        data = self.service.file_path(tenant, file_id).read_bytes()
        return Response(data, media_type="application/jsonl")

    async def delete_file(self, request: Request) -> Response:
        reject_unknown(sorted(request.query_params), ("tenant",), what="a query parameter")
        tenant = _tenant(request.query_params)
        return JSONResponse(await self.service.delete_file(tenant, _id(request, "file_id")))

    # ------------------------------------------------------------------ jobs

    async def create_job(self, request: Request) -> Response:
        params = request.query_params
        reject_unknown(sorted(params), ("tenant", "subject"), what="a query parameter")
        body = await read_json_body(request, 64 * 1024, 30)
        checked = parse_job_request(body)
        made = await self.service.create_job(_tenant(params), params.get("subject", ""), checked)
        return JSONResponse(made)

    async def jobs(self, request: Request) -> Response:
        params = request.query_params
        reject_unknown(sorted(params), ("tenant", "limit", "after"), what="a query parameter")
        after = params.get("after")
        if after is not None and JOB_ID.fullmatch(after) is None:
            raise invalid_field("after", "is not a job id")
        limit = _limit(params)
        found = await self.service.store.jobs(_tenant(params), limit + 1, after)
        data = [job_json(j.values) for j in found[:limit]]
        return JSONResponse({"object": "list", "data": data, "has_more": len(found) > limit})

    async def job(self, request: Request) -> Response:
        reject_unknown(sorted(request.query_params), ("tenant",), what="a query parameter")
        found = await self.service.job(_tenant(request.query_params), _id(request, "job_id"))
        return JSONResponse(job_json(found.values))

    async def events(self, request: Request) -> Response:
        params = request.query_params
        reject_unknown(sorted(params), ("tenant", "limit", "after"), what="a query parameter")
        job = await self.service.job(_tenant(params), _id(request, "job_id"))
        after = params.get("after")
        seq = None
        if after is not None:
            tail = after.rsplit("-", 1)[-1]
            if not after.startswith("ftevent-") or not tail.isascii() or not tail.isdigit():
                raise invalid_field("after", "is not an event id")
            seq = int(tail[:18])
        limit = _limit(params)
        found = await self.service.store.events(job.id, limit + 1, seq)
        data = [event_json(job.id, e) for e in found[:limit]]
        return JSONResponse({"object": "list", "data": data, "has_more": len(found) > limit})

    async def checkpoints(self, request: Request) -> Response:
        params = request.query_params
        reject_unknown(sorted(params), ("tenant", "limit", "after"), what="a query parameter")
        job = await self.service.job(_tenant(params), _id(request, "job_id"))
        limit = _limit(params, 10)
        found = await self.service.store.checkpoints(job.id, limit + 1, _step(params))
        data = [checkpoint_json(job.values, c) for c in found[:limit]]
        body = {"object": "list", "data": data, "has_more": len(found) > limit}
        if data:
            body |= {"first_id": data[0]["id"], "last_id": data[-1]["id"]}
        return JSONResponse(body)

    async def cancel(self, request: Request) -> Response:
        reject_unknown(sorted(request.query_params), ("tenant",), what="a query parameter")
        tenant = _tenant(request.query_params)
        return JSONResponse(await self.service.cancel(tenant, _id(request, "job_id")))
