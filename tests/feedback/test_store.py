"""The feedback store's contract, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import asyncio

from services.feedback.datasets import Builder, DatasetSpec, build, manifest
from services.feedback.examples import Message
from services.feedback.store import COLUMNS, SCHEMA, FeedbackQuery, FeedbackStore
from tests.feedback.conftest import example


async def test_a_later_rating_replaces_an_earlier_one_and_an_older_one_never_does(
    store: FeedbackStore,
) -> None:
    assert await store.put(example(rating=1, rated_at_ns=100))
    assert await store.put(example(rating=-1, correction="Use the VPN portal.", rated_at_ns=200))
    assert not await store.put(example(rating=1, rated_at_ns=150))  # a late redelivery
    [kept] = await store.query(FeedbackQuery("acme", request_id="r1"))
    assert (kept.rating, kept.correction, kept.rated_at_ns) == (-1, "Use the VPN portal.", 200)
    assert await store.count() == 1


async def test_the_same_event_stored_again_and_again_is_one_example(store: FeedbackStore) -> None:
    await asyncio.gather(*(store.put(example()) for _ in range(20)))
    assert await store.count() == 1


async def test_each_rater_of_an_answer_has_an_example(store: FeedbackStore) -> None:
    await store.put(example(subject="alice"))
    await store.put(example(subject="bob", rating=-1))
    found = await store.query(FeedbackQuery("acme", request_id="r1"))
    assert sorted(e.subject for e in found) == ["alice", "bob"]


async def test_queries_see_one_tenant_only_and_page_through_everything(
    store: FeedbackStore,
) -> None:
    for n in range(7):
        await store.put(example(f"r{n}", rated_at_ns=1000 + n // 2))  # ties on the time
    await store.put(example("other", tenant="globex"))
    seen: list[str] = []
    after = None
    while True:
        page = await store.query(FeedbackQuery("acme", limit=3, after=after))
        seen += [e.request_id for e in page]
        if len(page) < 3:
            break
        last = page[-1]
        after = (last.rated_at_ns, last.request_id, last.subject)
    assert sorted(seen) == [f"r{n}" for n in range(7)]
    assert len(seen) == 7
    assert await store.query(FeedbackQuery("initech")) == []


async def test_quality_counts_per_model_version(store: FeedbackStore) -> None:
    await store.put(example("a", rating=1))
    await store.put(example("b", rating=-1, correction="better"))
    await store.put(example("c", rating=1, model_version="2"))
    await store.put(example("d", tenant="globex", model_version="2"))
    assert [(q.model_version, q.rated) for q in await store.quality("globex")] == [("2", 1)]
    rows = {(q.model_version): q for q in await store.quality("acme")}
    assert (rows["1"].rated, rows["1"].up, rows["1"].down, rows["1"].corrected) == (2, 1, 1, 1)
    assert (rows["2"].rated, rows["2"].up) == (1, 1)


def _dataset(store: FeedbackStore, name: str, examples: list, kind: str = "chat") -> object:  # type: ignore[type-arg]
    spec = DatasetSpec(tenant="acme", name=name, kind=kind)
    built = build(examples, spec, lambda text: (text, 0), lambda text: [])

    def make(version: int, erased: set[str]) -> tuple[dict, object]:  # type: ignore[type-arg]
        kept = built.without(erased)
        made = manifest(spec, kept, dataset_id=f"{name}-v{version}", version=version,
                        created_at="2026-12-07T00:00:00Z", pii_policy={})  # fmt: skip
        return made, kept.rows

    return store.add_dataset("acme", name, 1, make)  # type: ignore[arg-type]


async def test_versions_count_up_and_rows_come_back_in_order(store: FeedbackStore) -> None:
    rows = [example(f"r{n}") for n in range(30)]
    first = await _dataset(store, "support", rows)  # type: ignore[misc]
    second = await _dataset(store, "support", rows[:5])  # type: ignore[misc]
    assert (first["id"], second["id"]) == ("support-v1", "support-v2")
    train = await store.lines("acme", "support-v1", "train")
    evaluation = await store.lines("acme", "support-v1", "eval")
    assert len(train) + len(evaluation) == 30
    assert [m["id"] for m in await store.datasets("acme")] == ["support-v1", "support-v2"]
    assert await store.datasets("globex") == []
    assert await store.dataset("globex", "support-v1") is None


async def test_an_erasure_removes_a_request_from_unused_datasets_and_names_trained_models(
    store: FeedbackStore,
) -> None:
    rows = [example(f"r{n}") for n in range(10)]
    await store.put(rows[3])
    await _dataset(store, "unused", rows)  # type: ignore[misc]
    await _dataset(store, "trained", rows)  # type: ignore[misc]
    await store.mark_used("acme", "trained-v1", "smollm2-135m-instruct:ft-1")
    before = await store.dataset("acme", "unused-v1")
    report = await store.erase("acme", "r3", 5)
    assert report["examples_removed"] == 1
    assert report["datasets_changed"] == ["unused-v1"]
    assert report["trained_models"] == ["smollm2-135m-instruct:ft-1"]
    after = await store.dataset("acme", "unused-v1")
    assert after is not None
    assert before is not None
    assert after["rows"] == before["rows"] - 1
    assert after["sha256"] != before["sha256"]
    assert "r3" not in after["source_request_ids"]
    assert after["erased_request_ids"] == ["r3"]
    lines = await store.lines("acme", "unused-v1", "train") + await store.lines(
        "acme", "unused-v1", "eval"
    )
    assert not any("(r3)" in line for line in lines)
    trained = await store.lines("acme", "trained-v1", "train") + await store.lines(
        "acme", "trained-v1", "eval"
    )
    assert any("(r3)" in line for line in trained)


async def test_erasing_either_side_of_a_preference_pair_removes_the_pair(
    store: FeedbackStore,
) -> None:
    same = (Message("user", "How do I reset my VPN password?"),)
    rows = [
        example("good", messages=same, answer="Open /vpn and press Reset.", rated_at_ns=5),
        example("bad", messages=same, answer="Call your bank.", rating=-1, rated_at_ns=3),
        example("fixed", rating=-1, correction="Use the portal."),
    ]
    for row in rows:
        await store.put(row)
    made = await _dataset(store, "pairs", rows, "preference")  # type: ignore[misc]
    assert made["source_request_ids"] == ["bad", "fixed", "good"]
    report = await store.erase("acme", "bad", 5)  # the rejected side
    assert report["datasets_changed"] == ["pairs-v1"]
    after = await store.dataset("acme", "pairs-v1")
    assert after is not None
    assert after["rows"] == 1
    assert after["source_request_ids"] == ["fixed"]  # the pair's other side went with it
    lines = await store.lines("acme", "pairs-v1", "train") + await store.lines(
        "acme", "pairs-v1", "eval"
    )
    assert not any("Call your bank" in line for line in lines)


async def test_retention_purges_old_feedback_of_the_tenant_only(store: FeedbackStore) -> None:
    await store.put(example("old", rated_at_ns=10))
    await store.put(example("new", rated_at_ns=1_000))
    await store.put(example("theirs", tenant="globex", rated_at_ns=10))
    assert await store.purge("acme", 500) == 1
    assert [e.request_id for e in await store.query(FeedbackQuery("acme"))] == ["new"]
    assert await store.purge(None, 500, keep=["acme"]) == 1
    assert await store.query(FeedbackQuery("globex")) == []


async def test_an_erased_request_does_not_come_back_with_any_rating(
    store: FeedbackStore,
) -> None:
    await store.put(example("gone", rated_at_ns=100))
    await store.erase("acme", "gone", 500)
    assert not await store.put(example("gone", rated_at_ns=100))  # redelivered
    assert not await store.put(example("gone", rated_at_ns=400, subject="bob"))  # in flight
    assert not await store.put(example("gone", rated_at_ns=600))  # nor a new rating
    assert await store.query(FeedbackQuery("acme", request_id="gone")) == []
    assert await store.put(example("gone", tenant="globex", rated_at_ns=600))  # theirs


async def test_retention_empties_old_datasets_but_keeps_their_manifests(
    store: FeedbackStore,
) -> None:
    await _dataset(store, "old", [example(f"r{n}") for n in range(5)])  # type: ignore[misc]
    assert await store.purge_datasets("acme", 2, now_ns=7) == 1  # built at 1
    assert await store.purge_datasets("acme", 2, now_ns=8) == 0  # once
    manifest = await store.dataset("acme", "old-v1")
    assert manifest is not None
    assert manifest["content_purged_at_ns"] == 7
    assert manifest["sha256"]
    assert await store.lines("acme", "old-v1", "train") == []
    assert await store.purge_datasets(None, 2, now_ns=9, keep=["acme"]) == 0


async def test_ratings_racing_an_erasure_never_outlive_it(store: FeedbackStore) -> None:
    ratings = [example("race", subject=f"s{n}", rated_at_ns=n) for n in range(40)]
    await asyncio.gather(
        *(store.put(e) for e in ratings[:20]),
        store.erase("acme", "race", 10_000),
        *(store.put(e) for e in ratings[20:]),
    )
    assert await store.query(FeedbackQuery("acme", request_id="race")) == []


async def test_the_prompt_of_a_sourced_answer_is_kept(store: FeedbackStore) -> None:
    prompt = (Message("system", "Answer from the sources."), Message("user", "<sources>…"))
    await store.put(example(prompt=prompt))
    [kept] = await store.query(FeedbackQuery("acme", request_id="r1"))
    assert kept.prompt == prompt


async def test_a_store_made_before_prompts_were_kept_gains_the_column(
    store: FeedbackStore,
) -> None:
    await store.driver.execute("DROP TABLE examples")
    old = SCHEMA[0].replace(", prompt TEXT NOT NULL DEFAULT '[]'", "")
    assert "prompt" not in old
    await store.driver.execute(old)
    columns = COLUMNS.replace(", prompt", "")
    await store.driver.execute(
        f"INSERT INTO examples ({columns}) VALUES ({', '.join('?' * 20)})",
        ["acme", "old", "key-1", "k1", 1, 0, "[]", "", "", "m", "1", "chat",
         '[{"role": "user", "content": "hi"}]', "hello", "stop", "[]", 5, 4, "e-old", 0],
    )  # fmt: skip
    await store.open()
    await store.open()  # and again: nothing to add
    [kept] = await store.query(FeedbackQuery("acme", request_id="old"))
    assert (kept.messages, kept.prompt) == ((Message("user", "hi"),), ())
    assert await store.put(example(prompt=(Message("user", "<sources>"),)))


async def test_a_build_reads_the_history_a_page_at_a_time_and_gets_the_same_rows(
    store: FeedbackStore,
) -> None:
    for number in range(25):  # two ratings share each moment: the cursor breaks ties
        await store.put(example(f"r{number:02d}", rated_at_ns=1_000 + number // 2,
                                correction=f"Answer {number % 20}."))  # fmt: skip
    pages = [page async for page in store.pages("acme", None, None, size=10)]
    assert [len(page) for page in pages] == [10, 10, 5]
    flat = [e for page in pages for e in page]
    assert [e.rated_at_ns for e in flat] == sorted((e.rated_at_ns for e in flat), reverse=True)
    assert len({e.request_id for e in flat}) == 25
    spec = DatasetSpec("acme", "paged", max_rows=18)
    builder = Builder(spec, lambda text: (text, 0), lambda text: [])
    for page in pages:
        builder.add_all(page)
    assert builder.result() == build(flat, spec, lambda text: (text, 0), lambda text: [])
    assert builder.result().counts.over_max_rows == 7


async def test_a_request_erased_while_a_build_read_is_not_in_the_dataset(
    store: FeedbackStore,
) -> None:
    rows = [example("kept"), example("gone")]
    for row in rows:
        await store.put(row)
    await store.erase("acme", "gone", 5)  # after the build read it, before it stored
    made = await _dataset(store, "raced", rows)  # type: ignore[misc]
    assert made["source_request_ids"] == ["kept"]
    assert made["counts"]["erased"] == 1
