"""Test-side protocol helpers: build handshakes from bytes, upload with plain aiohttp."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Prepared:
    handshake: dict
    chunks: dict[str, bytes]  # digest -> bytes
    order: list[str]  # digest of each chunk in file order
    digest: str
    data: bytes


def prepare(
    data: bytes, chunk_size: int = 64 * 1024, algo: str = "md5", ext: str | None = None,
    name: str | None = None,
) -> Prepared:
    """The handshake a correct client would send for `data`, and its chunks by digest."""
    h = hashlib.new(algo)
    chunks: dict[str, bytes] = {}
    order: list[str] = []
    entries = []
    for i in range(0, len(data), chunk_size):
        piece = data[i:i + chunk_size]
        d = hashlib.new(algo, piece).hexdigest()
        chunks[d] = piece
        order.append(d)
        entries.append({algo: d, "size": len(piece)})
        h.update(piece)
    hs: dict = {algo: h.hexdigest(), "size": len(data), "chunks": entries}
    if algo != "md5":
        hs["algo"] = algo
    if ext is not None:
        hs["ext"] = ext
    if name is not None:
        hs["name"] = name
    return Prepared(hs, chunks, order, h.hexdigest(), data)


def rand(n: int, seed: int | None = None) -> bytes:
    if seed is None:
        return os.urandom(n)
    import random

    return random.Random(seed).randbytes(n)


async def upload(session, base: str, p: Prepared) -> dict:
    """Handshake, send every missing chunk, merge; returns the merge (or instant) answer."""
    async with session.post(f"{base}/v1/handshake", json=p.handshake) as r:
        assert r.status == 200, await r.text()
        hs = await r.json()
    if hs["status"] == "complete":
        return hs
    for d in hs["missing"]:
        async with session.put(
            f"{base}/v1/uploads/{hs['upload_id']}/chunks/{d}", data=p.chunks[d]
        ) as r:
            assert r.status in (200, 201), await r.text()
    async with session.post(f"{base}/v1/uploads/{hs['upload_id']}/merge") as r:
        assert r.status == 200, await r.text()
        return await r.json()


def snapshot(data_dir: Path) -> dict:
    """What a refused request must not change: catalogue rows and files on disk."""
    out: dict = {}
    db = data_dir / "catalog.sqlite"
    if db.exists():
        con = sqlite3.connect(db)
        try:
            for table in ("chunks", "manifests", "manifest_chunks", "uploads", "files"):
                out[table] = sorted(
                    con.execute(
                        f"SELECT * FROM {table}"
                        + (" ORDER BY 1" if table != "uploads" else " ORDER BY id")
                    ).fetchall()
                )
        finally:
            con.close()
    out["disk"] = sorted(
        str(p.relative_to(data_dir)) for p in data_dir.rglob("*")
        if p.is_file() and (p.parent.name == "tmp" or "blobs" in p.parts)
    )
    return out


def blob_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in (data_dir / "blobs").rglob("*") if p.is_file())


def temp_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in (data_dir / "tmp").glob("*") if p.is_file())
