"""A chat replica following the release decisions on ``model.deployments``.

Each replica applies them to its own :class:`~services.inference.chat.ChatService` (Serve
has no call that reaches every replica, and a replica started later must catch up too):

- CANARY of VERSION: serve VERSION beside the current one (loaded while the current keeps
  answering), so that the callers the routers send there are answered;
- PROMOTE of VERSION: VERSION becomes the current one (no reload when it was served
  beside it); the old one retires once its requests have finished;
- ROLLBACK or RETIRE of VERSION: stop serving VERSION beside the current one, after its
  requests, and after ``drop_after_s`` (``MESHLLM_SERVE__RELEASE_DROP_AFTER_S``, 10 s):
  the routers read the same decision at their own pace, and a request one of them sends
  to the candidate meanwhile is still answered. A router that reads it later than that
  sends its candidate callers to a version no longer served (an error naming it). A
  CANARY or PROMOTE of VERSION meanwhile calls the drop off.

A replica reads the decisions of the last ``release_max_lease_s`` when it starts: a
CANARY still live was made or renewed within that time. Decisions for other models are
ignored; a CANARY the routers would refuse (:func:`shared.release_split.split_of`) is not
loaded; one that cannot be applied (a version the registry lacks, a corrupt file, more
versions than the replica may hold) is logged and changes nothing: the routers' callers of
that version get an error naming it, and the release's online stage sees those errors.
"""

from __future__ import annotations

import asyncio
import time

from services.inference.chat import ChatService
from services.inference.model.gguf_model import ModelLoadError
from shared.bus import EventContext
from shared.events.v1 import events_pb2 as ev
from shared.logging import get_logger
from shared.openai_protocol import OpenAIError
from shared.release_split import InvalidDecision, split_of

log = get_logger(__name__)


class ReleaseFollower:
    """The handler of ``model.deployments`` in a chat replica."""

    def __init__(
        self, service: ChatService, *, drop_after_s: float = 10.0, max_lease_s: float = 300.0
    ) -> None:
        self.service = service
        self.drop_after_s = drop_after_s
        self.max_lease_s = max_lease_s
        # per version, how many CANARY/PROMOTE decisions came: a drop waiting for its time
        # is called off by a decision that serves its version again, and by nothing else
        self._served_again: dict[str, int] = {}
        self._dropping: dict[str, asyncio.Task[None]] = {}

    async def on_decision(self, event: ev.ModelDeployment, ctx: EventContext) -> None:
        if event.model != self.service.model_name or not event.version:
            return
        action = event.action
        if action == ev.DEPLOYMENT_ACTION_CANARY:
            try:  # what the routers refuse is not loaded either: it would only cost memory
                split_of(event, max_lease_s=self.max_lease_s, now=time.time())
            except InvalidDecision as error:
                log.warning("release decision refused", version=event.version[:64],
                            error=str(error))  # fmt: skip
                return
        if action in (ev.DEPLOYMENT_ACTION_CANARY, ev.DEPLOYMENT_ACTION_PROMOTE):
            self._served_again[event.version] = self._served_again.get(event.version, 0) + 1
            await self._apply(event)
        elif (
            action in (ev.DEPLOYMENT_ACTION_ROLLBACK, ev.DEPLOYMENT_ACTION_RETIRE)
            and event.version in self._beside()
            and event.version not in self._dropping  # a repeated one keeps the first deadline
        ):
            version = event.version
            seen = self._served_again.get(version, 0)
            task = asyncio.create_task(self._drop(version, seen))
            self._dropping[version] = task
            task.add_done_callback(lambda _: self._dropping.pop(version, None))

    async def _drop(self, version: str, seen: int) -> None:
        await asyncio.sleep(self.drop_after_s)
        if self._served_again.get(version, 0) != seen:
            return  # released again or promoted meanwhile
        try:
            if await self.service.drop_alongside(version):
                log.info("release decision applied", model=self.service.model_name,
                         version=version, action="drop", beside=self._beside())  # fmt: skip
        except Exception:  # a background task: nobody else would see it
            log.exception("dropping a version failed", version=version[:64])

    async def _apply(self, event: ev.ModelDeployment) -> None:
        action = event.action
        try:
            if action == ev.DEPLOYMENT_ACTION_CANARY:
                if event.version not in self._beside():
                    await self.service.serve_alongside([event.version])
            else:
                await self.service.switch(event.version)
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
