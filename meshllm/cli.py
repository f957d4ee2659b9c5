"""The ``meshllm`` command line.

One module (~700 lines): every ``meshllm`` subcommand, each a thin call into
:mod:`meshllm.supervisor`, :mod:`meshllm.access` or a service's own code; the command
line's help reads as one tree.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from meshllm.access import api_key, base_url, ensure_dev_key, gateway_settings, greeting
from meshllm.datasets_cli import datasets_app
from meshllm.export_cli import export
from meshllm.ops_cli import alerts, ops_app, top
from meshllm.services import SERVICES
from meshllm.state import cli_settings, read_state, service_settings
from meshllm.supervisor import Supervisor
from meshllm.train_cli import train_app
from shared.logging import configure_logging
from shared.settings import SettingsError, load_settings
from shared.topics import REGISTRY

if TYPE_CHECKING:
    from collections.abc import Callable

    from services.audit.checkpoint import Checkpoint, CheckpointSigner, CheckpointVerifier
    from services.audit.settings import AuditSettings
    from services.audit.store import AuditStore
    from services.gateway.auth import KeyStore
    from services.gateway.settings import GatewaySettings

app = typer.Typer(
    help="meshllm: an enterprise LLM platform as an event-driven mesh over Kafka.",
    no_args_is_help=True,
    add_completion=False,
)
topics_app = typer.Typer(help="The registered Kafka topics.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")
keys_app = typer.Typer(help="API keys of the gateway.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
audit_app = typer.Typer(
    help="The tamper-evident audit log: verify it, export its public key and checkpoints.",
    no_args_is_help=True,
)
app.add_typer(audit_app, name="audit")
app.add_typer(ops_app, name="ops")
app.add_typer(datasets_app, name="datasets")
app.add_typer(train_app, name="train")
app.command()(top)
app.command()(alerts)
app.command()(export)
console = Console()
errors = Console(stderr=True, soft_wrap=True)


_settings = cli_settings
_read_state = read_state


@app.command()
def up(
    port: Annotated[
        int | None, typer.Option(help="Port of the embedded broker (default: from settings).")
    ] = None,
) -> None:
    """Start the broker and every service; stop all on Ctrl-C or when one dies."""
    settings = _settings()
    if port is not None:
        host = settings.kafka.bootstrap.split(",")[0].rpartition(":")[0]
        settings.kafka.bootstrap = f"{host}:{port}"
    configure_logging("meshllm", settings.log_level, settings.log_format)
    existing = _read_state(settings)
    if existing and _alive(existing["pid"]):
        errors.print(
            f"[red]meshllm is already up (pid {existing['pid']}); `meshllm down` stops it[/red]"
        )
        raise typer.Exit(1)

    gateway = _gateway_settings()
    lines = greeting(gateway, ensure_dev_key(gateway))

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        return await Supervisor(settings, SERVICES, greeting=lines).run(stop)

    raise typer.Exit(asyncio.run(main()))


def _gateway_settings() -> GatewaySettings:
    try:
        return gateway_settings()
    except SettingsError as error:
        errors.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None


@app.command()
def chat(
    message: Annotated[str, typer.Argument(help="What to ask.")],
    model: Annotated[str | None, typer.Option(help="Model (default: the gateway's).")] = None,
    system: Annotated[str | None, typer.Option(help="A system prompt.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, max=2.0)] = 0.0,
) -> None:
    """Ask the running mesh one question; the answer streams as it is generated."""
    settings = _gateway_settings()
    key = api_key(settings)
    if not key:
        errors.print("[red]no API key: set MESHLLM_API_KEY (see `meshllm keys create`)[/red]")
        raise typer.Exit(2)
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": message})
    body = {
        "model": model or settings.default_model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
    }
    url = base_url(settings) + "/chat/completions"
    try:
        with httpx.stream(
            "POST", url, json=body, headers={"authorization": f"Bearer {key}"}, timeout=300
        ) as reply:
            if reply.status_code != 200:
                reply.read()
                detail = reply.json().get("error", {}).get("message", reply.text)
                errors.print(f"[red]{reply.status_code}: {escape(str(detail))}[/red]")
                raise typer.Exit(1)
            for line in reply.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    errors.print(f"[red]{escape(chunk['error'].get('message', ''))}[/red]")
                    raise typer.Exit(1)
                for choice in chunk.get("choices", ()):
                    print(choice.get("delta", {}).get("content") or "", end="", flush=True)
    except httpx.TransportError as error:
        errors.print(f"[red]cannot reach the gateway at {url}: {error} (is `meshllm up` running?)")
        raise typer.Exit(1) from None
    print()


@app.command()
def run(
    name: Annotated[
        str, typer.Argument(help="The service: " + ", ".join(s.name for s in SERVICES))
    ],
) -> None:
    """Run one service in this process (as a container's command, or for debugging)."""
    import runpy

    spec = next((s for s in SERVICES if s.name == name), None)
    if spec is None:
        errors.print(
            f"[red]no service {name!r}; choose one of {', '.join(s.name for s in SERVICES)}[/red]"
        )
        raise typer.Exit(2)
    runpy.run_module(spec.module, run_name="__main__", alter_sys=True)


@app.command("service-tokens")
def service_tokens(
    directory: Annotated[Path, typer.Argument(help="Where the tokens are written.")],
    split: Annotated[
        bool,
        typer.Option(
            help="<dir>/<name>/<name>.token and <dir>/digests/<name>.sha256: each service "
            "mounts its own token and the digests, never another service's token."
        ),
    ] = False,
) -> None:
    """Make the services' identity tokens and the event signing key (0600), once: existing
    ones are kept.

    Each service sends its token to the internal APIs it calls, which know the callers by
    their tokens' SHA-256 (see MESHLLM_SERVICE_AUTH__TOKEN_FILE and __TOKENS_DIR); every
    producer signs events with events.key (MESHLLM_BUS__SIGNING_KEY_FILE).
    """
    from shared.bus.signing import KEY_FILE, ensure_key
    from shared.service_auth import IDENTITIES, ensure_tokens

    try:
        ensure_tokens(directory, IDENTITIES, split=split)
        ensure_key(directory / "events" / KEY_FILE if split else directory / KEY_FILE)
    except OSError as error:
        errors.print(f"[red]{escape(str(error))}[/red]")
        raise typer.Exit(2) from None
    errors.print(f"service tokens of {', '.join(IDENTITIES)} are in {directory}")


@app.command()
def down(
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a clean stop.")] = 60.0,
) -> None:
    """Stop a mesh started by `meshllm up`, cleanly."""
    settings = _settings()
    state = _read_state(settings)
    if not state or not _alive(state["pid"]):
        console.print("meshllm is not running")
        return
    os.kill(state["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(state["pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(state["pid"]):
        errors.print(f"[red]meshllm (pid {state['pid']}) still running after {timeout:.0f}s[/red]")
        raise typer.Exit(1)
    console.print("meshllm stopped")


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show what runs: the broker and each service's readiness. Exit 1 if not all ready."""
    settings = _settings()
    state = _read_state(settings)
    if not state or not _alive(state["pid"]):
        if as_json:
            print(json.dumps({"running": False}))
        else:
            console.print("meshllm is not running (start it with `meshllm up`)")
        raise typer.Exit(1)
    rows = [_broker_row(state)]
    host = state["health_host"]
    for name, service in state["services"].items():
        rows.append(_service_row(name, service, host))
    all_ready = all(row["ready"] for row in rows)
    if as_json:
        print(json.dumps({"running": True, "pid": state["pid"], "components": rows}, indent=2))
    else:
        table = Table(title=f"meshllm (pid {state['pid']}, {state['mode']} mode)")
        for column in ("component", "pid", "address", "ready", "detail"):
            table.add_column(column)
        for row in rows:
            table.add_row(
                row["name"],
                str(row["pid"] or "-"),
                row["address"],
                "[green]yes[/green]" if row["ready"] else "[red]no[/red]",
                row["detail"],
            )
        console.print(table)
    raise typer.Exit(0 if all_ready else 1)


@app.command()
def broker(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 9092,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
) -> None:
    """Run only the embedded broker (in memory), with the registered topics, until Ctrl-C."""
    from shared.bus.embedded import EmbeddedBroker

    configure_logging("broker")

    async def main() -> None:
        embedded = EmbeddedBroker(host, port)
        await embedded.start()
        console.print(f"broker on {embedded.bootstrap} (in memory: events are lost when it stops)")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        await embedded.stop()

    asyncio.run(main())


@topics_app.command("list")
def topics_list() -> None:
    """Print the topic registry."""
    table = Table()
    for column in (
        "topic",
        "messages",
        "key",
        "partitions",
        "retention h",
        "producers",
        "consumers",
    ):
        table.add_column(column)
    for topic in REGISTRY:
        table.add_row(
            topic.name,
            ", ".join(m.DESCRIPTOR.name for m in topic.messages) or "OTLP spans",
            topic.key,
            str(topic.partitions),
            f"{topic.retention_ms / 3_600_000:g}",
            ", ".join(topic.producers),
            ", ".join(topic.consumers),
        )
    console.print(table)


@topics_app.command("create")
def topics_create(
    replication: Annotated[int, typer.Option(help="Replication factor.")] = 1,
) -> None:
    """Create the registered topics and their dead-letter topics on the configured Kafka."""
    from shared.bus.admin import ensure_topics, wait_for_broker

    settings = _settings()
    configure_logging("meshllm", settings.log_level, settings.log_format)

    async def main() -> list[str]:
        await wait_for_broker(settings.kafka.bootstrap, timeout=120, kafka=settings.kafka)
        return await ensure_topics(
            settings.kafka.bootstrap, replication=replication, kafka=settings.kafka
        )

    try:
        created = asyncio.run(main())
    except (TimeoutError, RuntimeError) as error:
        errors.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from None
    console.print(
        f"{len(created)} topics created on {settings.kafka.bootstrap}"
        + (f": {', '.join(created)}" if created else " (all existed)")
    )


def _key_store() -> KeyStore:
    import sqlite3

    from services.gateway.auth import KeyStore
    from services.gateway.settings import GatewaySettings

    try:
        settings = load_settings(GatewaySettings)
    except SettingsError as error:
        errors.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    try:
        return KeyStore(settings.keys_db_path, cache_ttl_s=0)
    except (OSError, sqlite3.Error) as error:
        errors.print(f"[red]cannot open the key database {settings.keys_db_path}: {error}[/red]")
        raise typer.Exit(1) from None


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="The tenant the key belongs to.")],
    role: Annotated[list[str], typer.Option("--role", help="A role of the key (repeatable).")],
    name: Annotated[str, typer.Option(help="A note saying what the key is for.")] = "",
    rpm: Annotated[
        int | None, typer.Option(help="Requests per minute (default: the gateway's).")
    ] = None,
    tpm: Annotated[
        int | None, typer.Option(help="Tokens per minute (default: the gateway's).")
    ] = None,
) -> None:
    """Create an API key and print it (once: only its hash is stored)."""
    with _key_store() as store:
        try:
            record, key = store.create(tenant, role, name=name, rpm=rpm, tpm=tpm)
        except ValueError as error:
            errors.print(f"[red]{error}[/red]")
            raise typer.Exit(2) from None
    errors.print(
        f"created key {record.key_id} for tenant {record.tenant} (roles: {', '.join(record.roles)})"
    )
    print(key, flush=True)
    errors.print("Keep it now: it will not be shown again.")


@keys_app.command("list")
def keys_list(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List the API keys (never their secrets), revoked ones included."""
    with _key_store() as store:
        records = store.list()
    if as_json:
        print(json.dumps([record.to_json() for record in records], indent=2))
        return
    table = Table()
    table.add_column("key id", no_wrap=True)
    table.add_column("tenant", no_wrap=True)
    for column in ("roles", "name", "rpm", "tpm"):
        table.add_column(column)
    table.add_column("created", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for record in records:
        table.add_row(
            record.key_id,
            record.tenant,
            ", ".join(record.roles),
            escape(record.name),
            str(record.rpm or "-"),
            str(record.tpm or "-"),
            record.created_at.strftime("%Y-%m-%d"),
            "[red]revoked[/red]" if record.revoked else "[green]active[/green]",
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (the 12 hex characters after mk-).")],
) -> None:
    """Revoke an API key; gateways refuse it within their key cache time (a few seconds)."""
    with _key_store() as store:
        revoked = store.revoke(key_id)
    if not revoked:
        errors.print(f"[red]no active key {key_id!r}[/red]")
        raise typer.Exit(1)
    console.print(f"key {key_id} revoked")


def _audit_settings() -> AuditSettings:
    from services.audit.settings import AuditSettings

    return service_settings(AuditSettings, "audit")


def _audit_store(db: Path | None, opensearch: str | None, index_prefix: str | None) -> AuditStore:
    from services.audit.opensearch_store import OpenSearchAuditStore
    from services.audit.sqlite_store import SqliteAuditStore
    from services.audit.store import StoreError, open_store

    settings = _audit_settings()
    try:
        if db is not None:
            return SqliteAuditStore(db, read_only=True)
        if opensearch is not None:
            return OpenSearchAuditStore.connect(
                [opensearch],
                index_prefix=index_prefix or settings.opensearch.index_prefix,
                create=False,
            )
        return open_store(settings, read_only=True)
    except StoreError as error:
        errors.print(f"[red]{escape(str(error))}[/red]")
        raise typer.Exit(2) from None


def _audit_keys(
    public_keys: list[Path], signing_key: Path | None
) -> tuple[CheckpointVerifier, CheckpointSigner | None]:
    """The trusted public keys, and the signing key when it can be read (for seals)."""
    from services.audit.checkpoint import (
        CheckpointError,
        CheckpointSigner,
        CheckpointVerifier,
        SigningKeyError,
        public_key_from_pem,
    )

    path = signing_key or _audit_settings().signing_key_path
    signer = None
    if signing_key is not None or path.exists():
        try:
            signer = CheckpointSigner.load(path)
        except SigningKeyError as error:
            if signing_key is not None or not public_keys:
                errors.print(f"[red]{escape(str(error))}[/red]")
                raise typer.Exit(2) from None
            errors.print(f"[yellow]seals not checked: {escape(str(error))}[/yellow]")
    try:
        keys = [public_key_from_pem(pem.read_bytes()) for pem in public_keys]
    except (OSError, CheckpointError) as error:
        errors.print(f"[red]cannot read a public key: {escape(str(error))}[/red]")
        raise typer.Exit(2) from None
    if signer is not None:
        keys.append(signer.public_key)
    if not keys:
        errors.print(
            f"[red]no key to verify with: pass --public-key FILE, or run where the signing "
            f"key is ({path})[/red]"
        )
        raise typer.Exit(2)
    return CheckpointVerifier(keys), signer


def _trusted_checkpoints(paths: list[Path]) -> list[Checkpoint]:
    from services.audit.checkpoint import Checkpoint, CheckpointError

    found: list[Checkpoint] = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
            items = data if isinstance(data, list) else [data]
            found.extend(Checkpoint.from_json(item) for item in items)
        except (OSError, ValueError, CheckpointError) as error:
            errors.print(f"[red]cannot read checkpoint file {path}: {escape(str(error))}[/red]")
            raise typer.Exit(2) from None
    return found


StoreOption = Annotated[
    Path | None, typer.Option("--db", help="A SQLite audit store (default: from settings).")
]
OpenSearchOption = Annotated[
    str | None, typer.Option("--opensearch", help="URL of an OpenSearch audit store.")
]
PrefixOption = Annotated[
    str | None, typer.Option(help="Index prefix of the OpenSearch store (default: settings).")
]


@audit_app.command("verify")
def audit_verify(
    *,
    record: Annotated[
        int | None, typer.Option("--record", help="Verify one record (leaf index) instead.")
    ] = None,
    event_id: Annotated[
        str | None, typer.Option("--event-id", help="Verify one record (event id) instead.")
    ] = None,
    size: Annotated[
        int | None,
        typer.Option(help="With --record/--event-id: the checkpoint's size (default: latest)."),
    ] = None,
    consistency: Annotated[
        tuple[int, int] | None,
        typer.Option(help="OLD NEW: prove the checkpoint of size OLD a prefix of NEW's."),
    ] = None,
    proof: Annotated[
        Path | None,
        typer.Option(help="Check a record proof file from the audit API (no store needed)."),
    ] = None,
    public_key: Annotated[
        list[Path] | None,
        typer.Option("--public-key", help="A trusted PEM public key (repeatable)."),
    ] = None,
    signing_key: Annotated[
        Path | None,
        typer.Option(help="The signing key, to name exact records by their seals."),
    ] = None,
    checkpoint: Annotated[
        list[Path] | None,
        typer.Option("--checkpoint", help="Checkpoints exported earlier (JSON), trusted too."),
    ] = None,
    db: StoreOption = None,
    opensearch: OpenSearchOption = None,
    index_prefix: PrefixOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Verify the audit log (every record and checkpoint), one record, or two checkpoints."""
    from services.audit.proofs import RecordProof
    from services.audit.render import print_proof_report, print_store_report
    from services.audit.verify import (
        check_record_proof,
        verify_checkpoints,
        verify_record,
        verify_store,
    )

    verifier, signer = _audit_keys(public_key or [], signing_key)
    trusted = _trusted_checkpoints(checkpoint or [])
    if proof is not None:
        try:
            bundle = RecordProof.from_json(json.loads(proof.read_text()))
        except (OSError, ValueError) as error:
            errors.print(f"[red]cannot read the proof {proof}: {escape(str(error))}[/red]")
            raise typer.Exit(2) from None
        report = check_record_proof(bundle, verifier)
        _show(report.to_json() if as_json else None, lambda: print_proof_report(console, report))
        raise typer.Exit(0 if report.ok else 1)
    with _audit_store(db, opensearch, index_prefix) as store:
        if record is not None or event_id is not None:
            result = verify_record(
                store, verifier, leaf_index=record, event_id=event_id, tree_size=size,
                trusted=trusted,
            )  # fmt: skip
        elif consistency is not None:
            result = verify_checkpoints(store, verifier, *consistency, trusted=trusted)
        else:
            sealer = signer.sealer(store.log_id) if signer is not None else None
            full = verify_store(store, verifier, sealer=sealer, trusted=trusted)
            _show(full.to_json() if as_json else None, lambda: print_store_report(console, full))
            raise typer.Exit(0 if full.ok else 1)
    _show(result.to_json() if as_json else None, lambda: print_proof_report(console, result))
    raise typer.Exit(0 if result.ok else 1)


def _show(data: dict[str, Any] | None, render: Callable[[], None]) -> None:
    if data is not None:
        print(json.dumps(data, indent=2))
    else:
        render()


@audit_app.command("public-key")
def audit_public_key(
    out: Annotated[Path | None, typer.Option(help="Write it to this file.")] = None,
) -> None:
    """Print (or write) the PEM public key that verifies the audit log's checkpoints."""
    from services.audit.checkpoint import CheckpointSigner, SigningKeyError

    path = _audit_settings().signing_key_path
    created = not path.exists()
    try:
        signer = CheckpointSigner.load_or_create(path)
    except SigningKeyError as error:
        errors.print(f"[red]{escape(str(error))}[/red]")
        raise typer.Exit(2) from None
    if created:
        errors.print(f"created the audit signing key {path} (0600)")
    pem = signer.public_key_pem().decode()
    if out is not None:
        out.write_text(pem)
        errors.print(f"public key {signer.key_id} written to {out}")
    else:
        print(pem, end="")


@audit_app.command("checkpoints")
def audit_checkpoints(
    latest: Annotated[bool, typer.Option(help="Only the latest checkpoint.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON, to keep elsewhere.")] = False,
    db: StoreOption = None,
    opensearch: OpenSearchOption = None,
    index_prefix: PrefixOption = None,
) -> None:
    """List the signed checkpoints (keep the JSON elsewhere: `verify --checkpoint` trusts it)."""
    from services.audit.records import iso

    with _audit_store(db, opensearch, index_prefix) as store:
        found = store.checkpoints()
        log_id = store.log_id
    if latest:
        found = found[-1:]
    if as_json:
        print(json.dumps([c.to_json() for c in found], indent=2))
        return
    table = Table(title=f"checkpoints of {log_id}")
    for column in ("size", "root", "signed", "key"):
        table.add_column(column, no_wrap=True)
    for item in found:
        table.add_row(
            str(item.tree_size), item.root_hash.hex(), iso(item.timestamp_ns), item.key_id
        )
    console.print(table)


def _alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; only its parent has not reaped it yet
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def _broker_row(state: dict[str, Any]) -> dict[str, Any]:
    address = str(state["bootstrap"])
    host, _, port = address.split(",", maxsplit=1)[0].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            ready, detail = True, "accepting connections"
    except OSError as error:
        ready, detail = False, str(error)
    if state.get("broker_pid"):
        detail += " (embedded, in memory)"
    return {
        "name": "broker",
        "pid": state.get("broker_pid"),
        "address": address,
        "ready": ready,
        "detail": detail,
    }


def _service_row(name: str, service: dict[str, Any], host: str) -> dict[str, Any]:
    url = f"http://{host}:{service['health_port']}/readyz"
    try:
        response = httpx.get(url, timeout=2)
        body = response.json()
        ready = response.status_code == 200
        detail = ", ".join(f"{k}: {v}" for k, v in body.get("checks", {}).items())
    except (httpx.HTTPError, ValueError) as error:
        ready, detail = False, f"no answer from {url}: {error}"
    return {
        "name": name,
        "pid": service["pid"],
        "address": url,
        "metrics": f"http://{host}:{service['health_port']}/metrics",
        "ready": ready,
        "detail": detail,
    }
