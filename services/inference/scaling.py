"""Replica counts from the ops loop, applied through Serve; the counts reported back.

The ops service decides (:mod:`services.ops.scaling`) and publishes a ``ScalingDecision``
on ``ops.scaling``. A decision is a request, not a command: this service applies it
within its own bounds (``serve.chat_min_replicas``..``chat_max_replicas``,
``1``..``embeddings_max_replicas``), so a record asking for a thousand replicas gets the
maximum, one for a deployment this service does not run changes nothing, and one whose
envelope names another producer than the ops service is ignored (a name the writer
chose: with signed events, ``MESHLLM_BUS__REQUIRE_SIGNED``, one of the mesh's services),
and so is one older than two minutes (a backlog after an outage: the ops loop decides
again from what it sees then). On a Ray
started here (not a cluster, whose autoscaler can add nodes), the count is also bounded
by what this machine's CPUs can place (``chat_num_cpus`` per chat replica, ...): a
replica that cannot be placed would wait for ever, holding the deployment in an update.
It applies
through Serve's external-scaler API (the controller call behind Serve's
``POST /api/v1/applications/{app}/deployments/{name}/scale``; the application runs with
``external_scaler_enabled``): the running replicas stay, new ones start beside them.

Every deployment's count goes out on ``model.status`` after each change and every probe
round (15 s), so the ops loop knows the count, a restarted one included. With Serve's own
autoscaling on (``serve.chat_autoscaling``) the ops loop's decisions are refused: two
autoscalers on one deployment would fight.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from services.inference.settings import InferenceSettings
from shared.bus import Publisher
from shared.bus.consumer import EventContext
from shared.deployments import CHAT_DEPLOYMENT, EMBEDDINGS_DEPLOYMENT
from shared.events.v1 import events_pb2 as ev
from shared.logging import get_logger
from shared.topics import MODEL_STATUS

log = get_logger(__name__)
MAX_DECISION_AGE_S = 120.0  # older ones (a backlog after an outage) are ignored


class ReplicaControl:
    """This service's replica counts: the ops loop's decisions applied, the counts reported."""

    def __init__(
        self, settings: InferenceSettings, publisher: Publisher, cpus: float | None = None
    ) -> None:
        """``cpus``: the CPUs of a Ray started here (None: a cluster, which can grow)."""
        s = settings.serve
        self.cpus = cpus
        self.cost = {CHAT_DEPLOYMENT: s.chat_num_cpus, EMBEDDINGS_DEPLOYMENT: s.embeddings_num_cpus}
        self.app_name = s.app_name
        self.model = settings.model_name
        self.version = settings.model_version or ""
        self.publisher = publisher
        self.external = s.external_scaling and not s.chat_autoscaling
        self.bounds: dict[str, tuple[int, int]] = {
            CHAT_DEPLOYMENT: (max(1, s.chat_min_replicas), s.chat_max_replicas)
        }
        self.replicas: dict[str, int] = {CHAT_DEPLOYMENT: s.chat_replicas}
        if s.embeddings_replicas:
            self.bounds[EMBEDDINGS_DEPLOYMENT] = (1, max(1, s.embeddings_max_replicas))
            self.replicas[EMBEDDINGS_DEPLOYMENT] = s.embeddings_replicas
        self.running: dict[str, int] = {}  # as Serve last said
        self._lock = asyncio.Lock()
        self.deployed = asyncio.Event()  # set once the application runs

    def bounded(self, deployment: str, target: int) -> int | None:
        """``target`` within the deployment's bounds; None for a deployment not run here."""
        if deployment not in self.bounds:
            return None
        low, high = self.bounds[deployment]
        cost = self.cost[deployment]
        if self.cpus is not None and cost > 0:
            others = sum(self.cost[d] * n for d, n in self.replicas.items() if d != deployment)
            high = min(high, max(low, math.floor((self.cpus - others) / cost + 1e-9)))
        return min(max(target, low), high)

    async def on_decision(self, decision: ev.ScalingDecision, ctx: EventContext) -> None:
        if decision.envelope.producer != "ops":
            log.warning("scaling decision not from the ops loop ignored",
                        producer=decision.envelope.producer)  # fmt: skip
            return
        age_s = time.time() - decision.envelope.occurred_at.ToNanoseconds() / 1e9
        if age_s > MAX_DECISION_AGE_S:
            log.warning("stale scaling decision ignored", deployment=decision.deployment,
                        age_s=round(age_s))  # fmt: skip
            return
        if not self.external:
            log.warning(
                "scaling decision refused: Serve's own autoscaling sizes this deployment",
                deployment=decision.deployment,
            )
            return
        target = self.bounded(decision.deployment, decision.target_replicas)
        if target is None:
            log.warning(
                "scaling decision for a deployment not run here", deployment=decision.deployment
            )
            return
        if target != decision.target_replicas:
            log.warning(
                "scaling decision bounded",
                deployment=decision.deployment,
                asked=decision.target_replicas,
                applied=target,
                bounds=self.bounds[decision.deployment],
            )
        await self.deployed.wait()
        async with self._lock:
            if target != self.replicas[decision.deployment]:
                await asyncio.to_thread(_scale, self.app_name, decision.deployment, target)
                log.info(
                    "replicas changed",
                    deployment=decision.deployment,
                    replicas=f"{self.replicas[decision.deployment]} -> {target}",
                    reason=decision.reason,
                )
                self.replicas[decision.deployment] = target
        await self.report(decision.deployment)

    def _room(self, deployment: str, replicas: int) -> int:
        """The most replicas it would run; not sized by the ops loop: the count it has."""
        return (self.bounded(deployment, 1 << 30) or 0) if self.external else replicas

    async def report(self, *only: str) -> None:
        """Publish the count of ``only`` these deployments (all: none named)."""
        for deployment, replicas in list(self.replicas.items()):
            if only and deployment not in only:
                continue
            status = ev.ModelStatus(
                model=self.model,
                version=self.version,
                deployment=deployment,
                state=ev.MODEL_STATE_READY,
                replicas=replicas,
                # not sized by the ops loop: no room to ask for, so it asks for none
                max_replicas=(self.bounded(deployment, 1 << 30) or 0)
                if self.external
                else replicas,
                running_replicas=self.running.get(deployment, 0),
            )
            await self.publisher.publish(MODEL_STATUS, status, key=self.model)


def _scale(app_name: str, deployment: str, replicas: int) -> None:
    """Set a deployment's target replica count through Serve's controller."""
    import ray
    from ray.serve._private.common import DeploymentID
    from ray.serve.context import _get_global_client

    client: Any = _get_global_client()
    if client is None:
        raise RuntimeError("Serve is not running")
    ref = client._controller.update_deployment_replicas.remote(
        DeploymentID(name=deployment, app_name=app_name), replicas
    )
    ray.get(ref, timeout=60)
