"""`python -m bench.hot`: only the daemon's hot-path rows (B6, B1's daemon CPU per GiB, and B5's
huge handshakes), each round on a fresh `casd serve`, optionally alternating between source
trees.

The full `python -m bench` takes minutes; this runs the rows a daemon-side change moves, as
many rounds as asked, and prints every round (not only the best), with the CPU other
processes used meanwhile. `--root DIR` (repeatable) runs the daemon from another source tree
(for example `git archive COMMIT | tar -x -C DIR`), alternating between the trees round by
round so a burst of load on the shared machine does not land on one side only.
`--rows b5` prepares its 199,999 stored chunks in seconds (casd_runs.b5_prep_rows: the chunk
rows a PUT of each would have committed, and with --b5-blobs their blob files), instead of
the minutes of PUTs `python -m bench` spends on them, on a fresh data folder per round and
tree (each tree's daemon creates and migrates its own catalogue first).
`--rows chunks` uploads B1's file (`--b1-mib`) in 5 MiB and in 256 KiB fixed chunks, each on
a fresh daemon, and prints what one more chunk costs the daemon beyond its bytes (CPU, event
loop CPU, context switches), and what one thread hand-off costs on this machine.
`--profile DIR` attaches py-spy to each daemon and writes raw stacks and a summary there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench import casd_runs, procs
from bench.casd_runs import FULL
from bench.log import log
from bench.run import default_tmp, loadavg

ROWS = ("b6", "b1", "b5", "chunks")


async def one_round(
    rows: list[str],
    root: Path | None,
    work: Path,
    big: Path | None,
    n: int,
    profile: Path | None,
    serve_args: list[str],
    b5_blobs: bool = False,
    daemons: int = 1,
    gil: bool = False,
) -> dict:
    sizes = replace(FULL, file_bytes=big.stat().st_size) if big is not None else FULL
    data, cache = work / f"data-{n}", work / f"cache-{n}"
    out: dict = {}
    if "b5" in rows:
        b5_data = work / f"b5-data-{n}"
        prep_s = casd_runs.b5_prep_rows(
            b5_data, sizes.manifest_chunks - 1, work, root, blobs=b5_blobs
        )
        log(f"B5: {sizes.manifest_chunks - 1:,} chunks prepared in {prep_s:.1f} s")
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
        out["b5"] = await casd_runs.b5_measure(
            b5_data,
            sizes,
            work,
            root,
            tag=f"-{n}",
            profile=profile / f"b5-{n}.raw" if profile else None,
        )
        shutil.rmtree(b5_data, ignore_errors=True)
        rows = [r for r in rows if r != "b5"]
        if not rows:
            return out
    with contextlib.ExitStack() as stack:
        daemon = stack.enter_context(
            procs.casd_daemon(data, work / f"daemon-{n}.log", *serve_args, root=root)
        )
        # B6 with --daemons N: N-1 more daemons on the same data folder, once the first one
        # has created and migrated it.
        more = tuple(
            stack.enter_context(
                procs.casd_daemon(data, work / f"daemon-{n}-{k}.log", *serve_args, root=root)
            )
            for k in range(1, daemons)
        )
        for row in rows:
            spy = None
            if profile is not None:
                from bench.profile import Spy

                profile.mkdir(parents=True, exist_ok=True)
                spy = Spy(daemon.pid, profile / f"{row}-{n}.raw", gil)
                await asyncio.sleep(1.0)  # let py-spy attach before the phase starts
            if row == "b6":
                out["b6"] = await casd_runs.b6_small_files(daemon, sizes, cache, work, more)
            elif row == "chunks":
                assert big is not None
                out["chunks"] = await casd_runs.chunk_cost(big, work, root)
            elif row == "b1":
                assert big is not None
                for algo in ("md5", "sha256"):
                    out[f"b1_{algo}"] = await casd_runs.b1_fresh_upload(
                        daemon, big, sizes, cache, algo=algo
                    )
            if spy is not None:
                spy.stop()
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    return out


def describe(result: dict) -> list[str]:
    lines = []
    if "b6" in result:
        b = result["b6"]
        lines.append(
            f"B6 {b['files']} files, {b.get('daemons', 1)} daemon(s): {b['files_s']:.0f} files/s, p50 {b['p50_s'] * 1000:.0f} ms,"
            f" p99 {b['p99_s'] * 1000:.0f} ms, daemon CPU {b['daemon_cpu_s']:.2f} s"
            f" (event loop {b.get('daemon_loop_cpu_s', 0):.2f} s),"
            f" client CPU {b['client_cpu_s']:.2f} s, others {b['others_cores']:.2f} cores"
        )
    for algo in ("md5", "sha256"):
        b = result.get(f"b1_{algo}")
        if b is None:
            continue
        gib = b["bytes"] / (1 << 30)
        lines.append(
            f"B1 {algo} {b['bytes'] >> 20} MiB: {b['summary_s']:.2f} s"
            f" (transfer {b['transfer_s']:.2f} s, merge {b['merge_s'] * 1000:.0f} ms),"
            f" daemon CPU {b['daemon_cpu_s'] / gib:.2f} s/GiB,"
            f" others {b['others_cores']:.2f} cores"
        )
    if "chunks" in result:
        b = result["chunks"]
        lines.append(
            f"chunk cost: {b['chunks'][0]} / {b['chunks'][1]} chunks, daemon CPU"
            f" {b['daemon_cpu_s'][0]:.2f} / {b['daemon_cpu_s'][1]:.2f} s: one more chunk costs"
            f" {b['per_chunk_ms']:.2f} ms of daemon CPU ({b['loop_per_chunk_ms']:.2f} ms on its"
            f" event loop) and {b['switches_per_chunk']:.0f} context switches;"
            f" one thread hand-off {b['hop_cpu_us']:.0f} µs of CPU"
        )
    if "b5" in result:
        b = result["b5"]
        lines.append(
            f"B5 {b['n']:,} chunks ({b['manifest_mb']:.1f} MB):"
            f" none stored {b['none_s'] * 1000:.0f} ms (CPU {b['none_cpu_s']:.2f} s),"
            f" again {b['none_again_s'] * 1000:.0f} ms;"
            f" {b['stored']:,} stored {b['stored_s'] * 1000:.0f} ms"
            f" (CPU {b['stored_cpu_s']:.2f} s), again {b['stored_again_s'] * 1000:.0f} ms;"
            f" {b['small_n']:,} chunks {b['small_s'] * 1000:.0f} ms;"
            f" peak RSS {b['peak_rss_mb']:.0f} MB (start {b['rss_start_mb']:.0f});"
            f" others {b['others_cores']:.2f} cores"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hot", description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="b6", help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--root", type=Path, action="append", default=[], help="source tree(s)")
    p.add_argument("--b1-mib", type=int, default=512, help="size of B1's random file")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR")
    p.add_argument(
        "--gil",
        action="store_true",
        help="with --profile: sample only the thread holding the GIL (py-spy --gil)",
    )
    p.add_argument(
        "--b5-blobs",
        action="store_true",
        help="B5: also write the stored chunks' blob files (a handshake reads rows only)",
    )
    p.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `casd serve` (repeatable, e.g. --serve-arg=--io-workers=4)",
    )
    p.add_argument(
        "--daemons",
        type=int,
        default=1,
        help="B6: this many `casd serve` processes on one data folder, the clients in turn"
        " (what one process per core would give)",
    )
    args = p.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if unknown := set(rows) - set(ROWS):
        p.error(f"unknown rows: {', '.join(sorted(unknown))}")
    roots: list[Path | None] = list(args.root) or [None]
    work = Path(tempfile.mkdtemp(prefix="casd-hot-", dir=default_tmp()))
    print(f"`python -m bench.hot {' '.join(argv or [])}`; load average {loadavg()} at start")
    try:
        big = None
        if "b1" in rows or "chunks" in rows:
            big = work / "big.bin"
            casd_runs.write_random_file(big, args.b1_mib << 20)
        n = 0
        for r in range(args.rounds):
            for root in roots:
                n += 1
                log(f"round {r + 1}, daemon from {root or 'this tree'}")
                t = time.perf_counter()
                result = asyncio.run(
                    one_round(
                        rows,
                        root,
                        work,
                        big,
                        n,
                        args.profile,
                        args.serve_arg,
                        args.b5_blobs,
                        args.daemons,
                        args.gil,
                    )
                )
                name = str(root) if root else "this tree"
                for line in describe(result):
                    print(f"round {r + 1} [{name}] {line}", flush=True)
                log(f"round took {time.perf_counter() - t:.1f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average {loadavg()} at end")
    if args.profile is not None:
        from bench.profile import summarize

        for raw in sorted(args.profile.glob("*.raw")):
            text = summarize(raw, top=30)
            (args.profile / (raw.stem + ".txt")).write_text(text)
            print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
