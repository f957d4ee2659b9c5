"""Kafka client security (cluster mode): SASL/SCRAM and TLS settings reach every client."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import certifi
import pytest

from shared.bus import Publisher, admin, consumer, producer
from shared.bus.consumer import Subscriber
from shared.bus.idempotency import MemoryIdempotencyStore
from shared.settings import KafkaSettings, MeshSettings, SettingsError, load_settings
from shared.topics import REQUESTS_NORMAL


class Recorded(Exception):
    """Raised by the stand-in clients once they have recorded their options."""


class Recorder:
    """A stand-in Kafka client class: records its keyword arguments, connects nowhere."""

    seen: list[dict[str, Any]]

    def __init__(self, *args: Any, **options: Any) -> None:
        Recorder.seen.append(options)

    def subscribe(self, *args: Any, **kwargs: Any) -> None:
        pass

    async def start(self) -> None:
        raise Recorded

    async def close(self) -> None:
        pass


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    Recorder.seen = []
    monkeypatch.setattr(producer, "AIOKafkaProducer", Recorder)
    monkeypatch.setattr(consumer, "AIOKafkaConsumer", Recorder)
    monkeypatch.setattr(admin, "AIOKafkaAdminClient", Recorder)
    return Recorder.seen


def sasl_ssl() -> KafkaSettings:
    return KafkaSettings(
        bootstrap="kafka:9093",
        security_protocol="SASL_SSL",
        sasl_username="router",
        sasl_password="s3cret",
        ssl_cafile=Path(certifi.where()),
    )


def client_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate and its key, as the mesh's own CA would issue one."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway.meshllm")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


async def test_scram_over_tls_reaches_producer_consumer_and_admin(
    recorded: list[dict[str, Any]],
) -> None:
    kafka = sasl_ssl()
    settings = MeshSettings(kafka=kafka)
    publisher = Publisher(settings, service="router")
    with pytest.raises(Recorded):
        await publisher.start()

    async def handler(event: Any, ctx: Any) -> None:
        pass

    subscriber = Subscriber(
        settings,
        publisher,
        topics=[REQUESTS_NORMAL],
        group="router",
        handler=handler,
        idempotency=MemoryIdempotencyStore(),
    )
    with pytest.raises(Recorded):
        await subscriber.start()
    with pytest.raises(Recorded):
        await admin.ensure_topics(kafka.bootstrap, kafka=kafka)
    assert len(recorded) == 3
    for options in recorded:
        assert options["security_protocol"] == "SASL_SSL"
        assert options["sasl_mechanism"] == "SCRAM-SHA-512"
        assert options["sasl_plain_username"] == "router"
        assert options["sasl_plain_password"] == "s3cret"
        assert isinstance(options["ssl_context"], ssl.SSLContext)
        assert options["ssl_context"].verify_mode == ssl.CERT_REQUIRED


def test_mutual_tls_loads_the_client_certificate(tmp_path: Path) -> None:
    from shared.bus.security import client_options

    cert_file, key_file = client_certificate(tmp_path)
    kafka = KafkaSettings(
        security_protocol="SSL",
        ssl_cafile=cert_file,
        ssl_certfile=cert_file,
        ssl_keyfile=key_file,
    )
    options = client_options(kafka)
    assert options["security_protocol"] == "SSL"
    assert "sasl_mechanism" not in options
    assert isinstance(options["ssl_context"], ssl.SSLContext)


def test_plaintext_adds_nothing() -> None:
    from shared.bus.security import client_options

    assert client_options(KafkaSettings()) == {"security_protocol": "PLAINTEXT"}


def test_incomplete_security_settings_stop_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLLM_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(SettingsError, match="MESHLLM_KAFKA__SASL_USERNAME"):
        load_settings(MeshSettings)
    monkeypatch.setenv("MESHLLM_KAFKA__SECURITY_PROTOCOL", "PLAINTEXT")
    monkeypatch.setenv("MESHLLM_KAFKA__SSL_CERTFILE", "/etc/cert.pem")
    with pytest.raises(SettingsError, match="ssl_keyfile"):
        load_settings(MeshSettings)
