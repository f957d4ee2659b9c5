"""The ops loop's alerts sent to an Alertmanager (its API v2, ``POST /api/v2/alerts``).

Alertmanager expects a client to send every alert that still fires again and again
(Prometheus does so each evaluation), each with an ``endsAt`` a little ahead: one not sent
again resolves by itself once that passes, so an ops service that died does not leave
pages firing for ever. So each round sends every firing alert with ``endsAt`` =
now + ``3 x every_s``, and each alert resolved since the last delivered round with
``endsAt`` = when it resolved. A round waits at most 5 s for it (after the round's events
went to the broker). A round Alertmanager did not take is not lost: the firing
ones go again anyway, the resolved ones are kept (at most ``MAX_PENDING``) for the next.

Labels: ``alertname`` (the rule), ``severity``, the rule's group labels (a rule grouped
``by: [tenant]`` sends tenant names to the Alertmanager and its receivers) and
``service="meshllm-ops"``; annotations: ``summary``, ``value``, ``threshold``. The same
alert from Prometheus (``deploy/prometheus/rules.yml``) carries the same ``alertname`` and
``severity``, so Alertmanager's grouping and inhibition treat them alike.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from services.ops.alerts import Rule, Transition
from services.ops.sli import Labels
from shared.logging import get_logger

log = get_logger(__name__)
MAX_PENDING = 1000
SOURCE = "meshllm-ops"

Firing = tuple[Rule, Labels, float | None, float]  # as Evaluator.firing() gives them


def _time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def _alert(
    rule: Rule, labels: Labels, value: float | None, starts_s: float, ends_s: float
) -> dict[str, Any]:
    shown = "unknown" if value is None or math.isnan(value) else f"{value:g}"
    return {
        "labels": {
            **dict(labels),
            "alertname": rule.name,
            "severity": rule.severity,
            "service": SOURCE,
        },
        "annotations": {
            "summary": rule.summary,
            "value": shown,
            "threshold": f"{rule.threshold:g}",
        },
        "startsAt": _time(starts_s),
        "endsAt": _time(ends_s),
    }


def payload(
    now_s: float, firing: Sequence[Firing], resolved: Sequence[Transition], every_s: float
) -> list[dict[str, Any]]:
    """The alerts of one round, as Alertmanager's ``postableAlerts``."""
    alerts = [
        _alert(rule, labels, value, since, now_s + 3 * every_s)
        for rule, labels, value, since in firing
    ]
    alerts += [_alert(t.rule, t.labels, t.value, t.since_s, t.at_s) for t in resolved]
    return alerts


def public(url: str) -> str:
    """``url`` without the user and password it may carry."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class AlertmanagerNotifier:
    """Posts each round's alerts to one Alertmanager; keeps resolutions it did not take."""

    def __init__(self, url: str, every_s: float, client: httpx.AsyncClient | None = None) -> None:
        self.endpoint = url.rstrip("/") + "/api/v2/alerts"
        self.shown = public(self.endpoint)  # for logs: without credentials
        self.every_s = every_s
        # a hanging Alertmanager costs a round at most this much
        self.client = client or httpx.AsyncClient(timeout=min(5.0, every_s))
        self.pending: list[Transition] = []  # resolved, not yet taken

    async def notify(
        self, now_s: float, firing: Sequence[Firing], changes: Sequence[Transition]
    ) -> bool:
        """Send this round's alerts; whether Alertmanager took them."""
        self.pending.extend(change for change in changes if not change.firing)
        del self.pending[:-MAX_PENDING]
        alerts = payload(now_s, firing, self.pending, self.every_s)
        if not alerts:
            return True
        try:
            reply = await asyncio.wait_for(
                self.client.post(self.endpoint, json=alerts), timeout=min(5.0, self.every_s)
            )
        except (httpx.HTTPError, TimeoutError) as error:
            log.warning("alertmanager unreachable", url=self.shown, error=type(error).__name__)
            return False
        if reply.status_code != 200:
            log.warning(
                "alertmanager refused the alerts",
                url=self.shown,
                status=reply.status_code,
                reply=reply.text[:300],
            )
            return False
        self.pending.clear()
        return True

    async def close(self) -> None:
        await self.client.aclose()
