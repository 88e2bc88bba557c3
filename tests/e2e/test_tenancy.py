"""The tenancy invariants through real fronts and workers, on every way in: exactly one ledger
row per request that reached a worker (across a SIGKILL of the front too), a quota that holds
against real use, nothing of a removed user's reaching the next user, a disabled user's work
stopped, and batch-tier work that runs on engines of any size."""


import httpx
import openai
import trio

from server.store import Store
from tests.e2e.test_batches import chat_line, finished, serving, submitted, under_way

MODEL = "cohort-mock"
PATHS = {"chat": 1, "completions": 1, "embeddings": 1, "async": 1, "batch_item": 2,
         "batch_api": 2}


async def by_route(http: httpx.AsyncClient) -> dict[str, int]:
    usage = (await http.get("/v1/usage", params={"group_by": "route"})).json()
    return {bucket["route"]: bucket["requests"] for bucket in usage["buckets"]}


async def test_every_path_leaves_exactly_one_ledger_row_even_across_a_sigkill(make_cluster):
    """One request on each path (a refused one too), then a last chat and a SIGKILL of the front
    the moment it is answered, before any commit: its row was journaled, and the next front
    replays it. Every path counts its requests exactly, before and after."""
    cluster, client = await serving(make_cluster, "alice")
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30,
                                 headers=cluster.headers()) as http:
        await client.chat.completions.create(model=MODEL, max_tokens=4, messages=[
            {"role": "user", "content": "hi"}])
        async for _ in await client.completions.create(model=MODEL, prompt="hi", max_tokens=4,
                                                       stream=True):
            pass
        await client.embeddings.create(model=MODEL, input="hi")
        refused = await http.post("/v1/completions", json={"model": "nobody-serves-this",
                                                            "prompt": "hi"})
        assert refused.status_code == 404  # refused before any worker: no row
        task = (await http.post("/inference/async", json={
            "model": MODEL, "prompt": "later", "max_tokens": 4})).json()
        items = (await http.post("/inference/batch", json={
            "model": MODEL, "prompts": ["a", "b"], "max_tokens": 4})).json()
        assert [item["status"] for item in items["data"]] == ["completed", "completed"]
        batch = await submitted(client, [chat_line(i) for i in range(2)])
        assert (await finished(client, batch.id)).request_counts.completed == 2
        with trio.fail_after(30):
            while (await http.get(f"/tasks/{task['id']}")).json()["status"] != "completed":
                await trio.sleep(0.05)
        with trio.fail_after(10):  # interactive rows are committed about once a second
            while (seen := await by_route(http)) != PATHS:
                await trio.sleep(0.05)
        await client.chat.completions.create(model=MODEL, max_tokens=4, messages=[
            {"role": "user", "content": "the last word"}])
    cluster.signal("front")  # SIGKILL, the moment after the answer: no commit since
    cluster.wait_exit("front")
    cluster.start_front()
    await cluster.wait_ready(1)
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30,
                                 headers=cluster.headers()) as http:
        assert await by_route(http) == {**PATHS, "chat": 2}  # replayed before it served
    assert seen == PATHS
    await client.close()


async def test_a_daily_quota_holds_against_real_use(make_cluster):
    """A quota of 100 tokens is spent after a few chats, and what was served is over it by at
    most the one request that was in flight."""
    cluster, client = await serving(make_cluster, "bob", "--tokens-per-day", "100")
    await client.close()
    body = {"model": MODEL, "max_tokens": 1, "messages": [
        {"role": "user", "content": "one two three four five six seven eight nine ten"}]}
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30,
                                 headers=cluster.headers()) as http:
        served = []
        for _ in range(20):
            answer = await http.post("/v1/chat/completions", json=body)
            if answer.status_code == 429:
                assert answer.json()["error"]["code"] == "insufficient_quota"
                break
            usage = answer.json()["usage"]
            served.append(usage["prompt_tokens"] + usage["completion_tokens"])
        task = await http.post("/inference/async", json=body)
        with trio.fail_after(10):  # the ledger commits about once a second
            while (usage := (await http.get("/v1/usage")).json())["requests"] < len(served):
                await trio.sleep(0.05)
    assert answer.status_code == 429 and task.status_code == 429
    assert usage["prompt_tokens"] + usage["completion_tokens"] == sum(served)
    assert len(served) < 20 and sum(served) - served[-1] <= 100  # over by the last one at most


async def test_a_removed_users_data_never_reaches_the_next_user_of_that_name(make_cluster):
    cluster = make_cluster(COHORT_AUTH_CACHE_S="0")  # the CLI's change, seen at once
    cluster.start_front()
    cluster.start_worker("worker1")
    cluster.api_key = cluster.add_user("carol")
    await cluster.wait_ready(1)
    client = openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key=cluster.api_key)
    batch = await submitted(client, [chat_line(i) for i in range(3)])
    await finished(client, batch.id)
    old_file = batch.input_file_id
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        await http.post("/inference/async", headers=cluster.headers(), json={
            "model": MODEL, "prompt": "secret", "max_tokens": 2})
        cluster.users("remove", "carol")
        gone = await http.get("/v1/files", headers=cluster.headers())
        assert gone.status_code == 401  # her keys went with her
        again = cluster.add_user("carol")
        mine = cluster.headers(again)
        assert (await http.get("/v1/files", headers=mine)).json()["data"] == []
        assert (await http.get(f"/v1/files/{old_file}/content", headers=mine)).status_code == 404
        assert (await http.get("/v1/batches", headers=mine)).json()["data"] == []
        assert (await http.get("/tasks", headers=mine)).json()["data"] == []
        assert (await http.get("/v1/usage", headers=mine)).json()["requests"] == 0
    await client.close()


async def test_a_disabled_users_batch_stops_starting_lines(make_cluster):
    cluster, client = await serving(make_cluster, "dan", MOCK_TOKEN_S="0.05",
                                    COHORT_BATCH_CONCURRENCY="1")
    batch = await under_way(client, [chat_line(i, max_tokens=10, ignore_eos=True)
                                     for i in range(40)])
    cluster.users("disable", "dan")
    store = Store(f"sqlite:///{cluster.tmp / 'data' / 'cohort.db'}")

    def seen():
        with store.db.connection_context():
            return store.batch_of(None, batch.id)

    with trio.fail_after(10):
        while (stopped := seen()).status != "cancelled":
            await trio.sleep(0.1)
    assert stopped.completed < 40 and "user_disabled" in stopped.errors
    await trio.sleep(2)  # nothing more starts: the count stands
    assert seen().completed == stopped.completed
    await client.close()


async def test_async_tasks_run_on_engines_with_one_sequence(make_cluster):
    """max_num_seqs 1 (a big model on a small GPU): the batch tier's headroom never takes the
    whole engine, so tasks run, even right after interactive traffic."""
    cluster, client = await serving(make_cluster, "eve", COHORT_MAX_NUM_SEQS="1")
    await client.close()
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30,
                                 headers=cluster.headers()) as http:
        assert (await http.post("/v1/completions", json={
            "model": MODEL, "prompt": "now", "max_tokens": 2})).status_code == 200
        ids = [(await http.post("/inference/async", json={
            "model": MODEL, "prompt": f"later {i}", "max_tokens": 2})).json()["id"]
            for i in range(3)]
        with trio.fail_after(20):
            for task_id in ids:
                while (await http.get(f"/tasks/{task_id}")).json()["status"] != "completed":
                    await trio.sleep(0.05)
