"""CPU kernels of the inference engine, compiled on first use.

``blockquant.cpp`` holds block-quantized linear layers (int4 or int8 weights in blocks of 32
times int8 activations: the integer dot products llama.cpp uses, with AVX-512 VNNI, AVX-VNNI
or AVX2, whatever the build target has) and the fused decode layer. They are built
with the machine's C++ compiler against the installed torch, once: the library is cached
under ``$MESHLLM_KERNEL_CACHE`` (default ``~/.cache/meshllm/kernels``) in a folder named by a
digest of the source, the compiler flags, torch's version and the CPU's features, so a
changed source, torch or CPU builds anew and every later process loads it in milliseconds.
Processes building at the same time wait for one another (torch's build lock); the
library is loaded directly only once a ``built`` marker says a whole build finished.

``MESHLLM_CPU_KERNELS`` chooses: ``auto`` (the default) builds and falls back to torch's
own quantized kernels, with a warning, where the build fails (no compiler, no headers);
``off`` never builds; ``require`` makes a failed build an error. ``MESHLLM_KERNEL_ARCH``
(default ``native``) is the CPU the build targets (see :func:`flags`).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import time
from pathlib import Path

from shared.logging import get_logger

log = get_logger(__name__)

SOURCE = Path(__file__).with_name("blockquant.cpp")
_CHOICES = ("auto", "off", "require")
_lock = threading.Lock()
_state: dict[str, bool] = {}


class KernelBuildError(RuntimeError):
    """The CPU kernels were required (``MESHLLM_CPU_KERNELS=require``) and did not build."""


def mode() -> str:
    value = os.environ.get("MESHLLM_CPU_KERNELS", "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"MESHLLM_CPU_KERNELS={value!r}: choose one of {', '.join(_CHOICES)}")
    return value


def available() -> bool:
    """Whether ``torch.ops.meshllm_kernels`` is loaded (building it on the first call)."""
    with _lock:
        if "loaded" not in _state:
            _state["loaded"] = _load(mode())
        return _state["loaded"]


def flags() -> list[str]:
    """The compiler flags: ``-march`` (``-mcpu`` off x86) from ``MESHLLM_KERNEL_ARCH``.

    ``native`` (the default) uses every instruction this CPU has (AVX-512 VNNI, AVX2...);
    a named target such as ``x86-64-v3`` builds for a fleet of machines instead.
    """
    arch = os.environ.get("MESHLLM_KERNEL_ARCH", "native").strip() or "native"
    if not all(c.isalnum() or c in "-_." for c in arch):
        raise ValueError(f"MESHLLM_KERNEL_ARCH={arch!r} is not a CPU name (e.g. native, x86-64-v3)")
    option = "-march" if platform.machine() in {"x86_64", "AMD64"} else "-mcpu"
    # -fopenmp: at::parallel_for runs on torch's OpenMP threads only when compiled with it
    return ["-O3", f"{option}={arch}", "-fno-math-errno", "-fopenmp"]


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build_dir(torch_version: str) -> tuple[str, Path]:
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(flags()).encode(), torch_version.encode()):
        digest.update(part)
    digest.update(_cpu_features().encode())
    digest.update(sys.version.encode())
    name = f"meshllm_blockquant_{digest.hexdigest()[:16]}"
    root = Path(os.environ.get("MESHLLM_KERNEL_CACHE", Path.home() / ".cache/meshllm/kernels"))
    return name, root / name


def _load(choice: str) -> bool:
    if choice == "off":
        return False
    import torch
    from torch.utils import cpp_extension

    name, folder = _build_dir(torch.__version__)
    library = folder / f"{name}.so"
    built = folder / "built"  # written after a whole build: a library being linked is not ready
    started = time.monotonic()
    try:
        if built.exists() and library.exists():
            torch.ops.load_library(str(library))  # type: ignore[no-untyped-call]
        else:
            _ninja_on_path()
            folder.mkdir(parents=True, exist_ok=True)
            log.info("building CPU kernels (first use, about a minute)", folder=str(folder))
            cpp_extension.load(
                name=name,
                sources=[str(SOURCE)],
                extra_cflags=flags(),
                extra_ldflags=["-fopenmp"],
                build_directory=str(folder),
                is_python_module=False,
                verbose=False,
            )
            built.touch()
            log.info("CPU kernels built", seconds=round(time.monotonic() - started, 1))
    except Exception as error:
        if choice == "require":
            raise KernelBuildError(
                f"MESHLLM_CPU_KERNELS=require and the build failed: {error}"
            ) from error
        log.warning(
            "CPU kernels unavailable; using torch's quantized kernels",
            error=str(error).splitlines()[0] if str(error) else type(error).__name__,
        )
        return False
    return True


def _ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the ninja wheel keeps it beside Python."""
    try:
        import ninja

        bin_dir = ninja.BIN_DIR
    except (ImportError, AttributeError):
        bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir
