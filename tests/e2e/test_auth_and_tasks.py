"""Users, tokens and durable tasks through real processes and a real SQLite file."""

import datetime
import signal

import httpx
import trio

from server.auth import digest
from server.store import Store, utcnow

MODEL = "cohort-mock"


async def start(cluster, workers=("worker1",)):
    cluster.start_front()
    for name in workers:
        cluster.start_worker(name)
    cluster.api_key = cluster.add_user("alice")
    await cluster.wait_ready(len(workers))


async def poll_task(http, cluster, task_id, key=None, timeout_s=60):
    with trio.fail_after(timeout_s):
        while True:
            task = (await http.get(f"{cluster.url}/tasks/{task_id}", headers=cluster.headers(key))).json()
            if task["status"] in ("completed", "failed", "cancelled"):
                return task
            await trio.sleep(0.05)


async def test_login_then_async_task_then_poll(make_cluster):
    cluster = make_cluster()
    await start(cluster)
    async with httpx.AsyncClient(timeout=30) as http:
        login = await http.post(cluster.url + "/token",
                                data={"username": "alice", "password": "correct-horse"})
        assert login.status_code == 200
        token = login.json()
        assert token["token_type"] == "bearer" and token["expires_in"] > 0
        json_login = await http.post(cluster.url + "/token",
                                     json={"username": "alice", "password": "correct-horse"})
        assert json_login.status_code == 200
        accepted = await http.post(cluster.url + "/inference/async",
                                   headers=cluster.headers(token["access_token"]),
                                   json={"model": MODEL, "messages": [{"role": "user", "content": "later"}]})
        assert accepted.status_code == 202 and accepted.json()["status"] == "queued"
        task = await poll_task(http, cluster, accepted.json()["id"], token["access_token"])
    assert task["status"] == "completed" and task["started_at"] and task["finished_at"]
    assert task["result"]["choices"][0]["message"]["content"].endswith("Mock response to: later")
    assert task["result"]["usage"]["completion_tokens"] > 0


async def test_credentials_that_are_refused(make_cluster):
    cluster = make_cluster()
    await start(cluster)
    store = Store(f"sqlite:///{cluster.tmp}/data/cohort.db")
    with store.db.connection_context():
        alice = store.user_named("alice")
        store.add_token(alice, digest("expired-token"), "access",
                        utcnow() - datetime.timedelta(seconds=1))
    route = cluster.url + "/v1/models"
    cases = {
        "no header": {},
        "not bearer": {"Authorization": "Basic abc"},
        "empty bearer": {"Authorization": "Bearer"},
        "unknown": {"Authorization": "Bearer nope"},
        "expired": {"Authorization": "Bearer expired-token"},
    }
    for case, headers in cases.items():
        answer = httpx.get(route, headers=headers)
        assert answer.status_code == 401, case
        assert answer.json()["error"]["type"] == "authentication_error", case
    assert httpx.post(cluster.url + "/token", data={"username": "alice", "password": "wrong"}).status_code == 401
    assert httpx.post(cluster.url + "/token", data={"username": "bob", "password": "x"}).status_code == 401
    assert httpx.post(cluster.url + "/token", data={"user": "alice"}).status_code == 400
    assert httpx.post(cluster.url + "/token", content=b"{bad", headers={"Content-Type": "application/json"}).status_code == 400
    cluster.users("disable", "alice")
    assert httpx.post(cluster.url + "/token", data={"username": "alice", "password": "correct-horse"}).status_code == 401
    assert httpx.get(cluster.url + "/health").status_code == 200  # stays open


async def test_another_users_task_is_invisible_and_uncancellable(make_cluster):
    cluster = make_cluster(MOCK_TOKEN_S="0.05")
    await start(cluster)
    bob_key = cluster.add_user("bob")
    async with httpx.AsyncClient(timeout=30) as http:
        accepted = await http.post(cluster.url + "/inference/async", headers=cluster.headers(),
                                   json={"model": MODEL, "prompt": "mine", "max_tokens": 40})
        task_id = accepted.json()["id"]
        for method in ("GET", "DELETE"):
            answer = await http.request(method, f"{cluster.url}/tasks/{task_id}",
                                        headers=cluster.headers(bob_key))
            assert answer.status_code == 404
        listed = (await http.get(cluster.url + "/tasks", headers=cluster.headers(bob_key))).json()
        assert listed["total"] == 0
        cancelled = await http.delete(f"{cluster.url}/tasks/{task_id}", headers=cluster.headers())
        assert cancelled.json()["status"] == "cancelled"
        final = await poll_task(http, cluster, task_id)
    assert final["status"] == "cancelled" and final["result"] is None


async def test_task_listing_pages_and_filters(make_cluster):
    cluster = make_cluster()
    await start(cluster)
    async with httpx.AsyncClient(timeout=30, headers=cluster.headers()) as http:
        ids = [(await http.post(cluster.url + "/inference/async",
                                json={"model": MODEL, "prompt": f"p{i}"})).json()["id"] for i in range(5)]
        for task_id in ids:
            await poll_task(http, cluster, task_id)
        page = (await http.get(cluster.url + "/tasks", params={"limit": 2, "offset": 1})).json()
        assert page["total"] == 5 and len(page["data"]) == 2
        done = (await http.get(cluster.url + "/tasks", params={"status": "completed"})).json()
        assert done["total"] == 5
        assert (await http.get(cluster.url + "/tasks", params={"status": "odd"})).status_code == 400
        assert (await http.get(cluster.url + "/tasks", params={"limit": "x"})).status_code == 400
        bad = await http.post(cluster.url + "/inference/async", json={"model": MODEL, "prompt": 3})
        assert bad.status_code == 400
        unknown = await http.post(cluster.url + "/inference/async", json={"model": "nope", "prompt": "x"})
        assert unknown.status_code == 404


async def test_batch_answers_in_order_and_per_item_errors_stay_per_item(make_cluster):
    cluster = make_cluster()
    await start(cluster)
    async with httpx.AsyncClient(timeout=60, headers=cluster.headers()) as http:
        answer = await http.post(cluster.url + "/inference/batch", json={
            "requests": [{"model": MODEL, "prompt": "first"},
                         {"model": MODEL, "prompt": 42},
                         {"model": "nope", "prompt": "x"},
                         {"model": MODEL, "messages": [{"role": "user", "content": "fourth"}]}]})
        assert answer.status_code == 200
        data = answer.json()["data"]
        assert [item["status"] for item in data] == ["completed", "failed", "failed", "completed"]
        assert data[0]["result"]["choices"][0]["text"].endswith("first")
        assert data[1]["error"]["param"] == "prompt" and data[2]["error"]["code"] == "model_not_found"
        shared = await http.post(cluster.url + "/inference/batch", json={
            "model": MODEL, "max_tokens": 3, "prompts": [f"q{i}" for i in range(20)]})
        results = shared.json()["data"]
        assert [r["index"] for r in results] == list(range(20))
        assert all(r["result"]["usage"]["completion_tokens"] == 3 for r in results)
        queued = await http.post(cluster.url + "/inference/batch", json={
            "model": MODEL, "prompts": ["a", "b"], "wait": False})
        assert queued.status_code == 202
        for item in queued.json()["tasks"]:
            assert (await poll_task(http, cluster, item["id"]))["status"] == "completed"


async def test_tasks_survive_a_sigkill_of_the_front(make_cluster):
    cluster = make_cluster(MOCK_TOKEN_S="0.05", COHORT_MAX_BATCH_SIZE="4",
                           COHORT_MAX_CONCURRENT_BATCHES="1", COHORT_TASK_LEASE_S="2")
    await start(cluster)
    async with httpx.AsyncClient(timeout=30, headers=cluster.headers()) as http:
        ids = [(await http.post(cluster.url + "/inference/async", json={
            "model": MODEL, "prompt": f"durable {i}", "max_tokens": 20})).json()["id"]
            for i in range(12)]
        # kill it while some tasks run and others wait in the queue
        with trio.fail_after(30):
            while (await http.get(cluster.url + "/tasks", params={"status": "running"})).json()["total"] == 0:
                await trio.sleep(0.02)
        cluster.signal("front", signal.SIGKILL)
        cluster.wait_exit("front")
        cluster.start_front()
        await cluster.wait_ready(1)
        finals = [await poll_task(http, cluster, task_id) for task_id in ids]
    assert [t["status"] for t in finals] == ["completed"] * 12
    assert any(t["attempts"] >= 2 for t in finals)  # some were re-run after the restart
    assert "took over" in cluster.log("front")


async def test_a_stored_task_that_cannot_run_again_is_quarantined_not_a_crash_loop(make_cluster):
    """A task stored under other settings (here a `max_tokens` over today's limit) fails with its
    cause at the next start; the front keeps serving and the other tasks run."""
    cluster = make_cluster()
    cluster.api_key = cluster.add_user("alice")
    store = Store(f"sqlite:///{cluster.tmp}/data/cohort.db")
    with store.db.connection_context():
        user_id = store.user_named("alice").id
        store.add_tasks([
            ("task-poison", user_id, "completion",
             {"model": MODEL, "prompt": "x", "max_tokens": 10**6}),
            ("task-fine", user_id, "completion", {"model": MODEL, "prompt": "y", "max_tokens": 4})])
    cluster.start_front()
    cluster.start_worker("worker1")
    await cluster.wait_ready(1)
    async with httpx.AsyncClient(timeout=30, headers=cluster.headers()) as http:
        poison = await poll_task(http, cluster, "task-poison")
        fine = await poll_task(http, cluster, "task-fine")
    assert poison["status"] == "failed" and poison["error"]["code"] == "quarantined"
    assert "max_tokens" in poison["error"]["message"]
    assert fine["status"] == "completed"


async def test_ten_wrong_passwords_get_a_429_that_says_when_and_even_the_right_one_waits(
        make_cluster):
    cluster = make_cluster()
    await start(cluster)
    async with httpx.AsyncClient(timeout=30) as http:
        answers = [await http.post(cluster.url + "/token", data={
            "username": "alice", "password": f"guess {i}"}) for i in range(10)]
        right = await http.post(cluster.url + "/token", data={
            "username": "alice", "password": "correct-horse"})
    statuses = [answer.status_code for answer in answers]
    assert statuses[:6] == [401] * 6 and statuses[-1] == 429, statuses
    assert int(answers[-1].headers["Retry-After"]) >= 1
    assert answers[-1].json()["error"]["code"] == "too_many_login_failures"
    assert right.status_code == 429  # a lockout is not a password check


async def test_an_anonymous_health_says_only_whether_the_service_is_up(make_cluster):
    cluster = make_cluster()
    await start(cluster)
    anonymous = httpx.get(cluster.url + "/health")
    assert anonymous.status_code == 200 and anonymous.json() == {"status": "ok"}
    for secret in ("data", "zmq", "tcp://", "worker1", "sqlite", str(cluster.tmp)):
        assert secret not in anonymous.text
    detailed = httpx.get(cluster.url + "/health", headers=cluster.headers()).json()
    assert detailed["workers"][0]["id"] == "worker1" and "config" in detailed


async def test_async_tasks_work_with_authentication_off(make_cluster):
    """Every caller is the disabled `dev` user then: tasks need an owner row (it was a 500)."""
    cluster = make_cluster(COHORT_AUTH_DISABLED="1")
    cluster.start_front()
    cluster.start_worker("worker1")
    await cluster.wait_ready(1)
    async with httpx.AsyncClient(timeout=30) as http:
        accepted = await http.post(cluster.url + "/inference/async", json={
            "model": MODEL, "prompt": "open house", "max_tokens": 4})
        assert accepted.status_code == 202, accepted.text
        task = await poll_task(http, cluster, accepted.json()["id"])
    assert task["status"] == "completed"
