"""The harness's readiness waits against a scripted /health and stand-in processes: no sockets,
on trio's mock clock, so "at once" is exact (the poll that sees a failure raises) and a wait
that would run to its deadline costs nothing."""

import pytest
import trio

from harness.cluster import Cluster

POLL_S = 0.05  # the waits' poll period


class Process:
    """A stand-in for a Popen: running until `code` is set."""

    def __init__(self, pid: int, code: int | None = None) -> None:
        self.pid, self.returncode = pid, code

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        assert self.returncode is not None
        return self.returncode


def worker(id_: str, state: str, error: str = "") -> dict:
    return {"id": id_, "state": state, "error": error}


@pytest.fixture
def cluster(tmp_path):
    cluster = Cluster(tmp_path)
    cluster.procs = {"front": Process(1), "worker1": Process(2), "worker2": Process(3)}
    (tmp_path / "worker1.log").write_text("".join(f"worker1 line {i}\n" for i in range(1, 101)))
    return cluster


def script(cluster, *answers):
    """/health answers these in turn, then the last one for ever; returns the calls made."""
    calls = []

    async def health(url=None):  # as Cluster.health: the first front, or the one at `url`
        calls.append(trio.current_time())
        return answers[min(len(calls), len(answers)) - 1]

    cluster.health = health
    return calls


async def test_a_failed_load_ends_the_wait_at_the_poll_that_sees_it(cluster, autojump_clock):
    loading = {"workers": [worker("worker1", "loading"), worker("worker2", "ready")]}
    failed = {"workers": [worker("worker1", "failed", "model load failed: ValueError: "
                                 "max_model_len 99999999 is too long"), worker("worker2", "ready")]}
    calls = script(cluster, loading, loading, failed)
    with pytest.raises(AssertionError) as failure:
        await cluster.wait_ready(2, timeout_s=600)
    assert len(calls) == 3 and trio.current_time() == pytest.approx(2 * POLL_S)
    message = str(failure.value)
    assert "worker worker1: its load failed: model load failed: ValueError: max_model_len" in message
    assert "worker1 line 100" in message and "worker1 line 61\n" in message  # the last 40 lines
    assert "worker1 line 60\n" not in message


async def test_a_host_killed_while_loading_ends_the_wait(cluster, autojump_clock):
    killed = {"workers": [worker("worker1", "restarting", "said bye: engine host exited with "
                                 "status -9; restart 1 in 1 s"), worker("worker2", "loading")]}
    script(cluster, killed)
    with pytest.raises(AssertionError, match="died while loading .*status -9.*OOM killer"):
        await cluster.wait_workers_ready(["worker1", "worker2"], timeout_s=600)
    assert trio.current_time() == 0


async def test_a_worker_restarting_after_it_served_is_waited_for(cluster, autojump_clock):
    ready = {"workers": [worker("worker1", "ready"), worker("worker2", "ready")]}
    restarting = {"workers": [worker("worker1", "restarting", "said bye: engine died"),
                              worker("worker2", "ready")]}
    script(cluster, ready)
    await cluster.wait_ready(2)
    calls = script(cluster, restarting, restarting, {"workers": [worker("worker1", "loading"),
                                                                 worker("worker2", "ready")]},
                   ready)
    assert await cluster.wait_ready(2) == ready and len(calls) == 4


async def test_a_worker_process_that_exits_unasked_ends_the_wait(cluster, autojump_clock):
    calls = script(cluster, None, None)  # the front does not answer yet
    cluster.procs["worker1"].returncode = 1
    with pytest.raises(AssertionError, match=r"worker1 exited with status 1; its log:\n"
                                             r"worker1 line 61\n"):
        await cluster.wait_ready(2, timeout_s=600)
    assert len(calls) == 1


async def test_a_process_the_test_stopped_does_not_end_the_wait(cluster, autojump_clock):
    cluster.procs["worker2"].returncode = -9
    cluster.wait_exit("worker2")  # the test stopped it: that exit is expected
    calls = script(cluster, {"workers": []}, {"workers": [worker("worker1", "ready")]})
    await cluster.wait_ready(1)
    assert len(calls) == 2


async def test_a_wait_that_runs_out_names_the_workers_states(cluster, autojump_clock):
    script(cluster, {"workers": [worker("worker1", "loading"), worker("worker2", "dead",
                                                                      "silent for over 2 s")]})
    with pytest.raises(AssertionError, match="timed out after 30 s waiting for workers worker1, "
                                             "worker2 ready; workers: worker1 loading; worker2 dead "
                                             "silent for over 2 s; front log"):
        await cluster.wait_workers_ready(["worker1", "worker2"], timeout_s=30)
    assert trio.current_time() == pytest.approx(30)


async def test_named_workers_are_waited_for_not_a_count(cluster, autojump_clock):
    others = {"workers": [worker("worker1", "ready"), worker("other", "ready"),
                          worker("embedder", "loading")]}
    both = {"workers": [worker("worker1", "ready"), worker("other", "ready"),
                        worker("embedder", "ready")]}
    calls = script(cluster, others, others, both)
    assert await cluster.wait_workers_ready(["worker1", "embedder"]) == both and len(calls) == 3


async def test_a_generic_wait_may_wait_for_a_failure(cluster, autojump_clock):
    """wait_for knows nothing of what it waits for: a failed worker may be just that."""
    failed = {"workers": [worker("worker1", "failed", "model load failed")]}
    script(cluster, failed)
    assert await cluster.wait_for(lambda h: h["workers"][0]["state"] == "failed", "failed") == failed
