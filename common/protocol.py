"""The wire between the front and its workers: typed msgpack messages, versioned, validated.

Every message is one msgpack map with `v` (the protocol version) and `type`. New fields go last with
a default, so an older peer still decodes a newer message. Nothing here unpickles or evals: a
malformed or foreign message becomes a `ProtocolError`; its receiver logs it and answers for the
requests it names (`request_ids`), so no job waits out its timeout for a message nobody read.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union

import msgpack

VERSION = 2  # 2: requests carry the OpenAI body, outputs the OpenAI bytes
WorkerState = Literal["loading", "ready", "draining", "failed"]
MAX_MESSAGE_BYTES = 64 << 20


class ProtocolError(ValueError):
    """A message we cannot accept: bad msgpack, wrong version, unknown type or wrong fields."""


@dataclass
class Message:
    """Base of every wire message; `type` is the tag the receiver routes on."""

    type: ClassVar[str] = ""

    def encode(self) -> bytes:
        # Shallow on purpose: `dataclasses.asdict` deep-copies every request's params and messages,
        # which msgpack would only read once anyway.
        body = {"v": VERSION, "type": self.type}
        body.update((item.name, getattr(self, item.name)) for item in dataclasses.fields(self))
        return msgpack.packb(body, use_bin_type=True)


# --- worker -> front ---------------------------------------------------------------------------


@dataclass
class Hello(Message):
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
    features: list[str] = field(default_factory=list)
    max_model_len: int = 0


@dataclass
class Ready(Message):
    """The worker's model is loaded; it takes batches from now on."""

    type: ClassVar[str] = "ready"
    load_time_s: float
    model: str = ""  # the served name, when loading is what settled it (the http engine)
    features: list[str] | None = None  # routes and features, when loading settled them (vLLM)


@dataclass
class Heartbeat(Message):
    """The worker is alive; `load` (see `EngineLoad`) is what its engine is doing now."""

    type: ClassVar[str] = "heartbeat"
    active: int = 0
    state: WorkerState = "ready"
    load: dict[str, Any] = field(default_factory=dict)


@dataclass
class Out(Message):
    """Output for many requests, coalesced: one message per engine step, not per token."""

    type: ClassVar[str] = "out"
    items: list[dict[str, Any]] = field(default_factory=list)
    load: dict[str, Any] = field(default_factory=dict)  # piggy-backed: fresh between heartbeats


@dataclass
class Error(Message):
    """Requests that failed (`ids`), or the whole worker when `ids` is empty."""

    type: ClassVar[str] = "error"
    message: str
    ids: list[str] = field(default_factory=list)
    kind: str = "engine"


@dataclass
class Bye(Message):
    """The worker is leaving on purpose; its unfinished requests should go elsewhere. A
    supervisor that speaks for its dead engine host says whether it is starting a new one."""

    type: ClassVar[str] = "bye"
    reason: str = ""
    restarting: bool = False


# --- front -> worker ---------------------------------------------------------------------------


@dataclass
class Welcome(Message):
    """The front registered the worker's hello."""

    type: ClassVar[str] = "welcome"
    front_id: str


@dataclass
class HelloAgain(Message):
    """The front does not know this worker (it restarted, or declared it dead): say hello again."""

    type: ClassVar[str] = "hello_again"


@dataclass
class Batch(Message):
    """Requests to run; see `request_item` for the shape of each."""

    type: ClassVar[str] = "batch"
    batch_id: str
    requests: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Abort(Message):
    """Stop these requests: their clients are gone or past their deadline."""

    type: ClassVar[str] = "abort"
    ids: list[str] = field(default_factory=list)


@dataclass
class Shutdown(Message):
    """Finish, say bye and exit."""

    type: ClassVar[str] = "shutdown"


MESSAGES: dict[str, type[Message]] = {
    cls.type: cls
    for cls in (Hello, Ready, Heartbeat, Out, Error, Bye, Welcome, HelloAgain, Batch, Abort, Shutdown)
}

# --- the items inside messages -------------------------------------------------------------------


@dataclass
class EngineLoad:
    """What a worker's engine is doing, as its own scheduler counts it (vLLM: its SchedulerStats).

    `received` is how many requests this link has taken from its front so far: the front counts
    what it sent beyond that as unacknowledged work, so its picture is fresh between reports.
    """

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0  # share of the KV cache in use, 0..1
    prefix_hit_rate: float = 0.0  # share of prompt tokens served from the prefix cache
    max_num_seqs: int = 0  # the engine's limits (0: unknown)
    max_num_batched_tokens: int = 0
    received: int = 0

    def as_item(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> "EngineLoad":
        """Read a load map that `decode` has already checked (unknown keys from newer peers ignored)."""
        return cls(**{name: item[name] for name in LOAD_FIELDS if name in item})


ROUTES = ("chat", "completions", "embeddings", "tokenize", "detokenize")

REQUEST_FIELDS: dict[str, Any] = {
    "id": str, "route": str, "body": dict, "trace_id": str, "stream": bool, "priority": int,
}
LOAD_FIELDS: dict[str, Any] = {
    "running": int, "waiting": int, "kv_usage": (int, float), "prefix_hit_rate": (int, float),
    "max_num_seqs": int, "max_num_batched_tokens": int, "received": int,
}
OUT_FIELDS: dict[str, Any] = {
    "id": str, "data": bytes, "done": bool, "status": int, "usage": (dict, type(None)),
}


def request_item(request_id: str, route: str, body: dict[str, Any], *, trace_id: str = "",
                 stream: bool = False, priority: int = 0) -> dict[str, Any]:
    """One request in a Batch: the OpenAI body of `route` (one of ROUTES), as the client sent it
    and the front validated it. `id` names it on the wire and in the response ids; `priority`
    orders it in the engine's queue (vLLM's: lower first; see server.scheduling.engine_priority)."""
    return {"id": request_id, "route": route, "body": body, "trace_id": trace_id, "stream": stream,
            "priority": priority}


def out_item(request_id: str, data: bytes, *, done: bool = False, status: int = 200,
             usage: dict[str, int] | None = None) -> dict[str, Any]:
    """Output of one request, as the client will read it: streamed, `data` holds whole SSE events
    (`data: {...}\\n\\n`, never the closing `[DONE]`, which is the front's); otherwise the JSON
    body, once, with `done`. The last item is `done` and carries `usage` (prompt_tokens,
    completion_tokens) for the front's accounting. A `status` of 400 or more is a refusal whose
    `data` is the OpenAI error body."""
    return {"id": request_id, "data": data, "done": done, "status": status, "usage": usage}


def check_load(load: dict[str, Any], what: str) -> None:
    """Raise ProtocolError unless every known field of a load map has its type (bools are not
    numbers) and no count is negative."""
    for name, kind in LOAD_FIELDS.items():
        if name not in load:
            continue
        value = load[name]
        if isinstance(value, bool) or not isinstance(value, kind) or value < 0:
            raise ProtocolError(f"{what}: load field {name!r} has the wrong type or sign")


def check_usage(usage: Any) -> None:
    """Raise ProtocolError unless `usage` is None or a map of token counts (non-negative ints)."""
    if usage is None:
        return
    for name, value in usage.items():
        if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, int) \
                or value < 0:
            raise ProtocolError(f"out: usage field {name!r} is not a token count")


def check_items(items: Any, shape: dict[str, Any], what: str) -> None:
    """Raise ProtocolError unless `items` is a list of maps with the field types of `shape`."""
    if not isinstance(items, list):
        raise ProtocolError(f"{what}: expected a list")
    for item in items:
        if not isinstance(item, dict):
            raise ProtocolError(f"{what}: expected maps")
        for name, kind in shape.items():
            if name in item and not isinstance(item[name], kind):
                raise ProtocolError(f"{what}: field {name!r} has the wrong type")
        if not isinstance(item.get("id"), str):
            raise ProtocolError(f"{what}: every item needs a string id")


# --- decoding ------------------------------------------------------------------------------------


def _accepts(hint: Any, value: Any) -> bool:
    """Whether `value` has the type `hint` says, down to the elements of lists and the keys of
    maps: a list of maps where strings belong must not reach the code that reads it."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(hint))
    if origin is Literal:
        return isinstance(value, str) and value in typing.get_args(hint)
    if hint is Any:
        return True
    if origin is list:
        [item] = typing.get_args(hint)
        return isinstance(value, list) and all(_accepts(item, v) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(
            _accepts(key, k) and _accepts(item, v) for k, v in value.items())
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


_HINTS = {name: typing.get_type_hints(cls) for name, cls in MESSAGES.items()}


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


def decode(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Parse and validate one message, of at most `max_bytes` (COHORT_ZMQ_MAX_MESSAGE_BYTES);
    anything unexpected raises ProtocolError."""
    if len(data) > max_bytes:
        raise ProtocolError(f"message of {len(data)} bytes is over the limit of {max_bytes} "
                            "(COHORT_ZMQ_MAX_MESSAGE_BYTES)")
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as error:  # msgpack raises several unrelated types
        raise ProtocolError(f"not msgpack: {error}") from None
    if not isinstance(body, dict):
        raise ProtocolError("a message must be a map")
    if body.get("v") != VERSION:
        raise ProtocolError(f"protocol version {body.get('v')!r}, expected {VERSION}")
    cls = MESSAGES.get(body.get("type"))  # type: ignore[arg-type]
    if cls is None:
        raise ProtocolError(f"unknown message type {body.get('type')!r}")
    hints = _HINTS[cls.type]
    values = {}
    for item in dataclasses.fields(cls):
        if item.name not in body:
            has_default = (item.default is not dataclasses.MISSING
                           or item.default_factory is not dataclasses.MISSING)
            if not has_default:
                raise ProtocolError(f"{cls.type}: missing field {item.name!r}")
            continue
        value = body[item.name]
        if not _accepts(hints[item.name], value):
            raise ProtocolError(f"{cls.type}: field {item.name!r} has the wrong type")
        values[item.name] = value
    message = cls(**values)
    if isinstance(message, Batch):
        check_items(message.requests, REQUEST_FIELDS, "batch")
    elif isinstance(message, Out):
        check_items(message.items, OUT_FIELDS, "out")
        for item in message.items:
            check_usage(item.get("usage"))
    if isinstance(message, (Out, Heartbeat)):
        check_load(message.load, message.type)
    return message
