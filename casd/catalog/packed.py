"""A manifest's chunk list as both engines store it: packed parts, not a row per chunk.

A handshake of a 1 TB file at 5 MiB chunks lists 200,000 chunks; a row each made the
catalogue write 200,000 rows and index entries before answering. Instead a manifest's list
is stored as parts of up to PART consecutive chunks, one row each (manifest_parts: the
manifest id, the position of the part's first chunk, its digests' raw bytes back to back
and its sizes as big-endian 64-bit integers), plus one row per *distinct* digest with its
size (manifest_digests), the table gc, fsck and the missing list join on.

A part never changes once written; a streamed upload (protocol v1.1) adds parts as its
batches come, so appending never rewrites what is stored.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable

from casd.models import ChunkList

# Chunks per stored part: a page of the list (hash-ahead, GET .../chunks) reads one or two
# parts of at most 64 KiB of digests, never the whole list.
PART = 2048

_SWAP = sys.byteorder == "little"


def encode_sizes(sizes: list[int]) -> bytes:
    """Sizes as big-endian 64-bit integers back to back (PostgreSQL's int8send order)."""
    a = array("q", sizes)
    if _SWAP:
        a.byteswap()
    return a.tobytes()


def decode_sizes(raw: bytes) -> list[int]:
    a = array("q")
    a.frombytes(raw)
    if _SWAP:
        a.byteswap()
    return a.tolist()


def raw_digests(hexes: list[str]) -> bytes:
    """The digests' bytes back to back (`hexes` are validated lowercase hex)."""
    return bytes.fromhex("".join(hexes))


def split_hex(raw: bytes, count: int) -> list[str]:
    """`count` equal-length digests back to back in `raw` -> their lowercase hex strings."""
    if not count:
        return []
    text = raw.hex()
    step = len(text) // count
    return [text[i : i + step] for i in range(0, len(text), step)]


def parts(chunks: ChunkList, start: int = 0) -> list[tuple[int, bytes, bytes]]:
    """(position, digests, sizes) rows for `chunks` listed from position `start` on."""
    out = []
    for i in range(0, len(chunks), PART):
        hexes = chunks.hexes[i : i + PART]
        out.append((start + i, raw_digests(hexes), encode_sizes(chunks.sizes[i : i + PART])))
    return out


def unpack(rows: Iterable[tuple[int, bytes, bytes]]) -> ChunkList:
    """The chunk list stored in `rows` (position, digests, sizes), in position order."""
    hexes: list[str] = []
    sizes: list[int] = []
    for _start, digests, raw_sizes in rows:
        part_sizes = decode_sizes(bytes(raw_sizes))
        hexes += split_hex(bytes(digests), len(part_sizes))
        sizes += part_sizes
    return ChunkList(hexes, sizes)


def page(rows: Iterable[tuple[int, bytes, bytes]], start: int, limit: int) -> list[tuple[str, int]]:
    """(hex, size) of the chunks at positions start..start+limit-1 found in `rows`."""
    out: list[tuple[str, int]] = []
    for first, digests, raw_sizes in rows:
        part_sizes = decode_sizes(bytes(raw_sizes))
        lo = max(start - first, 0)
        hi = min(start + limit - first, len(part_sizes))
        if hi <= lo:
            continue
        step = len(digests) // len(part_sizes)
        hexes = split_hex(bytes(digests[lo * step : hi * step]), hi - lo)
        out += zip(hexes, part_sizes[lo:hi], strict=True)
    return out


def distinct(chunks: ChunkList) -> dict[str, int]:
    """Each digest once, in the order of first use, with its size (a manifest gives one
    digest one size: the handshake and the v1.1 append refuse anything else)."""
    return dict(zip(chunks.hexes, chunks.sizes, strict=True))
