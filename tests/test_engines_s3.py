"""`casd serve --blobs s3://...` and the admin commands against a real S3 server (moto)."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from conftest import Gate
from helpers import Prepared, casd_run, casd_serve_run, prepare
from helpers import casd_here as _casd_here

KiB = 1024
CHUNK = 64 * KiB


def request(
    method: str,
    url: str,
    data: bytes | None = None,
    headers: dict | None = None,
    timeout: float = 60,
) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None and method == "POST":
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def handshake(base: str, p: Prepared) -> dict:
    import json

    status, _, body = request("POST", f"{base}/v1/handshake", json.dumps(p.handshake).encode())
    assert status == 200, body
    return json.loads(body)


def put(base: str, uid: str, p: Prepared, d: str) -> tuple[int, bytes]:
    status, _, body = request(
        "PUT", f"{base}/v1/uploads/{uid}/chunks/{d}", p.chunks[d], {"Prefer": "return=minimal"}
    )
    return status, body


def merge(base: str, uid: str) -> tuple[int, bytes]:
    status, _, body = request("POST", f"{base}/v1/uploads/{uid}/merge", b"")
    return status, body


def upload(base: str, p: Prepared) -> None:
    hs = handshake(base, p)
    if hs["status"] == "complete":
        return
    for d in hs["missing"]:
        assert put(base, hs["upload_id"], p, d)[0] == 201
    assert merge(base, hs["upload_id"])[0] == 200


def s3_args(s3_server, bucket: str, endpoint: str | None = None) -> tuple[str, ...]:
    return ("--blobs", f"s3://{bucket}/casd", "--s3-endpoint", endpoint or s3_server.endpoint)


def casd(data: Path, *argv: str) -> subprocess.CompletedProcess:
    return casd_run(*argv, "--data", str(data), timeout=120)


def casd_here(data: Path, *argv: str) -> subprocess.CompletedProcess:
    """An admin command run in this process, as casd() reports it. The S3 engine's process
    start (aiobotocore's import) happens once; test_gc_killed_midway_is_finished_by_the_next_gc
    and test_two_machines_share_a_bucket_and_a_postgresql_catalogue run the real processes."""
    return _casd_here(data, *argv)


def chunk_rows(data: Path) -> set[str]:
    con = sqlite3.connect(data / "catalog.sqlite")
    try:
        return {r[0] for r in con.execute("SELECT digest FROM chunks WHERE state = 0")}
    finally:
        con.close()


def local_blob_files(data: Path) -> list[Path]:
    return [f for f in (data / "blobs").rglob("*") if f.is_file()]


def test_round_trip_range_head_etag_and_dedup(s3_server, s3_bucket, daemon_factory, rng):
    daemon = daemon_factory(*s3_args(s3_server, s3_bucket))
    data = rng.bytes(5 * CHUNK + 123)
    p = prepare(data, CHUNK)
    upload(daemon.url, p)
    # Every chunk is an object at PREFIX/md5/<hex>; no blob is on the daemon's disk.
    keys = s3_server.keys(s3_bucket)
    assert keys == {f"casd/md5/{d}": len(p.chunks[d]) for d in p.order}
    assert local_blob_files(daemon.data_dir) == []
    url = f"{daemon.url}/v1/files/{p.digest}"
    status, headers, body = request("GET", url)
    assert status == 200 and body == data and headers["ETag"] == f'"{p.digest}"'
    status, headers, body = request(
        "GET", url, headers={"Range": f"bytes={CHUNK - 5}-{3 * CHUNK + 9}"}
    )
    assert status == 206 and body == data[CHUNK - 5 : 3 * CHUNK + 10]
    assert headers["Content-Range"] == f"bytes {CHUNK - 5}-{3 * CHUNK + 9}/{len(data)}"
    status, _, body = request("GET", url, headers={"Range": "bytes=-7"})
    assert status == 206 and body == data[-7:]
    status, headers, body = request("HEAD", url)
    assert status == 200 and body == b"" and headers["Content-Length"] == str(len(data))
    status, _, body = request("GET", url, headers={"If-None-Match": f'"{p.digest}"'})
    assert status == 304 and body == b""
    # A second file sharing four chunks: the handshake asks only for the new ones.
    q = prepare(data[: 4 * CHUNK] + rng.bytes(CHUNK, "tail"), CHUNK)
    hs = handshake(daemon.url, q)
    assert hs["missing"] == [q.order[-1]]
    assert put(daemon.url, hs["upload_id"], q, q.order[-1])[0] == 201
    assert merge(daemon.url, hs["upload_id"])[0] == 200
    assert len(s3_server.keys(s3_bucket)) == len(p.order) + 1
    assert request("GET", f"{daemon.url}/v1/files/{q.digest}")[2] == q.data


def test_sha256_upload_and_a_merge_on_a_daemon_that_received_no_chunk(
    s3_server, s3_bucket, daemon_factory, tmp_path, rng
):
    """Two daemons share the bucket and the data folder; chunks go to one, the merge to the
    other, which must read every chunk back from the store to verify the whole file."""
    data_dir = tmp_path / "shared"
    a = daemon_factory(*s3_args(s3_server, s3_bucket), data_dir=data_dir)
    b = daemon_factory(*s3_args(s3_server, s3_bucket), data_dir=data_dir)
    p = prepare(rng.bytes(4 * CHUNK + 1), CHUNK, algo="sha256")
    hs = handshake(a.url, p)
    for d in hs["missing"]:
        assert put(a.url, hs["upload_id"], p, d)[0] == 201
    status, body = merge(b.url, hs["upload_id"])
    assert status == 200, body
    for base in (a.url, b.url):
        assert request("GET", f"{base}/v1/files/{p.digest}")[2] == p.data
    # The same again, with one object's bytes changed in the store behind both daemons'
    # backs: the merge on the daemon that saw no chunk finds the whole-file digest wrong,
    # finds the object that went bad, sets it aside and asks for it again.
    q = prepare(rng.bytes(3 * CHUNK, "q"), CHUNK, algo="sha256")
    hs = handshake(a.url, q)
    for d in hs["missing"]:
        assert put(a.url, hs["upload_id"], q, d)[0] == 201
    rotten = bytearray(q.chunks[q.order[1]])
    rotten[7] ^= 1
    s3_server.client.put_object(
        Bucket=s3_bucket, Key=f"casd/sha256/{q.order[1]}", Body=bytes(rotten)
    )
    status, body = merge(b.url, hs["upload_id"])
    assert status == 409 and json.loads(body)["missing"] == [q.order[1]], body
    assert put(a.url, hs["upload_id"], q, q.order[1])[0] == 201
    status, body = merge(b.url, hs["upload_id"])
    assert status == 200, body
    assert request("GET", f"{a.url}/v1/files/{q.digest}")[2] == q.data


def test_admin_gc_fsck_export_against_s3(s3_server, s3_bucket, daemon_factory, tmp_path, rng):
    daemon = daemon_factory(*s3_args(s3_server, s3_bucket))
    args = s3_args(s3_server, s3_bucket)
    keep = prepare(rng.bytes(3 * CHUNK, "keep"), CHUNK)
    drop = prepare(rng.bytes(2 * CHUNK, "drop"), CHUNK)
    upload(daemon.url, keep)
    upload(daemon.url, drop)
    r = casd_here(daemon.data_dir, "fsck", "--deep", *args)
    assert r.returncode == 0 and "no problems" in r.stdout, r.stdout + r.stderr
    out = tmp_path / "out.bin"
    r = casd_here(daemon.data_dir, "export", keep.digest, str(out), *args)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == keep.data
    # An object under a blob's name that no row knows (a daemon killed after storing it).
    stray = rng.bytes(999, "stray")
    stray_key = f"casd/md5/{hashlib.md5(stray).hexdigest()}"
    s3_server.client.put_object(Bucket=s3_bucket, Key=stray_key, Body=stray)
    assert casd_here(daemon.data_dir, "rm", drop.digest, *args).returncode == 0
    time.sleep(1.1)  # object times have one-second resolution: make them older than "now"
    r = casd_here(daemon.data_dir, "gc", "--grace", "0", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert set(s3_server.keys(s3_bucket)) == {f"casd/md5/{d}" for d in keep.order}
    assert chunk_rows(daemon.data_dir) == set(keep.order)
    assert request("GET", f"{daemon.url}/v1/files/{keep.digest}")[2] == keep.data
    # Damage: one object gone, one rotten with its size kept, one cut short.
    gone, rotten, short = keep.order
    s3_server.client.delete_object(Bucket=s3_bucket, Key=f"casd/md5/{gone}")
    bad = bytearray(keep.chunks[rotten])
    bad[0] ^= 1
    s3_server.client.put_object(Bucket=s3_bucket, Key=f"casd/md5/{rotten}", Body=bytes(bad))
    s3_server.client.put_object(
        Bucket=s3_bucket, Key=f"casd/md5/{short}", Body=keep.chunks[short][:-1]
    )
    quick = casd_here(daemon.data_dir, "fsck", *args)
    assert quick.returncode == 1
    assert gone in quick.stdout and short in quick.stdout
    assert rotten not in quick.stdout  # a quick check on S3 compares sizes only
    deep = casd_here(daemon.data_dir, "fsck", "--deep", *args)
    assert deep.returncode == 1 and rotten in deep.stdout and "corrupt" in deep.stdout
    r = casd_here(daemon.data_dir, "export", keep.digest, str(tmp_path / "x"), *args)
    assert r.returncode == 1 and "run casd fsck" in r.stderr
    assert not (tmp_path / "x").exists()
    # --repair moves what is wrong to PREFIX/quarantine/ and the files answer 503 until healed.
    r = casd_here(daemon.data_dir, "fsck", "--deep", "--repair", *args)
    keys = s3_server.keys(s3_bucket)
    assert {
        k for k in keys if k.startswith("casd/quarantine/")
    } and f"casd/md5/{rotten}" not in keys
    status, _, body = request("GET", f"{daemon.url}/v1/files/{keep.digest}")
    assert status == 503 and b"unavailable" in body


def test_store_down_gives_503_and_the_upload_resumes(
    s3_server, s3_bucket, daemon_factory, rng, monkeypatch
):
    # One retry instead of three: each refused request answers 503 within a second instead
    # of after botocore's full back-off (the budget itself: test_blobstore_contract.py).
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    gate = Gate(s3_server.port)
    try:
        daemon = daemon_factory(*s3_args(s3_server, s3_bucket, f"http://127.0.0.1:{gate.port}"))
        p = prepare(rng.bytes(3 * CHUNK), CHUNK)
        hs = handshake(daemon.url, p)
        uid = hs["upload_id"]
        first, second, third = p.order
        assert put(daemon.url, uid, p, first)[0] == 201
        assert request("GET", f"{daemon.url}/healthz")[0] == 200
        gate.close()
        # A load balancer's health check sees it too.
        assert request("GET", f"{daemon.url}/healthz")[0] == 503
        status, body = put(daemon.url, uid, p, second)
        assert status == 503 and b'"unavailable"' in body, body
        assert b"Traceback" not in body
        # Nothing half-written: no row for the chunk the store never acknowledged.
        assert chunk_rows(daemon.data_dir) == {first}
        gate.open()
        for d in (second, third):
            assert put(daemon.url, uid, p, d)[0] == 201
        assert merge(daemon.url, uid)[0] == 200
        url = f"{daemon.url}/v1/files/{p.digest}"
        assert request("GET", url)[2] == p.data
        # Downloads too: a store that is down is a 503 before any byte, not a cut body.
        gate.close()
        status, _, body = request("GET", url)
        assert status == 503 and b'"unavailable"' in body
        gate.open()
        assert request("GET", url)[2] == p.data
    finally:
        gate.close()


def test_serve_refuses_to_start_when_the_bucket_does_not_answer(tmp_path, s3_server):
    r = casd_serve_run(
        "--blobs",
        "s3://casd-no-such-bucket",
        "--s3-endpoint",
        s3_server.endpoint,
        data=tmp_path / "d",
    )
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "no bucket 'casd-no-such-bucket'" in last and "Traceback" not in r.stderr


def test_blobs_from_the_config_file_and_the_environment(tmp_path):
    cfg = tmp_path / "casd.toml"
    cfg.write_text('blobs = "s3://from-file/p"\ns3-endpoint = "http://127.0.0.1:9"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("CASD_BLOBS", "CASD_S3_ENDPOINT")}

    def run(*a: str, **e: str) -> subprocess.CompletedProcess:
        return casd_run("serve", "--check-config", *a, env={**env, **e})

    r = run("--config", str(cfg))
    assert "blobs = s3://from-file/p" in r.stdout and "s3_endpoint = http://127.0.0.1:9" in r.stdout
    r = run("--config", str(cfg), CASD_BLOBS="s3://from-env")
    assert "blobs = s3://from-env" in r.stdout
    r = run("--blobs", "s3://Bad_Bucket")
    assert r.returncode == 2 and "bucket name" in r.stderr


def test_gc_killed_midway_is_finished_by_the_next_gc(s3_server, s3_bucket, daemon_factory, rng):
    """kill -9 of gc while it deletes objects: nothing a file uses is lost, no row names a
    deleted object as live, and the next gc finishes the job."""
    daemon = daemon_factory(*s3_args(s3_server, s3_bucket))
    args = s3_args(s3_server, s3_bucket)
    keep = prepare(rng.bytes(2 * CHUNK, "keep"), CHUNK)
    upload(daemon.url, keep)
    # 48 doomed objects: gc deletes them 4 a batch, the test kills it after 8.
    doomed = [prepare(rng.bytes(2 * KiB, n), KiB) for n in range(24)]
    for p in doomed:
        upload(daemon.url, p)
        assert request("DELETE", f"{daemon.url}/v1/files/{p.digest}")[0] == 204
    kept = {f"casd/md5/{d}" for d in keep.order}
    total = len(s3_server.keys(s3_bucket))
    assert total == len(kept) + 48
    time.sleep(1.1)
    gc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "casd",
            "gc",
            "--grace",
            "0",
            "--batch-size",
            "4",
            *args,
            "--data",
            str(daemon.data_dir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while len(s3_server.keys(s3_bucket)) > total - 8 and gc.poll() is None:
        assert time.monotonic() < deadline, "gc deleted nothing within a minute"
        time.sleep(0.02)
    assert gc.poll() is None, "gc finished before it could be killed; give it more to do"
    gc.kill()
    gc.wait()
    left = set(s3_server.keys(s3_bucket))
    assert kept <= left and len(kept) < len(left) < total
    assert request("GET", f"{daemon.url}/v1/files/{keep.digest}")[2] == keep.data
    # A live row never names an object gc deleted.
    assert {f"casd/md5/{d}" for d in chunk_rows(daemon.data_dir)} <= left
    r = casd(daemon.data_dir, "gc", "--grace", "0", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert set(s3_server.keys(s3_bucket)) == kept
    r = casd(daemon.data_dir, "fsck", "--deep", *args)
    assert r.returncode == 0 and "no problems" in r.stdout, r.stdout + r.stderr


def test_two_machines_share_a_bucket_and_a_postgresql_catalogue(
    s3_server, s3_bucket, postgres_url, daemon_factory, tmp_path, rng
):
    """Nothing shared but the bucket and the database: chunks half to each daemon, the merge
    on the one that received the other half, downloads from both, admin commands clean."""
    engines = (*s3_args(s3_server, s3_bucket), "--catalog", postgres_url)
    a = daemon_factory(*engines, data_dir=tmp_path / "machine-a")
    b = daemon_factory(*engines, data_dir=tmp_path / "machine-b")
    p = prepare(rng.bytes(6 * CHUNK + 5), CHUNK, algo="sha256")
    hs = handshake(a.url, p)
    for n, d in enumerate(hs["missing"]):
        assert put((a, b)[n % 2].url, hs["upload_id"], p, d)[0] == 201
    status, body = merge(b.url, hs["upload_id"])
    assert status == 200, body
    for d in (a, b):
        assert request("GET", f"{d.url}/v1/files/{p.digest}")[2] == p.data
        assert handshake(d.url, p)["status"] == "complete"
    assert (
        local_blob_files(tmp_path / "machine-a") == local_blob_files(tmp_path / "machine-b") == []
    )
    r = casd(tmp_path / "machine-c", "gc", "--grace", "0", *engines)
    assert r.returncode == 0, r.stdout + r.stderr
    r = casd(tmp_path / "machine-c", "fsck", "--deep", *engines)
    assert r.returncode == 0 and "no problems" in r.stdout, r.stdout + r.stderr
