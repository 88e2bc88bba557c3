"""What every route needs: the app's gateway, the caller, and the JSON body."""

from __future__ import annotations

from typing import Any

from quart import current_app, g, request

from server.auth import Principal
from server.errors import BadRequest
from server.gateway import Gateway


def gateway() -> Gateway:
    return current_app.gateway  # type: ignore[attr-defined]


async def caller() -> Principal:
    """The authenticated caller (Unauthorized otherwise)."""
    principal = await gateway().auth.authenticate(request.headers.get("Authorization"))
    g.principal = principal
    return principal


async def json_body() -> Any:
    """The parsed JSON body, or a 400 that says it is not JSON."""
    body = await request.get_json(force=True, silent=True)
    if body is None:
        raise BadRequest("the request body is not valid JSON")
    return body
