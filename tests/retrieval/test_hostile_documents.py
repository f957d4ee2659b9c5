"""Hostile documents: limits on pages, text and chunks; a parser that hangs, runs out of
memory or crashes stops only its own child process; such a document is reported failed
and dead-lettered, and the next one is indexed.

The parser runs as in production, in a child process (:mod:`services.retrieval.sandbox`);
the misbehaving parsers are the same worker wrapped around a bad parse function
(tests/retrieval/hostile_parser.py). The last test runs the ingestion on the real broker.
"""

from __future__ import annotations

import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from services.retrieval.index import Vectors
from services.retrieval.parsing import DocumentTooLarge
from services.retrieval.sandbox import ParseLimits, ParserKilled, SandboxedParser
from services.retrieval.service import Ingestor, StatusStore
from services.retrieval.sqlite_index import SqliteKnowledgeIndex
from shared.bus import Bus
from shared.bus.admin import ensure_topics
from shared.events.v1 import events_pb2 as ev
from shared.settings import MeshSettings
from shared.topics import Topic
from tests.conftest import poll_until
from tests.retrieval.pdf_maker import make_pdf, write_pdf
from tests.test_bus import read_all

LIMITS = ParseLimits(
    max_bytes=20 * 2**20, max_pages=50, max_chars=200_000, timeout_s=3, memory_bytes=512 * 2**20
)
HOSTILE = (sys.executable, "-m", "tests.retrieval.hostile_parser")


def bomb_pdf(decompressed_bytes: int) -> bytes:
    """A one-page PDF whose content stream (one text string) inflates to about
    ``decompressed_bytes``: a decompression bomb."""
    squeeze = zlib.compressobj(9)
    stream = squeeze.compress(b"BT /F1 12 Tf 72 720 Td (")
    stream += b"".join(squeeze.compress(b"A" * 2**20) for _ in range(decompressed_bytes // 2**20))
    stream += squeeze.compress(b") Tj ET") + squeeze.flush()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n%s\nendstream" % (len(stream), stream),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    return write_pdf(objects, root=1)


# ------------------------------------------------------------------ the sandbox


def test_a_good_document_parses_in_the_child() -> None:
    parsed = SandboxedParser(LIMITS)(
        make_pdf([["Leave: 27 days."]], title="Leave"), "application/pdf", None
    )
    assert (parsed.text, parsed.title) == ("Leave: 27 days.", "Leave")


def test_too_many_pages_are_refused_before_any_text_is_read() -> None:
    with pytest.raises(DocumentTooLarge, match="51 pages; the limit is 50"):
        SandboxedParser(LIMITS)(
            make_pdf([[f"page {n}"] for n in range(51)]), "application/pdf", None
        )


def test_too_much_text_is_refused() -> None:
    text = ("word " * 50_000).encode()  # 250,000 characters
    with pytest.raises(DocumentTooLarge, match="characters of text; the limit is 200,000"):
        SandboxedParser(LIMITS)(text, "text/plain", None)


def test_a_decompression_bomb_is_refused_within_the_limits() -> None:
    bomb = bomb_pdf(600 * 2**20)  # ~600 KiB that inflate to 600 MiB, more than the memory limit
    assert len(bomb) < 2**20
    started = time.monotonic()
    with pytest.raises((DocumentTooLarge, ParserKilled)) as refused:
        SandboxedParser(LIMITS)(bomb, "application/pdf", None)
    assert time.monotonic() - started < LIMITS.timeout_s + 2
    assert "limit" in str(refused.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"HANG forever", "did not finish within 3 s"),
        (b"HOG memory", "ran out of memory (limit 512 MiB)"),
        (b"ABORT now", "crashed (signal 6"),
    ],
)
def test_a_parser_that_hangs_hogs_or_crashes_is_stopped(content: bytes, message: str) -> None:
    started = time.monotonic()
    with pytest.raises(ParserKilled, match=message.replace("(", r"\(").replace(")", r"\)")):
        SandboxedParser(LIMITS, HOSTILE)(content, "text/plain", None)
    assert time.monotonic() - started < LIMITS.timeout_s + 2


# ------------------------------------------------------------------ ingestion


def embed(texts: list[str], kind: str) -> Vectors:
    """Test-double embeddings: a stable unit vector per text (the index is real)."""
    rows = []
    for text in texts:
        rng = np.random.default_rng(zlib.crc32(text.encode()))
        row = rng.standard_normal(384).astype(np.float32)
        rows.append(row / np.linalg.norm(row))
    return np.stack(rows) if rows else np.zeros((0, 384), np.float32)


@pytest.mark.kafka
@pytest.mark.timeout(120)
async def test_a_document_that_kills_the_parser_is_dead_lettered_and_the_next_is_indexed(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = tmp_path / "parser-runs.log"
    monkeypatch.setenv("HOSTILE_PARSER_LOG", str(runs))
    topic = Topic(
        name=f"test.kb-ingest.{tmp_path.name[-8:]}",
        messages=(ev.KbIngest,),
        key="document_id",
        partitions=1,
        retention_ms=3_600_000,
        producers=("tests",),
        consumers=("tests",),
        description="kb.ingest for one test",
    )
    await ensure_topics(kafka_bootstrap, [topic])
    settings = MeshSettings(
        kafka={"bootstrap": kafka_bootstrap},
        bus={"retry_backoff_ms": 5, "max_attempts": 3},
        data_dir=tmp_path,
    )
    bus = Bus(settings, service="tests")
    index = SqliteKnowledgeIndex(tmp_path / "kb", dim=384)
    statuses = StatusStore(tmp_path / "kb" / "ingestion.sqlite")
    ingestor = Ingestor(
        index,
        embed,
        bus.publisher,
        statuses,
        parse=SandboxedParser(LIMITS, HOSTILE),
        max_document_bytes=LIMITS.max_bytes,
        max_chunks_per_document=100,
        max_chunks_per_tenant=1000,
    )
    bus.subscribe(topic, group="tests")(ingestor.on_ingest)
    await bus.start()
    try:
        await poll_until(lambda: bus.ready, message="subscriber assignment")
        for document_id, text in [
            ("hangs", b"HANG until stopped"),
            ("crashes", b"ABORT at once"),
            ("after", b"Parking: visitors park in lot B."),
        ]:
            event = ev.KbIngest(
                document_id=document_id, collection="pub", content_type="text/plain", content=text
            )
            await bus.publish(topic, event, key=document_id, tenant="acme")

        def finished() -> object:
            status = statuses.get("acme", "pub", "after")
            return status if status is not None and status.state != "started" else None

        after = await poll_until(finished, timeout=60, message="the next document indexed")
        assert after.state == "indexed"  # type: ignore[attr-defined]
        for document_id, why in [("hangs", "did not finish within 3 s"), ("crashes", "crashed")]:
            status = statuses.get("acme", "pub", document_id)
            assert status is not None
            assert status.state == "failed"
            assert why in status.error
            assert "set aside for an operator (kb.ingest.dlq)" in status.error
        dead = await read_all(kafka_bootstrap, topic.dlq, expected=2, timeout=30)
        assert [ev.KbIngest.FromString(r.value).document_id for r in dead] == ["hangs", "crashes"]
        headers = {k: v.decode() for k, v in dead[0].headers}
        assert headers["meshllm-dlq-error"].startswith("DeadLetter: the parser did not finish")
        # the retries that dead-lettered them did not run the parser again
        assert runs.read_text().split() == ["HANG", "ABORT", "Parking:"]
    finally:
        await bus.stop()
        index.close()
        statuses.close()


class Reports:
    """Test-double publisher: keeps the kb.indexed reports."""

    def __init__(self) -> None:
        self.sent: list[ev.KbIndexed] = []

    async def publish(self, topic: Topic, event: ev.KbIndexed, **kwargs: object) -> None:
        self.sent.append(event)


async def test_chunks_are_capped_per_document_and_per_tenant(tmp_path: Path) -> None:
    from services.retrieval.parsing import parse_document
    from shared.bus import EventContext

    index = SqliteKnowledgeIndex(tmp_path / "kb", dim=384)
    statuses = StatusStore(tmp_path / "kb" / "ingestion.sqlite")
    ingestor = Ingestor(
        index,
        embed,
        Reports(),  # type: ignore[arg-type]
        statuses,
        parse=parse_document,
        max_document_bytes=2**20,
        max_chunks_per_document=3,
        max_chunks_per_tenant=5,
    )

    async def ingest(document_id: str, paragraphs: int, tenant: str = "acme") -> str:
        text = "\n\n".join(f"Paragraph {n}. " + "word " * 150 for n in range(paragraphs))
        event = ev.KbIngest(
            document_id=document_id, collection="pub", content_type="text/plain",
            content=text.encode(),
        )  # fmt: skip
        envelope = ev.Envelope(event_id=document_id, tenant=tenant)
        await ingestor.on_ingest(event, EventContext("kb.ingest", 0, 0, None, [], envelope, 1))
        status = statuses.get(tenant, "pub", document_id)
        assert status is not None
        return f"{status.state}: {status.error}"

    try:
        assert (await ingest("long", 4)).startswith(
            "failed: the document makes 4 chunks; the limit is 3"
        )
        assert await ingest("first", 3) == "indexed: "
        assert (await ingest("second", 3)).startswith(
            "failed: the tenant's knowledge base holds 3 chunks; 3 more would pass its limit of 5"
        )
        assert await ingest("first", 2) == "indexed: "  # replacing counts only the difference
        assert await ingest("second", 3, tenant="globex") == "indexed: "  # quotas are per tenant
    finally:
        index.close()
        statuses.close()
