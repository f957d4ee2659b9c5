"""docker-compose.yml (cluster mode): a valid Compose file that starts Kafka right."""

from __future__ import annotations

import json
import os
import shlex
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema.validators import validator_for
from pydantic import BaseModel
from typer.testing import CliRunner

from meshllm.cli import app
from meshllm.services import SERVICES
from shared.settings import ENV_PREFIX, MeshSettings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
KAFKA = "kafka"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping, from either Compose syntax."""
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.partition("=")[::2] for item in env)
    return {name: "" if value is None else str(value) for name, value in env.items()}


def build_context(service: dict[str, Any]) -> tuple[Path, str] | None:
    """(context folder, Dockerfile name) of a service that is built here, else None."""
    build = service.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        return ROOT / build, "Dockerfile"
    return ROOT / build.get("context", "."), build.get("dockerfile", "Dockerfile")


def meshllm_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run this repository's image (built from its Dockerfile)."""
    return {
        name: service
        for name, service in compose["services"].items()
        if build_context(service) is not None
    }


def test_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator_class = validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    problems = [
        f"{'/'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"
        for error in validator.iter_errors(compose)
    ]
    assert not problems, "docker-compose.yml breaks the Compose spec:\n  " + "\n  ".join(problems)


def test_kafka_runs_in_kraft_mode_with_a_broker_healthcheck(compose: dict[str, Any]) -> None:
    kafka = compose["services"][KAFKA]
    env = environment(kafka)
    roles = set(env["KAFKA_PROCESS_ROLES"].split(","))
    assert roles == {"broker", "controller"}, "one combined broker and controller node"
    assert "KAFKA_ZOOKEEPER_CONNECT" not in env
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert "CONTROLLER://:9093" in env["KAFKA_LISTENERS"].split(",")
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"

    healthcheck = kafka["healthcheck"]
    test = healthcheck["test"]
    command = test if isinstance(test, str) else " ".join(test[1:])
    assert "/opt/kafka/bin/kafka-broker-api-versions.sh" in command
    assert "--bootstrap-server localhost:9092" in command
    assert {"interval", "timeout", "retries", "start_period"} <= set(healthcheck)


def test_kafka_keeps_its_data_in_a_named_volume(compose: dict[str, Any]) -> None:
    env = environment(compose["services"][KAFKA])
    mounts = {}
    for volume in compose["services"][KAFKA]["volumes"]:
        source, _, target = volume.partition(":")
        mounts[target] = source
    assert env["KAFKA_LOG_DIRS"] in mounts, "KAFKA_LOG_DIRS is not on a volume"
    assert mounts[env["KAFKA_LOG_DIRS"]] in compose.get("volumes", {}), "volume is not declared"


def test_services_that_need_kafka_wait_until_it_is_healthy(compose: dict[str, Any]) -> None:
    services = compose["services"]
    needs_kafka = {
        name
        for name, service in services.items()
        if "MESHLLM_KAFKA__BOOTSTRAP" in environment(service)
        or KAFKA in service.get("depends_on", ())
    }
    assert set(meshllm_services(compose)) - needs_kafka <= {"service-tokens"}
    for name in needs_kafka:
        depends_on = services[name].get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on needs the long syntax"
        assert depends_on.get(KAFKA, {}).get("condition") == "service_healthy", (
            f"{name} must wait until kafka is service_healthy"
        )


def test_every_build_context_has_its_dockerfile(compose: dict[str, Any]) -> None:
    for name, service in meshllm_services(compose).items():
        context = build_context(service)
        assert context is not None
        folder, dockerfile = context
        assert (folder / dockerfile).is_file(), f"{name}: no {dockerfile} in {folder}"
        assert (folder / ".dockerignore").is_file(), f"{name}: no .dockerignore in {folder}"


def test_dockerfile_installs_meshllm_for_a_non_root_user() -> None:
    instructions = [
        line.split(None, 1)
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line and not line.startswith(("#", " "))
    ]
    final = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM") :]
    assert final[0][1].startswith("python:3.11-slim")
    users = [arg for op, arg in final if op == "USER"]
    assert users, "the image runs as root"
    assert users[-1] not in {"root", "0"}
    assert ["ENTRYPOINT", '["meshllm"]'] in [[op, arg] for op, arg in final]


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().splitlines())
    assert {".git", ".venv", "var", "**/__pycache__", "meshbench/results"} <= ignored


def settings_class(service: dict[str, Any]) -> type[MeshSettings]:
    """The settings a Compose service reads: its service's (``meshllm run NAME``) or the mesh's."""
    from services.audit.settings import AuditSettings
    from services.feedback.settings import FeedbackSettings
    from services.gateway.settings import GatewaySettings
    from services.inference.settings import InferenceSettings
    from services.ops.settings import OpsSettings
    from services.retrieval.settings import RetrievalSettings
    from services.router.settings import RouterSettings
    from services.trainer.settings import TrainerSettings

    command = service.get("command", [])
    args = shlex.split(command) if isinstance(command, str) else list(command)
    if args[:1] == ["run"]:
        return {
            "audit": AuditSettings,
            "feedback": FeedbackSettings,
            "trainer": TrainerSettings,
            "retrieval": RetrievalSettings,
            "gateway": GatewaySettings,
            "router": RouterSettings,
            "inference": InferenceSettings,
            "ops": OpsSettings,
        }[args[1]]
    return MeshSettings


def setting_exists(name: str, settings: type[MeshSettings] = MeshSettings) -> bool:
    """Whether ``MESHLLM_A__B`` names a field of ``settings`` (``a``, nested ``b``)."""
    model: type[BaseModel] = settings
    parts = name.removeprefix(ENV_PREFIX).lower().split("__")
    for depth, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        if depth < len(parts) - 1:
            nested = field.annotation
            if not (isinstance(nested, type) and issubclass(nested, BaseModel)):
                return False
            model = nested
    return True


def test_setting_names_are_checked_against_mesh_settings() -> None:
    assert setting_exists("MESHLLM_MODE")
    assert setting_exists("MESHLLM_KAFKA__BOOTSTRAP")
    assert not setting_exists("MESHLLM_KAFKA_BOOTSTRAP")
    assert not setting_exists("MESHLLM_MODE__X")
    assert not setting_exists("MESHLLM_KAFKA__NOPE")


def test_meshllm_settings_in_compose_are_real_and_valid(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = meshllm_services(compose)
    assert services, "no service is built from this repository"
    for name, service in services.items():
        settings = settings_class(service)
        env = {k: v for k, v in environment(service).items() if k.startswith(ENV_PREFIX)}
        unknown = [k for k in env if not setting_exists(k, settings)]
        assert not unknown, f"{name}: not {settings.__name__} settings: {unknown}"
        with monkeypatch.context() as patch:
            for variable in [v for v in os.environ if v.startswith(ENV_PREFIX)]:
                patch.delenv(variable)
            for variable, value in env.items():
                patch.setenv(variable, value)
            settings()  # raises on a bad value


def test_meshllm_services_run_real_cli_commands(compose: dict[str, Any]) -> None:
    for name, service in meshllm_services(compose).items():
        command = service.get("command", [])
        args = shlex.split(command) if isinstance(command, str) else list(command)
        result = CliRunner().invoke(app, [*args, "--help"])
        assert result.exit_code == 0, f"{name}: `meshllm {' '.join(args)}` is no command"
        if args[:1] == ["run"]:
            assert args[1] in {spec.name for spec in SERVICES}, f"{name}: no service {args[1]}"


def test_the_mesh_services_run_in_compose(compose: dict[str, Any]) -> None:
    commands = {tuple(service.get("command", [])) for service in meshllm_services(compose).values()}
    for spec in SERVICES:
        assert ("run", spec.name) in commands, f"{spec.name} is missing from docker-compose.yml"
    gateway = next(
        s for s in compose["services"].values() if s.get("command") == ["run", "gateway"]
    )
    assert any(str(p).endswith(":8080") for p in gateway.get("ports", ()))


INTERNAL = ("inference", "router", "retrieval", "audit")


def test_only_the_gateway_is_reachable_from_outside(compose: dict[str, Any]) -> None:
    networks = compose["networks"]
    services = compose["services"]
    for name, service in services.items():
        if name == "gateway":
            continue
        assert not service.get("ports"), f"{name} publishes a port"
        for network in service.get("networks", ()):
            assert networks[network].get("internal") is True, f"{name} is on {network}"
        assert service.get("network_mode") in (None, "none"), name
        assert service.get("networks") or service.get("network_mode") == "none", (
            f"{name} is on the default network, which is not internal"
        )
    edge = [n for n in services["gateway"]["networks"] if not networks[n].get("internal")]
    assert edge, "the gateway must be reachable on a network that is not internal"


def test_each_service_holds_its_own_token_and_no_other(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in (*INTERNAL, "gateway"):
        service = services[name]
        env = environment(service)
        mounts = [str(volume).split(":") for volume in service["volumes"]]
        tokens = {s for s, *_ in mounts if s.startswith("tokens-") or s == "events-key"}
        assert tokens == {f"tokens-{name}", "tokens-digests", "events-key"}, (name, tokens)
        assert all(options == ["ro"] for source, _, *options in mounts if source in tokens)
        mounted_at = {source: target for source, target, *_ in mounts}
        token_file = env["MESHLLM_SERVICE_AUTH__TOKEN_FILE"]
        assert token_file == f"{mounted_at[f'tokens-{name}']}/{name}.token"
        assert env["MESHLLM_SERVICE_AUTH__TOKENS_DIR"] == mounted_at["tokens-digests"]
        assert env["MESHLLM_BUS__SIGNING_KEY_FILE"] == f"{mounted_at['events-key']}/events.key"
        assert env["MESHLLM_BUS__REQUIRE_SIGNED"] == "true"
        waits = service["depends_on"]["service-tokens"]["condition"]
        assert waits == "service_completed_successfully", name


def test_the_token_job_writes_where_the_services_read(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    job = compose["services"]["service-tokens"]
    root = Path(job["command"][1])
    result = CliRunner().invoke(app, ["service-tokens", str(tmp_path), *job["command"][2:]])
    assert result.exit_code == 0, result.output
    for volume in job["volumes"]:
        source, target = volume.split(":")[:2]
        written = tmp_path / Path(target).relative_to(root)
        assert written.is_dir(), (source, written)
        for name in (*INTERNAL, "gateway"):
            if source == f"tokens-{name}":
                assert (written / f"{name}.token").stat().st_mode & 0o077 == 0
            if source == "tokens-digests":
                assert (written / f"{name}.sha256").is_file()
        if source == "events-key":
            assert (written / "events.key").stat().st_mode & 0o077 == 0


def test_prometheus_scrapes_every_mesh_service_on_its_health_port(
    compose: dict[str, Any],
) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", ())
        for target in static["targets"]
    }
    services = compose["services"]
    for spec in SERVICES:
        name, service = next(
            (n, s) for n, s in services.items() if s.get("command") == ["run", spec.name]
        )
        env = environment(service)
        networks = service["networks"]
        if isinstance(networks, dict) and "edge" in networks:
            # on the published network too: the health port listens on the mesh address only
            assert env["MESHLLM_HEALTH_HOST"] == networks["mesh"]["ipv4_address"], name
        else:
            assert networks == ["mesh"], name
            assert env.get("MESHLLM_HEALTH_HOST") == "0.0.0.0", name  # the mesh network only
        assert f"{name}:{env['MESHLLM_HEALTH_PORT']}" in targets, name
    prometheus = services["prometheus"]
    assert (
        "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
        in (prometheus["volumes"])
    )
    assert ":" in prometheus["image"]
    assert not prometheus["image"].endswith(":latest")
