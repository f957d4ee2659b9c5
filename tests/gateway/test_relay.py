"""The reply relay on its own: gaps, duplicates, out-of-order chunks, re-runs and divergence."""

from __future__ import annotations

from services.gateway.relay import Delta, Diverged, Pending, Relayed, ReplyRelay
from shared.events.v1 import events_pb2 as ev


def chunk(sequence: int, delta: str, run: str = "a", choice: int = 0) -> ev.ReplyChunk:
    return ev.ReplyChunk(
        request_id="r", run=run, sequence=sequence, delta=delta, choice_index=choice
    )


def final(*texts: str, error: bool = False) -> ev.FinalReply:
    reply = ev.FinalReply(request_id="r")
    if error:
        reply.error.code = "inference_unavailable"
        return reply
    for index, text in enumerate(texts):
        reply.choices.add(index=index, text=text, finish_reason="stop")
    return reply


def drain(pending: Pending) -> list[Relayed]:
    items = []
    while not pending.queue.empty():
        items.append(pending.queue.get_nowait())
    return items


def client_text(items: list[Relayed], choice: int = 0) -> str:
    return "".join(i.text for i in items if isinstance(i, Delta) and i.choice_index == choice)


def feed(*replies: ev.ReplyChunk | ev.FinalReply, stream: bool = True) -> list[Relayed]:
    relay = ReplyRelay()
    pending = relay.open("r", stream=stream)
    for reply in replies:
        relay.accept(reply)
    return drain(pending)


def test_chunks_in_order_then_the_final_reply() -> None:
    items = feed(chunk(0, "the "), chunk(1, "quick"), final("the quick"))
    assert items[:2] == [Delta(0, "the "), Delta(0, "quick")]
    assert isinstance(items[2], ev.FinalReply)
    assert len(items) == 3


def test_a_duplicate_chunk_is_dropped() -> None:
    items = feed(chunk(0, "the "), chunk(0, "the "), chunk(1, "fox"), chunk(1, "fox"))
    assert client_text(items) == "the fox"
    assert len(items) == 2


def test_an_early_chunk_waits_for_the_ones_before_it() -> None:
    items = feed(chunk(2, "fox"), chunk(0, "the "), chunk(1, "brown "))
    assert client_text(items) == "the brown fox"
    # "fox" waited until "brown " had arrived: nothing out of order reaches the client
    assert items == [Delta(0, "the "), Delta(0, "brown fox")]


def test_a_gap_is_filled_by_the_final_reply_before_it_ends_the_stream() -> None:
    items = feed(chunk(0, "the "), chunk(2, "fox"), final("the brown fox"))
    assert items[:2] == [Delta(0, "the "), Delta(0, "brown fox")]
    assert isinstance(items[2], ev.FinalReply)


def test_a_rerun_cut_differently_continues_where_the_client_is() -> None:
    items = feed(
        chunk(0, "the "),
        chunk(1, "quick "),  # the first run dies here
        chunk(0, "the quick ", run="b"),
        chunk(1, "brown ", run="b"),
        chunk(2, "fox", run="b"),
        final("the quick brown fox"),
    )
    assert client_text(items) == "the quick brown fox"
    assert [i.text for i in items if isinstance(i, Delta)] == ["the ", "quick ", "brown ", "fox"]


def test_a_rerun_shorter_than_what_was_sent_waits_then_continues() -> None:
    items = feed(
        chunk(0, "the "),
        chunk(1, "quick "),
        chunk(0, "the ", run="b"),
        chunk(1, "qu", run="b"),
        chunk(2, "ick brown", run="b"),
    )
    assert client_text(items) == "the quick brown"


def test_a_rerun_that_diverges_ends_the_stream_without_splicing() -> None:
    items = feed(
        chunk(0, "the "),
        chunk(1, "quick "),
        chunk(0, "a ", run="b"),  # another replica answers differently
        chunk(1, "slow fox", run="b"),
        final("a slow fox"),
    )
    assert items[:2] == [Delta(0, "the "), Delta(0, "quick ")]
    assert items[2] == Diverged(0, sent="the quick ", run_text="a ")
    assert len(items) == 3  # nothing after the divergence, not even the final reply


def test_a_final_reply_that_contradicts_the_stream_is_a_divergence() -> None:
    diverged = feed(chunk(0, "the quick "), final("the slow fox"))
    assert diverged[1] == Diverged(0, sent="the quick ", run_text="the slow fox")
    assert len(diverged) == 2
    shorter = feed(chunk(0, "the quick "), final("the "))
    assert isinstance(shorter[-1], Diverged)


def test_late_chunks_of_a_superseded_run_are_dropped() -> None:
    relay = ReplyRelay()
    pending = relay.open("r")
    for reply in (chunk(0, "the "), chunk(0, "the ", run="b"), chunk(1, "quick", run="a")):
        relay.accept(reply)
    relay.accept(chunk(1, "lazy", run="b"))
    assert client_text(drain(pending)) == "the lazy"
    assert relay.dropped == 2  # b's catching-up chunk, a's late one


def test_choices_are_relayed_independently() -> None:
    items = feed(
        chunk(0, "red", choice=0),
        chunk(0, "blue", choice=1),
        chunk(1, " green", choice=1),
        final("red", "blue green"),
    )
    assert client_text(items, 0) == "red"
    assert client_text(items, 1) == "blue green"
    assert isinstance(items[-1], ev.FinalReply)


def test_an_error_reply_ends_the_stream_as_it_is() -> None:
    items = feed(chunk(0, "the "), final(error=True), final("the fox"))
    assert items[0] == Delta(0, "the ")
    assert isinstance(items[1], ev.FinalReply)
    assert items[1].HasField("error")
    assert len(items) == 2  # the first final reply ends the request


def test_a_whole_body_request_takes_only_the_final_reply() -> None:
    items = feed(chunk(0, "the "), final("the fox"), stream=False)
    assert len(items) == 1
    assert isinstance(items[0], ev.FinalReply)


def test_replies_of_requests_not_in_flight_here_are_dropped() -> None:
    relay = ReplyRelay()
    relay.open("mine")
    relay.accept(ev.ReplyChunk(request_id="theirs", run="a", delta="x"))
    assert relay.dropped == 1
