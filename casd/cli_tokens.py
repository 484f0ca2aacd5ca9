"""`casd token add|ls|rm`: manage the token file of tenant mode (docs/tenants.md).

They edit the file only (atomically, mode 0600); a daemon running with `--tokens FILE`
notices the change within a second, or at once on SIGHUP.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from casd.cli_common import CliError, safe_text
from casd.tenants import Role, TokenFileError, TokenTable, add_token, parse_size, remove_tokens

# How much of a token's hash `ls` shows and `rm` takes: enough to tell tokens apart, far
# too little to matter (the hash is of a 256-bit random token anyway).
SHOWN_HASH = 12


def register(sub) -> None:
    p = sub.add_parser("token", help="manage tenant tokens (casd serve --tokens FILE)")
    tsub = p.add_subparsers(dest="token_command", metavar="add|ls|rm", required=True)

    q = tsub.add_parser("add", help="make a token for a tenant and print it once")
    _add_file(q)
    q.add_argument("--tenant", required=True, metavar="NAME", help="1 to 64 of [A-Za-z0-9._-]")
    q.add_argument(
        "--role",
        required=True,
        choices=[r.value for r in Role],
        help="read: download its files; upload: also upload and delete them; admin: every"
        " tenant's files",
    )
    q.add_argument("--quota", metavar="SIZE", help="bytes the tenant may hold: 1000000, 50GiB")
    q.set_defaults(func=cmd_add)

    q = tsub.add_parser("ls", help="list tokens: tenant, role, quota, hash prefix (never a token)")
    _add_file(q)
    q.add_argument("--json", action="store_true", help="print JSON instead of text")
    q.set_defaults(func=cmd_ls)

    q = tsub.add_parser("rm", help="remove a tenant's tokens, or one token by its hash prefix")
    _add_file(q)
    q.add_argument("--tenant", metavar="NAME", help="remove every token of this tenant")
    q.add_argument("prefix", nargs="?", metavar="HASHPREFIX", help="as `casd token ls` shows it")
    q.set_defaults(func=cmd_rm)


def _add_file(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tokens",
        type=Path,
        default=os.environ.get("CASD_TOKENS") or None,
        metavar="FILE",
        help="the token file (default: $CASD_TOKENS)",
    )


def _file(args: argparse.Namespace) -> Path:
    if args.tokens is None:
        raise CliError("name the token file: --tokens FILE (or $CASD_TOKENS)", 2)
    return args.tokens


def cmd_add(args: argparse.Namespace) -> int:
    path = _file(args)
    try:
        quota = parse_size(args.quota) if args.quota is not None else None
        token, entry = add_token(path, args.tenant, Role(args.role), quota)
    except (TokenFileError, ValueError) as exc:
        raise CliError(str(exc), 2) from None
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror}") from None
    print(token)
    print(
        f"added {'an' if entry.role.value[0] in 'aeiou' else 'a'} {entry.role.value} token of"
        f" tenant {entry.tenant} ({entry.hash[:SHOWN_HASH]});"
        " this is the only time it is shown",
        file=sys.stderr,
    )
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    path = _file(args)
    try:
        table = TokenTable.read(path)
    except TokenFileError as exc:
        raise CliError(str(exc)) from None
    rows = [
        {
            "tenant": e.tenant,
            "role": e.role.value,
            "quota": e.quota,
            "hash_prefix": e.hash[:SHOWN_HASH],
        }
        for e in table.entries
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for e in table.entries:
        quota = "-" if e.quota is None else str(e.quota)
        print(f"{e.hash[:SHOWN_HASH]}  {safe_text(e.tenant):<20} {e.role.value:<7} {quota}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    path = _file(args)
    if (args.tenant is None) == (args.prefix is None):
        raise CliError("give either --tenant NAME or a HASHPREFIX", 2)
    if args.prefix is not None and not re.fullmatch(r"[0-9a-f]{4,64}", args.prefix):
        raise CliError(f"{args.prefix!r} is not a hash prefix (4 to 64 lowercase hex)", 2)
    try:
        removed = remove_tokens(path, args.tenant, args.prefix)
    except TokenFileError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror}") from None
    if not removed:
        what = f"tenant {args.tenant!r}" if args.tenant is not None else f"prefix {args.prefix}"
        raise CliError(f"no token of {what} in {path}")
    for e in removed:
        print(f"removed {e.hash[:SHOWN_HASH]} ({e.role.value} token of tenant {e.tenant})")
    return 0
