"""What the command modules share: the one-line error and common argument parsing."""

from __future__ import annotations

import argparse
import re

from casd.config import data_dir_from_env

_SIZE = re.compile(r"(\d+)\s*([kmgt]?)(i?b)?\Z", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# C0 controls, DEL, C1 controls, the line and paragraph separators, and the bidirectional
# marks, embeddings, overrides and isolates (which can make text read in another order).
_UNSAFE = re.compile(
    "[\\\\\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]"
)


class CliError(Exception):
    """An error a command reports as one line on stderr, exiting non-zero."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def safe_text(text: str) -> str:
    """Client-supplied text made safe for a terminal: every control or bidi character, and
    the backslash itself (so the result is unambiguous), as a Python-style escape."""
    return _UNSAFE.sub(_escape, text)


def _escape(m: re.Match) -> str:
    ch = m.group()
    if ch == "\\":
        return "\\\\"
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def parse_size(text: str) -> int:
    """'5MiB', '5M', '64k', '1048576' -> bytes (binary units)."""
    m = _SIZE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 5MiB, 64k, 1048576)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def add_data_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        type=data_dir_from_env,
        default=None,
        help="data folder (default: $CASD_DATA, else ./casd-data)",
    )


def data_dir(args: argparse.Namespace):
    return args.data if args.data is not None else data_dir_from_env()
