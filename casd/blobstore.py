"""The filesystem side of storage: blobs/<algo>/ab/cd/<hex>, temp files, atomic publish.

Every method here is blocking; callers run them in worker threads.
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from casd.digest import Algo, Digest

TEMP_PREFIX = "blob-"
TEMP_SUFFIX = ".part"


def fsync_dir(path: Path) -> None:
    """Make a rename or create inside `path` survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


class TempBlob:
    """A temp file on the blob store's filesystem; published by rename or discarded.

    It holds an exclusive flock for as long as it is open, so gc and fsck, in another
    process, can tell a chunk still being received from a leftover (see `temp_busy`).
    """

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd: int | None = fd
        fcntl.flock(fd, fcntl.LOCK_EX)

    def write(self, data) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def finish(self) -> None:
        """fsync: the bytes are durable before anything may point at them."""
        os.fsync(self._fd)

    def discard(self) -> None:
        """Close and remove; safe to call at any point, also after finish()."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


@dataclass(frozen=True)
class StoredBlob:
    digest: Digest | None
    path: Path
    size: int


@dataclass(frozen=True)
class TempFile:
    path: Path
    size: int
    mtime: float
    busy: bool  # a live daemon holds it open: a chunk being received, not a leftover


def temp_busy(path: Path) -> bool:
    """True when a process holds the temp file's flock (the daemon is still using it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class BlobStore:
    def __init__(self, blobs_dir: Path, tmp_dir: Path):
        self.blobs_dir = blobs_dir
        self.tmp_dir = tmp_dir
        self._known_dirs: set[Path] = set()

    def ensure_dirs(self) -> None:
        for d in (self.blobs_dir.parent, self.blobs_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        for algo in Algo:
            (self.blobs_dir / algo.value).mkdir(exist_ok=True)

    def path(self, digest: Digest) -> Path:
        h = digest.hex
        return self.blobs_dir / digest.algo.value / h[:2] / h[2:4] / h

    def new_temp(self) -> TempBlob:
        fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=self.tmp_dir)
        return TempBlob(Path(name), fd)

    def place(self, temp: TempBlob, digest: Digest) -> bool:
        """Hard-link a finished (fsynced) temp file at the blob's path, durably.

        Runs outside any lock. A file already there is left alone: only verified, fsynced
        bytes ever reach a blob path, so it holds the same content. The temp name stays
        (and so does its flock, on the same inode) until the caller discards it. False when
        the filesystem cannot hard-link; then `ensure_placed` renames instead.
        """
        final = self.path(digest)
        self._ensure_parent(final.parent)
        try:
            os.link(temp.path, final)
        except FileExistsError:
            return True
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP):
                return False
            raise
        fsync_dir(final.parent)
        return True

    def ensure_placed(self, temp: TempBlob, digest: Digest) -> None:
        """Under the catalogue's write lock, before the row: the blob file is in place.

        gc unlinks blobs only under that same lock, so a file seen here stays until the row
        is committed. It can be missing only when gc collected the digest between `place`
        and now, or when `place` could not link; then it is put back from the temp file.
        """
        final = self.path(digest)
        if final.is_file():
            return
        self._ensure_parent(final.parent)
        try:
            os.link(temp.path, final)
        except OSError:
            os.replace(temp.path, final)
        fsync_dir(final.parent)

    def _ensure_parent(self, parent: Path) -> None:
        if parent in self._known_dirs:
            return
        # Create the fan-out levels one by one so each new entry's parent is fsynced.
        for d in (parent.parent, parent):
            if not d.is_dir():
                try:
                    d.mkdir()
                except FileExistsError:
                    pass
                fsync_dir(d.parent)
        self._known_dirs.add(parent)

    def exists(self, digest: Digest) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: Digest) -> int | None:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def remove(self, digest: Digest) -> bool:
        """Unlink a blob; True when a file was removed."""
        try:
            os.unlink(self.path(digest))
        except FileNotFoundError:
            return False
        return True

    def walk(self) -> Iterator[StoredBlob]:
        """Every file under blobs/; `digest` is None where the name or place is not a blob's."""
        for algo in Algo:
            yield from self._walk(self.blobs_dir / algo.value, algo, ())

    def _walk(self, folder: Path, algo: Algo, fan: tuple[str, ...]) -> Iterator[StoredBlob]:
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                yield from self._walk(Path(e.path), algo, (*fan, e.name))
                continue
            name = e.name
            try:
                hex_ = algo.parse_hex(name)
            except ValueError:
                digest = None
            else:
                # Only the exact name, lowercase, in its own fan-out folders is a blob.
                ok = hex_ == name and fan == (name[:2], name[2:4])
                digest = Digest(algo, hex_) if ok else None
            try:
                size = e.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                size = -1
            yield StoredBlob(digest, Path(e.path), size)

    def temp_files(self) -> Iterator[TempFile]:
        try:
            entries = list(os.scandir(self.tmp_dir))
        except FileNotFoundError:
            return
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            yield TempFile(Path(e.path), st.st_size, st.st_mtime, temp_busy(Path(e.path)))

    def check_writable(self) -> None:
        """Create, fsync and remove a file in tmp/; raises OSError when that fails."""
        temp = self.new_temp()
        try:
            temp.write(b"ok")
            temp.finish()
        finally:
            temp.discard()
