# meshllm developer recipes. `just` (or `python3 dev.py`) lists them.

set shell := ["bash", "-euo", "pipefail", "-c"]

python := ".venv/bin/python"
no_amx := "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
llama_cpp_flags := if arch() == "x86_64" { "-DCMAKE_C_FLAGS='" + no_amx + "' -DCMAKE_CXX_FLAGS='" + no_amx + "'" } else { "" }

[private]
default:
    @just --list --unsorted

# Install everything: runtime, dev tools and benchmark peers.
[group('set-up')]
setup:
    {{python}} -m pip install --quiet -c constraints.txt -e ".[dev,bench]"

# Pin every dependency in constraints.txt, re-resolved in a new venv (--current: freeze .venv).
[group('set-up')]
lock *args:
    {{python}} scripts/lock.py {{args}}

# Start the broker and every service on the embedded defaults (Ctrl-C stops all).
[group('mesh')]
up *args:
    {{python}} -m meshllm up {{args}}

# Stop a mesh started by `just up`.
[group('mesh')]
down:
    {{python}} -m meshllm down

# Show the broker and each service with its readiness.
[group('mesh')]
status:
    {{python}} -m meshllm status

# Run only the embedded broker.
[group('mesh')]
broker *args:
    {{python}} -m meshllm broker {{args}}

# The whole default test suite (starts its own broker).
[group('test')]
test *args:
    {{python}} -m pytest {{args}}

# Tests without the slow ones.
[group('test')]
test-fast *args:
    {{python}} -m pytest -m "not slow" {{args}}

# Only the tests that need the broker.
[group('test')]
test-kafka *args:
    {{python}} -m pytest -m kafka {{args}}

# Lint and format check.
[group('lint')]
lint:
    {{python}} -m ruff check .
    {{python}} -m ruff format --check .

# Format the code.
[group('lint')]
fmt:
    {{python}} -m ruff format .
    {{python}} -m ruff check --fix .

# Type-check shared/ and the command line.
[group('lint')]
typecheck:
    {{python}} -m mypy

# Regenerate the Python code of proto/ (protoc from grpcio-tools).
[group('proto')]
proto:
    {{python}} scripts/gen_proto.py

# Fail if the generated code is stale or the contracts break wire compatibility.
[group('proto')]
proto-check:
    {{python}} scripts/gen_proto.py --check --compat

# Record the current contracts as released (wire compatibility is checked against it).
[group('proto')]
proto-release:
    {{python}} scripts/gen_proto.py --release

# Regenerate the topic reference (docs/asyncapi.yaml, docs/topics.md).
[group('docs')]
docs:
    {{python}} scripts/gen_asyncapi.py

# Fail if the topic reference is stale.
[group('docs')]
docs-check:
    {{python}} scripts/gen_asyncapi.py --check

# Bus latency and throughput, ours vs raw aiokafka and FastStream, on the embedded broker.
[group('bench')]
bench-bus *args:
    {{python}} -m pip install --quiet -c constraints.txt -e ".[bench]"
    {{python}} -m meshbench.bus_bench {{args}}

# CPU inference: our engine (fp32/int8/int4) vs transformers and llama-cpp-python, same GGUF;
# then the prefix cache's time to first token, cold against warm.
# llama-cpp-python compiles llama.cpp for this CPU, without its AMX path: on an AMX Xeon VM
# that path crashed (SIGSEGV in ggml_backend_amx_mul_mat) on every prompt of two tokens or more.
[group('bench')]
bench-inference *args:
    {{python}} -m pip install --quiet -c constraints.txt -e ".[bench]"
    CMAKE_ARGS="{{llama_cpp_flags}}" {{python}} -m pip install --quiet llama-cpp-python
    {{python}} -m meshbench.inference_bench {{args}}
    {{python}} -m meshbench.prefix_cache_bench

# Quality of int8/int4 vs fp32: greedy agreement, perplexity and KL, weight memory.
[group('bench')]
bench-quant *args:
    {{python}} -m meshbench.quant_quality {{args}}

# Mesh overhead: direct model calls vs gateway + Kafka + router; the mesh vs LiteLLM's proxy.
[group('bench')]
bench-mesh *args:
    {{python}} -m pip install --quiet -c constraints.txt -e ".[bench]"
    {{python}} -m meshbench.mesh_bench {{args}}

# What metrics, span export and the ops loop cost the mesh: on and off, in one run.
[group('bench')]
bench-telemetry *args:
    {{python}} -m meshbench.telemetry_overhead {{args}}

# One metric recording: the mesh's instruments vs the OpenTelemetry SDK and prometheus_client.
bench-instruments *args:
    {{python}} -m meshbench.instruments_bench {{args}}

# The embedded broker's CPU per fetch as a partition grows (one record per batch vs 100).
bench-broker *args:
    {{python}} -m meshbench.broker_fetch_cost {{args}}

# The ops loop's drill: a surge past one chat replica, the P99 alert, scale-out to two, recovery.
bench-ops-loop *args:
    {{python}} -m meshbench.ops_loop {{args}}

# From a rating to a dataset candidate (p95 target 60 s), and a dataset build's cost.
[group('bench')]
bench-feedback *args:
    {{python}} -m meshbench.feedback_bench {{args}}

# Fine-tuning: facts learnt (held-out paraphrases, base vs candidate, Q8_0 and Q4_0, our
# engine and llama.cpp) and training tokens/s against a plain transformers + PEFT loop.
[group('bench')]
bench-finetune *args:
    {{python}} -m meshbench.finetune_bench {{args}}

# Training speed alone: the trainer's job against a plain transformers + PEFT loop, alternating.
[group('bench')]
bench-train-throughput *args:
    {{python}} -m meshbench.train_throughput {{args}}

# A release under load: 16 clients through the gateway while a candidate is loaded, takes
# 5, 25, 50% of the callers and is promoted; failed requests counted (must be 0), a plot.
[group('bench')]
bench-release-load *args:
    {{python}} -m meshbench.release_load {{args}}

# DP-SGD at epsilon 8, 4, 1 against the same job without privacy, on held-out IT tickets.
[group('bench')]
bench-dp *args:
    {{python}} -m meshbench.dp_bench {{args}}

# Distillation with pruning: a 20-layer student's speed in our engine and its KL to the teacher.
[group('bench')]
bench-distill *args:
    {{python}} -m meshbench.distill_bench {{args}}

# A load ramp (1, 8, 32 clients) with scale-out on the queue and P99, and on P99 only.
bench-ops-ramp *args:
    {{python}} -m meshbench.ops_ramp {{args}}

# The product as users run it: `meshllm up` through the gateway with the openai client, against
# our engine in process, llama-cpp-python and llama.cpp's own server (continuous batching).
# llama-server is built once into .bench-build/ from the installed llama-cpp-python's sources;
# a failed build does not stop the run: the results say it failed.
[group('bench')]
bench-served *args:
    {{python}} -m pip install --quiet -c constraints.txt -e ".[bench]"
    CMAKE_ARGS="{{llama_cpp_flags}}" {{python}} -m pip install --quiet llama-cpp-python
    -{{python}} -m meshbench.build_llama_server --cmake-args "{{llama_cpp_flags}}"
    {{python}} -m meshbench.served_bench {{args}}

# Policy decision latency: regorus in process (ours) vs regopy, and over the OPA REST API.
[group('bench')]
bench-policy *args:
    {{python}} -m pip install --quiet -c constraints.txt -e ".[bench]"
    {{python}} -m meshbench.policy_bench {{args}}

# PII detection: precision and recall per type on a generated corpus, vs a naive regex.
[group('bench')]
bench-pii *args:
    {{python}} -m pip install --quiet -c constraints.txt -e ".[bench]"
    {{python}} -m meshbench.pii_bench {{args}}

# Retrieval quality (BM25, vectors, hybrid) on a bilingual set; vector search vs faiss at 10k/100k.
[group('bench')]
bench-retrieval *args:
    {{python}} -m pip install --quiet -c constraints.txt -e ".[bench]"
    {{python}} -m meshbench.retrieval_bench {{args}}

# Prompt injection through retrieved documents: how often the answer obeys, old vs new layout.
[group('bench')]
bench-injection *args:
    {{python}} -m meshbench.injection_bench {{args}}
