"""``python -m services.inference`` on the common service life (shared/service.py): a model
it cannot serve stops the start with a message saying why (the whole mesh's start and stop
with the real model is in tests/test_supervisor.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_a_model_it_cannot_serve_stops_the_start_and_says_why(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "MESHLLM_DATA_DIR": str(tmp_path),
        "MESHLLM_MODEL_NAME": "no-such-model",
        "MESHLLM_REGISTER_DEFAULT_MODEL": "false",
        "MESHLLM_LOG_FORMAT": "json",
    }
    done = subprocess.run(
        [sys.executable, "-m", "services.inference"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "no model to serve" in output
    assert "'no-such-model' is not registered" in output
