"""A timeline of one streamed upload (protocol v1.1), both sides: where do they wait?

`python -m bench.stream_trace [--mib N] [--v1] [--pinned] [--out FILE]`

A fresh `casd serve --stream-uploads` (pinned to core 1 with --pinned) and the Python client
in this process (pinned to core 0 with --pinned), with hooks that timestamp each step on the
client: each chunk handed over by the hashing thread, each digest batch sent and answered,
each PUT started and finished, each wait of the hashing thread for the send budget. The
daemon's access log gives each request's arrival and duration. Prints a summary of where
time went (idle gaps of the PUT streams, budget waits) and writes every event as JSON lines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import procs
from bench.casd_runs import write_random_file
from bench.limits import MiB
from casd.client import hashing, transfer

EVENTS: list[dict] = []
T0 = time.perf_counter()


def ev(kind: str, **fields) -> None:
    EVENTS.append({"t": round(time.perf_counter() - T0, 5), "ev": kind, **fields})


def install_hooks() -> None:
    """Wrap the client's steps with timestamps (no behaviour changes)."""
    c = transfer.CasdClient
    list_batch, put_bytes = c._list_batch, c._put_bytes

    async def traced_list_batch(self, upload_id, key, start, batch):
        ev("batch_sent", start=start, n=len(batch))
        missing = await list_batch(self, upload_id, key, start, batch)
        ev("batch_answered", start=start, n=len(batch), missing=len(missing))
        return missing

    async def traced_put(self, upload_id, span, data):
        ev("put_start", offset=span.offset)
        try:
            return await put_bytes(self, upload_id, span, data)
        finally:
            ev("put_end", offset=span.offset)

    c._list_batch = traced_list_batch  # type: ignore[method-assign]
    c._put_bytes = traced_put  # type: ignore[method-assign]

    take = hashing.ByteBudget.take

    def traced_take(self, n, stop=None):
        t = time.perf_counter()
        take(self, n, stop)
        waited = time.perf_counter() - t
        if waited > 0.001:
            ev("budget_wait", seconds=round(waited, 4), used=self.used)

    hashing.ByteBudget.take = traced_take  # type: ignore[method-assign]

    stream = transfer.stream_digests

    def traced_stream(f, size, rule, algo, emit, budget, on_bytes=None, stop=None):
        def traced_emit(span, data):
            ev("hashed", offset=span.offset)
            emit(span, data)

        return stream(f, size, rule, algo, traced_emit, budget, on_bytes, stop)

    transfer.stream_digests = traced_stream  # type: ignore[assignment]


class SchedSampler:
    """Per thread of some processes: CPU run time and time spent runnable but waiting for a
    core (/proc/PID/task/TID/schedstat), sampled so that threads that end are counted too."""

    def __init__(self, pids: list[int], every: float = 0.05):
        self.pids, self.every = pids, every
        self.seen: dict[tuple[int, int], tuple[str, int, int]] = {}
        self.first: dict[tuple[int, int], tuple[int, int]] = {}
        self.span: dict[tuple[int, int], tuple[float, float]] = {}
        self.busy: list[tuple[float, int, int]] = []  # (when, pid, run + wait ns of threads)
        self.mine = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        now = time.perf_counter()
        for pid in self.pids:
            busy = 0
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                try:
                    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                        run, wait, _ = (int(x) for x in f.read().split())
                    with open(f"/proc/{pid}/task/{tid}/comm") as f:
                        comm = f.read().strip()
                except OSError:
                    continue
                key = (pid, int(tid))
                if int(tid) != self.mine:
                    busy += run + wait
                self.first.setdefault(key, (run, wait))
                now = time.perf_counter()
                self.span[key] = (self.span.get(key, (now, now))[0], now)
                self.seen[key] = (comm, run, wait)
            self.busy.append((now, pid, busy))

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def __enter__(self) -> SchedSampler:
        self.sample()
        self._thread.start()
        self.mine = self._thread.native_id or 0
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def idle_both(self) -> tuple[float, float, float]:
        """Seconds of sampling intervals in which (the client, the daemon, both) had no
        thread running or waiting for a core for more than a tenth of the interval: time
        where a side waits on the other (or on the disk), not for a core."""
        by: dict[int, list[tuple[float, int]]] = {}
        for t, pid, b in self.busy:
            by.setdefault(pid, []).append((t, b))
        series = [by[p] for p in self.pids]
        idle = [0.0, 0.0, 0.0]
        for i in range(1, min(len(x) for x in series)):
            dt = series[0][i][0] - series[0][i - 1][0]
            quiet = [(x[i][1] - x[i - 1][1]) / 1e9 < 0.1 * dt for x in series]
            idle[0] += dt if quiet[0] else 0
            idle[1] += dt if quiet[1] else 0
            idle[2] += dt if all(quiet) else 0
        return idle[0], idle[1], idle[2]

    def table(self, names: dict[int, str]) -> str:
        """One row per thread that ran: CPU, runnable-but-waiting, and the rest (asleep:
        in select, on a lock, on the GIL, on the disk) over the time it was seen."""
        out = []
        for key, (_comm, run, wait) in sorted(self.seen.items()):
            run0, wait0 = self.first[key]
            r, w = (run - run0) / 1e9, (wait - wait0) / 1e9
            if r + w < 0.05:
                continue
            t0, t1 = self.span[key]
            role = "main" if key[0] == key[1] else "thread"
            out.append(
                f"  {names[key[0]]:6} {role:6} {key[1]:>7}  seen {t1 - t0:6.2f}s  ran {r:6.2f}s"
                f"  waited for a core {w:6.2f}s  asleep {max(0.0, t1 - t0 - r - w):6.2f}s"
            )
        return "\n".join(out)


def gaps(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Seconds in [start, end] covered by no interval."""
    covered, at = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, at), min(b, end)
        if b > a:
            covered += b - a
            at = b
    return (end - start) - covered


def idle_causes(events: list[dict]) -> str:
    """Seconds with no PUT in flight, split by what ended each idle stretch's parts: the
    hashing thread (no chunk ready), a digest batch's answer, or the senders themselves."""
    waits = {"hashing": 0.0, "batch answer": 0.0, "sender": 0.0}
    inflight, idle_since, batch_out, ready = 0, None, False, 0
    for e in sorted(events, key=lambda e: e["t"]):
        kind, t = e["ev"], e["t"]
        if idle_since is not None and inflight == 0:
            cause = "batch answer" if batch_out else ("sender" if ready else "hashing")
            waits[cause] += t - idle_since
            idle_since = t
        if kind == "put_start":
            inflight += 1
            ready -= 1
            idle_since = None
        elif kind == "put_end":
            inflight -= 1
            if inflight == 0:
                idle_since = t
        elif kind == "batch_sent":
            batch_out = True
        elif kind == "batch_answered":
            batch_out = False
            ready += e["missing"]
    return ", ".join(f"{k} {v:.2f}s" for k, v in waits.items())


def summary(events: list[dict], access: list[dict]) -> str:
    by = lambda kind: [e for e in events if e["ev"] == kind]  # noqa: E731
    starts = {e["offset"]: e["t"] for e in by("put_start")}
    ends = {e["offset"]: e["t"] for e in by("put_end")}
    hashed = {e["offset"]: e["t"] for e in by("hashed")}
    puts = [(starts[o], ends[o]) for o in starts if o in ends]
    if not puts or not hashed:
        return "(no v1.1 client events: a v1 upload)"
    t_first, t_last = min(hashed.values()), max(ends.values())
    sent = by("batch_sent")
    answered = by("batch_answered")
    rtt = [a["t"] - s["t"] for s, a in zip(sent, answered, strict=False)]
    wait_in_queue = [starts[o] - hashed[o] for o in starts if o in hashed]
    budget = by("budget_wait")
    lines = [
        f"chunks hashed {len(hashed)}, PUTs {len(puts)}, batches {len(sent)}"
        f" (sizes: {sorted({e['n'] for e in sent})})",
        f"first hashed at {t_first:.2f}s, last hashed at {max(hashed.values()):.2f}s,"
        f" last PUT ended at {t_last:.2f}s",
        f"batch round trip: mean {1000 * sum(rtt) / len(rtt):.1f} ms, max {1000 * max(rtt):.1f} ms,"
        f" total {sum(rtt):.2f}s",
        f"hashed -> PUT start: mean {1000 * sum(wait_in_queue) / len(wait_in_queue):.1f} ms,"
        f" max {1000 * max(wait_in_queue):.1f} ms",
        f"PUT duration (client): mean {1000 * sum(b - a for a, b in puts) / len(puts):.1f} ms",
        f"time with no PUT in flight (first hashed .. last PUT end): "
        f"{gaps(puts, t_first, t_last):.2f}s of {t_last - t_first:.2f}s",
        "idle PUT streams (no PUT in flight), by what the client was waiting for:"
        f" {idle_causes(events)}",
        f"budget waits of the hashing thread: {len(budget)}, total"
        f" {sum(e['seconds'] for e in budget):.2f}s",
    ]
    for route in sorted({a.get("route", "") for a in access}):
        ds = [a["duration_ms"] for a in access if a.get("route") == route]
        lines.append(
            f"daemon {route}: {len(ds)} requests, mean {sum(ds) / len(ds):.1f} ms,"
            f" max {max(ds):.1f} ms, total {sum(ds) / 1000:.2f}s"
        )
    return "\n".join(lines)


async def run(url: str, big: Path, concurrency: int, chunk: int) -> dict:
    async with transfer.CasdClient(url) as client:
        s = await client.upload(big, chunk_size=chunk, concurrency=concurrency, use_cache=False)
    return {"seconds": s.seconds, "hash_seconds": s.hash_seconds, "bytes_sent": s.bytes_sent}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stream_trace", description=__doc__)
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--chunk-mib", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--v1", action="store_true", help="a daemon without v1.1 (for comparison)")
    p.add_argument("--pinned", action="store_true", help="client core 0, daemon core 1")
    p.add_argument("--out", type=Path, help="write the events as JSON lines here")
    p.add_argument("--file", type=Path, help="upload this file instead of a fresh random one")
    args = p.parse_args(argv)
    install_hooks()
    with tempfile.TemporaryDirectory(prefix="casd-trace-") as tmp:
        work = Path(tmp)
        big = args.file
        if big is None:
            big = work / "big.bin"
            write_random_file(big, args.mib * MiB)
        cmd = procs.casd_serve_cmd(
            work / "data",
            "--log-format",
            "json",
            "--no-stream-uploads" if args.v1 else "--stream-uploads",
        )
        if args.pinned:
            cmd = ["taskset", "-c", "1", *cmd]
            os.sched_setaffinity(0, {0})
        log = work / "daemon.log"
        with procs.Server(cmd, log) as daemon:
            cpu0 = procs.cpu_seconds(daemon.pid)
            c0 = time.process_time()
            with SchedSampler([os.getpid(), daemon.pid]) as sched:
                result = asyncio.run(run(daemon.url, big, args.concurrency, args.chunk_mib * MiB))
            result["client_cpu_s"] = time.process_time() - c0
            names = {os.getpid(): "client", daemon.pid: "daemon"}
            result["daemon_cpu_s"] = procs.cpu_seconds(daemon.pid) - cpu0
        access = []
        for line in log.read_text().splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                if "duration_ms" in rec:
                    access.append(rec)
    print(json.dumps(result))
    print(summary(EVENTS, access))
    print("threads (schedstat):")
    print(sched.table(names))
    c, d, both = sched.idle_both()
    print(f"no runnable thread: client {c:.2f}s, daemon {d:.2f}s, both at once {both:.2f}s")
    with open("/proc/loadavg") as f:
        print("loadavg", f.read().strip())
    if args.out:
        with open(args.out, "w") as f:
            for e in EVENTS:
                f.write(json.dumps(e) + "\n")
            for a in access:
                f.write(json.dumps(a) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
