"""The workers' gauges, set from the registry when `/metrics` is scraped: each worker's state and
its engine's last report, ready workers per model, and no series left by a worker forgotten."""

from common.protocol import EngineLoad
from server.metrics import Metrics
from server.scheduling.placement import Placement
from server.workers.registry import WorkerHandle, WorkerRegistry


def registry(*workers: tuple[str, str, str]) -> WorkerRegistry:
    """A registry of (id, model, state) workers, with no sockets behind them."""
    held = WorkerRegistry(Placement(max_unacked_batches=4), Metrics())
    for worker_id, model, state in workers:
        held.workers[worker_id.encode()] = WorkerHandle(worker_id.encode(), worker_id, "mock",
                                                        model, 8, "cpu", 1, state, 0.0)
    return held


def value(held: WorkerRegistry, name: str, **labels: str) -> float | None:
    return held.metrics.registry.get_sample_value(name, labels)


def test_each_worker_shows_its_state_and_its_engines_last_report():
    held = registry(("w1", "m1", "ready"), ("w2", "m1", "failing"))
    w1 = held.by_id("w1")
    assert w1 is not None
    w1.load.report(EngineLoad(running=3, waiting=2, kv_usage=0.5, prefix_hit_rate=0.25,
                              max_num_seqs=8, prefixes_held=7))
    w1.load_time_s = 4.5
    held.refresh_gauges()
    w1_labels = {"worker": "w1", "model": "m1"}
    assert value(held, "cohort_worker_state", **w1_labels, state="ready") == 1
    assert value(held, "cohort_worker_state", worker="w2", model="m1", state="failing") == 1
    assert value(held, "cohort_worker_running", **w1_labels) == 3
    assert value(held, "cohort_worker_waiting", **w1_labels) == 2
    assert value(held, "cohort_worker_kv_usage", **w1_labels) == 0.5
    assert value(held, "cohort_worker_prefix_hit_rate", **w1_labels) == 0.25
    assert value(held, "cohort_worker_prefixes_held", **w1_labels) == 7
    assert value(held, "cohort_model_load_seconds", **w1_labels) == 4.5
    assert value(held, "cohort_workers", state="failing") == 1

    w1.load.report(EngineLoad(running=8, waiting=5, max_num_seqs=8))  # no room: busy
    held.refresh_gauges()
    assert value(held, "cohort_worker_state", **w1_labels, state="busy") == 1
    assert value(held, "cohort_worker_state", **w1_labels, state="ready") is None  # one state


def test_a_gone_worker_keeps_its_state_but_not_its_engines_load_and_a_forgotten_one_leaves_nothing():
    held = registry(("w1", "m1", "ready"), ("w2", "m1", "ready"))
    held.refresh_gauges()
    held.workers[b"w1"].state = "dead"
    del held.workers[b"w2"]  # pruned, as the lifecycle forgets gone workers
    held.refresh_gauges()
    assert value(held, "cohort_worker_state", worker="w1", model="m1", state="dead") == 1
    assert value(held, "cohort_worker_state", worker="w1", model="m1", state="ready") is None
    assert value(held, "cohort_worker_running", worker="w1", model="m1") is None
    assert [sample.labels["worker"] for metric in held.metrics.per_worker
            for family in metric.collect() for sample in family.samples] == ["w1"]


def test_ready_workers_per_model_stay_at_zero_after_the_last_worker_is_forgotten():
    held = registry(("w1", "m1", "ready"), ("w2", "m1", "failing"), ("w3", "m2", "ready"),
                    ("w4", "m2", "ready"))
    held.refresh_gauges()
    assert value(held, "cohort_workers_ready", model="m1") == 1
    assert value(held, "cohort_workers_ready", model="m2") == 2
    held.workers[b"w1"].state = "dead"
    for gone in (b"w3", b"w4"):
        del held.workers[gone]
    held.refresh_gauges()
    assert value(held, "cohort_workers_ready", model="m1") == 0  # what CohortNoReadyWorker
    assert value(held, "cohort_workers_ready", model="m2") == 0  # watches: never vanishes
