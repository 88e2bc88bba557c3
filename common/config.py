"""Typed settings for the front and the workers, read from the environment (honcho reads `.env`).

Every setting has a clean `COHORT_*` name; the names users of the system this replaces already have
(`VLLM_MAX_BATCH_SIZE`, `MOCK_VLLM_MODEL`, ...) keep working beside them. Where both are set, the
`COHORT_*` name wins.
"""

from __future__ import annotations

import dataclasses
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


def env_field(default: Any, *names: str, doc: str = "") -> Any:
    """A dataclass field read from the first of `names` found in the environment."""
    return field(default=default, metadata={"env": names, "doc": doc})


def load(cls: type, env: Mapping[str, str] | None = None, **overrides: object) -> Any:
    """Build settings `cls` from `env` (default: os.environ), then apply explicit overrides."""
    env = os.environ if env is None else env
    values: dict[str, object] = {}
    for item in dataclasses.fields(cls):
        names = item.metadata.get("env", ())
        found = _lookup(env, names)
        if found is not None:
            kind = type(item.default) if item.default is not None else str
            values[item.name] = _parse(kind, *found)
    values.update({k: v for k, v in overrides.items() if v is not None})
    settings = cls(**values)
    settings.check()
    return settings


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

    host: str = env_field("127.0.0.1", "COHORT_HOST", doc="HTTP bind address")
    # not PORT: honcho sets PORT for every process it starts
    port: int = env_field(8001, "COHORT_PORT", doc="HTTP port")
    zmq_bind: str = env_field(
        "tcp://127.0.0.1:5555", "COHORT_ZMQ_BIND", doc="ROUTER endpoint the workers connect to"
    )
    zmq_port_span: int = env_field(
        1, "COHORT_ZMQ_PORT_SPAN",
        doc="with several fronts (hypercorn -w N): each binds the first free port of this many",
    )
    max_batch_size: int = env_field(32, "COHORT_MAX_BATCH_SIZE", "VLLM_MAX_BATCH_SIZE")
    max_wait_s: float = env_field(0.1, "COHORT_BATCH_WAIT_S", "VLLM_BATCH_WAIT_TIMEOUT")
    max_batches_per_worker: int = env_field(
        4, "COHORT_MAX_CONCURRENT_BATCHES", "VLLM_MAX_CONCURRENT_BATCHES",
        doc="batches a worker may have on the wire, sent but not yet taken into its engine",
    )
    prefix_affinity: bool = env_field(
        True, "COHORT_PREFIX_AFFINITY",
        doc="prefer the worker that served a request's prompt prefix (its prefix cache)",
    )
    affinity_margin: int = env_field(
        4, "COHORT_AFFINITY_MARGIN",
        doc="how many more requests than the least busy worker an affine worker may hold",
    )
    max_queue: int = env_field(
        1024, "COHORT_MAX_QUEUE", doc="queued requests per model and user before 429 (the whole queue: 4x)"
    )
    fair_shares: bool = env_field(
        True, "COHORT_FAIR_SHARES",
        doc="users take turns in each model's queue, by tokens; async and batch work only fills idle capacity (0: one line, oldest first)",
    )
    usage_ledger: bool = env_field(
        True, "COHORT_USAGE_LEDGER",
        doc="one row per finished request in the store, for /v1/usage (0: none kept, and /v1/usage says so)",
    )
    public_models: bool = env_field(
        False, "COHORT_PUBLIC_MODELS",
        doc="anonymous /ready lists the models served (0: only a caller with a token sees them)",
    )
    metrics_per_user: bool = env_field(
        False, "COHORT_METRICS_PER_USER",
        doc="/metrics gains requests and tokens per user and model (a label per user: off by default)",
    )
    request_timeout_s: float = env_field(600.0, "COHORT_REQUEST_TIMEOUT_S")
    stream_buffer_bytes: int = env_field(
        1 << 20, "COHORT_STREAM_BUFFER_BYTES",
        doc="a stream's events the front holds for a client that does not read them; past it the "
            "engine's request is aborted and the stream ends with an error",
    )
    drain_timeout_s: float = env_field(
        30.0, "COHORT_DRAIN_TIMEOUT_S",
        doc="on SIGTERM/SIGINT the front takes no new requests and lets those in flight finish this long",
    )
    keep_alive_s: float = env_field(
        5.0, "COHORT_KEEP_ALIVE_S",
        doc="an idle keep-alive connection closes after this long (vllm serve's default too)",
    )
    max_connections: int = env_field(
        0, "COHORT_MAX_CONNECTIONS",
        doc="open client connections; past it the oldest idle one closes, or a new one gets 503 (0: below the descriptor limit)",
    )
    worker_timeout_s: float = env_field(
        3.0, "COHORT_WORKER_TIMEOUT_S", doc="a worker silent this long is dead"
    )
    max_retries: int = env_field(2, "COHORT_MAX_RETRIES", doc="re-runs of a job whose worker died")
    max_body_bytes: int = env_field(1 << 20, "COHORT_MAX_BODY_BYTES")
    max_prompt_chars: int = env_field(200_000, "COHORT_MAX_PROMPT_CHARS")
    max_tokens_limit: int = env_field(8192, "COHORT_MAX_TOKENS_LIMIT")
    max_n: int = env_field(16, "COHORT_MAX_N", doc="largest `n` (choices per request)")
    drop_params: bool = env_field(
        False, "COHORT_DROP_PARAMS",
        doc="drop unknown request fields (named in the X-Cohort-Dropped-Params header) instead of a 400",
    )
    database_url: str = env_field(
        "", "DATABASE_URL", doc="peewee db URL; empty: SQLite file under data_dir"
    )
    data_dir: str = env_field("data", "COHORT_DATA_DIR")
    zmq_insecure: bool = env_field(
        False, "COHORT_ZMQ_INSECURE",
        doc="no CURVE on the worker wire: anyone who reaches the port can read prompts and forge answers",
    )
    zmq_max_message_bytes: int = env_field(
        64 << 20, "COHORT_ZMQ_MAX_MESSAGE_BYTES", doc="a larger wire message drops its peer",
    )
    auth_disabled: bool = env_field(
        False, "COHORT_AUTH_DISABLED", doc="local development only: every route open"
    )
    token_ttl_s: int = env_field(3600, "COHORT_TOKEN_TTL_S")
    auth_cache_s: float = env_field(
        5.0, "COHORT_AUTH_CACHE_S", doc="how long a verified key is trusted without the store"
    )
    task_retention_s: int = env_field(7 * 86400, "COHORT_TASK_RETENTION_S")
    task_lease_s: float = env_field(
        15.0, "COHORT_TASK_LEASE_S",
        doc="a front holds the tasks it runs this long, renewed every third of it; a dead front's tasks go to another front after it",
    )
    batch_headroom: float = env_field(
        0.125, "COHORT_BATCH_HEADROOM",
        doc="share of each engine's max_num_seqs that batch work leaves free, for interactive requests that arrive (0: batch fills every slot)",
    )
    batch_concurrency: int = env_field(
        256, "COHORT_BATCH_CONCURRENCY",
        doc="lines of one Batch API batch a front runs at once (they take idle capacity only)",
    )
    max_file_bytes: int = env_field(
        100 << 20, "COHORT_MAX_FILE_BYTES", doc="the largest file /v1/files takes (50,000 lines at most)"
    )
    limit_sync_s: float = env_field(
        1.0, "COHORT_LIMIT_SYNC_S",
        doc="fronts sharing a store share their limit counts this often, so limits hold across them (0: each front counts for itself)",
    )
    log_level: str = env_field("INFO", "COHORT_LOG_LEVEL")

    def check(self) -> None:
        if self.affinity_margin < 0:
            raise SettingError("COHORT_AFFINITY_MARGIN must be >= 0")
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
        doc="front endpoints, comma-separated; one link per front",
    )
    worker_id: str = env_field("", "COHORT_WORKER_ID", doc="default: host-pid")
    data_dir: str = env_field(
        "data", "COHORT_DATA_DIR", doc="where a worker on the front's machine finds the wire keys"
    )
    worker_key: str = env_field(
        "", "COHORT_WORKER_KEY",
        doc="this worker's CURVE secret key file (from python -m server.keys add); default: the data directory's local key",
    )
    front_key: str = env_field(
        "", "COHORT_FRONT_KEY", doc="the front's public key file; default: beside COHORT_WORKER_KEY, or in the data directory",
    )
    zmq_insecure: bool = env_field(False, "COHORT_ZMQ_INSECURE", doc="no CURVE: only with a front that has none")
    zmq_max_message_bytes: int = env_field(64 << 20, "COHORT_ZMQ_MAX_MESSAGE_BYTES")
    engine: str = env_field("", "COHORT_ENGINE", doc="mock | vllm | http (default: from the flags below)")
    use_real_vllm: bool = env_field(False, "USE_REAL_VLLM", "MOCK_USE_REAL_VLLM")
    upstream_url: str = env_field("", "REAL_VLLM_URL", doc="engine http: an OpenAI-compatible server")
    upstream_fallback_to_mock: bool = env_field(False, "COHORT_UPSTREAM_FALLBACK_TO_MOCK")
    upstream_timeout_s: float = env_field(600.0, "COHORT_UPSTREAM_TIMEOUT_S")
    upstream_api_key: str = env_field("", "COHORT_UPSTREAM_API_KEY")
    model: str = env_field("", "COHORT_MODEL", "REAL_VLLM_MODEL", "MOCK_VLLM_MODEL")
    served_model_name: str = env_field("", "COHORT_SERVED_MODEL_NAME")
    quantization: str = env_field("", "MOCK_VLLM_QUANTIZATION", doc="awq | gptq | auto | empty")
    max_model_len: int = env_field(2048, "COHORT_MAX_MODEL_LEN", "MOCK_VLLM_MAX_LEN")
    trust_remote_code: bool = env_field(False, "MOCK_VLLM_TRUST_REMOTE_CODE")
    hf_token: str = env_field("", "WORKER_HF_TOKEN")
    gpu_memory_utilization: float = env_field(
        0.0, "COHORT_GPU_MEMORY_UTILIZATION",
        doc="share of GPU memory (on CPU: of the NUMA node's memory) for vLLM; 0: 0.9 on GPU, 0.3 on CPU",
    )
    enforce_eager: bool = env_field(True, "COHORT_ENFORCE_EAGER")
    device: str = env_field("auto", "COHORT_DEVICE", doc="auto | cuda | cpu")
    capacity: int = env_field(256, "COHORT_WORKER_CAPACITY", doc="sequences one worker runs at once")
    max_num_seqs: int = env_field(
        0, "COHORT_MAX_NUM_SEQS", doc="vLLM's max_num_seqs: sequences the engine runs at once (0: engine default)"
    )
    max_num_batched_tokens: int = env_field(
        0, "COHORT_MAX_NUM_BATCHED_TOKENS",
        doc="vLLM's max_num_batched_tokens: tokens one engine step takes (0: engine default)",
    )
    runner: str = env_field(
        "auto", "COHORT_RUNNER",
        doc="vLLM's --runner: auto | generate | pooling (pooling with COHORT_CONVERT=embed serves /v1/embeddings)",
    )
    convert: str = env_field("auto", "COHORT_CONVERT", doc="vLLM's --convert: auto | embed | none")
    tool_call_parser: str = env_field(
        "", "COHORT_TOOL_CALL_PARSER", doc="vLLM's --tool-call-parser (hermes, llama3_json, ...)"
    )
    enable_auto_tool_choice: bool = env_field(
        False, "COHORT_ENABLE_AUTO_TOOL_CHOICE",
        doc="vLLM's --enable-auto-tool-choice: tool_choice auto (needs COHORT_TOOL_CALL_PARSER)",
    )
    chat_template: str = env_field("", "COHORT_CHAT_TEMPLATE", doc="vLLM's --chat-template: a file or the template")
    heartbeat_interval_s: float = env_field(0.5, "COHORT_HEARTBEAT_INTERVAL_S")
    drain_timeout_s: float = env_field(30.0, "COHORT_DRAIN_TIMEOUT_S")
    engine_stall_s: float = env_field(
        120.0, "COHORT_ENGINE_STALL_S",
        doc="an engine with requests and no output this long is dead: its host restarts (0: never)",
    )
    restart_backoff_s: float = env_field(
        1.0, "COHORT_RESTART_BACKOFF_S",
        doc="first wait before the supervisor restarts a dead engine host; doubles to 60 s",
    )
    mock_ttft_s: float = env_field(0.0, "MOCK_TTFT_S", doc="mock: fixed extra cost of a step that prefills")
    mock_prefill_token_s: float = env_field(
        0.00005, "MOCK_PREFILL_TOKEN_S", doc="mock: prefill time per prompt token not in the prefix cache"
    )
    mock_token_s: float = env_field(0.01, "MOCK_TOKEN_S", doc="mock: decode step time at batch size 1")
    mock_batch_growth: float = env_field(
        0.02, "MOCK_BATCH_GROWTH", doc="mock: extra step time per extra sequence, as a share"
    )
    mock_batch_cost_s: float = env_field(
        0.0, "MOCK_BATCH_COST_S", doc="mock: fixed cost of each batch received (scaling tests)"
    )
    mock_max_tokens: int = env_field(64, "MOCK_MAX_TOKENS", doc="mock: reply length cap")
    mock_reply_length: str = env_field(
        "echo", "MOCK_REPLY_LENGTH",
        doc="mock: echo (the reply echoes the prompt, then stops) | max_tokens (exactly max_tokens long)",
    )
    mock_kv_tokens: int = env_field(262144, "MOCK_KV_TOKENS", doc="mock: KV cache size in tokens")
    mock_prefix_cache_tokens: int = env_field(
        65536, "MOCK_PREFIX_CACHE_TOKENS", doc="mock: prompt tokens its prefix cache keeps (0: none)"
    )
    mock_error_rate: float = env_field(0.0, "MOCK_ERROR_RATE", doc="mock: share of requests that fail")
    mock_crash_after: int = env_field(0, "MOCK_CRASH_AFTER", doc="mock: exit after N requests (0: never)")
    mock_load_s: float = env_field(0.0, "MOCK_LOAD_S", doc="mock: simulated model load time")
    log_level: str = env_field("INFO", "COHORT_LOG_LEVEL")

    def check(self) -> None:
        if self.engine_name not in {"mock", "vllm", "http"}:
            raise SettingError(f"COHORT_ENGINE={self.engine!r}: use mock, vllm or http")
        if self.engine_name == "http" and not self.upstream_url:
            raise SettingError("engine http needs REAL_VLLM_URL")
        if not 0 <= self.mock_error_rate <= 1:
            raise SettingError("MOCK_ERROR_RATE must be between 0 and 1")
        if self.mock_reply_length not in {"echo", "max_tokens"}:
            raise SettingError(f"MOCK_REPLY_LENGTH={self.mock_reply_length!r}: use echo or max_tokens")
        if min(self.max_num_seqs, self.max_num_batched_tokens, self.mock_prefix_cache_tokens) < 0:
            raise SettingError("COHORT_MAX_NUM_SEQS, COHORT_MAX_NUM_BATCHED_TOKENS and "
                               "MOCK_PREFIX_CACHE_TOKENS must be >= 0")
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
    def engine_name(self) -> str:
        if self.engine:
            return self.engine
        if self.upstream_url:
            return "http"
        return "vllm" if self.use_real_vllm else "mock"
