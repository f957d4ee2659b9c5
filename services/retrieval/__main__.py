"""``python -m services.retrieval``: the knowledge base (see :mod:`services.retrieval.service`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from services.retrieval.api import CALLERS, RetrievalApi
from services.retrieval.embedder import HttpEmbedder, LocalEmbedder
from services.retrieval.index import KnowledgeIndex
from services.retrieval.sandbox import ParseLimits, SandboxedParser
from services.retrieval.search import HybridSearcher
from services.retrieval.service import Embed, Ingestor, StatusStore
from services.retrieval.settings import RetrievalSettings
from shared.bus import Bus
from shared.health import HealthState
from shared.http_server import HttpApi
from shared.service import run_service
from shared.service_auth import ServiceGuard, own_token
from shared.topics import KB_INGEST

NAME = "retrieval"
EMBEDDING_DIM = 384  # multilingual-e5-small


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
    # the inference service knows the retrieval service by its token
    return HttpEmbedder(settings.embeddings_url, api_key=own_token(settings))


async def build(settings: RetrievalSettings, bus: Bus, health: HealthState) -> Awaitable[None]:
    guard = await asyncio.to_thread(ServiceGuard.load, settings, CALLERS)  # fail fast
    index = await asyncio.to_thread(open_index, settings)
    embed = await asyncio.to_thread(make_embedder, settings)
    statuses = StatusStore(settings.index_dir / "ingestion.sqlite")
    parse = SandboxedParser(
        ParseLimits(
            max_bytes=settings.max_document_bytes,
            max_pages=settings.kb_max_pdf_pages,
            max_chars=settings.kb_max_text_chars,
            timeout_s=settings.kb_parse_timeout_s,
            memory_bytes=settings.kb_parse_memory_mb * 2**20,
        )
    )
    ingestor = Ingestor(
        index,
        embed,
        bus.publisher,
        statuses,
        parse=parse,
        max_document_bytes=settings.max_document_bytes,
        max_chunks_per_document=settings.kb_max_chunks_per_document,
        max_chunks_per_tenant=settings.kb_max_chunks_per_tenant,
    )
    # one outcome per document id; a redelivered event re-applies the same content
    bus.subscribe(KB_INGEST, group=NAME)(ingestor.on_ingest)
    searcher = HybridSearcher(
        index,
        embed,
        fusion=settings.kb_fusion,
        vector_weight=settings.kb_vector_weight,
        candidates=settings.kb_candidates,
    )
    api = RetrievalApi(index, searcher, statuses, max_top_k=settings.max_top_k, guard=guard)
    server = HttpApi(
        api.app(),
        name="retrieval API",
        host=settings.kb_api_host,
        port=settings.kb_api_port,
        settings_hint="MESHLLM_KB_API_HOST, MESHLLM_KB_API_PORT",
    )
    server.report_readiness(health)
    return server.serve()


def main() -> None:
    run_service(NAME, RetrievalSettings, build)


if __name__ == "__main__":
    main()
