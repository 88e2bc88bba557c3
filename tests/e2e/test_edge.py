"""Odd but legal, or hostile, bodies on every route that takes one: a 100,000-deep JSON document
is a 400 in OpenAI's shape (never a 500), and a raw U+2028 inside a JSON string is valid JSON,
accepted on the JSON routes and in a batch file's lines."""

import json

import httpx
import pytest
import trio

from harness.cluster import Cluster, descendants
from server.routes.docs import openapi

DEEP = "[" * 100_000 + "]" * 100_000
SEPARATOR = "\u2028"  # LINE SEPARATOR: JSON allows it raw inside a string
PARAMS = {"{name}": "root", "{key_id}": "1"}


def json_routes() -> list[tuple[str, str]]:
    """Every route of the OpenAPI document whose body is JSON."""
    found = []
    for path, operations in openapi()["paths"].items():
        for method, operation in operations.items():
            if "application/json" in operation.get("requestBody", {}).get("content", {}):
                for name, value in PARAMS.items():
                    path = path.replace(name, value)
                found.append((method.upper(), path))
    return found


@pytest.fixture(scope="module")
def admin(tmp_path_factory):
    """A front with one mock worker and an admin's key, so the admin routes read their bodies."""
    cluster = Cluster(tmp_path_factory.mktemp("edge"))
    cluster.start_front()
    cluster.start_worker("worker1")
    try:
        cluster.api_key = cluster.add_user("root")
        cluster.users("role", "root", "admin")
        trio.run(cluster.wait_ready, 1)
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.parametrize("method, path", json_routes())
def test_a_deeply_nested_body_is_a_400_on_every_json_route(admin, method, path):
    answer = httpx.request(method, admin.url + path, content=DEEP, timeout=30,
                           headers={**admin.headers(), "Content-Type": "application/json"})
    assert answer.status_code == 400, (path, answer.text[:300])
    assert "nested too deeply" in answer.json()["error"]["message"]


def upload(cluster, text: str) -> httpx.Response:
    return httpx.post(cluster.url + "/v1/files", headers=cluster.headers(), timeout=30,
                      data={"purpose": "batch"}, files={"file": ("in.jsonl", text.encode())})


def chat_line(custom_id: str, content: str) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "cohort-mock", "max_tokens": 2, "messages": [
                           {"role": "user", "content": content}]}}, ensure_ascii=False)


def test_a_deeply_nested_line_in_a_batch_file_is_a_400_naming_the_line(admin):
    answer = upload(admin, chat_line("a", "fine") + "\n" + DEEP + "\n")
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == "line 2: nested too deeply"


def test_a_raw_line_separator_inside_a_string_is_valid_json_everywhere(admin):
    content = f"one{SEPARATOR}two"
    answer = upload(admin, chat_line("a", content) + "\r\n" + chat_line("b", "x") + "\n")
    assert answer.status_code == 200, answer.text
    assert answer.json()["lines"] == 2
    body = json.dumps({"model": "cohort-mock", "max_tokens": 2, "messages": [
        {"role": "user", "content": content}]}, ensure_ascii=False)
    chat = httpx.post(admin.url + "/v1/chat/completions", content=body.encode(), timeout=30,
                      headers={**admin.headers(), "Content-Type": "application/json"})
    assert chat.status_code == 200, chat.text


def test_a_stranger_learns_readiness_not_what_is_served(admin):
    anonymous = httpx.get(admin.url + "/ready")
    assert anonymous.status_code == 200 and anonymous.json() == {"ready": True}
    known = httpx.get(admin.url + "/ready", headers=admin.headers()).json()
    assert known == {"ready": True, "models": ["cohort-mock"]}
    wrong = httpx.get(admin.url + "/ready", headers={"Authorization": "Bearer nope"})
    assert wrong.json() == {"ready": True}  # a probe with a bad token is still a probe
    assert httpx.get(admin.url + "/health").json() == {"status": "ok"}


async def test_an_operator_may_show_the_models_to_anyone(make_cluster):
    cluster = make_cluster(COHORT_PUBLIC_MODELS="1")
    cluster.start_front()
    cluster.start_worker("worker1")
    cluster.api_key = cluster.add_user("ops")
    await cluster.wait_ready(1)
    async with httpx.AsyncClient() as http:
        assert (await http.get(cluster.url + "/ready")).json()["models"] == ["cohort-mock"]


def peak_rss_kb(pid: int) -> int:
    """The largest peak resident size among a process and its descendants (the app's worker)."""
    peaks = []
    for each in {pid, *descendants(pid)}:
        try:
            with open(f"/proc/{each}/status") as status:
                peaks += [int(line.split()[1]) for line in status if line.startswith("VmHWM:")]
        except OSError:
            continue
    return max(peaks)


def test_an_upload_streams_into_the_store_in_bounded_memory(admin):
    """A 40 MB file of 40,000 lines: the front's peak memory grows by about 15 MB, as for a file
    of 20 or 80 MB (it held the file several times over: 63 to 280 MB for a 53.5 MB file), and
    the file comes back whole."""
    padding = "x" * 900
    text = "".join(chat_line(f"c{i}", f"{i} {padding}") + "\n" for i in range(40_000))
    before = peak_rss_kb(admin.procs["front"].pid)
    answer = upload(admin, text)
    assert answer.status_code == 200, answer.text[:300]
    assert answer.json()["lines"] == 40_000 and answer.json()["bytes"] == len(text.encode())
    grown_mb = (peak_rss_kb(admin.procs["front"].pid) - before) / 1024
    assert grown_mb < 32, f"the front's peak memory grew by {grown_mb:.0f} MB"  # here: ~15
    content = httpx.get(f"{admin.url}/v1/files/{answer.json()['id']}/content",
                        headers=admin.headers(), timeout=60)
    assert content.content == text.encode()


@pytest.mark.parametrize("method, path", json_routes())
def test_a_raw_line_separator_is_never_refused_as_invalid_json(admin, method, path):
    """Whatever else a route says of this body (an unknown field, a missing one), it reads it."""
    body = ('{"x": "one' + SEPARATOR + 'two"}').encode()
    answer = httpx.request(method, admin.url + path, content=body, timeout=30,
                           headers={**admin.headers(), "Content-Type": "application/json"})
    assert answer.status_code < 500, (path, answer.text[:300])
    assert "not valid JSON" not in answer.text, path


def test_start_up_is_logged_once(admin):
    """hypercorn's own handler printed "Running on" a second time, and a worker that said hello
    again before its first welcome logged its registration twice."""
    assert admin.log("front").count("Running on") == 1
    assert admin.log("worker1").count("registered with front") == 1
