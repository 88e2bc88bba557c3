"""The front's verdict on silent workers, under trio's MockClock: a worker silent past
`worker_timeout_s` is dead, but not because the front itself stopped running for a while."""

import trio
import trio.testing

from common.config import ServerSettings
from server.dispatch import Dispatcher
from server.metrics import Metrics
from server.workers import WorkerHandle


def dispatcher_with_a_worker() -> tuple[Dispatcher, WorkerHandle]:
    dispatcher = Dispatcher(ServerSettings(worker_timeout_s=2.0), Metrics())
    worker = WorkerHandle(b"w1", "w1", "mock", "m", 8, "cpu", 1, "ready", trio.current_time())
    dispatcher.workers[worker.identity] = worker
    return dispatcher, worker


async def test_a_worker_silent_past_the_timeout_is_dead(autojump_clock):
    dispatcher, worker = dispatcher_with_a_worker()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dispatcher._liveness_loop)
        await trio.sleep(1.9)
        assert worker.state == "ready"
        await trio.sleep(0.7)
        assert worker.state == "dead" and "silent" in worker.error
        nursery.cancel_scope.cancel()


async def pass_time(clock, seconds: float) -> None:
    """Let `seconds` pass at once, then let every task woken by it take its turn."""
    clock.jump(seconds)
    await trio.testing.wait_all_tasks_blocked()


async def test_a_front_that_stalled_reads_its_heartbeats_before_it_judges(mock_clock):
    dispatcher, worker = dispatcher_with_a_worker()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dispatcher._liveness_loop)
        await trio.testing.wait_all_tasks_blocked()  # it sleeps until its first round
        await pass_time(mock_clock, 5)  # the front did not run for 5 s (blocked, or no CPU)
        assert worker.state == "ready"  # the liveness loop looked, the heartbeats still unread
        worker.last_seen = trio.current_time()  # the receive loop reads them
        await pass_time(mock_clock, 0.5)
        assert worker.state == "ready"
        worker.last_seen -= 10  # now really silent: judged at the next round
        await pass_time(mock_clock, 0.5)
        assert worker.state == "dead"
        nursery.cancel_scope.cancel()


async def test_a_front_late_every_round_still_finds_a_dead_worker(mock_clock):
    dispatcher, worker = dispatcher_with_a_worker()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dispatcher._liveness_loop)
        await trio.testing.wait_all_tasks_blocked()
        await pass_time(mock_clock, 5)
        assert worker.state == "ready"  # one late round waits for the socket to be read
        await pass_time(mock_clock, 5)
        assert worker.state == "dead"  # the next, late as well, judges: it was read meanwhile
        nursery.cancel_scope.cancel()
