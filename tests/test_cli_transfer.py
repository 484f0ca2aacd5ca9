"""`casd upload` and `casd download` run the way a user runs them: as a subprocess."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from aiohttp import web

from helpers import casd_run, insertion_case

MiB = 1024 * 1024


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """The environment of a user with their own cache folder and no default server."""
    e = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg-cache"))
    e.pop("CASD_SERVER", None)
    e.pop("CASD_TOKEN", None)
    return e


def casd(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The command in its own process, forked from the tests' launcher (helpers.casd_run);
    the terminal and Ctrl-C tests below start `python -m casd` itself."""
    return casd_run(*args, env=env, timeout=timeout)


def assert_one_line_error(
    proc: subprocess.CompletedProcess, *fragments: str, code: int = 1
) -> None:
    assert proc.returncode == code, proc
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_upload_prints_url_and_summary_then_is_instant(daemon, env, tmp_path, rng):
    src = tmp_path / "holiday.MP4"
    data = rng.write(src, 2 * MiB + MiB // 2)
    md5 = hashlib.md5(data).hexdigest()

    first = casd(env, "upload", str(src), "--server", daemon.url, "--chunk-size", "1MiB")
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""  # not a terminal: no progress bar, no noise
    url, summary = first.stdout.splitlines()
    assert url == f"{daemon.url}/v1/files/{md5}.mp4"
    assert f"md5 {md5}" in summary
    assert "sent 3 of 3 chunks (2.5 MiB), skipped 0 (0 B)" in summary

    again = casd(env, "upload", str(src), "--server", daemon.url, "--chunk-size", "1MiB")
    assert again.returncode == 0 and again.stderr == ""
    url2, summary2 = again.stdout.splitlines()
    assert url2 == url
    assert "instant" in summary2 and "nothing sent" in summary2


def test_upload_json_is_one_object_per_file(daemon, env, tmp_path, rng):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    data_a = rng.write(a, 3 * 64 * 1024)
    data_b = data_a + b"one more chunk"
    b.write_bytes(data_b)
    proc = casd(
        env,
        "upload",
        str(a),
        str(b),
        "--server",
        daemon.url,
        "--json",
        "--algo",
        "sha256",
        "--chunk-size",
        "64k",
        "--concurrency",
        "2",
        "--no-cache",
    )
    assert proc.returncode == 0, proc.stderr
    objs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [o["path"] for o in objs] == [str(a), str(b)]
    assert [o["digest"] for o in objs] == [hashlib.sha256(d).hexdigest() for d in (data_a, data_b)]
    assert all(o["algo"] == "sha256" and not o["cached"] for o in objs)
    assert (objs[0]["chunks_sent"], objs[0]["chunks_skipped"], objs[0]["instant"]) == (3, 0, False)
    # b shares its first three chunks with a: only the new tail goes over the wire.
    assert (objs[1]["chunks_total"], objs[1]["chunks_sent"], objs[1]["bytes_sent"]) == (4, 1, 14)
    assert objs[1]["url"] == f"{daemon.url}/v1/files/{objs[1]['digest']}.bin"


def test_server_and_token_come_from_the_environment(daemon_factory, env, tmp_path, rng):
    d = daemon_factory("--token", "s3cret")
    src = tmp_path / "f.txt"
    rng.write(src, 1000)
    env["CASD_SERVER"] = d.url
    refused = casd(env, "upload", str(src))
    assert_one_line_error(refused, "casd upload:", "f.txt", "unauthorized")
    env["CASD_TOKEN"] = "s3cret"
    ok = casd(env, "upload", str(src))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(d.url + "/v1/files/")


def test_download_by_digest_and_by_url(daemon, env, tmp_path, rng):
    src = tmp_path / "f.bin"
    data = rng.write(src, MiB + 7)
    up = casd(env, "upload", str(src), "--server", daemon.url, "--json")
    url = json.loads(up.stdout)["url"]
    md5 = hashlib.md5(data).hexdigest()

    out = tmp_path / "named.bin"
    by_digest = casd(
        env, "download", md5, "-o", str(out), "--server", daemon.url, "--verify", "full"
    )
    assert by_digest.returncode == 0, by_digest.stderr
    assert out.read_bytes() == data
    assert "(xxh3-128), and md5 of the whole file" in by_digest.stdout

    folder = tmp_path / "into"
    folder.mkdir()
    by_url = casd(env, "download", url, "-o", str(folder))  # the URL names the server
    assert by_url.returncode == 0, by_url.stderr
    assert "verified chunk by chunk (xxh3-128):" in by_url.stdout
    assert (folder / f"{md5}.bin").read_bytes() == data


def test_missing_file_is_one_line_and_other_files_still_go(daemon, env, tmp_path, rng):
    src = tmp_path / "there.bin"
    rng.write(src, 10)
    proc = casd(env, "upload", str(tmp_path / "nope.bin"), str(src), "--server", daemon.url)
    assert_one_line_error(proc, "nope.bin", "No such file or directory")
    assert proc.stdout.startswith(daemon.url + "/v1/files/")


def test_unreachable_server_is_one_line(env, tmp_path, unused_tcp_port, rng):
    src = tmp_path / "f.bin"
    rng.write(src, 10)
    started = time.monotonic()
    proc = casd(env, "upload", str(src), "--server", f"http://127.0.0.1:{unused_tcp_port}")
    assert_one_line_error(
        proc, "cannot reach", f"127.0.0.1:{unused_tcp_port}", "Connection refused"
    )
    assert proc.stdout == ""
    # A closed port is not a blip to retry for seconds.
    assert time.monotonic() - started < 10


def test_fastcdc_upload_then_download_with_reuse_of_an_older_version(daemon, env, tmp_path, rng):
    old = tmp_path / "v1.bin"
    old_data, new_data = insertion_case(3 * MiB, 1024)
    old.write_bytes(old_data)
    new = tmp_path / "v2.bin"
    new.write_bytes(new_data)
    for f in (old, new):
        up = casd(
            env,
            "upload",
            str(f),
            "--server",
            daemon.url,
            "--chunking",
            "fastcdc",
            "--chunk-size",
            "64KiB",
            "--json",
        )
        assert up.returncode == 0, up.stderr
    summary = json.loads(up.stdout)
    assert summary["chunks_total"] > 10
    assert summary["chunks_sent"] <= 3

    out = tmp_path / "got.bin"
    down = casd(
        env,
        "download",
        summary["digest"],
        "-o",
        str(out),
        "--server",
        daemon.url,
        "--reuse",
        str(old),
    )
    assert down.returncode == 0, down.stderr
    assert out.read_bytes() == new_data
    line = down.stdout.strip()
    assert "verified chunk by chunk" in line and "reused" in line, line
    fetched = int(line.split("fetched ")[1].split(" of ")[0])
    assert 1 <= fetched <= 3, line


def test_chunking_flags_are_checked_in_one_line(daemon, env, tmp_path):
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 10)
    bad_avg = casd(
        env,
        "upload",
        str(src),
        "--server",
        daemon.url,
        "--chunking",
        "fastcdc",
        "--chunk-size",
        "1000",
    )
    assert_one_line_error(bad_avg, "--chunk-size", "power of two", code=2)
    bad_kind = casd(env, "upload", str(src), "--server", daemon.url, "--chunking", "rabin")
    assert bad_kind.returncode == 2 and "invalid choice" in bad_kind.stderr
    no_kind = casd(env, "download", "0" * 32, "--server", daemon.url, "--chunk-size", "1MiB")
    assert_one_line_error(no_kind, "--chunk-size needs --chunking", code=2)
    no_file = casd(
        env, "download", "0" * 32, "--server", daemon.url, "--reuse", str(tmp_path / "nope")
    )
    assert_one_line_error(no_file, "--reuse", "nope", code=2)


def test_download_refusal_and_bad_arguments_are_one_line(daemon, env, tmp_path):
    unknown = casd(env, "download", "0" * 32, "-o", str(tmp_path / "x"), "--server", daemon.url)
    assert_one_line_error(unknown, "casd download:", "not_found")
    assert not (tmp_path / "x").exists()
    bad_ref = casd(env, "download", "not-a-digest", "--server", daemon.url)
    assert_one_line_error(bad_ref, "not-a-digest", code=2)
    bad_server = casd(env, "upload", str(tmp_path), "--server", "localhost:8080")
    assert_one_line_error(bad_server, "not a server URL", code=2)


async def test_interrupted_download_is_one_line_and_the_rerun_resumes(
    env, tmp_path, aiohttp_server, rng
):
    data = rng.bytes(3 * MiB, 1)
    md5 = hashlib.md5(data).hexdigest()
    cut_at = MiB + 5
    ranges: list[str | None] = []

    async def serve(request: web.Request) -> web.StreamResponse:
        # The first answer promises the whole file and hangs up part way; later ones
        # honour Range as casd does.
        rng = request.headers.get("Range")
        ranges.append(rng)
        start = int(rng.removeprefix("bytes=").removesuffix("-")) if rng else 0
        resp = web.StreamResponse(status=206 if rng else 200)
        resp.content_length = len(data) - start
        if rng:
            resp.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        await resp.prepare(request)
        if len(ranges) == 1:
            await resp.write(data[:cut_at])
            request.transport.close()
            return resp
        await resp.write(data[start:])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get(f"/v1/files/{md5}.bin", serve)
    server = await aiohttp_server(app)
    url = str(server.make_url(f"/v1/files/{md5}.bin"))
    dest = tmp_path / "out.bin"

    async def run(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "casd",
            *args,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode, out.decode(), err.decode()

    code, out, err = await run("download", url, "-o", str(dest), "--retries", "0")
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1 and "connection lost" in err and "Traceback" not in err
    assert not dest.exists()

    code, out, err = await run("download", url, "-o", str(dest))
    assert code == 0, err
    assert dest.read_bytes() == data
    assert ranges[0] is None and ranges[1] is not None
    resumed_at = int(ranges[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= cut_at
    assert f"resumed at byte {resumed_at}" in out


def test_progress_bars_on_a_terminal(daemon, env, tmp_path, rng):
    src = tmp_path / "f.bin"
    rng.write(src, 3 * MiB)
    master, slave = pty.openpty()
    # A fresh pty is 0 columns wide, on which tqdm draws nothing; a terminal has a size.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "casd",
                "upload",
                str(src),
                "--server",
                daemon.url,
                "--chunk-size",
                "1MiB",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=slave,
            text=True,
        )
        os.close(slave)
        seen = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                try:
                    piece = os.read(master, 65536)
                except OSError:  # the child closed its end
                    break
                if not piece:
                    break
                seen += piece
            elif proc.poll() is not None:
                break
        out, _ = proc.communicate(timeout=30)
    finally:
        os.close(master)
    assert proc.returncode == 0
    text = seen.decode(errors="replace")
    assert "hashing f.bin" in text and "uploading f.bin" in text
    assert out.startswith(daemon.url)  # the summary still goes to stdout, bar-free


def _sigint_as_at_a_terminal() -> None:
    """In the child, before exec: SIGINT at its default, as a terminal's foreground job has it.

    A shell starts a background job (`pytest ... &`, as a CI script or a load run may) with
    SIGINT ignored, and every process it starts inherits that; Python then installs no SIGINT
    handler, rightly, and the Ctrl-C below would change nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler installed for `signum` (SigCgt of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    raise AssertionError(f"no SigCgt in /proc/{pid}/status")


def test_ctrl_c_mid_hashing_exits_130_quickly_with_one_line(env, tmp_path, unused_tcp_port):
    src = tmp_path / "huge.bin"
    with open(src, "wb") as f:
        f.truncate(16 << 30)  # sparse: costs no disk, takes ~25 s to hash here
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "casd",
            "upload",
            str(src),
            "--no-cache",
            "--server",
            f"http://127.0.0.1:{unused_tcp_port}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_sigint_as_at_a_terminal,
    )
    try:
        # Interrupt once hashing is under way: the process has read 64 MiB of the file.
        deadline = time.monotonic() + 30
        while True:
            assert time.monotonic() < deadline and proc.poll() is None
            io = Path(f"/proc/{proc.pid}/io").read_text().split()
            rchar = int(io[io.index("rchar:") + 1])
            if rchar > 64 * MiB:
                break
            time.sleep(0.05)
        # Hashing runs inside the event loop, so the interpreter's handler is in place by now.
        assert _catches(proc.pid, signal.SIGINT), "the upload ignores SIGINT"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert out == ""
    assert err.strip() == "casd: interrupted"


async def start_download(md5: str, dest, server: str, env) -> asyncio.subprocess.Process:
    """`casd download MD5 -o DEST --server SERVER` as its own process, output captured (a
    test may kill it midway)."""
    return await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "casd", "download", md5, "-o", str(dest), "--server", server),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_a_server_sending_wrong_bytes_for_a_range_is_refused_in_one_line(
    env, tmp_path, aiohttp_server, rng
):
    """A chunked download whose Range answers never match the manifest: the chunk is refused
    after its refetches, one line says so, and no file appears at the destination."""
    data = rng.bytes(2 * MiB, 1)
    md5 = hashlib.md5(data).hexdigest()
    half = MiB
    manifest = {
        "algo": "md5",
        "md5": md5,
        "size": len(data),
        "count": 2,
        "chunks": [
            {"digest": hashlib.md5(data[o : o + half]).hexdigest(), "size": half, "offset": o}
            for o in (0, half)
        ],
    }
    ranges: list[str] = []

    async def chunks(request: web.Request) -> web.Response:
        return web.json_response(manifest)

    async def serve(request: web.Request) -> web.Response:
        first, last = map(int, request.headers["Range"].removeprefix("bytes=").split("-"))
        ranges.append(request.headers["Range"])
        body = bytearray(data[first : last + 1])
        body[0] ^= 0x01  # the first byte of every answer is wrong
        return web.Response(
            status=206,
            body=bytes(body),
            headers={"Content-Range": f"bytes {first}-{last}/{len(data)}"},
        )

    app = web.Application()
    app.router.add_get(f"/v1/files/{md5}/chunks", chunks)
    app.router.add_get(f"/v1/files/{md5}", serve)
    server = await aiohttp_server(app)
    dest = tmp_path / "out.bin"
    proc = await start_download(md5, dest, str(server.make_url("")).rstrip("/"), env)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    lines = err.decode().splitlines()
    assert proc.returncode == 1 and out == b""
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert "do not match the chunk's digest" in lines[0] and "casd download:" in lines[0]
    assert "the file was not written" in lines[0]
    assert not dest.exists()
    assert len(ranges) >= 3  # the first try and two refetches of the refused chunk


async def test_a_chunked_download_killed_midway_leaves_no_file_and_the_rerun_resumes(
    env, tmp_path, aiohttp_server, rng
):
    """`casd download` killed (SIGKILL) while two of four chunks are in and two stall: no
    file at the destination, only the hidden temp file; the rerun checks what it holds,
    keeps the two chunks and asks only for the other two."""
    chunk = 256 * 1024
    data = rng.bytes(4 * chunk, 1)
    md5 = hashlib.md5(data).hexdigest()
    manifest = {
        "algo": "md5",
        "md5": md5,
        "size": len(data),
        "count": 4,
        "chunks": [
            {"digest": hashlib.md5(data[o : o + chunk]).hexdigest(), "size": chunk, "offset": o}
            for o in range(0, len(data), chunk)
        ],
    }
    stall = True
    ranges: list[str] = []
    stalled = asyncio.Event()
    never = asyncio.Event()

    async def chunks(request: web.Request) -> web.Response:
        return web.json_response(manifest)

    async def serve(request: web.Request) -> web.StreamResponse:
        first, last = map(int, request.headers["Range"].removeprefix("bytes=").split("-"))
        ranges.append(request.headers["Range"])
        resp = web.StreamResponse(status=206)
        resp.content_length = last - first + 1
        resp.headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
        await resp.prepare(request)
        if stall and first >= 2 * chunk:
            await resp.write(data[first : first + chunk // 2])
            stalled.set()
            await never.wait()  # until the client is killed
        await resp.write(data[first : last + 1])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get(f"/v1/files/{md5}/chunks", chunks)
    app.router.add_get(f"/v1/files/{md5}", serve)
    server = await aiohttp_server(app)
    base = str(server.make_url("")).rstrip("/")
    dest = tmp_path / "out.bin"

    proc = await start_download(md5, dest, base, env)
    await asyncio.wait_for(stalled.wait(), 60)
    part = tmp_path / f".out.bin.{md5[:16]}.casd-part"
    # The two whole chunks are written by the client's threads: wait until they are there.
    for _ in range(600):
        if part.exists() and part.read_bytes()[: 2 * chunk] == data[: 2 * chunk]:
            break
        await asyncio.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    assert not dest.exists()
    assert part.exists() and part.read_bytes() != data

    stall = False
    ranges.clear()
    proc = await start_download(md5, dest, base, env)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    assert dest.read_bytes() == data and not part.exists()
    assert sorted(ranges) == [
        f"bytes={2 * chunk}-{3 * chunk - 1}",
        f"bytes={3 * chunk}-{4 * chunk - 1}",
    ]
    assert "fetched 2 of 4 chunks" in out.decode() and "from an earlier try" in out.decode()
