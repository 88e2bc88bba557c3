"""Who is calling: `/token` logins, bearer tokens and API keys, bcrypt password hashing in threads.

Tokens are random and long, so a SHA-256 digest is a safe thing to store and fast to look up;
passwords are not, so they get bcrypt. A verified digest is trusted for `auth_cache_s` seconds
without asking the store (so disabling a user takes effect within that time).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import secrets
from dataclasses import dataclass

import bcrypt
import peewee
import trio

from common.config import ServerSettings
from server.errors import PermissionDenied, Unauthorized
from server.limits import Limits
from server.login_throttle import LoginThrottle
from server.store import Store, utcnow

log = logging.getLogger("cohort.auth")

API_KEY_PREFIX = "ck-"
# A hash of nothing anyone knows: unknown users cost one bcrypt check too, so timing tells nothing.
_DUMMY_HASH = bcrypt.hashpw(b"no such user", bcrypt.gensalt(rounds=12)).decode()


@dataclass(frozen=True)
class Principal:
    """An authenticated caller, with the limits of its user and of its key."""

    user_id: int
    username: str
    key_id: int = 0
    limits: tuple[tuple[str, Limits], ...] = ()
    role: str = "user"  # user | admin
    models: tuple[str, ...] | None = None  # what its API key may use (None: every model)

    @property
    def tenant(self) -> str:
        return f"user:{self.user_id}"

    def share(self) -> tuple[float, str]:
        """(weight, tier) for fair shares: the key's settings over the user's."""
        weight, tier = 1.0, "interactive"
        for _, limits in self.limits:  # user first, then key
            weight, tier = limits.weight, limits.priority
        return weight, tier

    def check_model(self, model: str) -> None:
        """Refuse a model this caller's API key is not allowed to use."""
        if self.models is not None and model not in self.models:
            raise PermissionDenied(f"this API key may not use model {model!r}; it may use "
                                   f"{', '.join(self.models)}", param="model",
                                   code="model_not_allowed")


DEV_USER = "dev"  # every caller while COHORT_AUTH_DISABLED: a disabled row, so it owns tasks


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def hash_password(password: str) -> str:
    """bcrypt (slow on purpose: call it in a thread from trio)."""
    return bcrypt.hashpw(password.encode()[:72], bcrypt.gensalt(rounds=12)).decode()


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


class Auth:
    """Logs users in and checks bearer credentials against the store."""

    def __init__(self, settings: ServerSettings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self._cache: dict[str, tuple[float, Principal]] = {}
        self.throttle = LoginThrottle()
        self.dev_principal = Principal(0, DEV_USER)
        if settings.auth_disabled:
            log.warning("AUTHENTICATION IS DISABLED (COHORT_AUTH_DISABLED): every route is open "
                        "to anyone who can reach this port. Never do this outside development.")

    async def start(self) -> None:
        """With authentication off, every caller is one user row (disabled, so no token of it
        works once authentication is on again): tasks need an owner that exists."""
        if not self.settings.auth_disabled:
            return
        user = await self.store.run(self.store.user_named, DEV_USER)
        if user is None:
            password = await trio.to_thread.run_sync(hash_password, secrets.token_urlsafe(32))
            try:
                await self.store.run(self.store.add_user, DEV_USER, password)
            except peewee.IntegrityError:  # another front made it first
                pass
            await self.store.run(self.store.set_disabled, DEV_USER, True)
            user = await self.store.run(self.store.user_named, DEV_USER)
            assert user is not None  # made just now, by this front or another
        self.dev_principal = Principal(user.id, DEV_USER)

    async def login(self, username: str, password: str, address: str = "") -> dict[str, object]:
        """Check a password (same bcrypt work whether or not the user exists) and mint a token;
        repeated failures for a user or from an address lock them out for a growing time."""
        self.throttle.check(username, address, trio.current_time())
        user = await self.store.run(self.store.user_named, username)
        stored = user.password_hash if user is not None else _DUMMY_HASH
        ok = await trio.to_thread.run_sync(
            bcrypt.checkpw, password.encode()[:72], stored.encode())
        if not ok or user is None or user.disabled:
            self.throttle.failed(username, address, trio.current_time())
            raise Unauthorized("wrong username or password", code="invalid_credentials")
        self.throttle.succeeded(username)
        token = secrets.token_urlsafe(32)
        expires = utcnow() + datetime.timedelta(seconds=self.settings.token_ttl_s)
        await self.store.run(self.store.add_token, user.id, digest(token), "access", expires)
        return {"access_token": token, "token_type": "bearer",
                "expires_in": self.settings.token_ttl_s}

    async def sign_in_with_key(self, key: str, address: str = "") -> Principal:
        """The console's sign-in with an API key: the login throttle counts its failures from an
        address as it counts wrong passwords."""
        now, who = trio.current_time(), f"(an API key from {address})"  # no user to lock out
        self.throttle.check(who, address, now)
        if not key.startswith(API_KEY_PREFIX):
            self.throttle.failed(who, address, now)
            raise Unauthorized(f"an API key starts with {API_KEY_PREFIX}", code="invalid_credentials")
        try:
            return await self.authenticate(f"Bearer {key}")
        except Unauthorized:
            self.throttle.failed(who, address, now)
            raise

    async def authenticate(self, authorization: str | None) -> Principal:
        """The caller behind an `Authorization: Bearer ...` header, or Unauthorized."""
        if self.settings.auth_disabled:
            return self.dev_principal
        if not authorization:
            raise Unauthorized("missing Authorization header: send `Authorization: Bearer <token "
                               "or API key>` (get a token from POST /token)")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be `Bearer <token or API key>`")
        key = digest(token.strip())
        now = trio.current_time()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        found = await self.store.run(self.store.user_for_token, key)
        if found is None:
            raise Unauthorized("invalid, expired or revoked token")
        principal = Principal(found.user_id, found.username, found.key_id, tuple(
            (subject, Limits(**found.limits[subject]))
            for subject in (f"user:{found.user_id}", f"key:{found.key_id}")
            if subject in found.limits), found.role, found.models)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key] = (now + self.settings.auth_cache_s, principal)
        return principal

    async def revoke_token(self, token: str) -> None:
        """Sign a login token out, here at once (the other fronts within `auth_cache_s`)."""
        key = digest(token)
        await self.store.run(self.store.end_session, key)
        self._cache.pop(key, None)

    def forget(self) -> None:
        """Drop every cached credential: an admin changed users, keys or limits, and this front
        sees it at once (the others within `auth_cache_s`)."""
        self._cache.clear()
