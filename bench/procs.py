"""Subprocesses the benchmark starts (casd serve, the plain aiohttp server) and /proc readers."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

_URL_LINE = re.compile(r"serving (http://127\.0\.0\.1:(\d+))")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class Server:
    """A child process that logs "serving http://127.0.0.1:PORT" once it listens."""

    def __init__(self, cmd: list[str], log_path: Path, cwd: Path | None = None):
        self.cmd = cmd
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 30.0) -> Server:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as log:
            start_offset = log.tell()
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.cwd
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as log:
                log.seek(start_offset)
                m = _URL_LINE.search(log.read().decode(errors="replace"))
            if m:
                self.url = m.group(1)
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.cmd} exited with {self.proc.returncode}:\n"
                    f"{self.log_path.read_text(errors='replace')}"
                )
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{self.cmd} did not announce its URL within {timeout}s")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 30.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def casd_serve_cmd(data_dir: Path, *extra: str) -> list[str]:
    """The command line of `casd serve` on a free 127.0.0.1 port with its own data folder."""
    return [
        sys.executable,
        "-m",
        "casd",
        "serve",
        "--data",
        str(data_dir),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        *extra,
    ]


def casd_daemon(data_dir: Path, log_path: Path, *extra: str, root: Path | None = None) -> Server:
    """`casd serve` on a free 127.0.0.1 port with its own data folder, as a user starts it.

    `root`: a source tree to run the daemon from (`python -m` imports casd from the working
    folder), to measure another commit's daemon with this benchmark; default the current one.
    """
    return Server(casd_serve_cmd(data_dir, *extra), log_path, cwd=root)


def plain_server(file_path: Path, log_path: Path, loop: str = "asyncio") -> Server:
    """bench/plain_server.py: discards PUT bodies, serves `file_path` with web.FileResponse."""
    return Server([sys.executable, "-m", "bench.plain_server", str(file_path), loop], log_path)


# --- /proc --------------------------------------------------------------------------------


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_mb(pid: int) -> float:
    """Resident set size now (VmRSS), in MB (10^6 bytes)."""
    return _status_kib(pid, "VmRSS") * 1024 / 1e6


def hwm_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) since start or the last reset_hwm, in MB."""
    return _status_kib(pid, "VmHWM") * 1024 / 1e6


def reset_hwm(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs); False if not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces; fields after it are space-separated.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def loop_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process's main thread (a daemon's event loop)."""
    with open(f"/proc/{pid}/task/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def context_switches(pid: int) -> int:
    """Voluntary and involuntary context switches of every thread of a process so far."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                total += sum(int(ln.split()[1]) for ln in f if "ctxt_switches" in ln)
        except FileNotFoundError:
            pass  # a thread that ended meanwhile
    return total


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class RssSampler:
    """Samples a process's VmRSS every `interval` seconds in a thread (max, mean, count)."""

    def __init__(self, pid: int, interval: float = 0.02):
        self.pid = pid
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(rss_mb(self.pid))
            except (OSError, KeyError):
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def max(self) -> float:
        return max(self.samples, default=0.0)

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else 0.0


def _system_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (user+nice+system+irq+softirq+steal)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


class CpuWatch:
    """How many cores processes other than ours kept busy while a phase ran.

    The machine may be shared: a figure measured while others use both cores is not the
    figure of an idle machine, so each phase reports the others' load beside its numbers.
    """

    def __init__(self, *pids: int):
        self.pids = pids

    def _ours(self) -> float:
        # This process, and its children once waited for (a `casd upload` run by
        # subprocess.run inside the phase is ours, not another process's load).
        t = os.times()
        total = t.user + t.system + t.children_user + t.children_system
        for pid in self.pids:
            with contextlib.suppress(OSError):  # the process has ended
                total += cpu_seconds(pid)
        return total

    def __enter__(self) -> Self:
        self._t = time.perf_counter()
        self._busy = _system_busy_seconds()
        self._ours0 = self._ours()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._t
        others = (_system_busy_seconds() - self._busy) - (self._ours() - self._ours0)
        self.wall = wall
        self.others_cores = max(0.0, others / wall) if wall > 0 else 0.0
