"""The one database every model lives in (bound at start by server.store.Store), and the
conventions they share: naive UTC datetimes, shown as ISO 8601 with their zone."""

from __future__ import annotations

import datetime

import peewee

database = peewee.DatabaseProxy()


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def stamp(value: datetime.datetime | None) -> str | None:
    return value.replace(tzinfo=datetime.timezone.utc).isoformat() if value else None


def unix(value: datetime.datetime | None) -> int | None:
    """Unix seconds, as OpenAI's objects give times."""
    return int(value.replace(tzinfo=datetime.timezone.utc).timestamp()) if value else None


class BaseModel(peewee.Model):
    class Meta:
        database = database
