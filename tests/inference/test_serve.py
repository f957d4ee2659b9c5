"""The Ray Serve application, deployed once for the module: handles, HTTP, hot update.

One local Ray (2 CPUs) runs one chat replica (the real SmolLM2 model, 512-token
context), one embeddings replica and the HTTP ingress. The hot-update tests run last:
they leave the chat deployment on another version.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from services.inference.registry import ModelRegistry, ensure_default
from services.inference.serve_app import build_app
from services.inference.settings import (
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_VERSION,
    EngineConfig,
    InferenceSettings,
    ServeConfig,
)
from shared.bus.embedded import free_port
from shared.deployments import CHAT_DEPLOYMENT, EMBEDDINGS_DEPLOYMENT
from shared.openai_protocol import (
    InvalidRequestError,
    ModelNotFoundError,
    OpenAIError,
    parse_request,
)
from shared.service_auth import service_headers

APP = "inference-test"
NEW_VERSION = "q4_1-2"
# The bare question is a near tie for this model ("The" leads "L" by 0.08 in fp32, and some
# quantized builds answer "L'Étoile, ..."); asking for a sentence leaves a margin of 0.7+
# in every weight mode.
QUESTION = "What is the capital of France? Answer in one sentence."


def chat_request(content: str = QUESTION, **fields: Any) -> dict[str, Any]:
    return {
        "model": DEFAULT_MODEL_NAME,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 24,
        **fields,
    }


class Deployed:
    def __init__(self, settings: InferenceSettings) -> None:
        self.settings = settings
        self.chat: DeploymentHandle[Any] = serve.get_deployment_handle(CHAT_DEPLOYMENT, APP)
        self.embeddings: DeploymentHandle[Any] = serve.get_deployment_handle(
            EMBEDDINGS_DEPLOYMENT, APP
        )
        self.url = f"http://127.0.0.1:{settings.serve.http_port}"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    models = tmp_path_factory.mktemp("registry")
    registry = ModelRegistry(models)
    default = ensure_default(registry)
    registry.register(DEFAULT_MODEL_NAME, NEW_VERSION, default.path, copy=False)
    settings = InferenceSettings(
        data_dir=Path(models.parent),
        model_dir=models,
        model_version=DEFAULT_MODEL_VERSION,
        embedding_threads=1,
        engine=EngineConfig(max_batch=8, max_seq_len=512),
        serve=ServeConfig(http_port=free_port(), chat_num_cpus=1, embeddings_num_cpus=0.5),
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": settings.serve.http_port})
        serve.run(build_app(settings), name=APP, route_prefix="/")
        yield Deployed(settings)
    finally:
        serve.shutdown()
        ray.shutdown()


def content_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(
        choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"]
    )


async def test_chat_answers_greedily(deployed: Deployed) -> None:
    response = await deployed.chat.chat.remote(chat_request())

    assert response["object"] == "chat.completion"
    assert response["id"].startswith("chatcmpl-")
    assert response["model"] == f"{DEFAULT_MODEL_NAME}:{DEFAULT_MODEL_VERSION}"
    [choice] = response["choices"]
    assert choice["message"]["role"] == "assistant"
    assert "Paris" in choice["message"]["content"]
    assert choice["finish_reason"] in {"stop", "length"}
    usage = response["usage"]
    assert usage["prompt_tokens"] > 10
    assert 0 < usage["completion_tokens"] <= 24
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_streaming_gives_the_same_text_in_pieces(deployed: Deployed) -> None:
    whole = await deployed.chat.chat.remote(chat_request())
    chunks = [
        chunk
        async for chunk in deployed.chat.options(stream=True).chat_stream.remote(
            chat_request(stream=True, stream_options={"include_usage": True})
        )
    ]

    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(pieces) >= 2  # paced: the first text at once, then one chunk per 100 ms
    assert content_of(chunks) == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == whole["usage"]


async def test_n_greedy_choices_are_identical(deployed: Deployed) -> None:
    response = await deployed.chat.chat.remote(chat_request(n=2))

    first, second = response["choices"]
    assert (first["index"], second["index"]) == (0, 1)
    assert first["message"]["content"] == second["message"]["content"]
    assert "Paris" in first["message"]["content"]
    single = await deployed.chat.chat.remote(chat_request())
    assert response["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]
    assert response["usage"]["completion_tokens"] == 2 * single["usage"]["completion_tokens"]


async def test_completion_with_stop_string(deployed: Deployed) -> None:
    request = {"prompt": "1, 2, 3, 4,", "max_tokens": 16, "temperature": 0, "stop": ["7"]}
    response = await deployed.chat.complete.remote(request)

    assert response["object"] == "text_completion"
    [choice] = response["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["text"].startswith(" 5, 6,")
    assert "7" not in choice["text"]
    chunks = [c async for c in deployed.chat.options(stream=True).complete_stream.remote(request)]
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"temperature": 5}, "temperature"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "word " * 600}]}, "messages"),
        ({"stop": 7}, "stop"),
        ({"n": 0}, "n"),
    ],
    ids=[
        "max_tokens-0",
        "max_tokens-huge",
        "temperature-5",
        "no-messages",
        "too-long",
        "stop",
        "n",
    ],
)
async def test_bad_requests_name_the_field(
    deployed: Deployed, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        await deployed.chat.chat.remote(chat_request(**fields))

    error = refused.value
    assert error.param == param
    assert error.status == 400
    assert error.to_dict()["error"]["type"] == "invalid_request_error"
    assert error.message.startswith(f"{param}: ")


async def test_too_long_prompt_is_refused_when_streaming(deployed: Deployed) -> None:
    chunks = deployed.chat.options(stream=True).chat_stream.remote(
        chat_request("word " * 600, stream=True)
    )
    with pytest.raises(InvalidRequestError, match="exceeds the context length of 512"):
        await chunks.__anext__()


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", "model 'gpt-4o' is not served here"),
        (f"{DEFAULT_MODEL_NAME}:v9", f"versions: {DEFAULT_MODEL_VERSION}, {NEW_VERSION}"),
    ],
    ids=["unknown-model", "unknown-version"],
)
async def test_unknown_model_or_version_is_not_found(
    deployed: Deployed, model: str, expected: str
) -> None:
    with pytest.raises(ModelNotFoundError) as missing:
        await deployed.chat.chat.remote(chat_request(model=model))

    assert missing.value.status == 404
    assert missing.value.param == "model"
    assert missing.value.code == "model_not_found"
    assert expected in missing.value.message


async def test_embeddings_rank_a_translation_above_an_unrelated_sentence(
    deployed: Deployed,
) -> None:
    texts = ["The cat sleeps on the sofa.", "猫在沙发上睡觉。", "Interest rates rose again today."]
    response = await deployed.embeddings.embed.remote({"input": texts})

    assert response["object"] == "list"
    assert response["model"] == "multilingual-e5-small"
    assert response["usage"]["prompt_tokens"] > 0
    vectors = [item["embedding"] for item in response["data"]]
    assert [item["index"] for item in response["data"]] == [0, 1, 2]
    assert all(len(v) == 384 for v in vectors)

    def cosine(a: list[float], b: list[float]) -> float:
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    english, chinese, unrelated = vectors
    assert cosine(english, chinese) > cosine(english, unrelated)
    assert cosine(english, chinese) > cosine(chinese, unrelated)


async def test_embeddings_refuse_empty_input(deployed: Deployed) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        await deployed.embeddings.embed.remote({"input": []})
    assert refused.value.param == "input"


async def test_http_front_needs_a_service_identity(deployed: Deployed) -> None:
    url = f"{deployed.url}/v1/chat/completions"
    async with httpx.AsyncClient(timeout=60) as client:
        bare = await client.post(url, json=chat_request())
        assert bare.status_code == 401, bare.text
        assert bare.json()["error"]["type"] == "authentication_error"
        gateway = await client.post(
            url, json=chat_request(), headers=headers_of(deployed, "gateway")
        )
        assert gateway.status_code == 403, gateway.text
        retrieval = headers_of(deployed, "retrieval")
        assert (await client.post(url, json=chat_request(), headers=retrieval)).status_code == 403
        embedded = await client.post(
            f"{deployed.url}/v1/embeddings", json={"input": "hello"}, headers=retrieval
        )
        assert embedded.status_code == 200, embedded.text


def headers_of(deployed: Deployed, identity: str) -> dict[str, str]:
    """The headers of a mesh service: its token, made in the data dir by ``build_app``."""
    return service_headers(deployed.settings.model_copy(update={"service_name": identity}))


async def test_http_chat_completions(deployed: Deployed) -> None:
    url = f"{deployed.url}/v1/chat/completions"
    async with httpx.AsyncClient(timeout=60, headers=headers_of(deployed, "router")) as client:
        plain = await client.post(url, json=chat_request())
        assert plain.status_code == 200, plain.text
        text = plain.json()["choices"][0]["message"]["content"]
        assert "Paris" in text

        events: list[str] = []
        async with client.stream("POST", url, json=chat_request(stream=True)) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["content-type"].startswith("text/event-stream")
            async for line in streamed.aiter_lines():
                if line:
                    assert line.startswith("data: ")
                    events.append(line.removeprefix("data: "))
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        assert content_of(chunks) == text

        refused = await client.post(url, json=chat_request(temperature=5))
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "temperature"
        refused_stream = await client.post(url, json=chat_request(temperature=5, stream=True))
        assert refused_stream.status_code == 400
        missing = await client.post(url, json=chat_request(model="gpt-4o"))
        assert missing.status_code == 404
        assert (await client.post(f"{deployed.url}/v1/nothing", json={})).status_code == 404

        embedded = await client.post(f"{deployed.url}/v1/embeddings", json={"input": "hello"})
        assert embedded.status_code == 200
        assert len(embedded.json()["data"][0]["embedding"]) == 384
        models = (await client.get(f"{deployed.url}/v1/models")).json()
        assert DEFAULT_MODEL_NAME in [m["id"] for m in models["data"]]


async def test_a_caller_that_hangs_up_frees_the_engine_slot(deployed: Deployed) -> None:
    """The router cancels by closing its stream: the generation stops in the (int4) engine."""
    status = await deployed.chat.status.remote()
    assert status["quant"] == "int4"  # the default, as served
    assert status["active"] == 0
    url = f"{deployed.url}/v1/chat/completions"
    body = chat_request("Tell me a long story about dragons.", stream=True, max_tokens=400)
    async with httpx.AsyncClient(timeout=60, headers=headers_of(deployed, "router")) as client:
        async with client.stream("POST", url, json=body) as streamed:
            assert streamed.status_code == 200
            received = 0
            async for line in streamed.aiter_lines():
                received += line.startswith("data: ")
                if received == 4:
                    break
        generating = await deployed.chat.status.remote()
    assert generating["active"] + generating["in_flight"] >= 1  # hung up mid-generation
    deadline = asyncio.get_running_loop().time() + 15
    while (status := await deployed.chat.status.remote())["active"] or status["in_flight"]:
        assert asyncio.get_running_loop().time() < deadline, f"slot still taken: {status}"
        await asyncio.sleep(0.1)


async def test_the_engine_runs_a_thread_per_cpu_whatever_ray_reserved(
    deployed: Deployed,
) -> None:
    """The replica reserves 1 Ray CPU (so Ray sets OMP_NUM_THREADS=1 there), yet its
    engine runs as many torch threads as the process may use CPUs."""
    status = await deployed.chat.status.remote()
    assert deployed.settings.serve.chat_num_cpus == 1
    assert status["threads"] == len(os.sched_getaffinity(0))


# The hot-update tests change the served version: keep them last.


async def test_hot_update_lets_in_flight_requests_finish(deployed: Deployed) -> None:
    chat = deployed.chat
    before = await chat.status.remote()
    assert before["version"] == DEFAULT_MODEL_VERSION
    assert before["quant"] == "int4"  # the default "auto" keeps the Q4_1 file's precision
    # long enough to outlast the new version's load (~6 s) at the engine's batch-4 speed
    long_request = chat_request("Tell me a long story.", max_tokens=450, ignore_eos=True)
    streams = [chat.options(stream=True).chat_stream.remote(long_request) for _ in range(4)]
    firsts = [await stream.__anext__() for stream in streams]  # all four are running

    async def rest(stream: Any) -> list[dict[str, Any]]:
        return [chunk async for chunk in stream]

    readers = [asyncio.create_task(rest(stream)) for stream in streams]
    switched = await chat.reload.remote(NEW_VERSION)  # loading takes ~6 s on 2 cores
    assert switched["version"] == NEW_VERSION
    assert switched["retiring"] == [
        {"model": f"{DEFAULT_MODEL_NAME}:{DEFAULT_MODEL_VERSION}", "in_flight": 4}
    ]
    after = await chat.chat.remote(chat_request())
    assert after["model"] == f"{DEFAULT_MODEL_NAME}:{NEW_VERSION}"
    assert "Paris" in after["choices"][0]["message"]["content"]

    for first, chunks in zip(firsts, await asyncio.gather(*readers), strict=True):
        everything = [first, *chunks]
        assert {c["model"] for c in everything} == {f"{DEFAULT_MODEL_NAME}:{DEFAULT_MODEL_VERSION}"}
        assert everything[-1]["choices"][0]["finish_reason"] == "length"
    settled = await chat.wait_retired.remote()
    assert settled["retiring"] == []
    assert settled["replica"] == before["replica"]


async def test_redeploy_with_another_version_replaces_the_replica_gracefully(
    deployed: Deployed,
) -> None:
    chat = deployed.chat
    before = await chat.status.remote()
    request = chat_request("Tell me a story.", max_tokens=60, ignore_eos=True)
    streams = [chat.options(stream=True).chat_stream.remote(request) for _ in range(2)]
    firsts = [await stream.__anext__() for stream in streams]

    settings = deployed.settings.model_copy(update={"model_version": DEFAULT_MODEL_VERSION})
    await asyncio.to_thread(serve.run, build_app(settings), name=APP, route_prefix="/")

    for first, stream in zip(firsts, streams, strict=True):
        chunks = [first, *[chunk async for chunk in stream]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert {c["model"] for c in chunks} == {f"{DEFAULT_MODEL_NAME}:{NEW_VERSION}"}
    status = await chat.status.remote()
    assert status["version"] == DEFAULT_MODEL_VERSION
    assert status["replica"] != before["replica"]
    response = await chat.chat.remote(chat_request())
    assert response["model"] == f"{DEFAULT_MODEL_NAME}:{DEFAULT_MODEL_VERSION}"


def test_request_parsing_without_a_model() -> None:
    request = parse_request(
        {"model": f"{DEFAULT_MODEL_NAME}:{NEW_VERSION}", "prompt": [[1, 2], "text"], "n": 2},
        "completion",
    )
    assert (request.model, request.version) == (DEFAULT_MODEL_NAME, NEW_VERSION)
    assert request.prompts == ((1, 2), "text")
    with pytest.raises(InvalidRequestError, match="presence_penalty: is not supported"):
        parse_request({"prompt": "hi", "presence_penalty": 1}, "completion")
    with pytest.raises(InvalidRequestError) as bad_role:
        parse_request({"messages": [{"role": "robot", "content": "hi"}]}, "chat")
    assert bad_role.value.param == "messages[0].role"
    with pytest.raises(InvalidRequestError) as bad_n:
        parse_request({"prompt": ["a"] * 9, "n": 2}, "completion")
    assert bad_n.value.param == "n"


def test_errors_survive_pickling() -> None:
    import pickle

    error = InvalidRequestError("max_tokens: too many", "max_tokens")
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, OpenAIError)
    assert copy.to_dict() == error.to_dict()
