"""The ``meshllm`` command line."""

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
from meshllm.services import SERVICES
from meshllm.supervisor import Supervisor, state_path
from shared.logging import configure_logging
from shared.settings import MeshSettings, SettingsError, load_settings
from shared.topics import REGISTRY

if TYPE_CHECKING:
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
console = Console()
errors = Console(stderr=True, soft_wrap=True)


def _settings() -> MeshSettings:
    try:
        return load_settings(MeshSettings, service_name="meshllm")
    except SettingsError as error:
        errors.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None


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
        await wait_for_broker(settings.kafka.bootstrap, timeout=120)
        return await ensure_topics(settings.kafka.bootstrap, replication=replication)

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


def _read_state(settings: MeshSettings) -> dict[str, Any] | None:
    path = state_path(settings)
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except (FileNotFoundError, json.JSONDecodeError):
        return None


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
    return {"name": name, "pid": service["pid"], "address": url, "ready": ready, "detail": detail}
