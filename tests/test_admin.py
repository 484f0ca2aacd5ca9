"""The admin commands (gc, fsck, stats, ls, rm, export) on data made by a real `casd serve`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from casd.catalog.sqlite import SqliteCatalog
from casd.config import Settings
from casd.maintenance import Maintenance
from helpers import Prepared, casd_run, prepare, rand, snapshot
from helpers import casd_here as _casd_here
from helpers import upload as upload_one

KiB = 1024
CHUNK = 64 * KiB


# ---- helpers ----------------------------------------------------------------------------


def session() -> aiohttp.ClientSession:
    # A read that stalls fails the test in seconds instead of hanging it.
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(sock_read=20))


def casd(data: Path, *argv: str) -> tuple[int, str, str]:
    """Run a casd command in this process: (exit code, stdout, stderr)."""
    r = _casd_here(data, *argv)
    return r.returncode, r.stdout, r.stderr


def casd_json(data: Path, *argv: str):
    code, out, _err = casd(data, *argv, "--json")
    return code, json.loads(out)


def casd_process(data: Path, *argv: str) -> subprocess.CompletedProcess:
    """Run casd as a user does, in its own process."""
    return casd_run(*argv, "--data", str(data))


def upload(base: str, *files: Prepared) -> list[dict]:
    """Handshake, PUT the missing chunks, merge, for each file in turn."""

    async def go():
        async with session() as s:
            return [await upload_one(s, base, p) for p in files]

    return asyncio.run(go())


def handshake(base: str, p: Prepared) -> dict:
    async def go():
        async with session() as s, s.post(f"{base}/v1/handshake", json=p.handshake) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    return asyncio.run(go())


def fetch(base: str, url: str) -> tuple[int, bytes]:
    async def go():
        async with session() as s, s.get(base + url) as r:
            return r.status, await r.read()

    return asyncio.run(go())


def blob(data: Path, digest: str, algo: str = "md5") -> Path:
    return data / "blobs" / algo / digest[:2] / digest[2:4] / digest


def shared_pair() -> tuple[Prepared, Prepared]:
    """Two files sharing their first three chunks; each has two of its own."""
    common = rand(3 * CHUNK, seed=1)
    a = prepare(common + rand(2 * CHUNK, seed=2), CHUNK, ext=".bin", name="a.bin")
    b = prepare(common + rand(2 * CHUNK - 100, seed=3), CHUNK, ext=".dat", name="b.dat")
    return a, b


def kinds(report: dict) -> list[tuple[str, str | None]]:
    return sorted((i["kind"], i["digest"] or "") for i in report["issues"])


# ---- ls, stats, rm, export --------------------------------------------------------------


def test_ls_lists_every_complete_file(daemon):
    a, b = shared_pair()
    before = time.time()
    upload(daemon.url, a, b)
    handshake(daemon.url, prepare(rand(CHUNK, seed=9), CHUNK))  # pending: not a file
    code, files = casd_json(daemon.data_dir, "ls")
    assert code == 0
    assert [(f["digest"], f["size"], f["name"], f["ext"]) for f in files] == [
        (a.digest, len(a.data), "a.bin", ".bin"),
        (b.digest, len(b.data), "b.dat", ".dat"),
    ]
    created = time.mktime(time.strptime(files[0]["created"], "%Y-%m-%dT%H:%M:%SZ"))
    assert created - time.timezone >= int(before) - 1
    assert files[0]["url"] == f"/v1/files/{a.digest}.bin"
    code, out, _ = casd(daemon.data_dir, "ls")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{a.digest}.bin") and "a.bin" in lines[0]


def test_stats_counts_files_chunks_dedup_and_pending(daemon):
    a, b = shared_pair()
    upload(daemon.url, a, b)
    pending = prepare(rand(CHUNK + 7, seed=8), CHUNK)
    handshake(daemon.url, pending)
    code, s = casd_json(daemon.data_dir, "stats")
    assert code == 0
    distinct = {**a.chunks, **b.chunks}
    physical = sum(len(c) for c in distinct.values())
    assert s["files"] == 2
    assert s["logical_bytes"] == len(a.data) + len(b.data)
    assert s["chunks"] == len(distinct) == 7
    assert s["physical_bytes"] == physical
    assert s["dedup_ratio"] == pytest.approx((len(a.data) + len(b.data)) / physical, rel=1e-3)
    assert (s["pending_uploads"], s["pending_bytes"]) == (1, len(pending.data))
    code, out, _ = casd(daemon.data_dir, "stats")
    assert code == 0 and re.search(r"^complete files: +2$", out, re.MULTILINE)
    assert re.search(r"^dedup ratio: +1\.43$", out, re.MULTILINE)


def test_rm_removes_the_file_like_delete(daemon):
    a, b = shared_pair()
    upload(daemon.url, a, b)
    code, out, _ = casd(daemon.data_dir, "rm", a.digest.upper() + ".bin")
    assert code == 0 and a.digest in out
    assert fetch(daemon.url, f"/v1/files/{a.digest}.bin")[0] == 404
    assert fetch(daemon.url, f"/v1/files/{b.digest}.dat") == (200, b.data)
    # Its chunks are left for gc; an instant upload of it is no longer possible.
    assert all(blob(daemon.data_dir, d).is_file() for d in a.order)
    assert handshake(daemon.url, a)["status"] == "pending"
    code, _, err = casd(daemon.data_dir, "rm", a.digest)
    assert code == 1 and err.strip() == f"casd rm: no file {a.digest}"
    code, _, err = casd(daemon.data_dir, "rm", "not-a-digest")
    assert code == 2 and "not an md5 or sha256 digest" in err


def test_export_assembles_the_file(daemon, tmp_path):
    a, b = shared_pair()
    sha = prepare(rand(3 * CHUNK + 1, seed=4), CHUNK, algo="sha256", ext=".bin")
    upload(daemon.url, a, b, sha)
    out_file = tmp_path / "out" / "a-copy"
    out_file.parent.mkdir()
    code, out, _ = casd(daemon.data_dir, "export", a.digest, str(out_file))
    assert code == 0, out
    assert out_file.read_bytes() == a.data
    # A folder gets DIGEST.EXT; sha256 files work the same.
    code, _, _ = casd(daemon.data_dir, "export", sha.digest, str(out_file.parent))
    assert code == 0
    assert (out_file.parent / f"{sha.digest}.bin").read_bytes() == sha.data
    # No silent overwrite; --force replaces; no temp file is left behind either way.
    code, _, err = casd(daemon.data_dir, "export", b.digest, str(out_file))
    assert code == 1 and "exists" in err and out_file.read_bytes() == a.data
    code, _, _ = casd(daemon.data_dir, "export", b.digest, str(out_file), "--force")
    assert code == 0 and out_file.read_bytes() == b.data
    assert sorted(p.name for p in out_file.parent.iterdir()) == sorted(
        ["a-copy", f"{sha.digest}.bin"]
    )


def test_export_of_a_damaged_file_fails_and_writes_nothing(daemon, tmp_path):
    a, _b = shared_pair()
    upload(daemon.url, a)
    blob(daemon.data_dir, a.order[1]).unlink()
    code, _, err = casd(daemon.data_dir, "export", a.digest, str(tmp_path / "x"))
    assert code == 1 and "run casd fsck" in err and "\n" not in err.strip()
    assert list(tmp_path.glob("*x*")) == []


def test_admin_commands_fail_in_one_line_without_a_data_folder(tmp_path):
    nowhere = tmp_path / "nothing-here"
    for argv in (["gc"], ["export", "0" * 32, str(tmp_path / "x")]):
        r = casd_process(nowhere, *argv)
        assert r.returncode == 1, (argv, r)
        assert r.stderr.count("\n") == 1 and "no casd catalogue" in r.stderr, r.stderr
    for argv in (["fsck"], ["stats"], ["ls"], ["rm", "0" * 32]):
        code, out, err = casd(nowhere, *argv)
        assert code == 1 and out == "" and err.startswith(f"casd {argv[0]}: no casd catalogue")
    assert not nowhere.exists()


# ---- gc ---------------------------------------------------------------------------------


def test_gc_removes_unused_chunks_and_keeps_shared_ones(daemon):
    a, b = shared_pair()
    upload(daemon.url, a, b)
    casd(daemon.data_dir, "rm", a.digest)
    r = casd_process(daemon.data_dir, "gc", "--grace", "0")
    assert r.returncode == 0, r.stderr
    own = [d for d in a.order if d not in b.chunks]
    freed = sum(len(a.chunks[d]) for d in own)
    assert f"{len(own)} chunks" in r.stdout and "freed" in r.stdout
    assert f"({freed} bytes)" in r.stdout
    assert not any(blob(daemon.data_dir, d).exists() for d in own)
    assert all(blob(daemon.data_dir, d).is_file() for d in b.order)
    assert fetch(daemon.url, f"/v1/files/{b.digest}.dat") == (200, b.data)
    # The daemon sees them gone: a new handshake of `a` asks for exactly those again.
    assert handshake(daemon.url, a)["missing"] == own
    code, report = casd_json(daemon.data_dir, "fsck", "--deep")
    assert code == 0 and report["issues"] == []
    upload(daemon.url, a)
    assert fetch(daemon.url, f"/v1/files/{a.digest}")[1] == a.data


def test_gc_dry_run_changes_nothing_and_prints_the_plan(daemon):
    a, b = shared_pair()
    upload(daemon.url, a, b)
    casd(daemon.data_dir, "rm", a.digest)
    casd(daemon.data_dir, "rm", b.digest)
    old = daemon.data_dir / "tmp" / "blob-stale.part"
    old.write_bytes(b"x" * 10)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    before = snapshot(daemon.data_dir)
    code, plan = casd_json(daemon.data_dir, "gc", "--grace", "0", "--dry-run")
    assert code == 0 and plan["dry_run"] is True
    assert snapshot(daemon.data_dir) == before
    distinct = {**a.chunks, **b.chunks}
    assert sorted(c["digest"] for c in plan["plan"]["chunks"]) == sorted(distinct)
    assert [t["path"] for t in plan["plan"]["temp_files"]] == [str(old)]
    code, out, _ = casd(daemon.data_dir, "gc", "--grace", "0", "--dry-run")
    assert code == 0 and "dry run: nothing changed" in out
    assert snapshot(daemon.data_dir) == before
    # The real run removes exactly what the plan said.
    code, done = casd_json(daemon.data_dir, "gc", "--grace", "0")
    assert code == 0
    assert sorted(c["digest"] for c in done["removed"]["chunks"]) == sorted(distinct)
    assert done["removed"]["bytes_freed"] == plan["plan"]["bytes"]
    assert done["removed"]["manifests"] == 0  # rm dropped them already
    assert not old.exists() and not list((daemon.data_dir / "blobs").rglob("*/*/*/*"))


def test_gc_grace_period_keeps_young_chunks(daemon):
    a, _b = shared_pair()
    upload(daemon.url, a)
    casd(daemon.data_dir, "rm", a.digest)
    code, r = casd_json(daemon.data_dir, "gc")  # default grace: an hour
    assert code == 0 and r["removed"]["chunks"] == [] and r["plan"]["grace"] == 3600
    code, r = casd_json(daemon.data_dir, "gc", "--grace", "600")
    assert r["removed"]["chunks"] == []
    assert all(blob(daemon.data_dir, d).is_file() for d in a.order)
    code, r = casd_json(daemon.data_dir, "gc", "--grace", "0")
    assert len(r["removed"]["chunks"]) == len(a.chunks)


def test_gc_never_collects_a_chunk_a_live_handshake_did_not_list_missing(daemon):
    a, b = shared_pair()
    upload(daemon.url, a)
    casd(daemon.data_dir, "rm", a.digest)  # a's chunks are garbage now ...
    hs = handshake(daemon.url, b)  # ... until this handshake relies on the shared three
    relied_on = [d for d in b.order if d not in hs["missing"]]
    assert relied_on == b.order[:3]
    code, r = casd_json(daemon.data_dir, "gc", "--grace", "0")
    assert code == 0
    removed = {c["digest"] for c in r["removed"]["chunks"]}
    assert removed == set(a.order) - set(relied_on)
    assert all(blob(daemon.data_dir, d).is_file() for d in relied_on)
    done = upload(daemon.url, b)[0]  # sends only hs["missing"], merges
    assert done["status"] == "complete"
    assert fetch(daemon.url, done["url"]) == (200, b.data)
    assert casd_json(daemon.data_dir, "fsck", "--deep")[0] == 0


def test_gc_drops_expired_uploads_and_their_chunks(daemon, tmp_path):
    a, b = shared_pair()
    upload(daemon.url, b)
    # An upload that sent a chunk of its own and one it shares with `b`, then went quiet.
    p = prepare(a.data[: 3 * CHUNK] + rand(CHUNK, seed=5), CHUNK)
    hs = handshake(daemon.url, p)
    asyncio.run(_put(daemon.url, hs["upload_id"], p, p.order[3]))
    settings = Settings(data_dir=daemon.data_dir)

    async def gc_in(days: float):
        m = await Maintenance.open(settings, clock=lambda: time.time() + days * 86400)
        try:
            stats = await m.stats()
            return stats, *(await m.gc(grace=0))
        finally:
            await m.close()

    stats, _plan, result = asyncio.run(gc_in(0))
    assert stats.pending_uploads == 1 and result.uploads == 0 and result.chunks == ()
    stats, _plan, result = asyncio.run(gc_in(2))  # past the 24 h TTL
    # Expired: the quiet upload, and the merged upload that built `b` (kept for repeat merges).
    assert stats.expired_uploads == 2 and stats.pending_uploads == 0
    assert (result.uploads, result.manifests) == (2, 1)
    assert [c.digest.hex for c in result.chunks] == [p.order[3]]
    assert not blob(daemon.data_dir, p.order[3]).exists()
    assert fetch(daemon.url, f"/v1/uploads/{hs['upload_id']}")[0] == 404
    assert fetch(daemon.url, f"/v1/files/{b.digest}") == (200, b.data)


async def _put(base: str, upload_id: str, p: Prepared, digest: str) -> None:
    async with (
        session() as s,
        s.put(f"{base}/v1/uploads/{upload_id}/chunks/{digest}", data=p.chunks[digest]) as r,
    ):
        assert r.status == 201, await r.text()


def test_gc_aborted_upload_chunks_are_collected(daemon):
    p = prepare(rand(2 * CHUNK, seed=6), CHUNK)
    hs = handshake(daemon.url, p)
    asyncio.run(_put(daemon.url, hs["upload_id"], p, p.order[0]))

    async def abort():
        async with session() as s, s.delete(f"{daemon.url}/v1/uploads/{hs['upload_id']}") as r:
            assert r.status == 204

    code, r = casd_json(daemon.data_dir, "gc", "--grace", "0")
    assert r["removed"]["chunks"] == []  # still pending: relied on
    asyncio.run(abort())
    code, r = casd_json(daemon.data_dir, "gc", "--grace", "0")
    assert code == 0
    assert [c["digest"] for c in r["removed"]["chunks"]] == [p.order[0]]


def test_gc_removes_only_stale_temp_files(daemon):
    tmp = daemon.data_dir / "tmp"
    stale, fresh = tmp / "blob-old.part", tmp / "blob-new.part"
    stale.write_bytes(b"s" * 100)
    fresh.write_bytes(b"f" * 100)
    hour_ago = time.time() - 3700
    os.utime(stale, (hour_ago, hour_ago))
    # Even --grace 0 leaves a temp file the daemon may still be renaming (10 minutes).
    code, r = casd_json(daemon.data_dir, "gc", "--grace", "0")
    assert code == 0 and r["removed"]["temp_files"] == [str(stale)]
    assert r["removed"]["bytes_freed"] == 100
    assert fresh.exists() and not stale.exists()


def test_a_chunk_revived_between_gc_steps_survives(daemon):
    """gc marked X DELETING; a client re-uploads X before gc unlinks it: X must stay."""
    a, b = shared_pair()
    upload(daemon.url, a)
    casd(daemon.data_dir, "rm", a.digest)
    settings = Settings(data_dir=daemon.data_dir)

    async def step(fn):
        cat = await SqliteCatalog.open(settings.catalog_path)
        try:
            return await fn(cat)
        finally:
            await cat.close()

    now = time.time()
    marked = asyncio.run(step(lambda c: c.mark_garbage(a.order, now, now)))
    assert sorted(r.digest.hex for r in marked) == sorted(a.chunks)
    # The daemon treats them as absent: b's handshake lists the shared ones as missing.
    done = upload(daemon.url, b)[0]
    unlinked = []

    async def unlink(rows):
        unlinked.extend(rows)
        for r in rows:
            blob(daemon.data_dir, r.digest.hex).unlink()

    retired = asyncio.run(step(lambda c: c.retire_chunks(a.order, unlink)))
    assert sorted(r.digest.hex for r in retired) == sorted(a.order[3:])
    assert unlinked == retired
    assert fetch(daemon.url, done["url"]) == (200, b.data)
    code, report = casd_json(daemon.data_dir, "fsck", "--deep")
    assert code == 0, report


def test_an_interrupted_gc_is_clean_and_the_next_one_finishes(daemon):
    """kill -9 between gc's unlink and its commit: DELETING rows without files."""
    a, b = shared_pair()
    upload(daemon.url, a, b)
    casd(daemon.data_dir, "rm", a.digest)
    own = [d for d in a.order if d not in b.chunks]
    con = sqlite3.connect(daemon.data_dir / "catalog.sqlite")
    with con:
        con.executemany("UPDATE chunks SET state = 1 WHERE digest = ?", [(d,) for d in own])
    con.close()
    blob(daemon.data_dir, own[0]).unlink()  # one unlinked, one not yet
    code, report = casd_json(daemon.data_dir, "fsck")
    assert code == 0 and report["issues"] == [] and report["deleting_chunks"] == 2
    assert casd_json(daemon.data_dir, "stats")[1]["deleting_chunks"] == 2
    code, r = casd_json(daemon.data_dir, "gc", "--grace", "3600")  # unfinished work ignores grace
    assert sorted(c["digest"] for c in r["removed"]["chunks"]) == sorted(own)
    assert r["removed"]["bytes_freed"] == len(a.chunks[own[1]])
    code, report = casd_json(daemon.data_dir, "fsck", "--deep")
    assert code == 0 and report["issues"] == [] and report["deleting_chunks"] == 0
    assert fetch(daemon.url, f"/v1/files/{b.digest}") == (200, b.data)


# ---- fsck -------------------------------------------------------------------------------


@pytest.fixture
def stored(daemon):
    """A daemon holding two files that share chunks, and a pending upload."""
    a, b = shared_pair()
    upload(daemon.url, a, b)
    p = prepare(rand(2 * CHUNK, seed=7), CHUNK)
    hs = handshake(daemon.url, p)
    asyncio.run(_put(daemon.url, hs["upload_id"], p, p.order[0]))
    return daemon, a, b, p


def test_fsck_clean_store_quick_and_deep(stored):
    daemon, *_ = stored
    for mode in ([], ["--deep"]):
        r = casd_process(daemon.data_dir, "fsck", *mode)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "8 blobs" in r.stdout and "no problems" in r.stdout
    code, report = casd_json(daemon.data_dir, "fsck", "--deep")
    assert code == 0 and report["blobs_checked"] == 8 and report["ok"] is True


def test_fsck_missing_blob_names_the_files(stored):
    daemon, a, b, _ = stored
    shared = a.order[0]
    blob(daemon.data_dir, shared).unlink()
    r = casd_process(daemon.data_dir, "fsck")
    assert r.returncode == 1
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("missing_blob"))
    assert shared in line and f"{a.digest}.bin (a.bin)" in line and b.digest in line
    code, report = casd_json(daemon.data_dir, "fsck")
    assert code == 1 and kinds(report) == [("missing_blob", shared)]
    assert sorted(report["issues"][0]["files"]) == sorted(
        [f"{a.digest}.bin (a.bin)", f"{b.digest}.dat (b.dat)"]
    )


def test_fsck_wrong_size(stored):
    daemon, a, _b, _ = stored
    with open(blob(daemon.data_dir, a.order[4]), "ab") as f:
        f.write(b"!")
    code, report = casd_json(daemon.data_dir, "fsck")
    assert code == 1 and kinds(report) == [("wrong_size", a.order[4])]
    assert f"has {CHUNK + 1} bytes" in report["issues"][0]["detail"]
    assert report["issues"][0]["files"] == [f"{a.digest}.bin (a.bin)"]


def test_fsck_flipped_byte_found_by_quick_xxh3_and_by_deep(stored):
    daemon, a, _b, _ = stored
    path = blob(daemon.data_dir, a.order[3])
    data = bytearray(path.read_bytes())
    data[1234] ^= 0x01
    path.write_bytes(bytes(data))
    code, quick = casd_json(daemon.data_dir, "fsck")
    assert code == 1 and kinds(quick) == [("corrupt", a.order[3])]
    assert "xxh3-128" in quick["issues"][0]["detail"]
    code, deep = casd_json(daemon.data_dir, "fsck", "--deep")
    assert code == 1 and kinds(deep) == [("corrupt", a.order[3])]
    assert "md5" in deep["issues"][0]["detail"]
    assert deep["issues"][0]["files"] == [f"{a.digest}.bin (a.bin)"]


def test_fsck_orphan_files(stored):
    daemon, *_ = stored
    stray = rand(100, seed=11)
    import hashlib

    d = hashlib.md5(stray).hexdigest()
    path = blob(daemon.data_dir, d)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(stray)
    odd = daemon.data_dir / "blobs" / "md5" / "notes.txt"
    odd.write_text("hello")
    code, report = casd_json(daemon.data_dir, "fsck")
    # The misplaced file is a problem; the blob file with no row is a note: gc removes it.
    assert code == 1 and kinds(report) == [("orphan_file", "")]
    assert str(odd) in report["issues"][0]["detail"]
    assert [(n["kind"], n["digest"]) for n in report["notes"]] == [("orphan_file", d)]


def test_fsck_orphan_row_names_the_upload_relying_on_it(stored):
    daemon, _a, _b, p = stored
    blob(daemon.data_dir, p.order[0]).unlink()
    code, report = casd_json(daemon.data_dir, "fsck")
    assert code == 1 and kinds(report) == [("orphan_row", p.order[0])]
    upload_id = handshake(daemon.url, p)["upload_id"]
    assert upload_id in report["issues"][0]["detail"]


def test_fsck_leftover_temp_files(stored):
    daemon, *_ = stored
    old = daemon.data_dir / "tmp" / "blob-x.part"
    old.write_bytes(b"123")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    (daemon.data_dir / "tmp" / "blob-y.part").write_bytes(b"in flight")
    code, report = casd_json(daemon.data_dir, "fsck")
    # A leftover gc removes is a note, not a problem.
    assert code == 0 and kinds(report) == []
    assert [n["kind"] for n in report["notes"]] == ["temp_file"]
    assert str(old) in report["notes"][0]["detail"]
    assert report["temp_files_in_flight"] == 1


def test_fsck_reports_every_problem_at_once(stored):
    daemon, a, b, p = stored
    blob(daemon.data_dir, a.order[0]).unlink()  # missing blob (both files)
    blob(daemon.data_dir, b.order[4]).write_bytes(b"short")  # wrong size
    path = blob(daemon.data_dir, a.order[4])
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))  # corrupt
    blob(daemon.data_dir, p.order[0]).unlink()  # orphan row
    con = sqlite3.connect(daemon.data_dir / "catalog.sqlite")
    with con:
        con.execute("DELETE FROM chunks WHERE digest = ?", (a.order[3],))  # orphan file + missing
    con.close()
    r = casd_process(daemon.data_dir, "fsck", "--deep")
    assert r.returncode == 1
    code, report = casd_json(daemon.data_dir, "fsck", "--deep")
    assert code == 1
    assert kinds(report) == sorted(
        [
            ("missing_blob", a.order[0]),
            ("wrong_size", b.order[4]),
            ("corrupt", a.order[4]),
            ("orphan_row", p.order[0]),
            ("missing_blob", a.order[3]),
            ("orphan_file", a.order[3]),
        ]
    )
    assert "6 problem(s)" in r.stdout
    assert "Traceback" not in r.stderr
