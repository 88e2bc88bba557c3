"""Bearer checks in virtual time: a revoked key is refused once the auth cache's bound passes."""

import pytest
import trio

from common.config import ServerSettings, load
from server.auth import Auth, digest
from server.errors import Unauthorized
from server.store import TokenOwner


class Tokens:
    """The store's token lookup, in memory."""

    def __init__(self) -> None:
        self.users: dict[str, TokenOwner] = {}
        self.lookups = 0

    async def run(self, call, *args):
        return call(*args)

    def user_for_token(self, token_digest: str):
        self.lookups += 1
        return self.users.get(token_digest)


async def test_a_revoked_key_is_refused_within_the_cache_bound(autojump_clock):
    store = Tokens()
    store.users[digest("ck-alice")] = TokenOwner(1, "alice", "user", 3, None, {})
    auth = Auth(load(ServerSettings, env={}, auth_cache_s=5.0), store)
    assert (await auth.authenticate("Bearer ck-alice")).username == "alice"
    del store.users[digest("ck-alice")]  # revoked in the store, by any front or the CLI
    await trio.sleep(4.9)
    assert (await auth.authenticate("Bearer ck-alice")).username == "alice"  # cached
    assert store.lookups == 1  # the hot path asked the store once
    await trio.sleep(0.2)
    with pytest.raises(Unauthorized):
        await auth.authenticate("Bearer ck-alice")


async def test_headers_that_are_not_bearer_credentials_are_refused_without_the_store():
    store = Tokens()
    auth = Auth(load(ServerSettings, env={}), store)
    for header in (None, "", "Basic abc", "Bearer ", "Bearer"):
        with pytest.raises(Unauthorized):
            await auth.authenticate(header)
    assert store.lookups == 0
