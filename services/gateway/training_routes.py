"""OpenAI's Files and Fine-tuning APIs at the gateway, forwarded to the trainer service.

- ``POST /v1/files`` (multipart: ``file``, ``purpose=fine-tune``): ``create`` on
  ``training_job`` (uploading training data is the first step of creating a job; a caller
  the policy would refuse is refused before its body is read, and the body has
  ``training.upload_timeout_s`` to arrive); ``GET
  /v1/files``, ``/v1/files/{id}``, ``/v1/files/{id}/content``: ``read``; ``DELETE
  /v1/files/{id}``: ``create`` (who may upload may take it back).
- ``POST /v1/fine_tuning/jobs``: ``create`` (and ``dataset read`` when it trains on a
  feedback dataset); ``GET /v1/fine_tuning/jobs[/{id}[/events|/checkpoints]]``: ``read``;
  ``POST /v1/fine_tuning/jobs/{id}/cancel``: ``cancel``.

A body is checked here first (400 naming the field, before anything is charged), then the
key and tenant are charged one request, then the policy decides (audited); only then is
anything forwarded, with the caller's tenant fixed. The file's lines are checked by the
trainer (400 naming the line).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message

from services.gateway.auth import Principal
from services.gateway.route_guard import RouteGuard, relay
from services.gateway.settings import TrainingRouteSettings
from shared.http_body import read_json_body
from shared.openai_protocol import (
    InvalidRequestError,
    RequestTimeoutError,
    RequestTooLargeError,
    ServiceUnavailableError,
    invalid_field,
    reject_unknown,
)
from shared.training_requests import FILE_ID, JOB_ID, parse_job_request

PURPOSE = "fine-tune"
CHUNK = 1 << 20


class TrainingRoutes:
    def __init__(
        self, *, settings: TrainingRouteSettings, guard: RouteGuard, headers: dict[str, str]
    ) -> None:
        """``headers`` name the gateway to the trainer."""
        self.settings = settings
        self.guard = guard
        self._client = httpx.AsyncClient(timeout=60, headers=headers)

    def routes(self) -> list[Route]:
        limited = self.guard.limited
        job = "/v1/fine_tuning/jobs/{job_id}"
        return [
            Route("/v1/files", limited(self.upload), methods=["POST"]),
            Route("/v1/files", limited(self.files), methods=["GET"]),
            Route("/v1/files/{file_id}", limited(self.file), methods=["GET"]),
            Route("/v1/files/{file_id}", limited(self.delete_file), methods=["DELETE"]),
            Route("/v1/files/{file_id}/content", limited(self.content), methods=["GET"]),
            Route("/v1/fine_tuning/jobs", limited(self.create_job), methods=["POST"]),
            Route("/v1/fine_tuning/jobs", limited(self.jobs), methods=["GET"]),
            Route(job, limited(self.job), methods=["GET"]),
            Route(job + "/events", limited(self.job_part), methods=["GET"]),
            Route(job + "/checkpoints", limited(self.job_part), methods=["GET"]),
            Route(job + "/cancel", limited(self.cancel), methods=["POST"]),
        ]

    async def _allow(self, request: Request, principal: Principal, action: str) -> None:
        await self.guard.charge(principal, request)
        await self.guard.allow(request, principal, "training_job", action, None, label="training")

    # ------------------------------------------------------------------ files

    async def upload(self, request: Request, principal: Principal) -> Response:
        reject_unknown(sorted(request.query_params), (), what="a query parameter here")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise InvalidRequestError("send the file as multipart/form-data (file, purpose)")
        most = self.settings.max_file_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > most + CHUNK:
            raise RequestTooLargeError(f"the file is over {most} bytes")
        if not await self.guard.permits(request, principal, "training_job", "create"):
            await self._allow(request, principal, "create")  # charged and audited: a 403
        try:
            async with asyncio.timeout(self.settings.upload_timeout_s):
                form = await _capped(request, most + CHUNK).form(
                    max_files=1, max_fields=4, max_part_size=64 * 1024
                )
        except TimeoutError:
            raise RequestTimeoutError(
                f"the file did not arrive within {self.settings.upload_timeout_s:g} s"
            ) from None
        except HTTPException as error:  # a malformed multipart body
            raise InvalidRequestError(f"not a multipart form: {error.detail}") from None
        try:
            reject_unknown(sorted(form), ("file", "purpose"), what="a form field")
            purpose = form.get("purpose")
            if purpose != PURPOSE:
                raise invalid_field("purpose", "must be 'fine-tune'")
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise invalid_field("file", "is required (a JSONL file)")
            filename = upload.filename or "upload.jsonl"
            if len(filename) > 255:
                raise invalid_field("file", "the file name is over 255 characters")
            await self._allow(request, principal, "create")
            params = {"tenant": principal.tenant, "subject": principal.subject,
                      "filename": filename, "purpose": PURPOSE}  # fmt: skip
            return await self._forward(
                "POST", "/v1/files", params, content=_chunks(upload), timeout=600
            )
        finally:
            await form.close()

    async def files(self, request: Request, principal: Principal) -> Response:
        reject_unknown(sorted(request.query_params), ("purpose", "limit"), what="a query parameter")
        params = dict(request.query_params)
        await self._allow(request, principal, "read")
        return await self._forward("GET", "/v1/files", params | {"tenant": principal.tenant})

    def _file_path(self, request: Request) -> str:
        file_id = str(request.path_params["file_id"])
        if FILE_ID.fullmatch(file_id) is None:
            raise invalid_field("file_id", "is not a file id (file-...)")
        return "/v1/files/" + quote(file_id, safe="")

    async def file(self, request: Request, principal: Principal) -> Response:
        reject_unknown(sorted(request.query_params), (), what="a query parameter here")
        path = self._file_path(request)
        await self._allow(request, principal, "read")
        return await self._forward("GET", path, {"tenant": principal.tenant})

    async def content(self, request: Request, principal: Principal) -> Response:
        reject_unknown(sorted(request.query_params), (), what="a query parameter here")
        path = self._file_path(request) + "/content"
        await self._allow(request, principal, "read")
        try:
            reply = await self._client.get(self._url(path), params={"tenant": principal.tenant})
        except httpx.HTTPError as error:
            raise ServiceUnavailableError("the trainer is unreachable; retry later") from error
        if reply.status_code != 200:
            return relay(reply, "trainer")
        return Response(reply.content, media_type="application/jsonl")

    async def delete_file(self, request: Request, principal: Principal) -> Response:
        reject_unknown(sorted(request.query_params), (), what="a query parameter here")
        path = self._file_path(request)
        await self._allow(request, principal, "create")
        return await self._forward("DELETE", path, {"tenant": principal.tenant})

    # ------------------------------------------------------------------ jobs

    async def create_job(self, request: Request, principal: Principal) -> Response:
        reject_unknown(sorted(request.query_params), (), what="a query parameter here")
        body = await read_json_body(request, 64 * 1024, self.settings.body_timeout_s)
        checked = parse_job_request(body)
        await self._allow(request, principal, "create")
        if checked.dataset is not None:
            name = checked.dataset.rsplit("-v", 1)[0]
            await self.guard.allow(
                request, principal, "dataset", "read", name, label="training", param="dataset"
            )
        params = {"tenant": principal.tenant, "subject": principal.subject}
        return await self._forward("POST", "/v1/fine_tuning/jobs", params, json=body)

    async def jobs(self, request: Request, principal: Principal) -> Response:
        reject_unknown(sorted(request.query_params), ("limit", "after"), what="a query parameter")
        params = dict(request.query_params)
        await self._allow(request, principal, "read")
        return await self._forward(
            "GET", "/v1/fine_tuning/jobs", params | {"tenant": principal.tenant}
        )

    def _job_path(self, request: Request) -> str:
        job_id = str(request.path_params["job_id"])
        if JOB_ID.fullmatch(job_id) is None:
            raise invalid_field("fine_tuning_job_id", "is not a job id (ftjob-...)")
        return "/v1/fine_tuning/jobs/" + quote(job_id, safe="")

    async def job(self, request: Request, principal: Principal) -> Response:
        reject_unknown(sorted(request.query_params), (), what="a query parameter here")
        path = self._job_path(request)
        await self._allow(request, principal, "read")
        return await self._forward("GET", path, {"tenant": principal.tenant})

    async def job_part(self, request: Request, principal: Principal) -> Response:
        reject_unknown(sorted(request.query_params), ("limit", "after"), what="a query parameter")
        part = request.url.path.rsplit("/", 1)[-1]  # events or checkpoints (the route says)
        path = f"{self._job_path(request)}/{part}"
        await self._allow(request, principal, "read")
        params = dict(request.query_params) | {"tenant": principal.tenant}
        return await self._forward("GET", path, params)

    async def cancel(self, request: Request, principal: Principal) -> Response:
        reject_unknown(sorted(request.query_params), (), what="a query parameter here")
        path = self._job_path(request) + "/cancel"
        await self._allow(request, principal, "cancel")
        return await self._forward("POST", path, {"tenant": principal.tenant})

    # ------------------------------------------------------------------ plumbing

    def _url(self, path: str) -> str:
        return self.settings.service_url.rstrip("/") + path

    async def _forward(
        self, method: str, path: str, params: dict[str, str], **send: Any
    ) -> Response:
        try:
            reply = await self._client.request(method, self._url(path), params=params, **send)
        except httpx.HTTPError as error:
            raise ServiceUnavailableError(
                f"the trainer is unreachable ({type(error).__name__}); retry later"
            ) from error
        return relay(reply, "trainer")


def _capped(request: Request, most: int) -> Request:
    """``request`` whose body ends in a 413 once it passes ``most`` bytes (a multipart body
    has no length the parser checks)."""
    seen = 0

    async def receive() -> Message:
        nonlocal seen
        message = await request.receive()
        seen += len(message.get("body", b""))
        if seen > most:
            raise RequestTooLargeError(f"the file is over {most - CHUNK} bytes")
        return message

    return Request(request.scope, receive)


async def _chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while piece := await upload.read(CHUNK):
        yield piece
