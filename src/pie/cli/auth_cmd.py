"""`pie auth add|remove|list`: the users `pie serve` accepts ($PIE_HOME/auth.json; tokens stored hashed)."""

from __future__ import annotations

import argparse


def register(subparsers, common) -> None:
    p = subparsers.add_parser("auth", parents=[common], help="users and tokens of pie serve")
    sub = p.add_subparsers(dest="auth_command", metavar="ACTION", required=True)
    a = sub.add_parser("add", parents=[common], help="add a token for USER (created if new); prints it once")
    a.add_argument("user")
    a.set_defaults(func=add)
    r = sub.add_parser("remove", parents=[common], help="remove USER and all their tokens")
    r.add_argument("user")
    r.set_defaults(func=remove)
    ls = sub.add_parser("list", parents=[common], help="list users and how many tokens each has")
    ls.set_defaults(func=list_users)


def _store():
    from pie.paths import pie_home
    from pie.server.auth import TokenStore

    return TokenStore(pie_home() / "auth.json")


def add(args: argparse.Namespace) -> int:
    token = _store().add(args.user)
    print(token)
    import sys

    print(f"pie: token for {args.user!r} (shown once; only its hash is stored)", file=sys.stderr)
    return 0


def remove(args: argparse.Namespace) -> int:
    _store().remove(args.user)
    return 0


def list_users(args: argparse.Namespace) -> int:
    for user, n in sorted(_store().users().items()):
        print(f"{user}\t{n} token(s)")
    return 0
