"""A test double of :mod:`services.trainer.job_process` for the runner's tests: it speaks the
same stdout protocol, and does what ``STAND_IN_MODE`` says instead of training.

- ``hang``: one progress line, then waits; SIGTERM ends it as the real one ends (exit 143).
- ``die``: one progress line, then it is killed (SIGKILL), as an out-of-memory kill would.
- ``fail``: an error line, exit 1.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def emit(line: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())  # noqa: SIM115
    mode = os.environ.get("STAND_IN_MODE", "hang")
    emit({"event": "progress", "step": 1, "total_steps": 10, "epoch": 0.1, "loss": 2.5,
          "tokens_per_s": 50.0, "eta_s": 9.0})  # fmt: skip
    with open(os.path.join(spec["output_dir"], "stand-in.pid"), "w") as out:
        out.write(str(os.getpid()))
    if mode == "fail":
        emit({"event": "error", "message": "ValueError: no training row keeps a token"})
        sys.exit(1)
    if mode == "die":
        os.kill(os.getpid(), signal.SIGKILL)

    def stop(*_: object) -> None:
        emit({"event": "error", "message": "cancelled", "cancelled": True})
        sys.exit(143)

    signal.signal(signal.SIGTERM, stop)
    while True:
        time.sleep(0.1)


if __name__ == "__main__":
    main()
