"""gc beside a busy daemon: a real race, and a kill -9 of gc halfway through."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

pytestmark = pytest.mark.slow

KiB = 1024
RACE_SECONDS = 15.0
# A slow machine gets more time to reach the least work the race must do, up to this.
RACE_MAX_SECONDS = 120.0

# Runs `casd gc --grace 0` back to back, with a quick `casd fsck` after every third one,
# through the CLI entry point, until the stop file appears; prints one JSON summary line.
# After every gc it also replaces the progress file with "RUNS CHUNKS" so far.
GC_LOOP = r"""
import io, json, os, sys, time
from contextlib import redirect_stdout
from pathlib import Path
from casd.cli import main

data, stop, progress = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
summary = {"gc_runs": 0, "chunks": 0, "uploads": 0, "kept": 0, "fsck_runs": 0,
           "fsck_issues": [], "errors": []}
while not stop.exists():
    for argv in (["gc", "--grace", "0"],) * 3 + (["fsck"],):
        out = io.StringIO()
        with redirect_stdout(out):
            code = main([*argv, "--data", data, "--json"])
        if argv[0] == "gc":
            if code != 0:
                summary["errors"].append(code)
                continue
            removed = json.loads(out.getvalue())["removed"]
            summary["gc_runs"] += 1
            summary["chunks"] += len(removed["chunks"])
            summary["uploads"] += removed["uploads"]
            summary["kept"] += removed["kept"]
            progress.with_suffix(".tmp").write_text(f"{summary['gc_runs']} {summary['chunks']}")
            os.replace(progress.with_suffix(".tmp"), progress)
        else:
            summary["fsck_runs"] += 1
            summary["fsck_issues"] += json.loads(out.getvalue())["issues"]
print(json.dumps(summary))
"""


@dataclass
class File:
    algo: str
    data: bytes
    chunks: list[bytes]
    digest: str = ""
    handshake: dict = field(default_factory=dict)

    def __post_init__(self):
        h = hashlib.new(self.algo)
        entries = []
        for c in self.chunks:
            h.update(c)
            entries.append({self.algo: hashlib.new(self.algo, c).hexdigest(), "size": len(c)})
        self.digest = h.hexdigest()
        self.handshake = {
            "algo": self.algo,
            self.algo: self.digest,
            "size": len(self.data),
            "chunks": entries,
        }
        self.by_digest = {e[self.algo]: c for e, c in zip(entries, self.chunks, strict=True)}


def make_file(algo: str, chunks: list[bytes]) -> File:
    return File(algo, b"".join(chunks), chunks)


def session() -> aiohttp.ClientSession:
    # A read that stalls fails the test in seconds instead of hanging it.
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(sock_read=20))


class Bug(AssertionError):
    pass


# What a client sees of a daemon killed under it: connection refused, reset or cut short.
CUT = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)


async def put_missing(s, base: str, f: File, hs: dict) -> bool:
    """PUT every chunk the handshake listed, in parallel; False when the upload went away."""

    async def one(d):
        async with s.put(
            f"{base}/v1/uploads/{hs['upload_id']}/chunks/{d}", data=f.by_digest[d]
        ) as r:
            if r.status == 404:
                return False
            if r.status not in (200, 201):
                raise Bug(f"PUT {d}: {r.status} {await r.text()}")
            return True

    return all(await asyncio.gather(*(one(d) for d in hs["missing"])))


async def upload(s, base: str, f: File) -> dict:
    """The protocol's client loop. A 404 means another client merged (or the upload was
    dropped): start again from the handshake. A 409 would mean a chunk the server promised
    to keep was lost: that is the bug this test hunts."""
    for _ in range(100):
        async with s.post(f"{base}/v1/handshake", json=f.handshake) as r:
            if r.status != 200:
                raise Bug(f"handshake: {r.status} {await r.text()}")
            hs = await r.json()
        if hs["status"] == "complete":
            return hs
        if not await put_missing(s, base, f, hs):
            continue
        async with s.post(f"{base}/v1/uploads/{hs['upload_id']}/merge") as r:
            if r.status == 200:
                return await r.json()
            if r.status != 404:
                raise Bug(f"merge of {f.digest}: {r.status} {await r.text()}")
    raise Bug(f"{f.digest} never completed")


async def download(s, base: str, f: File) -> bytes:
    async with s.get(f"{base}/v1/files/{f.digest}") as r:
        if r.status != 200:
            raise Bug(f"download {f.digest}: {r.status} {await r.text()}")
        return await r.read()


def casd(data: Path, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "casd", *argv, "--data", str(data)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


def count_blobs(data: Path) -> int:
    return sum(1 for p in (data / "blobs").rglob("*") if p.is_file())


# ---- the race ---------------------------------------------------------------------------


@dataclass
class Engines:
    """The daemons a test runs on, the environment the admin commands need, and how to count
    the blobs in the store they share."""

    daemons: list
    env: dict
    count_blobs: object  # () -> int


def local_engines(daemons: list, env: dict) -> Engines:
    return Engines(daemons, env, lambda: count_blobs(daemons[0].data_dir))


def shared_engines(request, daemon_factory, *extra: str) -> Engines:
    """Two daemons on one S3 bucket (moto) and one PostgreSQL catalogue, each with its own
    data folder for temp files."""
    s3_server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    url = request.getfixturevalue("postgres_url")
    blobs = f"s3://{bucket}/casd"
    args = ("--blobs", blobs, "--s3-endpoint", s3_server.endpoint, "--catalog", url, *extra)
    daemons = [daemon_factory(*args), daemon_factory(*args)]
    env = dict(os.environ, CASD_BLOBS=blobs, CASD_S3_ENDPOINT=s3_server.endpoint, CASD_CATALOG=url)

    def objects() -> int:
        return sum(1 for k in s3_server.keys(bucket, "casd/") if "/quarantine/" not in k)

    return Engines(daemons, env, objects)


@pytest.fixture(params=["sqlite", "postgres", "s3+postgres"])
def engines(request, daemon_factory) -> Engines:
    """One daemon on SQLite; two daemons sharing one PostgreSQL catalogue and one data
    folder; or two daemons sharing an S3 bucket and a PostgreSQL catalogue."""
    if request.param == "sqlite":
        return local_engines([daemon_factory()], dict(os.environ))
    if request.param == "s3+postgres":
        return shared_engines(request, daemon_factory)
    url = request.getfixturevalue("postgres_url")
    one = daemon_factory("--catalog", url)
    two = daemon_factory("--catalog", url, data_dir=one.data_dir)
    return local_engines([one, two], dict(os.environ, CASD_CATALOG=url))


async def test_gc_loop_beside_busy_clients_loses_nothing(engines, tmp_path):
    daemons, env = engines.daemons, engines.env
    daemon = daemons[0]
    rng = random.Random(20261124)
    # One pool of chunks per algorithm; every file is drawn from it, so files overlap.
    pools = {
        algo: [rng.randbytes(rng.randrange(2 * KiB, 40 * KiB)) for _ in range(36)]
        for algo in ("md5", "sha256")
    }

    seen: set[str] = set()

    def draw(algo: str) -> File:
        """A file no other file equals (ownership below relies on it)."""
        while True:
            f = make_file(algo, rng.sample(pools[algo], rng.randrange(2, 7)))
            if f.digest not in seen:
                seen.add(f.digest)
                return f

    # Four clients, each owning files that only it deletes (the sha256 one has its own
    # namespace); two files that everyone uploads and no one deletes.
    owned = [[draw("sha256" if c == 3 else "md5") for _ in range(5)] for c in range(4)]
    shared = [draw("md5"), draw("sha256")]
    # What must be complete at the end: each file a client saw merged, less those it deleted.
    present: dict[str, File] = {}
    counts = {"uploads": 0, "deletes": 0, "aborts": 0, "downloads": 0, "cut": 0, "kills": 0}
    stop = tmp_path / "stop-gc"
    progress = tmp_path / "gc-progress"
    gc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        GC_LOOP,
        str(daemon.data_dir),
        str(stop),
        str(progress),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    started = time.monotonic()

    def gc_progress() -> tuple[int, int]:
        """(gc runs, chunks removed) so far."""
        try:
            runs, chunks = progress.read_text().split()
        except FileNotFoundError:
            return 0, 0
        return int(runs), int(chunks)

    def racing() -> bool:
        """RACE_SECONDS at least; then on until the race has done the least work the checks
        below want (a loaded machine does less in the same time), but not past
        RACE_MAX_SECONDS."""
        elapsed = time.monotonic() - started
        if elapsed < RACE_SECONDS:
            return True
        runs, chunks = gc_progress()
        enough = counts["uploads"] >= 20 and counts["deletes"] >= 5 and runs >= 5 and chunks > 0
        return not enough and elapsed < RACE_MAX_SECONDS

    async def retry(step, first: int):
        """`step(base)` until a daemon answers it: a connection the kill -9 below cuts is
        retried on the other daemon, as a client behind a load balancer would be."""
        for attempt in range(400):
            try:
                return await step(daemons[(first + attempt) % len(daemons)].url, attempt > 0)
            except CUT:
                counts["cut"] += 1
                await asyncio.sleep(0.05)
        raise Bug("no daemon answered")

    async def client(c: int) -> None:
        crng = random.Random(c)
        mine = owned[c]
        async with session() as s:

            async def abort(base: str, _again: bool) -> None:
                # Start an upload of new content mixed with pooled chunks, then abort it; a
                # retry after a cut aborts the same upload (a pending one would keep chunks).
                async with s.post(f"{base}/v1/handshake", json=f.handshake) as r:
                    hs = await r.json()
                half = dict(hs, missing=hs["missing"][: len(hs["missing"]) // 2 + 1])
                await put_missing(s, base, f, half)
                async with s.delete(f"{base}/v1/uploads/{hs['upload_id']}") as r:
                    assert r.status == 204

            async def fetch(base: str, _again: bool) -> bytes:
                return await download(s, base, f)

            async def delete(base: str, again: bool) -> None:
                async with s.delete(f"{base}/v1/files/{f.digest}") as r:
                    # After a cut the first try may have deleted it already.
                    if r.status != 204 and not (again and r.status == 404):
                        raise Bug(f"delete {f.digest}: {r.status}")

            turn = c
            while racing():
                # With two daemons, each client alternates between them.
                turn += 1
                if crng.random() < 0.15:
                    algo = mine[0].algo
                    f = make_file(algo, [crng.randbytes(3 * KiB), *crng.sample(pools[algo], 3)])
                    await retry(abort, turn)
                    counts["aborts"] += 1
                    continue
                f = crng.choice(mine + shared)
                await retry(lambda base, _again: upload(s, base, f), turn)  # noqa: B023
                counts["uploads"] += 1
                present[f.digest] = f
                if await retry(fetch, turn) != f.data:
                    raise Bug(f"{f.digest} downloaded different bytes")
                counts["downloads"] += 1
                if f in mine and crng.random() < 0.6:
                    await retry(delete, turn)
                    del present[f.digest]
                    counts["deletes"] += 1

    async def killer() -> None:
        """A third of the way in, kill -9 the second daemon with half a chunk of a fresh
        upload on the wire, start it again, and finish that upload where it stopped."""
        victim = daemons[1]
        krng = random.Random(99)
        f = make_file("md5", [krng.randbytes(8 * KiB) for _ in range(4)])
        await asyncio.sleep(RACE_SECONDS / 3)
        async with session() as s:
            async with s.post(f"{victim.url}/v1/handshake", json=f.handshake) as r:
                hs = await r.json()
            first, cut = hs["missing"][:2]
            async with s.put(
                f"{victim.url}/v1/uploads/{hs['upload_id']}/chunks/{first}", data=f.by_digest[first]
            ) as r:
                assert r.status == 201
            _, writer = await asyncio.open_connection("127.0.0.1", victim.port)
            body = f.by_digest[cut]
            writer.write(
                f"PUT /v1/uploads/{hs['upload_id']}/chunks/{cut} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{victim.port}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body[: len(body) // 2]
            )
            await writer.drain()
            await asyncio.to_thread(victim.restart)  # kill -9, then start on the same port
            writer.close()
            counts["kills"] += 1
            # The upload resumes: the same upload, missing exactly what was not acknowledged.
            async with s.post(f"{victim.url}/v1/handshake", json=f.handshake) as r:
                again = await r.json()
            assert again["upload_id"] == hs["upload_id"], again
            assert again["missing"] == hs["missing"][1:], again
            await upload(s, victim.url, f)
            present[f.digest] = f

    try:
        # The shared files are there before the clients start, so every gc below sees them
        # and must keep their chunks, however few times the clients pick them again.
        async with session() as s:
            for f in shared:
                await upload(s, daemon.url, f)
                present[f.digest] = f
        await asyncio.gather(
            *(client(c) for c in range(4)), *([killer()] if len(daemons) > 1 else [])
        )
    finally:
        stop.touch()
        out, err = await asyncio.wait_for(gc.communicate(), 120)
    assert gc.returncode == 0, err.decode()
    summary = json.loads(out.decode().strip().splitlines()[-1])
    # It was a race: gc ran throughout and kept deleting chunks the clients then needed again.
    assert summary["errors"] == [] and summary["fsck_issues"] == [], summary
    assert summary["gc_runs"] >= 5 and summary["chunks"] > 0, summary
    assert counts["uploads"] >= 20 and counts["deletes"] >= 5, counts
    assert counts["kills"] == len(daemons) - 1, counts
    assert counts["cut"] == 0 or counts["kills"], counts  # connections cut only by the kill

    # Everything that should be complete is, byte for byte, and nothing else is.
    listing = casd(daemon.data_dir, "ls", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    assert {f["digest"] for f in json.loads(listing.stdout)} == set(present)
    async with session() as s:
        for f in present.values():
            for d in daemons:
                assert await download(s, d.url, f) == f.data
    deep = casd(daemon.data_dir, "fsck", "--deep", env=env)
    assert deep.returncode == 0, deep.stdout + deep.stderr
    # A last gc leaves exactly the chunks of the complete files.
    assert casd(daemon.data_dir, "gc", "--grace", "0", env=env).returncode == 0
    wanted = {d for f in present.values() for d in f.by_digest}
    assert engines.count_blobs() == len(wanted)
    deep = casd(daemon.data_dir, "fsck", "--deep", env=env)
    assert deep.returncode == 0, deep.stdout + deep.stderr
    print(f"race: {counts}, gc loop: {summary}")


# ---- kill -9 of gc ----------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["sqlite", "postgres", "s3+postgres"])
async def test_kill_9_of_gc_midway_loses_nothing(daemon_factory, engine, request):
    if engine == "sqlite":
        one = local_engines([daemon_factory("--sync", "NORMAL")], dict(os.environ))
    elif engine == "postgres":
        url = request.getfixturevalue("postgres_url")
        one = local_engines([daemon_factory("--catalog", url)], dict(os.environ, CASD_CATALOG=url))
    else:
        one = shared_engines(request, daemon_factory)
    daemon, env, blobs = one.daemons[0], one.env, one.count_blobs
    rng = random.Random(7)
    garbage = [rng.randbytes(rng.randrange(512, 2 * KiB)) for _ in range(400)]
    keep = make_file("md5", [*garbage[::40], rng.randbytes(4 * KiB)])  # shares 10 chunks
    doomed = make_file("md5", garbage)
    async with session() as s:
        async with s.post(f"{daemon.url}/v1/handshake", json=doomed.handshake) as r:
            hs = await r.json()
        sem = asyncio.Semaphore(16)

        async def put(d):
            async with (
                sem,
                s.put(
                    f"{daemon.url}/v1/uploads/{hs['upload_id']}/chunks/{d}",
                    data=doomed.by_digest[d],
                ) as r,
            ):
                assert r.status == 201

        await asyncio.gather(*(put(d) for d in hs["missing"]))
        await upload(s, daemon.url, doomed)
        await upload(s, daemon.url, keep)
        async with s.delete(f"{daemon.url}/v1/files/{doomed.digest}") as r:
            assert r.status == 204
    total = blobs()
    assert total == len(garbage) + 1
    # One chunk per transaction makes gc slow enough to be caught in the middle.
    gc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "casd",
        "gc",
        "--grace",
        "0",
        "--batch-size",
        "1",
        "--data",
        str(daemon.data_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while blobs() > total - 30:
            assert gc.returncode is None, "gc finished before it could be killed"
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005 if engine != "s3+postgres" else 0.05)
    finally:
        if gc.returncode is None:
            gc.kill()  # SIGKILL: no cleanup of any kind
        await gc.wait()
    left = blobs()
    assert len(keep.by_digest) < left <= total - 30, left  # killed midway: garbage is left

    daemon.restart()  # the daemon too, kill -9 and start again
    fsck = casd(daemon.data_dir, "fsck", "--json", env=env)
    report = json.loads(fsck.stdout)
    assert fsck.returncode == 0 and report["issues"] == [], report
    async with session() as s:
        assert await download(s, daemon.url, keep) == keep.data
    again = casd(daemon.data_dir, "gc", "--grace", "0", "--json", env=env)
    assert again.returncode == 0, again.stderr
    assert blobs() == len(keep.by_digest)
    deep = casd(daemon.data_dir, "fsck", "--deep", "--json", env=env)
    report = json.loads(deep.stdout)
    assert deep.returncode == 0 and report["issues"] == [] and report["deleting_chunks"] == 0
    async with session() as s:
        assert await download(s, daemon.url, keep) == keep.data
        # The daemon agrees with the store: re-uploading the garbage asks for all of it
        # but the chunks `keep` still holds.
        async with s.post(f"{daemon.url}/v1/handshake", json=doomed.handshake) as r:
            hs = await r.json()
        assert set(hs["missing"]) == set(doomed.by_digest) - set(keep.by_digest)
