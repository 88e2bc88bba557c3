"""`honcho start` itself, as the README runs it: the Procfile's front and two mock workers."""

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import openai
import trio

from tests.e2e.cluster import ROOT, Cluster


def test_honcho_start_serves_64_concurrent_openai_clients_without_a_window_wait(tmp_path):
    cluster = Cluster(tmp_path, MOCK_TOKEN_S="0.01", MOCK_TTFT_S="0.01")
    cluster.api_key = cluster.add_user("alice")
    log = open(tmp_path / "honcho.log", "wb")
    honcho = subprocess.Popen([sys.executable, "-m", "honcho", "start"], cwd=ROOT, env=cluster.env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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
