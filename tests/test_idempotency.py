"""The processed-event store: what a consumer group remembers across restarts."""

from __future__ import annotations

from pathlib import Path

from shared.bus.idempotency import MemoryIdempotencyStore, SqliteIdempotencyStore


def test_marks_survive_a_restart(tmp_path: Path) -> None:
    store = SqliteIdempotencyStore(tmp_path / "p.sqlite", window=1_000)
    store.mark(["a", "b"])
    store.mark(["b", "c"])
    store.close()
    reopened = SqliteIdempotencyStore(tmp_path / "p.sqlite", window=1_000)
    assert all(reopened.seen(e) for e in "abc")
    assert not reopened.seen("d")


def test_only_the_newest_window_is_kept(tmp_path: Path) -> None:
    store = SqliteIdempotencyStore(tmp_path / "p.sqlite", window=1_000)
    ids = [f"e{i}" for i in range(2_500)]
    for event_id in ids:
        store.mark([event_id])
    assert store.seen(ids[-1])
    assert not store.seen(ids[0])
    store.close()
    reopened = SqliteIdempotencyStore(tmp_path / "p.sqlite", window=1_000)
    kept = [e for e in ids if reopened.seen(e)]
    assert kept == ids[-len(kept) :]
    assert 1_000 <= len(kept) <= 1_100


def test_memory_store_forgets_oldest_first() -> None:
    store = MemoryIdempotencyStore(window=1_000)
    store.mark([f"e{i}" for i in range(1_500)])
    assert store.seen("e1499")
    assert not store.seen("e0")
