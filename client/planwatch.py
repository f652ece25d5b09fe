"""One client's view of its model's plan: folding plan messages, and waiting for a usable one.

:class:`PlanWatch` folds what arrives on ``plans/{model}`` (and the planner's and agents'
status, through the shared :class:`FleetState`) and lets callers wait on it: for a plan
whose every stage has an online agent (:meth:`PlanWatch.wait_ready`; while a newer plan
loads, the last ready one serves: :meth:`PlanWatch.usable_plan`), or for the plan
to change after a retryable error (:meth:`PlanWatch.wait_change`). A withdrawn plan, or
a kept plan no online agent can serve whose planner stopped, ends the wait at once with
the reason (:class:`NoPlanError`). A malformed plan payload (retained garbage) is logged
once per topic and ignored -- the last valid plan stays -- and named by the timeout error
when no valid plan comes. Sending requests is the client's (client/inference.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from edgeslice.broker.fleetstate import FleetState
from edgeslice.broker.protocol.errors import EdgesliceError, NoPlanError, RequestTimeout
from edgeslice.broker.protocol.messages import PlanMessage
from edgeslice.broker.settings import BrokerSettings
from edgeslice.client.requests import no_plan_reason, routable

log = logging.getLogger(__name__)


class PlanWatch:
    """The plan of ``model`` as this client knows it; see the module docstring.

    ``offline`` answers which agents last said they are not online (the router's view).
    """

    def __init__(
        self,
        settings: BrokerSettings,
        model: str,
        client_id: str,
        fleet: FleetState,
        offline: Callable[[], set[str]],
    ) -> None:
        self.settings = settings
        self.model = model
        self.client_id = client_id
        self.fleet = fleet
        self.offline = offline
        self.changed = asyncio.Condition()  # notified on every plan or status message
        self.bad_plan: dict[str, str] = {}  # plan topic -> why its last payload was refused
        self.last_ready: PlanMessage | None = None  # the newest plan seen ready

    @property
    def plan(self) -> PlanMessage | None:
        """The current plan of the model, as last published (None: none yet)."""
        return self.fleet.plans.get(self.model)

    def usable_plan(self) -> PlanMessage | None:
        """The plan to route by now: the current plan once it is ready; while a newer plan
        of the same planner is still loading, the last ready one (agents keep the previous
        plan's stages loaded until the next plan, so a joining agent's load stalls nobody);
        None when neither can route."""
        current, offline = self.plan, self.offline()
        if current is not None and routable(current, offline):
            return current
        last = self.last_ready
        if (
            current is not None
            and current.stages
            and not current.ready
            and last is not None
            and last.plan_id == current.plan_id
            and routable(last, offline)
        ):
            return last
        return None

    def no_plan_reason(self) -> str:
        """Why no request can be served now ("" if one may be); client/requests.py."""
        return no_plan_reason(self.plan, self.fleet.planner, self.offline())

    async def wait_ready(
        self, timeout: float = 120.0, newer_than: int = 0, other_than: str = ""
    ) -> PlanMessage:
        """The current plan once every agent of it is ready (and its version > newer_than,
        and its plan id not ``other_than``: a restarted planner's plan)."""

        def ready() -> bool:
            p = self.plan
            if self.no_plan_reason() and (p is None or p.plan_version > newer_than):
                return True  # withdrawn (or nobody to re-plan): raise below, do not wait
            u = self.usable_plan()
            return u is not None and u.plan_version > newer_than and u.plan_id != other_than

        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(ready), timeout)
                why = self.no_plan_reason()
                if why:
                    raise NoPlanError(
                        f"model {self.model!r} on {self.settings.url} namespace "
                        f"{self.settings.namespace!r} has no plan: {why}"
                    )
            except TimeoutError:
                raise RequestTimeout(self._not_ready(timeout)) from None
        usable = self.usable_plan()
        assert usable is not None
        return usable

    def _not_ready(self, timeout: float) -> str:
        """What wait_ready's timeout says: no plan, a plan not ready, or only garbage seen."""
        plan = self.plan
        state = "no plan published" if plan is None else f"plan v{plan.plan_version} not ready"
        if plan is None and self.bad_plan:
            topic, why = next(iter(self.bad_plan.items()))
            state = (
                f"no valid plan: a malformed plan was seen on topic {topic} ({why}); "
                "a running planner re-publishes its own over it within seconds"
            )
        return (
            f"model {self.model!r}: {state} after {timeout:.0f}s on "
            f"{self.settings.url} namespace {self.settings.namespace!r}; is "
            "`edgeslice planner` running with enough agents?"
        )

    async def wait_newer_ready(self, used: PlanMessage, timeout: float) -> None:
        """After an agent said ``used`` is stale: wait (at most ``timeout``) until a newer
        plan than ``used`` can route, or the plan is withdrawn (wait_ready then says why)."""

        def newer() -> bool:
            if self.no_plan_reason():
                return True
            u = self.usable_plan()
            return u is not None and (u.plan_id, u.plan_version) != (
                used.plan_id,
                used.plan_version,
            )

        async with self.changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait_for(newer), timeout)

    async def wait_change(self, used: PlanMessage, timeout: float) -> None:
        """After a retryable error: give the planner a moment to publish what changed."""

        def changed() -> bool:
            p = self.plan
            return p is None or (p.plan_id, p.plan_version) != (used.plan_id, used.plan_version)

        async with self.changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait_for(changed), timeout)

    async def on_plan(self, topic: str, payload: bytes) -> None:
        """Fold a plan message and wake every waiter."""
        async with self.changed:
            self._apply_plan(topic, payload)
            self.changed.notify_all()

    async def notify(self) -> None:
        """Something waiters read changed (an agent's or the planner's status)."""
        async with self.changed:
            self.changed.notify_all()

    def _apply_plan(self, topic: str, payload: bytes) -> None:
        """Fold a plan message; a malformed one is logged once and ignored (module doc)."""
        try:
            self.fleet.apply(topic, payload, time.time())
        except EdgesliceError as exc:
            if topic not in self.bad_plan:
                log.warning(
                    "client=%s ignoring malformed plan on %s: %s", self.client_id, topic, exc
                )
            self.bad_plan[topic] = f"{exc}"[:200]
            return
        if self.plan is not None and self.plan.ready:
            self.last_ready = self.plan
        self.bad_plan.pop(topic, None)
