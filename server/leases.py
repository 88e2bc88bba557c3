"""Leases on store rows (async tasks, Batch API batches): which front runs a row, and until when.

A leased model has `owner`, `lease_until`, `status` and `created_at` columns. The owner renews all
its leases in one statement; a lapsed lease (or none) is taken over by compare-and-set on the
owner and lease read, so of several fronts that try at once exactly one wins each row; a front
that stops gives its rows back at once. `now` always comes from the caller, so tests move time by
hand; fronts' clocks must agree to well within a lease.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any



def renew(model: Any, owner: str, until: datetime.datetime,
          active: Sequence[str]) -> set[str]:
    """Extend every active lease of `owner` in one statement; the ids it still holds."""
    with model._meta.database.atomic():
        model.update(lease_until=until).where(
            model.owner == owner, model.status.in_(active)).execute()
        return {row.id for row in model.select(model.id).where(
            model.owner == owner, model.status.in_(active))}


def claim_lapsed(model: Any, owner: str, now: datetime.datetime,
                 until: datetime.datetime, limit: int, active: Sequence[str]) -> list:
    """Take over up to `limit` active rows whose lease lapsed (oldest first); the rows won."""
    candidates = list(model.select().where(
        model.status.in_(active), model.lease_until.is_null() | (model.lease_until < now))
        .order_by(model.created_at).limit(limit))
    won = []
    for row in candidates:
        if model.update(owner=owner, lease_until=until).where(
                model.id == row.id, model.status.in_(active),
                model.owner.is_null() if row.owner is None else model.owner == row.owner,
                model.lease_until.is_null() if row.lease_until is None
                else model.lease_until == row.lease_until).execute():
            won.append(row)
    return won


def release(model: Any, owner: str, ids: list[str],
            active: Sequence[str]) -> int:
    """Give rows back at once (a stopping front), for another front to take over now."""
    return model.update(owner=None, lease_until=None).where(
        model.owner == owner, model.id.in_(ids), model.status.in_(active)).execute()
