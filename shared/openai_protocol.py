"""The OpenAI HTTP API's request contract: every field's type and range, and the errors.

Shared by the gateway (which refuses bad input before it is charged or reaches Kafka)
and the inference service (which the router calls with the same bodies). Errors carry
the fields of an OpenAI ``{"error": {...}}`` body and the HTTP status the API uses for
them; this is the one set of them. The gateway's OpenAPI document is built from the
limits here. (Longer than most modules: the whole request contract stays in one place.)
"""

from __future__ import annotations

import math
import struct
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

# --------------------------------------------------------------------------- errors


class OpenAIError(Exception):
    """An error with the fields of an OpenAI ``{"error": {...}}`` body and an HTTP status."""

    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.param, self.code))


class InvalidRequestError(OpenAIError):
    """400: a request field is missing, of the wrong type, or out of range (``param``)."""

    status = 400
    error_type = "invalid_request_error"


class ModelNotFoundError(OpenAIError):
    """404: the requested model or version is not registered, or not served here."""

    status = 404
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = "model", code: str | None = None) -> None:
        super().__init__(message, param, code or "model_not_found")


class RouteNotFoundError(OpenAIError):
    """404: no such HTTP route."""

    status = 404
    error_type = "invalid_request_error"


class NotFoundError(OpenAIError):
    """404: no such resource, or one the caller may not see (the same answer for both)."""

    status = 404
    error_type = "not_found_error"


class ConflictError(OpenAIError):
    """409: the resource is in a state that forbids this (a file a running job reads)."""

    status = 409
    error_type = "invalid_request_error"


class ServiceUnavailableError(OpenAIError):
    """503: the model cannot answer now (it is stopping, or failed)."""

    status = 503
    error_type = "server_error"


class AuthenticationError(OpenAIError):
    """401: no credentials, or credentials that do not verify."""

    status = 401
    error_type = "authentication_error"


class PermissionDeniedError(OpenAIError):
    """403: the caller is known but the policy does not allow this (``param``: what)."""

    status = 403
    error_type = "permission_error"


class RequestTimeoutError(OpenAIError):
    """408: the request body did not arrive in time."""

    status = 408
    error_type = "invalid_request_error"


class RequestTooLargeError(OpenAIError):
    """413: the request body (or a document in it) is larger than allowed."""

    status = 413
    error_type = "invalid_request_error"


class RateLimitError(OpenAIError):
    """429: a rate or concurrency limit; ``retry_after`` whole seconds for the header."""

    status = 429
    error_type = "rate_limit_error"

    def __init__(
        self, message: str, retry_after_s: float = 1.0, code: str | None = "rate_limit_exceeded"
    ) -> None:
        super().__init__(message, None, code)
        self.retry_after_s = retry_after_s
        self.retry_after = max(1, math.ceil(retry_after_s))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.retry_after_s, self.code))


class ClientClosedError(OpenAIError):
    """499 (nginx's): the caller went away before the reply; nobody reads this response."""

    status = 499
    error_type = "client_closed_request"


class GatewayTimeoutError(OpenAIError):
    """504: no reply within the request's deadline."""

    status = 504
    error_type = "timeout"


def invalid_field(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"{param}: {message}", param)


# --------------------------------------------------------------------------- limits
# OpenAI's documented ranges, and this server's own bounds where OpenAI states none.

MAX_N = 16
"""Most choices one request may ask for (``n`` times the number of prompts)."""
MAX_TOKENS_LIMIT = 2**20
"""Most ``max_tokens`` any request may ask for; the model's context and the caller's role
limit it further (the engine and the policy)."""
MAX_STOP_STRINGS = 4
MAX_STOP_LENGTH = 128
MAX_MESSAGES = 2048
MAX_TEXT_CHARS = 2**20
"""Most characters of text (messages, prompts or embedding inputs) in one request."""
MAX_EMBEDDING_INPUTS = 2048
MAX_NAME_LENGTH = 256
"""Longest ``model`` and ``user``."""
MAX_TOP_K = 1_000_000
MAX_TOKEN_ID = 2**31 - 1
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
"""``seed`` is a signed 64-bit integer; the engine runs it modulo 2^63."""
TEMPERATURE_MAX = 2.0


# --------------------------------------------------------------------------- fields

RequestKind = Literal["chat", "completion"]
_CHAT_ROLES = {"system", "developer", "user", "assistant"}
_MESSAGE_FIELDS = frozenset({"role", "content"})
_COMMON_OFF: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
}
# Accepted only with their "off" value (compared with their JSON type): the engine has no
# such feature, and a value it would silently ignore must be refused instead.
UNSUPPORTED: dict[str, dict[str, tuple[Any, ...]]] = {
    "chat": {
        **_COMMON_OFF,
        "logprobs": (None, False),
        "top_logprobs": (None, 0),
        "tools": (None, []),
        "functions": (None, []),
        "tool_choice": (None, "none", "auto"),
        "function_call": (None, "none", "auto"),
        "parallel_tool_calls": (None, True, False),
        "response_format": (None, {"type": "text"}),
        "store": (None, False),
        "metadata": (None, {}),
        "service_tier": (None, "auto", "default"),
    },
    "completion": {
        **_COMMON_OFF,
        "logprobs": (None, 0),
        "echo": (None, False),
        "suffix": (None, ""),
        "best_of": (None, 1),
    },
    "embedding": {
        "dimensions": (None,),
        # the mesh embeds with the model's query prefix; passages are embedded at ingest
        "input_type": (None, "query"),
    },
}
_GENERATION_FIELDS = frozenset(
    {"model", "max_tokens", "n", "seed", "stop", "stream", "stream_options", "temperature",
     "top_p", "user", "top_k", "ignore_eos", "priority"}
)  # fmt: skip
# Fields of OpenAI's API this server knows (some only with their "off" value, see
# UNSUPPORTED), plus meshllm's own: top_k, ignore_eos (fixed-length runs), priority.
KNOWN_FIELDS: dict[str, frozenset[str]] = {
    "chat": _GENERATION_FIELDS
    | {"messages", "max_completion_tokens"}
    | frozenset(UNSUPPORTED["chat"]),
    "completion": _GENERATION_FIELDS | {"prompt"} | frozenset(UNSUPPORTED["completion"]),
    "embedding": frozenset({"model", "input", "encoding_format", "user", "priority"})
    | frozenset(UNSUPPORTED["embedding"]),
}
INTERNAL_FIELDS = frozenset({"max_tokens_cap"})
"""Fields the router sends the inference service, never accepted from a client:
``max_tokens_cap`` (without max_tokens: at most this many, e.g. the role's limit)."""


def _is_off(value: Any, offs: tuple[Any, ...]) -> bool:
    # True == 1 and 0 == False in Python; JSON keeps them apart, and so must this
    return any(type(value) is type(off) and value == off for off in offs)


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    """``body[key]`` as a finite float in [low, high] (``default`` when absent)."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid_field(key, f"must be a number, got {type(value).__name__}")
    number = float(value)
    if not (math.isfinite(number) and low <= number <= high):
        raise invalid_field(key, f"must be between {low:g} and {high:g}, got {value}")
    return number


def _integer(
    body: dict[str, Any], key: str, default: int | None, low: int, high: int
) -> int | None:
    """``body[key]`` as an integer in [low, high] (``default`` when absent)."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_field(key, f"must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise invalid_field(key, f"must be between {low} and {high}, got {value}")
    return value


def _text(value: Any, param: str, *, max_chars: int = MAX_TEXT_CHARS) -> str:
    """A string that protobuf and JSON can carry (no lone surrogates), of at most max_chars."""
    if not isinstance(value, str):
        raise invalid_field(param, f"must be a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise invalid_field(param, f"must have at most {max_chars} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid_field(param, "must be valid Unicode (no lone surrogates)") from None
    return value


def _tokens(value: Any) -> tuple[int, ...] | None:
    """A non-empty array of token ids as a tuple; None when ``value`` is not one."""
    if not isinstance(value, list) or not value:
        return None
    if all(type(t) is int and 0 <= t <= MAX_TOKEN_ID for t in value):
        return tuple(value)
    return None


def reject_off_values(body: dict[str, Any], kind: str) -> None:
    """Refuse a feature this server lacks unless it is given its "off" value.

    Raises:
        InvalidRequestError: naming the field.
    """
    for key, offs in UNSUPPORTED[kind].items():
        if key in body and not _is_off(body[key], offs):
            raise invalid_field(key, "is not supported by this server")


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class GenerationRequest:
    """A validated OpenAI chat or completion request (before tokenization).

    Every field is within its range: ``max_tokens`` in [1, MAX_TOKENS_LIMIT], ``seed`` in
    [0, 2^63) (a client's signed 64-bit seed, modulo 2^63), ``top_p`` in (0, 1] and not
    zero as a 32-bit float, at most MAX_STOP_STRINGS ``stop`` strings.
    """

    kind: RequestKind
    model: str | None
    version: str | None
    prompts: tuple[str | tuple[int, ...], ...]
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    n: int
    stream: bool
    include_usage: bool
    user: str | None
    ignore_eos: bool
    messages: tuple[dict[str, Any], ...] = ()
    max_tokens_cap: int | None = None

    @property
    def prompt_param(self) -> str:
        return "messages" if self.kind == "chat" else "prompt"


def _message_text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return _text(content, param)
    if isinstance(content, list):
        parts = []
        for index, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise invalid_field(param, "only text content parts are supported")
            reject_unknown(part, {"type", "text"}, what="a field of a text part",
                           prefix=f"{param}[{index}].")  # fmt: skip
            parts.append(_text(part.get("text"), f"{param}[{index}].text"))
        return "".join(parts)
    raise invalid_field(param, "must be a string or an array of text parts")


def _messages(body: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_field("messages", "must be a non-empty array of messages")
    if len(messages) > MAX_MESSAGES:
        raise invalid_field("messages", f"must have at most {MAX_MESSAGES} messages")
    result, chars = [], 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid_field(f"messages[{index}]", "must be an object with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str) or role not in _CHAT_ROLES:
            raise invalid_field(
                f"messages[{index}].role", f"must be one of {', '.join(sorted(_CHAT_ROLES))}"
            )
        reject_unknown(message, _MESSAGE_FIELDS, what="a supported field of a message",
                       prefix=f"messages[{index}].")  # fmt: skip
        content = _message_text(message.get("content"), f"messages[{index}].content")
        chars += len(content)
        if chars > MAX_TEXT_CHARS:
            raise invalid_field("messages", f"must have at most {MAX_TEXT_CHARS} characters")
        result.append({"role": "system" if role == "developer" else role, "content": content})
    return tuple(result)


def _prompts(body: dict[str, Any], *, text_only: bool) -> tuple[str | tuple[int, ...], ...]:
    prompt = body.get("prompt")
    kinds = "a string or an array of strings" + ("" if text_only else ", or of token id arrays")
    if isinstance(prompt, str):
        return (_text(prompt, "prompt"),)
    if not isinstance(prompt, list) or not prompt:
        raise invalid_field("prompt", f"must be {kinds}")
    single = _tokens(prompt)
    items: list[Any] = [prompt] if single is not None else prompt
    result: list[str | tuple[int, ...]] = []
    for item in items:
        tokens = _tokens(item)
        if isinstance(item, str):
            result.append(_text(item, "prompt"))
        elif tokens is not None and not text_only:
            result.append(tokens)
        else:
            raise invalid_field("prompt", f"must be {kinds} (token ids: 0 to {MAX_TOKEN_ID})")
    if sum(len(p) for p in result if isinstance(p, str)) > MAX_TEXT_CHARS:
        raise invalid_field("prompt", f"must have at most {MAX_TEXT_CHARS} characters")
    return tuple(result)


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS:
        raise invalid_field("stop", f"must be a string or an array of up to {MAX_STOP_STRINGS}")
    for item in stops:
        text = _text(item, "stop", max_chars=MAX_STOP_LENGTH)
        if not text:
            raise invalid_field(
                "stop", f"each stop string must have 1 to {MAX_STOP_LENGTH} characters"
            )
    return tuple(stops)


def _top_p(body: dict[str, Any]) -> float:
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    # (0, 1]: zero, and a value that is zero as the wire's 32-bit float, leave nothing
    if struct.unpack("f", struct.pack("f", top_p))[0] <= 0.0:
        raise invalid_field("top_p", f"must be greater than 0 and at most 1, got {top_p}")
    return top_p


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid_field("stream", "must be a boolean")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise invalid_field("stream_options", "must be an object")
    if not stream:
        raise invalid_field("stream_options", "is only allowed when stream is true")
    reject_unknown(options, {"include_usage"}, what="a field of stream_options",
                   prefix="stream_options.")  # fmt: skip
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise invalid_field("stream_options.include_usage", "must be a boolean")
    return stream, include_usage


def _user(body: dict[str, Any], *, public: bool = True) -> str | None:
    user = body.get("user")
    if user is None:
        return None
    # from the router, user may be the caller's authenticated subject (an IdP's, any length)
    return _text(user, "user", max_chars=MAX_NAME_LENGTH if public else MAX_TEXT_CHARS)


def _boolean(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid_field(key, "must be a boolean")
    return value


def split_model(value: Any) -> tuple[str | None, str | None]:
    """``"name"`` / ``"name:version"`` / None -> (name, version).

    Raises:
        InvalidRequestError: not a non-empty string of at most MAX_NAME_LENGTH characters.
    """
    if value is None:
        return None, None
    if not isinstance(value, str) or not value.strip():
        raise invalid_field("model", "must be a model name, or name:version")
    name, _, version = _text(value, "model", max_chars=MAX_NAME_LENGTH).strip().partition(":")
    return name, version or None


def parse_request(body: Any, kind: RequestKind, *, public: bool = False) -> GenerationRequest:
    """Validate every field of an OpenAI chat (``kind="chat"``) or completion request.

    Each field is checked against OpenAI's documented type and range (and this server's
    bounds above); the range of ``max_tokens`` that depends on the model (its context) is
    the engine's to check, the one that depends on the caller (its role) the policy's.

    Args:
        public: the request comes from a client (the gateway): fields this API does not
            have and :data:`INTERNAL_FIELDS` are refused, and prompts must be text (the
            mesh carries text). Otherwise (the inference service, called by the router)
            ``max_tokens_cap`` is read and token id prompts are accepted.

    Raises:
        InvalidRequestError: naming the field at fault.
    """
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    if public:
        reject_unknown_fields(body, kind)
    reject_off_values(body, kind)
    name, version = split_model(body.get("model"))
    messages = _messages(body) if kind == "chat" else ()
    prompts = ("",) if kind == "chat" else _prompts(body, text_only=public)
    max_tokens = _integer(body, "max_tokens", None, 1, MAX_TOKENS_LIMIT)
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        max_tokens = _integer(body, "max_completion_tokens", None, 1, MAX_TOKENS_LIMIT)
    n = _integer(body, "n", 1, 1, MAX_N) or 1
    if n * len(prompts) > MAX_N:
        raise invalid_field("n", f"n times the number of prompts must be at most {MAX_N}")
    stream, include_usage = _stream(body)
    seed = _integer(body, "seed", None, SEED_MIN, SEED_MAX)
    cap = None if public else _integer(body, "max_tokens_cap", None, 1, MAX_TOKENS_LIMIT)
    return GenerationRequest(
        kind=kind,
        model=name,
        version=version,
        prompts=prompts,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, TEMPERATURE_MAX),
        top_p=_top_p(body),
        top_k=_integer(body, "top_k", 0, 0, MAX_TOP_K) or 0,
        seed=None if seed is None else seed % 2**63,
        stop=_stop(body),
        n=n,
        stream=stream,
        include_usage=include_usage,
        user=_user(body, public=public),
        ignore_eos=_boolean(body, "ignore_eos"),
        messages=messages,
        max_tokens_cap=cap,
    )


@dataclass(frozen=True)
class EmbeddingRequest:
    """A validated OpenAI embeddings request: 1 to MAX_EMBEDDING_INPUTS non-empty texts."""

    model: str | None
    version: str | None
    inputs: tuple[str, ...]
    encoding_format: Literal["float", "base64"]
    user: str | None


def parse_embedding_request(body: Any) -> EmbeddingRequest:
    """Validate every field of a client's OpenAI embeddings request (text inputs only).

    Raises:
        InvalidRequestError: naming the field at fault.
    """
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    reject_unknown_fields(body, "embedding")
    reject_off_values(body, "embedding")
    name, version = split_model(body.get("model"))
    value = body.get("input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise invalid_field(
            "input", "must be a non-empty string or array of strings (token ids are not accepted)"
        )
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise invalid_field("input", f"must have at most {MAX_EMBEDDING_INPUTS} entries")
    for text in texts:
        if not _text(text, "input"):
            raise invalid_field("input", "an input must not be empty")
    if sum(len(t) for t in texts) > MAX_TEXT_CHARS:
        raise invalid_field("input", f"must have at most {MAX_TEXT_CHARS} characters")
    encoding = body.get("encoding_format")
    if encoding not in (None, "float", "base64"):
        raise invalid_field("encoding_format", "must be 'float' or 'base64'")
    base64 = encoding == "base64"
    return EmbeddingRequest(
        name, version, tuple(texts), "base64" if base64 else "float", _user(body)
    )


def reject_unknown(
    names: Iterable[Any], allowed: Collection[str], *, what: str = "a field", prefix: str = ""
) -> None:
    """Refuse the first of ``names`` (body fields, query parameters) not in ``allowed``.

    Raises:
        InvalidRequestError: 400 naming it (with ``prefix``, e.g. ``"rag."``) and listing
            what is allowed.
    """
    for name in names:
        if name not in allowed:
            listed = ", ".join(sorted(allowed)) or "none"
            raise invalid_field(f"{prefix}{name}", f"is not {what} ({listed})")


def reject_unknown_fields(body: Any, kind: str) -> None:
    """Refuse fields this API does not have (a typo would otherwise be silently ignored).

    Raises:
        InvalidRequestError: naming the first unknown field.
    """
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    known = KNOWN_FIELDS[kind]
    for key in body:
        if key not in known:
            raise invalid_field(str(key)[:MAX_NAME_LENGTH], "is not a field of this request")
