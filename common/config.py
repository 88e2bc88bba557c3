"""Typed settings for the front and the workers, read from the environment (honcho reads `.env`).

Every setting has a clean `COHORT_*` name; the names users of the system this replaces already have
(`VLLM_MAX_BATCH_SIZE`, `MOCK_VLLM_MODEL`, ...) keep working beside them. Where both are set, the
`COHORT_*` name wins.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}
SECRET_SETTINGS = {"hf_token", "upstream_api_key", "database_url"}


class SettingError(ValueError):
    """A setting has a value we cannot use; the message names the setting."""


def _lookup(env: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str] | None:
    for name in names:
        if name in env:
            return name, env[name]
    return None


def _parse(kind: type, name: str, raw: str) -> object:
    raw = raw.strip()
    try:
        if kind is bool:
            if raw.lower() in TRUE_WORDS:
                return True
            if raw.lower() in FALSE_WORDS:
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is tuple:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        return raw
    except ValueError:
        raise SettingError(f"{name}={raw!r} is not a valid {kind.__name__}") from None


VLLM, MOCK, HTTP = frozenset({"vllm"}), frozenset({"mock"}), frozenset({"http"})


def env_field(default: Any, *names: str, doc: str, engines: frozenset[str] | None = None) -> Any:
    """A dataclass field read from the first of `names` found in the environment; `doc` is its
    meaning, the one source of the settings reference and `.env.example`. `engines`: the worker
    engines that read it (None: every process that loads these settings)."""
    metadata: dict[str, object] = {"env": names, "doc": doc}
    if engines is not None:
        metadata["engines"] = engines
    return field(default=default, metadata=metadata)


# Variables of Cohort's prefixes that are not settings, read where they are used.
NOT_SETTINGS = {
    "COHORT_KEY": "an API key, in the docs' examples",
    "COHORT_REQUIRE_VLLM": "CI: the real-engine tests may not skip",
    "COHORT_TEST_MIN_FREE_GB": "the free memory the real-engine tests ask for",
    "COHORT_CHAOS_SEED": "bench/faults.py's random kills",
}
PREFIXES = ("COHORT_", "MOCK_")  # a variable of these names that nothing reads is refused
# Settings that were removed: set, they would be ignored without a word, so they stop the start.
RETIRED = {
    "COHORT_AFFINITY_MARGIN": "placement prices a worker's sequences against the prefill its "
                              "cache saves; set COHORT_PREFIX_SEQ_TOKENS instead (docs/settings.md)",
}


def load(cls: type, env: Mapping[str, str] | None = None, **overrides: object) -> Any:
    """Build settings `cls` from `env` (default: os.environ), then apply explicit overrides."""
    env = os.environ if env is None else env
    check_names(env)
    values: dict[str, object] = {}
    given: dict[str, str] = {}  # field: the name it was given by
    for item in dataclasses.fields(cls):
        names = item.metadata.get("env", ())
        found = _lookup(env, names)
        if found is not None:
            kind = type(item.default) if item.default is not None else str
            values[item.name] = _parse(kind, *found)
            given[item.name] = found[0]
    explicit = {k: v for k, v in overrides.items() if v is not None}
    values.update(explicit)
    given.update({name: f"--{name.replace('_', '-')}" for name in explicit})
    settings = cls(**values)
    settings.check()
    refuse_unread(settings, given)
    return settings


def refuse_unread(settings: Any, given: Mapping[str, str]) -> None:
    """Refuse a setting given to a worker whose engine does not read it (`MOCK_TOKEN_S` on a vLLM
    worker, `COHORT_ENFORCE_EAGER` on the mock): it would change nothing without a word."""
    reading = getattr(settings, "engines_reading", None)
    if reading is None:
        return
    unread = [given[item.name] for item in dataclasses.fields(settings)
              if item.name in given and not item.metadata.get("engines", reading) & reading]
    if unread:
        raise SettingError(f"{', '.join(unread)}: not read by engine {settings.engine_name}; "
                           "unset it for this worker (docs/settings.md says which engine reads "
                           "what)")


def check_names(env: Mapping[str, str]) -> None:
    """Refuse a variable of Cohort's prefixes that no setting reads: misspelled or removed, it
    would otherwise change nothing without a word. The names of both processes' settings count
    (honcho gives the front and the workers one environment)."""
    known = {name for cls in (ServerSettings, WorkerSettings)
             for item in dataclasses.fields(cls) for name in item.metadata.get("env", ())}
    for name in env:
        if not name.startswith(PREFIXES) or name in known or name in NOT_SETTINGS:
            continue
        if name in RETIRED:
            raise SettingError(f"{name} is no longer read: {RETIRED[name]}")
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise SettingError(f"{name} is not a setting{hint} (see docs/settings.md)")


def describe(settings: Any) -> dict[str, object]:
    """The settings as a plain dict for `/health`, with secrets masked."""
    shown: dict[str, object] = {}
    for item in dataclasses.fields(settings):
        value = getattr(settings, item.name)
        if item.name in SECRET_SETTINGS and value:
            value = "***"
        shown[item.name] = list(value) if isinstance(value, tuple) else value
    return shown


@dataclass(frozen=True)
class ServerSettings:
    """What the front needs: HTTP, ZeroMQ, batching, limits, store and auth."""

    host: str = env_field("127.0.0.1", "COHORT_HOST", doc="the front's HTTP address")
    # not PORT: honcho sets PORT for every process it starts
    port: int = env_field(8001, "COHORT_PORT", doc="the front's HTTP port")
    zmq_bind: str = env_field(
        "tcp://127.0.0.1:5555", "COHORT_ZMQ_BIND",
        doc="the front's ZeroMQ ROUTER endpoint, which the workers connect to",
    )
    zmq_port_span: int = env_field(
        1, "COHORT_ZMQ_PORT_SPAN",
        doc="with several front processes (`hypercorn --workers N`), each binds the first free "
            "port of this many, from `COHORT_ZMQ_BIND`'s",
    )
    max_batch_size: int = env_field(
        32, "COHORT_MAX_BATCH_SIZE", "VLLM_MAX_BATCH_SIZE", doc="most requests in one batch message",
    )
    max_wait_s: float = env_field(
        0.1, "COHORT_BATCH_WAIT_S", "VLLM_BATCH_WAIT_TIMEOUT",
        doc="the longest a request waits in the front while every worker is full (never while "
            "one has room); then the least loaded engine queues it",
    )
    max_batches_per_worker: int = env_field(
        4, "COHORT_MAX_CONCURRENT_BATCHES", "VLLM_MAX_CONCURRENT_BATCHES",
        doc="batches a worker may have on the wire, sent but not yet taken into its engine (a "
            "worker that stops reading gets no more)",
    )
    prefix_affinity: bool = env_field(
        True, "COHORT_PREFIX_AFFINITY",
        doc="send a request whose prompt starts like an earlier one to a worker whose engine "
            "holds that prefix (as its engine reports, or where it was sent last)",
    )
    prefix_seq_tokens: int = env_field(
        64, "COHORT_PREFIX_SEQ_TOKENS",
        doc="what placement counts each sequence a worker already has as, in prompt tokens to "
            "prefill: a prompt goes to the worker holding its longest prefix until that worker "
            "has more sequences than the prefill it saves is worth (see Scheduling)",
    )
    max_queue: int = env_field(
        1024, "COHORT_MAX_QUEUE",
        doc="queued requests per model and user before a 429 (the whole model's queue holds 4x)",
    )
    fair_shares: bool = env_field(
        True, "COHORT_FAIR_SHARES",
        doc="users take turns in each model's queue by tokens, and async tasks and batches take "
            "only idle capacity; 0: one line, oldest first",
    )
    usage_ledger: bool = env_field(
        True, "COHORT_USAGE_LEDGER",
        doc="one ledger row per request that reached a worker, journaled before its answer ends "
            "and committed once a second, or written with its task's or batch line's outcome; "
            "0: no ledger, and `/v1/usage` answers 404 saying so",
    )
    public_models: bool = env_field(
        False, "COHORT_PUBLIC_MODELS",
        doc="1: anonymous `GET /ready` lists the models served; 0: only a caller with a token "
            "sees them",
    )
    metrics_per_user: bool = env_field(
        False, "COHORT_METRICS_PER_USER",
        doc="1: `/metrics` gains `cohort_user_requests_total` and `cohort_user_tokens_total` by "
            "user and model (a label value per user, so off by default)",
    )
    request_timeout_s: float = env_field(
        600.0, "COHORT_REQUEST_TIMEOUT_S", doc="a request's deadline; past it its job is aborted",
    )
    stream_buffer_bytes: int = env_field(
        1 << 20, "COHORT_STREAM_BUFFER_BYTES",
        doc="a stream's events the front holds for a client that does not read them (beyond the "
            "kernel's socket buffers); past it the engine's request is aborted and the stream "
            "ends with an error event `client_too_slow`",
    )
    drain_timeout_s: float = env_field(
        30.0, "COHORT_DRAIN_TIMEOUT_S",
        doc="on SIGTERM/SIGINT the front answers 503 to new requests (`/ready` false) and lets "
            "what is in flight finish this long, then ends the rest with an error event; "
            "hypercorn's graceful timeout is 5 s more",
    )
    keep_alive_s: float = env_field(
        5.0, "COHORT_KEEP_ALIVE_S",
        doc="an idle keep-alive connection, or one whose request head is not whole, closes after "
            "this long (`vllm serve`'s default too)",
    )
    max_connections: int = env_field(
        0, "COHORT_MAX_CONNECTIONS",
        doc="open client connections; past it a new connection closes the oldest idle one, or, "
            "with none idle, gets a 503 `too_many_connections`; 0: the descriptor limit less 256 "
            "(the front raises its soft limit to the hard one)",
    )
    worker_timeout_s: float = env_field(
        3.0, "COHORT_WORKER_TIMEOUT_S", doc="a worker silent this long is dead",
    )
    max_retries: int = env_field(
        2, "COHORT_MAX_RETRIES", doc="re-runs of a request whose worker died before it streamed",
    )
    max_body_bytes: int = env_field(
        1 << 20, "COHORT_MAX_BODY_BYTES", doc="the largest request body (413 above)",
    )
    max_prompt_chars: int = env_field(
        200_000, "COHORT_MAX_PROMPT_CHARS", doc="the largest prompt, or sum of messages",
    )
    max_tokens_limit: int = env_field(
        8192, "COHORT_MAX_TOKENS_LIMIT", doc="the largest `max_tokens` accepted",
    )
    max_n: int = env_field(
        16, "COHORT_MAX_N", doc="the largest `n`, counting every prompt's choices",
    )
    drop_params: bool = env_field(
        False, "COHORT_DROP_PARAMS",
        doc="drop unknown request fields instead of a 400; the response names them in "
            "`X-Cohort-Dropped-Params`",
    )
    database_url: str = env_field(
        "", "DATABASE_URL",
        doc="the store; empty: SQLite under `COHORT_DATA_DIR`; `postgresql://user:pw@host/cohort` "
            "(install `.[postgres]`) for fronts on several machines",
    )
    data_dir: str = env_field(
        "data", "COHORT_DATA_DIR",
        doc="the SQLite file, the ledger's journal and the wire's CURVE keys (`keys/`); created "
            "readable by the service's user only",
    )
    zmq_insecure: bool = env_field(
        False, "COHORT_ZMQ_INSECURE",
        doc="no CURVE on the worker wire (front and workers must agree): anyone who reaches the "
            "port can read prompts and forge answers; logged loudly",
    )
    zmq_max_message_bytes: int = env_field(
        64 << 20, "COHORT_ZMQ_MAX_MESSAGE_BYTES",
        doc="a larger message on the worker wire drops its peer, and both ends decode within it; "
            "it must hold a whole batch. A message its receiver cannot decode is answered for "
            "the requests it names (a 502 that says why)",
    )
    auth_disabled: bool = env_field(
        False, "COHORT_AUTH_DISABLED", doc="local development only: every route open",
    )
    token_ttl_s: int = env_field(3600, "COHORT_TOKEN_TTL_S", doc="lifetime of `/token` tokens")
    auth_cache_s: float = env_field(
        5.0, "COHORT_AUTH_CACHE_S",
        doc="how long a verified key is trusted without asking the store (a revoked key or a "
            "disabled user takes effect within it)",
    )
    task_retention_s: int = env_field(
        7 * 86400, "COHORT_TASK_RETENTION_S", doc="finished async tasks are purged after this",
    )
    task_lease_s: float = env_field(
        15.0, "COHORT_TASK_LEASE_S",
        doc="a front holds the tasks and batches it runs this long, renewed every third of it; a "
            "stopped front's work goes to another front once its lease lapses (fronts' clocks "
            "must agree to well within it)",
    )
    batch_headroom: float = env_field(
        0.125, "COHORT_BATCH_HEADROOM",
        doc="the share of each engine's `max_num_seqs` that batch work leaves free for "
            "interactive requests, kept only while interactive traffic is recent (5 s) and never "
            "a whole engine; 0: batch work fills every slot",
    )
    batch_concurrency: int = env_field(
        256, "COHORT_BATCH_CONCURRENCY",
        doc="lines of one Batch API batch a front runs at once (they take only idle capacity)",
    )
    max_file_bytes: int = env_field(
        100 << 20, "COHORT_MAX_FILE_BYTES",
        doc="the largest file `POST /v1/files` takes (and 50,000 lines at most)",
    )
    limit_sync_s: float = env_field(
        1.0, "COHORT_LIMIT_SYNC_S",
        doc="fronts sharing a store share their limit counts this often, one transaction per "
            "front, off the request path; 0: each front counts for itself (N fronts: N times a "
            "limit)",
    )
    log_level: str = env_field("INFO", "COHORT_LOG_LEVEL", doc="log level of every process")
    otlp_endpoint: str = env_field(
        "", "COHORT_OTLP_ENDPOINT",
        doc="an OpenTelemetry collector's OTLP/HTTP base URL (`http://host:4318`): every "
            "process sends a trace of each request there, vLLM's own spans included; empty: no "
            "tracing, at no cost",
    )

    def check(self) -> None:
        if self.prefix_seq_tokens < 1:
            raise SettingError("COHORT_PREFIX_SEQ_TOKENS must be >= 1")
        if self.zmq_max_message_bytes < self.max_batch_size * self.max_body_bytes + (1 << 20):
            raise SettingError("COHORT_ZMQ_MAX_MESSAGE_BYTES must hold a whole batch: at least "
                               "COHORT_MAX_BATCH_SIZE x COHORT_MAX_BODY_BYTES + 1 MiB")
        positive = ("max_batch_size", "max_batches_per_worker", "max_queue", "max_body_bytes",
                    "batch_concurrency", "max_file_bytes", "stream_buffer_bytes",
                    "max_tokens_limit", "max_n", "zmq_port_span")
        for name in positive:
            if getattr(self, name) < 1:
                raise SettingError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.max_wait_s < 0:
            raise SettingError("VLLM_BATCH_WAIT_TIMEOUT / COHORT_BATCH_WAIT_S must be >= 0")
        if self.worker_timeout_s <= 0:
            raise SettingError("COHORT_WORKER_TIMEOUT_S must be > 0")
        if self.limit_sync_s < 0:
            raise SettingError("COHORT_LIMIT_SYNC_S must be >= 0 (0 turns the sync off)")
        if not 0 <= self.batch_headroom < 1:
            raise SettingError("COHORT_BATCH_HEADROOM must be from 0 up to (not including) 1")

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{os.path.join(self.data_dir, 'cohort.db')}"


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs: where the front is, which engine and model, and the mock's cost model."""

    connect: tuple = env_field(
        ("tcp://127.0.0.1:5555",), "COHORT_CONNECT",
        doc="the fronts' ZeroMQ endpoints, comma-separated (`--connect`); one link per front",
    )
    worker_id: str = env_field(
        "", "COHORT_WORKER_ID", doc="the worker's id (`--worker-id`); empty: host-pid",
    )
    data_dir: str = env_field(
        "data", "COHORT_DATA_DIR",
        doc="where a worker on the front's machine finds the wire's CURVE keys",
    )
    worker_key: str = env_field(
        "", "COHORT_WORKER_KEY",
        doc="a worker on another machine: its CURVE secret key file, made by `python -m "
            "server.keys add NAME`; empty: the data directory's local key",
    )
    front_key: str = env_field(
        "", "COHORT_FRONT_KEY",
        doc="the front's public key file; empty: `front.key` beside `COHORT_WORKER_KEY`, or in "
            "the data directory",
    )
    zmq_insecure: bool = env_field(
        False, "COHORT_ZMQ_INSECURE", doc="no CURVE: only with a front that has none",
    )
    zmq_max_message_bytes: int = env_field(
        64 << 20, "COHORT_ZMQ_MAX_MESSAGE_BYTES",
        doc="a larger message from the front drops the link (the front's value should match)",
    )
    engine: str = env_field(
        "", "COHORT_ENGINE",
        doc="`mock`, `vllm` or `http` (`--engine`); empty: from `USE_REAL_VLLM` and "
            "`REAL_VLLM_URL`, else the mock",
    )
    use_real_vllm: bool = env_field(
        False, "USE_REAL_VLLM", "MOCK_USE_REAL_VLLM", doc="1: engine `vllm`",
    )
    upstream_url: str = env_field(
        "", "REAL_VLLM_URL",
        doc="engine `http`: the OpenAI-compatible server to forward to (e.g. `vllm serve`)",
        engines=HTTP,
    )
    upstream_fallback_to_mock: bool = env_field(
        False, "COHORT_UPSTREAM_FALLBACK_TO_MOCK",
        doc="engine `http`: answer from the mock while the upstream is down (each reply says so)",
        engines=HTTP,
    )
    upstream_timeout_s: float = env_field(
        600.0, "COHORT_UPSTREAM_TIMEOUT_S", doc="engine `http`: the upstream's read timeout",
        engines=HTTP,
    )
    upstream_api_key: str = env_field(
        "", "COHORT_UPSTREAM_API_KEY", doc="engine `http`: the key sent to the upstream",
        engines=HTTP,
    )
    model: str = env_field(
        "", "COHORT_MODEL", "REAL_VLLM_MODEL", "MOCK_VLLM_MODEL",
        doc="the model folder or hub name (`--model`); empty: the engine's default (vLLM: the "
            "prepared SmolLM2 folder; the mock: `cohort-mock`)",
    )
    models_dir: str = env_field(
        "models", "COHORT_MODELS_DIR",
        doc="where `python -m worker.models prepare` puts the bundled model, and where a vLLM "
            "worker with no `COHORT_MODEL` looks for it",
    )
    served_model_name: str = env_field(
        "", "COHORT_SERVED_MODEL_NAME", doc="the name clients use; empty: the folder's name",
    )
    quantization: str = env_field(
        "", "MOCK_VLLM_QUANTIZATION", doc="vLLM's quantization: `awq`, `gptq`, `auto` or empty",
        engines=VLLM,
    )
    max_model_len: int = env_field(
        2048, "COHORT_MAX_MODEL_LEN", "MOCK_VLLM_MAX_LEN", doc="the context length",
    )
    trust_remote_code: bool = env_field(
        False, "MOCK_VLLM_TRUST_REMOTE_CODE", doc="let transformers run the model's own code",
        engines=VLLM,
    )
    hf_token: str = env_field(
        "", "WORKER_HF_TOKEN", doc="a hub token, for gated models", engines=VLLM,
    )
    gpu_memory_utilization: float = env_field(
        0.0, "COHORT_GPU_MEMORY_UTILIZATION",
        doc="vLLM's memory share (on CPU: of the NUMA node's memory); 0: 0.9 on a GPU, 0.3 on "
            "CPU, so two workers fit side by side",
        engines=VLLM,
    )
    kv_cache_memory_bytes: int = env_field(
        0, "COHORT_KV_CACHE_MEMORY_BYTES",
        doc="vLLM's KV cache size in bytes (`--kv-cache-memory-bytes`); 0: what the memory share "
            "leaves",
        engines=VLLM,
    )
    kv_events: bool = env_field(
        True, "COHORT_KV_EVENTS",
        doc="a worker reads its engine's KV cache events (vLLM's, or the mock's alike) and tells "
            "the fronts which prompt prefixes its cache holds, so they place by it; off: they "
            "estimate from what they sent",
        engines=VLLM | MOCK,
    )
    enforce_eager: bool = env_field(
        True, "COHORT_ENFORCE_EAGER",
        doc="skip CUDA graphs and compilation (a load of about 1 min instead of 4)",
        engines=VLLM,
    )
    device: str = env_field(
        "auto", "COHORT_DEVICE", doc="`auto`, `cuda` or `cpu`", engines=VLLM,
    )
    capacity: int = env_field(
        256, "COHORT_WORKER_CAPACITY", doc="sequences one worker runs at once",
    )
    max_num_seqs: int = env_field(
        0, "COHORT_MAX_NUM_SEQS",
        doc="vLLM's `max_num_seqs`: sequences the engine runs at once; 0: the engine's default "
            "(the mock: `COHORT_WORKER_CAPACITY`)",
    )
    max_num_batched_tokens: int = env_field(
        0, "COHORT_MAX_NUM_BATCHED_TOKENS",
        doc="vLLM's `max_num_batched_tokens`: the token budget of one engine step; 0: the "
            "engine's default (the mock: 2048)",
        engines=VLLM | MOCK,
    )
    runner: str = env_field(
        "auto", "COHORT_RUNNER",
        doc="vLLM's `--runner`: `auto`, `generate` or `pooling` (with `COHORT_CONVERT=embed`, "
            "the worker serves `/v1/embeddings`)",
        engines=VLLM,
    )
    convert: str = env_field(
        "auto", "COHORT_CONVERT",
        doc="vLLM's `--convert`: `embed` turns a generative model into an embedding model",
        engines=VLLM,
    )
    tool_call_parser: str = env_field(
        "", "COHORT_TOOL_CALL_PARSER",
        doc="vLLM's `--tool-call-parser` (`hermes`, `llama3_json`, ...): how `tool_choice: auto` "
            "output is read",
        engines=VLLM,
    )
    enable_auto_tool_choice: bool = env_field(
        False, "COHORT_ENABLE_AUTO_TOOL_CHOICE",
        doc="vLLM's `--enable-auto-tool-choice`; needs `COHORT_TOOL_CALL_PARSER`",
        engines=VLLM,
    )
    chat_template: str = env_field(
        "", "COHORT_CHAT_TEMPLATE",
        doc="vLLM's `--chat-template`: a file, or the template itself; empty: the model's",
        engines=VLLM,
    )
    heartbeat_interval_s: float = env_field(
        0.5, "COHORT_HEARTBEAT_INTERVAL_S", doc="how often a worker tells the front it lives",
    )
    drain_timeout_s: float = env_field(
        30.0, "COHORT_DRAIN_TIMEOUT_S",
        doc="on SIGTERM/SIGINT a worker takes nothing new and lets what it runs finish this long",
    )
    engine_stall_s: float = env_field(
        120.0, "COHORT_ENGINE_STALL_S",
        doc="an engine with requests running and no output this long is dead: its host says "
            "bye and restarts; 0: never",
    )
    restart_backoff_s: float = env_field(
        1.0, "COHORT_RESTART_BACKOFF_S",
        doc="the supervisor's first wait before it restarts a dead engine host; it doubles up to "
            "60 s, and starts over once a host has lived a minute",
    )
    mock_ttft_s: float = env_field(
        0.0, "MOCK_TTFT_S", doc="mock: a fixed extra cost of a step that prefills",
        engines=MOCK,
    )
    mock_prefill_token_s: float = env_field(
        0.00005, "MOCK_PREFILL_TOKEN_S",
        doc="mock: prefill time per prompt token not in its prefix cache",
        engines=MOCK,
    )
    mock_token_s: float = env_field(
        0.01, "MOCK_TOKEN_S", doc="mock: a forward pass's time at one sequence",
        engines=MOCK,
    )
    mock_batch_growth: float = env_field(
        0.02, "MOCK_BATCH_GROWTH", doc="mock: a forward pass's extra time per extra sequence, as a share",
        engines=MOCK,
    )
    mock_batch_cost_s: float = env_field(
        0.0, "MOCK_BATCH_COST_S", doc="mock: a fixed cost of each batch message received",
        engines=MOCK,
    )
    mock_max_tokens: int = env_field(
        64, "MOCK_MAX_TOKENS", doc="mock: the reply's cap when a request gives no `max_tokens`",
        engines=MOCK,
    )
    mock_reply_length: str = env_field(
        "echo", "MOCK_REPLY_LENGTH",
        doc="mock: `echo` (the reply echoes the prompt, then stops) or `max_tokens` (exactly "
            "`max_tokens` long, as vLLM's `ignore_eos`)",
        engines=MOCK,
    )
    mock_kv_tokens: int = env_field(
        262144, "MOCK_KV_TOKENS", doc="mock: its KV cache, in tokens",
        engines=MOCK,
    )
    mock_prefix_cache_tokens: int = env_field(
        65536, "MOCK_PREFIX_CACHE_TOKENS", doc="mock: the prompt tokens its prefix cache keeps; 0: none",
        engines=MOCK,
    )
    mock_error_rate: float = env_field(
        0.0, "MOCK_ERROR_RATE", doc="mock: the share of requests that fail (fault injection)",
        engines=MOCK,
    )
    mock_crash_after: int = env_field(
        0, "MOCK_CRASH_AFTER", doc="mock: its host exits after this many requests; 0: never",
        engines=MOCK,
    )
    mock_load_s: float = env_field(
        0.0, "MOCK_LOAD_S", doc="mock: a simulated model load time", engines=MOCK,
    )
    log_level: str = env_field("INFO", "COHORT_LOG_LEVEL", doc="log level of every process")
    otlp_endpoint: str = env_field(
        "", "COHORT_OTLP_ENDPOINT",
        doc="an OpenTelemetry collector's OTLP/HTTP base URL (`http://host:4318`): every "
            "process sends a trace of each request there, vLLM's own spans included; empty: no "
            "tracing, at no cost",
    )

    def check(self) -> None:
        if self.engine_name not in {"mock", "vllm", "http"}:
            raise SettingError(f"COHORT_ENGINE={self.engine!r}: use mock, vllm or http")
        if self.engine_name == "http" and not self.upstream_url:
            raise SettingError("engine http needs REAL_VLLM_URL")
        if not 0 <= self.mock_error_rate <= 1:
            raise SettingError("MOCK_ERROR_RATE must be between 0 and 1")
        if self.mock_reply_length not in {"echo", "max_tokens"}:
            raise SettingError(f"MOCK_REPLY_LENGTH={self.mock_reply_length!r}: use echo or max_tokens")
        if min(self.max_num_seqs, self.max_num_batched_tokens, self.mock_prefix_cache_tokens,
               self.kv_cache_memory_bytes) < 0:
            raise SettingError("COHORT_MAX_NUM_SEQS, COHORT_MAX_NUM_BATCHED_TOKENS, "
                               "MOCK_PREFIX_CACHE_TOKENS and COHORT_KV_CACHE_MEMORY_BYTES must be "
                               ">= 0")
        if self.runner not in {"auto", "generate", "pooling"}:
            raise SettingError(f"COHORT_RUNNER={self.runner!r}: use auto, generate or pooling")
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise SettingError("COHORT_ENABLE_AUTO_TOOL_CHOICE needs COHORT_TOOL_CALL_PARSER "
                               "(as vllm serve's --enable-auto-tool-choice needs --tool-call-parser)")
        if self.mock_kv_tokens < 1:
            raise SettingError("MOCK_KV_TOKENS must be at least 1")
        if self.capacity < 1 or self.heartbeat_interval_s <= 0:
            raise SettingError("COHORT_WORKER_CAPACITY and COHORT_HEARTBEAT_INTERVAL_S must be positive")

    @property
    def engines_reading(self) -> frozenset[str]:
        """The engines whose settings this worker reads: its own, and the mock's behind an
        http engine that falls back to it."""
        if self.engine_name == "http" and self.upstream_fallback_to_mock:
            return HTTP | MOCK
        return frozenset({self.engine_name})

    @property
    def engine_name(self) -> str:
        if self.engine:
            return self.engine
        if self.upstream_url:
            return "http"
        return "vllm" if self.use_real_vllm else "mock"
