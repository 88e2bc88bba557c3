"""Who gets a request: placement by engine load first, then by prefix affinity within a margin.

A worker has *room* while its engine could start another sequence now: what it runs, what waits
in it and what the front sent that it has not acknowledged stay under its `max_num_seqs`, its KV
cache is not full, and fewer than `max_unacked_batches` batches are still on the wire to it (a
worker that stops reading gets no more). Among workers with room, the one with the least queued
work (waiting + unacknowledged, then KV use, then running, then fewest sent) gets the request,
unless the worker that was last sent this prompt's prefix holds at most `affinity_margin`
sequences more than it: that one likely skips the prefill. The margin bounds the imbalance
affinity may cause, so it cannot build a hot spot. A job re-run after an engine failed it goes to
another worker while there is one (it waits for that one's room rather than fail there again).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from common.protocol import EngineLoad
from server.scheduling.prefix import PrefixOwners

KV_FULL = 0.98
ENGINE_BACKLOG = 0.25  # with fair shares: an engine queues at most a quarter of max_num_seqs  # vLLM preempts near a full KV cache; sending more only makes it queue


class Placeable(Protocol):
    """What placement reads of a job: its choices and its prompt's prefix blocks."""

    @property
    def prefix(self) -> tuple[int, ...]: ...

    @property
    def failed_on(self) -> Collection[Hashable]: ...  # workers whose engine failed this job

    @property
    def seqs(self) -> int: ...


K = TypeVar("K", bound=Hashable)  # a worker's key (the front's: its ZeroMQ identity)
J = TypeVar("J", bound=Placeable)


@dataclass
class WorkerLoad:
    """The front's picture of one worker's engine: its last report, plus what the front sent
    that the report did not count yet (unacknowledged batches)."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefix_hit_rate: float = 0.0
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 0
    sent: int = 0  # requests sent, ever: the worker acknowledges by this count
    received: int = 0
    unacked: int = 0  # sequences of the batches not acknowledged yet
    _marks: collections.deque[tuple[int, int]] = field(default_factory=collections.deque)

    def report(self, load: EngineLoad) -> None:
        """Take in a report from the worker; batches it counted are no longer unacknowledged."""
        self.running, self.waiting, self.kv_usage = load.running, load.waiting, load.kv_usage
        self.prefix_hit_rate = load.prefix_hit_rate
        self.max_num_seqs = load.max_num_seqs or self.max_num_seqs
        self.max_num_batched_tokens = load.max_num_batched_tokens
        self.received = max(self.received, load.received)
        while self._marks and self._marks[0][0] <= self.received:
            self.unacked -= self._marks.popleft()[1]

    def sent_batch(self, jobs: Sequence[Placeable]) -> None:
        self.sent += len(jobs)
        seqs = sum(job.seqs for job in jobs)
        self._marks.append((self.sent, seqs))
        self.unacked += seqs

    @property
    def unacked_batches(self) -> int:
        return len(self._marks)

    @property
    def outstanding(self) -> int:
        return self.running + self.waiting + self.unacked


class Placement:
    """Chooses a worker for each job of a batch; pure, so it is tested without sockets."""

    def __init__(self, *, max_unacked_batches: int, affinity_margin: int,
                 prefix_affinity: bool = True, backlog: float = 0.0) -> None:
        self.max_unacked_batches = max_unacked_batches
        # What an engine may hold waiting when the front forces work on it, as a share of its
        # max_num_seqs (0: no bound). Bounded, the rest waits in the front, where fair shares
        # order it; a little is kept there so a freed slot never waits on a round trip.
        self.backlog = backlog
        self.affinity_margin = affinity_margin
        self.prefix_affinity = prefix_affinity
        self.owners = PrefixOwners()

    def sent(self, key: Hashable, load: WorkerLoad, jobs: Sequence[Placeable]) -> None:
        """Record a batch sent to a worker: unacknowledged work, and the prefixes it now holds."""
        load.sent_batch(jobs)
        for job in jobs:
            if job.prefix:
                self.owners.remember(job.prefix, key)

    def room(self, load: WorkerLoad) -> int:
        """Sequences this worker's engine could start now (0: it is saturated)."""
        if load.unacked_batches >= self.max_unacked_batches or load.kv_usage >= KV_FULL:
            return 0
        return max(0, load.max_num_seqs - load.outstanding)

    def backlog_room(self, load: WorkerLoad) -> int:
        """Sequences the front may still force into this engine's own queue."""
        if load.unacked_batches >= self.max_unacked_batches:
            return 0
        if not self.backlog:
            return 1 << 30
        allowed = load.max_num_seqs + max(1, math.ceil(load.max_num_seqs * self.backlog))
        return max(0, allowed - load.outstanding)

    def assign(self, jobs: Sequence[J], workers: dict[K, WorkerLoad], *,
               force: bool = False, beyond_backlog: bool = False
               ) -> tuple[dict[K, list[J]], list[J]]:
        """Give each job a worker with room (with `force`, any worker not behind on acks whose
        backlog has room, or any at all `beyond_backlog`: the engine queues it). Returns
        {worker: jobs} and the jobs no worker can take now."""
        extra = dict.fromkeys(workers, 0)
        room = {key: self.room(load) for key, load in workers.items()}
        backlog = {key: (self.backlog_room(load) if not beyond_backlog
                         else 0 if load.unacked_batches >= self.max_unacked_batches else 1 << 30)
                   if force else 0 for key, load in workers.items()}
        plan: dict[K, list[J]] = {}
        left: list[J] = []
        for job in jobs:
            candidates = [key for key in workers if key not in job.failed_on] or list(workers)
            open_ = [key for key in candidates
                     if max(room[key], backlog[key]) >= extra[key] + job.seqs]
            if not open_:
                left.append(job)
                continue
            key = self._choose(job, open_, workers, extra)
            extra[key] += job.seqs
            plan.setdefault(key, []).append(job)
        return plan, left

    def _choose(self, job: Placeable, open_: list[K], workers: dict[K, WorkerLoad],
                extra: dict[K, int]) -> K:
        def queued(key: K) -> tuple[int, float, int, int]:
            load = workers[key]
            return (load.waiting + load.unacked + extra[key], load.kv_usage,
                    load.outstanding + extra[key], load.sent + extra[key])

        best = min(open_, key=queued)
        if not (self.prefix_affinity and job.prefix):
            return best
        limit = workers[best].outstanding + extra[best] + self.affinity_margin
        matches = {key: self.owners.match(job.prefix, key) for key in open_
                   if workers[key].outstanding + extra[key] <= limit}
        affine = max(matches, key=lambda key: (matches[key], key == best))
        return affine if matches[affine] else best
