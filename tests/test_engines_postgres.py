"""`casd serve --catalog postgresql://...`: the real daemon and admin commands on PostgreSQL.

The cluster is the session's throwaway one (tests/engine_postgres.py), a fresh database per
test; blobs stay in the local --data folder, which two daemons on one machine may share.
"""

from __future__ import annotations

import asyncio
import json
import subprocess

import aiohttp

from helpers import blob_files, casd_run, prepare, rand, upload

KiB = 1024
WAIT = 60


def admin(*args: str) -> subprocess.CompletedProcess:
    return casd_run(*args, timeout=120)


async def get(session, url: str) -> tuple[int, bytes]:
    async with session.get(url) as r:
        return r.status, await r.read()


async def test_round_trip_dedup_resume_and_admin_commands(daemon_factory, postgres_url, tmp_path):
    d = daemon_factory("--catalog", postgres_url)
    assert "secret-pw" not in d.log()
    a = prepare(rand(8 * 64 * KiB), name="a.bin")
    b_data = a.data[: 4 * 64 * KiB] + rand(4 * 64 * KiB)
    b = prepare(b_data, name="b.bin")
    async with aiohttp.ClientSession() as s:
        done = await upload(s, d.url, a)
        assert await get(s, d.url + done["url"]) == (200, a.data)
        # Dedup: the second file sends only the chunks the first did not have.
        async with s.post(f"{d.url}/v1/handshake", json=b.handshake) as r:
            hs = await r.json()
        assert len(hs["missing"]) == 4
        # Resume: one chunk now, the daemon killed, the rest after a restart.
        first = hs["missing"][0]
        async with s.put(
            f"{d.url}/v1/uploads/{hs['upload_id']}/chunks/{first}", data=b.chunks[first]
        ) as r:
            assert r.status == 201
    d.restart()
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{d.url}/v1/handshake", json=b.handshake) as r:
            again = await r.json()
        assert again["upload_id"] == hs["upload_id"] and len(again["missing"]) == 3
        done_b = await upload(s, d.url, b)
        assert await get(s, d.url + done_b["url"]) == (200, b.data)
    assert len(blob_files(d.data_dir)) == 12

    where = ("--data", str(d.data_dir), "--catalog", postgres_url)
    stats = admin("stats", "--json", *where)
    assert stats.returncode == 0, stats.stderr
    counts = json.loads(stats.stdout)
    assert counts["files"] == 2 and counts["chunks"] == 12
    assert counts["catalog_bytes"] > 1_000_000  # the database's size, not a missing file's
    ls = admin("ls", *where)
    assert ls.returncode == 0 and a.digest in ls.stdout and b.digest in ls.stdout
    fsck = admin("fsck", "--deep", *where)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    rm = admin("rm", *where, a.digest)
    assert rm.returncode == 0, rm.stderr
    gc = admin("gc", "--grace", "0", *where)
    assert gc.returncode == 0, gc.stderr
    # a's own four chunks are gone; the four it shares with b stay.
    assert len(blob_files(d.data_dir)) == 8
    async with aiohttp.ClientSession() as s:
        assert (await get(s, d.url + done["url"]))[0] == 404
        assert await get(s, d.url + done_b["url"]) == (200, b.data)
    for r in (stats, ls, fsck, rm, gc):
        assert "secret-pw" not in r.stdout + r.stderr


async def test_two_daemons_one_catalogue_serve_the_same_files(daemon_factory, postgres_url):
    """Two daemons on one PostgreSQL database and one --data folder: a file's chunks sent
    half to each, merged on either, downloaded byte-exact from both."""
    one = daemon_factory("--catalog", postgres_url)
    two = daemon_factory("--catalog", postgres_url, data_dir=one.data_dir)
    p = prepare(rand(10 * 64 * KiB), name="shared.bin")
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{one.url}/v1/handshake", json=p.handshake) as r:
            hs = await r.json()
        for i, digest in enumerate(hs["missing"]):
            base = (one, two)[i % 2].url
            async with s.put(
                f"{base}/v1/uploads/{hs['upload_id']}/chunks/{digest}", data=p.chunks[digest]
            ) as r:
                assert r.status == 201, await r.text()
        async with s.get(f"{two.url}/v1/uploads/{hs['upload_id']}") as r:
            assert (await r.json())["missing"] == []
        async with s.post(f"{two.url}/v1/uploads/{hs['upload_id']}/merge") as r:
            assert r.status == 200, await r.text()
            url = (await r.json())["url"]
        for d in (one, two):
            assert await get(s, d.url + url) == (200, p.data)
            async with s.post(f"{d.url}/v1/handshake", json=p.handshake) as r:
                assert (await r.json())["status"] == "complete"


async def test_a_database_that_goes_down_gives_503_then_recovers(
    daemon_factory, postgres_url, postgres_cluster
):
    d = daemon_factory("--catalog", postgres_url)
    p = prepare(rand(4 * 64 * KiB))
    q = prepare(rand(4 * 64 * KiB))
    async with aiohttp.ClientSession() as s:
        done = await upload(s, d.url, p)
        postgres_cluster.stop()
        try:
            for url in ("/healthz", done["url"]):
                async with s.get(d.url + url) as r:
                    assert r.status == 503, (url, r.status)
                    body = await r.json()
                    assert body["error"] == "unavailable"
            async with s.post(f"{d.url}/v1/handshake", json=q.handshake) as r:
                assert r.status == 503
                text = await r.text()
                assert "secret-pw" not in text and "Traceback" not in text
        finally:
            postgres_cluster.start()
        # Back: within a few tries (a pooled connection may still be the dead one's).
        for _ in range(20):
            async with s.get(f"{d.url}/healthz") as r:
                if r.status == 200:
                    break
            await asyncio.sleep(0.1)
        assert r.status == 200
        assert await get(s, d.url + done["url"]) == (200, p.data)
        fresh = await upload(s, d.url, q)
        assert await get(s, d.url + fresh["url"]) == (200, q.data)
    assert "secret-pw" not in d.log()
    assert "Traceback" not in d.log()


async def test_daemons_starting_together_migrate_once(postgres_url):
    """Several processes opening a new database at once: one migrates, the others wait for
    it; every step is recorded once."""
    import asyncpg

    from casd.catalog import open_catalog
    from casd.catalog.postgres import _migrations

    cats = await asyncio.gather(*(open_catalog(postgres_url) for _ in range(4)))
    try:
        for c in cats:
            await c.ping()
    finally:
        for c in cats:
            await c.close()
    con = await asyncpg.connect(postgres_url)
    try:
        rows = await con.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    finally:
        await con.close()
    assert [(r[0], r[1]) for r in rows] == [(v, n) for v, n, _sql in _migrations()]


def test_the_catalogue_url_comes_from_flag_env_or_config_and_is_never_shown(tmp_path):
    """`catalog = "..."` in the config file, $CASD_CATALOG, --catalog: each is taken, in that
    order of precedence, and --check-config shows it with its password masked."""
    import os

    config = tmp_path / "casd.toml"
    config.write_text('catalog = "postgresql://casd:file-pw@127.0.0.1:5/fromfile"\n')

    def check(*args: str, env: dict | None = None) -> str:
        r = casd_run(
            "serve",
            "--config",
            str(config),
            "--check-config",
            *args,
            env={**os.environ, **(env or {})},
        )
        assert r.returncode == 0, r.stderr
        [line] = [ln for ln in r.stdout.splitlines() if ln.startswith("catalog = ")]
        assert "-pw" not in r.stdout + r.stderr
        return line

    assert check() == "catalog = postgresql://casd:***@127.0.0.1:5/fromfile"
    assert check(env={"CASD_CATALOG": "postgresql://e:env-pw@h:6/fromenv"}) == (
        "catalog = postgresql://e:***@h:6/fromenv"
    )
    assert check(
        "--catalog",
        "postgresql://f:flag-pw@h:7/fromflag",
        env={"CASD_CATALOG": "postgresql://e:env-pw@h:6/fromenv"},
    ) == ("catalog = postgresql://f:***@h:7/fromflag")
    bad = casd_run("stats", "--data", str(tmp_path), "--catalog", "mysql://u:bad-pw@h/db")
    assert bad.returncode == 2 and "not a postgresql://" in bad.stderr
    assert "bad-pw" not in bad.stderr
