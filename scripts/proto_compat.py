"""Wire-compatibility check of the event contracts against their released descriptors.

A released message or enum may grow; it may not change what a number means on the
wire. :func:`breaking_changes` compares two ``FileDescriptorSet``s and names every
change that would make old and new code disagree about released bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from google.protobuf.descriptor_pb2 import (
    DescriptorProto,
    EnumDescriptorProto,
    FieldDescriptorProto,
    FileDescriptorSet,
)


def _messages(
    prefix: str, messages: Iterable[DescriptorProto]
) -> Iterator[tuple[str, DescriptorProto]]:
    for message in messages:
        name = f"{prefix}.{message.name}"
        yield name, message
        yield from _messages(name, message.nested_type)


def _index(
    descriptors: FileDescriptorSet,
) -> tuple[dict[str, DescriptorProto], dict[str, EnumDescriptorProto]]:
    """Every message and enum of the set, nested ones included, by full name."""
    messages: dict[str, DescriptorProto] = {}
    enums: dict[str, EnumDescriptorProto] = {}
    for file in descriptors.file:
        prefix = f".{file.package}" if file.package else ""
        for enum in file.enum_type:
            enums[f"{prefix}.{enum.name}"] = enum
        for name, message in _messages(prefix, file.message_type):
            messages[name] = message
            for enum in message.enum_type:
                enums[f"{name}.{enum.name}"] = enum
    return messages, enums


def _reserved_field(message: DescriptorProto, number: int) -> bool:
    # DescriptorProto.ReservedRange.end is exclusive.
    return any(r.start <= number < r.end for r in message.reserved_range)


def _reserved_value(enum: EnumDescriptorProto, number: int) -> bool:
    # EnumDescriptorProto.EnumReservedRange.end is inclusive.
    return any(r.start <= number <= r.end for r in enum.reserved_range)


def _oneof(message: DescriptorProto, field: FieldDescriptorProto) -> str | None:
    """The real oneof a field belongs to; proto3 ``optional`` fields belong to none."""
    if not field.HasField("oneof_index") or field.proto3_optional:
        return None
    return message.oneof_decl[field.oneof_index].name


def _type(field: FieldDescriptorProto) -> str:
    kind = FieldDescriptorProto.Type.Name(field.type)
    return f"{kind} {field.type_name}" if field.type_name else kind


def _message_breaks(name: str, released: DescriptorProto, current: DescriptorProto) -> list[str]:
    shown = name.lstrip(".")
    problems = []
    current_fields = {field.number: field for field in current.field}
    for old in released.field:
        where = f"{shown} field {old.number} ({old.name})"
        new = current_fields.get(old.number)
        if new is None:
            if not _reserved_field(current, old.number):
                problems.append(f"{where}: removed without reserving number {old.number}")
            if old.name not in current.reserved_name:
                problems.append(f"{where}: removed without reserving name {old.name!r}")
            continue
        if new.name != old.name:
            problems.append(f"{where}: number {old.number} is now named {new.name!r}")
        if _type(new) != _type(old):
            problems.append(f"{where}: type changed from {_type(old)} to {_type(new)}")
        if new.label != old.label:
            problems.append(
                f"{where}: label changed from {FieldDescriptorProto.Label.Name(old.label)} "
                f"to {FieldDescriptorProto.Label.Name(new.label)}"
            )
        if _oneof(current, new) != _oneof(released, old):
            problems.append(
                f"{where}: oneof changed from {_oneof(released, old)} to {_oneof(current, new)}"
            )
    for new in current.field:
        if _reserved_field(released, new.number):
            problems.append(f"{shown} field {new.number} ({new.name}): reuses reserved number")
        if new.name in released.reserved_name:
            problems.append(f"{shown} field {new.number} ({new.name}): reuses reserved name")
    return problems


def _enum_breaks(
    name: str, released: EnumDescriptorProto, current: EnumDescriptorProto
) -> list[str]:
    shown = name.lstrip(".")
    problems = []
    current_values = {value.number: value for value in current.value}
    for old in released.value:
        where = f"{shown} value {old.number} ({old.name})"
        new = current_values.get(old.number)
        if new is None:
            if not _reserved_value(current, old.number):
                problems.append(f"{where}: removed without reserving number {old.number}")
        elif new.name != old.name:
            problems.append(f"{where}: number {old.number} now means {new.name}")
    for new in current.value:
        if _reserved_value(released, new.number):
            problems.append(f"{shown} value {new.number} ({new.name}): reuses reserved number")
        if new.name in released.reserved_name:
            problems.append(f"{shown} value {new.number} ({new.name}): reuses reserved name")
    return problems


def breaking_changes(released: FileDescriptorSet, current: FileDescriptorSet) -> list[str]:
    """Every wire-breaking difference from ``released`` to ``current``, one sentence each.

    Checked for every message (nested ones too) and enum of ``released``: it still
    exists; each released field number keeps its name, type, label and oneof, or,
    if gone, has its number and name reserved; no field reuses a released reserved
    number or name; each released enum value number keeps its name or is reserved.
    Additions are never reported. An empty list means ``current`` is compatible.
    """
    old_messages, old_enums = _index(released)
    new_messages, new_enums = _index(current)
    problems = []
    for name, old_message in old_messages.items():
        new_message = new_messages.get(name)
        if new_message is None:
            problems.append(f"message {name.lstrip('.')} was removed")
        else:
            problems.extend(_message_breaks(name, old_message, new_message))
    for name, old_enum in old_enums.items():
        new_enum = new_enums.get(name)
        if new_enum is None:
            problems.append(f"enum {name.lstrip('.')} was removed")
        else:
            problems.extend(_enum_breaks(name, old_enum, new_enum))
    return problems
