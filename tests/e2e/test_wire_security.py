"""Strangers on the worker wire, with real ZeroMQ sockets against a front as the Procfile runs it:
no key, an unknown key, a known key with a forged worker id; and a registered peer that sends
malformed messages. None gets a batch, none can register, the front keeps serving."""

import subprocess
import sys
from pathlib import Path

import httpx
import msgpack
import pytest
import trio
import zmq
import zmq.auth

from common.keys import KeyFiles, connect_curve
from harness.cluster import ROOT

MODEL = "cohort-mock"
HELLO = {"type": "hello", "v": 2, "worker_id": "", "engine": "mock", "model": MODEL,
         "capacity": 100_000, "device": "cpu", "state": "ready", "pid": 1, "features": []}


def peer(cluster, identity: str, keys: tuple[Path, Path] | None, state: str = "ready") -> zmq.Socket:
    """A DEALER on the front's port that says hello as `identity` (with CURVE when `keys`), in
    `state` (a stranger says ready, with room for anything, to draw all the traffic it can)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity.encode())
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        connect_curve(sock, *keys)
    sock.connect(f"tcp://127.0.0.1:{cluster.zmq_port}")
    sock.send(msgpack.packb({**HELLO, "worker_id": identity, "state": state}))
    return sock


def received(sock: zmq.Socket, within_ms: int) -> list[dict]:
    """Every message the front sent this peer within the time given."""
    messages = []
    while sock.poll(within_ms):
        messages.append(msgpack.unpackb(sock.recv_multipart()[-1]))
        within_ms = 50
    return messages


async def serve_requests(cluster, count: int) -> list[int]:
    async with httpx.AsyncClient(timeout=30, headers=cluster.headers()) as http:
        return [(await http.post(cluster.url + "/v1/completions", json={
            "model": MODEL, "prompt": f"private {i}", "max_tokens": 4})).status_code
            for i in range(count)]


def add_key(cluster, name: str) -> tuple[Path, Path]:
    out = cluster.tmp / f"{name}-keys"
    done = subprocess.run([sys.executable, "-m", "server.keys", "add", name, "--out", str(out)],
                          cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return out / f"{name}.key_secret", out / "front.key"


@pytest.fixture
def guarded(make_cluster):
    """A front with one real worker (`worker1`) and a user."""
    cluster = make_cluster()
    cluster.start_front()
    cluster.start_worker("worker1")
    cluster.api_key = cluster.add_user("alice")
    trio.run(cluster.wait_ready, 1)
    return cluster


def strangers(cluster) -> dict[str, zmq.Socket]:
    files = KeyFiles.of(cluster.tmp / "data")
    unknown = cluster.tmp / "unknown"
    unknown.mkdir()
    _, unknown_secret = zmq.auth.create_certificates(unknown, "unknown")
    remote = add_key(cluster, "remote1")
    return {
        "no key": peer(cluster, "plain", None),
        "unknown key": peer(cluster, "stranger", (Path(unknown_secret), files.front_public)),
        "known key, a worker id in use": peer(cluster, "worker1", remote),
        "known key, a worker id not its own": peer(cluster, "worker7", remote),
    }


def test_peers_without_the_right_key_get_no_batch_and_cannot_register(guarded):
    peers = strangers(guarded)
    statuses = trio.run(serve_requests, guarded, 20)
    assert statuses == [200] * 20
    for name, sock in peers.items():  # not a welcome, not a batch: nothing at all
        assert received(sock, 300) == [], name
    health = trio.run(guarded.health)
    assert [w["id"] for w in health["workers"]] == ["worker1"]
    worker_lines = [line for line in guarded.log("front").splitlines() if "worker" in line]
    assert health["workers"][0]["jobs_done"] == 20, worker_lines  # the real worker did them all


def test_a_key_from_server_keys_registers_its_own_worker_id(guarded):
    sock = peer(guarded, "remote1-gpu0", add_key(guarded, "remote1"))
    assert received(sock, 5000)[0]["type"] == "welcome"
    health = trio.run(guarded.wait_for, lambda h: len(h["workers"]) == 2, "remote1-gpu0")
    assert sorted(w["id"] for w in health["workers"]) == ["remote1-gpu0", "worker1"]


def test_a_worker_with_keys_the_front_never_made_is_refused_and_says_what_to_check(make_cluster):
    """A worker with its own data directory makes its own keys: the front does not know them."""
    cluster = make_cluster(COHORT_HEARTBEAT_INTERVAL_S="0.25")
    cluster.start_front()
    cluster.start_worker("elsewhere", COHORT_DATA_DIR=str(cluster.tmp / "other-data"))
    cluster.api_key = cluster.add_user("alice")
    trio.run(cluster.wait_for, lambda h: "no welcome from the front" in cluster.log("elsewhere"),
             "the worker to say it is not welcome", 30)
    assert trio.run(cluster.health)["workers"] == []
    assert "python -m server.keys list" in cluster.log("elsewhere")


def test_a_remote_front_without_a_key_is_a_configuration_error(make_cluster):
    cluster = make_cluster()
    done = subprocess.run([sys.executable, "-m", "worker", "--connect", "tcp://10.1.2.3:5555"],
                          cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "python -m server.keys add" in done.stderr


MALFORMED = [
    {"type": "error", "message": "boom", "ids": [{"a": 1}]},
    {"type": "error", "message": ["not text"], "ids": []},
    {"type": "heartbeat", "active": 1, "state": "bogus", "load": {}},
    {"type": "heartbeat", "active": "many", "state": "ready", "load": {}},
    {"type": "heartbeat", "active": 1, "state": "ready", "load": {"running": -1}},
    {"type": "out", "items": [{"id": 5, "data": "x", "done": "yes"}], "load": {}},
    {"type": "out", "items": "not a list", "load": {}},
    {"type": "ready", "model": {"a": 1}, "load_time_s": "slow"},
    {"type": "hello", "v": 2, "worker_id": ["rogue"]},
    {"type": "bye", "reason": 7},
    {"type": "no such type"},
    {"no": "type at all"},
    [1, 2, 3],
    2 ** 63,
]


def test_malformed_messages_from_a_registered_peer_leave_the_front_serving(guarded):
    rogue = peer(guarded, "rogue", (KeyFiles.of(guarded.tmp / "data").local_secret,
                                    KeyFiles.of(guarded.tmp / "data").front_public),
                 state="loading")  # registered, and never given work it would not answer
    assert received(rogue, 5000)[0]["type"] == "welcome"
    for message in MALFORMED:
        rogue.send(msgpack.packb(message))
    rogue.send(b"\xc1 not msgpack")
    rogue.send_multipart([b"two", b"frames"])
    rogue.send(msgpack.packb({"type": "heartbeat", "active": 0, "state": "ready", "load": {}}))
    health = trio.run(guarded.wait_for, lambda h: any(
        w["id"] == "rogue" and w["last_seen_s_ago"] < 1 for w in h["workers"]), "the rogue's heartbeat")
    assert {w["id"] for w in health["workers"]} == {"rogue", "worker1"}
    assert trio.run(serve_requests, guarded, 5) == [200] * 5
    assert httpx.get(guarded.url + "/metrics", headers=guarded.headers()).status_code == 200
    assert httpx.get(guarded.url + "/ready").status_code == 200
    assert "refused a message" in guarded.log("front")
