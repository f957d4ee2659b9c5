"""``meshllm datasets build|upload|list|show|export``: training datasets from rated answers,
through the gateway (the caller's key decides what it may build and read).

The key is ``MESHLLM_API_KEY``, else this machine's key from ``meshllm up``; ``--url``
names another gateway (default: this machine's, from the gateway's settings).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from meshllm.access import api_key, base_url, gateway_settings

datasets_app = typer.Typer(help="Training datasets built from feedback.", no_args_is_help=True)
console = Console()
errors = Console(stderr=True, soft_wrap=True)

Url = Annotated[str | None, typer.Option(help="The gateway's /v1 URL (default: this machine's).")]


def _client(url: str | None) -> httpx.Client:
    settings = gateway_settings()
    key = api_key(settings)
    if key is None:
        errors.print("[red]no API key: set MESHLLM_API_KEY (see `meshllm keys create`)[/red]")
        raise typer.Exit(2)
    return httpx.Client(
        base_url=(url or base_url(settings)).rstrip("/"),
        headers={"authorization": f"Bearer {key}"},
        timeout=600,
    )


def _call(url: str | None, method: str, path: str, **send: Any) -> httpx.Response:
    try:
        with _client(url) as client:
            reply = client.request(method, path, **send)
    except httpx.HTTPError as error:
        errors.print(f"[red]the gateway did not answer: {error}[/red]")
        raise typer.Exit(1) from None
    if reply.status_code >= 400:
        try:
            message = reply.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = reply.text[:500]
        errors.print(f"[red]{reply.status_code}: {message}[/red]")
        raise typer.Exit(1)
    return reply


def _summary(manifest: dict[str, Any]) -> None:
    splits = manifest["splits"]
    console.print(
        f"[bold]{manifest['id']}[/bold]: {splits['train']['rows']} train, "
        f"{splits['eval']['rows']} eval rows; sha256 {manifest['sha256'][:16]}..."
    )
    counts = ", ".join(f"{k} {v}" for k, v in manifest["counts"].items() if v)
    console.print(f"  {counts or 'no rows considered'}")


@datasets_app.command("build")
def build(
    name: Annotated[str, typer.Argument(help="The dataset's name; each build is a new version.")],
    *,
    since: Annotated[str | None, typer.Option(help="Rated at or after (ISO 8601).")] = None,
    until: Annotated[str | None, typer.Option(help="Rated before (ISO 8601).")] = None,
    min_rating: Annotated[int, typer.Option(min=1, max=5, help="1-5; up is 5, down 1.")] = 4,
    model: Annotated[str | None, typer.Option(help="Only answers of this model.")] = None,
    label: Annotated[list[str] | None, typer.Option(help="Only answers with a label.")] = None,
    eval_fraction: Annotated[float, typer.Option(min=0.0, max=0.5)] = 0.1,
    sources: Annotated[
        bool, typer.Option(help="Keep the knowledge-base sources the model was given.")
    ] = True,
    kind: Annotated[
        str, typer.Option(help="chat, or preference: pairs for DPO (corrections, up vs down).")
    ] = "chat",
    url: Url = None,
) -> None:
    """Build the next version of a dataset from your tenant's rated answers."""
    body: dict[str, Any] = {"name": name, "min_rating": min_rating, "kind": kind,
                            "eval_fraction": eval_fraction, "sources": sources}  # fmt: skip
    for field, value in (("since", since), ("until", until), ("model", model)):
        if value is not None:
            body[field] = value
    if label:
        body["labels"] = label
    with console.status(f"building {name}"):
        manifest = _call(url, "POST", "/datasets", json=body).json()
    _summary(manifest)


@datasets_app.command("upload")
def upload(
    name: Annotated[str, typer.Argument(help="The dataset's name.")],
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Chat JSONL.")],
    eval_fraction: Annotated[float, typer.Option(min=0.0, max=0.5)] = 0.1,
    url: Url = None,
) -> None:
    """Make a chat-format JSONL file a dataset, through the same PII and quality checks."""
    params = {"name": name, "eval_fraction": str(eval_fraction)}
    with console.status(f"uploading {file.name}"):
        reply = _call(url, "POST", "/datasets/upload", params=params, content=file.read_bytes())
    _summary(reply.json())


@datasets_app.command("list")
def list_datasets(url: Url = None) -> None:
    """Your tenant's datasets, every version."""
    table = Table("id", "rows", "train", "eval", "created", "used by")
    for manifest in _call(url, "GET", "/datasets").json()["data"]:
        splits = manifest["splits"]
        table.add_row(
            manifest["id"], str(manifest["rows"]), str(splits["train"]["rows"]),
            str(splits["eval"]["rows"]), manifest["created_at"], ", ".join(manifest["used_by"]),
        )  # fmt: skip
    console.print(table)


@datasets_app.command("show")
def show(dataset_id: Annotated[str, typer.Argument()], url: Url = None) -> None:
    """A dataset's manifest, as JSON."""
    console.print_json(json.dumps(_call(url, "GET", f"/datasets/{dataset_id}").json()))


@datasets_app.command("export")
def export(
    dataset_id: Annotated[str, typer.Argument()],
    out: Annotated[Path, typer.Argument(file_okay=False, help="Folder for the JSONL files.")],
    url: Url = None,
) -> None:
    """Write train.jsonl, eval.jsonl and manifest.json of a dataset into a folder, each
    split checked against the manifest's sha256."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = _call(url, "GET", f"/datasets/{dataset_id}").json()
    for split in ("train", "eval"):
        data = _call(url, "GET", f"/datasets/{dataset_id}/files/{split}").content
        expected = manifest["splits"][split]["sha256"]
        if hashlib.sha256(data).hexdigest() != expected:
            errors.print(f"[red]{split}: the bytes do not match the manifest's sha256[/red]")
            raise typer.Exit(1)
        (out / f"{split}.jsonl").write_bytes(data)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    console.print(f"wrote {out}/train.jsonl, eval.jsonl, manifest.json")
