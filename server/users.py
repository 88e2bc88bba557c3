"""`python -m server.users`: add, list, disable and enable users, mint or revoke API keys, and set
the limits and fair-share weight of a user or of one key (they take effect on every front within
COHORT_AUTH_CACHE_S).

Works on the same store as the front (DATABASE_URL, or the SQLite file under COHORT_DATA_DIR).
Passwords are read from a prompt or stdin, never from the command line (it lands in shell history).
"""

from __future__ import annotations

import argparse
import getpass
import sys

import peewee

from common.config import ServerSettings, load
from server.auth import digest, hash_password, new_api_key
from server.store import Store, Token, User


def _password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            sys.exit("the passwords differ")
    if len(password) < 8:
        sys.exit("a password needs at least 8 characters")
    return password


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.users", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="add a user")
    add.add_argument("username")
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    sub.add_parser("list", help="list users")
    for name in ("disable", "enable"):
        sub.add_parser(name, help=f"{name} a user").add_argument("username")
    key = sub.add_parser("key", help="mint an API key for a user (printed once, stored hashed)")
    key.add_argument("username")
    key.add_argument("--name", default="", help="a label to tell keys apart")
    revoke = sub.add_parser("revoke-keys", help="revoke every API key and token of a user")
    revoke.add_argument("username")
    limit = sub.add_parser("limit", help="set a user's (or, with --key, one key's) limits; "
                                         "0 means none; unset ones keep their value")
    limit.add_argument("username")
    limit.add_argument("--key", metavar="NAME", help="the key's name (from `key --name`)")
    for flag, kind, what in (("--rpm", int, "requests per minute"),
                             ("--tpm", int, "tokens per minute (prompt and completion)"),
                             ("--concurrency", int, "requests running at once"),
                             ("--tokens-per-day", int, "tokens per UTC day"),
                             ("--weight", float, "share of a busy model against other users (1)")):
        limit.add_argument(flag, type=kind, help=what)
    limit.add_argument("--priority", choices=["interactive", "batch"],
                       help="batch: its requests only take capacity nobody else waits for")
    sub.add_parser("limits", help="list every limit set")
    args = parser.parse_args(argv)

    store = Store(load(ServerSettings).db_url)
    store.create_schema()
    with store.db.connection_context():
        if args.command == "add":
            try:
                store.add_user(args.username, hash_password(_password(args.password_stdin)))
            except peewee.IntegrityError:
                sys.exit(f"user {args.username!r} exists already")
            print(f"added user {args.username}")
        elif args.command == "list":
            for user in store.users():
                keys = Token.select().where(Token.user == user, Token.kind == "api_key",
                                            Token.revoked == False).count()  # noqa: E712
                print(f"{user.username}\t{'disabled' if user.disabled else 'enabled'}\t"
                      f"{keys} api key(s)\tsince {user.created_at:%Y-%m-%d}")
        elif args.command == "limits":
            names = {user.id: user.username for user in store.users()}
            keys = {token.id: (names.get(token.user_id, "?"), token.name)
                    for token in Token.select().where(Token.kind == "api_key")}
            for subject, values in store.all_limits().items():
                kind, _, number = subject.partition(":")
                who = (names.get(int(number), "?") if kind == "user"
                       else "{} key {!r}".format(*keys.get(int(number), ("?", "?"))))
                print(f"{who}\t" + "\t".join(f"{k}={v}" for k, v in values.items()))
        elif args.command in ("disable", "enable"):
            if not store.set_disabled(args.username, args.command == "disable"):
                sys.exit(f"no user {args.username!r}")
            print(f"{args.command}d {args.username}")
        else:
            user = store.user_named(args.username)
            if user is None:
                sys.exit(f"no user {args.username!r}")
            if args.command == "limit":
                subject = f"user:{user.id}"
                if args.key is not None:
                    token = Token.get_or_none(Token.user == user, Token.kind == "api_key",
                                              Token.name == args.key, Token.revoked == False)  # noqa: E712
                    if token is None:
                        sys.exit(f"{args.username} has no live key named {args.key!r}")
                    subject = f"key:{token.id}"
                values = {name: getattr(args, name) for name in
                          ("rpm", "tpm", "concurrency", "tokens_per_day", "weight", "priority")
                          if getattr(args, name) is not None}
                if any(isinstance(v, (int, float)) and v < 0 for v in values.values()) or \
                        values.get("weight", 1) <= 0:
                    sys.exit("limits are 0 (none) or more, and a weight is more than 0")
                print(subject, store.set_limits(subject, **values))
            elif args.command == "key":
                api_key = new_api_key()
                store.add_token(user, digest(api_key), "api_key", name=args.name)
                print(api_key)
            else:
                count = Token.update(revoked=True).where(Token.user == user).execute()
                print(f"revoked {count} credential(s) of {args.username}")


if __name__ == "__main__":
    main()
