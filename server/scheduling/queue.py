"""What waits for one model, and what leaves next: tiers first, then a fair share per tenant.

Two tiers: `interactive` (the OpenAI routes) and `batch` (async tasks, `/inference/batch`). A batch
job leaves only while no interactive job waits. Within a tier, tenants (users) take turns by
deficit round robin on tokens: each turn a tenant earns QUANTUM_TOKENS times its weight (1 unless
set with `python -m server.users limit`) and spends a job's cost
(its prompt's estimated tokens plus the tokens it may generate), so a tenant with 1,000 queued
requests delays another's few by about one turn each, not by its whole backlog; a tenant asking
for many tokens per request gets fewer requests through per turn than one asking for few. With
`fair=False` the queue is one line, oldest first (the behaviour before; a bench baseline).

Each tenant's own line is bounded by `max_size` (a flood fills its own, not everyone's), and the
whole queue by `max_size * TOTAL_FACTOR`. Retries go back to the head of their tenant's line.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Iterable

import trio

from server.errors import QueueFull
from server.jobs import Job

TIERS = ("interactive", "batch")
QUANTUM_TOKENS = 512  # a turn's worth of tokens: one long request, or a few short ones
TOTAL_FACTOR = 4


def batch_headroom(max_num_seqs: int, share: float) -> int:
    """Sequences batch work leaves free on one engine for interactive requests that arrive: a
    `share` of its max_num_seqs, rounded up, yet never the whole engine, so an idle engine
    takes batch work whatever its size (with max_num_seqs 1, none is kept)."""
    return min(math.ceil(max_num_seqs * share), max(0, max_num_seqs - 1))


def under_share(waiting: dict[str, float], held: dict[str, tuple[int, float]],
                capacity: int) -> dict[str, int]:
    """The waiting tenants that hold less than their share of the model's engines, and how many
    sequences short each is. A tenant's share is `capacity` (the sequences the ready engines run
    at once) split by weight between every tenant that waits or holds some; these may go
    straight into an engine's queue, where their priority puts them first (see
    server.scheduling.engine_priority), instead of waiting behind the batch window."""
    weights = {tenant: weight for tenant, (_, weight) in held.items()} | waiting
    total = sum(weights.values())
    if len(weights) < 2 or not capacity:  # one user alone has no one to be fair to
        return {}
    short = {}
    for tenant in waiting:
        share = capacity * weights[tenant] / total
        missing = math.ceil(share - held.get(tenant, (0, 1.0))[0])
        if missing > 0:
            short[tenant] = missing
    return short


class ModelQueue:
    """The queue policy for one model, with no tasks in it: what waits, and what leaves next."""

    def __init__(self, max_size: int, *, fair: bool = True) -> None:
        self.max_size = max_size
        self.fair = fair
        # per tier: tenant -> its line; the dict's order is the round-robin order
        self._lines: dict[str, dict[str, collections.deque[Job]]] = {tier: {} for tier in TIERS}
        self._deficit: dict[str, float] = {}
        self._size = 0
        self._arrivals = itertools.count()
        self._changed = trio.Event()

    def __len__(self) -> int:
        return self._size

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _tenant(self, job: Job) -> str:
        return job.spec.tenant if self.fair else ""

    def _line(self, job: Job) -> collections.deque[Job]:
        lines = self._lines[job.spec.tier if self.fair else "interactive"]
        return lines.setdefault(self._tenant(job), collections.deque())

    def push(self, job: Job) -> None:
        """Queue a new job, or refuse it with QueueFull when its tenant's line (or the whole
        queue) is at its bound."""
        line = self._line(job)
        if len(line) >= self.max_size or self._size >= self.max_size * TOTAL_FACTOR:
            raise QueueFull(
                f"the queue for model {job.spec.model!r} holds {self.max_size} of your requests "
                "already; retry later (COHORT_MAX_QUEUE sets the bound)")
        line.append(job)
        self._size += 1
        self._notify()

    def push_front(self, jobs: Iterable[Job]) -> None:
        """Put jobs back at the head of their lines (a retry); the bound does not apply."""
        for job in reversed(list(jobs)):
            self._line(job).appendleft(job)
            self._size += 1
        self._notify()

    def oldest_arrival(self, tiers: tuple[str, ...] = TIERS) -> float | None:
        """When the longest-waiting live job (of `tiers`) arrived (None: nothing waits)."""
        oldest = None
        for tier in tiers:
            for line in self._lines[tier].values():
                self._drop_cancelled(line)
                if line and (oldest is None or line[0].enqueued_at < oldest):
                    oldest = line[0].enqueued_at
        return oldest

    def take(self, max_jobs: int, tiers: tuple[str, ...] = TIERS,
             lower_max: int | None = None) -> list[Job]:
        """Remove and return up to `max_jobs` live jobs: a lower tier only once the higher ones
        are empty (and only while the whole is under `lower_max`), and within a tier by turns
        between tenants."""
        batch: list[Job] = []
        for tier in tiers:
            lines = self._lines[tier]
            cap = max_jobs if tier == TIERS[0] or lower_max is None else min(max_jobs, lower_max)
            while lines and len(batch) < cap:
                self._serve_turn(lines, batch, cap)
            if lines:  # this tier still waits: nothing of a lower one goes before it
                break
        return batch

    def _serve_turn(self, lines: dict[str, collections.deque[Job]], batch: list[Job],
                    max_jobs: int) -> None:
        """One tenant's turn: it earns a quantum, and its jobs leave while their cost fits."""
        tenant = next(iter(lines))
        line = lines[tenant]
        weight = line[0].spec.weight if line else 1.0
        deficit = self._deficit.get(tenant, 0.0) + QUANTUM_TOKENS * weight
        while line and len(batch) < max_jobs:
            job = line[0]
            if job.state != "queued":
                line.popleft()
                self._size -= 1
                continue
            if job.spec.cost > deficit and deficit < QUANTUM_TOKENS * 64:
                break  # saves up over turns: a request larger than a quantum still leaves
            line.popleft()
            self._size -= 1
            deficit -= job.spec.cost
            batch.append(job)
        del lines[tenant]
        if line:
            lines[tenant] = line  # to the back of the round
            self._deficit[tenant] = max(0.0, deficit) if len(batch) < max_jobs else deficit
        else:
            self._deficit.pop(tenant, None)  # an empty line keeps no credit

    def waiting_tenants(self, tier: str) -> dict[str, float]:
        """The tenants with a live job of `tier` waiting, and their weights."""
        found = {}
        for tenant, line in self._lines[tier].items():
            self._drop_cancelled(line)
            if line:
                found[tenant] = line[0].spec.weight
        return found

    def take_from(self, quotas: dict[str, int], tier: str) -> list[Job]:
        """Up to `quotas[tenant]` sequences' worth of each named tenant's waiting jobs of `tier`
        (at least one job each), oldest first; their turns in the round are left as they were."""
        batch: list[Job] = []
        for tenant, quota in quotas.items():
            line = self._lines[tier].get(tenant)
            taken = 0
            while line and (taken < quota or not taken):
                job = line.popleft()
                self._size -= 1
                if job.state != "queued":
                    continue
                batch.append(job)
                taken += job.seqs
            if line is not None and not line:
                del self._lines[tier][tenant]
                self._deficit.pop(tenant, None)
        return batch

    def drain(self) -> list[Job]:
        jobs = [job for lines in self._lines.values() for line in lines.values() for job in line
                if job.state == "queued"]
        for lines in self._lines.values():
            lines.clear()
        self._deficit.clear()
        self._size = 0
        self._notify()
        return jobs

    def _drop_cancelled(self, line: collections.deque[Job]) -> None:
        while line and line[0].state != "queued":
            line.popleft()
            self._size -= 1

    def live_count(self) -> int:
        return sum(self.live_by_tier().values())

    def live_by_tier(self) -> dict[str, int]:
        """Jobs still waiting, per tier (a scan: for /console/live, not the hot path)."""
        return {tier: sum(job.state == "queued" for line in lines.values() for job in line)
                for tier, lines in self._lines.items()}

    async def wait_changed(self) -> None:
        await self._changed.wait()
