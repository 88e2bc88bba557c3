"""`python -m server.keys`: the CURVE keys of the worker wire, for workers on other machines.

Workers on the front's machine need nothing: they share the data directory's local key. For a
worker elsewhere, `add NAME` makes a key pair that may register as NAME or NAME-* (NAME-gpu0, ...),
writes its secret key and the front's public key into a folder to copy to that machine, and
authorizes it at once (fronts read the folder of keys at each new connection). `remove NAME`
refuses it from its next connection on; restart the fronts to cut a connection already open.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import zmq.auth

from common.config import ServerSettings, load
from common.keys import FRONT, KeyFiles


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.keys",
                                     description=" ".join(__doc__.split("\n\n")[0].split()))
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="a key for workers NAME and NAME-* on another machine")
    add.add_argument("name")
    add.add_argument("--out", type=Path, help="folder for the files to copy (default: ./NAME-keys)")
    sub.add_parser("list", help="the keys workers may connect with")
    sub.add_parser("remove", help="refuse a key from its next connection on").add_argument("name")
    args = parser.parse_args(argv)
    files = KeyFiles.of(load(ServerSettings).data_dir).ensure()

    if args.command == "add":
        if (files.authorized / f"{args.name}.key").exists():
            sys.exit(f"a key named {args.name!r} exists; remove it first to replace it")
        out = args.out or Path(f"{args.name}-keys")
        try:
            secret = files.add_worker(args.name, out)
        except ValueError as error:
            sys.exit(str(error))
        print(f"authorized workers {args.name} and {args.name}-*; copy {out}/ to their machine "
              f"(keep {secret.name} secret) and start them with:")
        print(f"  COHORT_WORKER_KEY={secret} COHORT_FRONT_KEY={out / (FRONT + '.key')} "
              f"python -m worker --worker-id {args.name} --connect tcp://FRONT_HOST:PORT")
    elif args.command == "list":
        for path in sorted(files.authorized.glob("*.key")):
            public = zmq.auth.load_certificate(path)[0].decode()
            print(f"{path.stem}\t{public}")
    elif args.command == "remove":
        path = files.authorized / f"{args.name}.key"
        if not path.exists():
            sys.exit(f"no key named {args.name!r}")
        path.unlink()
        print(f"removed {args.name}: refused from its next connection on")


if __name__ == "__main__":
    main()
