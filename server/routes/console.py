"""The operator's console at `/console`: one page, served by the front, reading the JSON routes.

The page and its few assets are static files (server/console/), so there is nothing to build and
nothing secret in them: what a visitor sees comes from the routes after signing in, with what
that session may see (an admin everyone's, a user their own). Signing in sets the session cookie
(server.console_session); the routes here are only what the page needs beyond the API: the
session itself, and the last hour minute by minute (`/console/live`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from quart import Blueprint, Response, request

from server.auth import API_KEY_PREFIX
from server.console_session import SESSION_COOKIE, cleared_cookie, cookie, csrf_token
from server.errors import BadRequest, NotFound, Unauthorized
from server.routes.context import caller, json_body, services

blueprint = Blueprint("console", __name__)

PAGES = Path(__file__).resolve().parents[1] / "console"
TYPES = {  # what the page loads, and nothing else from that folder
    "index.html": "text/html", "console.js": "text/javascript", "console.css": "text/css",
    "vendor/uplot/uPlot.iife.min.js": "text/javascript",
    "vendor/uplot/uPlot.min.css": "text/css"}
# Read once, as the front starts (some 60 kB): no request reads a file on the trio loop.
FILES = {name: (PAGES / name).read_bytes() for name in TYPES}
# Scripts and styles from this origin only (no inline script, no eval), data from this origin
# only, never framed: a script injected into the page's data has nowhere to run.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def _static(name: str) -> Response:
    response = Response(FILES[name], mimetype=TYPES[name])
    response.headers.update({
        "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache"})
    return response


@blueprint.get("/console")
async def page():
    return _static("index.html")


@blueprint.get("/console/assets/<path:name>")
async def asset(name: str):
    if name not in FILES or name == "index.html":
        raise NotFound(f"the console has no asset {name!r}")
    return _static(name)


def _session(principal, credential: str) -> dict[str, object]:
    return {"object": "console.session", "username": principal.username, "role": principal.role,
            "csrf_token": csrf_token(credential)}


@blueprint.post("/console/session")
async def sign_in():
    """Sign in with a username and password (a login token is minted, as by `/token`, under
    the same login throttle) or with an API key; the session cookie carries it."""
    body = await json_body()
    if not isinstance(body, dict):
        raise BadRequest("send a JSON object: username and password, or api_key")
    cohort, address = services(), request.remote_addr or ""
    if cohort.settings.auth_disabled:
        raise BadRequest("authentication is disabled (COHORT_AUTH_DISABLED): there is no one to "
                         "sign in as")
    if isinstance(body.get("api_key"), str):
        credential = body["api_key"]
        principal = await cohort.auth.sign_in_with_key(credential, address)
    elif isinstance(body.get("username"), str) and isinstance(body.get("password"), str):
        login = await cohort.auth.login(body["username"], body["password"], address)
        credential = str(login["access_token"])
        principal = await cohort.auth.authenticate(f"Bearer {credential}")
    else:
        raise BadRequest("send username and password, or api_key", param="username")
    response = Response(json.dumps(_session(principal, credential)), mimetype="application/json")
    response.headers["Set-Cookie"] = cookie(credential, cohort.settings.token_ttl_s)
    response.headers["Cache-Control"] = "no-store"
    return response


@blueprint.get("/console/session")
async def who():
    """Who this session is, and its CSRF token (the page keeps it in memory, not in storage)."""
    principal = await caller()
    credential = request.cookies.get(SESSION_COOKIE)
    if not credential:
        raise Unauthorized("no console session: sign in with POST /console/session")
    return _session(principal, credential)


@blueprint.delete("/console/session")
async def sign_out():
    """End the session: a login token is revoked, an API key only forgotten by the browser."""
    await caller()  # with its CSRF token: another site cannot sign you out either
    credential = request.cookies.get(SESSION_COOKIE, "")
    cohort = services()
    if credential and not credential.startswith(API_KEY_PREFIX):
        await cohort.auth.revoke_token(credential)
    response = Response(json.dumps({"object": "console.session", "signed_in": False}),
                        mimetype="application/json")
    response.headers["Set-Cookie"] = cleared_cookie()
    return response


@blueprint.get("/console/live")
async def live():
    """The last hour minute by minute (requests, errors, TTFT and end-to-end p50/p99), the
    workers as /health shows them, and what waits in each model's queue."""
    await caller()
    cohort, now = services(), time.time()
    return {"object": "console.live", "now": now, "minutes": cohort.gateway.live.report(now),
            "workers": cohort.dispatcher.describe_workers(),
            "queued": cohort.scheduler.queued_by_tier()}

