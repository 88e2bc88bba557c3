"""How the front shares the engines, chosen once from the settings, and the batching loop's one
decision: given what waits and what room the workers have, send what now, or wait until when.

With fair shares (COHORT_FAIR_SHARES, the default) there are tiers (interactive before batch),
tenants by turns, engine priority, a headroom batch work leaves for interactive requests, and a
bounded backlog in the engines' own queues; without, one line, oldest first (a bench baseline).
Everything that depends on that choice asks this object, so the switch is read in one place.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from common.config import ServerSettings
from server.jobs import Job
from server.scheduling.engine_priority import engine_priorities
from server.scheduling.placement import ENGINE_BACKLOG
from server.scheduling.queue import TIERS, ModelQueue, batch_headroom

INTERACTIVE = ("interactive",)
# Interactive traffic is "recent" this long after its last arrival: the headroom is kept for it
# meanwhile, then batch work may take every free slot until the next interactive request comes.
INTERACTIVE_RECENT_S = 5.0


@dataclass(frozen=True)
class QueueView:
    """What the batching loop of one model sees at one moment."""

    now: float
    room: int  # sequences the ready workers could start now
    backlog_room: int  # sequences that may still be forced into the engines' own queues
    headroom: int  # sequences batch work leaves free, while interactive traffic is recent
    recent_until: float  # when interactive traffic stops being recent
    oldest_interactive: float | None  # when the longest-waiting interactive job arrived
    short: dict[str, int] = field(default_factory=dict)  # interactive users below their share


@dataclass(frozen=True)
class Wait:
    """Nothing leaves now: wait for the workers' picture to change (and, with `queue_too`, for
    the queue to), at most until `until`."""

    until: float = math.inf
    queue_too: bool = True


@dataclass(frozen=True)
class SendShort:
    """Users below their share skip the window: up to their share goes into the engines now."""

    short: dict[str, int]


@dataclass(frozen=True)
class Take:
    """Send up to `count` jobs of `tiers` (batch work only while the whole is under
    `lower_max`); `force`: into the engines' own queues, every worker being full."""

    count: int
    tiers: tuple[str, ...] = TIERS
    lower_max: int | None = None
    force: bool = False


Decision = Wait | SendShort | Take


@dataclass(frozen=True)
class SchedulingPolicy:
    """The batching and sharing rules of one front."""

    fair: bool = True
    max_batch_size: int = 32
    max_wait_s: float = 0.1
    max_queue: int = 10_000
    batch_headroom: float = 0.125

    @classmethod
    def of(cls, settings: ServerSettings) -> SchedulingPolicy:
        return cls(fair=settings.fair_shares, max_batch_size=settings.max_batch_size,
                   max_wait_s=settings.max_wait_s, max_queue=settings.max_queue,
                   batch_headroom=settings.batch_headroom)

    def queue(self) -> ModelQueue:
        """A model's queue: tiers and tenants by turns, or one line."""
        return ModelQueue(self.max_queue, fair=self.fair)

    @property
    def engine_backlog(self) -> float:
        """The share of max_num_seqs an engine may queue (0: no bound, as without fair shares)."""
        return ENGINE_BACKLOG if self.fair else 0.0

    def headroom(self, max_num_seqs: int) -> int:
        """Sequences batch work leaves free on an engine of this size."""
        return batch_headroom(max_num_seqs, self.batch_headroom) if self.fair else 0

    def priorities(self, jobs: list[Job], running: Iterable[Job]) -> list[int]:
        """The engine priority of each job sent to a worker already running `running`."""
        return engine_priorities(jobs, running) if self.fair else [0] * len(jobs)

    def decide(self, view: QueueView) -> Decision:
        """The batching loop's decision. Work-conserving: while a worker has room, a request
        leaves at once, with whatever gathered behind it; batch work takes only room beyond
        the headroom, and only while interactive traffic is recent. With every worker full,
        interactive requests gather until room appears or the oldest has waited the window,
        then go into the engines' own queues (within their backlog); a user below its share
        skips the window; batch work is never forced into a full engine."""
        headroom = view.headroom if self.fair and view.now < view.recent_until else 0
        if view.room:
            if view.room <= headroom and view.oldest_interactive is None:
                return Wait(until=view.recent_until)
            return Take(min(self.max_batch_size, view.room),
                        lower_max=max(0, view.room - headroom))
        if view.oldest_interactive is None:
            return Wait()
        if view.short:
            return SendShort(view.short)
        window_end = view.oldest_interactive + self.max_wait_s
        if view.now < window_end:
            return Wait(until=window_end)
        if not view.backlog_room:
            return Wait(queue_too=False)  # the engines' queues hold their share: wait in order
        return Take(min(self.max_batch_size, view.backlog_room), INTERACTIVE, force=True)
