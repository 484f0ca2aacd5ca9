"""Starts casd processes for the tests (`casd serve` daemons and commands such as `casd
upload`) by forking an interpreter that has already imported casd: tests/helpers.py runs one
per test process and talks to it over a pipe.

A process started this way is its own process, running `casd.cli.main` on its own command
line, environment, working folder and output files, exactly as `python -m casd` does, and it
ends the same way (normal interpreter exit, signals, kill -9). What it skips is the
interpreter start and the imports, most of a daemon's start-up CPU (aiohttp alone builds two
TLS contexts), which the fast loop paid some 200 times for daemons and 60 for commands.

Protocol, one JSON object a line. Requests on stdin:
  {"op": "start", "argv": [...], "env": {...}, "cwd": "...", "log": "...", "stderr": "..."}
    (stdout and stderr are appended to `log`, or stderr to its own file when given)
  {"op": "signal", "pid": N, "sig": N}
Answers on stdout: {"started": pid} or {"error": "..."} to a start, {"signalled": pid} to a
signal (sent only while the child is not yet reaped, so never to a reused pid), and
{"exited": pid, "returncode": rc, "cpu": seconds} when a child ends (rc is negative for a
signal, as subprocess reports it; cpu is its user and system time). The launcher ends when stdin closes.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import os
import selectors
import sys
import threading
import traceback
from pathlib import Path
from typing import NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The imports every process would otherwise pay again: the commands, and what `casd serve`
# imports only once it runs (the web app, the catalogue, metrics).
import casd.catalog.sqlite
import casd.cli
import casd.cli_admin
import casd.cli_serve
import casd.cli_tokens
import casd.cli_transfer
import casd.metrics
import casd.migrations
import casd.openapi
import casd.server
import casd.web

with contextlib.suppress(ImportError):  # the S3 and PostgreSQL engines, where installed
    import casd.blobstore.s3
with contextlib.suppress(ImportError):
    import casd.catalog.postgres


def _send(out, msg: dict) -> None:
    out.write(json.dumps(msg) + "\n")
    out.flush()


def _open(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def serve(out) -> dict | None:
    """Answer requests on fd 0 until it closes (returns None); in a forked child, returns
    its start request instead."""
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ, None)
    children: dict[int, int] = {}  # pid -> pidfd
    pending = b""
    while True:
        for key, _ in sel.select():
            if key.data is not None:  # a child ended
                pid = key.data
                _, status, usage = os.wait4(pid, 0)
                sel.unregister(key.fd)
                os.close(children.pop(pid))
                rc = os.waitstatus_to_exitcode(status)
                cpu = usage.ru_utime + usage.ru_stime
                _send(out, {"exited": pid, "returncode": rc, "cpu": cpu})
                continue
            data = os.read(0, 1 << 16)
            if not data:
                return None
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                req = json.loads(line)
                if req["op"] == "signal":
                    if req["pid"] in children:
                        os.kill(req["pid"], req["sig"])
                    _send(out, {"signalled": req["pid"]})
                    continue
                try:
                    log_fd = _open(req["log"])
                    err_fd = _open(req["stderr"]) if "stderr" in req else os.dup(log_fd)
                except OSError as exc:
                    _send(out, {"error": str(exc)})
                    continue
                pid = os.fork()
                if pid == 0:
                    sel.close()
                    for fd in children.values():
                        os.close(fd)
                    null = os.open(os.devnull, os.O_RDONLY)
                    os.dup2(null, 0)
                    os.dup2(log_fd, 1)
                    os.dup2(err_fd, 2)
                    os.close(null)
                    os.close(log_fd)
                    os.close(err_fd)
                    return req
                os.close(log_fd)
                os.close(err_fd)
                children[pid] = os.pidfd_open(pid)
                sel.register(children[pid], selectors.EVENT_READ, pid)
                _send(out, {"started": pid})


def run_child(req: dict) -> int:
    """In the forked child: become `python -m casd ARGV` and run it."""
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    # Line-buffered output on the log, as PYTHONUNBUFFERED gives a daemon the tests exec.
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own stdin
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.argv = [sys.argv[0], *req["argv"]]
    return casd.cli.main()


def exit_as_python_does(code: object) -> NoReturn:
    """End the child as interpreter exit ends a process, in what anyone can observe: wait for
    its non-daemon threads, run its atexit functions (logging's flush), flush stdout and
    stderr, exit with the status SystemExit(code) gives. What it skips is freeing the heap
    object by object, which in a forked child copies every page it touches: most of the CPU
    of a short-lived daemon or command."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    threading._shutdown()  # type: ignore[attr-defined] - what Py_FinalizeEx calls first
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status & 0xFF)


if __name__ == "__main__":
    gc.freeze()  # the children's collections then leave the imported objects' pages shared
    child = serve(sys.stdout)
    if child is not None:
        try:
            result: object = run_child(child)
        except SystemExit as exc:
            result = exc.code
        except BaseException:
            traceback.print_exc()  # as an uncaught exception is reported
            result = 1
        exit_as_python_does(result)
