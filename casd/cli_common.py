"""What the command modules share: the one-line error and common argument parsing."""

from __future__ import annotations

import argparse
import os
import re
import tomllib
import urllib.parse

from casd.blobstore import parse_s3_url
from casd.config import data_dir_from_env, masked

_SIZE = re.compile(r"(\d+)\s*([kmgt]?)(i?b)?\Z", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# C0 controls, DEL, C1 controls, the line and paragraph separators, and the bidirectional
# marks, embeddings, overrides and isolates (which can make text read in another order).
_UNSAFE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


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
    parser.add_argument(
        "--blobs",
        type=_blobs_url,
        default=os.environ.get("CASD_BLOBS"),
        metavar="URL",
        help="where blobs live: s3://BUCKET[/PREFIX] (credentials and region as every AWS"
        " tool reads them); default: $CASD_BLOBS, else DATA/blobs",
    )
    parser.add_argument(
        "--s3-endpoint",
        type=_endpoint,
        default=os.environ.get("CASD_S3_ENDPOINT"),
        metavar="URL",
        help="an S3-compatible service's URL (MinIO, Ceph RGW, R2, ...);"
        " default: $CASD_S3_ENDPOINT, else AWS",
    )
    parser.add_argument(
        "--catalog",
        default=None,
        help="a postgresql://USER:PASS@HOST:PORT/DB URL: keep the catalogue in PostgreSQL,"
        " shared by several daemons (default: $CASD_CATALOG, else DATA/catalog.sqlite)",
    )
    # Every command that opens a data folder reads the config file too.
    add_config_arg(parser)


def _blobs_url(text: str) -> str | None:
    if not text:
        return None
    try:
        parse_s3_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _endpoint(text: str) -> str | None:
    if not text:
        return None
    if not re.match(r"https?://[^/\s]+(/\S*)?\Z", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL")
    return text


def data_dir(args: argparse.Namespace):
    return args.data if args.data is not None else data_dir_from_env()


def store_settings(args: argparse.Namespace) -> dict:
    """The Settings fields that pick the storage engines, from --blobs and --s3-endpoint."""
    return {"blobs": args.blobs or None, "s3_endpoint": args.s3_endpoint or None}


def catalog_url(args: argparse.Namespace) -> str | None:
    """--catalog, else $CASD_CATALOG: a PostgreSQL URL, or None for the data folder's file."""
    value = getattr(args, "catalog", None) or os.environ.get("CASD_CATALOG") or None
    if value is None:
        return None
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname or not parts.path[1:]:
        raise CliError(
            f"--catalog {masked(value)!r} is not a postgresql://USER:PASS@HOST:PORT/DB URL", 2
        )
    return value


# ---- config file ------------------------------------------------------------------------
#
# `--config FILE` (or $CASD_CONFIG) is a flat TOML table with one key per long flag of the
# commands that read it (`casd serve` and the admin commands): `max-chunk-size = "64MiB"` or
# `max_chunk_size = "64MiB"`. Precedence: flag > environment variable > file > default. The
# walk below is generic over argparse, so a flag added to a command is a config key at once.

CONFIG_ENV = "CASD_CONFIG"
_UNSET = argparse.Namespace()  # a sentinel default: "not given on the command line"
_NOT_KEYS = {"help", "config", "check_config"}


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help=f"TOML file, one key per flag; flags and environment win (default: ${CONFIG_ENV})",
    )


def _key(action: argparse.Action) -> str | None:
    longs = [o for o in action.option_strings if o.startswith("--")]
    if not longs or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
        return None
    key = longs[0][2:].replace("-", "_")
    return None if key in _NOT_KEYS else key


def _subparsers(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def _all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for sp in _subparsers(parser):
        seen: list[argparse.ArgumentParser] = []
        for child in sp.choices.values():
            if not any(child is s for s in seen):
                seen.append(child)
                yield from _all_parsers(child)


def _reads_config(parser: argparse.ArgumentParser) -> bool:
    return any("--config" in a.option_strings for a in parser._actions)


def _chosen(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The parsers on the path the command line took (root, command, sub-command...)."""
    path = [parser]
    while True:
        subs = _subparsers(path[-1])
        if not subs:
            return path
        sp = subs[0]
        name = getattr(args, sp.dest, None) if sp.dest != argparse.SUPPRESS else None
        child = sp.choices.get(name) if isinstance(name, str) else None
        if child is None:
            func = getattr(args, "func", None)
            child = next((p for p in sp.choices.values() if p.get_default("func") is func), None)
        if child is None:
            return path
        path.append(child)


def parse_args_with_config(parser: argparse.ArgumentParser, argv: list[str] | None):
    """parse_args, then fill what the command line left out: environment, file, default."""
    originals: dict[argparse.Action, object] = {}
    for p in _all_parsers(parser):
        for a in p._actions:
            if a.option_strings and a.dest != argparse.SUPPRESS and _key(a) is not None:
                originals[a] = a.default
                a.default = None if _accumulates(a) else _UNSET
    args = parser.parse_args(argv)
    path = _chosen(parser, args)
    actions = [a for p in path for a in p._actions if a in originals]
    values: dict[str, object] = {}
    source = ""
    if any(_reads_config(p) for p in path):
        source = getattr(args, "config", None) or os.environ.get(CONFIG_ENV) or ""
        if source:
            known = {
                _key(a)
                for p in _all_parsers(parser)
                if _reads_config(p)
                for a in p._actions
                if a in originals
            }
            values = _load_config(source, known)
    for a in actions:
        if getattr(args, a.dest, None) is not (None if _accumulates(a) else _UNSET):
            continue
        key = _key(a)
        # The environment variable a flag's default reads (CASD_PORT, CASD_TOKEN...) wins.
        if key in values and f"CASD_{a.dest.upper()}" not in os.environ:
            setattr(args, a.dest, _config_value(source, key, a, values[key]))
            continue
        default = originals[a]
        if isinstance(default, str) and callable(a.type):
            default = a.type(default)
        setattr(args, a.dest, default)
    return args


def _accumulates(action: argparse.Action) -> bool:
    """append/extend/count build on their default, so theirs stays None while parsing."""
    return isinstance(action, (argparse._AppendAction, argparse._CountAction))


def _load_config(source: str, known: set) -> dict[str, object]:
    try:
        with open(source, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise CliError(f"config {source}: {exc.strerror}", 2) from None
    except tomllib.TOMLDecodeError as exc:
        raise CliError(f"config {source}: not valid TOML: {exc}", 2) from None
    values = {}
    for raw, value in data.items():
        key = raw.replace("-", "_")
        if key not in known:
            raise CliError(f"config {source}: unknown key {raw!r}", 2)
        values[key] = value
    return values


def _config_value(source: str, key: str, action: argparse.Action, value: object):
    """A file value converted and checked exactly as the flag's own text would be."""
    where = f"config {source}: key {key!r}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise CliError(f"{where}: must be true or false, got {value!r}", 2)
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if isinstance(action, argparse._CountAction):
        if type(value) is not int or value < 0:
            raise CliError(f"{where}: must be a whole number, got {value!r}", 2)
        return value
    many = isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+")
    if many:
        items = value if isinstance(value, list) else [value]
        return [_scalar(where, action, v) for v in items]
    return _scalar(where, action, value)


def _scalar(where: str, action: argparse.Action, value: object):
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise CliError(f"{where}: must be a string or a number, got {value!r}", 2)
    text = value if isinstance(value, str) else str(value)
    try:
        converted = action.type(text) if callable(action.type) else text
    except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
        raise CliError(f"{where}: {exc or 'bad value'} (got {value!r})", 2) from None
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise CliError(f"{where}: {value!r} is not one of {choices}", 2)
    return converted
