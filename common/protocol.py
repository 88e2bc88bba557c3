"""The wire between the front and its workers: typed msgpack messages, versioned, validated.

Every message is one msgpack map with `v` (the protocol version) and `type` (its tag), declared
as a msgspec Struct down to the items inside it (a request, an output, an engine's load), as
vLLM's own engine core messages are: msgspec checks every field's type while it decodes, in C,
with no second pass. New fields go last with a default, so an older peer still decodes a newer
message; unknown fields are ignored. Nothing here unpickles or evals: a malformed or foreign
message becomes a `ProtocolError`; its receiver logs it and answers for the requests it names
(`request_ids`), so no job waits out its timeout for a message nobody read.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

import msgpack
import msgspec
from msgspec import Meta, Struct

VERSION = 2  # 2: requests carry the OpenAI body, outputs the OpenAI bytes
WorkerState = Literal["loading", "ready", "draining", "failed"]
MAX_MESSAGE_BYTES = 64 << 20
Count = Annotated[int, Meta(ge=0)]  # a count: never negative (and never a bool)
Share = Annotated[float, Meta(ge=0)]


class ProtocolError(ValueError):
    """A message we cannot accept: bad msgpack, wrong version, unknown type or wrong fields."""


# --- the items inside messages -------------------------------------------------------------------


class EngineLoad(Struct, kw_only=True):
    """What a worker's engine is doing, as its own scheduler counts it (vLLM: its SchedulerStats).

    `received` is how many requests this link has taken from its front so far: the front counts
    what it sent beyond that as unacknowledged work, so its picture is fresh between reports.
    """

    running: Count = 0
    waiting: Count = 0
    kv_usage: Share = 0.0  # share of the KV cache in use, 0..1
    prefix_hit_rate: Share = 0.0  # share of prompt tokens served from the prefix cache
    max_num_seqs: Count = 0  # the engine's limits (0: unknown)
    max_num_batched_tokens: Count = 0
    received: Count = 0
    prefixes_held: Count = 0  # prefix fingerprints its cache holds (engines that report them)


ROUTES = ("chat", "completions", "embeddings", "tokenize", "detokenize")


class RequestItem(Struct):
    """One request in a Batch: the OpenAI body of `route` (one of ROUTES), as the client sent it
    and the front validated it. `id` names it on the wire and in the response ids; `priority`
    orders it in the engine's queue (vLLM's: lower first; see server.scheduling.engine_priority)."""

    id: str
    route: str
    body: dict[str, Any]
    trace_id: str = ""
    stream: bool = False
    priority: int = 0
    batch_id: str = ""  # set by the worker from the batch it came in (logs, the mock's answers)
    note: str = ""  # set by the worker: what the mock says first (the http engine's fallback)
    # the front's fingerprints of the prompt's prefix (common.prefix.text_fingerprints of blocks
    # of common.prefix.BLOCK_CHARS characters) and the prompt's length in characters:
    # a worker whose engine reports its cache says which of them it holds (see worker.residency)
    prefix: list[int] = []
    prompt_chars: Count = 0
    traceparent: str = ""  # W3C trace context of the front's span for it ("": not traced)


class OutItem(Struct):
    """Output of one request, as the client will read it: streamed, `data` holds whole SSE events
    (`data: {...}\\n\\n`, never the closing `[DONE]`, which is the front's); otherwise the JSON
    body, once, with `done`. The last item is `done` and carries `usage` (prompt_tokens,
    completion_tokens) for the front's accounting. A `status` of 400 or more is a refusal whose
    `data` is the OpenAI error body."""

    id: str
    data: bytes = b""
    done: bool = False
    status: int = 200
    usage: dict[str, Count] | None = None


def request_item(request_id: str, route: str, body: dict[str, Any], *, trace_id: str = "",
                 stream: bool = False, priority: int = 0, prefix: list[int] | None = None,
                 prompt_chars: int = 0, traceparent: str = "") -> RequestItem:
    return RequestItem(request_id, route, body, trace_id, stream, priority,
                       prefix=prefix or [], prompt_chars=prompt_chars, traceparent=traceparent)


def out_item(request_id: str, data: bytes, *, done: bool = False, status: int = 200,
             usage: dict[str, int] | None = None) -> OutItem:
    return OutItem(request_id, data, done, status, usage)


# --- messages ------------------------------------------------------------------------------------


class Message(Struct, tag_field="type", kw_only=True):
    """Base of every wire message; `type` (the tag) is what the receiver routes on."""

    type: ClassVar[str] = ""
    v: int = VERSION

    def encode(self) -> bytes:
        return _encoder.encode(self)


# --- worker -> front ---------------------------------------------------------------------------


class Hello(Message, tag="hello"):
    """A worker introduces itself: who it is, what it serves, how much it takes at once."""

    type: ClassVar[str] = "hello"
    worker_id: str
    engine: str
    model: str
    capacity: int
    device: str
    state: WorkerState = "loading"
    pid: int = 0
    load_time_s: float = 0.0
    error: str = ""
    # the routes it serves ("chat", "completions", "embeddings", "tokenize", "detokenize") and the
    # request features past the base it honours (see server.openai_schema.FEATURES)
    features: list[str] = []
    max_model_len: int = 0
    # its engine reports which prefixes it holds (`held`/`dropped` on out and heartbeat), from
    # the engine's own cache; without it the front estimates from what it sent
    reports_prefixes: bool = False


class Ready(Message, tag="ready"):
    """The worker's model is loaded; it takes batches from now on."""

    type: ClassVar[str] = "ready"
    load_time_s: float
    model: str = ""  # the served name, when loading is what settled it (the http engine)
    features: list[str] | None = None  # routes and features, when loading settled them (vLLM)


class Heartbeat(Message, tag="heartbeat"):
    """The worker is alive; `load` is what its engine is doing now."""

    type: ClassVar[str] = "heartbeat"
    active: int = 0
    state: WorkerState = "ready"
    load: EngineLoad | None = None
    held: list[int] = []  # prefix fingerprints the engine's cache now holds (see Hello)
    dropped: list[int] = []  # ... and those it no longer holds, or never took in


class Out(Message, tag="out"):
    """Output for many requests, coalesced: one message per engine step, not per token."""

    type: ClassVar[str] = "out"
    items: list[OutItem] = []
    load: EngineLoad | None = None  # piggy-backed: fresh between heartbeats
    held: list[int] = []  # as in Heartbeat: what the engine's cache took in or let go
    dropped: list[int] = []


class Error(Message, tag="error"):
    """Requests that failed (`ids`), or the whole worker when `ids` is empty."""

    type: ClassVar[str] = "error"
    message: str
    ids: list[str] = []
    kind: str = "engine"


class Bye(Message, tag="bye"):
    """The worker is leaving on purpose; its unfinished requests should go elsewhere. A
    supervisor that speaks for its dead engine host says whether it is starting a new one."""

    type: ClassVar[str] = "bye"
    reason: str = ""
    restarting: bool = False


# --- front -> worker ---------------------------------------------------------------------------


class Welcome(Message, tag="welcome"):
    """The front registered the worker's hello."""

    type: ClassVar[str] = "welcome"
    front_id: str
    # how long the front waits for a silent worker before it re-runs its requests elsewhere: a
    # worker cut off from it that long aborts them (0: it does not say)
    worker_timeout_s: float = 0.0


class HelloAgain(Message, tag="hello_again"):
    """The front does not know this worker (it restarted, or declared it dead): say hello again."""

    type: ClassVar[str] = "hello_again"


class Batch(Message, tag="batch"):
    """Requests to run."""

    type: ClassVar[str] = "batch"
    batch_id: str
    requests: list[RequestItem] = []


class Abort(Message, tag="abort"):
    """Stop these requests: their clients are gone or past their deadline."""

    type: ClassVar[str] = "abort"
    ids: list[str] = []


class Shutdown(Message, tag="shutdown"):
    """Finish, say bye and exit."""

    type: ClassVar[str] = "shutdown"


AnyMessage = Union[Hello, Ready, Heartbeat, Out, Error, Bye, Welcome, HelloAgain, Batch, Abort,
                   Shutdown]
_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(AnyMessage)


def decode(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Parse and validate one message, of at most `max_bytes` (COHORT_ZMQ_MAX_MESSAGE_BYTES);
    anything unexpected raises ProtocolError."""
    if len(data) > max_bytes:
        raise ProtocolError(f"message of {len(data)} bytes is over the limit of {max_bytes} "
                            "(COHORT_ZMQ_MAX_MESSAGE_BYTES)")
    try:
        message = _decoder.decode(data)
    except msgspec.DecodeError as error:  # ValidationError too: a field of the wrong type
        raise ProtocolError(str(error)) from None
    if message.v != VERSION:
        raise ProtocolError(f"protocol version {message.v!r}, expected {VERSION}")
    return message


def request_ids(data: bytes) -> list[str]:
    """The request ids a message that could not be decoded still shows (a batch's `requests`,
    an out message's `items`), so its receiver can answer for them instead of dropping them;
    [] when none can be read. The socket's MAXMSGSIZE bounds what this unpacks."""
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:  # msgpack raises several unrelated types
        return []
    if not isinstance(body, dict):
        return []
    items = body.get("requests", body.get("items"))
    if not isinstance(items, list):
        return []
    return [item["id"] for item in items
            if isinstance(item, dict) and isinstance(item.get("id"), str)]
