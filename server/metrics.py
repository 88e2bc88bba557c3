"""The front's numbers, kept once: Prometheus metrics for `/metrics`, read back for `/stats`."""

from __future__ import annotations

import collections

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from server.periodic import Streak

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
                   120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """Every counter the front keeps, in a registry of its own (tests build many apps)."""

    def __init__(self, per_user: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # A label per user multiplies the series by the users: only where the operator asks.
        self.per_user = per_user
        self.user_requests = Counter("cohort_user_requests", "Finished requests by user, model "
                                     "and status", ["user", "model", "status"], registry=r) \
            if per_user else None
        self.user_tokens = Counter("cohort_user_tokens", "Tokens by user, model and kind "
                                   "(prompt or completion)", ["user", "model", "kind"],
                                   registry=r) if per_user else None
        self.requests = Counter("cohort_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.queue_length = Gauge("cohort_queue_length", "Requests waiting for a batch",
                                  ["model"], registry=r)
        self.connections = Gauge("cohort_connections", "Open client connections of this front "
                                 "process: busy (a request under way) or idle (between requests)",
                                 ["state"], registry=r)
        # By tier: async tasks and batches wait for idle capacity by design, which must not
        # read as long waits or slow first tokens of interactive requests.
        self.queue_wait = Histogram("cohort_queue_wait_seconds", "Time from accept to batch sent",
                                    ["model", "tier"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("cohort_batch_size", "Requests per batch sent to a worker",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.ttft = Histogram("cohort_time_to_first_token_seconds",
                              "Time from accept to the first output", ["model", "tier"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("cohort_request_duration_seconds",
                                 "Time from accept to the last output", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("cohort_prompt_tokens", "Input tokens", registry=r)
        self.completion_tokens = Counter("cohort_completion_tokens", "Output tokens", registry=r)
        self.workers = Gauge("cohort_workers", "Workers by state", ["state"], registry=r)
        # A model stays here, at 0, after its last worker is gone: that is when it matters.
        self.workers_ready = Gauge("cohort_workers_ready", "Ready workers per model (busy ones "
                                   "too), for every model a worker has served since the start",
                                   ["model"], registry=r)
        self.worker_state = Gauge("cohort_worker_state", "1 for each worker, labelled with its "
                                  "state as /health shows it", ["worker", "model", "state"],
                                  registry=r)
        worker = ["worker", "model"]
        self.load_time = Gauge("cohort_model_load_seconds", "Model load time per worker", worker,
                               registry=r)
        self.worker_running = Gauge("cohort_worker_running", "Sequences the worker's engine "
                                    "runs, as it last reported", worker, registry=r)
        self.worker_waiting = Gauge("cohort_worker_waiting", "Sequences waiting in the worker's "
                                    "engine, as it last reported", worker, registry=r)
        self.worker_kv_usage = Gauge("cohort_worker_kv_usage", "Share of the worker's KV cache "
                                     "in use (0 to 1)", worker, registry=r)
        self.worker_prefix_hit_rate = Gauge("cohort_worker_prefix_hit_rate", "Share of prompt "
                                            "tokens the worker's engine found cached (0 to 1)",
                                            worker, registry=r)
        self.worker_prefixes_held = Gauge("cohort_worker_prefixes_held", "Prompt prefixes the "
                                          "worker's engine reports it holds", worker, registry=r)
        # Set afresh from the registry at each scrape, so a forgotten worker leaves no series.
        self.per_worker = (self.worker_state, self.load_time, self.worker_running,
                           self.worker_waiting, self.worker_kv_usage, self.worker_prefix_hit_rate,
                           self.worker_prefixes_held)
        self.retries = Counter("cohort_retries", "Jobs re-run after their worker died", registry=r)
        self.aborts = Counter("cohort_aborts", "Jobs aborted (client gone or deadline)", registry=r)
        self.worker_deaths = Counter("cohort_worker_deaths", "Workers declared dead", registry=r)
        self.store_round_failures = Gauge("cohort_store_round_failure_streak", "Failed rounds in "
                                          "a row of the front's periodic store work (0: its last "
                                          "round worked)", ["what"], registry=r)
        self.lease_takeovers = Counter("cohort_lease_takeovers", "Async tasks and batches this "
                                       "front took over: their front's lease lapsed (it died or "
                                       "stalled), or their front handed them back (it drained)",
                                       ["what", "cause"], registry=r)
        for what in ("task", "batch"):  # at 0 from the start, so that increase() counts the
            for cause in ("lease_lapsed", "handed_back"):  # first one
                self.lease_takeovers.labels(what, cause)
        # Exact batch sizes for /stats: the histogram's buckets would blur them.
        self.batch_sizes: collections.Counter[int] = collections.Counter()

    def took_over(self, what: str, lease_lapsed: bool) -> None:
        """This front took over a task or a batch (`what`) from another front."""
        self.lease_takeovers.labels(what, "lease_lapsed" if lease_lapsed else "handed_back").inc()

    def user_request(self, user: str, model: str, status: int, prompt_tokens: int,
                     completion_tokens: int) -> None:
        """Count a finished request against its user (COHORT_METRICS_PER_USER only)."""
        if self.user_requests is None or self.user_tokens is None:
            return
        self.user_requests.labels(user, model, str(status)).inc()
        self.user_tokens.labels(user, model, "prompt").inc(prompt_tokens)
        self.user_tokens.labels(user, model, "completion").inc(completion_tokens)

    def follow_streak(self, what: str, streak: Streak) -> None:
        """Export a periodic store job's failures in a row, read when scraped (nothing a round)."""
        self.store_round_failures.labels(what).set_function(lambda: streak.failures)

    def batch_sent(self, size: int) -> None:
        self.batch_size.observe(size)
        self.batch_sizes[size] += 1

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def summary(self) -> dict[str, object]:
        """The figures `/stats` shows, computed from the same metrics `/metrics` exports."""
        by_route: dict[str, int] = collections.Counter()
        by_status: dict[str, int] = collections.Counter()
        for sample in self._samples(self.requests, "_total"):
            by_route[sample.labels["route"]] += int(sample.value)
            by_status[sample.labels["status"]] += int(sample.value)
        batches = self._value(self.batch_size, "_count")
        waits = self._value(self.queue_wait, "_count")
        return {
            "requests": {"total": sum(by_route.values()), "by_route": dict(by_route),
                         "by_status": dict(by_status)},
            "batches": {
                "formed": int(batches),
                "mean_size": round(self._value(self.batch_size, "_sum") / batches, 3)
                if batches else 0.0,
                "size_distribution": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            },
            "queue": {"mean_wait_s": round(self._value(self.queue_wait, "_sum") / waits, 6)
                      if waits else 0.0},
            "tokens": {"prompt": int(self._value(self.prompt_tokens, "_total")),
                       "completion": int(self._value(self.completion_tokens, "_total"))},
            "retries": int(self._value(self.retries, "_total")),
            "aborts": int(self._value(self.aborts, "_total")),
            "worker_deaths": int(self._value(self.worker_deaths, "_total")),
        }

    @staticmethod
    def _samples(metric, suffix: str):
        for family in metric.collect():
            for sample in family.samples:
                if sample.name.endswith(suffix):
                    yield sample

    def _value(self, metric, suffix: str) -> float:
        return sum(sample.value for sample in self._samples(metric, suffix))
