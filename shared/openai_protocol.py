"""The OpenAI HTTP API's request contract: validation of chat, completion requests, errors.

Shared by the gateway (which refuses bad input before it reaches Kafka) and the
inference service (which is also reachable directly). Errors carry the fields of an
OpenAI ``{"error": {...}}`` body and the HTTP status the API uses for them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

MAX_N = 16
"""Most choices one request may ask for (``n`` times the number of prompts)."""

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


class ServiceUnavailableError(OpenAIError):
    """503: the model cannot answer now (it is stopping, or failed)."""

    status = 503
    error_type = "server_error"


def invalid_field(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"{param}: {message}", param)


# --------------------------------------------------------------------------- requests

RequestKind = Literal["chat", "completion"]
_CHAT_ROLES = {"system", "developer", "user", "assistant"}
# Accepted only with their "off" value: the engine has no such feature.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "functions": (None, []),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
}


@dataclass(frozen=True)
class GenerationRequest:
    """A validated OpenAI chat or completion request (before tokenization)."""

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


def _number(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid_field(key, f"must be a number, got {type(value).__name__}")
    return float(value)


def _integer(body: dict[str, Any], key: str, default: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_field(key, f"must be an integer, got {type(value).__name__}")
    return value


def _message_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise invalid_field(
                    f"messages[{index}].content", "only text content parts are supported"
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid_field(
                    f"messages[{index}].content", "a text part needs a string 'text'"
                )
            parts.append(text)
        return "".join(parts)
    raise invalid_field(f"messages[{index}].content", "must be a string or an array of text parts")


def _messages(body: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_field("messages", "must be a non-empty array of messages")
    result = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid_field(f"messages[{index}]", "must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in _CHAT_ROLES:
            raise invalid_field(
                f"messages[{index}].role", f"must be one of {', '.join(sorted(_CHAT_ROLES))}"
            )
        content = _message_text(message.get("content"), index)
        result.append({"role": "system" if role == "developer" else role, "content": content})
    return tuple(result)


def _prompts(body: dict[str, Any]) -> tuple[str | tuple[int, ...], ...]:
    prompt = body.get("prompt")
    bad = invalid_field("prompt", "must be a string, an array of strings, or of token id arrays")
    if isinstance(prompt, str):
        return (prompt,)
    if not isinstance(prompt, list) or not prompt:
        raise bad
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return (tuple(prompt),)
    result: list[str | tuple[int, ...]] = []
    for item in prompt:
        if isinstance(item, str):
            result.append(item)
        elif (
            isinstance(item, list)
            and item
            and all(isinstance(t, int) and not isinstance(t, bool) for t in item)
        ):
            result.append(tuple(item))
        else:
            raise bad
    return tuple(result)


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise invalid_field("stop", "must be a string or an array of strings")


def split_model(value: Any) -> tuple[str | None, str | None]:
    """``"name"`` / ``"name:version"`` / None -> (name, version).

    Raises:
        InvalidRequestError: not a string.
    """
    if value is None:
        return None, None
    if not isinstance(value, str) or not value.strip():
        raise invalid_field("model", "must be a model name, or name:version")
    name, _, version = value.strip().partition(":")
    return name, version or None


def parse_request(body: Any, kind: RequestKind) -> GenerationRequest:
    """Validate the fields of an OpenAI chat (``kind="chat"``) or completion request.

    Range checks that depend on the model (``max_tokens`` against the context) are the
    engine's; this checks presence and types, and refuses features the engine lacks.

    Raises:
        InvalidRequestError: naming the field at fault.
    """
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    for key, off in _UNSUPPORTED.items():
        if body.get(key) not in off:
            raise invalid_field(key, "is not supported by this server")
    name, version = split_model(body.get("model"))
    messages = _messages(body) if kind == "chat" else ()
    prompts = ("",) if kind == "chat" else _prompts(body)
    max_tokens = _integer(body, "max_tokens", None)
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        max_tokens = _integer(body, "max_completion_tokens", None)
    n = _integer(body, "n", 1) or 0
    if not 1 <= n * len(prompts) <= MAX_N:
        raise invalid_field("n", f"n times the number of prompts must be between 1 and {MAX_N}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid_field("stream", "must be a boolean")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid_field("stream_options", "must be an object")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid_field("user", "must be a string")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise invalid_field("ignore_eos", "must be a boolean")
    cap = _integer(body, "max_tokens_cap", None)
    if cap is not None and cap < 1:
        raise invalid_field("max_tokens_cap", f"must be at least 1, got {cap}")
    return GenerationRequest(
        kind=kind,
        model=name,
        version=version,
        prompts=prompts,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0),
        top_p=_number(body, "top_p", 1.0),
        top_k=_integer(body, "top_k", 0) or 0,
        seed=_integer(body, "seed", None),
        stop=_stop(body),
        n=n,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        user=user,
        ignore_eos=ignore_eos,
        messages=messages,
        max_tokens_cap=cap,
    )


# Fields of OpenAI's API this server knows (some only with their "off" value, see
# _UNSUPPORTED), plus meshllm's own: top_k, ignore_eos (fixed-length runs), priority,
# max_tokens_cap (without max_tokens: at most this many, or until the context is full).
_COMMON_FIELDS = {
    "model", "max_tokens", "n", "seed", "stop", "stream", "stream_options", "temperature",
    "top_p", "user", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
    "top_k", "ignore_eos", "priority", "metadata", "store", "service_tier", "max_tokens_cap",
}  # fmt: skip
KNOWN_FIELDS: dict[str, frozenset[str]] = {
    "chat": frozenset(
        _COMMON_FIELDS
        | {
            "messages",
            "max_completion_tokens",
            "top_logprobs",
            "tools",
            "tool_choice",
            "functions",
            "function_call",
            "parallel_tool_calls",
            "response_format",
        }
    ),
    "completion": frozenset(_COMMON_FIELDS | {"prompt", "echo", "suffix", "best_of"}),
    "embedding": frozenset(
        {"model", "input", "encoding_format", "dimensions", "user", "input_type", "priority"}
    ),
}


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
            raise invalid_field(str(key), "is not a field of this request")
