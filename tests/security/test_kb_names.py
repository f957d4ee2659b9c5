"""Names are matched whole: ``$`` also matches before a final newline, so every validator
must use ``fullmatch`` (or ``\\Z``), and no pattern anchored with ``^...$`` is left to be
used with ``re.match``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.gateway.rag import parse_rag
from services.inference.registry import ModelRegistry
from services.retrieval.service import IngestRefused, check_names
from shared.kb_names import valid_collection, valid_document_id
from shared.openai_protocol import InvalidRequestError
from tests.conftest import ROOT


@pytest.mark.parametrize("name", ["handbook\n", "handbook\r", "hand book", "../handbook", ""])
def test_a_rag_collection_with_a_trailing_newline_or_a_path_is_refused(name: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        parse_rag({"collections": [name]})
    assert refused.value.param == "rag.collections"


def test_retrieval_names_are_whole_matches() -> None:
    assert valid_collection("pub")
    assert valid_document_id("mail:a@b.c")
    for bad in ("pub\n", "pub/x", "..", ""):
        assert not valid_collection(bad)
    for bad in ("doc\n", "a/../b", "a/b", "../a", ""):
        assert not valid_document_id(bad)
    with pytest.raises(IngestRefused, match="document_id"):
        check_names("acme", "pub", "doc\n")
    with pytest.raises(IngestRefused, match="collection"):
        check_names("acme", "pub\n", "doc")


def test_a_model_name_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    with pytest.raises(ValueError, match="must be 1-128 letters"):
        registry.register("smollm2\n", "1", tmp_path / "no-such.gguf")
    assert registry.versions("smollm2\n") == []


ANCHORED = re.compile(r"""re\.compile\(\s*r?["']\^[^"'\n]*\$["']\s*\)""")


def test_no_validator_is_anchored_with_a_dollar_and_matched_with_re_match() -> None:
    found = [
        f"{path.relative_to(ROOT)}: {match.group()}"
        for folder in ("services", "shared", "meshllm", "meshbench", "scripts")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for match in ANCHORED.finditer(path.read_text(encoding="utf-8"))
    ]
    assert found == []
