"""``/v1/feedback`` and ``/v1/datasets/*`` at the gateway: ratings in, datasets out.

- ``POST /v1/feedback`` ``{"request_id", "rating": "up"|"down"|1-5, "correction"?,
  "labels"?, "comment"?}``: ``submit`` on ``feedback``. The answer must be one of the
  caller's tenant: the gateway looks its request record up in the audit service (scoped to
  the tenant), and an unknown id and another tenant's are the same 404. Accepted ratings go
  to ``feedback.events`` (202); a second rating of the same answer by the same caller
  replaces the first.
- ``GET /v1/feedback?request_id=|model=|model_version=&limit=&after=``: ``read``; an
  ordinary caller sees the ratings it gave, one allowed ``dataset read`` every rating.
- ``GET /v1/feedback/quality?model=``: ``dataset read``; up-rate and correction rate per
  model version, with 95% intervals, over the tenant's ratings.
- ``DELETE /v1/feedback?request_id=``: ``erase`` (admins): the request's content leaves
  the feedback store and every dataset not yet used for training.
- ``POST /v1/datasets`` (a build body, see :mod:`shared.feedback_requests`), ``POST
  /v1/datasets/upload?name=&eval_fraction=`` (a chat-format JSONL body): ``build`` on
  ``dataset``; ``GET /v1/datasets``, ``/v1/datasets/{id}``, ``/v1/datasets/{id}/files/
  {split}``: ``read``.

Every body is checked here first (400 naming the field), then the key and tenant are charged
one request, then the policy decides (audited); only then is anything published or
forwarded, with the caller's tenant fixed.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import quote

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.gateway.auth import Principal
from services.gateway.route_guard import RouteGuard, relay
from services.gateway.settings import FeedbackRouteSettings
from shared.bus import Publisher
from shared.events.v1 import events_pb2 as ev
from shared.feedback_requests import (
    DATASET_ID,
    parse_dataset_request,
    parse_rating,
    parse_request_id,
)
from shared.http_body import read_json_body
from shared.logging import get_logger
from shared.openai_protocol import (
    InvalidRequestError,
    NotFoundError,
    RequestTimeoutError,
    RequestTooLargeError,
    ServiceUnavailableError,
    invalid_field,
    reject_unknown,
)
from shared.topics import FEEDBACK_EVENTS

log = get_logger(__name__)
MAX_RATING_BODY = 256 * 1024  # 32,000 characters of correction as \u escapes, and the rest
MAX_PAGE = 500
NOT_FOUND = "no answer with this request_id"


class FeedbackRoutes:
    def __init__(
        self,
        *,
        settings: FeedbackRouteSettings,
        audit_url: str,
        guard: RouteGuard,
        publisher: Publisher,
        headers: dict[str, str],
    ) -> None:
        """``headers`` name the gateway to the audit and feedback services."""
        self.settings = settings
        self.audit_url = audit_url.rstrip("/")
        self.guard = guard
        self.publisher = publisher
        self._client = httpx.AsyncClient(timeout=30, headers=headers)

    def routes(self) -> list[Route]:
        limited = self.guard.limited
        one = "/v1/datasets/{dataset_id}"
        return [
            Route("/v1/feedback", limited(self.submit), methods=["POST"]),
            Route("/v1/feedback", limited(self.list_feedback), methods=["GET"]),
            Route("/v1/feedback", limited(self.erase), methods=["DELETE"]),
            Route("/v1/feedback/quality", limited(self.quality), methods=["GET"]),
            Route("/v1/datasets", limited(self.build), methods=["POST"]),
            Route("/v1/datasets/upload", limited(self.upload), methods=["POST"]),
            Route("/v1/datasets", limited(self.datasets), methods=["GET"]),
            Route(one, limited(self.dataset), methods=["GET"]),
            Route(one + "/files/{split}", limited(self.file), methods=["GET"]),
        ]

    # ------------------------------------------------------------------ ratings

    async def submit(self, request: Request, principal: Principal) -> Response:
        body = await read_json_body(request, MAX_RATING_BODY, self.settings.body_timeout_s)
        if not isinstance(body, dict):
            raise InvalidRequestError("the body must be a JSON object")
        rating = parse_rating(body)
        await self.guard.charge(principal, request)
        await self.guard.allow(
            request, principal, "feedback", "submit", None, label="feedback", param="request_id"
        )
        asker = await self._asker(principal.tenant, rating.request_id)
        if asker is None or (
            asker != principal.subject and not await self._reviewer(request, principal)
        ):
            raise NotFoundError(NOT_FOUND, "request_id", "not_found")
        event = ev.FeedbackEvent(
            request_id=rating.request_id,
            user=principal.subject,
            api_key_id=principal.key_id or "",
            rating=rating.rating,
            score=rating.score,
            correction=rating.correction,
            comment=rating.comment,
        )
        event.labels.extend(rating.labels)
        try:
            await self.publisher.publish(
                FEEDBACK_EVENTS, event, key=rating.request_id, tenant=principal.tenant
            )
        except Exception as error:
            raise ServiceUnavailableError(
                "the mesh's message broker did not take the rating; retry later"
            ) from error
        return JSONResponse(
            {"object": "feedback", "request_id": rating.request_id, "status": "accepted"},
            status_code=202,
        )

    async def _reviewer(self, request: Request, principal: Principal) -> bool:
        """Whether the caller may see the tenant's rated conversations (``dataset read``):
        it may rate any answer of its tenant and read every rating; others only their own."""
        return await self.guard.permits(request, principal, "dataset", "read")

    async def _asker(self, tenant: str, request_id: str) -> str | None:
        """Who asked ``request_id`` in ``tenant`` (its audited request record's user), or
        None when the audit log holds no such request there.

        The record is durable before the answer is sent, but the audit service may store
        it a moment later: a miss is asked again until ``lookup_wait_s``. Both an unknown id
        and another tenant's miss every time, so both take as long."""
        params = {"tenant": tenant, "request_id": request_id, "kind": "request", "limit": "1"}
        deadline = time.monotonic() + self.settings.lookup_wait_s
        pause = 0.05
        while True:
            body = await self._call("GET", self.audit_url + "/v1/audit/records", params, "audit")
            records = body.get("records") or []
            if records:
                return str(records[0].get("user") or "")
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    async def list_feedback(self, request: Request, principal: Principal) -> Response:
        allowed = ("request_id", "model", "model_version", "limit", "after")
        reject_unknown(sorted(request.query_params), allowed, what="a query parameter")
        params = {k: v for k, v in request.query_params.items() if k in allowed}
        if "request_id" in params:
            parse_request_id(params["request_id"])
        limit = params.get("limit", "100")
        if not limit.isascii() or not limit.isdigit() or not 1 <= int(limit) <= MAX_PAGE:
            raise invalid_field("limit", f"must be an integer from 1 to {MAX_PAGE}")
        if len(params.get("after", "")) > 400:
            raise invalid_field("after", "is not a cursor this API gave")
        await self.guard.charge(principal, request)
        await self.guard.allow(request, principal, "feedback", "read", None, label="feedback")
        params["tenant"] = principal.tenant
        if not await self._reviewer(request, principal):
            params["subject"] = principal.subject  # only the ratings it gave
        return await self._forward("GET", "/v1/feedback", params)

    async def quality(self, request: Request, principal: Principal) -> Response:
        reject_unknown(sorted(request.query_params), ("model",), what="a query parameter")
        model = request.query_params.get("model")
        if model is not None and not 0 < len(model) <= 256:
            raise invalid_field("model", "must be text of 1-256 characters")
        await self.guard.charge(principal, request)
        await self.guard.allow(request, principal, "dataset", "read", None, label="feedback")
        params = {"tenant": principal.tenant} | ({"model": model} if model else {})
        return await self._forward("GET", "/v1/feedback/quality", params)

    async def erase(self, request: Request, principal: Principal) -> Response:
        reject_unknown(sorted(request.query_params), ("request_id",), what="a query parameter")
        request_id = parse_request_id(request.query_params.get("request_id"))
        await self.guard.charge(principal, request)
        await self.guard.allow(request, principal, "feedback", "erase", None, label="feedback")
        params = {"tenant": principal.tenant, "request_id": request_id}
        return await self._forward("DELETE", "/v1/feedback", params)

    # ------------------------------------------------------------------ datasets

    async def build(self, request: Request, principal: Principal) -> Response:
        reject_unknown(sorted(request.query_params), (), what="a query parameter here")
        body = await read_json_body(request, 64 * 1024, self.settings.body_timeout_s)
        if not isinstance(body, dict):
            raise InvalidRequestError("the body must be a JSON object")
        name = parse_dataset_request(body)["name"]
        await self.guard.charge(principal, request)
        await self.guard.allow(request, principal, "dataset", "build", name, label="dataset")
        params = {"tenant": principal.tenant}
        return await self._forward(
            "POST", "/v1/datasets", params, json=body, timeout=self.settings.build_timeout_s
        )

    async def upload(self, request: Request, principal: Principal) -> Response:
        allowed = ("name", "eval_fraction")
        reject_unknown(sorted(request.query_params), allowed, what="a query parameter")
        checked: dict[str, Any] = {"name": request.query_params.get("name")}
        if "eval_fraction" in request.query_params:
            try:
                checked["eval_fraction"] = float(request.query_params["eval_fraction"])
            except ValueError:
                raise invalid_field("eval_fraction", "must be a number from 0 to 0.5") from None
        name = parse_dataset_request(checked)["name"]  # a bad one: 400 before any byte is read
        await self.guard.charge(principal, request)
        await self.guard.allow(request, principal, "dataset", "build", name, label="dataset")
        most = self.settings.max_upload_bytes
        data = bytearray()
        try:
            async with asyncio.timeout(self.settings.upload_timeout_s):
                async for piece in request.stream():
                    data += piece
                    if len(data) > most:
                        raise RequestTooLargeError(f"the file is over {most} bytes")
        except TimeoutError:
            raise RequestTimeoutError(
                f"the file did not arrive within {self.settings.upload_timeout_s:g} s"
            ) from None
        params = {k: v for k, v in request.query_params.items() if k in allowed}
        params["tenant"] = principal.tenant
        return await self._forward(
            "POST", "/v1/datasets/upload", params, content=bytes(data),
            timeout=self.settings.build_timeout_s,
        )  # fmt: skip

    async def datasets(self, request: Request, principal: Principal) -> Response:
        reject_unknown(sorted(request.query_params), (), what="a query parameter here")
        await self.guard.charge(principal, request)
        await self.guard.allow(request, principal, "dataset", "read", None, label="dataset")
        return await self._forward("GET", "/v1/datasets", {"tenant": principal.tenant})

    def _dataset_id(self, request: Request) -> str:
        dataset_id = str(request.path_params["dataset_id"])
        if DATASET_ID.fullmatch(dataset_id) is None:
            raise invalid_field("dataset_id", "is not a dataset id (<name>-v<version>)")
        return dataset_id

    async def dataset(self, request: Request, principal: Principal) -> Response:
        reject_unknown(sorted(request.query_params), (), what="a query parameter here")
        dataset_id = self._dataset_id(request)
        await self.guard.charge(principal, request)
        name = dataset_id.rsplit("-v", 1)[0]
        await self.guard.allow(request, principal, "dataset", "read", name, label="dataset")
        path = "/v1/datasets/" + quote(dataset_id, safe="")
        return await self._forward("GET", path, {"tenant": principal.tenant})

    async def file(self, request: Request, principal: Principal) -> Response:
        reject_unknown(sorted(request.query_params), (), what="a query parameter here")
        dataset_id = self._dataset_id(request)
        split = str(request.path_params["split"])
        if split not in ("train", "eval"):
            raise invalid_field("split", "must be train or eval")
        await self.guard.charge(principal, request)
        name = dataset_id.rsplit("-v", 1)[0]
        await self.guard.allow(request, principal, "dataset", "read", name, label="dataset")
        path = f"/v1/datasets/{quote(dataset_id, safe='')}/files/{split}"
        url = self.settings.service_url.rstrip("/") + path
        try:
            reply = await self._client.get(url, params={"tenant": principal.tenant})
        except httpx.HTTPError as error:
            raise ServiceUnavailableError(
                "the feedback service is unreachable; retry later"
            ) from error
        if reply.status_code != 200:
            return relay(reply, "feedback")
        return Response(reply.content, media_type="application/jsonl")

    # ------------------------------------------------------------------ plumbing

    async def _call(
        self, method: str, url: str, params: dict[str, str], what: str, **send: Any
    ) -> dict[str, Any]:
        try:
            reply = await self._client.request(method, url, params=params, **send)
            body = reply.json()
        except (httpx.HTTPError, ValueError) as error:
            raise ServiceUnavailableError(
                f"the {what} service is unreachable ({type(error).__name__}); retry later"
            ) from error
        if reply.status_code != 200:
            log.error(f"the {what} service failed a call", status=reply.status_code, body=body)
            raise ServiceUnavailableError(f"the {what} service could not answer; retry later")
        return body if isinstance(body, dict) else {}

    async def _forward(
        self, method: str, path: str, params: dict[str, str], **send: Any
    ) -> Response:
        url = self.settings.service_url.rstrip("/") + path
        try:
            reply = await self._client.request(method, url, params=params, **send)
        except httpx.HTTPError as error:
            raise ServiceUnavailableError(
                f"the feedback service is unreachable ({type(error).__name__}); retry later"
            ) from error
        return relay(reply, "feedback")
