"""`casd serve|upload|download|gc|fsck|stats|ls|rm|export`: thin wrappers over the library."""

from __future__ import annotations

import argparse
import logging
import sys

from casd import cli_admin, cli_serve, cli_tokens, cli_transfer
from casd.cli_common import CliError, parse_args_with_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="casd", description="content-addressed, deduplicating upload daemon"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cli_serve.register(sub)
    cli_transfer.register(sub)
    cli_admin.register(sub)
    cli_tokens.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        args = parse_args_with_config(parser, argv)
    except CliError as exc:
        print(f"casd: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("casd: interrupted", file=sys.stderr)
        return 130
    except CliError as exc:
        print(f"casd {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
