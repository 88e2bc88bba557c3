"""A worker on "another host": its own network namespace, joined to the front's by a veth pair on
a private /30 link this test makes and removes, reaching the front over TCP with a key made by
`python -m server.keys add`, from a data directory of its own. Needs root (CAP_NET_ADMIN) and
iproute2; where namespaces cannot be made the test says so and skips."""

import os
import random
import subprocess
import sys

import httpx
import pytest
import trio

from harness.cluster import ROOT, free_port, procfile

MODEL = "cohort-mock"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def netns():
    """(namespace name, the front's address on the link, the worker's address)."""
    tag = f"{os.getpid() % 10000}{random.randrange(100)}"
    name, host_side, ns_side = f"cohort{tag}", f"chv{tag}a", f"chv{tag}b"
    subnet = random.randrange(1, 250)
    front, worker = f"10.213.{subnet}.1", f"10.213.{subnet}.2"
    try:
        ip("netns", "add", name)
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"cannot make a network namespace here ({error}); needs root and iproute2")
    try:
        ip("link", "add", host_side, "type", "veth", "peer", "name", ns_side)
        ip("link", "set", ns_side, "netns", name)
        ip("addr", "add", f"{front}/30", "dev", host_side)
        ip("link", "set", host_side, "up")
        ip("netns", "exec", name, "ip", "addr", "add", f"{worker}/30", "dev", ns_side)
        ip("netns", "exec", name, "ip", "link", "set", ns_side, "up")
        ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield name, front, worker
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", host_side], capture_output=True, timeout=10)


def test_a_worker_in_another_network_namespace_serves_over_tcp_with_its_key(make_cluster, netns):
    name, front_address, _ = netns
    zmq_port = free_port()
    endpoint = f"tcp://{front_address}:{zmq_port}"
    cluster = make_cluster(COHORT_ZMQ_BIND=f"tcp://0.0.0.0:{zmq_port}")
    cluster.start_front()
    cluster.api_key = cluster.add_user("alice")
    trio.run(cluster.wait_for, lambda h: h["status"] == "ok", "the front")
    keys = cluster.tmp / "remote-keys"
    done = subprocess.run([sys.executable, "-m", "server.keys", "add", "gpubox", "--out",
                           str(keys)], cwd=ROOT, env=cluster.env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    elsewhere = str(cluster.tmp / "gpubox-data")  # nothing of the front's data directory
    command = procfile()["worker1"].replace("worker1", "gpubox")
    cluster._spawn("gpubox", f"ip netns exec {name} env {command}", COHORT_CONNECT=endpoint,
                   COHORT_DATA_DIR=elsewhere, COHORT_WORKER_KEY=str(keys / "gpubox.key_secret"))
    health = trio.run(cluster.wait_ready, 1)
    assert [w["id"] for w in health["workers"]] == ["gpubox"]
    with httpx.Client(timeout=30, headers=cluster.headers()) as http:
        answers = [http.post(cluster.url + "/v1/completions", json={
            "model": MODEL, "prompt": f"over the link {i}", "max_tokens": 4}) for i in range(10)]
    assert [answer.status_code for answer in answers] == [200] * 10
    assert trio.run(cluster.health)["workers"][0]["jobs_done"] == 10

    # the same worker without a key: it stops at once and says how to get one
    plain = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-m", "worker",
                            "--worker-id", "nokey", "--connect", endpoint],
                           cwd=ROOT, env={**cluster.env, "COHORT_DATA_DIR": elsewhere},
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode == 2 and "python -m server.keys add" in plain.stderr
