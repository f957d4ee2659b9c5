"""Settings of the retrieval service (``MESHLLM_`` prefix, nested with ``__``).

Examples::

    MESHLLM_KB_STORE=opensearch                    # unset: sqlite embedded, opensearch cluster
    MESHLLM_KB_DIR=/var/lib/meshllm/kb             # unset: <data_dir>/kb
    MESHLLM_EMBEDDER=local                         # unset: the inference service (http)
    MESHLLM_EMBEDDINGS_URL=http://inference:8000   # where /v1/embeddings is
    MESHLLM_KB_FUSION=zscore                       # hybrid search: zscore, minmax or rrf
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from shared.settings import MeshSettings, Mode


class RetrievalSettings(MeshSettings):
    service_name: str = "retrieval"
    kb_api_host: str = Field("127.0.0.1", description="Where the search API listens.")
    kb_api_port: int = Field(8091, ge=0, le=65535, description="0 picks a free port.")
    kb_store: Literal["sqlite", "opensearch"] | None = Field(
        None, description="The index back end; unset: sqlite embedded, opensearch in cluster."
    )
    kb_dir: Path | None = Field(None, description="The embedded index; unset: <data_dir>/kb.")
    opensearch_hosts: list[str] = Field(
        default_factory=lambda: ["http://127.0.0.1:9200"], min_length=1
    )
    kb_index_prefix: str = Field("meshllm-kb", pattern=r"^[a-z0-9][a-z0-9_-]{0,60}$")
    embedder: Literal["http", "local"] = Field(
        "http",
        description="http: the inference service's /v1/embeddings; local: the same model "
        "(multilingual-e5-small) in this process.",
    )
    embeddings_url: str = Field(
        "http://127.0.0.1:8000", description="The inference service (embedder=http)."
    )
    max_document_bytes: int = Field(
        20 * 2**20, ge=1024, le=256 * 2**20, description="Larger documents are refused."
    )
    max_top_k: int = Field(50, ge=1, le=1000)
    kb_max_pdf_pages: int = Field(2000, ge=1, description="PDFs with more pages are refused.")
    kb_max_text_chars: int = Field(
        10_000_000, ge=1000, description="Documents with more characters of text are refused."
    )
    kb_max_chunks_per_document: int = Field(20_000, ge=1)
    kb_max_chunks_per_tenant: int = Field(
        2_000_000, ge=1, description="A tenant's knowledge base holds at most this many chunks."
    )
    kb_parse_timeout_s: float = Field(
        120, gt=0, le=3600, description="Wall-clock limit of parsing one document."
    )
    kb_parse_memory_mb: int = Field(
        2048, ge=256, le=65536, description="Address-space limit of the parsing process."
    )
    kb_fusion: Literal["zscore", "minmax", "rrf"] = Field(
        "zscore", description="How hybrid search fuses BM25 and vector scores."
    )
    kb_vector_weight: float = Field(
        0.7, ge=0.0, le=1.0, description="The vector list's weight in score fusion."
    )
    kb_candidates: int = Field(
        2, ge=1, le=50, description="Each ranker fetches this many times top_k (at least 20)."
    )

    @property
    def store_kind(self) -> Literal["sqlite", "opensearch"]:
        if self.kb_store is not None:
            return self.kb_store
        return "sqlite" if self.mode is Mode.EMBEDDED else "opensearch"

    @property
    def index_dir(self) -> Path:
        return self.kb_dir if self.kb_dir is not None else self.data_dir / "kb"
