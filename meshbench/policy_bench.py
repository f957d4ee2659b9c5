"""What an access decision costs: the policy in ``policies/`` per decision, p50/p99.

Run from the repository root::

    python -m meshbench.policy_bench [--samples N] [--http-samples N] [--quick]

Rows, measured in one run on the same mix of eight requests (allowed and denied: a chat
within limits, a model not granted, another tenant's audit records, a platform-wide
deploy, a priority not allowed, a training job, an audit verification, tokens over the
limit), taken in turn:

1. **meshllm EmbeddedEvaluator** (regorus, in process): the whole ``decide``, from an
   ``AccessRequest`` to a ``Decision`` (input document, evaluation, checks).
2. **gateway RegoPolicy**: the gateway's ``decide(PolicyRequest)`` on top of it.
3. **regorus, raw**: ``set_input`` + ``eval_rule`` on prepared input documents.
4. **regopy (rego-cpp)**: the peer interpreter on the same documents, on a bundle
   compiled once for the decision rule, and through ``query`` (which compiles on every
   call); its decisions are checked against regorus's.
5. **OPA REST path** (``OpaServerEvaluator`` through opa-python-client over HTTP on
   localhost) against the test double of ``tests/policy/opa_double.py``, which evaluates
   with regorus: the cost of the client and the HTTP round trip, *not* of a real OPA
   server (none is available here).

Target: p99 < 1 ms per decision in process. Results: ``meshbench/results/policy.md``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from meshbench.report import machine_lines, package_version
from services.gateway.auth import Principal
from services.gateway.policy import PolicyRequest, RegoPolicy
from shared.policy import (
    PLATFORM_TENANT,
    AccessRequest,
    EmbeddedEvaluator,
    PolicyBundle,
    Resource,
    Subject,
)

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
COMMAND = "python -m meshbench.policy_bench"
RULE = "data.meshllm.authz.decision"
TARGET_P99_MS = 1.0


def requests() -> list[AccessRequest]:
    """The mix of requests every row decides, in turn."""
    smol = "smollm2-135m-instruct"

    def subject(*roles: str, tenant: str = "acme") -> Subject:
        return Subject(f"key:{roles[0]}", tenant, roles)

    return [
        AccessRequest(subject("analyst"), "chat", Resource("model", "acme", smol), None, 256),
        AccessRequest(subject("user"), "chat", Resource("model", "acme", "gpt-4o")),
        AccessRequest(subject("admin"), "read", Resource("audit", "beta")),
        AccessRequest(
            subject("platform-admin", tenant="ops"), "deploy", Resource("admin", PLATFORM_TENANT)
        ),
        AccessRequest(subject("service"), "complete", Resource("model", "acme", smol), "high"),
        AccessRequest(subject("developer"), "create", Resource("training_job", "acme", "job-1")),
        AccessRequest(subject("auditor"), "verify", Resource("audit", "acme")),
        AccessRequest(
            subject("analyst", "developer"),
            "chat",
            Resource("model", "acme", "llama-3.1-8b", "2"),
            "normal",
            4000,
        ),
    ]


@dataclass
class Row:
    case: str
    samples: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    note: str

    @property
    def per_second(self) -> float:
        return 1000.0 / self.mean_ms if self.mean_ms else 0.0


def measure(case: str, decide: Callable[[int], Any], count: int, samples: int, note: str) -> Row:
    """Time ``decide(i)`` for i cycling over ``count`` requests, after a warm-up."""
    for i in range(max(count * 20, samples // 10)):
        decide(i % count)
    timings = []
    gc.disable()
    try:
        for i in range(samples):
            started = time.perf_counter_ns()
            decide(i % count)
            timings.append((time.perf_counter_ns() - started) / 1e6)
    finally:
        gc.enable()
    timings.sort()
    p99 = timings[min(len(timings) - 1, round(0.99 * (len(timings) - 1)))]
    return Row(case, samples, statistics.median(timings), p99, statistics.fmean(timings), note)


def regorus_raw(bundle: PolicyBundle, documents: list[dict[str, Any]]) -> Callable[[int], Any]:
    import regorus  # type: ignore[import-untyped]

    engine = regorus.Engine()
    for source in bundle.sources:
        engine.add_policy(str(source.path), source.text)
    engine.add_data_json(bundle.data_json)

    def decide(i: int) -> Any:
        engine.set_input(documents[i])
        return engine.eval_rule(RULE)

    return decide


def regopy_raw(
    bundle: PolicyBundle, documents: list[dict[str, Any]], *, compiled: bool
) -> Callable[[int], Any]:
    """regopy deciding document ``i``: on a bundle compiled once for the decision rule
    (``compiled``), or through ``query``, which compiles the query on every call."""
    import regopy  # type: ignore[import-untyped]

    builder = regopy.Interpreter()
    for source in bundle.sources:
        builder.add_module(source.path.stem, source.text)
    builder.add_data_json(bundle.data_json)
    inputs = [regopy.Input(document) for document in documents]
    entrypoint = RULE.removeprefix("data.").replace(".", "/")
    compiled_bundle = builder.build(None, [entrypoint]) if compiled else None
    interpreter = regopy.Interpreter() if compiled else builder

    def decide(i: int) -> Any:
        interpreter.set_input(inputs[i])
        try:
            if compiled_bundle is not None:
                output = interpreter.query_bundle_entrypoint(compiled_bundle, entrypoint)
            else:
                output = interpreter.query(RULE)
            return output[0].expressions[0]
        except ValueError as error:  # its output is not always valid JSON (see the notes)
            return error

    return decide


def _comparable(decision: dict[str, Any]) -> dict[str, Any]:
    return {key: sorted(v) if isinstance(v, set | list) else v for key, v in decision.items()}


def run(samples: int, http_samples: int) -> tuple[list[Row], list[str]]:
    bundle = PolicyBundle.from_dir(POLICIES)
    mix = requests()
    documents = [request.to_input() for request in mix]
    notes: list[str] = []
    rows = []

    embedded = EmbeddedEvaluator(bundle)
    outcomes = [embedded.decide(request) for request in mix]
    allowed = sum(decision.allow for decision in outcomes)
    rows.append(
        measure(
            "meshllm EmbeddedEvaluator.decide (regorus)",
            lambda i: embedded.decide(mix[i]),
            len(mix),
            samples,
            f"AccessRequest -> Decision; {allowed} of {len(mix)} requests allowed",
        )
    )

    gateway = RegoPolicy.from_dir(POLICIES)
    model_requests = [
        PolicyRequest(Principal("key:1", "acme", roles, "1", "api_key"), action, model, prio, mt)
        for roles, action, model, prio, mt in [
            (("analyst",), "chat.completions", "smollm2-135m-instruct", None, 256),
            (("user",), "chat.completions", "gpt-4o", None, None),
            (("service",), "completions", "smollm2-135m-instruct", "high", None),
            (("developer",), "embeddings", "llama-3.1-8b", None, None),
        ]
    ]
    rows.append(
        measure(
            "gateway RegoPolicy.decide (regorus)",
            lambda i: gateway.decide(model_requests[i]),
            len(model_requests),
            samples,
            "PolicyRequest -> Decision, the gateway's model questions",
        )
    )

    raw = regorus_raw(bundle, documents)
    rows.append(
        measure(
            f"regorus {metadata.version('gordon-to-regorus')}, raw",
            raw,
            len(documents),
            samples,
            "set_input + eval_rule on prepared documents",
        )
    )

    try:
        peer = regopy_raw(bundle, documents, compiled=True)
        uncompiled = regopy_raw(bundle, documents, compiled=False)
    except ImportError:
        notes.append("regopy is not installed (pip install regopy): its rows are missing")
    else:
        differ = []
        for i in range(len(documents)):
            theirs, ours = peer(i), raw(i)
            if isinstance(theirs, Exception):
                differ.append(f"request {i + 1}: regopy's answer is not valid JSON ({theirs})")
            elif _comparable(theirs) != _comparable(ours):
                differ.append(f"request {i + 1}: regopy {theirs} vs regorus {ours}")
        notes.append(
            f"regopy's decisions equal regorus's on {len(documents) - len(differ)} of "
            f"{len(documents)} requests of the mix" + "".join(f"; {line}" for line in differ)
        )
        version = metadata.version("regopy")
        rows.append(
            measure(
                f"regopy {version} (rego-cpp), compiled bundle",
                peer,
                len(documents),
                samples,
                "build once for the decision rule; set_input + query_bundle_entrypoint + "
                "result as Python",
            )
        )
        rows.append(
            measure(
                f"regopy {version} (rego-cpp), query",
                uncompiled,
                len(documents),
                max(len(documents) * 5, samples // 50),
                "set_input + query (compiles the query on every call) + result as Python",
            )
        )

    rows.append(measure_opa_path(bundle, mix, http_samples))
    return rows, notes


def measure_opa_path(bundle: PolicyBundle, mix: list[AccessRequest], samples: int) -> Row:
    from shared.policy.opa import OpaServerEvaluator
    from tests.policy.opa_double import OpaDouble

    server = OpaDouble().start()
    evaluator = OpaServerEvaluator(server.url, bundle, timeout_s=5.0)
    try:
        return measure(
            "OpaServerEvaluator.decide -> OPA REST test double",
            lambda i: evaluator.decide(mix[i]),
            len(mix),
            samples,
            "opa-python-client, HTTP/1.1 keep-alive on localhost; the double evaluates "
            "with regorus: client + HTTP cost, not a real OPA server's",
        )
    finally:
        evaluator.close()
        server.stop()


def machine_info() -> list[str]:
    """What the numbers were measured on."""
    return [
        *machine_lines(load=True),
        f"regorus (gordon-to-regorus) {package_version('gordon-to-regorus')}, regopy "
        f"{package_version('regopy')}, opa-python-client {package_version('opa-python-client')}",
    ]


def verdict(rows: list[Row]) -> tuple[str, bool]:
    embedded = rows[0]
    return (
        f"in-process decision p99 {embedded.p99_ms:.3f} ms (target < {TARGET_P99_MS:g} ms)",
        embedded.p99_ms < TARGET_P99_MS,
    )


def write_markdown(
    path: Path, rows: list[Row], notes: list[str], args: argparse.Namespace, machine: list[str]
) -> None:
    text, met = verdict(rows)
    table = "\n".join(
        f"| {row.case} | {row.p50_ms:.3f} | {row.p99_ms:.3f} | {row.mean_ms:.3f} | "
        f"{row.per_second:,.0f} | {row.note}; n={row.samples} |"
        for row in rows
    )
    lines = "\n".join(f"- {line}" for line in machine)
    remarks = "\n".join(f"- {note}" for note in notes)
    path.write_text(
        f"""# Policy decision latency

Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.

Command (from the repository root):

```
{COMMAND} --samples {args.samples} --http-samples {args.http_samples}
```

Machine:

{lines}

| case | p50 ms | p99 ms | mean ms | decisions/s (one thread) | note |
|---|---:|---:|---:|---:|---|
{table}

Target:

- {"MET" if met else "NOT MET"}: {text}

How to read it:

- Every row decides the same mix of eight requests in turn (four allowed, four denied for
  different reasons), one decision per timing, after a warm-up, with the garbage
  collector paused while timing. The policy is `policies/authz.rego` with
  `policies/data.json`.
- The raw rows are the interpreters alone on prepared input documents; the meshllm rows
  add what a caller pays: building the input document, and checking and converting the
  result into a `Decision`.
- regopy is the peer interpreter (Microsoft's rego-cpp). Its `query` compiles the query
  on every call, so its fair row is the bundle compiled once for the decision rule. Two
  rego-cpp defects met on this policy: an earlier form of it (a function looking up
  `roles[r]` with `r` bound from data) crashed the process, so the policy now looks roles
  up in comprehensions; and `concat` of an array built by a comprehension quotes its
  strings, which makes regopy's own JSON output invalid for the priority reason (the
  request counted below).
- The OPA row is not OPA: its server is the test double `tests/policy/opa_double.py`
  (`http.server`, evaluating with regorus). It shows what the client side and one HTTP
  round trip on localhost cost; a real OPA server's evaluation time is not in it.
- The load average above says what else ran on the machine; p99 carries that noise.
{remarks}
"""
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--samples", type=int, default=20_000, help="decisions per row")
    parser.add_argument(
        "--http-samples", type=int, default=2_000, help="decisions of the OPA REST row"
    )
    parser.add_argument("--quick", action="store_true", help="2,000 / 200 decisions")
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR / "policy.md", help="where to write the table"
    )
    args = parser.parse_args()
    if args.quick:
        args.samples, args.http_samples = 2_000, 200
    machine = machine_info()
    rows, notes = run(args.samples, args.http_samples)
    table = Table(title="policy decision latency")
    for column in ("case", "p50 ms", "p99 ms", "mean ms", "decisions/s", "note"):
        table.add_column(column, justify="left" if column in {"case", "note"} else "right")
    for row in rows:
        table.add_row(
            row.case,
            f"{row.p50_ms:.3f}",
            f"{row.p99_ms:.3f}",
            f"{row.mean_ms:.3f}",
            f"{row.per_second:,.0f}",
            row.note,
        )
    console = Console()
    console.print(table)
    text, met = verdict(rows)
    console.print(f"{'MET' if met else 'NOT MET'}: {text}")
    for note in notes:
        console.print(f"- {note}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_markdown(args.out, rows, notes, args, machine)
    console.print(f"written to {args.out}")


if __name__ == "__main__":
    main()
