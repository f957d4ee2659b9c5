"""A chat replica following the release decisions on ``model.deployments``.

Each replica applies them to its own :class:`~services.inference.chat.ChatService` (Serve
has no call that reaches every replica, and a replica started later must catch up too):

- CANARY of VERSION: serve VERSION beside the current one (loaded while the current keeps
  answering), so that the callers the routers send there are answered;
- PROMOTE of VERSION: VERSION becomes the current one (no reload when it was served
  beside it); the old one retires once its requests have finished;
- ROLLBACK or RETIRE of VERSION: stop serving VERSION beside the current one, after its
  requests, and after ``drop_after_s``: the routers read the same decision at their own
  pace, and a request one of them sends to the candidate meanwhile is still answered.

A replica reads the decisions of the last ``release_max_lease_s`` when it starts: a
CANARY still live was made or renewed within that time. Decisions for other models are
ignored; one that cannot be applied (a version the registry lacks, a corrupt file, more
versions than the replica may hold) is logged and changes nothing: the routers' callers of
that version get an error naming it, and the release's online stage sees those errors.
"""

from __future__ import annotations

import asyncio

from services.inference.chat import ChatService
from services.inference.model.gguf_model import ModelLoadError
from shared.bus import EventContext
from shared.events.v1 import events_pb2 as ev
from shared.logging import get_logger
from shared.openai_protocol import OpenAIError

log = get_logger(__name__)


class ReleaseFollower:
    """The handler of ``model.deployments`` in a chat replica."""

    def __init__(self, service: ChatService, drop_after_s: float = 10.0) -> None:
        self.service = service
        self.drop_after_s = drop_after_s
        self._decisions = 0  # a drop waiting for its time applies only if none came since
        self._dropping: set[asyncio.Task[None]] = set()

    async def on_decision(self, event: ev.ModelDeployment, ctx: EventContext) -> None:
        if event.model != self.service.model_name or not event.version:
            return
        if event.action == ev.DEPLOYMENT_ACTION_CANARY and not (
            event.release_id and event.lease_s and ":" not in event.version
        ):
            # the routers refuse it too: loading it would only cost memory
            log.warning(
                "release decision refused",
                version=event.version[:64],
                error="a CANARY needs a release id, a lease and a plain version",
            )
            return
        self._decisions += 1
        action = event.action
        if action in (ev.DEPLOYMENT_ACTION_ROLLBACK, ev.DEPLOYMENT_ACTION_RETIRE):
            if event.version in self._beside():
                task = asyncio.create_task(self._drop(event, self._decisions))
                self._dropping.add(task)
                task.add_done_callback(self._dropping.discard)
            return
        await self._apply(event)

    async def _drop(self, event: ev.ModelDeployment, seen: int) -> None:
        await asyncio.sleep(self.drop_after_s)
        if self._decisions == seen:  # not re-released or promoted meanwhile
            await self._apply(event)

    async def _apply(self, event: ev.ModelDeployment) -> None:
        action = event.action
        try:
            if action == ev.DEPLOYMENT_ACTION_CANARY:
                if event.version not in self._beside():
                    await self.service.serve_alongside([event.version])
            elif action == ev.DEPLOYMENT_ACTION_PROMOTE:
                await self.service.switch(event.version)
            elif action in (ev.DEPLOYMENT_ACTION_ROLLBACK, ev.DEPLOYMENT_ACTION_RETIRE):
                beside = self._beside()
                await self.service.serve_alongside([v for v in beside if v != event.version])
            else:
                return
        except (OpenAIError, ModelLoadError) as error:
            log.warning(
                "release decision not applied",
                model=event.model,
                version=event.version[:64],
                action=ev.DeploymentAction.Name(action),
                error=str(error)[:300],
            )
            return
        log.info(
            "release decision applied",
            model=event.model,
            version=event.version,
            action=ev.DeploymentAction.Name(action),
            current=self.service.current.entry.version,
            beside=self._beside(),
        )

    def _beside(self) -> list[str]:
        return [m["version"] for m in self.service.status()["alongside"]]
