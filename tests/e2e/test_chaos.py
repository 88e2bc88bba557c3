"""Chaos: engine hosts, whole workers and the front SIGKILLed at random moments under load.

Every request must end in one of three ways: a whole answer; a clear error (an OpenAI error body,
or a stream that ends with an error event and `[DONE]`); or, only for a request that was on a
front when it was killed or was sent while it was down, a broken connection. Every async task
accepted must finish with one outcome: none lost, none stuck. The seed is random and printed
(COHORT_CHAOS_SEED replays one).
"""

import os
import random

from harness.chaos import ENV, FINAL, run_chaos, start


async def test_random_kills_under_load_lose_no_request_and_no_task(make_cluster):
    seed = int(os.environ.get("COHORT_CHAOS_SEED") or random.randrange(1 << 30))
    cluster = make_cluster(**ENV)
    await start(cluster)
    run = await run_chaos(cluster, seed, seconds=20)
    story = run.story()
    print(story, {kind: run.count(kind) for kind in ("answer", "error", "cut")},
          {status: sum(t["status"] == status for t in run.finals.values()) for status in FINAL})
    bad = [o.detail for o in run.outcomes if o.kind == "bad"]
    assert not bad, (story, bad[:3])
    assert not run.unexplained_cuts(), (story, run.unexplained_cuts()[:3])
    assert run.count("answer") > len(run.outcomes) / 2, story
    assert run.after_status == 200, story
    assert len(run.finals) == len(run.tasks) == len(set(run.tasks)), story  # none stuck
    for task in run.finals.values():  # one outcome each: a result, or an error that says why
        assert (task["status"] == "completed" and task["result"]["choices"]) or (
            task["status"] == "failed" and task["error"]["message"]), (story, task)
