"""The admin API through a real front: only admins, the CLI's own checks, keys limited to models,
limits set over HTTP that bite at once, and everyone's usage for an admin."""

import subprocess
import sys

import httpx
import openai
import pytest
import trio

from harness.cluster import ROOT

MODEL = "cohort-mock"
BODY = {"model": MODEL, "prompt": "count me", "max_tokens": 4}


async def test_an_admin_runs_a_team_over_http_and_a_user_may_not(make_cluster):
    cluster = make_cluster()
    cluster.start_front()
    cluster.start_worker("worker1")
    admin = cluster.add_user("root")
    cluster.users("role", "root", "admin")
    cluster.api_key = admin
    stranger = cluster.add_user("mallory")
    await cluster.wait_ready(1)
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30,
                                 headers=cluster.headers(admin)) as http:
        refused = await http.get("/admin/users", headers=cluster.headers(stranger))
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "permission_denied"

        made = await http.post("/admin/users", json={"username": "team-a", "password": "long-enough"})
        assert made.status_code == 201 and made.json()["role"] == "user"
        assert "password_hash" not in made.text
        again = await http.post("/admin/users", json={"username": "team-a", "password": "long-enough"})
        short = await http.post("/admin/users", json={"username": "team-b", "password": "short"})
        odd = await http.post("/admin/users", json={"username": "team-b", "password": "long-enough",
                                                    "colour": "red"})
        assert (again.status_code, short.status_code, odd.status_code) == (409, 400, 400)
        assert short.json()["error"]["param"] == "password"
        assert odd.json()["error"]["param"] == "colour"

        key = (await http.post("/admin/users/team-a/keys",
                               json={"name": "ci", "models": [MODEL]})).json()
        assert key["key"].startswith("ck-") and key["models"] == [MODEL]
        listed = (await http.get("/admin/users/team-a/keys")).json()["data"]
        assert [k["name"] for k in listed] == ["ci"] and "key" not in listed[0]
        limits = await http.put(f"/admin/users/team-a/keys/{key['id']}/limits", json={"rpm": 2})
        assert limits.json()["limits"]["rpm"] == 2
        bad = await http.put("/admin/users/team-a/limits", json={"rpm": -1})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "rpm"

        team = {"Authorization": f"Bearer {key['key']}"}
        answers = [await http.post("/v1/completions", json=BODY, headers=team) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 429]  # the admin's limit, at once
        models = (await http.get("/v1/models", headers=team)).json()["data"]
        assert [m["id"] for m in models] == [MODEL]

        revoked = await http.delete(f"/admin/users/team-a/keys/{key['id']}")
        assert revoked.json()["revoked"] is True
        gone = await http.post("/v1/completions", json=BODY, headers=team)
        assert gone.status_code == 401  # this front forgets it at once

        with trio.fail_after(10):  # the ledger is written about once a second
            while (usage := (await http.get("/admin/usage", params={
                    "group_by": "user"})).json())["requests"] < 2:
                await trio.sleep(0.1)
        assert {"user": "team-a", "requests": 2} in [
            {"user": b["user"], "requests": b["requests"]} for b in usage["buckets"]]
        mine = (await http.get("/v1/usage")).json()
        assert mine["requests"] == 0  # /v1/usage stays the caller's own

        last = await http.patch("/admin/users/root", json={"role": "user"})
        assert last.status_code == 409  # the last admin stays one
        removed = await http.delete("/admin/users/team-a")
        assert removed.json()["deleted"] is True
        assert (await http.get("/admin/users/team-a")).status_code == 404


async def test_a_key_limited_to_some_models_is_refused_the_others(make_cluster):
    cluster = make_cluster()
    cluster.start_front()
    cluster.start_worker("worker1")
    cluster.add_user("ann")
    cluster.api_key = cluster.users("key", "ann", "--models", "some-other-model")
    await cluster.wait_ready(1)
    client = openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key=cluster.api_key)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert refused.value.body["code"] == "model_not_allowed"
    assert (await client.models.list()).data == []
    with pytest.raises(openai.NotFoundError):  # a model the key may not use is not shown either
        await client.models.retrieve(MODEL)
    await client.close()
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30,
                                 headers=cluster.headers()) as http:
        stored = await http.post("/inference/async", json=BODY)
        batch = await http.post("/inference/batch", json={"prompts": ["a"], "model": MODEL})
    assert stored.status_code == 403 and stored.json()["error"]["code"] == "model_not_allowed"
    assert batch.json()["data"][0]["error"]["code"] == "model_not_allowed"


def test_the_cli_refuses_what_the_api_refuses(make_cluster):
    cluster = make_cluster()
    cluster.add_user("solo")
    cluster.users("role", "solo", "admin")
    for args, reason in ((("role", "solo", "user"), "last enabled admin"),
                         (("limit", "solo", "--rpm", "-3"), "rpm is a whole number"),
                         (("add", "bad name", "--password-stdin"), "a username is")):
        done = subprocess.run([sys.executable, "-m", "server.users", *args], cwd=ROOT,
                              env=cluster.env, input="long-enough\n", capture_output=True,
                              text=True, timeout=60)
        assert done.returncode != 0 and reason in done.stderr, (args, done.stderr)


async def test_per_user_metrics_where_enabled_and_no_ledger_where_disabled(make_cluster):
    counted = make_cluster(COHORT_METRICS_PER_USER="1", COHORT_USAGE_LEDGER="0")
    counted.start_front()
    counted.start_worker("worker1")
    counted.api_key = counted.add_user("erin")
    await counted.wait_ready(1)
    async with httpx.AsyncClient(base_url=counted.url, timeout=30,
                                 headers=counted.headers()) as http:
        for _ in range(2):
            assert (await http.post("/v1/completions", json=BODY)).status_code == 200
        metrics = (await http.get("/metrics")).text
        no_ledger = await http.get("/v1/usage")
    assert no_ledger.status_code == 404 and "COHORT_USAGE_LEDGER" in no_ledger.json()["error"]["message"]
    assert f'cohort_user_requests_total{{model="{MODEL}",status="200",user="erin"}} 2.0' in metrics
    assert f'cohort_user_tokens_total{{kind="completion",model="{MODEL}",user="erin"}} 8.0' in metrics


def test_per_user_metrics_are_off_by_default(shared):
    httpx.post(shared.url + "/v1/completions", json=BODY, headers=shared.headers(), timeout=30)
    metrics = httpx.get(shared.url + "/metrics", headers=shared.headers(), timeout=30).text
    assert "cohort_user_" not in metrics and "cohort_requests_total" in metrics
