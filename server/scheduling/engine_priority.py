"""The priority a request carries into its engine's own queue, so that fair shares and tiers hold
there too, not only in the front's queue.

vLLM's `priority` scheduling policy (which a vLLM worker runs, and the mock mirrors) starts the
waiting request of lowest priority first, ties by arrival; when its KV cache runs out it preempts
the running request of highest priority. A request's priority is its tier (batch far behind
interactive) plus how many requests its tenant already holds on that worker, divided by the
tenant's weight: a tenant with a few requests in flight overtakes, in the engine's queue, a tenant
with hundreds, however long those have waited.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence

from server.jobs import Job

BATCH_TIER = 1 << 20  # above any count of requests one tenant holds on one engine


def engine_priorities(jobs: Sequence[Job], held: Iterable[Job]) -> list[int]:
    """The priority of each of `jobs`, sent together to a worker that holds `held` already."""
    counts = collections.Counter(job.spec.tenant for job in held if not job.finished)
    priorities = []
    for job in jobs:
        share = min(int(counts[job.spec.tenant] / max(job.spec.weight, 1e-3)), BATCH_TIER - 1)
        priorities.append((BATCH_TIER if job.spec.tier == "batch" else 0) + share)
        counts[job.spec.tenant] += 1
    return priorities
