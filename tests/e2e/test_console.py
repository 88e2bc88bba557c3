"""The console in a real browser: Debian's Chromium, driven by Playwright, against a front and a
mock worker started as `honcho start` starts them. An admin and users sign in, mint and revoke a
key, set a limit, watch a batch run; a user sees only their own and reaches no admin action; the
session cookie, CSRF and CSP hold. Screenshots of each page go to bench/results/ for review."""

import io
import json
import shutil
from pathlib import Path

import httpx
import pytest
import trio
from playwright.sync_api import Page, expect, sync_playwright

from harness.cluster import ROOT, Cluster

SHOTS = ROOT / "bench" / "results"
PASSWORD = "correct-horse"
# A mock slow enough that a batch is seen running: 4 sequences at a time, 20 ms a token, so 40
# lines of 32 tokens take some 6 s.
SLOW = {"MOCK_TOKEN_S": "0.02", "MOCK_TTFT_S": "0", "COHORT_MAX_NUM_SEQS": "4"}


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("the console's tests need Debian's Chromium (apt-get install chromium): the "
                    "README's test command installs it; Playwright's own download is unreachable")
    return found


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("console"), **SLOW)
    cluster.start_front()
    cluster.start_worker("worker1")
    try:
        cluster.admin_key = cluster.add_user("root", PASSWORD)
        cluster.users("role", "root", "admin")
        cluster.alice_key = cluster.add_user("alice", PASSWORD)
        cluster.bob_key = cluster.add_user("bob", PASSWORD)
        cluster.carol_key = cluster.add_user("carol", PASSWORD)  # locked out by the throttle test
        cluster.dave_key = cluster.add_user("dave", PASSWORD)  # who runs a batch, unlimited
        cluster.api_key = cluster.admin_key
        trio.run(cluster.wait_workers_ready, ["worker1"], 60)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium(), headless=True,
                                              args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    # (a resource that failed to load is the API's answer, which the test checks itself: the
    # first /console/session is a 401 before anyone signed in)
    opened.on("console", lambda message: errors.append(message.text)
              if message.type == "error" and "Failed to load resource" not in message.text
              else None)
    yield opened
    context.close()
    assert not errors, f"the page reported errors: {errors}"


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"console-{name}.png"), full_page=True)


def sign_in(page: Page, gateway, username: str) -> None:
    page.goto(gateway.url + "/console")
    page.fill("#password-form input[name=username]", username)
    page.fill("#password-form input[name=password]", PASSWORD)
    page.click("#password-form button[type=submit]")
    expect(page.locator("#who-name")).to_contain_text(username)


def test_an_admin_sees_the_workers_mints_and_revokes_a_key_and_sets_a_limit(gateway, page):
    sign_in(page, gateway, "root")
    expect(page.locator("#workers tbody")).to_contain_text("worker1")
    expect(page.locator("#workers tbody")).to_contain_text("ready")
    httpx.post(gateway.url + "/v1/completions", headers=gateway.headers(gateway.alice_key),
               json={"model": "cohort-mock", "prompt": "hello", "max_tokens": 4}, timeout=30)
    expect(page.locator("#minutes tbody tr")).not_to_have_count(0)  # it updates by itself
    shot(page, "live")

    page.click("button[data-tab=tenancy]")
    row = page.locator("#users tbody tr", has_text="alice")
    row.get_by_role("button", name="Keys and limits").click()
    expect(page.locator("#detail-name")).to_have_text("alice")
    page.fill("#key-mint-form input[name=name]", "from-the-console")
    page.fill("#key-mint-form input[name=models]", "cohort-mock")
    page.click("#key-mint-form button[type=submit]")
    minted = page.locator("#minted-key")
    expect(minted).to_contain_text("ck-")
    key = minted.inner_text()
    shot(page, "tenancy")
    assert httpx.get(gateway.url + "/v1/models", headers=gateway.headers(key)).status_code == 200
    page.locator("#keys tbody tr", has_text="from-the-console").get_by_role(
        "button", name="Revoke").click()
    expect(page.locator("#keys tbody tr", has_text="from-the-console")).to_contain_text("true")
    # revoked at once on this front (a change clears its credential cache)
    assert httpx.get(gateway.url + "/v1/models", headers=gateway.headers(key)).status_code == 401

    page.fill("#limits-form input[name=rpm]", "7")
    page.fill("#limits-form input[name=weight]", "2")
    page.click("#limits-form button[type=submit]")
    expect(page.locator("#limits-now")).to_contain_text("rpm 7")
    limits = httpx.get(gateway.url + "/admin/users/alice/limits", headers=gateway.headers()).json()
    assert limits["limits"]["rpm"] == 7 and limits["limits"]["weight"] == 2


def test_a_user_sees_only_their_own_and_reaches_no_admin_action(gateway, page):
    httpx.post(gateway.url + "/v1/completions", headers=gateway.headers(gateway.alice_key),
               json={"model": "cohort-mock", "prompt": "alice was here", "max_tokens": 4})
    page.goto(gateway.url + "/console")
    page.fill("#key-form input[name=api_key]", gateway.bob_key)  # with an API key this time
    page.click("#key-form button[type=submit]")
    expect(page.locator("#who-name")).to_contain_text("bob (user)")
    expect(page.locator("button[data-tab=tenancy]")).to_be_hidden()
    page.click("button[data-tab=usage]")
    expect(page.locator("#usage-total")).to_contain_text("0 requests")  # alice's are not bob's
    expect(page.locator("#usage-form option[value=user]")).to_be_hidden()
    shot(page, "usage-user")
    # what the page could do by hand: the admin routes refuse it, with or without its token
    answers = page.evaluate("""async () => {
        const session = await (await fetch('/console/session')).json();
        const statuses = [];
        for (const [method, path, csrf] of [['GET', '/admin/users', false],
                                            ['POST', '/admin/users', true],
                                            ['GET', '/admin/usage', false]]) {
            const headers = {'Content-Type': 'application/json'};
            if (csrf) headers['X-CSRF-Token'] = session.csrf_token;
            const r = await fetch(path, {method, headers,
                body: method === 'POST' ? JSON.stringify({username: 'mallory', password: 'x'}) : undefined});
            statuses.push(r.status);
        }
        return {statuses, cookie: document.cookie};
    }""")
    assert answers["statuses"] == [403, 403, 403]
    assert "cohort_session" not in answers["cookie"]  # HttpOnly: no script reads it


def test_a_running_batch_progresses_on_the_work_page(gateway, page):
    lines = "".join(json.dumps({"custom_id": f"line-{i}", "method": "POST",
                                "url": "/v1/completions",
                                "body": {"model": "cohort-mock", "prompt": f"line {i}",
                                         "max_tokens": 32, "ignore_eos": True}}) + "\n"
                    for i in range(40))
    dave = gateway.headers(gateway.dave_key)
    upload = httpx.post(gateway.url + "/v1/files", headers=dave, data={"purpose": "batch"},
                        files={"file": ("lines.jsonl", io.BytesIO(lines.encode()))}).json()
    batch = httpx.post(gateway.url + "/v1/batches", headers=dave, json={
        "input_file_id": upload["id"], "endpoint": "/v1/completions",
        "completion_window": "24h"}).json()
    sign_in(page, gateway, "dave")
    page.click("button[data-tab=work]")
    row = page.locator("#batches tbody tr", has_text=batch["id"])
    expect(row).to_be_visible()
    expect(page.locator("#files tbody")).to_contain_text(upload["id"])
    cells = row.locator("td")
    expect(cells.nth(1)).to_have_text("in_progress")
    expect(cells.nth(3)).not_to_have_text("0", timeout=30_000)  # lines done, as they finish
    assert int(cells.nth(3).inner_text()) < 40
    shot(page, "work-running")
    expect(row).to_contain_text("completed", timeout=60_000)  # it updates by itself
    assert cells.nth(3).inner_text() == "40" and cells.nth(5).inner_text() == "40"
    shot(page, "work")


def test_an_admin_sees_every_users_work_with_whose_it_is(gateway, page):
    carol = gateway.headers(gateway.carol_key)
    task = httpx.post(gateway.url + "/inference/async", headers=carol, json={
        "model": "cohort-mock", "messages": [{"role": "user", "content": "carol's task"}]}).json()
    sign_in(page, gateway, "root")
    page.click("button[data-tab=work]")
    row = page.locator("#tasks tbody tr", has_text=task["id"])
    expect(row).to_contain_text("carol")
    expect(row).to_contain_text("completed")  # it updates by itself
    expect(page.locator("#files")).to_be_hidden()  # files stay their owners' own
    shot(page, "work-admin")


def test_usage_shows_a_table_a_chart_and_a_csv(gateway, page):
    sign_in(page, gateway, "root")
    page.click("button[data-tab=usage]")
    page.select_option("#usage-form select[name=group_by]", "user")
    page.click("#usage-form button[type=submit]")
    expect(page.locator("#usage-table tbody")).to_contain_text("alice")
    expect(page.locator("#usage-chart canvas")).to_have_count(1)
    shot(page, "usage-admin")
    href = page.get_attribute("#usage-csv", "href")
    csv_text = page.evaluate("async (href) => (await fetch(href)).text()", href)
    assert csv_text.splitlines()[0] == "user,requests,prompt_tokens,completion_tokens"
    assert any(line.startswith("alice,") for line in csv_text.splitlines())


def test_the_session_cookie_csrf_and_page_headers_hold(gateway):
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        page = http.get("/console")
        assert page.status_code == 200 and "script-src 'self'" in page.headers[
            "content-security-policy"] and "frame-ancestors 'none'" in page.headers[
            "content-security-policy"]
        assert "ck-" not in page.text and "csrf" not in page.text.lower()  # nothing secret
        assert http.get("/console/assets/../../common/config.py").status_code == 404
        signed = http.post("/console/session", json={"username": "root", "password": PASSWORD})
        cookie = signed.headers["set-cookie"]
        for attribute in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/", "Max-Age=3600"):
            assert attribute in cookie
        session = signed.json()
        credential = cookie.split(";")[0].split("=", 1)[1]
        jar = {"Cookie": f"cohort_session={credential}"}  # as a browser sends it
        assert http.get("/admin/users", headers=jar).status_code == 200  # reading: no token
        made = http.post("/admin/users", headers=jar, json={"username": "eve", "password": "pw"})
        assert made.status_code == 403 and made.json()["error"]["code"] == "csrf_token_missing"
        made = http.post("/admin/users", headers={**jar, "X-CSRF-Token": "0" * 40},
                         json={"username": "eve", "password": "pw-pw-pw-pw"})
        assert made.status_code == 403
        out = http.delete("/console/session",
                          headers={**jar, "X-CSRF-Token": session["csrf_token"]})
        assert out.status_code == 200 and "Max-Age=0" in out.headers["set-cookie"]
        assert http.get("/admin/users", headers=jar).status_code == 401  # the token is gone
        statuses = [http.post("/console/session", json={"username": "carol", "password": "no"})
                    for _ in range(8)]  # the login throttle counts console sign-ins too
        assert [r.status_code for r in statuses[:5]] == [401] * 5  # its free failures
        assert statuses[-1].status_code == 429 and "Retry-After" in statuses[-1].headers
