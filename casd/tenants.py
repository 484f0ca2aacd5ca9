"""Tenant tokens: the token file of `casd serve --tokens FILE` (docs/tenants.md).

One token per line, `#` starts a comment, blank lines are ignored:

    sha256:<64 hex> tenant=<name> role=<read|upload|admin> [quota=<bytes, or 50GiB>]

The file holds the SHA-256 of each token, never the token. A leaf beside casd.models: the
daemon (casd.web), `casd token add|ls|rm` and the tests use it; it knows no HTTP.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from casd.models import Tenant

log = logging.getLogger("casd.tenants")

TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_HASH_RE = re.compile(r"sha256:([0-9a-f]{64})\Z")
_SIZE_RE = re.compile(r"([0-9]{1,20})(B|KiB|MiB|GiB|TiB)?\Z")
_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
# The daemon looks at the file's metadata at most this often (and at once on SIGHUP).
CHECK_EVERY = 1.0


class Role(StrEnum):
    """What a token may do; each role may do everything the ones before it may."""

    READ = "read"  # download its own files, read their manifests
    UPLOAD = "upload"  # also handshake, send chunks, merge, abort, delete its own files
    ADMIN = "admin"  # also read and delete every tenant's files

    def allows(self, need: Role) -> bool:
        order = list(Role)
        return order.index(self) >= order.index(need)


class TokenFileError(ValueError):
    """The token file cannot be used; the message names the file's line."""


@dataclass(frozen=True)
class TokenEntry:
    """One line of the token file: the token's SHA-256 (hex) and what it grants."""

    hash: str
    tenant: str
    role: Role
    quota: int | None = None

    def line(self) -> str:
        quota = f" quota={self.quota}" if self.quota is not None else ""
        return f"sha256:{self.hash} tenant={self.tenant} role={self.role.value}{quota}"

    @property
    def principal(self) -> Principal:
        return Principal(self.tenant, self.role, self.quota)


@dataclass(frozen=True)
class Principal:
    """Who a request comes from in tenant mode."""

    tenant: str
    role: Role
    quota: int | None = None

    @property
    def scope(self) -> Tenant:
        """Its uploads' tenant and quota, as the service takes them."""
        return Tenant(self.tenant, self.quota)


def parse_size(text: str) -> int:
    """`1073741824`, `512MiB`, `50GiB` (binary units, no spaces) -> bytes; ValueError."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(
            f"{text!r} is not a size (a whole number, optionally with B, KiB, MiB, GiB or TiB)"
        )
    return int(m.group(1)) * _UNITS[m.group(2)]


def token_hash(token: str) -> str:
    """The hex SHA-256 of a presented token. A header that is not valid UTF-8 arrives with
    lone surrogates (aiohttp's surrogateescape): encoding back restores the bytes sent."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def parse_line(line: str, where: str) -> TokenEntry | None:
    """One line -> TokenEntry, None for a blank or comment line; TokenFileError naming `where`."""
    text = line.split("#", 1)[0].strip()
    if not text:
        return None
    first, *fields = text.split()
    m = _HASH_RE.match(first)
    if not m:
        raise TokenFileError(
            f"{where}: expected sha256:<64 lowercase hex> first, got {first[:80]!r}"
        )
    values: dict[str, str] = {}
    for field in fields:
        key, eq, value = field.partition("=")
        if not eq or key not in ("tenant", "role", "quota"):
            raise TokenFileError(f"{where}: unknown field {field[:80]!r} (tenant=, role=, quota=)")
        if key in values:
            raise TokenFileError(f"{where}: {key}= given twice")
        values[key] = value
    for key in ("tenant", "role"):
        if key not in values:
            raise TokenFileError(f"{where}: {key}= is missing")
    if not TENANT_RE.match(values["tenant"]):
        raise TokenFileError(
            f"{where}: tenant {values['tenant'][:80]!r} is not 1 to 64 of [A-Za-z0-9._-]"
            " starting with a letter or digit"
        )
    try:
        role = Role(values["role"])
    except ValueError:
        raise TokenFileError(
            f"{where}: role {values['role'][:80]!r} is not read, upload or admin"
        ) from None
    quota = None
    if "quota" in values:
        try:
            quota = parse_size(values["quota"])
        except ValueError as exc:
            raise TokenFileError(f"{where}: quota: {exc}") from None
    return TokenEntry(m.group(1), values["tenant"], role, quota)


class TokenTable:
    """The tokens of one version of the file, looked up by the SHA-256 of a presented token."""

    def __init__(self, entries: list[TokenEntry]):
        self.entries = tuple(entries)
        self._by_hash = {e.hash: e for e in entries}

    @classmethod
    def parse(cls, text: str, name: str = "token file") -> TokenTable:
        entries: list[TokenEntry] = []
        seen: dict[str, int] = {}
        for n, line in enumerate(text.splitlines(), 1):
            entry = parse_line(line, f"{name} line {n}")
            if entry is None:
                continue
            if entry.hash in seen:
                raise TokenFileError(
                    f"{name} line {n}: the same token hash as line {seen[entry.hash]}"
                )
            seen[entry.hash] = n
            entries.append(entry)
        return cls(entries)

    @classmethod
    def read(cls, path: Path) -> TokenTable:
        """The table of the file at `path`; TokenFileError (naming the file) if unusable."""
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenFileError(f"cannot read token file {path}: {exc}") from None
        return cls.parse(text, str(path))

    def lookup(self, token: str) -> Principal | None:
        """The Principal of a presented token, None when the token is not in the table.

        Constant time in the token: what is compared is its SHA-256, never the token. The
        dictionary lookup's timing depends only on the hash, which an attacker who does not
        know a valid token cannot steer towards a stored one (that would take a SHA-256
        preimage), so it tells nothing about the stored hashes; the final check of the
        found hash is hmac.compare_digest all the same, so no byte-by-byte comparison of
        secret material happens anywhere.
        """
        presented = token_hash(token)
        entry = self._by_hash.get(presented)
        if entry is None or not hmac.compare_digest(entry.hash, presented):
            return None
        return entry.principal


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class TokenFile:
    """The daemon's view of the token file, picked up again when the file changes.

    `table()` looks at the file's (mtime_ns, size, inode) at most once every CHECK_EVERY
    seconds and re-reads it when they changed; `reload()` re-reads it now (SIGHUP). A
    version that cannot be read or parsed is not used: the previous table stays in force
    and one error line is logged (again only when the file changes once more).
    """

    def __init__(self, path: Path, clock=time.monotonic):
        self.path = path
        self._clock = clock
        self._table = TokenTable.read(path)  # at start an unusable file is an error
        self._seen = _signature(path)
        self._checked = clock()

    def table(self) -> TokenTable:
        now = self._clock()
        if now - self._checked >= CHECK_EVERY:
            self._checked = now
            if _signature(self.path) != self._seen:
                self.reload()
        return self._table

    def reload(self) -> bool:
        """Read the file again; True when its new version is in force."""
        self._seen = _signature(self.path)
        self._checked = self._clock()
        try:
            table = TokenTable.read(self.path)
        except TokenFileError as exc:
            log.error("token file not reloaded, the previous tokens stay in force: %s", exc)
            return False
        self._table = table
        log.info("token file %s loaded: %d tokens", self.path, len(table.entries))
        return True


# ---- editing the file (casd token add|rm) ----------------------------------------------


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text`: a temp file in the same folder, mode 0600, fsynced, then
    renamed over it, and the folder fsynced; a reader sees the old file or the new, whole."""
    folder = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@contextlib.contextmanager
def _editing(path: Path):
    """One edit of the file at a time (two `casd token add` run at once must not lose a
    token): an exclusive lock on a lock file beside it, `.NAME.lock`. Not the file itself:
    each edit replaces it, so a lock on it would not be seen by the next editor."""
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _existing_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    TokenTable.parse(text, str(path))  # never append to a file the daemon would refuse
    return text


def add_token(path: Path, tenant: str, role: Role, quota: int | None) -> tuple[str, TokenEntry]:
    """Make a random token, append its line to the file (created if absent); the token (to
    be shown once, never stored) and its entry."""
    parse_line(f"sha256:{'0' * 64} tenant={tenant} role={role.value}", "--tenant/--role")
    token = secrets.token_urlsafe(32)
    while token.startswith("-"):  # `--token -x...` would read as a flag on a command line
        token = secrets.token_urlsafe(32)
    entry = TokenEntry(token_hash(token), tenant, role, quota)
    with _editing(path):
        text = _existing_text(path)
        if text and not text.endswith("\n"):
            text += "\n"
        write_atomically(path, text + entry.line() + "\n")
    return token, entry


def remove_tokens(
    path: Path, tenant: str | None = None, prefix: str | None = None
) -> list[TokenEntry]:
    """Drop the lines of `tenant`'s tokens, or of the token whose hash starts with `prefix`
    (it must match exactly one); the entries removed. Comments and other lines stay."""
    with _editing(path):
        return _remove(path, tenant, prefix)


def _remove(path: Path, tenant: str | None, prefix: str | None) -> list[TokenEntry]:
    text = _existing_text(path)
    kept, removed = [], []
    for n, line in enumerate(text.splitlines(keepends=True), 1):
        entry = parse_line(line, f"{path} line {n}")
        if entry is not None and (
            entry.tenant == tenant if tenant is not None else entry.hash.startswith(prefix or "-")
        ):
            removed.append(entry)
        else:
            kept.append(line)
    if prefix is not None and len(removed) > 1:
        raise TokenFileError(
            f"hash prefix {prefix!r} matches {len(removed)} tokens; give more of it"
        )
    if removed:
        write_atomically(path, "".join(kept))
    return removed
