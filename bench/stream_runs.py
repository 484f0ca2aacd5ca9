"""B1 with protocol v1.1 (streamed uploads) beside v1: on one machine, and on "two machines".

`python -m bench.stream_runs [--quick] [--rounds N] [--json]`

Each upload is a fresh `casd serve` (fresh data folder) and one `casd upload --no-cache`
process, so the client hashes every byte each time. The rows, alternating v1 and v1.1 in
each round (the machine is shared: compare within a round):

- B1 v1 / B1 v1.1: client and daemon free to use both cores.
- B1 2m v1 / B1 2m v1.1 ("two machines"): the client pinned to core 0 and the daemon to
  core 1 with taskset, as if each had a machine of one core.

Floors, from limits measured in the same run (L1: MD5 on one core, L3: fsynced writes):

- one machine: the B1 floor of bench/report.py (one hash pass, then the longer of one hash
  pass and the fsynced write);
- two machines: the slower side's floor, as issue 13 defines it: the client's two hash
  passes on its core (2 x size / L1), or the daemon's two hash passes plus the fsynced
  write on its core (2 x size / L1 + size / L3).

The ratio is floor / measured seconds (1.0: at the floor).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import limits, procs, report
from bench.casd_runs import FULL, QUICK, Sizes, write_random_file
from bench.limits import MiB
from bench.log import log

CLIENT_CORE, DAEMON_CORE = "0", "1"


def daemon_cmd(data: Path, stream: bool, pinned: bool) -> list[str]:
    cmd = procs.casd_serve_cmd(data, "--stream-uploads" if stream else "--no-stream-uploads")
    return ["taskset", "-c", DAEMON_CORE, *cmd] if pinned else cmd


def upload_once(work: Path, big: Path, sizes: Sizes, stream: bool, pinned: bool, n: int) -> dict:
    """One fresh daemon, one `casd upload` process; the client's summary and CPU figures."""
    tag = f"{'v11' if stream else 'v1'}-{'2m' if pinned else '1m'}-{n}"
    data = work / f"data-{tag}"
    server = procs.Server(daemon_cmd(data, stream, pinned), work / f"daemon-{tag}.log")
    with server as daemon:
        cpu_before = procs.cpu_seconds(daemon.pid)
        client = [
            sys.executable,
            "-m",
            "casd",
            "upload",
            str(big),
            "--server",
            daemon.url,
            "--no-cache",
            "--json",
            "--chunk-size",
            str(sizes.chunk_size),
            "--concurrency",
            str(sizes.concurrency),
        ]
        if pinned:
            client = ["taskset", "-c", CLIENT_CORE, *client]
        env = dict(os.environ, XDG_CACHE_HOME=str(work / f"cache-{tag}"))
        with procs.CpuWatch(daemon.pid) as watch:
            run = subprocess.run(client, capture_output=True, text=True, env=env, check=False)
        if run.returncode != 0:
            raise RuntimeError(f"casd upload failed: {run.stderr.strip()}")
        summary = json.loads(run.stdout.splitlines()[-1])
        daemon_cpu = procs.cpu_seconds(daemon.pid) - cpu_before
    shutil.rmtree(data, ignore_errors=True)
    assert summary["bytes_sent"] == sizes.file_bytes, summary
    return {
        "protocol": "v1.1" if stream else "v1",
        "seconds": summary["seconds"],
        "hash_s": summary["hash_seconds"],
        "transfer_s": summary["transfer_seconds"],
        "merge_s": summary["merge_seconds"],
        "daemon_cpu_s": daemon_cpu,
        "others_cores": watch.others_cores,
    }


def can_pin() -> bool:
    """taskset is there and this process may run on two cores (0 and 1)."""
    return shutil.which("taskset") is not None and {0, 1} <= os.sched_getaffinity(0)


def two_machines(work: Path, big: Path, sizes: Sizes, rounds: int) -> list[dict] | None:
    """`python -m bench`'s "two machines" row: v1.1 (what the client uses when the daemon
    offers it) pinned, once per round, each on a fresh daemon; None where it cannot pin."""
    if not can_pin():
        return None
    return [upload_once(work, big, sizes, True, True, n) for n in range(rounds)]


def floors(size: int, md5_mb_s: float, disk_mb_s: float) -> dict[str, float]:
    """Seconds: the one-machine B1 floor, and the two sides' floors on one core each."""
    return {
        "one_machine": report.floor_seconds(size, md5_mb_s, disk_mb_s),
        "client_core": 2 * size / md5_mb_s / 1e6,
        "daemon_core": report.two_machine_floor(size, md5_mb_s, disk_mb_s),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stream_runs", description=__doc__)
    p.add_argument("--quick", action="store_true", help="64 MiB instead of 1 GiB")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    p.add_argument("--json", action="store_true", help="print the raw figures as JSON too")
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if not can_pin():
        print("needs taskset and two cores", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="casd-bench-stream-") as tmp:
        work = Path(tmp)
        big = work / "big.bin"
        log(f"writing a {sizes.file_bytes // MiB} MiB random file")
        write_random_file(big, sizes.file_bytes)
        log("limits: MD5 on one core, fsynced writes")
        md5 = limits.hash_throughput("md5", sizes.hash_bytes)
        disk = max(
            limits.fsync_write_throughput(big, work / "limit-writes", sizes.chunk_size),
            limits.fsync_write_throughput(
                big, work / "limit-writes", sizes.chunk_size, writers=sizes.concurrency
            ),
        )
        runs: dict[str, list[dict]] = {}
        for n in range(args.rounds):
            for pinned in (False, True):
                for stream in (False, True):
                    key = f"{'2m' if pinned else '1m'} {'v1.1' if stream else 'v1'}"
                    log(f"round {n}: {key}")
                    runs.setdefault(key, []).append(
                        upload_once(work, big, sizes, stream, pinned, n)
                    )
    f = floors(sizes.file_bytes, md5, disk)
    print(table(sizes, md5, disk, f, runs))
    if args.json:
        print(json.dumps({"md5_mb_s": md5, "disk_mb_s": disk, "floors": f, "runs": runs}))
    return 0


def table(sizes: Sizes, md5: float, disk: float, f: dict[str, float], runs: dict) -> str:
    size = sizes.file_bytes
    two = max(f["client_core"], f["daemon_core"])
    lines = [
        f"L1 MD5 one core {md5:.0f} MB/s; L3 fsynced writes {disk:.0f} MB/s;"
        f" {size // MiB} MiB file, {sizes.chunk_size // MiB} MiB chunks,"
        f" concurrency {sizes.concurrency}",
        f"floors: one machine {f['one_machine']:.2f} s; two machines: client core"
        f" {f['client_core']:.2f} s, daemon core {f['daemon_core']:.2f} s (slower side"
        f" {two:.2f} s)",
        "",
        "| row | protocol | seconds per round | best | floor | ratio (floor / best) |"
        " daemon CPU s | hash s (client) | others' cores |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, rs in runs.items():
        where, proto = key.split()
        floor = f["one_machine"] if where == "1m" else two
        best = min(r["seconds"] for r in rs)
        row = "B1" if where == "1m" else "B1 two machines"

        def each(field: str, digits: int, rs=rs) -> str:
            return ", ".join(f"{r[field]:.{digits}f}" for r in rs)

        lines.append(
            f"| {row} | {proto} | {each('seconds', 2)} | {best:.2f} | {floor:.2f}"
            f" | {floor / best:.2f} | {each('daemon_cpu_s', 1)} | {each('hash_s', 2)}"
            f" | {each('others_cores', 2)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
