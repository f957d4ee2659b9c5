"""A release's traffic split: which version of a model a caller gets (no I/O).

While a release runs, the release controller publishes CANARY decisions on
``model.deployments``: "callers of MODEL that name no version get VERSION, for P% of
them". Each router keeps the latest decision per model (:class:`Splits`) and asks it for
each request (:meth:`Splits.choose`); inference replicas check a CANARY with the same
:func:`split_of` before loading its version.

- **Stable per caller.** A caller's bucket is a hash of the model, the release id and the
  caller (its API key, else its user, else the request): one caller sees one version for
  the whole release, and since the threshold only grows, a caller on the candidate at 5%
  is still on it at 25% and 50%. A new release reshuffles who goes first.
- **Pins.** ``tenant:NAME`` or ``key:ID`` callers always get the candidate (say, the team
  that tests it) or always production (a tenant that must not see a candidate). A
  production pin wins over a candidate pin.
- **Leases.** A split holds until its decision's time plus ``lease_s``; the controller
  renews it. A split nobody renews (the controller died, the release was forgotten) ends
  by itself and traffic goes back to production: traffic is never left split with no
  controller watching. The lease counts from the decision's time, or from now if that is
  later (a clock ahead of the router's cannot lengthen it); a decision dated more than
  a minute ahead is refused.
- **Requests that name a version** (``model:version``) get that version; a split never
  changes them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from shared.events.v1 import events_pb2 as ev

CANDIDATE = "candidate"
PRODUCTION = "production"
PINNED_CANDIDATE = "pinned-candidate"
PINNED_PRODUCTION = "pinned-production"
CANDIDATE_UNSERVED = "candidate-unserved"
"""Sent to the candidate, which the replica did not serve: production answered."""
CALLER_KINDS = ("tenant", "key")
MAX_NAME = 128
MAX_CLOCK_SKEW_S = 60.0


class InvalidDecision(ValueError):
    """A ``model.deployments`` event that cannot be applied; the message names the field."""


@dataclass(frozen=True)
class Split:
    model: str
    candidate: str
    percent: int
    release_id: str
    decided_at: float
    """Unix seconds, the decision's ``occurred_at``."""
    expires_at: float
    """Unix seconds."""
    candidate_callers: frozenset[str] = frozenset()
    production_callers: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Choice:
    version: str
    """The version to ask for; empty: production (the model's latest)."""
    arm: str


def bucket(model: str, release_id: str, caller: str) -> float:
    """Where ``caller`` falls in [0, 100) for this release of ``model``."""
    digest = hashlib.blake2b(f"{model}\0{release_id}\0{caller}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 * 100


def caller_of(request: ev.InferenceRequest) -> str:
    """The identity a request is bucketed by: its API key, else its user, else itself."""
    if request.api_key_id:
        return f"key:{request.api_key_id}"
    if request.user:
        return f"user:{request.envelope.tenant}:{request.user}"
    return f"request:{request.request_id}"


def _callers(values: list[str], name: str) -> frozenset[str]:
    for value in values:
        kind, _, ident = value.partition(":")
        if kind not in CALLER_KINDS or not ident or len(value) > MAX_NAME:
            raise InvalidDecision(f"{name}: {value[:MAX_NAME]!r} is not 'tenant:NAME' or 'key:ID'")
    return frozenset(values)


def split_of(event: ev.ModelDeployment, *, max_lease_s: float, now: float) -> Split:
    """The split a CANARY decision asks for.

    Raises:
        InvalidDecision: a field is missing or out of range.
    """
    for name in ("model", "version", "release_id"):
        value = getattr(event, name)
        if not value or len(value) > MAX_NAME or ":" in value:
            raise InvalidDecision(f"{name}: required, at most {MAX_NAME} characters, no ':'")
    if not 0 <= event.traffic_percent <= 100:
        raise InvalidDecision(f"traffic_percent: {event.traffic_percent} is not within 0..100")
    if not 0 < event.lease_s <= max_lease_s:
        raise InvalidDecision(
            f"lease_s: {event.lease_s} is not within 1..{max_lease_s:g} (a split must end "
            "by itself unless its controller renews it)"
        )
    if not event.envelope.HasField("occurred_at"):
        raise InvalidDecision("envelope.occurred_at: required (the lease counts from it)")
    stamped = event.envelope.occurred_at.ToNanoseconds() / 1e9
    if stamped > now + MAX_CLOCK_SKEW_S:
        raise InvalidDecision(
            f"envelope.occurred_at: {stamped - now:.0f} s in the future (at most "
            f"{MAX_CLOCK_SKEW_S:g} s of clock skew is allowed)"
        )
    # never later than now: a clock ahead of ours neither lengthens the lease nor makes
    # the release's next decisions look older than this one
    decided_at = min(stamped, now)
    return Split(
        model=event.model,
        candidate=event.version,
        percent=event.traffic_percent,
        release_id=event.release_id,
        decided_at=decided_at,
        expires_at=decided_at + event.lease_s,
        candidate_callers=_callers(list(event.candidate_callers), "candidate_callers"),
        production_callers=_callers(list(event.production_callers), "production_callers"),
    )


class Splits:
    """The live split of each model, from the decisions seen so far."""

    def __init__(self, max_lease_s: float) -> None:
        self.max_lease_s = max_lease_s
        self._splits: dict[str, Split] = {}
        # {release id: when it ended}: a renewal of an ended release, redelivered or sent
        # late by its controller, must not reopen its split (kept a lease long)
        self._ended: dict[str, float] = {}

    def apply(self, event: ev.ModelDeployment, now: float) -> str:
        """Take ``event`` into account at ``now`` (unix seconds); returns what it did.

        Raises:
            InvalidDecision: a CANARY that cannot be applied (nothing changes).
        """
        for model in [m for m, split in self._splits.items() if split.expires_at <= now]:
            del self._splits[model]  # lapsed
        for release in [r for r, at in self._ended.items() if at + self.max_lease_s < now]:
            del self._ended[release]
        current = self._splits.get(event.model)
        if event.action == ev.DEPLOYMENT_ACTION_CANARY:
            split = split_of(event, max_lease_s=self.max_lease_s, now=now)
            if (
                current is not None
                and split.release_id == current.release_id
                and split.decided_at < current.decided_at
            ) or split.decided_at <= self._ended.get(split.release_id, float("-inf")):
                return "stale"  # an earlier decision of the release, redelivered late
            self._splits[event.model] = split
            return "split"
        if event.action in (
            ev.DEPLOYMENT_ACTION_PROMOTE,
            ev.DEPLOYMENT_ACTION_ROLLBACK,
            ev.DEPLOYMENT_ACTION_RETIRE,
        ):
            # only a decision about the split's own candidate ends it
            if current is not None and current.candidate == event.version:
                del self._splits[event.model]
                stamped = event.envelope.occurred_at.ToNanoseconds() / 1e9
                self._ended[current.release_id] = min(max(stamped, current.decided_at), now)
                return "ended"
            return "no split"
        raise InvalidDecision(f"action: {event.action} is not a known deployment action")

    def live(self, model: str, now: float) -> Split | None:
        split = self._splits.get(model)
        return split if split is not None and now < split.expires_at else None

    def choose(self, request: ev.InferenceRequest, now: float) -> Choice | None:
        """The version for ``request``; None when no live split concerns it."""
        if request.model_version:
            return None
        split = self.live(request.model, now)
        if split is None:
            return None
        callers = {f"tenant:{request.envelope.tenant}"}
        if request.api_key_id:
            callers.add(f"key:{request.api_key_id}")
        if callers & split.production_callers:
            return Choice("", PINNED_PRODUCTION)
        if callers & split.candidate_callers:
            return Choice(split.candidate, PINNED_CANDIDATE)
        if bucket(split.model, split.release_id, caller_of(request)) < split.percent:
            return Choice(split.candidate, CANDIDATE)
        return Choice("", PRODUCTION)
