"""The local-folder blob store: blobs/<algo>/ab/cd/<hex>, temp files, atomic publish.

The blocking methods are the filesystem work; the async ones are the `BlobStore` interface
(casd/blobstore/__init__.py), which runs them on the I/O executor it was given.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import secrets
import tempfile
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import xxhash

from casd.blobstore.base import READ_PIECE, BlobHash, BlobInfo, BlobMissing
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


class _Folder:
    __slots__ = ("asked", "done", "running", "users")

    def __init__(self) -> None:
        self.asked = 0  # requests so far, numbered
        self.done = 0  # every request up to this number is covered by a finished fsync
        self.running = False
        self.users = 0  # threads inside sync() for this folder


class FolderSync:
    """fsync of folders, shared between the threads that need the same one at the same time.

    `sync(folder)` returns once an fsync of `folder` that began after the call has finished,
    so it covers every entry made in the folder before the call (a rename, link or mkdir).
    Callers that arrive while an fsync of the folder runs wait for it to end, then one of
    them runs a single fsync for all of them: the way the catalogue groups commits, for
    blob folders (`blobs/<algo>` and `blobs/<algo>/ab` take many new entries at once). An
    fsync that fails raises in the thread that ran it; its waiters then try their own.
    """

    def __init__(self, fsync: Callable[[Path], None] | None = None):
        self._fsync = fsync
        self._cond = threading.Condition()
        self._folders: dict[Path, _Folder] = {}

    def sync(self, folder: Path) -> None:
        with self._cond:
            state = self._folders.get(folder)
            if state is None:
                state = self._folders[folder] = _Folder()
            state.users += 1
            state.asked += 1
            mine = state.asked
            try:
                while state.done < mine and state.running:
                    self._cond.wait()
            except BaseException:
                self._leave(folder, state)
                raise
            if state.done >= mine:
                self._leave(folder, state)
                return
            state.running = True
            covers = state.asked
        synced = False
        try:
            (self._fsync or fsync_dir)(folder)
            synced = True
        finally:
            with self._cond:
                state.running = False
                if synced:
                    state.done = covers
                self._leave(folder, state)
                self._cond.notify_all()

    def _leave(self, folder: Path, state: _Folder) -> None:
        """Called with the condition held, once per sync() call."""
        state.users -= 1
        if state.users == 0:
            del self._folders[folder]


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

    def _open_fd(self) -> int:
        """The file descriptor; ValueError (as for a closed file) after discard()."""
        if self._fd is None:
            raise ValueError(f"temp blob {self.path} was discarded")
        return self._fd

    def write(self, data) -> None:
        """Append `data`: one buffer, or a list of buffers written in order by one writev
        (the pieces a body arrived in, without joining them into one buffer first)."""
        fd = self._open_fd()
        if isinstance(data, list):
            total = sum(len(piece) for piece in data)
            done = os.writev(fd, data)
            if done == total:
                return
            data = b"".join(data)[done:]  # a short write (rare): the rest, one buffer
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]

    def finish(self) -> None:
        """fsync: the bytes are durable before anything may point at them."""
        os.fsync(self._open_fd())

    def discard(self) -> None:
        """Close and remove; safe to call at any point, also after finish()."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


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


class TempFiles:
    """Temp files under `tmp_dir`, on local disk whatever the engine: a chunk is received,
    hashed and verified there before the store sees it."""

    tmp_dir: Path

    def new_temp(self) -> TempBlob:
        fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=self.tmp_dir)
        return TempBlob(Path(name), fd)

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


class LocalBlobStore(TempFiles):
    """Blobs as files in one folder; zero-copy reads (`BlobReader.file`)."""

    quick_rehash = True

    def __init__(
        self,
        blobs_dir: Path,
        tmp_dir: Path,
        quarantine_dir: Path,
        io=None,
        folders: FolderSync | None = None,
    ):
        self.blobs_dir = blobs_dir
        self.tmp_dir = tmp_dir
        self.quarantine_dir = quarantine_dir
        self.location = str(blobs_dir)
        self.quarantine_location = str(quarantine_dir)
        self._io = io
        self._folders = folders or FolderSync()
        # Leaf fan-out folders known durable (made and their parents fsynced) in this process.
        self._known_dirs: set[Path] = set()

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    # -- the BlobStore interface --

    async def start(self) -> None:
        await self._run(self.ensure_dirs)

    async def close(self) -> None:
        pass

    async def ping(self) -> None:
        pass  # the folder's health is check_writable's (its temp files share the disk)

    async def publish(self, temp: TempBlob, digest: Digest) -> None:
        # A filesystem that cannot hard-link leaves the rename to ensure_stored.
        await self._run(self.place, temp, digest)

    async def ensure_stored(self, temp: TempBlob, digest: Digest) -> None:
        # Called under the catalogue's write lock, once per chunk of a group commit, after
        # `publish` linked the blob: a stat of a path linked a moment ago is answered from
        # the kernel's dentry cache in microseconds, less than a thread hop, which would keep
        # the write lock (and every waiting commit) for another round trip through the loop.
        if self.path(digest).is_file():
            return
        await self._run(self.ensure_placed, temp, digest)

    async def replace(self, temp: TempBlob, digest: Digest) -> None:
        await self._run(self.put_over, temp, digest)

    async def stat(self, digest: Digest):
        path = self.path(digest)

        def look():
            st = os.stat(path)
            return st, temp_busy(path)

        try:
            st, busy = await self._run(look)
        except FileNotFoundError:
            return None
        return BlobInfo(
            digest,
            str(path),
            st.st_size,
            st.st_mtime,
            (st.st_ino, st.st_mtime_ns, st.st_size),
            busy,
        )

    async def hash_blobs(self, items, workers: int) -> list:
        jobs = [(self.path(d), algo) for d, algo in items]
        return await asyncio.to_thread(_hash_paths, jobs, workers)

    async def open(self, digest: Digest) -> LocalReader:
        def opened():
            f = open(self.path(digest), "rb", buffering=0)  # noqa: SIM115 - the reader closes it
            return LocalReader(f, os.fstat(f.fileno()).st_size, self._io)

        try:
            return await self._run(opened)
        except FileNotFoundError:
            raise BlobMissing(f"no blob {digest.algo.value} {digest.hex}") from None

    async def feed_run(self, algo: Algo, run, sink, executor=None) -> list[int]:
        # One worker call for the whole run: opening and reading a local file takes
        # microseconds, so a thread hop per chunk would cost more than a small chunk's bytes.
        def work() -> list[int]:
            out = []
            buf = bytearray(READ_PIECE)
            view = memoryview(buf)
            for hex_, offset, length in run:
                digest = Digest(algo, hex_)
                try:
                    f = open(self.path(digest), "rb", buffering=0)  # noqa: SIM115 - closed below
                except FileNotFoundError:
                    raise BlobMissing(f"no blob {algo.value} {hex_}") from None
                done = 0
                with f:
                    f.seek(offset)
                    while done < length:
                        n = f.readinto(view[: min(len(buf), length - done)])
                        if not n:
                            break
                        sink(view[:n])
                        done += n
                out.append(done)
            return out

        return await asyncio.get_running_loop().run_in_executor(executor, work)

    async def delete(self, digest: Digest) -> bool:
        return await self._run(self.remove, digest)

    async def delete_if_older(self, digest: Digest, before: float) -> bool:
        def unlink_old() -> bool:
            path = self.path(digest)
            try:
                # A file linked from a daemon's temp file (row not yet written) is in flight.
                if os.lstat(path).st_mtime >= before or temp_busy(path):
                    return False
                os.unlink(path)
            except FileNotFoundError:
                return False
            return True

        return await self._run(unlink_old)

    async def list(self) -> AsyncIterator:
        for b in await self._run(lambda: list(self.walk())):
            yield BlobInfo(b.digest, str(b.path), b.size, b.mtime)

    async def quarantine(self, digest: Digest) -> str | None:
        dest = await self._run(self.move_aside, digest, self.quarantine_dir)
        return None if dest is None else str(dest)

    async def assemble(self, parts, dest: Path, total: int) -> None:
        await self._run(_assemble, [(self.path(d), size) for d, size in parts], dest, total)

    def ensure_dirs(self) -> None:
        for d in (self.blobs_dir.parent, self.blobs_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        for algo in Algo:
            (self.blobs_dir / algo.value).mkdir(exist_ok=True)

    def path(self, digest: Digest) -> Path:
        h = digest.hex
        return self.blobs_dir / digest.algo.value / h[:2] / h[2:4] / h

    def place(self, temp: TempBlob, digest: Digest) -> bool:
        """Hard-link a finished (fsynced) temp file at the blob's path, durably.

        Runs outside any lock. A file already there is left alone: only verified, fsynced
        bytes ever reach a blob path, so it holds the same content. The temp name stays
        (and so does its flock, on the same inode) until the caller discards it. False when
        the filesystem cannot hard-link; then `ensure_placed` renames instead. Returns once
        the link and any fan-out folder on its way are durable (fsyncs shared, FolderSync).
        """
        final = self.path(digest)
        fresh = self._make_parents(final.parent)
        try:
            os.link(temp.path, final)
        except FileExistsError:
            pass  # another upload's link; its folder may not be synced yet: sync below
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP):
                return False
            raise
        self._sync_parents(final.parent, fresh)
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
        fresh = self._make_parents(final.parent)
        try:
            os.link(temp.path, final)
        except OSError:
            os.replace(temp.path, final)
        self._sync_parents(final.parent, fresh)

    def _make_parents(self, parent: Path) -> bool:
        """Make the fan-out folders up to `parent`; True when they are not known durable yet.

        Whoever made them, their entries are fsynced (`_sync_parents`) by the first blob
        placed in them in this process, before it counts as placed: a folder another
        thread made a moment ago may not be durable yet.
        """
        if parent in self._known_dirs:
            return False
        for d in (parent.parent, parent):
            if not d.is_dir():
                with contextlib.suppress(FileExistsError):
                    d.mkdir()
        return True

    def _sync_parents(self, parent: Path, fresh: bool) -> None:
        """fsync `parent` (a new entry in it), and when its fan-out is fresh, the folders that
        hold it: deepest first, so one journal commit usually covers all three."""
        self._folders.sync(parent)
        if fresh:
            self._folders.sync(parent.parent)
            self._folders.sync(parent.parent.parent)
            self._known_dirs.add(parent)

    def put_over(self, temp: TempBlob, digest: Digest) -> None:
        """Under the catalogue's write lock: a finished temp file replaces the blob, atomically.

        For a blob whose bytes were found wrong: readers that opened the old file keep it,
        every later open gets the verified bytes. The temp name goes with the rename; its
        flock stays on the inode until the caller discards the temp.
        """
        final = self.path(digest)
        fresh = self._make_parents(final.parent)
        os.replace(temp.path, final)
        self._sync_parents(final.parent, fresh)
        self._folders.sync(temp.path.parent)

    def move_aside(self, digest: Digest, folder: Path) -> Path | None:
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


_buffers = threading.local()


def _hash_file(path: Path, algo) -> BlobHash:
    """xxh3-128 of a file, plus its real digest when `algo` is given; 1 MiB reads."""
    x = xxhash.xxh3_128()
    h = algo.new() if algo is not None else None
    buf = getattr(_buffers, "buf", None)
    if buf is None:  # one per thread: allocating 1 MiB per small blob costs more than hashing it
        buf = _buffers.buf = bytearray(READ_PIECE)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        while n := f.readinto(buf):
            x.update(view[:n])
            if h is not None:
                h.update(view[:n])
    return BlobHash(
        x.hexdigest(),
        h.hexdigest() if h else None,
        (st.st_ino, st.st_mtime_ns, st.st_size),
        st.st_size,
    )


def _hash_group(group: list) -> list:
    out: list = []
    for path, algo in group:
        try:
            out.append(_hash_file(path, algo))
        except FileNotFoundError:
            out.append(BlobMissing(f"{path} is gone"))
        except OSError as exc:
            out.append(exc)
    return out


def _groups(jobs: list, size_of, target: int = 8 << 20, most: int = 512):
    """Consecutive runs of jobs of about `target` bytes (at most `most` jobs): one thread
    hand-off per run, so a store of small blobs is not dominated by hand-offs."""
    group: list = []
    total = 0
    for job in jobs:
        group.append(job)
        total += size_of(job)
        if total >= target or len(group) >= most:
            yield group
            group, total = [], 0
    if group:
        yield group


def _size_or_zero(job) -> int:
    try:
        return os.stat(job[0]).st_size
    except OSError:
        return 0


def _hash_paths(jobs: list, workers: int) -> list:
    """Hash files in `workers` threads, in order, a few in flight per thread."""
    out: list = []
    with ThreadPoolExecutor(workers, thread_name_prefix="casd-fsck") as pool:
        pending: deque = deque()
        for group in _groups(jobs, _size_or_zero):
            pending.append(pool.submit(_hash_group, group))
            if len(pending) >= workers * 2:
                out += pending.popleft().result()
        for fut in pending:
            out += fut.result()
    return out


class LocalReader:
    """An open blob file (see BlobReader); `file` is what sendfile sends from."""

    def __init__(self, f, size: int, io=None):
        self.file = f
        self.size = size
        self._io = io

    async def stream(self, offset: int, length: int) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        end = offset + length
        while offset < end:
            data = await loop.run_in_executor(
                self._io, os.pread, self.file.fileno(), min(READ_PIECE, end - offset), offset
            )
            if not data:
                return
            offset += len(data)
            yield data

    async def close(self) -> None:
        self.file.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


# errno values with which copy_file_range says "not here": fall back to read/write.
_NO_COPY_RANGE = {
    errno.ENOSYS,
    errno.EXDEV,
    errno.EINVAL,
    errno.EOPNOTSUPP,
    errno.ENOTSUP,
    errno.EPERM,
    errno.EBADF,
}


def _assemble(parts: list[tuple[Path, int]], dest: Path, total: int) -> None:
    """Concatenate blobs into a temp file beside `dest`, check its size, rename it in place.

    Zero-copy (copy_file_range) where the filesystem allows it.
    """
    fd, temp = open_export_temp(dest)
    try:
        use_range = hasattr(os, "copy_file_range")
        for path, size in parts:
            try:
                src = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise BlobMissing(f"chunk {path.name} is gone") from None
            try:
                have = os.fstat(src).st_size
                if have != size:
                    raise ValueError(
                        f"chunk {path.name} has {have} bytes, the manifest says {size}"
                    )
                left = size
                while left and use_range:
                    try:
                        n = os.copy_file_range(src, fd, left)
                    except OSError as exc:
                        if exc.errno not in _NO_COPY_RANGE:
                            raise
                        use_range = False
                        break
                    if n == 0:
                        break
                    left -= n
                while left:
                    data = os.read(src, min(left, READ_PIECE))
                    if not data:
                        raise ValueError(f"chunk {path.name} ended {left} bytes early")
                    write_all(fd, data)
                    left -= len(data)
            finally:
                os.close(src)
    except BaseException:
        drop_export_temp(fd, temp)
        raise
    finish_export(fd, temp, dest, total)


def open_export_temp(dest: Path) -> tuple[int, Path]:
    """A new file beside `dest` to assemble an export in: (fd, its path)."""
    temp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.casd-export")
    return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temp


def write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def drop_export_temp(fd: int, temp: Path) -> None:
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp)


def finish_export(fd: int, temp: Path, dest: Path, total: int) -> None:
    """fsync, check the size, rename `temp` to `dest` durably; `fd` is closed either way and
    `temp` removed when anything fails."""
    try:
        os.fsync(fd)
        written = os.fstat(fd).st_size
        if written != total:
            raise ValueError(f"assembled {written} bytes, the file has {total}")
        os.close(fd)
        fd = -1
        os.replace(temp, dest)
    except BaseException:
        if fd >= 0:
            drop_export_temp(fd, temp)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        raise
    fsync_dir(dest.parent)


def _write_zeros(fd: int, size: int) -> None:
    block = bytes(1 << 20)
    left = size
    while left > 0:
        left -= os.write(fd, block[: min(left, len(block))])


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
