"""`GET /v1/usage`: the caller's requests and tokens over a period, in total and per model, key
or day, from the usage ledger (which lags the requests by about a second); `format=csv` gives
the same as a spreadsheet's download."""

from __future__ import annotations

import csv
import datetime
import io

from quart import Blueprint, Response, request

from server.errors import BadRequest, NotFound
from server.routes.context import caller, services
from server.store import USAGE_GROUPS, utcnow

blueprint = Blueprint("usage", __name__)
COUNTS = ("requests", "prompt_tokens", "completion_tokens")


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


async def usage_report(user_id: int | None) -> dict | Response:
    """The usage of one user (None: everyone) over the query's period, grouped as it asks."""
    if not services().usage.enabled:
        raise NotFound("this gateway keeps no usage ledger (COHORT_USAGE_LEDGER=0)")
    now = utcnow()
    start = _moment("start", datetime.datetime.combine(now.date(), datetime.time()))
    end = _moment("end", now + datetime.timedelta(seconds=1))
    group_by = request.args.get("group_by") or None
    if group_by is not None and group_by not in USAGE_GROUPS:
        raise BadRequest(f"group_by is one of {', '.join(USAGE_GROUPS)}", param="group_by")
    wanted = request.args.get("format", "json")
    if wanted not in ("json", "csv"):
        raise BadRequest("format is json or csv", param="format")
    store = services().store
    totals = await store.run(store.usage_of, user_id, start, end, group_by)
    if wanted == "csv":
        return as_csv(totals, group_by, start, end)
    return {"object": "usage", "start": start.isoformat() + "Z", "end": end.isoformat() + "Z",
            "group_by": group_by, **totals}


def as_csv(totals: dict, group_by: str | None, start: datetime.datetime,
           end: datetime.datetime) -> Response:
    """The report as a spreadsheet takes it: one row per group (or the total), a download."""
    out = io.StringIO()
    columns = [group_by] if group_by else []
    writer = csv.writer(out)
    writer.writerow(columns + list(COUNTS))
    for row in totals.get("buckets", [totals]) if group_by else [totals]:
        writer.writerow([row[column] for column in columns] + [row[name] for name in COUNTS])
    name = f"cohort-usage-{start:%Y%m%d}-{end:%Y%m%d}{'-by-' + group_by if group_by else ''}.csv"
    return Response(out.getvalue(), mimetype="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})
