"""The access policy evaluated by an OPA server, through its REST API (opa-python-client).

At start the evaluator loads the same ``.rego`` files the embedded evaluator runs into
the server (``PUT /v1/policies/{id}``) and the data document beside them
(``PUT /v1/data/{path}``); each decision is ``POST /v1/data/meshllm/authz/decision`` with
``{"input": ...}``. Where the server gets its policies some other way (OPA bundles), set
``push=False`` and it is only queried.

Tested here against an OPA-REST-API-compatible test double (``tests/policy/opa_double.py``,
the same endpoints and status codes, evaluating with regorus), not against a real OPA
server: no OPA binary was available. What the double cannot show is OPA's own compiler and
Rego semantics: the policy is written for both (``import rego.v1`` makes it valid on OPA
0.59 and later, 1.x included; it uses ``glob.match`` with ``null`` delimiters and
``net.cidr_contains`` on addresses the caller has already parsed, which OPA documents as
regorus behaves), but it has only ever been evaluated by regorus (and rego-cpp, in the
benchmark). Nor does it show OPA's answers to malformed uploads in every detail.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

from opa_client import OpaClient  # type: ignore[import-untyped]
from opa_client.opa_async import AsyncOpaClient  # type: ignore[import-untyped]

from shared.policy.decision import (
    DECISION_RULE,
    PROBE,
    AccessRequest,
    Decision,
    PolicyError,
    evaluation_failed,
    parse_decision,
)
from shared.policy.files import PolicyBundle
from shared.policy.settings import parse_opa_url


class OpaServerEvaluator:
    """The policy evaluated by an OPA server; the decision is the object of ``rule``.

    Each thread queries through a client (an HTTP session) of its own. A decision that the
    server cannot give (unreachable, an error status, a timeout after ``timeout_s``) is a
    denial. When the rule is undefined on the server, as after an OPA restart lost the
    policies pushed to it, the evaluator pushes them again (at most once per
    ``repush_interval_s``) and asks once more. Thread-safe.

    :meth:`decide` blocks its thread for the call; in an event loop use :meth:`adecide`,
    which queries through an aiohttp session of that loop, so other requests go on while a
    decision waits for the server (an unreachable one costs up to ``timeout_s``).

    Args:
        url: the server's base URL, ``http(s)://host[:port]`` (port 8181 when omitted).
        bundle: the modules and data to push; None when ``push`` is False.
        rule: the rule that holds the decision, ``data.<package>.<rule>``.
        token: a bearer token for the server, if it requires one.
        timeout_s: how long one HTTP call may take.
        push: load ``bundle`` into the server at start (and again when it lost it).
        policy_prefix: the policies are stored as ``<prefix>.<file stem>``; others of that
            prefix that are not in ``bundle`` are deleted, so a removed file goes too.
        repush_interval_s: the least time between two pushes after the first.

    Raises:
        PolicyError: the URL is malformed, the server is unreachable or unhealthy, refuses
            a module or the data (naming the file or the data path), or does not give a
            well-formed decision for a probe request.
    """

    def __init__(
        self,
        url: str,
        bundle: PolicyBundle | None,
        *,
        rule: str = DECISION_RULE,
        token: str | None = None,
        timeout_s: float = 1.0,
        push: bool = True,
        policy_prefix: str = "meshllm",
        repush_interval_s: float = 5.0,
    ) -> None:
        if push and bundle is None:
            raise PolicyError("pushing policies to the OPA server needs a policy bundle")
        try:
            self._tls, self._host, self._port = parse_opa_url(url)
        except ValueError as error:
            raise PolicyError(f"OPA server URL {error}") from None
        if not rule.startswith("data.") or rule.count(".") < 2:
            raise PolicyError(f"rule {rule!r} is not data.<package>.<rule>")
        self.url = url
        self.bundle = bundle
        self.rule = rule
        self.push = push
        self.policy_prefix = policy_prefix
        self.repush_interval_s = repush_interval_s
        self._package, _, self._rule_name = rule.removeprefix("data.").rpartition(".")
        self._token = token
        self._timeout_s = timeout_s
        self._local = threading.local()
        self._clients: list[Any] = []
        # each event loop's AsyncOpaClient (its aiohttp session belongs to that loop)
        self._async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )
        self._async_lock = threading.Lock()
        self._clients_lock = threading.Lock()
        self._push_lock = threading.Lock()
        self._pushed_at = 0.0
        client = self._client()
        if not client.check_health():
            raise PolicyError(f"OPA server {url} is unreachable or not healthy")
        if push:
            self._push(client)
        try:
            parse_decision(self._query(client, PROBE.to_input()))
        except Exception as error:
            raise PolicyError(
                f"OPA server {url}: {rule} does not give a decision: {error}"
            ) from None

    def decide(self, request: AccessRequest) -> Decision:
        """The decision on ``request``; a failure denies it (fail closed)."""
        try:
            client = self._client()
            document = request.to_input()
            result = self._query(client, document)
            if result is None and self.push and self._repush(client):
                result = self._query(client, document)
            return parse_decision(result)
        except Exception as error:  # fail closed, whatever went wrong
            return evaluation_failed("opa", self.rule, request, error)

    async def adecide(self, request: AccessRequest) -> Decision:
        """:meth:`decide` without blocking the event loop; a failure denies (fail closed)."""
        try:
            client = await self._async_client()
            document = request.to_input()
            result = await self._aquery(client, document)
            if result is None and self.push and await asyncio.to_thread(self._repush_here):
                result = await self._aquery(client, document)
            return parse_decision(result)
        except Exception as error:  # fail closed, whatever went wrong
            return evaluation_failed("opa", self.rule, request, error)

    async def aclose(self) -> None:
        """Close the running loop's async session, then every thread's HTTP session."""
        client = self._async_clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.close_connection()
        self.close()

    def close(self) -> None:
        """Close every thread's HTTP session."""
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close_connection()

    def _client_options(self) -> dict[str, Any]:
        return {
            "host": self._host,
            "port": self._port,
            "ssl": self._tls,
            "token": self._token,
            "timeout": self._timeout_s,
            "retries": 0,  # a decision is not retried: a caller waits for it
        }

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = OpaClient(**self._client_options())
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    async def _async_client(self) -> Any:
        """The running loop's client, its session open: made once per loop, before any
        other decision of that loop can see it (nothing here yields until it is stored)."""
        loop = asyncio.get_running_loop()
        with self._async_lock:
            client = self._async_clients.get(loop)
            if client is None:
                client = AsyncOpaClient(**self._client_options())
                self._async_clients[loop] = client
        if client._session is None:
            # aiohttp's session must be made inside its loop; _init_session never yields,
            # so concurrent first decisions of one loop share the one session it makes
            await client._init_session()
        return client

    async def _aquery(self, client: Any, document: dict[str, Any]) -> Any:
        answer = await client.query_rule(document, self._package, self._rule_name)
        return answer.get("result") if isinstance(answer, dict) else None

    def _repush_here(self) -> bool:
        return self._repush(self._client())

    def _query(self, client: Any, document: dict[str, Any]) -> Any:
        answer = client.query_rule(document, self._package, self._rule_name)
        return answer.get("result") if isinstance(answer, dict) else None

    def _repush(self, client: Any) -> bool:
        with self._push_lock:
            if time.monotonic() - self._pushed_at < self.repush_interval_s:
                return False
            self._push(client)
            return True

    def _push(self, client: Any) -> None:
        assert self.bundle is not None
        self._pushed_at = time.monotonic()
        ids = set()
        for source in self.bundle.sources:
            policy_id = f"{self.policy_prefix}.{source.path.stem}"
            ids.add(policy_id)
            try:
                client.update_policy_from_string(source.text, policy_id, rego_compat=False)
            except Exception as error:
                raise PolicyError(
                    f"policy file {source.path}: the OPA server {self.url} refused it: {error}"
                ) from None
        try:
            stale = [
                policy_id
                for policy_id in client.get_policies_list()
                if policy_id.startswith(f"{self.policy_prefix}.") and policy_id not in ids
            ]
            for policy_id in stale:
                client.delete_policy(policy_id)
        except Exception as error:
            raise PolicyError(
                f"OPA server {self.url}: cannot replace older policies: {error}"
            ) from None
        packages = [source.package.split(".") for source in self.bundle.sources]
        for path, value in _data_writes(self.bundle.data or {}, packages, []):
            where = "/".join(path)
            if not isinstance(value, dict):
                raise PolicyError(
                    f"policy data: data.{'.'.join(path)} must be an object to load it into "
                    "an OPA server beside the policies"
                )
            try:
                client.update_or_create_data(value, where)
            except Exception as error:
                raise PolicyError(
                    f"policy data: the OPA server {self.url} refused data/{where}: {error}"
                ) from None


def _data_writes(
    data: Mapping[str, Any], packages: list[list[str]], prefix: list[str]
) -> Iterator[tuple[list[str], Any]]:
    """The ``PUT /v1/data/{path}`` writes that load ``data``.

    OPA refuses a write to a path above a policy's package (``data.meshllm`` holds the
    package ``meshllm.authz``), so such paths are written key by key, one level down.
    """
    for key, value in data.items():
        path = [*prefix, key]
        above_a_package = any(package[: len(path)] == path for package in packages)
        if above_a_package and isinstance(value, dict):
            yield from _data_writes(value, packages, path)
        else:
            yield path, value
