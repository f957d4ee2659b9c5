"""The topic reference (docs/asyncapi.yaml, docs/topics.md): current, complete, well formed."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from google.protobuf.descriptor_pb2 import FileDescriptorProto, FileDescriptorSet

from shared.topics import DLQ_PARTITIONS, DLQ_RETENTION_MS, REGISTRY, Topic

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
SCHEMA_FORMAT = "application/vnd.google.protobuf;version=3"


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = load_script("gen_asyncapi")


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    loaded = yaml.safe_load(gen.ASYNCAPI.read_text())
    assert isinstance(loaded, dict)
    return loaded


def resolve(doc: dict[str, Any], ref: str) -> Any:
    """The node a local ``#/...`` reference points at; KeyError if there is none."""
    assert ref.startswith("#/"), f"not a local reference: {ref}"
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def expected_channels() -> dict[str, tuple[Topic, bool]]:
    channels = {}
    for topic in REGISTRY:
        channels[topic.name] = (topic, False)
        if topic.consumers:
            channels[topic.dlq] = (topic, True)
    return channels


# --- freshness --------------------------------------------------------------------------


def test_committed_docs_are_current() -> None:
    stale = gen.stale_files()
    assert not stale, f"stale topic reference, run `python scripts/gen_asyncapi.py`: {stale}"


def test_check_flag_passes_in_a_fresh_process() -> None:
    """A new process has another string-hash seed, so this also proves the output stable."""
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "gen_asyncapi.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_flag_fails_on_stale_docs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    current, stale = tmp_path / "asyncapi.yaml", tmp_path / "topics.md"
    current.write_text("same\n")
    stale.write_text("old\n")
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    monkeypatch.setattr(gen, "rendered", lambda: {current: "same\n", stale: "new\n"})
    monkeypatch.setattr(sys, "argv", ["gen_asyncapi.py", "--check"])
    assert gen.main() == 1
    out = capsys.readouterr().out
    assert "topics.md" in out
    assert "asyncapi.yaml" not in out


# --- AsyncAPI structure -----------------------------------------------------------------


def test_document_is_asyncapi_3(doc: dict[str, Any]) -> None:
    assert doc["asyncapi"] == "3.0.0"
    assert isinstance(doc["info"]["title"], str)
    assert isinstance(doc["info"]["version"], str)
    assert set(doc["servers"]) == {"embedded", "cluster"}
    for server in doc["servers"].values():
        assert server["protocol"] == "kafka"
        assert server["host"].rpartition(":")[2].isdigit()
    assert isinstance(doc["channels"], dict)
    assert isinstance(doc["operations"], dict)


def test_every_reference_resolves(doc: dict[str, Any]) -> None:
    for ref in refs(doc):
        try:
            resolve(doc, ref)
        except (KeyError, TypeError):
            pytest.fail(f"dangling reference {ref}")


def test_channels_are_the_registered_topics_and_their_dead_letter_topics(
    doc: dict[str, Any],
) -> None:
    assert list(doc["channels"]) == list(expected_channels())


@pytest.mark.parametrize("channel_id", expected_channels())
def test_channel_matches_the_registry(doc: dict[str, Any], channel_id: str) -> None:
    topic, dead_letter = expected_channels()[channel_id]
    channel = doc["channels"][channel_id]
    kafka = channel["bindings"]["kafka"]
    assert channel["address"] == kafka["topic"] == channel_id
    assert channel["description"]
    partitions = DLQ_PARTITIONS if dead_letter else topic.partitions
    retention = DLQ_RETENTION_MS if dead_letter else topic.retention_ms
    assert kafka["partitions"] == partitions
    assert kafka["topicConfiguration"]["retention.ms"] == retention

    assert [m["name"] for m in channel["messages"].values()] == [
        m.DESCRIPTOR.full_name for m in topic.messages
    ]
    for message in channel["messages"].values():
        assert message["contentType"] == "application/x-protobuf"
        payload = resolve(doc, message["payload"]["$ref"])
        assert payload["schemaFormat"] == SCHEMA_FORMAT
        assert f"message {message['title']} {{" in payload["schema"]
        headers = message["headers"]["properties"]
        assert headers["meshllm-type"]["const"] == message["name"]
        assert {"traceparent", "tracestate"} <= set(headers)
        dlq_headers = {f"meshllm-dlq-{name}" for name in gen.DLQ_HEADERS}
        assert (dlq_headers <= set(headers)) is dead_letter
        assert f"`{topic.key}`" in message["bindings"]["kafka"]["key"]["description"]


def expected_operations() -> set[tuple[str, str, str]]:
    """(service, action, channel) of every operation the registry implies."""
    expected = set()
    for topic in REGISTRY:
        expected |= {(service, "send", topic.name) for service in topic.producers}
        expected |= {(service, "receive", topic.name) for service in topic.consumers}
        expected |= {(service, "send", topic.dlq) for service in topic.consumers}
    return expected


def test_operations_are_the_producers_and_consumers_of_the_registry(doc: dict[str, Any]) -> None:
    found = set()
    for operation_id, operation in doc["operations"].items():
        assert operation["action"] in {"send", "receive"}, operation_id
        channel_ref = operation["channel"]["$ref"]
        channel = resolve(doc, channel_ref)
        for message in operation["messages"]:
            assert message["$ref"].startswith(channel_ref + "/messages/"), (
                f"{operation_id} names a message of another channel: {message['$ref']}"
            )
        assert len(operation["messages"]) == len(channel["messages"])
        (tag,) = operation["tags"]
        found.add((tag["name"], operation["action"], channel["address"]))
    assert found == expected_operations()


def compile_proto(include: Path, source: str, out: Path) -> FileDescriptorProto | None:
    """Compile ``include/source`` with protoc; return None if protoc refuses it."""
    from grpc_tools import protoc

    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [f"-I{include}", f"-I{well_known}", f"--descriptor_set_out={out}", source]
    if protoc.main(["protoc", *args]) != 0:
        return None
    (compiled,) = FileDescriptorSet.FromString(out.read_bytes()).file
    return compiled


def test_payload_definitions_compile_to_the_real_messages(
    doc: dict[str, Any], tmp_path: Path
) -> None:
    """Each payload schema is a proto file defining its message exactly as events.proto does."""
    real = compile_proto(ROOT / "proto", gen.ev.DESCRIPTOR.name, tmp_path / "real.binpb")
    assert real is not None
    real_messages = {m.name: m for m in real.message_type}
    carried = {m.DESCRIPTOR.full_name for topic in REGISTRY for m in topic.messages}
    schemas = doc["components"]["schemas"]
    assert set(schemas) == carried
    for full_name, schema in schemas.items():
        (tmp_path / f"{full_name}.proto").write_text(schema["schema"])
        compiled = compile_proto(tmp_path, f"{full_name}.proto", tmp_path / f"{full_name}.binpb")
        assert compiled is not None, f"the schema of {full_name} does not compile"
        assert compiled.package == real.package
        for message in compiled.message_type:
            assert message == real_messages[message.name], (
                f"{message.name} in the schema of {full_name} differs from events.proto"
            )


# --- Markdown ---------------------------------------------------------------------------


def test_topics_md_has_a_row_per_topic_and_the_dead_letter_headers() -> None:
    text = gen.TOPICS_MD.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    for topic in REGISTRY:
        (row,) = [r for r in rows if r.startswith(f"| `{topic.name}` |")]
        for message in topic.messages:
            assert f"`{message.DESCRIPTOR.name}`" in row
    for name in gen.DLQ_HEADERS:
        assert f"| `meshllm-dlq-{name}` |" in text


def test_documented_dead_letter_headers_are_the_ones_the_consumer_writes() -> None:
    source = (ROOT / "shared" / "bus" / "consumer.py").read_text()
    (dead_letter,) = [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef) and node.name == "_dead_letter"
    ]
    written = {
        key.value
        for node in ast.walk(dead_letter)
        if isinstance(node, ast.Dict)
        for key in node.keys
        if isinstance(key, ast.Constant)
    }
    assert written == set(gen.DLQ_HEADERS)
