"""The admin API: users, their roles, API keys and limits over HTTP, and everyone's usage; for
callers whose user has the admin role (the first admin is made with the CLI: there is none by
default). Every change goes through `server.accounts`, the CLI's own checks.

A change takes effect on this front at once and on the others within COHORT_AUTH_CACHE_S.
"""

from __future__ import annotations

from typing import Any

import trio
from quart import Blueprint, request

from server import accounts
from server.auth import Principal, digest, hash_password, new_api_key
from server.errors import BadRequest, CohortError, Conflict, NotFound, PermissionDenied
from server.routes.context import caller, json_body, limit_arg, services
from server.routes.usage import usage_report

blueprint = Blueprint("admin", __name__)


async def _admin() -> Principal:
    principal = await caller()
    if services().settings.auth_disabled:
        raise PermissionDenied("the admin API is off while authentication is disabled "
                               "(COHORT_AUTH_DISABLED)")
    if principal.role != "admin":
        raise PermissionDenied("this route is for admins; an admin makes one with "
                               "`python -m server.users role NAME admin`")
    return principal


async def _call(call, *args: Any, **kwargs: Any) -> Any:
    """Run an account query or change in a store thread; a refusal becomes its HTTP error."""
    store = services().store
    try:
        return await store.run(lambda: call(store, *args, **kwargs))
    except accounts.AccountError as error:
        kind: type[CohortError] = {404: NotFound, 409: Conflict}.get(error.status, BadRequest)
        raise kind(error.message, param=error.param) from None


async def _change(change, *args: Any, **kwargs: Any) -> Any:
    """An account change, seen by this front's next request (its credential cache is dropped);
    work it stopped (a disabled or removed user's tasks) stops here at once, not at the next
    lease renewal (the other fronts' within a third of COHORT_TASK_LEASE_S, their batches
    within a second)."""
    result = await _call(change, *args, **kwargs)
    services().auth.forget()
    await services().tasks.stop_lost()
    return result


async def _object() -> dict[str, Any]:
    body = await json_body()
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _unknown(body: dict[str, Any], known: tuple[str, ...]) -> None:
    extra = sorted(set(body) - set(known))
    if extra:
        raise BadRequest(f"unknown field {', '.join(extra)}; this route takes {', '.join(known)}",
                         param=extra[0])


async def _password_hash(password: Any) -> str:
    try:
        accounts.check_password(password)
    except accounts.AccountError as error:
        raise BadRequest(error.message, param=error.param) from None
    return await trio.to_thread.run_sync(hash_password, password)


def _view(store, name: str, with_keys: bool = False) -> dict[str, Any]:
    user = accounts.user(store, name)
    view = store.user_view(user)
    if with_keys:
        view["keys"] = store.keys_of(user)
    return view


@blueprint.post("/admin/users")
async def add_user():
    await _admin()
    body = await _object()
    _unknown(body, ("username", "password", "role"))
    password_hash = await _password_hash(body.get("password"))
    await _change(accounts.add_user, body.get("username"), password_hash,
                  body.get("role", "user"))
    return await _call(_view, body["username"]), 201


@blueprint.get("/admin/users")
async def list_users():
    await _admin()
    store = services().store
    users = await store.run(lambda: [store.user_view(user) for user in store.users()])
    return {"object": "list", "data": users}


@blueprint.get("/admin/users/<name>")
async def show_user(name: str):
    await _admin()
    return await _call(_view, name, True)


@blueprint.patch("/admin/users/<name>")
async def update_user(name: str):
    await _admin()
    body = await _object()
    _unknown(body, ("disabled", "role", "password"))
    password_hash = await _password_hash(body["password"]) if "password" in body else None
    await _change(accounts.update_user, name, disabled=body.get("disabled"),
                  role=body.get("role"), password_hash=password_hash)
    return await _call(_view, name, True)


@blueprint.delete("/admin/users/<name>")
async def remove_user(name: str):
    await _admin()
    await _change(accounts.remove_user, name)
    return {"object": "user.deleted", "username": name, "deleted": True}


@blueprint.post("/admin/users/<name>/keys")
async def add_key(name: str):
    """A new API key: shown in this answer only, stored as its digest."""
    await _admin()
    body = await _object()
    _unknown(body, ("name", "models"))
    api_key = new_api_key()
    token = await _change(accounts.add_key, name, digest(api_key), body.get("name", ""),
                          body.get("models"))
    store = services().store
    return {**await store.run(store.key_view, token), "key": api_key}, 201


@blueprint.get("/admin/users/<name>/keys")
async def list_keys(name: str):
    await _admin()
    return {"object": "list",
            "data": await _call(lambda store, n: store.keys_of(accounts.user(store, n)), name)}


@blueprint.delete("/admin/users/<name>/keys/<int:key_id>")
async def revoke_key(name: str, key_id: int):
    await _admin()
    token = await _change(accounts.revoke_key, name, key_id)
    store = services().store
    return await store.run(store.key_view, token)


@blueprint.route("/admin/users/<name>/limits", methods=["GET", "PUT", "DELETE"])
@blueprint.route("/admin/users/<name>/keys/<int:key_id>/limits", methods=["GET", "PUT", "DELETE"])
async def limits(name: str, key_id: int | None = None):
    """A user's or key's limits: GET them, PUT some (the others keep theirs), DELETE all."""
    await _admin()
    subject = await _call(accounts.subject, name, key_id)
    if request.method == "PUT":
        values = await _change(accounts.set_limits, subject, await _object())
    elif request.method == "DELETE":
        await _change(lambda store, subj: store.clear_limits(subj), subject)
        values = None
    else:
        values = await _call(lambda store, subj: store.limits_of(subj), subject)
    return {"object": "limits", "subject": subject, "limits": values}


@blueprint.get("/admin/work")
async def work():
    """Every user's newest async tasks and Batch API batches (`limit`, 1 to 100, each)."""
    await _admin()
    limit = limit_arg(50)
    store = services().store
    return {"object": "admin.work", **await store.run(store.everyones_work, limit)}


@blueprint.get("/admin/usage")
async def usage():
    """Everyone's usage (or one user's with `user=NAME`), with `group_by=user` beside the rest."""
    await _admin()
    name = request.args.get("user") or None
    user_id = None
    if name is not None:
        user_id = (await _call(accounts.user, name)).id
    return await usage_report(user_id)
