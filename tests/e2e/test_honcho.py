"""`honcho start` itself, as the README runs it: the Procfile's front and two mock workers."""

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import openai
import trio

from harness.cluster import Cluster, engine_host


def test_honcho_start_serves_64_concurrent_openai_clients_without_a_window_wait(tmp_path):
    cluster = Cluster(tmp_path, MOCK_TOKEN_S="0.01", MOCK_TTFT_S="0.01")
    honcho = cluster.start_honcho()
    try:
        trio.run(cluster.wait_ready, 2)
        api = openai.OpenAI(base_url=cluster.url + "/v1", api_key=cluster.api_key, max_retries=0)

        def ask(i: int) -> str:
            reply = api.chat.completions.create(
                model="cohort-mock", messages=[{"role": "user", "content": f"question {i}"}])
            return reply.choices[0].message.content

        with ThreadPoolExecutor(64) as pool:
            answers = list(pool.map(ask, range(64), timeout=120))
        assert [a.rsplit(": ", 1)[1] for a in answers] == [f"question {i}" for i in range(64)]
        stats = openai.OpenAI(base_url=cluster.url, api_key=cluster.api_key).get(
            "/stats", cast_to=object)
        # the workers had room for all 64: none waited out the 0.1 s window in the front
        assert stats["queue"]["mean_wait_s"] < 0.02, stats["queue"]
        assert sum(w["jobs_done"] for w in stats["workers"]) == 64
        assert all(w["jobs_done"] > 0 for w in stats["workers"])  # both took a share
    finally:
        os.killpg(honcho.pid, signal.SIGINT)  # Ctrl-C, as a user stops it
        honcho.wait(30)
    text = (tmp_path / "honcho.log").read_text()
    assert "said bye" in text or "stopping" in text


def test_a_killed_engine_host_is_restarted_and_300_requests_all_succeed(tmp_path):
    """SIGKILL of an engine host mid-load under `honcho start`: its supervisor says bye for it
    (the front re-runs its requests on the other worker), starts a fresh host, and honcho, which
    stops everything when one of its processes exits, keeps running."""
    cluster = Cluster(tmp_path, MOCK_TOKEN_S="0.01", MOCK_TTFT_S="0.01",
                      COHORT_RESTART_BACKOFF_S="0.2", COHORT_WORKER_TIMEOUT_S="10")
    honcho = cluster.start_honcho()
    try:
        trio.run(cluster.wait_ready, 2)
        api = openai.OpenAI(base_url=cluster.url + "/v1", api_key=cluster.api_key, max_retries=0,
                            timeout=60)
        first_host = engine_host(honcho.pid, "worker1")

        def ask(i: int) -> int:
            if i == 100:  # a third of the way in, with requests in flight on both workers
                os.kill(first_host, signal.SIGKILL)
            reply = api.completions.create(model="cohort-mock", prompt=f"question {i}",
                                           max_tokens=16)
            return reply.usage.completion_tokens

        with ThreadPoolExecutor(32) as pool:
            tokens = list(pool.map(ask, range(300), timeout=180))
        assert len(tokens) == 300 and all(tokens)  # every one answered
        assert honcho.poll() is None  # the deployment lives on
        health = trio.run(cluster.wait_ready, 2, 30)  # the killed worker is back, same id
        assert sorted(w["id"] for w in health["workers"] if w["state"] == "ready") == [
            "worker1", "worker2"]
        assert engine_host(honcho.pid, "worker1") != first_host
    finally:
        os.killpg(honcho.pid, signal.SIGINT)
        honcho.wait(30)
    assert "restart 1" in (tmp_path / "honcho.log").read_text()


def test_a_dot_env_in_the_checkout_does_not_steer_the_tests(tmp_path):
    """The README advises a `.env` for settings, and honcho reads it: a developer's (here one
    that moves the front's port) must not reach the harness's `honcho start`."""
    from harness.cluster import ROOT
    dot_env = ROOT / ".env"
    if dot_env.exists():  # a developer's own: leave it alone, it is exactly the case tested
        return
    cluster = Cluster(tmp_path, MOCK_TOKEN_S="0", MOCK_TTFT_S="0")
    dot_env.write_text("COHORT_PORT=1\nCOHORT_ZMQ_BIND=tcp://127.0.0.1:1\n")
    try:
        honcho = cluster.start_honcho()
        try:
            trio.run(cluster.wait_ready, 2)  # on the harness's port, with its workers
        finally:
            os.killpg(honcho.pid, signal.SIGINT)
            honcho.wait(30)
    finally:
        dot_env.unlink()
