"""What every route needs: the app's services, the caller, and the JSON body."""

from __future__ import annotations

import json
import re
from typing import Any

from quart import current_app, g, request

from server.auth import Principal
from server.console_session import CSRF_HEADER, SESSION_COOKIE, check_csrf
from server.errors import BadRequest
from server.services import Services


def services() -> Services:
    """The app's services (built once by server.services.assemble)."""
    return current_app.services  # type: ignore[attr-defined]


async def caller() -> Principal:
    """The authenticated caller (Unauthorized otherwise): by its Authorization header, or by
    the console's session cookie, with its CSRF token on whatever changes something."""
    authorization = request.headers.get("Authorization")
    session = request.cookies.get(SESSION_COOKIE)
    if authorization is None and session:
        check_csrf(request.method, session, request.headers.get(CSRF_HEADER))
        authorization = f"Bearer {session}"
    principal = await services().auth.authenticate(authorization)
    g.principal = principal
    return principal


def limit_arg(default: int) -> int:
    """A listing's `limit` query argument: 1 to 100, or a 400 that says so."""
    try:
        limit = int(request.args.get("limit", default))
    except ValueError:
        raise BadRequest("limit must be an integer", param="limit") from None
    if not 1 <= limit <= 100:
        raise BadRequest("limit must be 1 to 100", param="limit")
    return limit


SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
INT_RANGE = (-(2**63), 2**64 - 1)  # what msgpack, and so the wire to the workers, carries


def _int(text: str) -> int:
    value = int(text)
    if not INT_RANGE[0] <= value <= INT_RANGE[1]:
        raise BadRequest(f"the request body holds the integer {text[:40]}, outside 64 bits")
    return value


async def json_body() -> Any:
    """The parsed JSON body, or a 400 that says why not: not UTF-8, not JSON, nested too deep,
    a string with a lone surrogate or an integer beyond 64 bits (valid JSON that the wire to the
    workers cannot carry on)."""
    raw = await request.get_data(cache=True, as_text=False, parse_form_data=False)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the request body is not UTF-8") from None
    try:
        body = json.loads(text, parse_int=_int)
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None
    except ValueError:
        raise BadRequest("the request body is not valid JSON") from None
    if SURROGATE_ESCAPE.search(text):  # rare: check the parsed strings only then
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("the request body holds a lone surrogate (\\ud800-\\udfff) in a "
                             "string; send text as valid Unicode") from None
    return body
