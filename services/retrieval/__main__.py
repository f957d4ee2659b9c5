"""``python -m services.retrieval``: the knowledge base (see :mod:`services.retrieval.service`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Generator

import uvicorn

from services.retrieval.api import RetrievalApi
from services.retrieval.embedder import HttpEmbedder, LocalEmbedder
from services.retrieval.index import KnowledgeIndex
from services.retrieval.search import HybridSearcher
from services.retrieval.service import Embed, Ingestor, StatusStore
from services.retrieval.settings import RetrievalSettings
from shared.bus import Bus
from shared.health import HealthState
from shared.logging import get_logger
from shared.service import run_service
from shared.topics import KB_INGEST

NAME = "retrieval"
EMBEDDING_DIM = 384  # multilingual-e5-small
log = get_logger("services.retrieval")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the service's shutdown drives it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def open_index(settings: RetrievalSettings) -> KnowledgeIndex:
    if settings.store_kind == "sqlite":
        from services.retrieval.sqlite_index import SqliteKnowledgeIndex

        return SqliteKnowledgeIndex(settings.index_dir, dim=EMBEDDING_DIM)
    from services.retrieval.opensearch_index import OpenSearchKnowledgeIndex

    return OpenSearchKnowledgeIndex.connect(
        settings.opensearch_hosts, index_prefix=settings.kb_index_prefix, dim=EMBEDDING_DIM
    )


def make_embedder(settings: RetrievalSettings) -> Embed:
    if settings.embedder == "local":
        return LocalEmbedder()
    return HttpEmbedder(settings.embeddings_url)


async def build(settings: RetrievalSettings, bus: Bus, health: HealthState) -> Awaitable[None]:
    index = await asyncio.to_thread(open_index, settings)
    embed = await asyncio.to_thread(make_embedder, settings)
    statuses = StatusStore(settings.index_dir / "ingestion.sqlite")
    ingestor = Ingestor(
        index, embed, bus.publisher, statuses, max_document_bytes=settings.max_document_bytes
    )
    # one outcome per document id; a redelivered event re-applies the same content
    bus.subscribe(KB_INGEST, group=NAME)(ingestor.on_ingest)
    api = RetrievalApi(index, HybridSearcher(index, embed), statuses, max_top_k=settings.max_top_k)
    server = _Server(
        uvicorn.Config(
            api.app(),
            host=settings.kb_api_host,
            port=settings.kb_api_port,
            log_level="warning",
            log_config=None,  # its lines go through our logging (JSON, PII, credentials)
            lifespan="off",
        )
    )
    health.readiness["http"] = lambda: None if server.started else "HTTP not listening yet"
    return _serve(server, settings)


async def _serve(server: _Server, settings: RetrievalSettings) -> None:
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        url = f"http://{settings.kb_api_host}:{settings.kb_api_port}"
        log.info("retrieval API listening", url=url)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        server.should_exit = True
        await asyncio.gather(task, return_exceptions=True)
        raise


def main() -> None:
    run_service(NAME, RetrievalSettings, build)


if __name__ == "__main__":
    main()
