"""The public API: generated code is current, and the proto declares every rpc the design promises."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from gateway.pb.polyglot.v1 import polyglot_pb2

ROOT = Path(__file__).resolve().parents[2]


def _load_generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "tools" / "gen_protos.py")
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_generated_code_matches_make_protos(tmp_path: Path) -> None:
    fresh = tmp_path / "pb"
    _load_generator().generate(fresh)
    committed = ROOT / "gateway" / "pb"
    fresh_files = {p.relative_to(fresh): p.read_text() for p in fresh.rglob("*") if p.is_file()}
    committed_files = {
        p.relative_to(committed): p.read_text()
        for p in committed.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert sorted(fresh_files) == sorted(committed_files), "run `make protos` and commit gateway/pb/"
    stale = [str(name) for name, text in fresh_files.items() if committed_files[name] != text]
    assert not stale, f"gateway/pb/ is stale ({stale}): run `make protos` and commit it"


def test_service_declares_every_rpc() -> None:
    service = polyglot_pb2.DESCRIPTOR.services_by_name["Polyglot"]
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {
        "Translate",
        "TranslateStream",
        "TranslateTokens",
        "Classify",
        "Segment",
        "Embed",
        "FillMask",
        "ListModels",
        "DetectLanguage",
        "TranslateDocument",
        "TranslateDocumentStream",
    }
    documents = methods["TranslateDocumentStream"]
    assert not documents.client_streaming
    assert documents.server_streaming
    stream = methods["TranslateStream"]
    assert stream.client_streaming
    assert stream.server_streaming
    assert not methods["Translate"].client_streaming
    tokens = methods["TranslateTokens"]
    assert not tokens.client_streaming
    assert tokens.server_streaming


def test_enums_start_with_unspecified() -> None:
    for enum in polyglot_pb2.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values[0].number == 0
        assert enum.values[0].name.endswith("_UNSPECIFIED"), enum.name


def test_embedding_values_are_packed() -> None:
    field = polyglot_pb2.Embedding.DESCRIPTOR.fields_by_name["values"]
    message = polyglot_pb2.Embedding(values=[0.5] * 768)
    # Packed: one tag and one length prefix, then 4 bytes per float.
    assert len(message.SerializeToString()) < 768 * 4 + 8
    assert field.is_packed
