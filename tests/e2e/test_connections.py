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


async def test_a_stream_nobody_reads_is_bounded_then_stopped_with_the_engines_work_freed(
        make_cluster):
    """A client starts a large stream (16 choices of 8,192 tokens) and reads nothing. Once the
    kernel's socket buffers are full the front holds at most COHORT_STREAM_BUFFER_BYTES of its
    events; then the engine's request is aborted and the stream ends, after what was held, with
    an error event naming the cause (the front buffered 7.3 MB a minute for such a client)."""
    cluster = make_cluster(COHORT_STREAM_BUFFER_BYTES="65536", MOCK_TOKEN_S="0.0005",
                           MOCK_TTFT_S="0")
    await started(cluster)
    cluster.start_worker("worker1")
    cluster.api_key = cluster.add_user("alice")
    await cluster.wait_ready(1)
    body = (b'{"model": "cohort-mock", "prompt": "go", "max_tokens": 8192, "n": 16, '
            b'"ignore_eos": true, "stream": true}')
    stream = await trio.open_tcp_stream("127.0.0.1", cluster.port)
    await stream.send_all(b"POST /v1/completions HTTP/1.1\r\nHost: cohort\r\n"
                          b"Authorization: Bearer " + cluster.api_key.encode() + b"\r\n"
                          b"Content-Type: application/json\r\nContent-Length: "
                          + str(len(body)).encode() + b"\r\n\r\n" + body)
    with trio.fail_after(60):  # the socket buffers fill, then the front's: the job is stopped
        while not ((health := await cluster.health()) and health["workers"][0]["engine_active"]
                   == 0 and httpx.get(cluster.url + "/stats",
                                      headers=cluster.headers()).json()["aborts"] >= 1):
            await trio.sleep(0.2)
    received = b""
    with trio.fail_after(30):
        while chunk := await stream.receive_some(1 << 20):
            received += chunk
            if received.endswith(b"data: [DONE]\n\n") or received.endswith(b"0\r\n\r\n"):
                break
    assert b'"code":"client_too_slow"' in received and b"data: [DONE]" in received
    assert len(received) < 16 * 8192 * 100  # it stopped long before the whole answer
    await stream.aclose()


async def test_clients_dripping_their_bodies_are_served_without_a_traceback(make_cluster):
    """300 clients connect at once and send their bodies 20 bytes every 0.2 s: each is
    answered, and the front logs no traceback for this ordinary behaviour."""
    cluster = make_cluster()
    await started(cluster)
    cluster.start_worker("worker1")
    key = cluster.add_user("alice")
    await cluster.wait_ready(1)
    body = b'{"model": "cohort-mock", "prompt": "' + b"x" * 100 + b'", "max_tokens": 4}'
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: cohort\r\nAuthorization: Bearer "
            + key.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n")
    answers: list[bytes] = []

    async def drip() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", cluster.port)
        await stream.send_all(head)
        for start in range(0, len(body), 20):
            await stream.send_all(body[start:start + 20])
            await trio.sleep(0.2)
        answers.append(await stream.receive_some(65536))
        await stream.aclose()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(300):
                nursery.start_soon(drip)
    assert [answer[:12] for answer in answers] == [b"HTTP/1.1 200"] * 300
    assert "Traceback" not in cluster.log("front")


async def open_connections(cluster) -> dict[str, float]:
    answer = httpx.get(cluster.url + "/metrics", headers=cluster.headers(), timeout=10)
    assert answer.status_code == 200, answer.text
    metrics = answer.text
    return {state: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
            for state in ("busy", "idle") if line.startswith(f'cohort_connections{{state="{state}"}}')}


async def test_connections_closed_before_a_request_leave_nothing_behind(make_cluster):
    """Slowloris clients cut at the keep-alive bound, and clients that connect and leave: the
    front forgets each connection once it is closed (hypercorn's first idle timer had kept each
    one's task, and what it held, until the server stopped)."""
    cluster = make_cluster(COHORT_KEEP_ALIVE_S="0.5")
    await started(cluster)
    cluster.api_key = cluster.add_user("alice")  # /metrics asks for a key
    streams = [await trio.open_tcp_stream("127.0.0.1", cluster.port) for _ in range(40)]
    for stream in streams[:20]:
        await stream.send_all(b"GET /health HTTP/1.1\r\n")  # a head never finished
    for stream in streams[20:]:
        await stream.aclose()  # connected, then gone
    with trio.fail_after(10):
        for stream in streams[:20]:  # each cut by the front
            assert await stream.receive_some(100) == b""
    with trio.fail_after(10):  # the scrape's own connection is the one left
        while await open_connections(cluster) != {"busy": 1.0, "idle": 0.0}:
            await trio.sleep(0.05)
