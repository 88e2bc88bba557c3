"""Users, roles, API keys and limits as an operator changes them: the checks and changes that the
CLI (`python -m server.users`) and the admin API (`/admin/...`) share, so both refuse the same
things in the same words.

Each change is a plain function over the store, run in a store thread by the API. A password
arrives already hashed: bcrypt is slow, so the caller hashes it where it may wait.
"""

from __future__ import annotations

import math
import re
from typing import Any

from server.store import Store, Token, User

ROLES = ("user", "admin")
PRIORITIES = ("interactive", "batch")
COUNTS = ("rpm", "tpm", "concurrency", "tokens_per_day")  # 0 means none
LIMIT_NAMES = (*COUNTS, "weight", "priority")
USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
MAX_MODELS = 64


class AccountError(Exception):
    """A change the operator asked for that cannot be made; `status` is its HTTP status."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param = message, status, param


def check_username(username: Any) -> str:
    if not isinstance(username, str) or not USERNAME.fullmatch(username):
        raise AccountError("a username is 1 to 64 letters, digits or . _ @ -, starting with a "
                           "letter or digit", param="username")
    return username


def check_password(password: Any) -> str:
    """At least 8 characters; at most 72 bytes, all of which bcrypt reads (it ignores more)."""
    if not isinstance(password, str) or len(password) < 8:
        raise AccountError("a password needs at least 8 characters", param="password")
    if len(password.encode()) > 72:
        raise AccountError("a password is at most 72 bytes (bcrypt ignores the rest)",
                           param="password")
    return password


def check_role(role: Any) -> str:
    if role not in ROLES:
        raise AccountError(f"role is one of {', '.join(ROLES)}", param="role")
    return role


def check_models(models: Any) -> list[str] | None:
    """The models an API key may use; None: every model."""
    if models is None:
        return None
    if isinstance(models, str):  # the CLI's comma-separated form
        models = [name.strip() for name in models.split(",") if name.strip()]
    if (not isinstance(models, list) or not 1 <= len(models) <= MAX_MODELS
            or not all(isinstance(m, str) and 0 < len(m) <= 200 for m in models)):
        raise AccountError(f"models is a list of 1 to {MAX_MODELS} model names, or null for every "
                           "model", param="models")
    return sorted(set(models))


def check_limits(values: Any) -> dict[str, Any]:
    """Limit settings as the store keeps them; unknown names and bad values are refused by name."""
    if not isinstance(values, dict):
        raise AccountError("limits are a JSON object")
    unknown = sorted(set(values) - set(LIMIT_NAMES))
    if unknown:
        raise AccountError(f"unknown limit {', '.join(unknown)}; the limits are "
                           f"{', '.join(LIMIT_NAMES)}", param=unknown[0])
    checked = {}
    for name, value in values.items():
        if value is None:
            continue
        if name in COUNTS:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**62:
                raise AccountError(f"{name} is a whole number, 0 (no limit) or more", param=name)
        elif name == "weight":
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or not 0 < value <= 1000):
                raise AccountError("weight is a number over 0 and at most 1000", param=name)
            value = float(value)
        elif value not in PRIORITIES:
            raise AccountError(f"priority is one of {', '.join(PRIORITIES)}", param=name)
        checked[name] = value
    return checked


def user(store: Store, username: str) -> User:
    found = store.user_named(username)
    if found is None:
        raise AccountError(f"no user {username!r}", status=404)
    return found


def key(store: Store, owner: User, key_id: int | None = None, name: str | None = None) -> Token:
    """One of a user's API keys, by id or by its name (live keys only)."""
    found = store.key_of(owner, key_id) if key_id is not None else store.key_named(owner, name or "")
    if found is None:
        which = f"id {key_id}" if key_id is not None else f"named {name!r}"
        raise AccountError(f"{owner.username} has no API key {which}", status=404)
    return found


def add_user(store: Store, username: str, password_hash: str, role: str = "user") -> User:
    check_username(username)
    check_role(role)
    if store.user_named(username) is not None:
        raise AccountError(f"user {username!r} exists already", status=409, param="username")
    return store.add_user(username, password_hash, role)


def update_user(store: Store, username: str, *, disabled: bool | None = None,
                role: str | None = None, password_hash: str | None = None) -> User:
    """Enable or disable a user, change its role or password; the last admin stays one."""
    found = user(store, username)
    values: dict[str, Any] = {}
    if disabled is not None:
        if not isinstance(disabled, bool):
            raise AccountError("disabled is true or false", param="disabled")
        values["disabled"] = disabled
    if role is not None:
        values["role"] = check_role(role)
    if password_hash is not None:
        values["password_hash"] = password_hash
    if (found.role == "admin" and not found.disabled
            and (values.get("disabled") or values.get("role", "admin") != "admin")):
        _keep_an_admin(store)
    with store.db.atomic():
        store.update_user(found, **values)
        if password_hash is not None:
            store.revoke(found, kind="access")  # sessions opened with the old password end
    return user(store, username)


def remove_user(store: Store, username: str) -> None:
    found = user(store, username)
    if found.role == "admin" and not found.disabled:
        _keep_an_admin(store)
    store.remove_user(found)


def _keep_an_admin(store: Store) -> None:
    if store.admins() <= 1:
        raise AccountError("this is the last enabled admin; make another admin first", status=409)


def add_key(store: Store, username: str, token_digest: str, name: str = "",
            models: Any = None) -> Token:
    """Record a new API key (its digest) for a user, limited to `models` if given."""
    owner = user(store, username)
    if not isinstance(name, str) or len(name) > 64:
        raise AccountError("a key's name is text of at most 64 characters", param="name")
    if name and store.key_named(owner, name) is not None:
        raise AccountError(f"{username} has a live key named {name!r} already", status=409,
                           param="name")
    return store.add_token(owner, token_digest, "api_key", name=name, models=check_models(models))


def revoke_key(store: Store, username: str, key_id: int) -> Token:
    owner = user(store, username)
    found = key(store, owner, key_id)
    store.revoke(owner, found.id)
    return key(store, owner, found.id)


def subject(store: Store, username: str, key_id: int | None = None,
            key_name: str | None = None) -> str:
    """The limits subject of a user (`user:ID`) or of one of its keys (`key:ID`)."""
    owner = user(store, username)
    if key_id is None and key_name is None:
        return f"user:{owner.id}"
    return f"key:{key(store, owner, key_id, key_name).id}"


def set_limits(store: Store, limits_subject: str, values: Any) -> dict[str, Any]:
    """Set some limits of a subject (the others keep theirs); the whole set after."""
    return store.set_limits(limits_subject, **check_limits(values))
