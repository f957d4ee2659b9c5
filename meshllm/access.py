"""How a person reaches a running mesh: the gateway's URL and a first API key."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from services.gateway.auth import AuthError, KeyStore
from services.gateway.settings import GatewaySettings
from shared.settings import Mode, load_settings

DEV_KEY_NAME = "meshllm up"
FIRST_QUESTION = "What is the capital of France? Answer in one sentence."
"""The question ``meshllm up`` suggests: the bundled model answers the bare question with a
near tie on its first token (often wrong when quantized); asked for a sentence, it says Paris."""


def gateway_settings() -> GatewaySettings:
    return load_settings(GatewaySettings, service_name="gateway")


def base_url(settings: GatewaySettings) -> str:
    host = "127.0.0.1" if settings.http_host in {"0.0.0.0", "::"} else settings.http_host
    return f"http://{host}:{settings.http_port}/v1"


def dev_key_file(settings: GatewaySettings) -> Path:
    return Path(settings.data_dir) / "run" / "api-key"


def ensure_dev_key(settings: GatewaySettings) -> Path | None:
    """On the embedded defaults, an admin key for this machine's user, kept in a 0600 file.

    Made once and reused while it stays valid (revoke it with ``meshllm keys revoke``
    and the next ``meshllm up`` makes a new one). None in cluster mode: keys there are
    created deliberately with ``meshllm keys create``.
    """
    if settings.mode is not Mode.EMBEDDED:
        return None
    path = dev_key_file(settings)
    with KeyStore(settings.keys_db_path, cache_ttl_s=0) as store:
        if path.exists():
            try:
                store.verify(path.read_text().strip())
                return path
            except AuthError:
                pass
        _, key = store.create("default", ["admin"], name=DEV_KEY_NAME)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key + "\n")
    return path


def greeting(settings: GatewaySettings, key_file: Path | None) -> list[str]:
    """What ``meshllm up`` prints once the mesh is ready."""
    url = base_url(settings)
    lines = [f"OpenAI-compatible API: {url}"]
    body = (
        '{"model": "' + settings.default_model + '", '
        '"messages": [{"role": "user", "content": "' + FIRST_QUESTION + '"}], '
        '"temperature": 0}'
    )
    if key_file is not None:
        lines.append(f"an admin API key for this machine is in {key_file} (0600)")
        auth = f'"Authorization: Bearer $(cat {shlex.quote(str(key_file))})"'
    else:
        auth = '"Authorization: Bearer $MESHLLM_API_KEY"'
    lines.append(
        f"try: curl -s {url}/chat/completions -H {auth} "
        f"-H 'content-type: application/json' -d {shlex.quote(body)}"
    )
    lines.append(f'or:  meshllm chat "{FIRST_QUESTION}"')
    return lines


def api_key(settings: GatewaySettings) -> str | None:
    """The key ``meshllm chat`` uses: MESHLLM_API_KEY, else this machine's dev key."""
    if key := os.environ.get("MESHLLM_API_KEY"):
        return key
    path = dev_key_file(settings)
    return path.read_text().strip() if path.exists() else None
