"""Datasets from rated answers: what qualifies, PII, deduplication, lengths, splits, uploads;
and the bodies of the feedback routes."""

from __future__ import annotations

import json

import pytest

from services.feedback.datasets import (
    DatasetFilters,
    DatasetSpec,
    build,
    examples_from_jsonl,
    manifest,
    split_of,
)
from services.feedback.examples import Message
from services.feedback.quality import wilson
from services.feedback.service import scan_structured
from shared.feedback_requests import parse_dataset_request, parse_rating
from shared.finetune_format import FormatError
from shared.openai_protocol import InvalidRequestError
from shared.pii import Purpose, TenantPiiSettings
from tests.feedback.conftest import example

SEEDED = {  # one of each structured type
    "phone": "13812345678",
    "email": "li.lei@example.com",
    "id_card": "11010519491231002X",
    "bank_card": "6222020200112233446",
    "ip": "203.0.113.77",
    "passport": "E12345678",
}


def _training(tenant: str = "acme"):  # type: ignore[no-untyped-def]
    redactor = TenantPiiSettings().redactor(tenant, Purpose.TRAINING)
    return lambda text: (redactor.redact(text).text, redactor.redact(text).total)


def test_corrections_and_well_rated_answers_make_rows_and_the_rest_do_not() -> None:
    rows = [
        example("up", rating=1),
        example("down", rating=-1),
        example("fixed", rating=-1, correction="Use the self-service portal."),
        example("three", rating=0, score=3),
        example("five", rating=1, score=5),
    ]
    built = build(rows, DatasetSpec("acme", "s"), _training(), scan_structured)
    assert set(built.source_request_ids) == {"up", "fixed", "five"}
    assert built.counts.below_rating == 2
    fixed = next(json.loads(r.line) for r in built.rows if r.request_id == "fixed")
    assert fixed["messages"][-1] == {"role": "assistant", "content": "Use the self-service portal."}


@pytest.mark.parametrize("field", ["question", "answer", "correction"])
def test_no_structured_pii_survives_in_any_field(field: str) -> None:
    text = "details: " + ", ".join(SEEDED.values())
    changes = {
        "question": {"messages": (Message("system", "be brief"), Message("user", text))},
        "answer": {"answer": "sure " + text},
        "correction": {"correction": "the right answer " + text, "rating": -1},
    }[field]
    built = build([example(**changes)], DatasetSpec("acme", "s"), _training(), scan_structured)
    [row] = built.rows
    for value in SEEDED.values():
        assert value not in row.line
    assert scan_structured(row.line) == []
    assert built.counts.pii_redacted >= len(SEEDED) - 1  # the IP and passport need context


def test_a_row_with_pii_the_policy_let_through_is_dropped_by_the_residue_scan() -> None:
    nothing = lambda text: (text, 0)  # noqa: E731 - a tenant whose training policy is off
    built = build([example(answer="call 13812345678")], DatasetSpec("acme", "s"), nothing,
                  scan_structured)  # fmt: skip
    assert built.rows == ()
    assert built.counts.pii_residue == 1
    assert built.residue_types == {"phone": 1}


def test_duplicates_count_once_and_long_or_empty_rows_are_left_out() -> None:
    same = (Message("user", "How do I reset my VPN password?"),)
    rows = [
        example("a", messages=same, rated_at_ns=1),
        example(
            "b", messages=(Message("user", "how do I  reset my vpn PASSWORD?"),), rated_at_ns=2
        ),
        example("long", answer="x" * 500),
        example("empty", messages=(Message("user", "  "),)),
    ]
    built = build(rows, DatasetSpec("acme", "s", max_chars=300), _training(), scan_structured)
    assert built.source_request_ids == ("b",)  # the newest of the two duplicates
    assert (built.counts.duplicate, built.counts.too_long, built.counts.empty) == (1, 1, 1)


def test_the_split_is_stable_and_near_the_fraction_asked() -> None:
    ids = [f"req-{n}" for n in range(4000)]
    share = sum(split_of(i, 0.1) == "eval" for i in ids) / len(ids)
    assert 0.08 < share < 0.12
    assert [split_of(i, 0.1) for i in ids] == [split_of(i, 0.1) for i in ids]


def test_filters_and_the_manifest() -> None:
    rows = [example("a", labels=("vpn",), rated_at_ns=10), example("b", rated_at_ns=20),
            example("c", model_version="2", labels=("vpn",), rated_at_ns=30)]  # fmt: skip
    spec = DatasetSpec("acme", "s", DatasetFilters(labels=("vpn",), model_version="1"))
    built = build(rows, spec, _training(), scan_structured)
    made = manifest(spec, built, dataset_id="s-v1", version=1, created_at="t", pii_policy={})
    assert made["source_request_ids"] == ["a"]
    assert made["splits"]["train"]["rows"] + made["splits"]["eval"]["rows"] == 1
    assert made["filters"]["labels"] == ["vpn"]
    assert made["pii_policy"]["purpose"] == "training"


def test_an_uploaded_file_is_checked_line_by_line() -> None:
    good = json.dumps({"messages": [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "hello"}]})  # fmt: skip
    examples = examples_from_jsonl((good + "\n\n" + good).encode(), "acme", uploaded_at_ns=1)
    assert len(examples) == 2
    assert examples[0].correction == "hello"
    with pytest.raises(FormatError, match="line 2"):
        examples_from_jsonl((good + "\n{not json").encode(), "acme", uploaded_at_ns=1)
    last_user = json.dumps({"messages": [{"role": "assistant", "content": "a"},
                                         {"role": "user", "content": "b"}]})  # fmt: skip
    with pytest.raises(FormatError, match="line 1: the last message"):
        examples_from_jsonl(last_user.encode(), "acme", uploaded_at_ns=1)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"rating": "up"}, "request_id"),
        ({"request_id": "a/b", "rating": "up"}, "request_id"),
        ({"request_id": "r1", "rating": 6}, "rating"),
        ({"request_id": "r1", "rating": True}, "rating"),
        ({"request_id": "r1", "rating": "meh"}, "rating"),
        ({"request_id": "r1", "rating": "up", "correction": "x" * 32_001}, "correction"),
        ({"request_id": "r1", "rating": "up", "labels": ["x"] * 17}, "labels"),
        ({"request_id": "r1", "rating": "up", "comment": 5}, "comment"),
        ({"request_id": "r1", "rating": "up", "extra": 1}, "extra"),
    ],
)
def test_a_bad_rating_names_its_field(body: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        parse_rating(body)
    assert raised.value.param == field


def test_scores_map_onto_up_and_down() -> None:
    assert [parse_rating({"request_id": "r", "rating": s}).rating for s in range(1, 6)] == [
        -1, -1, 0, 1, 1,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "name"),
        ({"name": "Bad Name"}, "name"),
        ({"name": "s", "min_rating": 0}, "min_rating"),
        ({"name": "s", "since": "2026-01-01"}, "since"),
        ({"name": "s", "since": 20, "until": 10}, "until"),
        ({"name": "s", "eval_fraction": 0.9}, "eval_fraction"),
        ({"name": "s", "corrections": "yes"}, "corrections"),
        ({"name": "s", "sources": 1}, "sources"),
        ({"name": "s", "kind": "pairs"}, "kind"),
        ({"name": "s", "kind": "preference", "min_rating": 2}, "min_rating"),
    ],
)
def test_a_bad_dataset_request_names_its_field(body: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        parse_dataset_request(body)
    assert raised.value.param == field


def test_wilson_intervals() -> None:
    assert wilson(0, 0) == (0.0, 1.0)
    low, high = wilson(0, 3)
    assert low == pytest.approx(0.0, abs=1e-12)
    assert 0.55 < high < 0.57
    low, high = wilson(80, 100)
    assert 0.70 < low < 0.72
    assert 0.86 < high < 0.88


def test_values_the_feedback_policy_masked_are_dropped_for_training() -> None:
    from services.feedback.service import training_redaction
    from services.feedback.settings import FeedbackSettings

    stored = "call [PHONE:***5678] or write [EMAIL:l***@example.com]; a [NOTE:kept] bracket"
    text, found = training_redaction(FeedbackSettings(), "acme")(stored)
    assert text == "call [PHONE] or write [EMAIL]; a [NOTE:kept] bracket"
    assert found == 2


@pytest.mark.parametrize("value", ["2300-01-01T00:00:00+00:00", "1969-12-31T00:00:00+00:00"])
def test_times_outside_what_the_store_holds_are_refused(value: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        parse_dataset_request({"name": "s", "since": value})
    assert raised.value.param == "since"


@pytest.mark.parametrize("cursor", ["9" * 5000 + "~r~s", str(2**63) + "~r~s", "x~r~s", "1~r"])
def test_a_cursor_this_api_did_not_give_is_a_400(cursor: str) -> None:
    from services.feedback.api import _cursor

    with pytest.raises(InvalidRequestError) as raised:
        _cursor(cursor)
    assert raised.value.param == "after"


def test_a_subject_with_a_tilde_pages_on() -> None:
    from services.feedback.api import _cursor

    assert _cursor("12~req-1~user~with~tildes") == (12, "req-1", "user~with~tildes")


def test_every_free_text_field_of_a_stored_example_is_redacted() -> None:
    text = "reach me: " + ", ".join(SEEDED.values())
    raw = example(
        messages=(Message("system", text), Message("user", text)),
        prompt=(Message("system", text), Message("user", f"<sources>{text}</sources> {text}")),
        answer=text, correction=text, comment=text, labels=(f"caller {SEEDED['email']}",),
    )  # fmt: skip
    redactor = TenantPiiSettings().redactor("acme", Purpose.FEEDBACK)
    stored = raw.redacted(lambda t: (redactor.redact(t).text, redactor.redact(t).total))
    fields = [m.content for m in (*stored.messages, *stored.prompt)]
    fields += [stored.answer, stored.correction, stored.comment, *stored.labels]
    for field in fields:
        assert scan_structured(field) == [], field
        for value in SEEDED.values():
            assert value not in field
    assert stored.redactions >= 5 * (len(SEEDED) - 1)


SOURCED = (
    Message("system", "Answer from the sources."),
    Message("user", "<sources>[1] Staff get 25 days of paid leave. HR: hr@example.com</sources>"
                    "\n\nQuestion: How many vacation days?"),
)  # fmt: skip


def test_a_row_of_a_sourced_answer_holds_the_prompt_the_model_was_given() -> None:
    rows = [
        example("rag", messages=(Message("user", "How many vacation days?"),), prompt=SOURCED,
                correction="25 days [1]."),
        example("plain"),
    ]  # fmt: skip
    built = build(rows, DatasetSpec("acme", "s"), _training(), scan_structured)
    assert built.counts.with_sources == 1
    lines = {row.request_id: json.loads(row.line)["messages"] for row in built.rows}
    assert [m["role"] for m in lines["rag"]] == ["system", "user", "assistant"]
    assert "Staff get 25 days of paid leave." in lines["rag"][1]["content"]
    assert "hr@example.com" not in lines["rag"][1]["content"]  # the training policy, sources too
    assert lines["rag"][2]["content"] == "25 days [1]."
    assert lines["plain"][0]["content"].startswith("How do I reset my VPN password?")

    withheld = example("acl", retrieved_chunk_ids=("doc-9#0",), correction="Ask HR [1].")
    built = build([*rows, withheld], DatasetSpec("acme", "s"), _training(), scan_structured)
    assert built.counts.sources_withheld == 1
    assert "acl" not in built.source_request_ids

    without = DatasetSpec("acme", "s", DatasetFilters(sources=False))
    built = build(rows, without, _training(), scan_structured)
    assert built.counts.with_sources == 0
    rag_row = next(json.loads(r.line)["messages"] for r in built.rows if r.request_id == "rag")
    assert rag_row[0] == {"role": "user", "content": "How many vacation days?"}


PREFERENCE = DatasetSpec("acme", "p", kind="preference")
SAME = (Message("user", "How do I reset my VPN password?"),)


def test_a_correction_is_preferred_to_the_answer_it_corrects() -> None:
    rows = [example("fixed", rating=-1, correction="Use the self-service portal at /vpn.")]
    built = build(rows, PREFERENCE, _training(), scan_structured)
    [row] = built.rows
    pair = json.loads(row.line)
    assert pair["input"]["messages"][-1]["role"] == "user"
    assert pair["preferred_output"] == [
        {"role": "assistant", "content": "Use the self-service portal at /vpn."}
    ]
    assert pair["non_preferred_output"] == [
        {"role": "assistant", "content": "Open the portal and choose Reset."}
    ]
    from shared.finetune_format import check_jsonl

    assert check_jsonl((row.line + "\n").encode()).kind == "preference"  # the trainer reads it


def test_up_and_down_answers_of_the_same_prompt_pair_up_newest_first() -> None:
    rows = [
        example("up-old", messages=SAME, answer="Use the portal.", rated_at_ns=1),
        example("up-new", messages=SAME, answer="Open /vpn and press Reset.", rated_at_ns=5),
        example("down", messages=SAME, answer="Call your bank.", rating=-1, rated_at_ns=3),
        example("lonely-down", rating=-1),  # another prompt: no partner
        example("meh", messages=SAME, rating=0, score=3),  # neither side
    ]
    built = build(rows, PREFERENCE, _training(), scan_structured)
    [row] = built.rows
    pair = json.loads(row.line)
    assert pair["preferred_output"][0]["content"] == "Open /vpn and press Reset."
    assert pair["non_preferred_output"][0]["content"] == "Call your bank."
    assert row.request_id == "up-new"  # the split follows the preferred answer
    assert set(built.source_request_ids) == {"up-new", "down"}
    assert built.counts.unpaired == 2  # up-old and lonely-down
    assert built.counts.below_rating == 1
    assert built.without({"down"}).rows == ()  # erasing either side drops the pair


def test_raters_who_disagree_about_one_answer_make_no_pair() -> None:
    rows = [
        example("r1", subject="alice", messages=SAME, rated_at_ns=2),
        example("r1", subject="bob", messages=SAME, rating=-1, rated_at_ns=1),
        example("r2", messages=SAME, rating=-1, rated_at_ns=0),  # the same text as r1's
    ]
    built = build(rows, PREFERENCE, _training(), scan_structured)
    assert built.rows == ()
    assert built.counts.unpaired == 2


def test_a_preference_pair_has_its_pii_redacted_and_its_manifest_says_so() -> None:
    text = "mail li.lei@example.com"
    rows = [example("fixed", rating=-1, correction="Write to it: " + text, answer="no " + text)]
    built = build(rows, PREFERENCE, _training(), scan_structured)
    [row] = built.rows
    assert "li.lei@example.com" not in row.line
    made = manifest(PREFERENCE, built, dataset_id="p-v1", version=1, created_at="now",
                    pii_policy={})  # fmt: skip
    assert (made["kind"], made["format"]) == ("preference", "openai-preference-jsonl")
