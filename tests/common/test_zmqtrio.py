"""The trio driver for pyzmq: no lost wake-ups (a lost one shows as a hang, so every test is bounded)."""

import trio
import zmq

from common.zmqtrio import TrioSocket


def pair(context: zmq.Context, hwm: int) -> tuple[TrioSocket, TrioSocket]:
    router = context.socket(zmq.ROUTER)
    dealer = context.socket(zmq.DEALER)
    for sock in (router, dealer):
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # at HWM: EAGAIN, not a silent drop
    router.bind("tcp://127.0.0.1:*")
    dealer.setsockopt(zmq.IDENTITY, b"w1")
    dealer.connect(router.getsockopt(zmq.LAST_ENDPOINT).decode())
    return TrioSocket(router), TrioSocket(dealer)


async def test_soak_both_directions_counts_every_message():
    """Readers and writers park on the same FD at once; tiny HWMs force the POLLOUT path."""
    count = 5000
    context = zmq.Context()
    router, dealer = pair(context, hwm=4)
    got = {"router": [], "dealer": []}

    async def send_from_dealer(start: int, step: int):
        for i in range(start, count, step):
            await dealer.send_multipart([str(i).encode()])

    async def send_from_router():
        for i in range(count):
            await router.send_multipart([b"w1", str(i).encode()])

    async def receive(sock: TrioSocket, name: str):
        while len(got[name]) < count:
            frames = await sock.recv_multipart()
            got[name].append(int(frames[-1]))

    with router, dealer, trio.fail_after(60):
        # the dealer says hello first so the router knows its identity before sending to it
        await dealer.send_multipart([b"-1"])
        assert (await router.recv_multipart())[1] == b"-1"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive, router, "router")
            nursery.start_soon(receive, dealer, "dealer")
            # two concurrent senders on one socket share the send lock
            nursery.start_soon(send_from_dealer, 0, 2)
            nursery.start_soon(send_from_dealer, 1, 2)
            nursery.start_soon(send_from_router)
    context.term()
    assert sorted(got["router"]) == list(range(count))
    assert got["dealer"] == list(range(count))  # one sender: order kept


async def test_receive_waits_for_late_message_and_cancels_cleanly():
    context = zmq.Context()
    router, dealer = pair(context, hwm=1000)
    with router, dealer, trio.fail_after(10):
        with trio.move_on_after(0.05) as scope:
            await dealer.recv_multipart()
        assert scope.cancelled_caught
        async with trio.open_nursery() as nursery:
            async def late_hello():
                await trio.sleep(0.05)
                await dealer.send_multipart([b"hi"])
            nursery.start_soon(late_hello)
            assert await router.recv_multipart() == [b"w1", b"hi"]
    context.term()


async def test_close_wakes_a_parked_receiver():
    context = zmq.Context()
    router, dealer = pair(context, hwm=1000)
    outcome = []

    async def receive():
        try:
            await dealer.recv_multipart()
        except trio.ClosedResourceError:
            outcome.append("closed")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            dealer.close()
    router.close()
    context.term()
    assert outcome == ["closed"]
