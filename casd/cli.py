"""`casd serve|upload|download|gc|fsck|stats|ls|rm|export|token|uploads`: thin wrappers over the library."""

from __future__ import annotations

import argparse
import logging
import sys
from types import ModuleType

from casd.cli_common import CliError, parse_args_with_config

# The commands of casd.cli_transfer. They read no config file, so a command line naming one
# needs no other command's parser; and the other commands, which share one config file (each
# must know every key of it), need none of theirs. Each process imports only the modules
# its command line needs: the client's aiohttp costs an admin command half its start.
TRANSFER_COMMANDS = frozenset({"upload", "download"})


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for a command line whose first word is `command`: every command's parser
    when that is None or a name no module registers (help and errors list them all)."""
    if command in TRANSFER_COMMANDS:
        from casd import cli_transfer

        return _parser(cli_transfer)[0]
    from casd import cli_admin, cli_serve, cli_tokens

    parser, names = _parser(cli_serve, cli_admin, cli_tokens)
    if command is not None and command in names:
        return parser
    from casd import cli_transfer

    return _parser(cli_serve, cli_transfer, cli_admin, cli_tokens)[0]


def _parser(*modules: ModuleType) -> tuple[argparse.ArgumentParser, set[str]]:
    """A parser with the commands the modules register, in order, and their names."""
    parser = argparse.ArgumentParser(
        prog="casd", description="content-addressed, deduplicating upload daemon"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in modules:
        module.register(sub)
    return parser, set(sub.choices)


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(words[0] if words and not words[0].startswith("-") else None)
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
