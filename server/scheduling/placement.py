"""Who gets a request: the worker where it costs least, its prompt's uncached part against load.

A worker has *room* while its engine could start another sequence now: what it runs, what waits
in it and what the front sent that it has not acknowledged stay under its `max_num_seqs`, its KV
cache is not full, and fewer than `max_unacked_batches` batches are still on the wire to it (a
worker that stops reading gets no more). Among workers with room:

- When no worker holds any of the prompt's prefix, the least queued one gets it (waiting +
  unacknowledged), and among those the one with the fewest sequences, then the one holding the
  fewest prefixes (the new one will stay there, with its later prompts), then KV use, then the
  fewest sent. A prompt with no prefix at all goes by load: waiting + unacknowledged, KV use,
  running, fewest sent.
- Otherwise each is priced in prompt tokens: what it would have to prefill (the prompt less the
  longest prefix it holds, see server.scheduling.prefix) plus `seq_tokens` for every sequence it
  already has (running, waiting, unacknowledged, and those this batch just gave it). The cheapest
  wins. So the longest cached prefix goes first, and a hot prefix spreads to a second engine once
  its holder has more sequences than the prefill it saves is worth: with 64 tokens a sequence,
  8 more for a 512-token prefix, 64 more for a 4,096-token system prompt.

A job re-run after an engine failed it goes to another worker while there is one (it waits for
that one's room rather than fail there again).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from common.protocol import EngineLoad
from server.scheduling.prefix import BLOCK_CHARS, PrefixHolders

KV_FULL = 0.98
CHARS_PER_TOKEN = 4  # the front does not tokenize: an English text's usual ratio
ENGINE_BACKLOG = 0.25  # with fair shares: an engine queues at most a quarter of max_num_seqs  # vLLM preempts near a full KV cache; sending more only makes it queue


class Placeable(Protocol):
    """What placement reads of a job: its choices and its prompt's prefix blocks; and what it
    writes: how many of those blocks the worker it chose held (its trace shows it)."""

    prefix_held: int

    @property
    def prefix(self) -> tuple[int, ...]: ...

    @property
    def prompt_chars(self) -> int: ...

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
    reports_prefixes: bool = False  # its engine says which prefixes it holds (Hello)
    prefixes_held: int = 0
    _marks: collections.deque[tuple[int, int]] = field(default_factory=collections.deque)

    def report(self, load: EngineLoad) -> None:
        """Take in a report from the worker; batches it counted are no longer unacknowledged."""
        self.running, self.waiting, self.kv_usage = load.running, load.waiting, load.kv_usage
        self.prefix_hit_rate = load.prefix_hit_rate
        self.max_num_seqs = load.max_num_seqs or self.max_num_seqs
        self.max_num_batched_tokens = load.max_num_batched_tokens
        self.prefixes_held = load.prefixes_held
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

    def __init__(self, *, max_unacked_batches: int, seq_tokens: int = 64,
                 prefix_affinity: bool = True, backlog: float = 0.0) -> None:
        self.max_unacked_batches = max_unacked_batches
        # What an engine may hold waiting when the front forces work on it, as a share of its
        # max_num_seqs (0: no bound). Bounded, the rest waits in the front, where fair shares
        # order it; a little is kept there so a freed slot never waits on a round trip.
        self.backlog = backlog
        self.seq_tokens = seq_tokens  # what a sequence an engine already has is worth, in tokens
        self.prefix_affinity = prefix_affinity
        self.holders = PrefixHolders()
        self._estimated: set[Hashable] = set()  # workers whose engines report no prefixes

    def _will_hold(self, key: Hashable, load: WorkerLoad, job: Placeable) -> None:
        """A job was placed: its worker will hold its prefix, for the next job of this batch as
        for later ones (two prompts of one new prefix in a batch go to one engine, not two)."""
        if not job.prefix:
            return
        if not load.reports_prefixes:
            self._estimated.add(key)
        self.holders.sent(job.prefix, key, self._estimated)

    def reported(self, key: Hashable, held: Sequence[int], dropped: Sequence[int]) -> None:
        """What a worker's engine said its cache took in and let go."""
        if dropped:
            self.holders.dropped(key, dropped)
        if held:
            self.holders.held(key, held)

    def forget(self, key: Hashable) -> None:
        """A worker died or restarted: nothing of its cache counts any more."""
        self.holders.forget(key)
        self._estimated.discard(key)

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
        backlog has room, or any at all `beyond_backlog`: the engine queues it). A worker that
        holds part of a job's prompt may also queue it within its backlog, if that is where it
        costs least: a moment's wait there beats prefilling the prompt again elsewhere (and
        evicting that engine's own prefixes for it). Returns {worker: jobs} and the jobs no
        worker can take now."""
        extra = dict.fromkeys(workers, 0)
        room = {key: self.room(load) for key, load in workers.items()}
        backlog = {key: (self.backlog_room(load) if not beyond_backlog
                         else 0 if load.unacked_batches >= self.max_unacked_batches else 1 << 30)
                   if force else 0 for key, load in workers.items()}
        plan: dict[K, list[J]] = {}
        left: list[J] = []
        for job in jobs:
            candidates = [key for key in workers if key not in job.failed_on] or list(workers)
            cached = ({key: self.holders.longest(job.prefix, key) for key in candidates}
                      if self.prefix_affinity and job.prefix else {})  # blocks each holds
            open_ = [key for key in candidates
                     if max(room[key], backlog[key]) >= extra[key] + job.seqs
                     or cached.get(key) and self.backlog_room(workers[key]) >= extra[key] + job.seqs]
            if not open_:
                left.append(job)
                continue
            key = self._choose(job, open_, workers, extra, cached)
            job.prefix_held = cached.get(key, 0)
            extra[key] += job.seqs
            plan.setdefault(key, []).append(job)
            self._will_hold(key, workers[key], job)
        return plan, left

    def _choose(self, job: Placeable, open_: list[K], workers: dict[K, WorkerLoad],
                extra: dict[K, int], cached: dict[K, int]) -> K:
        def queued(key: K) -> tuple[int, float, int, int]:
            load = workers[key]
            return (load.waiting + load.unacked + extra[key], load.kv_usage,
                    load.outstanding + extra[key], load.sent + extra[key])

        if not cached:  # no prefix to place by
            return min(open_, key=queued)
        if not any(cached.get(key) for key in open_):
            # a new prefix, whose later prompts will follow it: to the least queued engine, then
            # the one with the fewest sequences, then the one holding the fewest prefixes (as a
            # cache-aware router sends a miss to its smallest tree); by KV use first, one engine
            # could take 5 of 8 prefixes, and their traffic, from a moment's difference in KV use
            def cold(key: K) -> tuple[int, int, int, float, int]:
                waiting, kv_usage, outstanding, sent = queued(key)
                return (waiting, outstanding, self.holders.counts[key], kv_usage, sent)
            return min(open_, key=cold)

        def cost(key: K) -> tuple[float, int, float, int, int]:
            uncached = max(0, job.prompt_chars - cached[key] * BLOCK_CHARS) / CHARS_PER_TOKEN
            sequences = workers[key].outstanding + extra[key]
            return (uncached + self.seq_tokens * sequences, *queued(key))

        return min(open_, key=cost)
