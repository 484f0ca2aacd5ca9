"""casd.js in headless Chromium: a file of one chunk goes in one request (protocol v1.1,
PUT /v1/files/...) against a real `casd serve`. Select with `pytest -m browser`."""

from __future__ import annotations

import json

import pytest
from test_browser import counters, fetch, make_file, md5, page, pick, wait_finished

pytestmark = pytest.mark.browser

__all__ = ["page"]  # the fixture, shared with test_browser.py

KiB = 1024


def test_page_puts_a_small_file_in_one_request_and_again_is_instant(daemon, page, tmp_path):
    path = tmp_path / "note.txt"
    data = make_file(path, 100 * KiB, "one-request")
    page.goto(daemon.url + "/")

    row = pick(page, path)
    summary = wait_finished(row, "done")
    url = f"{daemon.url}/v1/files/{md5(data)}.txt"
    assert page.chunk_puts == [url + "?name=note.txt"]
    assert summary["url"] == url and fetch(url) == data
    assert (summary["chunks_sent"], summary["bytes_sent"], summary["instant"]) == (
        1,
        len(data),
        False,
    )
    assert counters(row) == {"sent": "1", "total": "1", "skipped": "0", "bytes_skipped": "0 B"}
    log = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    requests = [(e.get("method"), e.get("route")) for e in log if e.get("route")]
    assert ("PUT", "/v1/files/{name}") in requests
    uploads = [r for r in requests if r[0] == "POST"]
    assert uploads == []  # no handshake, no merge

    again = pick(page, path)
    summary = wait_finished(again, "instant")
    assert summary["instant"] is True and summary["bytes_sent"] == 0
    assert len(page.chunk_puts) == 2
