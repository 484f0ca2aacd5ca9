"""py-spy attached to the daemon during a benchmark phase, and a text summary of where time went."""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path

RATE = 250


class Spy:
    """`py-spy record --format raw` on a running process until stopped (SIGINT).

    `gil`: sample only the thread holding the GIL (py-spy --gil): the Python that runs one
    statement at a time across every thread of the daemon, its serial path."""

    def __init__(self, pid: int, out: Path, gil: bool = False):
        exe = shutil.which("py-spy")
        if exe is None:
            raise RuntimeError("py-spy is not installed: pip install py-spy")
        self.out = out
        # --nonblocking: sample without pausing the daemon, so the profile barely slows it.
        self.proc = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(RATE),
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(out),
                *(["--gil"] if gil else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _role(frames: list[str]) -> str:
    joined = ";".join(frames)
    if "_connection_worker_thread" in joined:
        return "sqlite thread (aiosqlite)"
    if "concurrent/futures/thread.py" in joined:
        return "worker threads (executor)"
    if frames and frames[0].startswith("Thread._bootstrap"):
        return "other threads"
    return "event loop thread"


def summarize(raw: Path, top: int = 15) -> str:
    """Share of samples per thread role, then top functions by self and by inclusive samples."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    roles: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        own[frames[-1]] += n
        roles[_role(frames)] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return f"{raw.name}: no samples\n"
    out = [f"{raw.name}: {total} samples at {RATE} Hz (≈ {total / RATE:.1f} thread-seconds busy)"]
    out.append("  by thread:")
    out += [f"    {n / total:6.1%}  {r}" for r, n in roles.most_common()]
    out.append("  self (leaf frame):")
    out += [f"    {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    out.append("  inclusive (casd and aiohttp frames):")
    picked = [
        (f, n)
        for f, n in incl.most_common()
        if "casd/" in f or "aiohttp/" in f or "aiosqlite/" in f
    ]
    out += [f"    {n / total:6.1%}  {f}" for f, n in picked[:top]]
    return "\n".join(out) + "\n"
