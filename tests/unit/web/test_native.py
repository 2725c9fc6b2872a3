"""The JSON routes' reply encoding against protobuf's own proto3 JSON, on every message of the API."""

from __future__ import annotations

import math
import random
from typing import Any

import orjson
import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.web.native import SERVICE, dump, path_of

SPECIAL = [0.0, -0.0, 1e-45, 3.4e38, float("nan"), float("inf"), float("-inf"), 0.1, -2.5]


def fill(message: Message, rng: random.Random, depth: int = 0) -> Message:
    """Random values in some of the fields (every kind: enums, optional, oneof, repeated, nested)."""
    for field in message.DESCRIPTOR.fields:
        if rng.random() < 0.3:
            continue  # left unset
        count = rng.randint(0, 3) if field.is_repeated else 1
        for _ in range(count):
            if field.message_type is not None:
                if depth > 3:
                    break
                target = (
                    getattr(message, field.name).add() if field.is_repeated else getattr(message, field.name)
                )
                fill(target, rng, depth + 1)
                if not field.is_repeated:
                    target.SetInParent()
                continue
            value = _value(field, rng)
            if field.is_repeated:
                getattr(message, field.name).append(value)
            else:
                setattr(message, field.name, value)
    return message


def _value(field: Any, rng: random.Random) -> Any:
    if field.enum_type is not None:
        return rng.choice([v.number for v in field.enum_type.values])
    if field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return rng.choice([*SPECIAL, rng.uniform(-10, 10)])
    if field.type == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if field.type == FieldDescriptor.TYPE_STRING:
        return rng.choice(["", "a", "Zug fährt", "\u0000\u200b", "語"])
    if field.type == FieldDescriptor.TYPE_BYTES:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 5)))
    if field.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64):
        return rng.choice([0, 1, 2**32 - 1 if field.type == FieldDescriptor.TYPE_UINT32 else 2**64 - 1])
    return rng.choice([0, 1, -1, 2**31 - 1])


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, dict):
        return (
            isinstance(got, dict) and got.keys() == want.keys() and all(_same(got[k], want[k]) for k in want)
        )
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(_same, got, want))
    if isinstance(want, float) and isinstance(got, (int, float)):
        return math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-44)
    return bool(got == want)


MESSAGES = sorted(
    {m.output_type.name for m in SERVICE.methods} | {m.input_type.name for m in SERVICE.methods}
)


@pytest.mark.parametrize("name", MESSAGES)
def test_replies_encode_as_protobufs_own_proto3_json(name: str) -> None:
    rng = random.Random(name)
    for _ in range(40):
        message = fill(getattr(pb, name)(), rng)
        got = orjson.loads(orjson.dumps(dump(message), option=orjson.OPT_SERIALIZE_NUMPY))
        want = orjson.loads(
            json_format.MessageToJson(
                message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )
        )
        assert _same(got, want), (got, want)


def test_routes_are_named_after_their_rpcs() -> None:
    assert path_of(SERVICE.methods_by_name["FillMask"]) == "/v1/fill-mask"
    assert path_of(SERVICE.methods_by_name["TranslateDocument"]) == "/v1/translate-document"
