"""The chunk lists of a handshake and of a v1.1 batch are checked all at once; what a client
sees must be what the entry-by-entry check said: the first bad entry, named."""

from __future__ import annotations

import json

import pytest

from casd.errors import BadRequest
from casd.web import parse_batch, parse_manifest

GOOD = "0123456789abcdef" * 2


def handshake(chunks: list[dict]) -> bytes:
    return json.dumps({"md5": GOOD, "size": 100, "chunks": chunks}).encode()


def batch(chunks: list[dict]) -> bytes:
    return json.dumps({"start": 0, "chunks": chunks}).encode()


def test_digests_are_taken_lowercase_in_order():
    upper = "0123456789ABCDEF" * 2
    m = parse_manifest(handshake([{"md5": GOOD, "size": 3}, {"md5": upper, "size": 4}]))
    assert [(c.hex, c.size) for c in m.chunks] == [(GOOD, 3), (upper.lower(), 4)]
    _algo, start, refs = parse_batch(batch([{"md5": upper, "size": 1}]))
    assert start == 0 and [(c.hex, c.size) for c in refs] == [(upper.lower(), 1)]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        # Whitespace bytes.fromhex would skip: the lengths add up, the bytes do not.
        ({"md5": "0123 4567 89abcdef0123456789abcd", "size": 1}, "chunks[2].md5"),
        ({"md5": GOOD[:-1], "size": 1}, "chunks[2].md5"),
        ({"md5": GOOD[:-1] + "g", "size": 1}, "chunks[2].md5"),
        ({"md5": "é" * 32, "size": 1}, "chunks[2].md5"),
        ({"sha256": GOOD * 2, "size": 1}, "chunks[2] needs md5 and size"),
    ],
)
def test_the_first_bad_digest_is_named(bad, message):
    chunks = [{"md5": GOOD, "size": 1}, {"md5": GOOD, "size": 1}, bad, {"md5": "x", "size": 1}]
    for parse, body in ((parse_manifest, handshake(chunks)), (parse_batch, batch(chunks))):
        with pytest.raises(BadRequest) as exc:
            parse(body)
        assert message in str(exc.value), (parse, str(exc.value))


def test_a_negative_size_is_named_by_the_handshake_in_entry_order():
    chunks = [{"md5": GOOD, "size": 1}, {"md5": GOOD, "size": -5}, {"md5": "x", "size": 1}]
    with pytest.raises(BadRequest, match=r"chunks\[1\]\.size must be a non-negative integer"):
        parse_manifest(handshake(chunks))
    # A batch's sizes are the service's to judge (1 byte or more, under the chunk limit).
    _algo, _start, refs = parse_batch(batch(chunks[:2]))
    assert [c.size for c in refs] == [1, -5]


def test_whitespace_inside_a_digest_is_refused_though_the_lengths_add_up():
    spaced = "0123 4567 89abcdef0123456789abcd"  # 32 characters, 15 bytes to bytes.fromhex
    chunks = [{"md5": GOOD, "size": 1}, {"md5": spaced, "size": 1}, {"md5": GOOD, "size": 1}]
    for parse, body in ((parse_manifest, handshake(chunks)), (parse_batch, batch(chunks))):
        with pytest.raises(BadRequest, match=r"chunks\[1\]\.md5"):
            parse(body)
