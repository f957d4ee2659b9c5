"""The fine-tuning file formats: every bad line is refused with its number and the field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.finetune_format import (
    MAX_LINE_BYTES,
    ChatRow,
    FormatError,
    PreferenceRow,
    check_jsonl,
    rows,
)

USER = {"role": "user", "content": "How many days of leave?"}
ANSWER = {"role": "assistant", "content": "27 days."}


def line(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode() + b"\n"


def chat(*messages: dict[str, Any]) -> bytes:
    return line({"messages": list(messages)})


def preference(preferred: str = "27 days.", rejected: str = "No idea.") -> bytes:
    return line({
        "input": {"messages": [USER]},
        "preferred_output": [{"role": "assistant", "content": preferred}],
        "non_preferred_output": [{"role": "assistant", "content": rejected}],
    })  # fmt: skip


def test_a_chat_file_is_summarised() -> None:
    system = {"role": "system", "content": "Be brief."}
    data = chat(system, USER, ANSWER) + b"\n  \n" + chat(USER, ANSWER, USER, ANSWER)
    summary = check_jsonl(data)
    assert (summary.kind, summary.rows, summary.trained_turns) == ("chat", 2, 3)
    assert summary.characters == sum(len(str(m["content"])) for m in (system, USER, ANSWER)) + (
        2 * (len(str(USER["content"])) + len(str(ANSWER["content"])))
    )


def test_weights_choose_the_trained_turns() -> None:
    data = chat(USER, {**ANSWER, "weight": 0}, USER, {**ANSWER, "weight": 1})
    ((_, _, row),) = rows(data)
    assert isinstance(row, ChatRow)
    assert [m.weight for m in row.messages] == [1, 0, 1, 1]
    with pytest.raises(FormatError, match="line 1: needs an assistant message to train on"):
        check_jsonl(chat(USER, {**ANSWER, "weight": 0}))


def test_a_preference_file_is_read() -> None:
    summary = check_jsonl(preference() + preference("Twenty-seven.", "Ask HR."))
    assert (summary.kind, summary.rows, summary.trained_turns) == ("preference", 2, 2)
    ((_, _, row),) = rows(preference())
    assert isinstance(row, PreferenceRow)
    assert (row.preferred, row.rejected, row.prompt[-1].role) == ("27 days.", "No idea.", "user")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "line 1: the file has no rows"),
        (b"\n\n", "line 1: the file has no rows"),
        (b"{not json\n", "line 1: not UTF-8 JSON"),
        (b"\xff\xfe\n", "line 1: not UTF-8 JSON"),
        (b"[1, 2]\n", "line 1: must be a JSON object"),
        (line({"prompt": "a", "completion": "b"}), "line 1: needs 'messages'"),
        (line({"messages": []}), "line 1: messages must be a non-empty list"),
        (line({"messages": "hi"}), "line 1: messages must be a non-empty list"),
        (chat(USER, {"role": "robot", "content": "x"}), r"messages\[1\].role must be one of"),
        (chat(USER, {"role": "assistant", "content": None}), r"messages\[1\].content must be"),
        (chat(USER, {"role": "assistant", "content": [{"type": "text"}]}), "content parts"),
        (chat({**USER, "weight": 0}, ANSWER), r"messages\[0\].weight must be 0 or 1"),
        (chat(USER, {**ANSWER, "weight": 2}), r"messages\[1\].weight must be 0 or 1"),
        (chat(USER, {**ANSWER, "weight": True}), r"messages\[1\].weight must be 0 or 1"),
        (chat(USER, {**ANSWER, "extra": 1}), r"messages\[1\] has unknown field\(s\): extra"),
        (chat(USER, {**ANSWER, "tool_calls": []}), r"messages\[1\].tool_calls: tool calls"),
        (line({"messages": [USER, ANSWER], "tools": []}), "line 1: tools: tool definitions"),
        (line({"messages": [USER, ANSWER], "x": 1}), r"unknown field\(s\): x"),
        (chat(USER, ANSWER) + b"{\n", "line 2: not UTF-8 JSON"),
        (chat(USER, ANSWER) + preference(), "line 2: a preference row in a file of chat rows"),
        (preference("same", "same"), "are the same"),
        (line({"input": {"messages": [USER]}, "preferred_output": []}), "missing field"),
        (
            line(
                {
                    "input": {"messages": [USER, ANSWER]},
                    "preferred_output": [ANSWER],
                    "non_preferred_output": [{"role": "assistant", "content": "no"}],
                }
            ),
            "must end with the user's turn",
        ),
        (
            line(
                {
                    "input": {"messages": [USER]},
                    "preferred_output": [USER],
                    "non_preferred_output": [ANSWER],
                }
            ),
            r"preferred_output\[0\].role must be assistant",
        ),
    ],
)
def test_bad_lines_are_named(data: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        check_jsonl(data)


def test_limits() -> None:
    long = chat(USER, {"role": "assistant", "content": "x" * MAX_LINE_BYTES})
    with pytest.raises(FormatError, match="line 1: longer than"):
        check_jsonl(long)
    with pytest.raises(FormatError, match="line 3: more than 2 rows"):
        check_jsonl(chat(USER, ANSWER) * 3, max_rows=2)
    deep = chat(*([USER, ANSWER] * 300))
    with pytest.raises(FormatError, match="more than 512 messages"):
        check_jsonl(deep)
