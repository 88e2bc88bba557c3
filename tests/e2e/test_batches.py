"""OpenAI's Batch API through a real front with the official `openai` client: files, batches,
polling, output and error files, cancel and list; and a batch that survives SIGKILLs of the whole
deployment with exactly one output line per `custom_id`."""

import json
import random
import signal

import httpx
import openai
import pytest
import trio

from server.store import Store, utcnow
from tests.e2e.test_fronts import wait_ready_at

MODEL = "cohort-mock"


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def chat_line(i: int, **body) -> dict:
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": f"hello {i}"}],
                     "max_tokens": 4, **body}}


async def serving(make_cluster, user: str, *limits: str, **env) -> tuple:
    """A front and one mock worker, and an `openai` client of a new user's (with `limits`:
    `python -m server.users limit` flags)."""
    cluster = make_cluster(**env)
    cluster.start_front()
    cluster.start_worker("worker1")
    cluster.api_key = cluster.add_user(user)
    if limits:
        cluster.users("limit", user, *limits)
    await cluster.wait_ready(1)
    return cluster, openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key=cluster.api_key,
                                       max_retries=0)


async def submitted(client: openai.AsyncOpenAI, lines: list[dict]):
    """A batch of chat lines, uploaded and created."""
    file = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    return await client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                       completion_window="24h")


async def under_way(client: openai.AsyncOpenAI, lines: list[dict], done: int = 2):
    """A batch submitted, once `done` of its lines have completed."""
    batch = await submitted(client, lines)
    with trio.fail_after(30):
        while (await client.batches.retrieve(batch.id)).request_counts.completed < done:
            await trio.sleep(0.05)
    return batch


async def finished(client: openai.AsyncOpenAI, batch_id: str, timeout_s: float = 60):
    with trio.fail_after(timeout_s):
        while (batch := await client.batches.retrieve(batch_id)).status not in (
                "completed", "failed", "cancelled", "expired"):
            await trio.sleep(0.1)
    return batch


async def test_a_batch_runs_with_the_openai_client_from_file_to_output(make_cluster):
    _, client = await serving(make_cluster, "alice", MOCK_TOKEN_S="0.001")
    lines = [chat_line(i) for i in range(12)]
    refused = [chat_line(12, max_tokens=10**9), {**chat_line(13), "body": {
        **chat_line(13)["body"], "model": "no-such-model"}}]
    first = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    assert (first.purpose, first.bytes) == ("batch", len(jsonl(lines)))

    big = jsonl([chat_line(i, stop=["x" * 1000]) for i in range(1500)])  # over the 1 MB of a
    large = await client.files.create(file=("big.jsonl", big), purpose="batch")  # request body
    assert (large.bytes, large.lines) == (len(big), 1500)
    assert (await client.files.content(large.id)).content == big  # streamed back, chunk by chunk

    with pytest.raises(openai.BadRequestError) as bad:
        await client.files.create(file=("bad.jsonl", jsonl(lines[:2]) + b"{oops\n"), purpose="batch")
    assert "line 3" in bad.value.message

    file = await client.files.create(file=("in.jsonl", jsonl(lines + refused)), purpose="batch")
    batch = await client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                        completion_window="24h", metadata={"team": "a"})
    assert batch.status == "validating" and batch.metadata == {"team": "a"}
    batch = await finished(client, batch.id)
    assert batch.status == "failed"  # lines the front refuses fail the validation, by number
    assert [e.line for e in batch.errors.data] == [13, 14]
    assert "max_tokens" in batch.errors.data[0].message
    assert "no-such-model" in batch.errors.data[1].message

    file = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = await client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
    batch = await finished(client, batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 12
    assert batch.completed_at >= batch.in_progress_at >= batch.created_at
    output = [json.loads(line) for line in
              (await client.files.content(batch.output_file_id)).text.splitlines()]
    assert sorted(line["custom_id"] for line in output) == sorted(f"req-{i}" for i in range(12))
    assert all(line["response"]["status_code"] == 200 and
               line["response"]["body"]["choices"][0]["message"]["content"] for line in output)
    listed = await client.batches.list(limit=1)
    assert [b.id for b in listed.data] == [batch.id] and listed.has_more
    assert (await client.files.delete(file.id)).deleted
    await client.close()


async def test_a_cancelled_batch_ends_with_what_ran_and_an_error_line_for_the_rest(make_cluster):
    _, client = await serving(make_cluster, "bob", MOCK_TOKEN_S="0.02",
                              COHORT_BATCH_CONCURRENCY="2")
    batch = await under_way(client, [chat_line(i, max_tokens=50, ignore_eos=True)
                                     for i in range(40)])
    cancelling = await client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling"
    batch = await finished(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at
    counts = batch.request_counts
    assert counts.total == 40 and counts.completed >= 2 and counts.completed + counts.failed == 40
    errors = [json.loads(line) for line in
              (await client.files.content(batch.error_file_id)).text.splitlines()]
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert len(errors) == counts.failed
    await client.close()


@pytest.mark.parametrize("seed, store", [(1, "sqlite"), (2, "sqlite"), (3, "postgres")])
async def test_a_batch_survives_sigkills_of_the_whole_deployment(make_cluster, seed, store,
                                                                 request):
    """200 lines; front and worker SIGKILLed at a random moment (the seed picks it), restarted on
    the same data: exactly 200 output lines, each custom_id once."""
    env = {"MOCK_TOKEN_S": "0.02", "COHORT_TASK_LEASE_S": "2",
           "COHORT_BATCH_CONCURRENCY": "8"}  # about 5 s of work: killed mid-way
    if store == "postgres":
        env["DATABASE_URL"] = request.getfixturevalue("database_url_postgres")
    cluster = make_cluster(**env)
    cluster.start_front()
    cluster.start_worker("worker1")
    cluster.api_key = cluster.add_user("carol")
    await cluster.wait_ready(1)
    lines = [chat_line(i, max_tokens=8, ignore_eos=True) for i in range(200)]
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30,
                                 headers=cluster.headers()) as http:
        file = (await http.post("/v1/files", data={"purpose": "batch"},
                                files={"file": ("in.jsonl", jsonl(lines))})).json()
        batch = (await http.post("/v1/batches", json={
            "input_file_id": file["id"], "endpoint": "/v1/chat/completions",
            "completion_window": "24h"})).json()
        kill_after = random.Random(seed).randrange(0, 150)  # lines done before the kill
        with trio.fail_after(60):
            while (seen := (await http.get(f"/v1/batches/{batch['id']}")).json())[
                    "request_counts"]["completed"] < kill_after:
                await trio.sleep(0.02)
    for name in ("front", "worker1"):
        cluster.signal(name, signal.SIGKILL)
    assert seen["status"] in ("validating", "in_progress")  # the kill came mid-way
    for name in ("front", "worker1"):
        cluster.wait_exit(name)
    cluster.start_front()
    cluster.start_worker("worker1")
    await cluster.wait_ready(1)
    client = openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key=cluster.api_key)
    done = await finished(client, batch["id"], timeout_s=90)
    assert done.status == "completed" and done.request_counts.completed == 200
    output = (await client.files.content(done.output_file_id)).text.splitlines()
    custom_ids = [json.loads(line)["custom_id"] for line in output]
    assert len(custom_ids) == 200 and set(custom_ids) == {f"req-{i}" for i in range(200)}
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30,
                                 headers=cluster.headers()) as http:
        usage = (await http.get("/v1/usage", params={"group_by": "route"})).json()
    assert usage["buckets"] == [{"route": "batch_api", "requests": 200, "prompt_tokens":
                                 usage["prompt_tokens"], "completion_tokens": 200 * 8}]
    await client.close()


async def test_a_killed_fronts_batch_is_finished_by_the_other_front(make_cluster):
    """Two fronts on one store: the one running a batch is SIGKILLed; the other takes the batch
    over when its lease lapses and ends it with one output line per custom_id."""
    cluster = make_cluster(MOCK_TOKEN_S="0.02", COHORT_TASK_LEASE_S="2",
                           COHORT_BATCH_CONCURRENCY="8")
    cluster.start_front()
    url_b = cluster.start_second_front()
    cluster.start_worker("worker1")
    cluster.api_key = cluster.add_user("dora")
    await cluster.wait_ready(1)
    await wait_ready_at(url_b, cluster.headers(), 1)
    lines = [chat_line(i, max_tokens=8, ignore_eos=True) for i in range(120)]
    client = openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key=cluster.api_key)
    file = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = await client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
    with trio.fail_after(30):
        while (await client.batches.retrieve(batch.id)).request_counts.completed < 20:
            await trio.sleep(0.05)
    cluster.signal("front", signal.SIGKILL)
    other = openai.AsyncOpenAI(base_url=url_b + "/v1", api_key=cluster.api_key)
    done = await finished(other, batch.id, timeout_s=60)
    assert done.status == "completed" and done.request_counts.completed == 120
    output = (await other.files.content(done.output_file_id)).text.splitlines()
    assert sorted(json.loads(line)["custom_id"] for line in output) == sorted(
        f"req-{i}" for i in range(120))
    metrics = httpx.get(url_b + "/metrics", headers=cluster.headers(), timeout=10).text
    assert 'cohort_lease_takeovers_total{cause="lease_lapsed",what="batch"} 1.0' in metrics
    await client.close()
    await other.close()


async def test_batch_lines_count_against_their_creators_daily_quota_and_wait_past_it(make_cluster):
    _, client = await serving(make_cluster, "erin", "--tokens-per-day", "100",
                              MOCK_TOKEN_S="0.001")
    batch = await submitted(client, [chat_line(i, max_tokens=4, ignore_eos=True)
                                     for i in range(20)])  # about 10 tokens each
    with trio.fail_after(30):  # the quota runs out part way: the rest wait for midnight
        while (seen := await client.batches.retrieve(batch.id)).request_counts.completed < 5:
            await trio.sleep(0.1)
    with pytest.raises(openai.RateLimitError) as spent:
        await client.chat.completions.create(model=MODEL, max_tokens=4, messages=[
            {"role": "user", "content": "and me?"}])
    assert spent.value.body["code"] == "insufficient_quota"
    seen = await client.batches.retrieve(batch.id)
    assert seen.status == "in_progress" and seen.request_counts.completed < 20
    batch = await client.batches.cancel(batch.id)
    batch = await finished(client, batch.id)
    assert batch.status == "cancelled" and batch.request_counts.completed < 20
    await client.close()


async def test_a_batch_whose_window_passes_expires_with_an_error_line_for_what_never_ran(
        make_cluster):
    cluster, client = await serving(make_cluster, "fay", MOCK_TOKEN_S="0.02",
                                    COHORT_BATCH_CONCURRENCY="2")
    batch = await submitted(client, [chat_line(i, max_tokens=50, ignore_eos=True)
                                     for i in range(30)])
    with trio.fail_after(30):
        while (await client.batches.retrieve(batch.id)).status != "in_progress":
            await trio.sleep(0.05)
    # the 24 hours pass: the window's end is moved to now, in the store the front reads
    store = Store(f"sqlite:///{cluster.tmp / 'data' / 'cohort.db'}")
    with store.db.connection_context():
        assert store.update_batch(batch.id, None, expires_at=utcnow())
    batch = await finished(client, batch.id)
    assert batch.status == "expired" and batch.expired_at
    counts = batch.request_counts
    assert counts.completed < 30 and counts.completed + counts.failed == 30
    errors = [json.loads(line) for line in
              (await client.files.content(batch.error_file_id)).text.splitlines()]
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    await client.close()
