"""Service identity between the mesh's own services: per-service bearer tokens.

Each service of the mesh (:data:`IDENTITIES`) holds one random 256-bit token, which it
sends as ``Authorization: Bearer <token>`` on every call to another service's internal
API. An internal API knows, for each caller it accepts, only the SHA-256 of that caller's
token (from ``<name>.sha256``, or computed from ``<name>.token``), so an API that is broken
into cannot impersonate its callers. A call with no token, or an unknown one, is answered
401; a known caller on a route not granted to it, 403 (see :class:`ServiceGuard`).

Where the tokens come from (``MESHLLM_SERVICE_AUTH__*``):

- ``TOKEN`` (or ``TOKEN_FILE``): this service's own token; unset: ``<tokens_dir>/<service
  name>.token``.
- ``TOKENS_DIR``: where the callers' ``<name>.token`` or ``<name>.sha256`` are read; unset:
  ``<data_dir>/run/service-tokens``.

Embedded mode (one machine, one user) makes the missing tokens there on first use, files
0600 in a 0700 directory; ``meshllm up`` does so before it starts the services. Cluster
mode makes nothing: a missing token is a start-up error naming the setting
(``meshllm service-tokens DIR`` makes a set for compose or a chart).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping
from pathlib import Path

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shared.logging import get_logger
from shared.openai_protocol import OpenAIError
from shared.settings import MeshSettings, Mode, ServiceAuthSettings, SettingsError

log = get_logger(__name__)

IDENTITIES: tuple[str, ...] = (
    "gateway", "router", "retrieval", "audit", "inference", "feedback", "trainer",
)  # fmt: skip
"""Every service identity of the mesh, named as the services are."""

TOKEN_BYTES = 32  # 256 bits
TOKEN_SETTING = "MESHLLM_SERVICE_AUTH__TOKEN"
TOKEN_FILE_SETTING = "MESHLLM_SERVICE_AUTH__TOKEN_FILE"
TOKENS_DIR_SETTING = "MESHLLM_SERVICE_AUTH__TOKENS_DIR"


class ServiceAuthError(SettingsError):
    """A token is missing or malformed at start-up; the message names the setting."""


class ServiceUnauthenticated(OpenAIError):
    """401: the call carries no service token, or one no caller of this API holds."""

    status = 401
    error_type = "authentication_error"


class ServiceForbidden(OpenAIError):
    """403: a known service called a route that is not granted to it."""

    status = 403
    error_type = "permission_error"


def tokens_dir(settings: MeshSettings) -> Path:
    """Where service tokens are: ``MESHLLM_SERVICE_AUTH__TOKENS_DIR`` or the data dir's."""
    configured = settings.service_auth.tokens_dir
    if configured is not None:
        return configured
    return Path(settings.data_dir) / "run" / "service-tokens"


def write_new(path: Path, text: str) -> None:
    """Create ``path`` (0600) holding ``text`` unless it exists; never a half-written file."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text + "\n")
        # link() fails if another process made it first: theirs is kept, ours dropped
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def ensure_tokens(
    directory: Path, identities: Iterable[str] = IDENTITIES, *, split: bool = False
) -> None:
    """Make ``<name>.token`` (a new random token, 0600) for each identity that has none,
    and its ``<name>.sha256``; directories are made 0700. Safe to race; never replaces a
    token, so services restarted later still know each other.

    ``split``: ``<directory>/<name>/<name>.token`` and ``<directory>/digests/<name>.sha256``,
    so that each service can be given its own token and the digests, and nothing else.
    """
    _private_dir(directory)
    digests = directory / "digests" if split else directory
    _private_dir(digests)
    for name in identities:
        home = directory / name if split else directory
        _private_dir(home)
        token_path = home / f"{name}.token"
        if not token_path.exists():
            write_new(token_path, secrets.token_hex(TOKEN_BYTES))
        digest_path = digests / f"{name}.sha256"
        if not digest_path.exists():
            token = _read_token(token_path, f"{name}.token")
            write_new(digest_path, _sha256(token).hex())


def _sha256(token: str) -> bytes:
    return hashlib.sha256(token.encode(errors="replace")).digest()


def _read_token(path: Path, setting: str) -> str:
    try:
        token = path.read_text().strip()
    except OSError as error:
        raise ServiceAuthError(f"{setting}: cannot read {path} ({error.strerror})") from None
    _check_token(token, setting)
    return token


def _check_token(token: str, setting: str) -> None:
    if len(token) < 2 * TOKEN_BYTES or not token.isascii() or not token.isprintable():
        raise ServiceAuthError(
            f"{setting}: a service token must be at least {2 * TOKEN_BYTES} printable ASCII "
            "characters (e.g. `meshllm service-tokens DIR` makes them)"
        )


def _prepare(settings: MeshSettings) -> Path:
    directory = tokens_dir(settings)
    if settings.mode is Mode.EMBEDDED:
        ensure_tokens(directory)
    return directory


def own_token(settings: MeshSettings) -> str:
    """This service's token (``settings.service_name`` is its identity).

    Raises:
        ServiceAuthError: it is missing (cluster mode) or malformed; names the setting.
    """
    auth = settings.service_auth
    if auth.token is not None:
        token = auth.token.get_secret_value().strip()
        _check_token(token, TOKEN_SETTING)
        return token
    if auth.token_file is not None:
        return _read_token(auth.token_file, TOKEN_FILE_SETTING)
    path = _prepare(settings) / f"{settings.service_name}.token"
    if not path.exists():
        raise ServiceAuthError(
            f"{TOKEN_SETTING} (or {TOKEN_FILE_SETTING}) is required in cluster mode: "
            f"no token for service {settings.service_name!r} at {path}"
        )
    return _read_token(path, TOKEN_FILE_SETTING)


def service_headers(settings: MeshSettings) -> dict[str, str]:
    """The headers that name this service to another one (``Authorization: Bearer ...``)."""
    return {"Authorization": f"Bearer {own_token(settings)}"}


def _digest_of(directory: Path, name: str) -> bytes:
    digest_path = directory / f"{name}.sha256"
    if digest_path.exists():
        text = digest_path.read_text().strip()
        try:
            digest = bytes.fromhex(text)
        except ValueError:
            digest = b""
        if len(digest) != hashlib.sha256().digest_size:
            raise ServiceAuthError(f"{TOKENS_DIR_SETTING}: {digest_path} is not a SHA-256 hex")
        return digest
    token_path = directory / f"{name}.token"
    if token_path.exists():
        return hashlib.sha256(_read_token(token_path, TOKENS_DIR_SETTING).encode()).digest()
    raise ServiceAuthError(
        f"{TOKENS_DIR_SETTING}: no {name}.sha256 or {name}.token in {directory}: "
        f"the {name!r} service could not call this one"
    )


def origin_of(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of ``url``: what :class:`ServiceTokenAuth` matches requests by."""
    parsed = httpx.URL(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return parsed.scheme, parsed.host, port


class ServiceTokenAuth(httpx.Auth):
    """Adds this service's token to requests for the mesh's own services only, so that a
    client shared with servers run by others (an external OpenAI-compatible pool) never
    hands them the token."""

    def __init__(self, token: str, mesh_urls: Iterable[str]) -> None:
        self._authorization = f"Bearer {token}"
        self._origins = frozenset(origin_of(url) for url in mesh_urls)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if origin_of(str(request.url)) in self._origins:
            request.headers["Authorization"] = self._authorization
        yield request


class ServiceGuard:
    """Who may call an internal API: the digest of each accepted caller's token.

    Example::

        guard = ServiceGuard.load(settings, {"gateway", "router"})
        guard.check(request.headers, {"router"})  # the caller's identity, or 401/403
    """

    def __init__(self, digests: Mapping[str, bytes]) -> None:
        self._digests = dict(digests)

    @classmethod
    def load(cls, settings: MeshSettings, callers: Iterable[str]) -> ServiceGuard:
        """The guard of the callers named (cluster: their token or digest must exist).

        The other identities of the mesh are known too where their digest is at hand, so
        that their calls are told 403 (not this route) rather than 401 (no one known).

        Raises:
            ServiceAuthError: a caller's token or digest is missing; names the setting.
        """
        directory = _prepare(settings)
        required = set(callers)
        digests: dict[str, bytes] = {}
        for name in sorted(required | set(IDENTITIES)):
            try:
                digests[name] = _digest_of(directory, name)
            except ServiceAuthError:
                if name in required:
                    raise
        return cls(digests)

    @classmethod
    def of_tokens(cls, tokens: Mapping[str, str]) -> ServiceGuard:
        """The guard of ``{identity: token}`` (tests, and callers that hold tokens)."""
        return cls({name: _sha256(token) for name, token in tokens.items()})

    @property
    def callers(self) -> frozenset[str]:
        return frozenset(self._digests)

    def identify(self, authorization: str | None) -> str | None:
        """The identity whose token ``authorization`` (``Bearer <token>``) carries, or None."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = hashlib.sha256(token.strip().encode(errors="replace")).digest()
        found = None
        for name, expected in self._digests.items():  # every one: the time says nothing
            if hmac.compare_digest(digest, expected):
                found = name
        return found

    def check(self, headers: Mapping[str, str], allowed: Iterable[str]) -> str:
        """The caller's identity when it may call a route granted to ``allowed``.

        Raises:
            ServiceUnauthenticated: no token, or one of no known caller (401).
            ServiceForbidden: a known caller not in ``allowed`` (403).
        """
        identity = self.identify(headers.get("authorization"))
        if identity is None:
            raise ServiceUnauthenticated(
                "this internal API needs a mesh service token (Authorization: Bearer ...)",
                None,
                "service_token_required",
            )
        if identity not in allowed:
            raise ServiceForbidden(
                f"the {identity} service may not call this route", None, "service_not_allowed"
            )
        return identity

    def route(
        self,
        path: str,
        handler: Callable[[Request], Awaitable[Response]],
        method: str,
        callers: Iterable[str],
        *,
        service: str,
    ) -> Route:
        """A route of an internal API: only ``callers`` get to ``handler``; its errors, and
        any other failure (logged), answer as OpenAI error bodies."""
        allowed = frozenset(callers)

        async def endpoint(request: Request) -> Response:
            try:
                self.check(request.headers, allowed)
                return await handler(request)
            except OpenAIError as error:
                return JSONResponse(error.to_dict(), status_code=error.status)
            except Exception:
                log.exception(f"{service} API request failed", path=request.url.path)
                failed = OpenAIError(f"the {service} service failed to answer; see its logs")
                return JSONResponse(failed.to_dict(), status_code=failed.status)

        return Route(path, endpoint, methods=[method])


__all__ = [
    "IDENTITIES",
    "ServiceAuthError",
    "ServiceAuthSettings",
    "ServiceForbidden",
    "ServiceGuard",
    "ServiceTokenAuth",
    "ServiceUnauthenticated",
    "ensure_tokens",
    "origin_of",
    "own_token",
    "service_headers",
    "tokens_dir",
]


def _private_dir(path: Path) -> None:
    """``path`` as a folder only its owner may enter: made 0700, or narrowed to it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
