"""`GET /v1/usage`: the caller's requests and tokens over a period, in total and per model, key
or day, from the usage ledger (which lags the requests by about a second)."""

from __future__ import annotations

import datetime

from quart import Blueprint, request

from server.errors import BadRequest, NotFound
from server.routes.context import caller, services
from server.store import USAGE_GROUPS, utcnow

blueprint = Blueprint("usage", __name__)


def _moment(name: str, default: datetime.datetime) -> datetime.datetime:
    """A time given as Unix seconds (OpenAI's usage API) or an ISO date or date-time (UTC)."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        if raw.lstrip("-").isdigit():
            return datetime.datetime.fromtimestamp(int(raw), datetime.timezone.utc).replace(
                tzinfo=None)
        moment = datetime.datetime.fromisoformat(raw)
    except (ValueError, OverflowError, OSError):
        raise BadRequest(f"{name} must be Unix seconds or an ISO date (UTC)", param=name) from None
    return moment.astimezone(datetime.timezone.utc).replace(tzinfo=None) if moment.tzinfo else moment


@blueprint.get("/v1/usage")
async def usage():
    principal = await caller()
    return await usage_report(principal.user_id)


async def usage_report(user_id: int | None) -> dict:
    """The usage of one user (None: everyone) over the query's period, grouped as it asks."""
    if not services().usage.enabled:
        raise NotFound("this gateway keeps no usage ledger (COHORT_USAGE_LEDGER=0)")
    now = utcnow()
    start = _moment("start", datetime.datetime.combine(now.date(), datetime.time()))
    end = _moment("end", now + datetime.timedelta(seconds=1))
    group_by = request.args.get("group_by") or None
    if group_by is not None and group_by not in USAGE_GROUPS:
        raise BadRequest(f"group_by is one of {', '.join(USAGE_GROUPS)}", param="group_by")
    store = services().store
    totals = await store.run(store.usage_of, user_id, start, end, group_by)
    return {"object": "usage", "start": start.isoformat() + "Z", "end": end.isoformat() + "Z",
            "group_by": group_by, **totals}
