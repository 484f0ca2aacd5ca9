"""The one markdown table: each casd figure, the machine limit it is compared to, the ratio."""

from __future__ import annotations

from dataclasses import dataclass

from bench.casd_runs import Sizes
from bench.limits import Limits, mb_s

MiB = 1 << 20


@dataclass(frozen=True)
class Row:
    key: str
    figure: str
    value: str
    limit: str = "—"
    ratio: str = "—"
    target: str = "—"
    verdict: str = ""


def _size(n: int) -> str:
    if n >= 1 << 30 and n % (1 << 30) == 0:
        return f"{n >> 30} GiB"
    if n >= MiB and n % MiB == 0:
        return f"{n // MiB} MiB"
    if n >= 1 << 30:
        return f"{n / (1 << 30):.3f} GiB"
    if n >= MiB:
        return f"{n / MiB:.2f} MiB"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024} KiB"
    return f"{n} B"


def _ms(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 10 else f"{s:.1f} s"


def _verdict(ok: bool, note: str = "") -> str:
    word = "met" if ok else "**gap**"
    return f"{word}; {note}" if note else word


def disk_mb_s(lim: Limits) -> float:
    """The fsynced write speed a chunked upload can have here: the better of L3 and L3b."""
    return max(lim.fsync_write_mb_s, lim.fsync_write_parallel_mb_s)


def floor_seconds(size: int, hash_mb_s: float, disk: float) -> float:
    """About the fastest a fresh upload can be here, from the limits measured in this run.

    The client hashes every byte twice (file and chunk digests) on two cores before the
    handshake; then the server hashes every byte twice (chunk check, file check) on two
    cores while it writes the chunks to disk with fsync. So: one hash pass, then the longer
    of one hash pass and the fsynced write (`disk` MB/s). Issue 13's B1 rows are this floor
    over the measured seconds (1.0: at the floor).
    """
    one_pass = size / hash_mb_s / 1e6
    return one_pass + max(one_pass, size / disk / 1e6)


def two_machine_floor(size: int, md5_mb_s: float, disk: float) -> float:
    """The slower side's floor with client and daemon on one core each (issue 13): the
    client's two MD5 passes, or the daemon's two MD5 passes plus the fsynced write; the
    daemon's is the longer, by the write."""
    return 2 * size / md5_mb_s / 1e6 + size / disk / 1e6


def limit_rows(lim: Limits, sizes: Sizes) -> list[Row]:
    return [
        Row("L1", "MD5, one core (hashlib)", f"{lim.md5_mb_s:.0f} MB/s", verdict="machine limit"),
        Row(
            "L2",
            "SHA-256, one core (hashlib)",
            f"{lim.sha256_mb_s:.0f} MB/s",
            verdict="machine limit",
        ),
        Row(
            "L3",
            f"sequential write of {_size(sizes.chunk_size)} files, fsync each",
            f"{lim.fsync_write_mb_s:.0f} MB/s",
            verdict=f"machine limit; {lim.fsync_write_cpu_s_per_gib:.2f} CPU s per GiB",
        ),
        Row(
            "L3b",
            f"the same from {sizes.concurrency} threads at once (casd's chunk concurrency)",
            f"{lim.fsync_write_parallel_mb_s:.0f} MB/s",
            verdict="machine limit (extra); "
            f"{lim.fsync_write_parallel_cpu_s_per_gib:.2f} CPU s per GiB",
        ),
        Row(
            "L3c",
            f"{_size(sizes.small_file_bytes)} files written + fsynced, one thread",
            f"{lim.small_fsync_files_s:.0f} files/s",
            verdict="machine limit (extra: one fsync's cost, for B5 prep and B6)",
        ),
        Row(
            "L4",
            f"plain aiohttp PUT to a discarding server ({_size(sizes.chunk_size)} bodies,"
            f" {sizes.concurrency} at a time)",
            f"{lim.put_mb_s:.0f} MB/s",
            verdict="machine limit: loopback HTTP ceiling; the server (asyncio) spends "
            f"{lim.put_server_cpu_s_per_gib:.2f} CPU s per GiB received",
        ),
        Row(
            "L5",
            f"plain aiohttp web.FileResponse download of the {_size(sizes.file_bytes)} file"
            " (raw socket reader)",
            f"{lim.fileresponse_mb_s:.0f} MB/s",
            verdict="machine limit; by server loop: "
            + ", ".join(f"{loop} {v:.0f} MB/s" for loop, v in lim.fileresponse_by_loop.items())
            + " (uvloop has no loop.sendfile: aiohttp falls back to read + write)",
        ),
    ]


def two_machine_row(lim: Limits, sizes: Sizes, runs: list[dict] | None) -> Row:
    """B1 "two machines": the client pinned to one core and the daemon to the other."""
    figure = '… "two machines": client on one core, daemon on the other (taskset), MD5'
    if not runs:
        return Row("B1", figure, "skipped", verdict="needs taskset and two cores")
    best = min(runs, key=lambda x: x["seconds"])
    floor = two_machine_floor(sizes.file_bytes, lim.md5_mb_s, disk_mb_s(lim))
    ratio = floor / best["seconds"]
    return Row(
        "B1",
        figure,
        f"{best['seconds']:.2f} s",
        f"slower side's floor {floor:.2f} s",
        f"{ratio:.2f}",
        "≥ 0.8 of the floor",
        _verdict(
            ratio >= 0.8,
            f"protocol {best['protocol']}; daemon CPU {best['daemon_cpu_s']:.1f} s, client "
            f"hashing {best['hash_s']:.2f} s; best of {len(runs)}",
        ),
    )


def casd_rows(lim: Limits, sizes: Sizes, r: dict) -> list[Row]:
    rows: list[Row] = []
    size = sizes.file_bytes
    b1 = r["b1"]
    e2e = mb_s(size, b1["summary_s"])
    floor = floor_seconds(size, lim.md5_mb_s, disk_mb_s(lim))
    rows.append(
        Row(
            "B1",
            f"fresh upload of {_size(size)} ({_size(sizes.chunk_size)} chunks, "
            f"concurrency {sizes.concurrency}): end to end",
            f"{b1['summary_s']:.2f} s = {e2e:.0f} MB/s",
            f"floor {floor:.2f} s (L1, L3/L3b)",
            f"{floor / b1['summary_s']:.2f}",
            "≥ 0.85 of the floor",
            _verdict(
                floor / b1["summary_s"] >= 0.85,
                f"{e2e / lim.md5_mb_s:.2f} of MD5 {lim.md5_mb_s:.0f} MB/s; "
                f"daemon CPU {b1['daemon_cpu_s']:.1f} s, client CPU "
                f"{b1['client_cpu_s']:.1f} s",
            ),
        )
    )
    h = mb_s(size, b1["hash_s"])
    rows.append(
        Row(
            "B1",
            "… of which client hashing (file + chunk digests, one read)",
            f"{b1['hash_s']:.2f} s = {h:.0f} MB/s",
            f"MD5 {lim.md5_mb_s:.0f} MB/s",
            f"{h / lim.md5_mb_s:.2f}",
            "≈ 1 (two cores: whole + chunks)",
            "informational",
        )
    )
    tr = mb_s(size, b1["transfer_s"])
    rows.append(
        Row(
            "B1",
            "… of which transfer (handshake + chunk PUTs)",
            f"{b1['transfer_s']:.2f} s = {tr:.0f} MB/s",
            f"PUT {lim.put_mb_s:.0f} MB/s",
            f"{tr / lim.put_mb_s:.2f}",
            "—",
            "server hashes + writes + fsyncs every byte; fsynced write L3 "
            f"{lim.fsync_write_mb_s:.0f}, L3b {lim.fsync_write_parallel_mb_s:.0f} MB/s",
        )
    )
    rows.append(
        Row(
            "B1",
            "… of which merge, after the last chunk's answer",
            _ms(b1["merge_s"]),
            "—",
            "—",
            "near-instant (< 100 ms)",
            _verdict(
                b1["merge_s"] < 0.1,
                "whole-file hash overlapped with the upload"
                if b1["merge_s"] < 0.1
                else "merge still hashes a tail / full pass",
            ),
        )
    )
    s256 = r["b1_sha256"]
    e2e256 = mb_s(size, s256["summary_s"])
    floor256 = floor_seconds(size, lim.sha256_mb_s, disk_mb_s(lim))
    rows.append(
        Row(
            "B1",
            "… the same with `algo: sha256` (SHA-NI): end to end",
            f"{s256['summary_s']:.2f} s = {e2e256:.0f} MB/s",
            f"floor {floor256:.2f} s (L2, L3/L3b)",
            f"{floor256 / s256['summary_s']:.2f}",
            "≥ 0.7 of the floor",
            _verdict(
                floor256 / s256["summary_s"] >= 0.7,
                f"{e2e256 / lim.sha256_mb_s:.2f} of SHA-256 {lim.sha256_mb_s:.0f} MB/s; "
                f"hashing {s256['hash_s']:.2f} s, transfer {s256['transfer_s']:.2f} s, "
                f"merge {_ms(s256['merge_s'])}",
            ),
        )
    )
    rows.append(two_machine_row(lim, sizes, r.get("b1_2m")))
    gib = size / (1 << 30)
    # What any aiohttp daemon that receives, stores and hashes twice spends, measured here.
    plain = lim.put_server_cpu_s_per_gib + min(
        lim.fsync_write_cpu_s_per_gib, lim.fsync_write_parallel_cpu_s_per_gib
    )
    for algo, run, speed in (("MD5", b1, lim.md5_mb_s), ("SHA-256", s256, lim.sha256_mb_s)):
        per_gib = run["daemon_cpu_s"] / gib
        passes = 2 * (1 << 30) / speed / 1e6
        rows.append(
            Row(
                "B1",
                f"… daemon CPU seconds per GiB ingested, {algo}",
                f"{per_gib:.2f} s",
                f"two {algo} passes + 0.5 s = {passes + 0.5:.2f} s",
                f"{(passes + 0.5) / per_gib:.2f}",
                "≤ two hash passes + 0.5 s",
                _verdict(
                    per_gib <= passes + 0.5,
                    f"`casd serve`'s user + system CPU; two passes + receiving (L4's server) +"
                    f" fsynced writing (the cheaper of L3, L3b) = {passes + plain:.2f} s",
                ),
            )
        )
    b2 = r["b2"]
    over = b2["bypass_summary_s"] - b2["bypass_hash_s"]
    rows.append(
        Row(
            "B2",
            "re-upload (instant), digest cache bypassed: total",
            f"{b2['bypass_summary_s']:.2f} s (hashing {b2['bypass_hash_s']:.2f} s)",
            f"MD5 {lim.md5_mb_s:.0f} MB/s = {size / lim.md5_mb_s / 1e6:.2f} s",
            f"{b2['bypass_summary_s'] / (size / lim.md5_mb_s / 1e6):.2f}",
            "≤ hashing + 50 ms",
            _verdict(over <= 0.05, f"beyond hashing: {_ms(over)}"),
        )
    )
    rows.append(
        Row(
            "B2",
            "re-upload (instant), digest cache warm: total",
            _ms(b2["warm_summary_s"]),
            "—",
            "—",
            "< 100 ms",
            _verdict(
                b2["warm_summary_s"] < 0.1 and b2["warm_cached"],
                f"with client setup/teardown {_ms(b2['warm_wall_s'])}"
                + ("" if b2["warm_cached"] else "; the cache missed"),
            ),
        )
    )
    b3 = r["b3"]
    worst = 2 * sizes.chunk_size
    rows.append(
        Row(
            "B3",
            f"{_size(b3['overwrite_changed'])} region overwritten mid-file: bytes sent",
            f"{_size(b3['overwrite_sent'])} ({b3['overwrite_chunks_sent']} of "
            f"{b3['overwrite_chunks_total']} chunks)",
            f"{_size(b3['overwrite_changed'])} changed",
            f"{b3['overwrite_sent'] / b3['overwrite_changed']:.2f}",
            "≤ 2 chunks (region straddles two)",
            _verdict(b3["overwrite_sent"] <= worst, f"{b3['overwrite_s']:.2f} s incl. hashing"),
        )
    )
    rows.append(
        Row(
            "B3",
            "1 KiB inserted at the front: bytes sent",
            f"{_size(b3['insert_sent'])} ({b3['insert_chunks_sent']} of "
            f"{b3['insert_chunks_total']} chunks)",
            "1 KiB changed",
            f"{b3['insert_sent'] / b3['insert_changed']:.0f} "
            f"({b3['insert_sent'] / b3['insert_size']:.0%} of the file)",
            "none (expected: everything)",
            "fixed-size chunking resends everything after an insertion (every boundary"
            " shifts); FastCDC resends about one chunk: see B3c",
        )
    )
    b4 = r["b4"]
    gr = b4["get_mb_s"] / lim.fileresponse_mb_s
    rows.append(
        Row(
            "B4",
            f"download of the {_size(size)} file (raw socket GET, body dropped)",
            f"{b4['get_mb_s']:.0f} MB/s",
            f"FileResponse {lim.fileresponse_mb_s:.0f} MB/s",
            f"{gr:.2f}",
            "≥ 0.8",
            _verdict(gr >= 0.8),
        )
    )
    rows.append(
        Row(
            "B4",
            "… with the client (writes, fsyncs, verifies MD5)",
            f"{b4['client_mb_s']:.0f} MB/s",
            f"FileResponse {lim.fileresponse_mb_s:.0f} MB/s",
            f"{b4['client_mb_s'] / lim.fileresponse_mb_s:.2f}",
            "—",
            f"informational; bounded by MD5 {lim.md5_mb_s:.0f} MB/s on one core",
        )
    )
    b5 = r["b5"]
    n = b5["n"]
    tb = (
        f"{n * sizes.chunk_size / 1e12:.2f} TB"
        if n * sizes.chunk_size >= 1e12
        else f"{n * sizes.chunk_size / 1e9:.0f} GB"
    )
    rows.append(
        Row(
            "B5",
            f"handshake, {n:,}-chunk manifest ({tb} at {_size(sizes.chunk_size)}), none stored",
            _ms(b5["none_s"]),
            "—",
            "—",
            "< 1 s",
            _verdict(
                b5["none_s"] < 1,
                f"{b5['manifest_mb']:.1f} MB of JSON; "
                f"same manifest again (resume) {_ms(b5['none_again_s'])}",
            ),
        )
    )
    rows.append(
        Row(
            "B5",
            f"handshake, {n:,} chunks of which {b5['stored']:,} stored",
            _ms(b5["stored_s"]),
            "—",
            "—",
            "< 1 s",
            _verdict(
                b5["stored_s"] < 1,
                f"stored chunks are 8 B each (cost is per chunk, not per byte); "
                f"again {_ms(b5['stored_again_s'])}",
            ),
        )
    )
    lin = b5["us_per_chunk_none"] / b5["us_per_chunk_small"]
    rows.append(
        Row(
            "B5",
            f"handshake cost per chunk at {n:,} vs {b5['small_n']:,} chunks",
            f"{b5['us_per_chunk_none']:.1f} vs {b5['us_per_chunk_small']:.1f} µs",
            "—",
            f"{lin:.2f}",
            "linear (≈ 1, ≤ 1.5)",
            _verdict(lin <= 1.5),
        )
    )
    rows.append(
        Row(
            "B5",
            "daemon peak RSS during the B5 handshakes (VmHWM)",
            f"{b5['peak_rss_mb']:.0f} MB",
            "—",
            "—",
            "< 200 MB",
            _verdict(b5["peak_rss_mb"] < 200, f"{b5['rss_start_mb']:.0f} MB at start"),
        )
    )
    rows.append(
        Row(
            "B5",
            f"setup: {b5['stored']:,} distinct 8-byte chunks uploaded with the client",
            f"{b5['prep_chunks_s']:.0f} chunks/s",
            "—",
            "—",
            "—",
            f"informational; {b5['prep_s']:.0f} s, data folder on "
            f"{'tmpfs, then copied to disk' if b5['prep_on_tmpfs'] else 'disk'}",
        )
    )
    b6 = r["b6"]
    rows.append(
        Row(
            "B6",
            f"{b6['files']} concurrent uploads of distinct {_size(sizes.small_file_bytes)} files",
            f"{b6['files_s']:.0f} files/s",
            f"L3c {lim.small_fsync_files_s:.0f} files/s",
            f"{b6['files_s'] / lim.small_fsync_files_s:.2f}",
            "≥ 1,000 files/s",
            _verdict(
                b6["files_s"] >= 1000,
                f"daemon CPU {b6['daemon_cpu_s']:.1f} s, client CPU "
                f"{b6['client_cpu_s']:.1f} s in {b6['wall_s']:.2f} s",
            ),
        )
    )
    rows.append(
        Row(
            "B6",
            "… latency per upload p50 / p99",
            f"{_ms(b6['p50_s'])} / {_ms(b6['p99_s'])}",
            "—",
            "—",
            "p99 < 250 ms",
            _verdict(b6["p99_s"] < 0.25, f"max {_ms(b6['max_s'])}"),
        )
    )
    rows.append(
        Row(
            "B7",
            f"daemon peak RSS during B1 ({_size(size)} upload)",
            f"{b1['peak_rss_mb']:.0f} MB",
            "—",
            "—",
            "< 150 MB",
            _verdict(
                b1["peak_rss_mb"] < 150,
                f"{b1['peak_rss_source']}; sampled VmRSS max "
                f"{b1['sampled_rss_max_mb']:.0f} / mean "
                f"{b1['sampled_rss_mean_mb']:.0f} MB ({b1['rss_samples']} samples);"
                f" {b1['rss_before_mb']:.0f} MB before",
            ),
        )
    )
    rows.append(
        Row(
            "B7",
            "daemon peak RSS during B6",
            f"{b6['peak_rss_mb']:.0f} MB",
            "—",
            "—",
            "< 150 MB",
            _verdict(
                b6["peak_rss_mb"] < 150, f"sampled VmRSS max {b6['sampled_rss_max_mb']:.0f} MB"
            ),
        )
    )
    return rows


def b1c_rows(sizes: Sizes, r: dict) -> list[Row]:
    """B1c: a fresh upload under each rule against fixed 5 MiB chunks, by the best wall time
    and by the median CPU seconds (client and daemon); the default's 5% applies to both."""
    rows: list[Row] = []
    size = sizes.file_bytes
    fresh = r["b1c"]
    base = fresh["fixed 5 MiB"]
    for name, f in fresh.items():
        measured = (
            f"{f['seconds']:.2f} s = {mb_s(size, f['seconds']):.0f} MB/s, {f['cpu_s']:.2f} CPU s"
        )
        if name == "fixed 5 MiB":
            rows.append(
                Row(
                    "B1c",
                    f"fresh upload of {_size(size)}, {name} ({f['chunks']} chunks)",
                    measured,
                    "—",
                    "1.00",
                    "the reference",
                    "informational",
                )
            )
            continue
        wall = f["seconds"] / base["seconds"]
        cpu = f["cpu_s"] / base["cpu_s"]
        rows.append(
            Row(
                "B1c",
                f"… {name} ({f['chunks']} chunks)",
                measured,
                f"fixed 5 MiB {base['seconds']:.2f} s, {base['cpu_s']:.2f} CPU s",
                f"{wall:.2f} wall, {cpu:.2f} CPU",
                "≤ 1.05 (both) to be the default",
                _verdict(
                    wall <= 1.05 and cpu <= 1.05,
                    f"hashing {f['hash_s']:.2f} s, transfer {f['transfer_s']:.2f} s",
                ),
            )
        )
    return rows


def cdc_rows(sizes: Sizes, r: dict) -> list[Row]:
    """Rows of bench/cdc_runs.py: FastCDC uploads and chunked downloads."""
    rows = b1c_rows(sizes, r)
    size = sizes.file_bytes
    b3 = r["b3c"]
    avg = _size(r["avg"])
    rows.append(
        Row(
            "B3c",
            f"FastCDC {avg}: {_size(b3['overwrite_changed'])} overwritten mid-file: chunks sent",
            f"{b3['overwrite_chunks_sent']} of {b3['chunks_total']} "
            f"({_size(b3['overwrite_sent'])})",
            f"{b3['overwrite_touched']} touched (bytes or boundaries changed), of which "
            f"{b3['overwrite_overlap']} overlap the region and {b3['overwrite_after']} follow it",
            "—",
            "≤ the chunks it touches",
            _verdict(
                b3["overwrite_chunks_sent"] <= b3["overwrite_touched"],
                ""
                if b3["overwrite_after"] == 0
                else "FastCDC's cuts fall back in step with the old ones only some "
                "chunks after an edit, so chunks after the region are touched too "
                "(docs/chunking.md)",
            ),
        )
    )
    rows.append(
        Row(
            "B3c",
            f"FastCDC {avg}: 1 KiB inserted at the front: chunks sent",
            f"{b3['insert_chunks_sent']} of {b3['chunks_total']} ({_size(b3['insert_sent'])})",
            "1 KiB changed",
            "—",
            "≤ 3 chunks",
            _verdict(b3["insert_chunks_sent"] <= 3),
        )
    )
    b8 = r["b8"]
    ratio = b8["client_mb_s"] / b8["plain_mb_s"]
    rows.append(
        Row(
            "B8",
            f"verified client download of {_size(size)} (5 MiB chunks, fetched in runs by "
            "Range, each chunk verified)",
            f"{b8['client_mb_s']:.0f} MB/s",
            f"plain GET to disk + fsync {b8['plain_mb_s']:.0f} MB/s",
            f"{ratio:.2f}",
            "≥ 0.8",
            _verdict(ratio >= 0.8),
        )
    )
    b9 = r["b9"]
    rows.append(
        Row(
            "B9",
            f"download of the edited {_size(size)} file (FastCDC {avg}; 1 KiB "
            "inserted + 5 MiB overwritten) with --reuse of the old one",
            f"{_size(b9['bytes_fetched'])} fetched ({b9['chunks_fetched']} of "
            f"{b9['chunks_total']} chunks) in {b9['seconds']:.2f} s",
            f"{_size(b9['size'])} file",
            f"{b9['bytes_fetched'] / b9['size']:.3f}",
            "≤ the chunks the edits touch (B3c) + 3",
            _verdict(
                b9["byte_exact"] and b9["chunks_fetched"] <= b3["overwrite_touched"] + 3,
                "byte-exact" if b9["byte_exact"] else "NOT byte-exact",
            ),
        )
    )
    c1 = r["c1"]
    rows.append(
        Row(
            "C1",
            f"FastCDC {avg} cut in Python (pyfastcdc), in memory",
            f"{c1['fastcdc_mb_s']:.0f} MB/s",
            f"MD5 {c1['md5_mb_s']:.0f} MB/s",
            f"{c1['fastcdc_mb_s'] / c1['md5_mb_s']:.2f}",
            "> 1 (cheaper than hashing)",
            _verdict(
                c1["fastcdc_mb_s"] > c1["md5_mb_s"],
                "the browser's fastcdc.js: see docs/chunking.md (slow-marked throughput test)",
            ),
        )
    )
    return rows


def render(rows: list[Row]) -> str:
    head = ["#", "figure", "casd / value", "machine limit", "ratio", "target", "met? / note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.key, r.figure, r.value, r.limit, r.ratio, r.target, r.verdict]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
