"""Storage hardening, driven from outside against a real `casd serve`: the pending-upload
budget and `casd uploads`, orphan blobs in gc/fsck, quarantine and healing of bad blobs, and
the disk reserve that lets deletes and gc work on a full disk."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from casd.blobstore import LocalBlobStore
from helpers import Prepared, casd_run, prepare, rand, snapshot
from helpers import casd_here as _casd_here
from helpers import upload as upload_one

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB


# ---- helpers ----------------------------------------------------------------------------


def casd(data: Path, *argv: str) -> subprocess.CompletedProcess:
    """Run an admin command in this process, beside the daemon's (a separate catalogue
    connection, as `casd gc` has); test_admin.py runs them as their own processes too. A
    process start costs more than most commands here, and this file runs dozens."""
    return _casd_here(data, *argv)


def casd_json(data: Path, *argv: str):
    r = casd(data, *argv, "--json")
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, json.loads(r.stdout)


def request(method: str, url: str, *, token: str | None = None, **kw) -> tuple[int, bytes]:
    async def go():
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        timeout = aiohttp.ClientTimeout(sock_read=30)
        async with (
            aiohttp.ClientSession(timeout=timeout) as s,
            s.request(method, url, headers=headers, **kw) as r,
        ):
            return r.status, await r.read()

    return asyncio.run(go())


def request_json(method: str, url: str, **kw) -> tuple[int, dict]:
    status, body = request(method, url, **kw)
    return status, json.loads(body) if body else {}


def upload(base: str, p: Prepared) -> dict:
    async def go():
        async with aiohttp.ClientSession() as s:
            return await upload_one(s, base, p)

    return asyncio.run(go())


def blob(data: Path, digest: str, algo: str = "md5") -> Path:
    return data / "blobs" / algo / digest[:2] / digest[2:4] / digest


def tiny_chunks(n: int, seed: int) -> Prepared:
    """A manifest of `n` one-byte-ish chunks: the cheapest way to hold catalogue space."""
    return prepare(rand(n * 4, seed=seed), 4)


def flip(path: Path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


# ---- item 3: the pending-upload budget, casd uploads, stats -----------------------------


def test_a_client_over_its_pending_budget_is_refused_and_nothing_changes(daemon_factory):
    d = daemon_factory("--max-pending-chunks-per-client", "300", "--max-pending-chunks", "1000")
    first, second = tiny_chunks(200, seed=1), tiny_chunks(200, seed=2)
    status, hs = request_json("POST", f"{d.url}/v1/handshake", json=first.handshake)
    assert status == 200 and hs["status"] == "pending"
    before = snapshot(d.data_dir)
    status, err = request_json("POST", f"{d.url}/v1/handshake", json=second.handshake)
    assert status == 429, err
    assert err["error"] == "too_many_pending" and err["pending"] == 200 and err["limit"] == 300
    assert "300" in err["message"]
    assert snapshot(d.data_dir) == before
    # Resuming the upload the client already holds is never refused by the budget.
    status, again = request_json("POST", f"{d.url}/v1/handshake", json=first.handshake)
    assert status == 200 and again["upload_id"] == hs["upload_id"]
    # A manifest that could never fit one client's share is too large, not "try later".
    status, err = request_json(
        "POST", f"{d.url}/v1/handshake", json=tiny_chunks(301, seed=3).handshake
    )
    assert status == 413 and err["error"] == "too_large"
    # Ending the first upload frees its share.
    r = casd(d.data_dir, "uploads", "abort", hs["upload_id"])
    assert r.returncode == 0, r.stderr
    status, hs2 = request_json("POST", f"{d.url}/v1/handshake", json=second.handshake)
    assert status == 200 and hs2["status"] == "pending"


def test_the_total_pending_budget_is_shared_by_every_client(daemon_factory):
    # With tokens, the client is its token: the user token and the admin token are two.
    d = daemon_factory(
        "--token",
        "user-secret",
        "--admin-token",
        "admin-secret",
        "--max-pending-chunks-per-client",
        "250",
        "--max-pending-chunks",
        "300",
    )
    status, _ = request_json(
        "POST",
        f"{d.url}/v1/handshake",
        token="user-secret",
        json=tiny_chunks(200, seed=4).handshake,
    )
    assert status == 200
    before = snapshot(d.data_dir)
    status, err = request_json(
        "POST",
        f"{d.url}/v1/handshake",
        token="admin-secret",
        json=tiny_chunks(200, seed=5).handshake,
    )
    assert status == 429 and err["error"] == "too_many_pending" and err["limit"] == 300
    assert snapshot(d.data_dir) == before
    status, _ = request_json(
        "POST",
        f"{d.url}/v1/handshake",
        token="admin-secret",
        json=tiny_chunks(100, seed=6).handshake,
    )
    assert status == 200
    code, ups = casd_json(d.data_dir, "uploads", "ls")
    clients = {u["client"] for u in ups}
    assert code == 0 and len(clients) == 2 and all(c.startswith("token:") for c in clients)
    assert not any("secret" in c for c in clients)


def test_uploads_ls_abort_and_stats_show_what_pending_uploads_hold(daemon):
    p = tiny_chunks(500, seed=7)
    status, hs = request_json("POST", f"{daemon.url}/v1/handshake", json=p.handshake)
    assert status == 200
    code, ups = casd_json(daemon.data_dir, "uploads", "ls")
    assert code == 0 and len(ups) == 1
    u = ups[0]
    assert (u["id"], u["digest"], u["size"], u["chunk_entries"]) == (
        hs["upload_id"],
        p.digest,
        len(p.data),
        500,
    )
    assert u["client"] == "addr:127.0.0.1" and u["expired"] is False and not u["streaming"]
    text = casd(daemon.data_dir, "uploads", "ls")
    assert text.returncode == 0 and hs["upload_id"] in text.stdout and "500 entries" in text.stdout
    # A v1.1 streamed upload still open has no digest yet: said so, not shown as zeros.
    status, opened = request_json("POST", f"{daemon.url}/v1/uploads", json={"size": 10})
    assert status == 201, opened
    code, ups = casd_json(daemon.data_dir, "uploads", "ls")
    (streamed,) = [u for u in ups if u["id"] == opened["upload_id"]]
    assert streamed["streaming"] is True and streamed["digest"] is None
    text = casd(daemon.data_dir, "uploads", "ls").stdout
    (line,) = [t for t in text.splitlines() if opened["upload_id"] in t]
    assert "(streaming: digest at merge)" in line and "0" * 32 not in line
    r = casd(daemon.data_dir, "uploads", "abort", opened["upload_id"])
    assert r.returncode == 0

    code, stats = casd_json(daemon.data_dir, "stats")
    assert stats["pending_chunk_entries"] == 500
    assert stats["pending_catalog_bytes"] >= 500 * 50
    assert stats["catalog_bytes"] >= (daemon.data_dir / "catalog.sqlite").stat().st_size
    out = casd(daemon.data_dir, "stats").stdout
    assert "pending chunk entries:" in out and "catalogue size:" in out

    unknown = "0" * 32
    r = casd(daemon.data_dir, "uploads", "abort", unknown, hs["upload_id"])
    assert r.returncode == 1
    assert r.stderr.strip() == f"casd uploads abort: no pending upload '{unknown}'"
    assert f"aborted {hs['upload_id']}" in r.stdout
    status, _ = request_json("GET", f"{daemon.url}/v1/uploads/{hs['upload_id']}")
    assert status == 404
    code, ups = casd_json(daemon.data_dir, "uploads", "ls")
    assert ups == []
    code, stats = casd_json(daemon.data_dir, "stats")
    assert stats["pending_chunk_entries"] == 0
    code, answer = casd_json(daemon.data_dir, "uploads", "abort", hs["upload_id"])
    assert code == 1 and answer == {"aborted": [], "unknown": [hs["upload_id"]]}


# ---- item 8: orphan blob files ----------------------------------------------------------


def _plant_orphan(data: Path, seed: int, age: float) -> tuple[str, Path]:
    stray = rand(1000, seed=seed)
    d = hashlib.md5(stray).hexdigest()
    path = blob(data, d)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(stray)
    then = time.time() - age
    os.utime(path, (then, then))
    return d, path


# Slow: test_a_daemon_killed_while_publishing_leaves_an_orphan_gc_removes stays in the fast
# loop.
@pytest.mark.slow
def test_gc_removes_old_orphan_blobs_and_fsck_only_notes_them(daemon):
    p = prepare(rand(3 * CHUNK, seed=8), CHUNK)
    upload(daemon.url, p)
    # What a kill -9 between linking a verified blob and recording its row leaves.
    old, old_path = _plant_orphan(daemon.data_dir, 9, age=7200)
    young, young_path = _plant_orphan(daemon.data_dir, 10, age=0)

    code, report = casd_json(daemon.data_dir, "fsck")
    assert code == 0 and report["issues"] == []
    assert sorted(n["digest"] for n in report["notes"]) == sorted([old, young])

    code, plan = casd_json(daemon.data_dir, "gc", "--dry-run")
    assert [b["digest"] for b in plan["plan"]["orphan_blobs"]] == [old]
    assert old_path.exists()
    code, r = casd_json(daemon.data_dir, "gc")  # default grace: one hour
    assert code == 0 and r["removed"]["orphan_blobs"] == [old]
    assert not old_path.exists() and young_path.exists()
    r = casd(daemon.data_dir, "gc", "--grace", "0")
    assert r.returncode == 0 and "1 orphan blob files" in r.stdout
    assert not young_path.exists()
    code, report = casd_json(daemon.data_dir, "fsck")
    assert code == 0 and report["notes"] == [] and report["issues"] == []
    status, body = request("GET", f"{daemon.url}/v1/files/{p.digest}")
    assert status == 200 and body == p.data


def test_a_daemon_killed_while_publishing_leaves_an_orphan_gc_removes(daemon):
    """kill -9 after the blob is linked into place and before its row is committed."""
    p = prepare(rand(2 * CHUNK, seed=20), CHUNK)
    status, hs = request_json("POST", f"{daemon.url}/v1/handshake", json=p.handshake)
    assert status == 200
    target = p.order[0]
    path = blob(daemon.data_dir, target)
    # Hold SQLite's write lock: the daemon links the verified blob, then waits to record it.
    con = sqlite3.connect(daemon.data_dir / "catalog.sqlite", isolation_level=None)
    con.execute("BEGIN IMMEDIATE")
    script = (
        "import sys, urllib.request; urllib.request.urlopen(urllib.request.Request("
        "sys.argv[1], data=sys.stdin.buffer.read(), method='PUT'), timeout=60)"
    )
    put = subprocess.Popen(
        [
            sys.executable,
            "-c",
            script,
            f"{daemon.url}/v1/uploads/{hs['upload_id']}/chunks/{target}",
        ],
        stdin=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        put.stdin.write(p.chunks[target])
        put.stdin.close()
        deadline = time.monotonic() + 30
        while not path.exists():
            assert time.monotonic() < deadline, "the daemon never linked the blob"
            time.sleep(0.01)
        daemon.kill()
    finally:
        con.rollback()
        con.close()
        put.kill()
        put.wait()
    assert path.exists()
    code, report = casd_json(daemon.data_dir, "fsck")
    assert code == 0 and report["issues"] == [], report
    assert [(n["kind"], n["digest"]) for n in report["notes"]] == [("orphan_file", target)]
    then = time.time() - 7200
    os.utime(path, (then, then))
    code, r = casd_json(daemon.data_dir, "gc")
    assert code == 0 and r["removed"]["orphan_blobs"] == [target] and not path.exists()
    # The restarted daemon still takes the upload.
    daemon.start()
    assert upload(daemon.url, p)["status"] == "complete"
    status, body = request("GET", f"{daemon.url}/v1/files/{p.digest}")
    assert status == 200 and body == p.data


def test_gc_leaves_an_orphan_whose_inode_a_daemon_still_holds(daemon, tmp_path):
    """A blob linked into place whose row is not written yet is in flight, not an orphan."""
    stray = rand(1000, seed=11)
    d = hashlib.md5(stray).hexdigest()
    store = LocalBlobStore(
        daemon.data_dir / "blobs", daemon.data_dir / "tmp", daemon.data_dir / "quarantine"
    )
    temp = store.new_temp()  # holds the flock, as the daemon's receiving temp file does
    try:
        temp.write(stray)
        temp.finish()
        path = blob(daemon.data_dir, d)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.link(temp.path, path)
        then = time.time() - 7200
        os.utime(path, (then, then))
        r = casd(daemon.data_dir, "gc", "--grace", "0")
        assert r.returncode == 0 and "0 orphan blob files" in r.stdout, r.stdout + r.stderr
        assert path.exists()
    finally:
        temp.discard()
    code, r = casd_json(daemon.data_dir, "gc", "--grace", "0")
    assert code == 0 and r["removed"]["orphan_blobs"] == [d] and not path.exists()


def test_gc_never_removes_a_rowless_blob_a_complete_file_uses(daemon):
    p = prepare(rand(2 * CHUNK, seed=12), CHUNK)
    upload(daemon.url, p)
    con = sqlite3.connect(daemon.data_dir / "catalog.sqlite")
    with con:
        con.execute("DELETE FROM chunks WHERE digest = ?", (p.order[0],))
    con.close()
    path = blob(daemon.data_dir, p.order[0])
    then = time.time() - 7200
    os.utime(path, (then, then))
    code, r = casd_json(daemon.data_dir, "gc", "--grace", "0")
    assert code == 0 and r["removed"]["orphan_blobs"] == [] and path.exists()
    code, report = casd_json(daemon.data_dir, "fsck")
    assert code == 1 and ("missing_blob", p.order[0]) in {
        (i["kind"], i["digest"]) for i in report["issues"]
    }


# ---- item 9: quarantine and healing -----------------------------------------------------


def test_fsck_repair_quarantines_a_corrupt_blob_and_a_reupload_heals_the_file(daemon):
    p = prepare(rand(4 * CHUNK, seed=13), CHUNK, ext=".bin", name="p.bin")
    upload(daemon.url, p)
    bad = p.order[2]
    flip(blob(daemon.data_dir, bad))

    code, report = casd_json(daemon.data_dir, "fsck")
    assert code == 1 and [(i["kind"], i["digest"]) for i in report["issues"]] == [("corrupt", bad)]
    code, report = casd_json(daemon.data_dir, "fsck", "--repair")
    assert code == 1 and report["quarantined"] == [bad]
    assert not blob(daemon.data_dir, bad).exists()
    kept = list((daemon.data_dir / "quarantine").iterdir())
    assert len(kept) == 1 and bad in kept[0].name
    code, stats = casd_json(daemon.data_dir, "stats")
    assert stats["quarantined_chunks"] == 1

    # The damaged file is not served, and its handshake asks for the bad chunk again.
    status, err = request_json("GET", f"{daemon.url}/v1/files/{p.digest}.bin")
    assert status == 503 and err["error"] == "unavailable"
    status, hs = request_json("POST", f"{daemon.url}/v1/handshake", json=p.handshake)
    assert status == 200 and hs["status"] == "pending" and hs["missing"] == [bad]
    status, put = request_json(
        "PUT", f"{daemon.url}/v1/uploads/{hs['upload_id']}/chunks/{bad}", data=p.chunks[bad]
    )
    assert status == 201 and put["missing"] == []
    status, merged = request_json("POST", f"{daemon.url}/v1/uploads/{hs['upload_id']}/merge")
    assert status == 200 and merged["status"] == "complete"

    status, body = request("GET", f"{daemon.url}/v1/files/{p.digest}.bin")
    assert status == 200 and body == p.data
    status, hs = request_json("POST", f"{daemon.url}/v1/handshake", json=p.handshake)
    assert hs["status"] == "complete"
    code, report = casd_json(daemon.data_dir, "fsck", "--deep")
    assert code == 0 and report["issues"] == []


def test_gc_forgets_a_quarantined_chunk_once_nothing_needs_it(daemon):
    p = prepare(rand(2 * CHUNK, seed=21), CHUNK)
    upload(daemon.url, p)
    flip(blob(daemon.data_dir, p.order[1]))
    code, report = casd_json(daemon.data_dir, "fsck", "--repair")
    assert report["quarantined"] == [p.order[1]]
    code, r = casd_json(daemon.data_dir, "gc", "--grace", "0")
    assert code == 0 and r["removed"]["quarantined_rows"] == 0  # the file still needs it
    assert request("DELETE", f"{daemon.url}/v1/files/{p.digest}")[0] == 204
    code, r = casd_json(daemon.data_dir, "gc", "--grace", "0")
    assert code == 0 and r["removed"]["quarantined_rows"] == 1
    code, stats = casd_json(daemon.data_dir, "stats")
    assert stats["quarantined_chunks"] == 0
    assert len(list((daemon.data_dir / "quarantine").iterdir())) == 1  # kept for the operator
    code, report = casd_json(daemon.data_dir, "fsck")
    assert code == 0


def test_fsck_repair_of_a_missing_blob_lists_it_missing_for_every_file_using_it(daemon):
    common = rand(2 * CHUNK, seed=14)
    a = prepare(common + rand(CHUNK, seed=15), CHUNK)
    b = prepare(common + rand(CHUNK, seed=16), CHUNK)
    upload(daemon.url, a)
    upload(daemon.url, b)
    shared = a.order[0]
    blob(daemon.data_dir, shared).unlink()
    code, report = casd_json(daemon.data_dir, "fsck", "--repair")
    assert code == 1 and report["quarantined"] == [shared]
    for p in (a, b):
        status, hs = request_json("POST", f"{daemon.url}/v1/handshake", json=p.handshake)
        assert hs["status"] == "pending" and hs["missing"] == [shared]
    # One re-sent chunk heals both files.
    status, hs = request_json("POST", f"{daemon.url}/v1/handshake", json=a.handshake)
    status, _ = request_json(
        "PUT",
        f"{daemon.url}/v1/uploads/{hs['upload_id']}/chunks/{shared}",
        data=a.chunks[shared],
    )
    assert status == 201
    for p in (a, b):
        status, body = request("GET", f"{daemon.url}/v1/files/{p.digest}")
        assert status == 200 and body == p.data
    code, report = casd_json(daemon.data_dir, "fsck")
    assert code == 0


def test_a_put_of_good_bytes_replaces_a_rotten_blob_without_fsck(daemon):
    a = prepare(rand(3 * CHUNK, seed=17), CHUNK)
    upload(daemon.url, a)
    rotten = a.order[1]
    flip(blob(daemon.data_dir, rotten))
    # Another file with that chunk: the server believes it holds it, so it is not missing.
    b = prepare(a.chunks[rotten] + rand(CHUNK, seed=18), CHUNK)
    status, hs = request_json("POST", f"{daemon.url}/v1/handshake", json=b.handshake)
    assert rotten not in hs["missing"]
    url = f"{daemon.url}/v1/uploads/{hs['upload_id']}/chunks/{rotten}"
    # Wrong bytes are still refused.
    status, err = request_json("PUT", url, data=rand(CHUNK, seed=19))
    assert status == 422 and err["error"] == "digest_mismatch"
    status, put = request_json("PUT", url, data=b.chunks[rotten])
    assert status == 201 and put["stored"] is True
    status, body = request("GET", f"{daemon.url}/v1/files/{a.digest}")
    assert status == 200 and body == a.data
    # Once the blob is right, the same bytes are dropped as before.
    status, put = request_json("PUT", url, data=b.chunks[rotten])
    assert status == 200 and put["stored"] is False
    code, report = casd_json(daemon.data_dir, "fsck", "--deep")
    assert code == 0 and report["issues"] == []


def _a_file_sharing_a_rotten_chunk(daemon, seed: int, damage) -> tuple[Prepared, Prepared, str]:
    """File `a` uploaded, then one of its blobs damaged by `damage(path)`; file `b` shares that
    chunk, which the server still believes it holds."""
    a = prepare(rand(3 * CHUNK, seed=seed), CHUNK)
    upload(daemon.url, a)
    rotten = a.order[1]
    damage(blob(daemon.data_dir, rotten))
    b = prepare(a.chunks[rotten] + rand(CHUNK, seed=seed + 1), CHUNK, ext=".bin")
    return a, b, rotten


@pytest.mark.parametrize(
    "damage",
    [flip, lambda p: p.write_bytes(p.read_bytes()[:-7]), Path.unlink],
    ids=["flipped", "truncated", "gone"],
)
def test_a_merge_that_meets_a_damaged_chunk_sets_it_aside_and_asks_for_it_again(daemon, damage):
    a, b, rotten = _a_file_sharing_a_rotten_chunk(daemon, 31, damage)
    status, hs = request_json("POST", f"{daemon.url}/v1/handshake", json=b.handshake)
    assert status == 200 and hs["missing"] == [b.order[1]]
    base = f"{daemon.url}/v1/uploads/{hs['upload_id']}"
    assert request("PUT", f"{base}/chunks/{b.order[1]}", data=b.chunks[b.order[1]])[0] == 201

    # The stored bytes no longer hash to what the file claims: instead of refusing the upload
    # (every retry would fail the same way until an operator ran fsck --repair), the merge
    # sets the bad chunk aside and lists it missing; the upload stays pending.
    status, err = request_json("POST", f"{base}/merge")
    assert status == 409 and err["error"] == "incomplete" and err["missing"] == [rotten], err
    assert not blob(daemon.data_dir, rotten).exists()
    code, stats = casd_json(daemon.data_dir, "stats")
    assert stats["quarantined_chunks"] == 1
    # The other file using it is known damaged now (not served wrong), until it is healed.
    status, err = request_json("GET", f"{daemon.url}/v1/files/{a.digest}")
    assert status == 503 and err["error"] == "unavailable"

    status, put = request_json("PUT", f"{base}/chunks/{rotten}", data=b.chunks[rotten])
    assert status == 201 and put["stored"] is True
    status, merged = request_json("POST", f"{base}/merge")
    assert status == 200 and merged["status"] == "complete", merged
    for p in (a, b):
        status, body = request("GET", f"{daemon.url}/v1/files/{p.digest}")
        assert status == 200 and body == p.data
    code, report = casd_json(daemon.data_dir, "fsck", "--deep")
    assert code == 0 and report["issues"] == []


def test_the_client_heals_a_damaged_chunk_without_the_user_noticing(daemon, tmp_path):
    a, b, _rotten = _a_file_sharing_a_rotten_chunk(daemon, 41, flip)
    path = tmp_path / "b.bin"
    path.write_bytes(b.data)
    r = casd_run("upload", "--server", daemon.url, "--chunk-size", str(CHUNK), "--json", str(path))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["digest"] == b.digest
    for p in (a, b):
        status, body = request("GET", f"{daemon.url}/v1/files/{p.digest}")
        assert status == 200 and body == p.data


def test_a_merge_of_a_wrong_claim_over_sound_chunks_sets_nothing_aside(daemon):
    a = prepare(rand(3 * CHUNK, seed=51), CHUNK)
    upload(daemon.url, a)
    lie = dict(a.handshake, md5=hashlib.md5(b"something else").hexdigest())
    status, hs = request_json("POST", f"{daemon.url}/v1/handshake", json=lie)
    assert status == 200 and hs["missing"] == []
    status, err = request_json("POST", f"{daemon.url}/v1/uploads/{hs['upload_id']}/merge")
    assert status == 422 and err["error"] == "file_digest_mismatch"
    _code, stats = casd_json(daemon.data_dir, "stats")
    assert stats["quarantined_chunks"] == 0
    assert not (daemon.data_dir / "quarantine").exists() or not any(
        (daemon.data_dir / "quarantine").iterdir()
    )
    status, body = request("GET", f"{daemon.url}/v1/files/{a.digest}")
    assert status == 200 and body == a.data


# ---- item 4: a full disk ----------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB tmpfs (needs root and mount; skipped otherwise), unmounted at teardown."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill(path: Path) -> None:
    """Write until the disk says ENOSPC (at most 64 MiB)."""
    try:
        with open(path, "wb", buffering=0) as f:
            f.writelines(b"x" * KiB for _ in range(64 * 1024))
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    else:
        raise AssertionError("the disk never filled")


def test_a_full_disk_can_still_be_emptied_with_delete_rm_and_gc(small_disk, daemon_factory):
    data = small_disk / "d"
    d = daemon_factory("--reserve", "4MiB", data_dir=data)
    try:
        assert (data / "reserve").stat().st_size == 4 * MiB
        files: list[Prepared] = []
        refused = None
        for i in range(40):  # 32 MiB cannot hold 40 MiB: a 507 comes, bounded
            p = prepare(rand(MiB, seed=100 + i), 256 * KiB)
            status, hs = request_json("POST", f"{d.url}/v1/handshake", json=p.handshake)
            if status == 507:
                refused = hs
                break
            assert status == 200, hs
            for c in hs["missing"]:
                status, put = request_json(
                    "PUT", f"{d.url}/v1/uploads/{hs['upload_id']}/chunks/{c}", data=p.chunks[c]
                )
                if status != 201:
                    break
            if status == 507:
                refused = put
                break
            assert status == 201, put
            status, m = request_json("POST", f"{d.url}/v1/uploads/{hs['upload_id']}/merge")
            if status == 507:
                refused = m
                break
            assert status == 200, m
            files.append(p)
        assert refused is not None and refused["error"] == "insufficient_storage"
        assert len(files) >= 3

        # Something else takes the last free byte: the disk is 100 % full.
        _fill(small_disk / "filler")
        assert _free(small_disk) < 64 * KiB

        # A delete still commits: the daemon gives up its reserve for it.
        status, _ = request("DELETE", f"{d.url}/v1/files/{files[0].digest}")
        assert status == 204
        assert "released the 4194304-byte reserve" in d.log()
        assert not (data / "reserve").exists()
        assert request("GET", f"{d.url}/v1/files/{files[0].digest}")[0] == 404
        # While the reserve is gone, uploads are refused rather than eat the headroom.
        p = prepare(rand(MiB, seed=998), 256 * KiB)
        status, err = request_json("POST", f"{d.url}/v1/handshake", json=p.handshake)
        assert status == 507 and err["error"] == "insufficient_storage"
        r = casd(data, "rm", files[1].digest)
        assert r.returncode == 0, r.stderr
        half = len(files) // 2
        for f in files[2:half]:
            assert request("DELETE", f"{d.url}/v1/files/{f.digest}")[0] == 204
        free_before = _free(small_disk)
        r = casd(data, "gc", "--grace", "0")
        assert r.returncode == 0, r.stderr
        assert _free(small_disk) >= free_before + (half - 1) * MiB

        # Room again: the reserve comes back and uploads work, byte-exact.
        p = prepare(rand(MiB, seed=999), 256 * KiB)
        assert upload(d.url, p)["status"] == "complete"
        assert (data / "reserve").stat().st_size == 4 * MiB
        status, body = request("GET", f"{d.url}/v1/files/{p.digest}")
        assert status == 200 and body == p.data
        for kept in files[half:]:
            status, body = request("GET", f"{d.url}/v1/files/{kept.digest}")
            assert status == 200 and body == kept.data
        code, report = casd_json(data, "fsck")
        assert code == 0, report
    finally:
        d.kill()


def test_admin_tools_work_on_a_full_disk(small_disk, daemon_factory):
    data = small_disk / "d"
    d = daemon_factory("--reserve", "4MiB", data_dir=data)
    try:
        files = [prepare(rand(MiB, seed=300 + i), 256 * KiB) for i in range(3)]
        for p in files:
            assert upload(d.url, p)["status"] == "complete"
        pending = prepare(rand(MiB, seed=400), 256 * KiB)
        status, hs = request_json("POST", f"{d.url}/v1/handshake", json=pending.handshake)
        assert status == 200
        d.stop()  # the admin tools alone, as after a crash
        _fill(small_disk / "filler")
        assert _free(small_disk) < 64 * KiB

        r = casd(data, "rm", files[0].digest)
        assert r.returncode == 0, r.stderr
        r = casd(data, "uploads", "abort", hs["upload_id"])
        assert r.returncode == 0, r.stderr
        free_before = _free(small_disk)
        code, out = casd_json(data, "gc", "--grace", "0")
        assert code == 0 and out["removed"]["bytes_freed"] >= MiB
        assert _free(small_disk) >= free_before + MiB // 2
        # Whoever hit the full disk first gave up the reserve for it.
        assert not (data / "reserve").exists()
        code, report = casd_json(data, "fsck")
        assert code == 0, report
        # The daemon starts again on the nearly full disk; it takes uploads once the disk
        # has room for its reserve again.
        d.start()
        p = prepare(rand(MiB // 2, seed=401), 256 * KiB)
        status, err = request_json("POST", f"{d.url}/v1/handshake", json=p.handshake)
        assert status == 507 and err["error"] == "insufficient_storage"
        (small_disk / "filler").unlink()
        assert upload(d.url, p)["status"] == "complete"
        assert (data / "reserve").stat().st_size == 4 * MiB
        assert request("GET", f"{d.url}/v1/files/{files[1].digest}") == (200, files[1].data)
    finally:
        d.kill()


def test_the_daemon_restarts_on_a_full_disk_and_can_delete(small_disk, daemon_factory):
    data = small_disk / "d"
    d = daemon_factory("--reserve", "4MiB", data_dir=data)
    try:
        p = prepare(rand(MiB, seed=500), 256 * KiB)
        assert upload(d.url, p)["status"] == "complete"
        d.stop()  # a clean stop removes the WAL: opening again must make it
        _fill(small_disk / "filler")
        d.start()
        assert "released the disk reserve" in d.log()
        assert request("GET", f"{d.url}/v1/files/{p.digest}") == (200, p.data)
        assert request("DELETE", f"{d.url}/v1/files/{p.digest}")[0] == 204
    finally:
        d.kill()
