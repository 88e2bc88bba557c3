"""The priority a request carries into its engine's queue: tier first, then its tenant's share."""

from server.jobs import Job, JobSpec
from server.scheduling.engine_priority import BATCH_TIER, engine_priorities


def job(tenant: str, tier: str = "interactive", weight: float = 1.0) -> Job:
    spec = JobSpec("m", "completions", {}, tenant=tenant, tier=tier, weight=weight)
    return Job(spec, enqueued_at=0.0, deadline=1.0)


def test_a_tenant_with_few_requests_held_overtakes_one_with_many():
    held = [job("a") for _ in range(10)] + [job("b")]
    assert engine_priorities([job("a"), job("b"), job("b")], held) == [10, 1, 2]


def test_finished_jobs_do_not_count_and_weight_divides_the_share():
    done = job("a")
    done.state = "done"
    held = [done] + [job("heavy", weight=4.0) for _ in range(8)]
    assert engine_priorities([job("a"), job("heavy", weight=4.0)], held) == [0, 2]


def test_batch_work_waits_behind_any_interactive_request():
    held = [job("a") for _ in range(500)]
    [interactive, batch] = engine_priorities([job("a"), job("b", tier="batch")], held)
    assert interactive < BATCH_TIER <= batch
