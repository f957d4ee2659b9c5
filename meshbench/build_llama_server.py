"""Build llama.cpp's own server (``llama-server``) for the served benchmark, once.

Run from the repository root (``just bench-served`` does)::

    python -m meshbench.build_llama_server [--cmake-args "-DCMAKE_C_FLAGS='...' ..."]

No wheel ships ``llama-server``, so it is built from the llama.cpp sources vendored in the
source distribution of the llama-cpp-python version installed here: the server and the
in-process peer then run the same llama.cpp. Without curl or OpenSSL (it never downloads a
model) and without the web UI. Everything lives in ``.bench-build/`` (ignored by git); a
binary already built for this version is kept.

The outcome, built or not, is written to ``.bench-build/llama-server.json``: the served
benchmark reads it and reports a failed build in its results instead of skipping the peer.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR = ROOT / ".bench-build"
STATUS_FILE = BUILD_DIR / "llama-server.json"
PACKAGE = "llama-cpp-python"
CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",  # the server is one of llama.cpp's tools
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # would fetch the web UI at configure time
    "-DLLAMA_OPENSSL=OFF",
    # LLAMA_CURL is gone upstream (deprecated and ignored): nothing to switch off
]


@dataclass(frozen=True)
class BuildStatus:
    """What the last build attempt left: ``binary`` when it worked, ``error`` when not."""

    version: str
    binary: str | None
    error: str | None
    seconds: float = 0.0


def read_status(path: Path = STATUS_FILE) -> BuildStatus | None:
    """The last build's outcome, or None when no build was tried."""
    try:
        return BuildStatus(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def installed_version() -> str:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        raise RuntimeError(
            f"{PACKAGE} is not installed (`just bench-served` installs it first)"
        ) from None


def run(argv: list[str], log: Path) -> None:
    with log.open("a") as out:
        out.write(f"$ {shlex.join(argv)}\n")
        out.flush()
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(
            f"`{argv[0]} {argv[1]}` failed (exit {done.returncode}):\n" + "\n".join(tail)
        )


def source_tree(version: str, log: Path) -> Path:
    """llama.cpp as vendored in the llama-cpp-python ``version`` source distribution."""
    name = f"llama_cpp_python-{version}"
    unpacked = BUILD_DIR / "src" / name
    vendored = unpacked / "vendor" / "llama.cpp"
    if (vendored / "CMakeLists.txt").exists():
        return vendored
    archive = BUILD_DIR / f"{name}.tar.gz"
    if not archive.exists():
        run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             f"{PACKAGE}=={version}", "--dest", str(BUILD_DIR)],
            log,
        )  # fmt: skip
    with tarfile.open(archive) as sdist:
        sdist.extractall(BUILD_DIR / "src", filter="data")
    if not (vendored / "CMakeLists.txt").exists():
        raise RuntimeError(f"{archive.name} has no vendored llama.cpp at vendor/llama.cpp")
    return vendored


def build(cmake_args: list[str]) -> BuildStatus:
    """Build (or find) ``llama-server`` for the installed llama-cpp-python; never raises."""
    started = time.monotonic()
    version = "unknown"
    BUILD_DIR.mkdir(exist_ok=True)
    log = BUILD_DIR / "build-llama-server.log"
    try:
        version = installed_version()
        out = BUILD_DIR / f"llama-server-{version}"
        binary = out / "bin" / "llama-server"
        if not binary.exists():
            source = source_tree(version, log)
            run(["cmake", "-S", str(source), "-B", str(out), *CMAKE_OPTIONS, *cmake_args], log)
            run(["cmake", "--build", str(out), "--target", "llama-server", "-j", "2"], log)
        status = BuildStatus(version, str(binary), None, time.monotonic() - started)
        if not binary.exists():
            status = BuildStatus(version, None, f"the build made no {binary.relative_to(ROOT)}")
    except (RuntimeError, OSError, tarfile.TarError) as error:
        status = BuildStatus(version, None, str(error), time.monotonic() - started)
    STATUS_FILE.write_text(json.dumps(asdict(status), indent=2))
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cmake-args",
        default="",
        help="More cmake arguments, one shell-quoted string (the justfile's llama_cpp_flags).",
    )
    args = parser.parse_args()
    status = build(shlex.split(args.cmake_args))
    if status.error:
        print(f"llama-server build failed: {status.error}", file=sys.stderr)
        return 1
    print(f"llama-server {status.version}: {status.binary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
