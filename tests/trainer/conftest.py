"""What the trainer's tests share: the bundled base, dequantized once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def base_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One dequantized base for the session (about 45 s on two cores, once)."""
    from services.inference.model.gguf_model import smollm2_path
    from services.trainer.base_model import cached_base

    cache = tmp_path_factory.mktemp("trainer-cache")
    cached_base(smollm2_path(), cache)
    return cache
