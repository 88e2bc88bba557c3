"""A Job is one accepted request on its way through queue, batch and worker back to its handler."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from common.protocol import OutItem
from server.errors import CohortError

if TYPE_CHECKING:
    from server.tracing import RequestTrace


@dataclass
class JobSpec:
    """What a route parsed from the client: the model, the route and the OpenAI body to run."""

    model: str
    route: str  # one of common.protocol.ROUTES
    body: dict[str, Any]  # as the client sent it, validated (unknown fields gone only if dropped)
    stream: bool = False
    trace_id: str = ""
    features: list[str] = field(default_factory=list)  # see server.openai_schema.FEATURES
    dropped: list[str] = field(default_factory=list)  # unknown fields dropped (COHORT_DROP_PARAMS)
    seqs: int = 1  # sequences the engine runs for it: n for each prompt
    # the request's one prompt, for placement by prefix affinity: a chat's messages, or a
    # completion's single text prompt (the worker reports what its engine caches of it); empty
    # for anything else, which goes by load
    prompt_text: str = ""
    cost: int = 1  # tokens it may take: the prompt's (estimated) and those it may generate
    tenant: str = ""  # whose turn it uses in its queue (a user)
    tier: str = "interactive"  # interactive | batch (async tasks and batches: idle capacity)
    weight: float = 1.0  # its tenant's share against others' (a user's or key's limit setting)


@dataclass
class Restart:
    """Told to the handler when its job is re-run elsewhere: forget what arrived so far."""

    attempt: int


@dataclass
class Job:
    """A request in flight; its outputs (out items, Restart, or a CohortError) arrive on `outputs`."""

    spec: JobSpec
    enqueued_at: float
    deadline: float
    id: str = field(default_factory=lambda: "job-" + secrets.token_hex(8))
    state: str = "queued"  # queued | running | done | cancelled
    attempts: int = 0
    got_output: bool = False
    worker_id: str = ""
    batch_id: str = ""
    started_at: float = 0.0
    prefix: tuple[int, ...] = ()  # the prompt's prefix blocks, for placement by affinity
    prefix_held: int = 0  # of those, how many its worker held when placement chose it
    failed_on: set[bytes] = field(default_factory=set)  # workers whose engine failed it: not again
    used_tokens: int | None = None  # prompt and completion tokens, once it ended well
    usage: dict[str, int] = field(default_factory=dict)  # the engine's counts, once it ended
    first_output_at: float = 0.0
    buffered_bytes: int = 0  # a stream's output delivered and not yet taken by its client
    trace: RequestTrace | None = None  # its spans, when COHORT_OTLP_ENDPOINT is set
    _send: trio.MemorySendChannel = field(init=False, repr=False)
    outputs: trio.MemoryReceiveChannel = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Unbounded on purpose: the dispatcher's one receive loop must never wait on a slow client,
        # and a job's output is bounded by its own max_tokens * n.
        self._send, self.outputs = trio.open_memory_channel(math.inf)

    @property
    def seqs(self) -> int:
        """Sequences the engine runs for this job."""
        return self.spec.seqs

    @property
    def prompt_chars(self) -> int:
        """The prompt's length, of which `prefix` fingerprints the leading blocks."""
        return len(self.spec.prompt_text)

    @property
    def finished(self) -> bool:
        return self.state in ("done", "cancelled")

    @property
    def retryable(self) -> bool:
        """A job may be re-run unless part of it already went to a streaming client."""
        return not (self.spec.stream and self.got_output)

    def deliver(self, item: OutItem) -> bool:
        """Pass one out item to the handler; True once it was the last."""
        self.got_output = True
        if self.spec.stream:
            self.buffered_bytes += len(item.data)
        self._send.send_nowait(item)
        if item.done:
            self.state = "done"
        return item.done

    def restart(self) -> None:
        """Put the job back to queued after its worker died, telling the handler to start over."""
        self.attempts += 1
        self.state = "queued"
        self.got_output = False
        self._send.send_nowait(Restart(self.attempts))

    def fail(self, error: CohortError) -> None:
        if not self.finished:
            self.state = "done"
            self._send.send_nowait(error)
