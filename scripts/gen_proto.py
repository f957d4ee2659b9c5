"""Generate the Python code of the event contracts, or check that it is current.

    python scripts/gen_proto.py            # write shared/events/v1/events_pb2.py(i)
    python scripts/gen_proto.py --check    # exit 1 if the committed code is stale
    python scripts/gen_proto.py --compat   # exit 1 on wire-breaking changes since release
    python scripts/gen_proto.py --release  # snapshot the descriptors as released

protoc comes from grpcio-tools, so the output depends only on its pinned version.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
SOURCES = ["meshllm/events/v1/events.proto"]
OUTPUT_DIR = ROOT / "shared" / "events" / "v1"
RELEASED = PROTO_ROOT / "released" / "events_v1.binpb"


def _protoc(args: list[str]) -> None:
    from grpc_tools import protoc

    well_known = str(resources.files("grpc_tools") / "_proto")
    code = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", *args])
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")


def generate(into: Path) -> dict[str, bytes]:
    """Run protoc into a scratch folder and return {file name: content}."""
    with tempfile.TemporaryDirectory() as scratch:
        _protoc([f"--python_out={scratch}", f"--pyi_out={scratch}", *SOURCES])
        produced = Path(scratch) / "meshllm" / "events" / "v1"
        files = {p.name: p.read_bytes() for p in sorted(produced.iterdir())}
    into.mkdir(parents=True, exist_ok=True)
    return files


def descriptor_set() -> bytes:
    """The FileDescriptorSet of the current sources (no source info, stable bytes)."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "set.binpb"
        _protoc([f"--descriptor_set_out={out}", *SOURCES])
        return out.read_bytes()


def stale_files() -> list[str]:
    """Names of generated files whose committed content differs from a fresh run."""
    fresh = generate(OUTPUT_DIR)
    stale = []
    for name, content in fresh.items():
        committed = OUTPUT_DIR / name
        if not committed.exists() or committed.read_bytes() != content:
            stale.append(str(committed.relative_to(ROOT)))
    return stale


def _check_current() -> bool:
    """Print whether the committed generated code is current; return True if it is."""
    stale = stale_files()
    if stale:
        print("stale generated code (run `just proto`):", *stale, sep="\n  ")
        return False
    print("generated code is current")
    return True


def _check_compatible() -> bool:
    """Print the wire-breaking changes since the release; return True if there are none."""
    from google.protobuf.descriptor_pb2 import FileDescriptorSet
    from proto_compat import breaking_changes

    released = FileDescriptorSet.FromString(RELEASED.read_bytes())
    current = FileDescriptorSet.FromString(descriptor_set())
    problems = breaking_changes(released, current)
    if problems:
        print(f"breaking changes against {RELEASED.relative_to(ROOT)}:", *problems, sep="\n  ")
        return False
    print(f"wire-compatible with {RELEASED.relative_to(ROOT)}")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    parser.add_argument(
        "--compat", action="store_true", help="fail on wire-breaking changes since the release"
    )
    parser.add_argument("--release", action="store_true", help="record the released descriptors")
    args = parser.parse_args()

    if args.check or args.compat:
        current = _check_current() if args.check else True
        compatible = _check_compatible() if args.compat else True
        return 0 if current and compatible else 1
    if args.release:
        RELEASED.parent.mkdir(parents=True, exist_ok=True)
        RELEASED.write_bytes(descriptor_set())
        print(f"recorded {RELEASED.relative_to(ROOT)}")
        return 0
    for name, content in generate(OUTPUT_DIR).items():
        (OUTPUT_DIR / name).write_bytes(content)
        print(f"wrote {(OUTPUT_DIR / name).relative_to(ROOT)}")
    shutil.rmtree(OUTPUT_DIR / "__pycache__", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
