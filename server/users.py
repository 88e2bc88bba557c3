"""`python -m server.users`: add, list, disable, enable and remove users, make admins, mint or
revoke API keys (optionally limited to some models), and set the limits and fair-share weight of a
user or of one key (they take effect on every front within COHORT_AUTH_CACHE_S).

The first admin is made here (`add NAME --admin`, or `role NAME admin`): there is none by default.
The admin API (`/admin/...`) makes the same changes with the same checks (server.accounts).

Works on the same store as the front (DATABASE_URL, or the SQLite file under COHORT_DATA_DIR).
Passwords are read from a prompt or stdin, never from the command line (it lands in shell history).
"""

from __future__ import annotations

import argparse
import getpass
import sys

from common.config import ServerSettings, load
from server import accounts
from server.auth import digest, hash_password, new_api_key
from server.store import Store, Token


def _password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            sys.exit("the passwords differ")
    return accounts.check_password(password)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.users", description=" ".join(__doc__.split("\n\n")[0].split()))
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="add a user")
    add.add_argument("username")
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add.add_argument("--admin", action="store_true", help="with the admin role (the admin API)")
    sub.add_parser("list", help="list users")
    for name in ("disable", "enable", "remove"):
        sub.add_parser(name, help=f"{name} a user").add_argument("username")
    role = sub.add_parser("role", help="make a user an admin, or a user again")
    role.add_argument("username")
    role.add_argument("role", choices=accounts.ROLES)
    key = sub.add_parser("key", help="mint an API key for a user (printed once, stored hashed)")
    key.add_argument("username")
    key.add_argument("--name", default="", help="a label to tell keys apart")
    key.add_argument("--models", help="the only models it may use, comma-separated (default: all)")
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
    limit.add_argument("--priority", choices=accounts.PRIORITIES,
                       help="batch: its requests only take capacity nobody else waits for")
    sub.add_parser("limits", help="list every limit set")
    args = parser.parse_args(argv)

    store = Store(load(ServerSettings).db_url)
    store.create_schema()
    try:
        with store.db.connection_context():
            _run(store, args)
    except accounts.AccountError as error:
        sys.exit(error.message)


def _run(store: Store, args: argparse.Namespace) -> None:
    """One command, with the same checks as the admin API (server.accounts)."""
    if args.command == "add":
        password = _password(args.password_stdin)
        accounts.add_user(store, args.username, hash_password(password),
                          "admin" if args.admin else "user")
        print(f"added {'admin' if args.admin else 'user'} {args.username}")
    elif args.command == "list":
        for user in store.users():
            view = store.user_view(user)
            print(f"{user.username}\t{user.role}\t{'disabled' if user.disabled else 'enabled'}\t"
                  f"{view['api_keys']} api key(s)\tsince {user.created_at:%Y-%m-%d}")
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
        accounts.update_user(store, args.username, disabled=args.command == "disable")
        print(f"{args.command}d {args.username}")
    elif args.command == "role":
        accounts.update_user(store, args.username, role=args.role)
        print(f"{args.username} is now {'an admin' if args.role == 'admin' else 'a user'}")
    elif args.command == "remove":
        accounts.remove_user(store, args.username)
        print(f"removed {args.username}, its keys, tasks and limits")
    elif args.command == "limit":
        subject = accounts.subject(store, args.username, key_name=args.key)
        values = {name: getattr(args, name) for name in accounts.LIMIT_NAMES
                  if getattr(args, name) is not None}
        print(subject, accounts.set_limits(store, subject, values))
    elif args.command == "key":
        api_key = new_api_key()
        accounts.add_key(store, args.username, digest(api_key), args.name, args.models)
        print(api_key)
    else:
        count = store.revoke(accounts.user(store, args.username))
        print(f"revoked {count} credential(s) of {args.username}")


if __name__ == "__main__":
    main()
