"""The event contracts: generated code is current, wire-compatible, and every event enveloped."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import text_format
from google.protobuf.descriptor_pb2 import DescriptorProto, FieldDescriptorProto, FileDescriptorSet

from shared.events.v1 import events_pb2 as ev
from shared.topics import REGISTRY, Topic

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
ENVELOPE = "meshllm.events.v1.Envelope"
ARCHITECTURE_EVENTS = (
    "InferenceRequest",
    "ReplyChunk",
    "FinalReply",
    "AuditEvent",
    "FeedbackEvent",
    "DatasetReady",
    "ModelCandidate",
    "ModelDeployment",
    "OpsAlert",
    "ScalingDecision",
    "KbIngest",
    "KbIndexed",
)


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_proto = load_script("gen_proto")
proto_compat = load_script("proto_compat")


# --- generated code ---------------------------------------------------------------------


def test_generated_code_is_current() -> None:
    stale = gen_proto.stale_files()
    assert not stale, f"stale generated code, run `python scripts/gen_proto.py`: {stale}"


def test_gen_proto_cli_checks_freshness_and_compatibility() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "gen_proto.py"), "--check", "--compat"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "wire-compatible" in result.stdout


# --- wire compatibility with the release ------------------------------------------------


def released_set() -> FileDescriptorSet:
    return FileDescriptorSet.FromString(gen_proto.RELEASED.read_bytes())


def current_set() -> FileDescriptorSet:
    return FileDescriptorSet.FromString(gen_proto.descriptor_set())


def test_current_contracts_are_wire_compatible_with_the_release() -> None:
    problems = proto_compat.breaking_changes(released_set(), current_set())
    assert not problems, (
        f"wire-breaking changes against {gen_proto.RELEASED.relative_to(ROOT)} "
        "(a breaking change needs a new package, meshllm.events.v2):\n  " + "\n  ".join(problems)
    )


def test_compat_check_reads_the_real_release() -> None:
    current = current_set()
    request = next(m for m in current.file[0].message_type if m.name == "InferenceRequest")
    kind = next(f for f in request.field if f.name == "kind")
    kind.type = FieldDescriptorProto.TYPE_STRING
    kind.ClearField("type_name")
    assert proto_compat.breaking_changes(released_set(), current) == [
        "meshllm.events.v1.InferenceRequest field 3 (kind): type changed from "
        "TYPE_ENUM .meshllm.events.v1.RequestKind to TYPE_STRING"
    ]


BASE = """
file {
  name: "t.proto"
  package: "t"
  syntax: "proto3"
  message_type {
    name: "Event"
    field { name: "id" number: 1 type: TYPE_STRING label: LABEL_OPTIONAL }
    field { name: "count" number: 2 type: TYPE_UINT32 label: LABEL_OPTIONAL }
    field { name: "text" number: 3 type: TYPE_STRING label: LABEL_OPTIONAL oneof_index: 0 }
    field { name: "blob" number: 4 type: TYPE_BYTES label: LABEL_OPTIONAL oneof_index: 0 }
    field { name: "color" number: 5 type: TYPE_ENUM type_name: ".t.Color" label: LABEL_OPTIONAL }
    nested_type {
      name: "Inner"
      field { name: "x" number: 1 type: TYPE_INT64 label: LABEL_OPTIONAL }
    }
    oneof_decl { name: "body" }
    reserved_range { start: 9 end: 10 }
    reserved_name: "gone"
  }
  enum_type {
    name: "Color"
    value { name: "COLOR_UNSPECIFIED" number: 0 }
    value { name: "COLOR_RED" number: 1 }
    reserved_range { start: 7 end: 7 }
    reserved_name: "COLOR_GONE"
  }
}
"""


def base() -> FileDescriptorSet:
    return text_format.Parse(BASE, FileDescriptorSet())


def event(descriptors: FileDescriptorSet) -> DescriptorProto:
    return descriptors.file[0].message_type[0]


def field(descriptors: FileDescriptorSet, name: str) -> FieldDescriptorProto:
    return next(f for f in event(descriptors).field if f.name == name)


def remove_field(descriptors: FileDescriptorSet, name: str) -> None:
    fields = event(descriptors).field
    fields.remove(field(descriptors, name))


def add_field(descriptors: FileDescriptorSet, name: str, number: int) -> None:
    event(descriptors).field.add(
        name=name,
        number=number,
        type=FieldDescriptorProto.TYPE_STRING,
        label=FieldDescriptorProto.LABEL_OPTIONAL,
    )


def reserve_count(descriptors: FileDescriptorSet) -> None:
    remove_field(descriptors, "count")
    event(descriptors).reserved_range.add(start=2, end=3)
    event(descriptors).reserved_name.append("count")


def change_type(descriptors: FileDescriptorSet) -> None:
    field(descriptors, "count").type = FieldDescriptorProto.TYPE_INT64


def change_number(descriptors: FileDescriptorSet) -> None:
    field(descriptors, "count").number = 6


def rename(descriptors: FileDescriptorSet) -> None:
    field(descriptors, "count").name = "total"


def make_repeated(descriptors: FileDescriptorSet) -> None:
    field(descriptors, "count").label = FieldDescriptorProto.LABEL_REPEATED


def change_enum_type(descriptors: FileDescriptorSet) -> None:
    field(descriptors, "color").type_name = ".t.Event.Inner"
    field(descriptors, "color").type = FieldDescriptorProto.TYPE_MESSAGE


def leave_oneof(descriptors: FileDescriptorSet) -> None:
    field(descriptors, "text").ClearField("oneof_index")


def change_nested(descriptors: FileDescriptorSet) -> None:
    event(descriptors).nested_type[0].field[0].type = FieldDescriptorProto.TYPE_STRING


def remove_nested(descriptors: FileDescriptorSet) -> None:
    del event(descriptors).nested_type[:]


def remove_message(descriptors: FileDescriptorSet) -> None:
    del descriptors.file[0].message_type[:]


def reuse_enum_number(descriptors: FileDescriptorSet) -> None:
    descriptors.file[0].enum_type[0].value[1].name = "COLOR_BLUE"


def remove_enum_value(descriptors: FileDescriptorSet) -> None:
    del descriptors.file[0].enum_type[0].value[1]


def reserve_enum_value(descriptors: FileDescriptorSet) -> None:
    color = descriptors.file[0].enum_type[0]
    del color.value[1]
    color.reserved_range.add(start=1, end=1)


def add_enum_value(descriptors: FileDescriptorSet) -> None:
    descriptors.file[0].enum_type[0].value.add(name="COLOR_GREEN", number=2)


def reuse_reserved_enum_number(descriptors: FileDescriptorSet) -> None:
    descriptors.file[0].enum_type[0].value.add(name="COLOR_GREEN", number=7)


def add_message(descriptors: FileDescriptorSet) -> None:
    descriptors.file[0].message_type.add(name="Other")


def remove_enum(descriptors: FileDescriptorSet) -> None:
    field(descriptors, "color").type = FieldDescriptorProto.TYPE_INT32
    field(descriptors, "color").ClearField("type_name")
    del descriptors.file[0].enum_type[:]


BREAKS: dict[str, tuple[Callable[[FileDescriptorSet], None], list[str]]] = {
    "changed type": (
        change_type,
        ["t.Event field 2 (count): type changed from TYPE_UINT32 to TYPE_INT64"],
    ),
    "changed type name": (
        change_enum_type,
        [
            "t.Event field 5 (color): type changed from TYPE_ENUM .t.Color "
            "to TYPE_MESSAGE .t.Event.Inner"
        ],
    ),
    "changed number": (
        change_number,
        [
            "t.Event field 2 (count): removed without reserving number 2",
            "t.Event field 2 (count): removed without reserving name 'count'",
        ],
    ),
    "removed, not reserved": (
        lambda d: remove_field(d, "count"),
        [
            "t.Event field 2 (count): removed without reserving number 2",
            "t.Event field 2 (count): removed without reserving name 'count'",
        ],
    ),
    "number reused under another name": (
        rename,
        ["t.Event field 2 (count): number 2 is now named 'total'"],
    ),
    "changed label": (
        make_repeated,
        ["t.Event field 2 (count): label changed from LABEL_OPTIONAL to LABEL_REPEATED"],
    ),
    "left its oneof": (
        leave_oneof,
        ["t.Event field 3 (text): oneof changed from body to None"],
    ),
    "reserved number reused": (
        lambda d: add_field(d, "fresh", 9),
        ["t.Event field 9 (fresh): reuses reserved number"],
    ),
    "reserved name reused": (
        lambda d: add_field(d, "gone", 12),
        ["t.Event field 12 (gone): reuses reserved name"],
    ),
    "nested field changed": (
        change_nested,
        ["t.Event.Inner field 1 (x): type changed from TYPE_INT64 to TYPE_STRING"],
    ),
    "nested message removed": (remove_nested, ["message t.Event.Inner was removed"]),
    "message removed": (
        remove_message,
        ["message t.Event was removed", "message t.Event.Inner was removed"],
    ),
    "enum number changed meaning": (
        reuse_enum_number,
        ["t.Color value 1 (COLOR_RED): number 1 now means COLOR_BLUE"],
    ),
    "enum value removed, not reserved": (
        remove_enum_value,
        ["t.Color value 1 (COLOR_RED): removed without reserving number 1"],
    ),
    "reserved enum number reused": (
        reuse_reserved_enum_number,
        ["t.Color value 7 (COLOR_GREEN): reuses reserved number"],
    ),
    "enum removed": (
        remove_enum,
        [
            "t.Event field 5 (color): type changed from TYPE_ENUM .t.Color to TYPE_INT32",
            "enum t.Color was removed",
        ],
    ),
}


@pytest.mark.parametrize("case", BREAKS)
def test_compat_check_catches(case: str) -> None:
    mutate, expected = BREAKS[case]
    current = base()
    mutate(current)
    assert proto_compat.breaking_changes(base(), current) == expected


COMPATIBLE: dict[str, Callable[[FileDescriptorSet], None]] = {
    "unchanged": lambda d: None,
    "removed and reserved": reserve_count,
    "new field": lambda d: add_field(d, "extra", 6),
    "new message": add_message,
    "new enum value": add_enum_value,
    "enum value removed and reserved": reserve_enum_value,
}


@pytest.mark.parametrize("case", COMPATIBLE)
def test_compat_check_allows(case: str) -> None:
    current = base()
    COMPATIBLE[case](current)
    assert proto_compat.breaking_changes(base(), current) == []


# --- envelopes and topics ---------------------------------------------------------------


@pytest.mark.parametrize("topic", REGISTRY, ids=lambda t: t.name)
def test_every_carried_message_has_the_envelope_as_field_1(topic: Topic) -> None:
    if topic.enveloped:
        assert topic.messages, f"{topic.name} is enveloped but names no message types"
    for message in topic.messages:
        first = message.DESCRIPTOR.fields_by_number.get(1)
        name = message.DESCRIPTOR.full_name
        assert first is not None, f"{name} (on {topic.name}) has no field 1"
        assert first.name == "envelope", f"{name} field 1 is {first.name!r}, not 'envelope'"
        assert first.message_type is not None
        assert first.message_type.full_name == ENVELOPE, f"{name}.envelope is not {ENVELOPE}"
        assert not first.is_repeated, f"{name}.envelope is repeated"


def carried() -> set[str]:
    return {m.DESCRIPTOR.name for topic in REGISTRY for m in topic.messages}


@pytest.mark.parametrize("name", ARCHITECTURE_EVENTS)
def test_every_event_of_the_architecture_is_carried_by_a_topic(name: str) -> None:
    assert name in ev.DESCRIPTOR.message_types_by_name, f"events.proto has no message {name}"
    assert name in carried(), f"no topic in shared.topics.REGISTRY carries {name}"


def test_every_enveloped_message_is_carried_by_a_topic() -> None:
    events = {
        name
        for name, message in ev.DESCRIPTOR.message_types_by_name.items()
        if (first := message.fields_by_number.get(1)) is not None
        and first.message_type is not None
        and first.message_type.full_name == ENVELOPE
    }
    assert events - carried() == set(), "events that no registered topic carries"
