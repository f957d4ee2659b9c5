"""A fine-tuning loop's checkpoints in Ray Train: :func:`report_checkpoint` writes one with
the loop's metrics, :func:`restore` loads one back into the live objects (refusing a
checkpoint of another run's settings or data)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def report_checkpoint(
    metrics: dict[str, Any], state: Mapping[str, Any], *, params: Mapping[str, Any],
    optimizer: Any, scheduler: Any, rank: int, sharded: bool,
) -> None:  # fmt: skip
    """Report ``metrics`` with a checkpoint: rank 0 writes the trainable weights, optimizer,
    scheduler and loop state (FSDP: every rank its own shard of the first two), every rank
    its random state; Ray merges the ranks' files into one checkpoint folder."""
    import random as pyrandom
    import tempfile

    import ray.train
    import torch

    suffix = f"-rank{rank}" if sharded else ""
    with tempfile.TemporaryDirectory(prefix="meshllm-checkpoint-") as directory:
        path = Path(directory)
        if rank == 0 or sharded:
            weights = {name: p.detach().cpu() for name, p in params.items()}
            torch.save(weights, path / f"trainable{suffix}.pt")
            torch.save(optimizer.state_dict(), path / f"optimizer{suffix}.pt")
        if rank == 0:
            torch.save({**state, "scheduler": scheduler.state_dict()}, path / "state.pt")
        rng = {"torch": torch.get_rng_state(), "python": pyrandom.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, path / f"rng-rank{rank}.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def restore(
    checkpoint: Any, fingerprint: Mapping[str, Any], *, params: Mapping[str, Any],
    optimizer: Any, scheduler: Any, rank: int, sharded: bool,
) -> dict[str, Any] | None:  # fmt: skip
    """Load what :func:`report_checkpoint` wrote into the live objects; the loop state, or
    None without a checkpoint.

    Raises:
        ValueError: the checkpoint is of a run with other settings, data or world size.
    """
    if checkpoint is None:
        return None
    import random as pyrandom

    import torch

    suffix = f"-rank{rank}" if sharded else ""
    with checkpoint.as_directory() as directory:
        path = Path(directory)
        state: dict[str, Any] = torch.load(path / "state.pt", weights_only=False)
        if state["fingerprint"] != fingerprint:
            raise ValueError("the checkpoint is of a run with other settings or data; not resuming")
        weights = torch.load(path / f"trainable{suffix}.pt", map_location="cpu")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(weights[name])
        optimizer.load_state_dict(torch.load(path / f"optimizer{suffix}.pt", map_location="cpu"))
        scheduler.load_state_dict(state.pop("scheduler"))
        rng_file = path / f"rng-rank{rank}.pt"
        if rng_file.exists():  # absent when the world grew; the seed set at start stays
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["torch"])
            pyrandom.setstate(rng["python"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
    return state
