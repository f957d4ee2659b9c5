"""The vLLM backend.

Without a GPU: the mapping of our parameters to vLLM's, the clear error when vLLM is
missing, the backend setting, and the engine's request handling (streaming, stop
strings, cancellation, failures, shutdown, the chat service on top) against a scripted
fake of vLLM's async engine that has the API the backend relies on. The ``gpu`` test
runs the real vLLM on SmolLM2.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import sys
import time
import types
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from services.inference import vllm_engine
from services.inference.generation import EngineSettings, InvalidRequest, SamplingParams
from services.inference.model.gguf_model import ModelLoadError, read_gguf_header, smollm2_path
from services.inference.registry import ModelRegistry
from services.inference.settings import DEFAULT_MODEL_NAME, InferenceSettings
from services.inference.vllm_engine import (
    OutputReader,
    VllmEngine,
    VllmEngineSettings,
    engine_kwargs,
    sampling_kwargs,
)
from tests.inference.conftest import chat_ids

SETTINGS = VllmEngineSettings(max_seq_len=512, max_batch=8)

_cached_header = functools.cache(read_gguf_header)


@pytest.fixture(autouse=True)
def _header_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the GGUF metadata takes seconds; every engine here serves the same file."""
    monkeypatch.setattr(vllm_engine, "read_gguf_header", _cached_header)


# ----------------------------------------------------------------- a fake vLLM


@dataclass
class FakeEngineArgs:
    """The ``AsyncEngineArgs`` fields the backend sets (an older release's, with logging)."""

    model: str
    skip_tokenizer_init: bool = False
    max_model_len: int | None = None
    max_num_seqs: int = 256
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    enforce_eager: bool = False
    disable_log_requests: bool = False


class FakeSamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)


@dataclass
class FakeCompletion:
    token_ids: list[int]
    finish_reason: str | None


@dataclass
class FakeRequestOutput:
    outputs: list[FakeCompletion]
    finished: bool


class FakeAsyncEngine:
    """Generates ``script`` for every request (V1 style: ``model_config``), a few tokens
    per output, stopping as vLLM would; a request past its script waits until aborted."""

    script: ClassVar[list[int]] = []
    failure: ClassVar[Exception | None] = None  # raised past the script instead of waiting
    last: ClassVar[FakeAsyncEngine | None] = None

    def __init__(self, args: FakeEngineArgs) -> None:
        self.args = args
        self.model_config = types.SimpleNamespace(max_model_len=args.max_model_len)
        self.errored = False
        self.shut_down = False
        self.aborted: list[str] = []
        self.params: list[FakeSamplingParams] = []

    @classmethod
    def from_engine_args(cls, args: FakeEngineArgs) -> FakeAsyncEngine:
        cls.last = cls(args)
        return cls.last

    async def generate(
        self, prompt: dict[str, Any], params: FakeSamplingParams, request_id: str
    ) -> AsyncIterator[FakeRequestOutput]:
        assert prompt["prompt_token_ids"]
        self.params.append(params)
        tokens: list[int] = []
        for token in self.script:
            tokens.append(token)
            finish = None
            if token in params.stop_token_ids:
                finish = "stop"
            elif len(tokens) == params.max_tokens:
                finish = "length"
            if finish or len(tokens) % 2 == 0:
                await asyncio.sleep(0)
                yield FakeRequestOutput([FakeCompletion(list(tokens), finish)], finish is not None)
            if finish:
                return
        if self.failure is not None:
            raise self.failure
        await asyncio.Event().wait()

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def shutdown(self) -> None:
        self.shut_down = True


class FakeV0Engine(FakeAsyncEngine):
    """V0's ``AsyncLLMEngine``: the model config only through ``get_model_config()``."""

    def __init__(self, args: FakeEngineArgs) -> None:
        super().__init__(args)
        self._config = self.model_config
        del self.model_config

    async def get_model_config(self) -> Any:
        return self._config


def fake_vllm_module(engine_class: type[FakeAsyncEngine]) -> types.ModuleType:
    module = types.ModuleType("vllm")
    module.AsyncEngineArgs = FakeEngineArgs  # type: ignore[attr-defined]
    module.AsyncLLMEngine = engine_class  # type: ignore[attr-defined]
    module.SamplingParams = FakeSamplingParams  # type: ignore[attr-defined]
    module.TokensPrompt = dict  # type: ignore[attr-defined]  # a TypedDict in vLLM
    return module


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> type[FakeAsyncEngine]:
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm_module(FakeAsyncEngine))
    monkeypatch.setattr(FakeAsyncEngine, "script", [])
    monkeypatch.setattr(FakeAsyncEngine, "failure", None)
    monkeypatch.setattr(FakeAsyncEngine, "last", None)
    return FakeAsyncEngine


@pytest.fixture
def engine(fake_vllm: type[FakeAsyncEngine]) -> Iterator[VllmEngine]:
    engine = VllmEngine(smollm2_path(), SETTINGS)
    engine.start()
    yield engine
    engine.stop()


def fake_engine() -> FakeAsyncEngine:
    assert FakeAsyncEngine.last is not None
    return FakeAsyncEngine.last


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# ----------------------------------------------------------------- parameter mapping


def test_sampling_parameters_map_to_vllm_with_the_end_token_as_a_stop_id() -> None:
    params = SamplingParams(max_tokens=32, temperature=0.7, top_p=0.9, top_k=0, seed=7)

    kwargs = sampling_kwargs(params, eos_id=2)

    assert kwargs == {
        "n": 1,
        "max_tokens": 32,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": -1,
        "seed": 7,
        "ignore_eos": False,
        "stop_token_ids": [2],
        "detokenize": False,
    }


def test_stop_strings_stay_here_and_ignore_eos_drops_the_stop_id() -> None:
    params = SamplingParams(top_k=40, stop=("\n",), ignore_eos=True, temperature=0)

    kwargs = sampling_kwargs(params, eos_id=2)

    assert "stop" not in kwargs
    assert kwargs["top_k"] == 40
    assert kwargs["temperature"] == 0
    assert kwargs["ignore_eos"] is True
    assert kwargs["stop_token_ids"] == []


def test_engine_arguments_carry_the_limits_and_run_without_a_tokenizer() -> None:
    settings = VllmEngineSettings(
        max_batch=64, prefix_cache_mb=0, gpu_memory_utilization=0.5, tensor_parallel_size=2
    )

    kwargs = engine_kwargs(Path("/m/model.gguf"), settings, 1024, known={"model"})

    assert kwargs["model"] == "/m/model.gguf"
    assert kwargs["skip_tokenizer_init"] is True
    assert kwargs["max_model_len"] == 1024
    assert kwargs["max_num_seqs"] == 64
    assert kwargs["enable_prefix_caching"] is False
    assert kwargs["gpu_memory_utilization"] == 0.5
    assert kwargs["tensor_parallel_size"] == 2
    assert "disable_log_requests" not in kwargs
    assert engine_kwargs(Path("m.gguf"), settings, 8, {"disable_log_requests"})[
        "disable_log_requests"
    ]


# ----------------------------------------------------------------- output handling


def test_outputs_read_in_any_steps_give_the_same_deltas(engine: VllmEngine) -> None:
    tokenizer = engine.tokenizer
    ids = tokenizer.encode("Café au lait, s'il vous plaît. ✓")
    assert tokenizer.eos_id is not None
    cumulative = [*ids, tokenizer.eos_id]
    params = SamplingParams(max_tokens=100)

    def read(steps: list[int]) -> tuple[str, list[int], str | None, Any]:
        reader = OutputReader(tokenizer, 5, params)
        text, out, finish, usage = "", [], None, None
        for end in steps:
            done = end == len(cumulative)
            delta = reader.read(cumulative[:end], "stop" if done else None)
            if delta is not None:
                text += delta.text
                out += delta.token_ids
                finish, usage = delta.finish_reason, delta.usage
        return text, out, finish, usage

    one_by_one = read(list(range(1, len(cumulative) + 1)))
    in_threes = read([*range(3, len(cumulative), 3), len(cumulative)])

    assert one_by_one == in_threes
    text, out, finish, usage = one_by_one
    assert text == tokenizer.decode(ids)
    assert out == ids
    assert finish == "stop"
    assert (usage.prompt_tokens, usage.completion_tokens) == (5, len(ids) + 1)


def test_an_aborted_vllm_request_is_an_error(engine: VllmEngine) -> None:
    reader = OutputReader(engine.tokenizer, 3, SamplingParams())

    with pytest.raises(RuntimeError, match="abort"):
        reader.read([1, 2], "abort")


# ----------------------------------------------------------------- requests (fake vLLM)


async def test_a_completion_ends_at_the_end_token(engine: VllmEngine) -> None:
    tokenizer = engine.tokenizer
    answer = tokenizer.encode("The capital of France is Paris.")
    FakeAsyncEngine.script = [*answer, tokenizer.eos_id or 0, 42, 43]

    completion = await engine.complete([1, 2, 3], SamplingParams(max_tokens=64, temperature=0))

    assert completion.text == "The capital of France is Paris."
    assert completion.token_ids == tuple(answer)
    assert completion.finish_reason == "stop"
    assert completion.usage.completion_tokens == len(answer) + 1
    assert fake_engine().params[-1].stop_token_ids == [tokenizer.eos_id]
    assert fake_engine().aborted == []
    assert (engine.active, engine.waiting) == (0, 0)


async def test_max_tokens_ends_with_length(engine: VllmEngine) -> None:
    FakeAsyncEngine.script = engine.tokenizer.encode(" one two three four five six seven")

    completion = await engine.complete([1, 2], SamplingParams(max_tokens=4))

    assert completion.finish_reason == "length"
    assert len(completion.token_ids) == 4
    assert completion.text == engine.tokenizer.decode(FakeAsyncEngine.script[:4])


async def test_a_stop_string_is_cut_out_and_aborts_the_request(engine: VllmEngine) -> None:
    FakeAsyncEngine.script = engine.tokenizer.encode("Hello world. Goodbye world.")

    completion = await engine.complete([1, 2], SamplingParams(max_tokens=64, stop=(". Good",)))

    assert completion.text == "Hello world"
    assert completion.finish_reason == "stop"
    await eventually(lambda: len(fake_engine().aborted) == 1)


async def test_closing_the_stream_aborts_the_request(engine: VllmEngine) -> None:
    FakeAsyncEngine.script = engine.tokenizer.encode(" a b c d")  # then it waits forever

    async with contextlib.aclosing(engine.stream([1, 2], SamplingParams(max_tokens=64))) as deltas:
        first = await anext(deltas)
        assert first.token_ids
        assert engine.active == 1

    await eventually(lambda: len(fake_engine().aborted) == 1)
    await eventually(lambda: (engine.active, engine.waiting) == (0, 0))
    assert engine.stuck() is None


async def test_a_vllm_failure_reaches_the_caller(engine: VllmEngine) -> None:
    FakeAsyncEngine.script = engine.tokenizer.encode(" a b")
    FakeAsyncEngine.failure = RuntimeError("EngineCore died")

    with pytest.raises(RuntimeError, match="EngineCore died"):
        await engine.complete([1, 2], SamplingParams(max_tokens=64))

    await eventually(lambda: (engine.active, engine.waiting) == (0, 0))


async def test_the_chat_service_serves_through_vllm(
    fake_vllm: type[FakeAsyncEngine], tmp_path: Path
) -> None:
    from services.inference.chat import ChatService

    registry = ModelRegistry(tmp_path)
    registry.register(DEFAULT_MODEL_NAME, "v1", smollm2_path(), copy=False)
    service = ChatService(registry, DEFAULT_MODEL_NAME, SETTINGS, "int8", verify=False)
    service.load_now(None)
    tokenizer = service.current.tokenizer
    FakeAsyncEngine.script = [*tokenizer.encode("Paris."), tokenizer.eos_id or 0]
    try:
        response = await service.chat(
            {
                "model": DEFAULT_MODEL_NAME,
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 16,
                "n": 2,
            }
        )
        status = service.status()
    finally:
        service.close()

    assert [c["message"]["content"] for c in response["choices"]] == ["Paris.", "Paris."]
    assert response["usage"]["completion_tokens"] == 2 * len(FakeAsyncEngine.script)
    assert status["quant"] == "gguf"
    assert status["max_seq_len"] == 512
    assert [params.max_tokens for params in fake_engine().params] == [16, 16]


async def test_stopping_fails_the_requests_in_flight(engine: VllmEngine) -> None:
    FakeAsyncEngine.script = engine.tokenizer.encode(" a b")

    async with contextlib.aclosing(engine.stream([1, 2], SamplingParams(max_tokens=64))) as deltas:
        await anext(deltas)
        await asyncio.to_thread(engine.stop)
        with pytest.raises(RuntimeError, match="engine stopped"):
            await anext(deltas)

    assert fake_engine().shut_down
    assert fake_engine().aborted
    assert engine.stuck() == "vLLM engine loop is not running"
    with pytest.raises(RuntimeError, match="not running"):
        await engine.complete([1], SamplingParams(max_tokens=4))


def test_bad_requests_name_the_field(engine: VllmEngine) -> None:
    assert engine.max_seq_len == 512  # the setting; the model allows more
    with pytest.raises(InvalidRequest) as error:
        engine.check([1, 2, engine.tokenizer.vocab_size], SamplingParams(max_tokens=4))
    assert error.value.param == "prompt"
    with pytest.raises(InvalidRequest) as error:
        engine.check([1] * 500, SamplingParams(max_tokens=20))
    assert error.value.param == "max_tokens"
    with pytest.raises(InvalidRequest) as error:
        engine.check([1], SamplingParams(top_p=0))
    assert error.value.param == "top_p"


def test_a_dead_vllm_engine_is_stuck(engine: VllmEngine) -> None:
    assert engine.stuck() is None

    fake_engine().errored = True

    assert engine.stuck() == "vLLM engine has died"


def test_engine_arguments_reach_vllm(engine: VllmEngine) -> None:
    args = fake_engine().args

    assert args.model == str(smollm2_path())
    assert args.skip_tokenizer_init
    assert args.max_model_len == 512
    assert args.max_num_seqs == 8
    assert args.disable_log_requests


def test_a_v0_engine_gives_its_length_through_get_model_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm_module(FakeV0Engine))
    engine = VllmEngine(smollm2_path(), VllmEngineSettings(max_seq_len=256))
    engine.start()
    try:
        assert engine.max_seq_len == 256
        assert engine.stuck() is None
    finally:
        engine.stop()


# ----------------------------------------------------------------- without vLLM


def test_without_vllm_the_engine_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)

    with pytest.raises(ModelLoadError, match=r"install the `vllm` extra"):
        VllmEngine(smollm2_path(), SETTINGS)


def test_the_backend_setting_selects_vllm_for_the_loader(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from services.inference.loading import load_model

    monkeypatch.setitem(sys.modules, "vllm", None)
    monkeypatch.setenv("MESHLLM_ENGINE__BACKEND", "vllm")
    monkeypatch.setenv("MESHLLM_ENGINE__VLLM__GPU_MEMORY_UTILIZATION", "0.4")
    settings = InferenceSettings().engine.engine_settings()
    entry = ModelRegistry(tmp_path).register(DEFAULT_MODEL_NAME, "v1", smollm2_path(), copy=False)

    assert isinstance(settings, VllmEngineSettings)
    assert settings.gpu_memory_utilization == 0.4
    assert settings.max_seq_len == 2048
    with pytest.raises(ModelLoadError, match=r"MESHLLM_ENGINE__BACKEND=vllm .* `vllm` extra"):
        load_model(entry, settings, "int8", verify=False)


def test_the_default_backend_is_the_torch_engine() -> None:
    settings = InferenceSettings().engine.engine_settings()

    assert type(settings) is EngineSettings


# ----------------------------------------------------------------- GPU


def _gpu_and_vllm() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


@pytest.mark.gpu
@pytest.mark.timeout(900)
@pytest.mark.skipif(not _gpu_and_vllm(), reason="needs a CUDA GPU and the vllm extra")
async def test_real_vllm_answers_stops_and_cancels() -> None:
    settings = VllmEngineSettings(max_seq_len=1024, gpu_memory_utilization=0.3, enforce_eager=True)
    engine = VllmEngine(smollm2_path(), settings)
    await asyncio.to_thread(engine.start)
    try:
        ids = chat_ids(engine.tokenizer, "What is the capital of France?")
        greedy = SamplingParams(max_tokens=24, temperature=0)

        first, again = await asyncio.gather(
            engine.complete(ids, greedy), engine.complete(ids, greedy)
        )
        assert "Paris" in first.text
        assert "Paris" in again.text
        assert first.finish_reason in {"stop", "length"}

        cut = await engine.complete(
            ids, SamplingParams(max_tokens=24, temperature=0, stop=("Paris",))
        )
        assert "Paris" not in cut.text
        assert cut.finish_reason == "stop"

        long = SamplingParams(max_tokens=900, temperature=0, ignore_eos=True)
        async with contextlib.aclosing(engine.stream(ids, long)) as deltas:
            await anext(deltas)
        await eventually(lambda: (engine.active, engine.waiting) == (0, 0), timeout=30)
        assert engine.stuck() is None
    finally:
        await asyncio.to_thread(engine.stop)
