"""Shutting down without cutting anyone off: SIGTERM to the front, Ctrl-C on `honcho start`."""

import os
import signal

import httpx
import trio

from harness.cluster import Cluster

MODEL = "cohort-mock"
SLOW = {"MOCK_TOKEN_S": "0.1", "MOCK_TTFT_S": "0"}  # 10 tokens a second per stream


async def streams(cluster, count: int, tokens: int, started: trio.Event) -> list[str]:
    """`count` streamed completions of exactly `tokens` tokens; `started` is set once every one
    has its first event. Returns each whole response body."""
    bodies: list[str] = []
    first = 0
    async with httpx.AsyncClient(timeout=60, headers=cluster.headers(),
                                 limits=httpx.Limits(max_connections=count)) as http:
        async def one(i: int) -> None:
            nonlocal first
            text = ""
            async with http.stream("POST", cluster.url + "/v1/completions", json={
                    "model": MODEL, "prompt": f"stream {i}", "max_tokens": tokens,
                    "ignore_eos": True, "stream": True}) as response:
                async for chunk in response.aiter_text():
                    if not text:
                        first += 1
                        if first == count:
                            started.set()
                    text += chunk
            bodies.append(text)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(count):
                    nursery.start_soon(one, i)
    return bodies


async def sigterm_mid_streams(cluster, count: int, tokens: int) -> list[str]:
    """Start a front and a worker, `count` streams, and SIGTERM the front once all have begun
    (to its process group, as honcho does); the streams' bodies."""
    cluster.start_front()
    cluster.start_worker("worker1")
    cluster.api_key = cluster.add_user("ops")
    await cluster.wait_ready(1)
    started, bodies = trio.Event(), []

    async def run() -> None:
        bodies.extend(await streams(cluster, count, tokens, started))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await started.wait()
        cluster.signal("front", signal.SIGTERM)
    return bodies


async def test_sigterm_lets_30_streams_of_12_s_finish(make_cluster):
    """The issue's case: hypercorn's own 3 s graceful timeout cut all 30 of them."""
    cluster = make_cluster(**SLOW)
    bodies = await sigterm_mid_streams(cluster, 30, 120)
    assert len(bodies) == 30
    cut = [body[-300:] for body in bodies if not body.endswith("data: [DONE]\n\n") or '"error"' in body]
    assert not cut, cut
    assert all(body.count('"text":') == 120 for body in bodies)  # every token arrived
    assert "SIGTERM: draining" in cluster.log("front")


async def test_streams_past_the_drain_time_end_with_an_error_event_and_done(make_cluster):
    cluster = make_cluster(COHORT_DRAIN_TIMEOUT_S="0.5", **SLOW)
    bodies = await sigterm_mid_streams(cluster, 5, 60)  # 6 s each: past the drain
    assert len(bodies) == 5
    for body in bodies:  # never a bare cut
        assert '"code":"draining"' in body and body.endswith("data: [DONE]\n\n")


def test_ctrl_c_on_honcho_start_completes_the_streams_in_flight(tmp_path):
    """Every process gets SIGINT at once: the front drains, the workers finish their jobs (honcho
    kills what still runs 5 s later, so these streams take about 1 s)."""
    cluster = Cluster(tmp_path, **SLOW)
    honcho = cluster.start_honcho()
    bodies: list[str] = []

    async def main() -> None:
        await cluster.wait_ready(2)
        started = trio.Event()

        async def run() -> None:
            bodies.extend(await streams(cluster, 20, 10, started))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await started.wait()
            os.killpg(honcho.pid, signal.SIGINT)  # Ctrl-C

    try:
        trio.run(main)
    finally:
        if honcho.poll() is None:
            os.killpg(honcho.pid, signal.SIGINT)
        honcho.wait(30)
    assert len(bodies) == 20
    cut = [body[-300:] for body in bodies if not body.endswith("data: [DONE]\n\n") or '"error"' in body]
    assert not cut, cut
