"""`POST /token`: an OAuth2 password login (form or JSON) that returns a bearer token."""

from __future__ import annotations

from quart import Blueprint, request

from server.errors import BadRequest
from server.routes.context import services, json_body

blueprint = Blueprint("tokens", __name__)


@blueprint.post("/token")
async def token():
    if request.mimetype == "application/json":
        body = await json_body()
        if not isinstance(body, dict):
            raise BadRequest("the request body is not a JSON object")
    else:
        body = await request.form
    username, password = body.get("username"), body.get("password")
    if not isinstance(username, str) or not isinstance(password, str) or not username:
        raise BadRequest("send username and password (form fields or JSON)", param="username")
    return await services().auth.login(username, password, request.remote_addr or "")
