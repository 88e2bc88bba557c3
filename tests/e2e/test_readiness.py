"""The harness's readiness waits against real workers whose load will not succeed: the wait ends
as soon as the worker says so, with the worker's last log lines, not at its deadline."""

import os
import signal
import time

import pytest
import trio

from harness.cluster import engine_host
from worker.models import default_model_path

DEADLINE_S = 120  # what the waits below are given; they must end long before it


def test_an_engine_host_killed_while_loading_ends_the_wait_at_once(make_cluster):
    """SIGKILL of the host mid-load, as the OOM killer sends it: the supervisor's bye makes the
    worker `restarting` before it ever served, and the wait stops there."""
    cluster = make_cluster(MOCK_LOAD_S="5")
    cluster.start_front()
    cluster.start_worker("worker1")
    cluster.api_key = cluster.add_user("alice")
    trio.run(cluster.wait_for, lambda h: [w["state"] for w in h["workers"]] == ["loading"],
             "worker1 loading")
    os.kill(engine_host(cluster.procs["worker1"].pid, "worker1"), signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(AssertionError) as failure:
        trio.run(cluster.wait_ready, 1, DEADLINE_S)
    assert time.monotonic() - started < 15
    message = str(failure.value)
    assert "worker worker1: its engine host died while loading" in message
    assert "status -9" in message and "OOM killer" in message
    assert "engine host exited with status -9" in message.split("its log:")[1]  # its own log


@pytest.mark.vllm
def test_a_vllm_load_that_fails_ends_the_wait_at_once_with_vllms_words(make_cluster):
    """A context longer than the model's: vLLM refuses it while loading; nothing is allocated."""
    cluster = make_cluster(COHORT_ENGINE="vllm", COHORT_MAX_MODEL_LEN="99999999",
                           COHORT_MODEL=os.environ.get("COHORT_MODEL") or default_model_path())
    cluster.start_front()
    cluster.start_worker("worker1")
    cluster.api_key = cluster.add_user("alice")
    started = time.monotonic()
    with pytest.raises(AssertionError) as failure:
        trio.run(cluster.wait_workers_ready, ["worker1"], DEADLINE_S)
    assert time.monotonic() - started < DEADLINE_S / 2
    message = str(failure.value)
    assert "worker worker1: its load failed: model load failed:" in message
    assert "99999999" in message.split("its log:")[1]  # vLLM's own error, from the worker's log
