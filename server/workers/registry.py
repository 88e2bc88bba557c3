"""The workers as the front knows them: who they are, their state and load, and what routes ask of
them (which models are served, why one is not, what `/health` shows). No sockets here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.protocol import ROUTES
from server.errors import BadRequest, NoWorkers, NotFound
from server.jobs import Job
from server.metrics import Metrics
from server.workers.breaker import Breaker
from server.scheduling.placement import Placement, WorkerLoad

STATES = ("loading", "ready", "busy", "draining", "failing", "restarting", "failed", "dead")
GONE = ("dead", "restarting")  # out of service until a new process says hello


@dataclass
class WorkerHandle:
    """One worker: what it serves, its state, its engine's load and the jobs it holds."""

    identity: bytes
    worker_id: str
    engine: str
    model: str
    capacity: int
    device: str
    pid: int
    state: str  # loading | ready | draining | failing (paused by its breaker) | restarting | failed | dead
    last_seen: float
    load_time_s: float = 0.0
    active: int = 0
    error: str = ""
    features: frozenset[str] = frozenset()
    max_model_len: int = 0
    load: WorkerLoad = field(default_factory=WorkerLoad)
    breaker: Breaker = field(default_factory=Breaker)
    jobs: dict[str, Job] = field(default_factory=dict)
    batches_sent: int = 0
    jobs_done: int = 0
    jobs_failed: int = 0  # by its engine (not the client's fault), paused for or not
    last_failure: str = ""


class WorkerRegistry:
    """Every worker that said hello, by ZeroMQ identity."""

    def __init__(self, placement: Placement, metrics: Metrics) -> None:
        self.placement = placement
        self.metrics = metrics
        self.workers: dict[bytes, WorkerHandle] = {}
        # Every model a worker has served, kept after its workers are forgotten: a model with
        # no worker left must still show 0 ready workers, not vanish from the metrics.
        self.models_seen: set[str] = set()

    def by_id(self, worker_id: str) -> WorkerHandle | None:
        return self.workers.get(worker_id.encode())

    def ready(self, model: str) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.state == "ready" and w.model == model]

    def room(self, model: str) -> int:
        return sum(self.placement.room(w.load) for w in self.ready(model))

    def backlog_room(self, model: str) -> int:
        return sum(self.placement.backlog_room(w.load) for w in self.ready(model))

    def shown_state(self, worker: WorkerHandle) -> str:
        if worker.state == "ready" and not self.placement.room(worker.load):
            return "busy"
        return worker.state

    def models(self) -> list[str]:
        return sorted({w.model for w in self.workers.values() if w.state == "ready"})

    def features(self, model: str) -> frozenset[str]:
        """What every ready worker of `model` honours (so any of them may get the request)."""
        ready = self.ready(model)
        return frozenset.intersection(*(w.features for w in ready)) if ready else frozenset()

    def check_features(self, model: str, used: list[str]) -> None:
        """A 400 naming the first feature the model's engines cannot honour: never a silent drop."""
        honoured = self.features(model)
        missing = [name for name in used if name not in honoured]
        if missing:
            engines = sorted({w.engine for w in self.ready(model)})
            if missing[0] in ROUTES:
                served = ", ".join(r for r in ROUTES if r in honoured) or "nothing"
                raise BadRequest(f"model {model!r} does not serve {missing[0]} (its "
                                 f"{'/'.join(engines)} workers serve: {served})", param="model",
                                 code="unsupported_route")
            raise BadRequest(f"{missing[0]} is not supported by the {'/'.join(engines)} engine "
                             f"serving model {model!r}" + (f" (nor {', '.join(missing[1:])})"
                                                           if missing[1:] else ""),
                             param=missing[0], code="unsupported_parameter")

    def model_cards(self) -> list[dict[str, Any]]:
        """`/v1/models` entries: each served model with its context length and what it honours."""
        cards = []
        for model in self.models():
            ready = self.ready(model)
            honoured = self.features(model)
            cards.append({"id": model, "root": model,
                          "max_model_len": min(w.max_model_len for w in ready) or None,
                          "engines": sorted({w.engine for w in ready}),
                          "routes": [route for route in ROUTES if route in honoured],
                          "features": sorted(honoured - set(ROUTES))})
        return cards

    def check_model(self, model: str, endpoint: str) -> None:
        """Raise NotFound for a model nobody serves, NoWorkers when none of its workers is ready."""
        if self.ready(model):
            return
        if any(w.model == model for w in self.workers.values()):
            raise NoWorkers(self.why_unavailable(model))
        if not any(w.state == "ready" for w in self.workers.values()):
            raise NoWorkers("no worker is ready: start one with `python -m worker` "
                            f"(it connects to {endpoint})")
        raise NotFound(f"the model {model!r} does not exist; served here: "
                       f"{', '.join(self.models()) or 'none'}", param="model",
                       code="model_not_found")

    def why_unavailable(self, model: str) -> str:
        states = [w.state for w in self.workers.values() if w.model == model]
        if "restarting" in states:
            return (f"model {model!r} has no ready worker: {states.count('restarting')} worker(s) "
                    "are restarting their engine; retry shortly (GET /ready tells when)")
        if "loading" in states:
            return (f"model {model!r} is still loading on {states.count('loading')} worker(s); "
                    "retry shortly (GET /ready tells when)")
        if "failing" in states:
            errors = sorted({w.error for w in self.workers.values()
                             if w.model == model and w.state == "failing"})
            return (f"no ready worker serves model {model!r}: {states.count('failing')} worker(s) "
                    f"fail every request and are paused ({'; '.join(errors)}); retry shortly")
        return f"no ready worker serves model {model!r}: its {len(states)} worker(s) are dead or failed"

    def describe(self, now: float) -> list[dict[str, object]]:
        return [{
            "id": w.worker_id, "engine": w.engine, "model": w.model, "device": w.device,
            "state": self.shown_state(w), "capacity": w.capacity, "pid": w.pid,
            "load_time_s": round(w.load_time_s, 3), "jobs_in_flight": len(w.jobs),
            "engine_active": w.active, "running": w.load.running, "waiting": w.load.waiting,
            "unacknowledged": w.load.unacked, "kv_usage": round(w.load.kv_usage, 4),
            "prefix_hit_rate": round(w.load.prefix_hit_rate, 4),
            "prefixes": "reported" if w.load.reports_prefixes else "estimated",
            "prefixes_held": w.load.prefixes_held,  # as its engine reports
            "prefixes_counted": self.placement.holders.counts[w.identity],  # as placement sees
            "max_num_seqs": w.load.max_num_seqs,
            "max_num_batched_tokens": w.load.max_num_batched_tokens,
            "batches_sent": w.batches_sent, "jobs_done": w.jobs_done,
            "jobs_failed": w.jobs_failed, "last_failure": w.last_failure,
            "last_seen_s_ago": round(now - w.last_seen, 3), "error": w.error,
        } for w in self.workers.values()]

    def refresh_gauges(self) -> None:
        """Set the worker gauges from what the registry holds now; called when they are scraped,
        not on every message. The per-worker ones are cleared first: a forgotten worker leaves
        no series behind."""
        metrics = self.metrics
        counts = dict.fromkeys(STATES, 0)
        for gauge in metrics.per_worker:
            gauge.clear()
        for worker in self.workers.values():
            state = self.shown_state(worker)
            counts[state] += 1
            self._set_worker_gauges(worker, state)
        for state, count in counts.items():
            metrics.workers.labels(state).set(count)
        self.models_seen.update(worker.model for worker in self.workers.values())
        for model in self.models_seen:
            metrics.workers_ready.labels(model).set(len(self.ready(model)))

    def _set_worker_gauges(self, worker: WorkerHandle, state: str) -> None:
        metrics, labels = self.metrics, (worker.worker_id, worker.model)
        metrics.worker_state.labels(*labels, state).set(1)
        if worker.load_time_s:
            metrics.load_time.labels(*labels).set(worker.load_time_s)
        if worker.state in GONE:  # its engine's last report speaks of an engine that is gone
            return
        metrics.worker_running.labels(*labels).set(worker.load.running)
        metrics.worker_waiting.labels(*labels).set(worker.load.waiting)
        metrics.worker_kv_usage.labels(*labels).set(worker.load.kv_usage)
        metrics.worker_prefix_hit_rate.labels(*labels).set(worker.load.prefix_hit_rate)
        metrics.worker_prefixes_held.labels(*labels).set(worker.load.prefixes_held)
