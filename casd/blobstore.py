"""The filesystem side of storage: blobs/<algo>/ab/cd/<hex>, temp files, atomic publish.

Every method here is blocking; callers run them in worker threads.
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash

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
    mtime: float = 0.0


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

    def put_over(self, temp: TempBlob, digest: Digest) -> None:
        """Under the catalogue's write lock: a finished temp file replaces the blob, atomically.

        For a blob whose bytes were found wrong: readers that opened the old file keep it,
        every later open gets the verified bytes. The temp name goes with the rename; its
        flock stays on the inode until the caller discards the temp.
        """
        final = self.path(digest)
        self._ensure_parent(final.parent)
        os.replace(temp.path, final)
        fsync_dir(final.parent)
        fsync_dir(temp.path.parent)

    def matches(self, digest: Digest, size: int, xxh3: str) -> bool:
        """True when the blob file is there with exactly this size and xxh3-128."""
        path = self.path(digest)
        h = xxhash.xxh3_128()
        try:
            with open(path, "rb", buffering=0) as f:
                if os.fstat(f.fileno()).st_size != size:
                    return False
                while block := f.read(1 << 20):
                    h.update(block)
        except FileNotFoundError:
            return False
        return h.hexdigest() == xxh3

    def quarantine(self, digest: Digest, folder: Path) -> Path | None:
        """Move a blob into `folder` (kept for the operator, never served); None if absent."""
        src = self.path(digest)
        if not src.is_file():
            return None
        folder.mkdir(exist_ok=True)
        dest = folder / f"{digest.algo.value}-{digest.hex}-{int(time.time())}"
        os.replace(src, dest)
        fsync_dir(folder)
        fsync_dir(src.parent)
        return dest

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
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                yield StoredBlob(digest, Path(e.path), -1)
                continue
            yield StoredBlob(digest, Path(e.path), st.st_size, st.st_mtime)

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


def _write_zeros(fd: int, size: int) -> None:
    block = bytes(1 << 20)
    left = size
    while left > 0:
        left -= os.write(fd, block[:min(left, len(block))])


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer can still put on the filesystem holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class Reserve:
    """Headroom for a full disk: a file of `size` bytes, deleted when the disk fills.

    SQLite needs free space for every change (its WAL grows before anything is freed), so on
    a full disk even a delete fails. Deleting this file gives the delete, an abort, `casd rm`
    or `casd gc` room to commit; it is created again once the disk has room for it twice over.
    """

    def __init__(self, path: Path, size: int):
        self.path = path
        self.size = size

    def present(self) -> bool:
        try:
            return self.path.stat().st_size >= self.size
        except FileNotFoundError:
            return False

    def ensure(self) -> bool:
        """Create the file when it is missing and there is room; True when it is in place."""
        if self.size <= 0 or self.present():
            return True
        if free_bytes(self.path.parent) < 2 * self.size:
            return False
        part = self.path.with_name(self.path.name + ".part")
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            # Real blocks, not a sparse file: releasing it must give space back.
            try:
                os.posix_fallocate(fd, 0, self.size)
            except OSError as exc:
                if is_disk_full(exc):
                    raise
                _write_zeros(fd, self.size)  # a filesystem without fallocate
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            os.unlink(part)
            if is_disk_full(exc):
                return False
            raise
        os.close(fd)
        os.replace(part, self.path)
        fsync_dir(self.path.parent)
        return True

    def release(self) -> bool:
        """Delete the file (and a half-made one); True when that freed space."""
        freed = False
        for p in (self.path, self.path.with_name(self.path.name + ".part")):
            try:
                os.unlink(p)
                freed = True
            except FileNotFoundError:
                pass
        return freed
