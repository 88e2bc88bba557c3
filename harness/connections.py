"""Raw-socket clients of a front: one request left open, idle keep-alive connections held, a
front started short of file descriptors."""

import trio

from harness.cluster import procfile

HEALTH = b"GET /health HTTP/1.1\r\nHost: cohort\r\n\r\n"


async def one_health_request(port: int, close: bool = False) -> trio.SocketStream:
    """A connection that made one request and was left open, as keep-alive clients leave them
    (`close`: one that asked for `Connection: close`, and still does not close its end)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(HEALTH.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
                          if close else HEALTH)
    received = b""
    while not _whole(received):
        chunk = await stream.receive_some(65536)
        assert chunk, f"the front closed before answering: {received!r}"
        received += chunk
    assert received.startswith(b"HTTP/1.1 200"), received
    return stream


def _whole(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


async def started(cluster, front_command: str | None = None, **env: str) -> None:
    if front_command:
        cluster._spawn("front", front_command, **env)
    else:
        cluster.start_front(**env)
    await cluster.wait_for(lambda health: True, "the front")


async def start_short_of_descriptors(cluster) -> None:
    """A front with 1,024 descriptors (a common default), a worker and a user."""
    await started(cluster, "ulimit -n 1024; " + procfile()["front"])
    cluster.start_worker("worker1")
    cluster.api_key = cluster.add_user("alice")
    await cluster.wait_ready(1)


async def hold_idle(cluster, count: int) -> list[trio.SocketStream]:
    """`count` connections that made one request each and are left open, 64 opening at a time."""
    idle: list[trio.SocketStream] = []
    limiter = trio.CapacityLimiter(64)

    async def open_one() -> None:
        async with limiter:
            idle.append(await one_health_request(cluster.port))

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(open_one)
    return idle
