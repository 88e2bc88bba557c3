"""Connections are a bounded resource: idle keep-alive connections close, and a front full of
connections still answers a new client (the front as the Procfile runs it, over real sockets)."""

import httpx
import trio

from harness.connections import (hold_idle, one_health_request,
                                 start_short_of_descriptors, started)

async def test_an_idle_keep_alive_connection_is_closed(make_cluster):
    cluster = make_cluster(COHORT_KEEP_ALIVE_S="0.5")
    await started(cluster)
    stream = await one_health_request(cluster.port)
    with trio.fail_after(10):  # hypercorn alone kept it open for good
        assert await stream.receive_some(100) == b""


async def test_two_thousand_idle_connections_do_not_stop_a_new_request(make_cluster):
    """With 1,024 descriptors (a common default) and a keep-alive longer than the test, the bound
    alone makes room: each new connection past it closes the oldest idle one."""
    cluster = make_cluster(COHORT_KEEP_ALIVE_S="600")
    await start_short_of_descriptors(cluster)
    idle = await hold_idle(cluster, 2000)
    assert len(idle) == 2000
    async with httpx.AsyncClient(timeout=10, headers=cluster.headers()) as http:
        response = await http.post(cluster.url + "/v1/completions", json={
            "model": "cohort-mock", "prompt": "still here", "max_tokens": 4})
    assert response.status_code == 200, response.text
    for stream in idle:
        await stream.aclose()


async def test_a_front_full_of_busy_connections_refuses_with_a_503_and_keeps_them(make_cluster):
    cluster = make_cluster(COHORT_MAX_CONNECTIONS="3", MOCK_TOKEN_S="0.05")
    await started(cluster)
    cluster.start_worker("worker1")
    cluster.api_key = cluster.add_user("alice")
    await cluster.wait_ready(1)
    streaming, bodies, begun = trio.Event(), [], []

    async def stream_one(http: httpx.AsyncClient) -> None:
        async with http.stream("POST", cluster.url + "/v1/completions", json={
                "model": "cohort-mock", "prompt": "busy", "max_tokens": 40, "ignore_eos": True,
                "stream": True}) as response:
            text = ""
            async for chunk in response.aiter_text():
                if not text:
                    begun.append(1)
                    if len(begun) == 3:
                        streaming.set()
                text += chunk
            bodies.append(text)

    async with trio.open_nursery() as nursery:
        clients = [httpx.AsyncClient(timeout=30, headers=cluster.headers()) for _ in range(3)]
        for http in clients:
            nursery.start_soon(stream_one, http)
        await streaming.wait()
        async with httpx.AsyncClient(timeout=10) as http:
            refused = await http.get(cluster.url + "/health")
    for http in clients:
        await http.aclose()
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "too_many_connections"
    assert len(bodies) == 3 and all(body.endswith("data: [DONE]\n\n") for body in bodies)


async def test_connection_close_clients_that_never_close_are_closed_and_crowd_no_one_out(
        make_cluster):
    """Each asks for `Connection: close` and then just holds its socket. The front closes
    every one after its answer (it kept them open for good, counted busy, so 100 of them made
    every new client a 503 at COHORT_MAX_CONNECTIONS=100), and a new client is served."""
    cluster = make_cluster(COHORT_MAX_CONNECTIONS="20", COHORT_KEEP_ALIVE_S="600")
    await started(cluster)
    held = [await one_health_request(cluster.port, close=True) for _ in range(60)]
    with trio.fail_after(10):
        for stream in held:
            while await stream.receive_some(65536):
                pass  # the rest of the answer, then the front's end of the stream
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(cluster.url + "/health")).status_code == 200
    for stream in held:
        await stream.aclose()


async def test_a_413_is_followed_by_the_close_it_announces(make_cluster):
    """The body is left unread, so the connection cannot serve another request: the front says
    `connection: close` and closes it at once (it stayed open about 15 s)."""
    cluster = make_cluster()
    await started(cluster)
    key = cluster.add_user("alice")
    stream = await trio.open_tcp_stream("127.0.0.1", cluster.port)
    await stream.send_all(b"POST /v1/completions HTTP/1.1\r\nHost: cohort\r\n"
                          b"Authorization: Bearer " + key.encode() + b"\r\n"
                          b"Content-Type: application/json\r\nContent-Length: 9000000\r\n\r\n"
                          + b"x" * 65536)
    received = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 413") and b"connection: close" in received.lower(), received[:200]
    await stream.aclose()
