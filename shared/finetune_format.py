"""OpenAI's fine-tuning file formats, checked line by line: one implementation for every
place a JSONL training file enters the mesh (``POST /v1/files`` at the trainer, dataset
uploads at the feedback service).

Two kinds of row, one kind per file:

- **chat** (supervised): ``{"messages": [{"role": "system"|"user"|"assistant", "content":
  "..."}, ...]}``; an assistant message may carry ``"weight": 0`` (not trained on) or
  ``1``; at least one assistant message is trained on.
- **preference** (DPO): ``{"input": {"messages": [...]}, "preferred_output": [{"role":
  "assistant", "content": "..."}], "non_preferred_output": [{...}]}``; the input ends with a
  user turn.

Tool calls, function definitions and content parts (images) are refused by name: the
trainer does not learn them yet, and a row silently trained without them would teach
something else. A message's ``name`` (which OpenAI's format allows) is accepted and not
trained on: the chat templates of the models served here have no place for it.

Worked example::

    >>> check_jsonl(b'{"messages": [{"role": "user", "content": "Hi"}, '
    ...             b'{"role": "assistant", "content": "Hello"}]}\\n').rows
    1
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["chat", "preference"]
ROLES = frozenset({"system", "user", "assistant"})
MAX_LINE_BYTES = 4 * 2**20
MAX_MESSAGES = 512
CHAT_KEYS = frozenset({"messages"})
PREFERENCE_KEYS = frozenset({"input", "preferred_output", "non_preferred_output"})
REFUSED = {
    "tools": "tool definitions are not supported for training yet",
    "functions": "function definitions are not supported for training yet",
    "parallel_tool_calls": "tool calls are not supported for training yet",
}


class FormatError(ValueError):
    """A line of a training file is not in the format; the message names the line."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    weight: int = 1  # assistant turns only: 0 is shown to the model but not trained on


@dataclass(frozen=True)
class ChatRow:
    messages: tuple[Message, ...]


@dataclass(frozen=True)
class PreferenceRow:
    prompt: tuple[Message, ...]
    preferred: str
    rejected: str


@dataclass(frozen=True)
class FileSummary:
    kind: Kind
    rows: int
    characters: int
    trained_turns: int  # chat: assistant turns trained on; preference: pairs


def _message(value: Any, line: int, where: str) -> Message:
    if not isinstance(value, dict):
        raise FormatError(line, f"{where} must be an object with a role and content")
    for key, why in (
        ("tool_calls", "tool calls are not supported for training yet"),
        ("function_call", "function calls are not supported for training yet"),
    ):
        if key in value:
            raise FormatError(line, f"{where}.{key}: {why}")
    unknown = sorted(set(value) - {"role", "content", "weight", "name"})
    if unknown:
        raise FormatError(line, f"{where} has unknown field(s): {', '.join(unknown)}")
    role = value.get("role")
    if role not in ROLES:
        raise FormatError(line, f"{where}.role must be one of system, user, assistant")
    content = value.get("content")
    if isinstance(content, list):
        raise FormatError(line, f"{where}.content: content parts are not supported; use text")
    if not isinstance(content, str):
        raise FormatError(line, f"{where}.content must be text")
    weight = value.get("weight", 1)
    if "weight" in value and (role != "assistant" or weight not in (0, 1) or weight is True):
        raise FormatError(line, f"{where}.weight must be 0 or 1, on assistant messages only")
    return Message(role, content, int(weight))


def _messages(value: Any, line: int, where: str) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise FormatError(line, f"{where} must be a non-empty list of messages")
    if len(value) > MAX_MESSAGES:
        raise FormatError(line, f"{where} has more than {MAX_MESSAGES} messages")
    return tuple(_message(m, line, f"{where}[{i}]") for i, m in enumerate(value))


def _output(value: Any, line: int, where: str) -> str:
    if not isinstance(value, list) or len(value) != 1:
        raise FormatError(line, f"{where} must be a list of one assistant message")
    message = _message(value[0], line, f"{where}[0]")
    if message.role != "assistant":
        raise FormatError(line, f"{where}[0].role must be assistant")
    return message.content


def _preference(row: dict[str, Any], line: int) -> PreferenceRow:
    unknown = sorted(set(row) - PREFERENCE_KEYS)
    missing = sorted(PREFERENCE_KEYS - set(row))
    if unknown:
        raise FormatError(line, f"unknown field(s): {', '.join(unknown)}")
    if missing:
        raise FormatError(line, f"missing field(s): {', '.join(missing)}")
    source = row["input"]
    if not isinstance(source, dict) or set(source) - {"messages"}:
        raise FormatError(line, "input must be an object with messages only")
    prompt = _messages(source.get("messages"), line, "input.messages")
    if prompt[-1].role != "user":
        raise FormatError(line, "input.messages must end with the user's turn")
    preferred = _output(row["preferred_output"], line, "preferred_output")
    rejected = _output(row["non_preferred_output"], line, "non_preferred_output")
    if preferred == rejected:
        raise FormatError(line, "preferred_output and non_preferred_output are the same")
    return PreferenceRow(prompt, preferred, rejected)


def parse_row(raw: bytes, line: int) -> tuple[Kind, ChatRow | PreferenceRow]:
    """One line as a row.

    Raises:
        FormatError: the line is not UTF-8 JSON in one of the two formats.
    """
    if len(raw) > MAX_LINE_BYTES:
        raise FormatError(line, f"longer than {MAX_LINE_BYTES} bytes")
    try:
        row = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise FormatError(line, f"not UTF-8 JSON ({error})") from None
    if not isinstance(row, dict):
        raise FormatError(line, "must be a JSON object")
    for key, why in REFUSED.items():
        if key in row:
            raise FormatError(line, f"{key}: {why}")
    if "messages" in row:
        unknown = sorted(set(row) - CHAT_KEYS)
        if unknown:
            raise FormatError(line, f"unknown field(s): {', '.join(unknown)}")
        messages = _messages(row["messages"], line, "messages")
        if not any(m.role == "assistant" and m.weight for m in messages):
            raise FormatError(line, "needs an assistant message to train on (weight 1)")
        return "chat", ChatRow(messages)
    if "input" in row:
        return "preference", _preference(row, line)
    raise FormatError(line, "needs 'messages' (chat) or 'input' (preference)")


def rows(data: bytes) -> Iterator[tuple[int, Kind, ChatRow | PreferenceRow]]:
    """Each non-blank line's number, kind and row, in order.

    Raises:
        FormatError: at the first bad line, or a line of another kind than the first's.
    """
    kind: Kind | None = None
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        this, row = parse_row(raw, number)
        if kind is not None and this != kind:
            raise FormatError(number, f"a {this} row in a file of {kind} rows")
        kind = this
        yield number, this, row


def check_jsonl(data: bytes, *, max_rows: int | None = None) -> FileSummary:
    """Check a whole file; what it holds.

    Raises:
        FormatError: the first bad line, too many rows, or no rows at all.
    """
    kinds: list[Kind] = []
    count = characters = trained = 0
    for number, kind, row in rows(data):
        kinds[:] = [kind]
        count += 1
        if max_rows is not None and count > max_rows:
            raise FormatError(number, f"more than {max_rows} rows")
        if isinstance(row, ChatRow):
            characters += sum(len(m.content) for m in row.messages)
            trained += sum(1 for m in row.messages if m.role == "assistant" and m.weight)
        else:
            characters += sum(len(m.content) for m in row.prompt)
            characters += len(row.preferred) + len(row.rejected)
            trained += 1
    if count == 0:
        raise FormatError(1, "the file has no rows")
    return FileSummary(kind=kinds[0], rows=count, characters=characters, trained_turns=trained)
