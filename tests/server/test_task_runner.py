"""Tasks a front takes over, counted by why their lease was free: the front that ran them
stopped without a word (its lease lapsed), or handed them back as it drained. No sockets: the
store is a stand-in and the clock virtual."""

from types import SimpleNamespace

import trio

from common.config import ServerSettings
from server.metrics import Metrics
from server.store import Claimed
from server.task_runner import MAX_TASK_ATTEMPTS, TaskRunner


class LapsedTasks:
    """A store that has tasks to take over at the first claim, and nothing after."""

    def __init__(self, claimed: list[Claimed]) -> None:
        self.claimed = claimed
        self.finished: list[str] = []

    async def run(self, fn, *args):
        return fn(*args)

    def claim_lapsed(self, *_) -> list[Claimed]:
        claimed, self.claimed = self.claimed, []
        return claimed

    def task_finished(self, task_id: str, *_) -> bool:
        self.finished.append(task_id)
        return True

    def purge_tasks(self, *_) -> int:
        return 0

    def purge_expired_tokens(self, *_) -> None:
        pass

    def purge_stalled_uploads(self, *_) -> None:
        pass


async def test_takeovers_are_counted_by_whether_the_lease_lapsed_or_was_handed_back(
        autojump_clock):
    # tasks out of attempts: taken over and quarantined, so nothing else is needed to run them
    store = LapsedTasks([Claimed(f"t{i}", 1, "chat", {}, MAX_TASK_ATTEMPTS, 0, lapsed)
                         for i, lapsed in enumerate((True, True, False))])
    metrics = Metrics()
    gateway = SimpleNamespace(settings=ServerSettings(), metrics=metrics,
                              dispatcher=SimpleNamespace(front_id="front-b"))
    runner = TaskRunner(gateway, store, lifecycle=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)  # the first takeover is done before it is started
        nursery.cancel_scope.cancel()
    assert store.finished == ["t0", "t1", "t2"]
    counted = {cause: metrics.registry.get_sample_value("cohort_lease_takeovers_total",
                                                        {"what": "task", "cause": cause})
               for cause in ("lease_lapsed", "handed_back")}
    assert counted == {"lease_lapsed": 2, "handed_back": 1}
