"""A test double of an OPA server's REST API, evaluating with regorus.

No OPA binary is available to this suite, so the OPA-server evaluator's HTTP path runs
against this instead: the endpoints it uses, with OPA's status codes and JSON shapes
(``GET /health``; ``GET``/``PUT``/``DELETE /v1/policies/{id}``; ``PUT``/``DELETE
/v1/data/{path}``; ``POST /v1/data/{path}`` with ``{"input": ...}`` answering
``{"result": ...}``, or ``{}`` when the rule is undefined). Like OPA it refuses a module
that does not compile (400) and a data write at or above a policy's package (400). It is
not OPA: Rego semantics are regorus's, and error bodies carry only the fields the client
reads.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import socket
import threading
import time
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import regorus  # type: ignore[import-untyped]

_PACKAGE = re.compile(r"^[ \t]*package[ \t]+([A-Za-z_][\w.]*)", re.MULTILINE)


class OpaDouble:
    """An OPA-REST-API-compatible server on 127.0.0.1 (a free port), in a thread.

    Attributes:
        policies: the modules by id, as uploaded.
        data: the base data document.
        requests: ``(method, path, authorization header)`` of every request, in order.
    """

    def __init__(self) -> None:
        self.policies: dict[str, str] = {}
        self.data: dict[str, Any] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.delay_s = 0.0  # how long each decision takes, as a slow or distant server's
        self._lock = threading.Lock()
        self._version = 0
        # regorus engines are bound to the thread that makes them and must be dropped there
        # too, so one worker thread owns the evaluating engine; handlers hand it the work
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._server: ThreadingHTTPServer | None = None
        self.connections: set[socket.socket] = set()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> OpaDouble:
        double = self

        class Handler(_Handler):
            opa = double

        self._worker = threading.Thread(target=self._work, daemon=True)
        self._worker.start()
        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop open connections, as a server that went away."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for connection in list(self.connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join(timeout=5)

    def restart_empty(self) -> None:
        """Forget every policy and all data, as an OPA without persistence does on restart."""
        with self._lock:
            self.policies.clear()
            self.data.clear()
            self._version += 1

    # ----------------------------------------------------------------- the server's state

    def put_policy(self, policy_id: str, text: str) -> str | None:
        """Store a module; the compile error when it does not compile with the others."""
        with self._lock:
            modules = {**self.policies, policy_id: text}
            _, error = self._on_worker("compile", (modules, self.data, -1))
            if error is not None:
                return error
            self.policies[policy_id] = text
            self._version += 1
        return None

    def delete_policy(self, policy_id: str) -> bool:
        with self._lock:
            if self.policies.pop(policy_id, None) is None:
                return False
            self._version += 1
        return True

    def put_data(self, path: list[str], value: Any) -> str | None:
        """Store ``value`` at ``path``; the conflict when a policy's package is at or below."""
        with self._lock:
            for text in self.policies.values():
                match = _PACKAGE.search(text)
                package = match.group(1).split(".") if match else []
                if package[: len(path)] == path:
                    return f"write conflict: data.{'.'.join(path)} holds policy package"
            if not path:
                self.data = value
            else:
                node = self.data
                for key in path[:-1]:
                    node = node.setdefault(key, {})
                node[path[-1]] = value
            self._version += 1
        return None

    def evaluate(self, path: list[str], document: Any) -> Any:
        """The value of ``data.<path>`` for ``document``; None when undefined.

        Raises:
            RuntimeError: evaluation failed (OPA answers 500).
        """
        packages = [_PACKAGE.search(text) for text in self.policies.values()]
        if not path or not any(
            match and path[: len(match.group(1).split("."))] == match.group(1).split(".")
            for match in packages
        ):
            return None  # OPA: a path no policy defines is undefined, not an error
        with self._lock:
            state = (dict(self.policies), json.loads(json.dumps(self.data)), self._version)
        result, error = self._on_worker("evaluate", state, path, document)
        if error is not None:
            raise RuntimeError(error)
        return result

    def _on_worker(self, *job: Any) -> tuple[Any, str | None]:
        done: Future[tuple[Any, str | None]] = Future()
        self._jobs.put((*job, done))
        return done.result(timeout=10)

    def _work(self) -> None:
        """Run the jobs; every engine is made, used and dropped on this thread, and only
        values and messages leave it (an exception would carry the engine in its frames)."""
        engine, version = None, -1
        while (job := self._jobs.get()) is not None:
            kind, (modules, data, state_version), *rest, done = job
            result, message = None, None
            try:
                if kind == "compile":
                    self._build(modules, data)
                else:
                    if engine is None or version != state_version:
                        engine, version = self._build(modules, data), state_version
                    path, document = rest
                    engine.set_input(document)
                    result = engine.eval_rule("data." + ".".join(path))
            except Exception as error:
                message = str(error).split("Stack backtrace:", 1)[0].strip()
            done.set_result((result, message))

    @staticmethod
    def _build(modules: dict[str, str], data: dict[str, Any]) -> Any:
        engine = regorus.Engine()
        for policy_id, text in modules.items():
            engine.add_policy(policy_id, text)
        engine.add_data_json(json.dumps(data))
        return engine


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # many callers at once, as a gateway under load (default 5)


class _Handler(BaseHTTPRequestHandler):
    opa: OpaDouble
    protocol_version = "HTTP/1.1"
    # one write per response, sent at once: no 40 ms of Nagle and delayed ACK per call
    wbufsize = 1 << 16
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.opa.connections.add(self.connection)

    def finish(self) -> None:
        self.opa.connections.discard(self.connection)
        super().finish()

    def do_GET(self) -> None:
        route, rest = self._route()
        if route == "health":
            self._json(200, {})
        elif route == "policies" and not rest:
            listed = [{"id": i, "raw": text} for i, text in sorted(self.opa.policies.items())]
            self._json(200, {"result": listed})
        elif route == "policies":
            text = self.opa.policies.get("/".join(rest))
            if text is None:
                self._json(404, {"code": "resource_not_found", "message": "storage_not_found"})
            else:
                self._json(200, {"result": {"id": "/".join(rest), "raw": text}})
        else:
            self._json(404, {"code": "resource_not_found", "message": "not found"})

    def do_PUT(self) -> None:
        route, rest = self._route()
        body = self._body()
        if route == "policies" and rest:
            error = self.opa.put_policy("/".join(rest), body.decode())
            if error is None:
                self._json(200, {})
            else:
                self._json(
                    400,
                    {
                        "code": "invalid_parameter",
                        "message": "error(s) occurred while compiling module(s)",
                        "errors": [{"code": "rego_parse_error", "message": error}],
                    },
                )
        elif route == "data":
            try:
                value = json.loads(body)
            except ValueError as error:
                self._json(400, {"code": "invalid_parameter", "message": str(error)})
                return
            conflict = self.opa.put_data(rest, value)
            if conflict is None:
                self._empty(204)
            else:
                self._json(400, {"code": "invalid_parameter", "message": conflict})
        else:
            self._json(404, {"code": "resource_not_found", "message": "not found"})

    def do_POST(self) -> None:
        route, rest = self._route()
        if route != "data":
            self._json(404, {"code": "resource_not_found", "message": "not found"})
            return
        try:
            document = json.loads(self._body() or b"{}").get("input")
        except (ValueError, AttributeError) as error:
            self._json(400, {"code": "invalid_parameter", "message": str(error)})
            return
        time.sleep(self.opa.delay_s)
        try:
            result = self.opa.evaluate(rest, document)
        except RuntimeError as error:
            message = str(error).split("Stack backtrace:", 1)[0].strip()
            self._json(500, {"code": "internal_error", "message": message})
            return
        self._json(200, {} if result is None else {"result": _jsonable(result)})

    def do_DELETE(self) -> None:
        route, rest = self._route()
        if route == "policies" and rest and self.opa.delete_policy("/".join(rest)):
            self._json(200, {})
        else:
            self._json(404, {"code": "resource_not_found", "message": "not found"})

    def _route(self) -> tuple[str, list[str]]:
        self.opa.requests.append((self.command, self.path, self.headers.get("authorization")))
        parts = [part for part in self.path.split("?", 1)[0].split("/") if part]
        if parts == ["health"]:
            return "health", []
        if len(parts) >= 2 and parts[0] == "v1":
            return parts[1], parts[2:]
        return "", parts

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def _json(self, status: int, body: Any) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()


def _jsonable(value: Any) -> Any:
    """OPA's JSON for a Rego value: sets become sorted arrays."""
    if isinstance(value, set | frozenset):
        return sorted(_jsonable(item) for item in value)
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    return value
