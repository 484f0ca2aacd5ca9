"""`casd gc|fsck|stats|ls|rm|export`: the admin commands, safe beside a running daemon."""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from casd.catalog import TenantUsage, placeholder
from casd.cli_common import (
    CliError,
    add_data_arg,
    catalog_url,
    data_dir,
    safe_text,
    store_settings,
)
from casd.config import Settings
from casd.digest import Digest
from casd.errors import CasdError
from casd.maintenance import GC_BATCH, FsckReport, GcPlan, GcResult, Maintenance
from casd.models import FileEntry, PendingUpload
from casd.protocol import file_url, format_bytes, format_timestamp


def register(sub) -> None:
    p = sub.add_parser(
        "gc",
        help="remove expired uploads and chunks nothing uses",
        description="Drop expired uploads and unused manifests, delete chunks that no complete"
        " file and no live upload uses and that are older than the grace period, delete stale"
        " temp files. Safe while `casd serve` runs on the same data folder.",
    )
    add_data_arg(p)
    p.add_argument(
        "--grace",
        type=_seconds,
        default=3600.0,
        metavar="SECONDS",
        help="keep chunks stored less than this long ago (default 3600)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument(
        "--batch-size",
        type=_positive,
        default=GC_BATCH,
        metavar="N",
        help=f"chunks per transaction; the daemon waits at most one batch (default {GC_BATCH})",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="list every item")
    _add_json(p)
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser(
        "fsck",
        help="check that every blob and catalogue row agree",
        description="Check every blob against its catalogue row (size, xxh3-128; --deep: the"
        " real digest), every chunk of every complete file, and report orphan blob files,"
        " orphan rows and leftover temp files. Exits 1 when it finds any problem.",
    )
    add_data_arg(p)
    p.add_argument(
        "--deep",
        action="store_true",
        help="recompute each blob's md5/sha256 instead of trusting xxh3-128",
    )
    p.add_argument(
        "--workers",
        type=_positive,
        default=None,
        metavar="N",
        help="hashing threads (default: CPUs, at most 4)",
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="move corrupt or missing blobs to DATA/quarantine/ and mark their"
        " chunks absent, so that uploading them again heals the files",
    )
    _add_json(p)
    p.set_defaults(func=cmd_fsck)

    p = sub.add_parser("stats", help="files, bytes, dedup ratio, pending uploads")
    add_data_arg(p)
    _add_tenant(p, "show only this tenant's files and bytes (tenant mode)")
    _add_json(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("uploads", help="list or abort pending uploads")
    usub = p.add_subparsers(dest="uploads_command", metavar="ls|abort", required=True)
    q = usub.add_parser("ls", help="list pending uploads and what they hold")
    add_data_arg(q)
    _add_json(q)
    q.set_defaults(func=cmd_uploads_ls)
    q = usub.add_parser("abort", help="abort pending uploads (safe beside a live daemon)")
    add_data_arg(q)
    q.add_argument("ids", nargs="+", metavar="ID", help="upload ids, as `casd uploads ls` shows")
    _add_json(q)
    q.set_defaults(func=cmd_uploads_abort)

    p = sub.add_parser("ls", help="list complete files")
    add_data_arg(p)
    _add_tenant(p, "list the files this tenant owns, under its names (tenant mode)")
    _add_json(p)
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("rm", help="remove a file (its chunks are left for gc)")
    add_data_arg(p)
    p.add_argument("digest", metavar="DIGEST", help="the file's md5 or sha256")
    _add_tenant(
        p,
        "remove only this tenant's ownership; the file stays while another tenant owns it"
        " (default: the file, for every tenant)",
    )
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("export", help="write a stored file out as a regular file")
    add_data_arg(p)
    p.add_argument("digest", metavar="DIGEST", help="the file's md5 or sha256")
    p.add_argument(
        "path",
        metavar="PATH",
        type=Path,
        help="file to write, or an existing folder to write DIGEST.EXT into",
    )
    p.add_argument("--force", action="store_true", help="replace PATH if it exists")
    p.set_defaults(func=cmd_export)


def _add_tenant(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--tenant", metavar="NAME", help=help)


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError("seconds cannot be negative")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _digest(text: str) -> Digest:
    """A file digest as typed by a person: any case, optionally with its .ext."""
    try:
        return Digest.parse_any(text.strip().split(".", 1)[0])
    except ValueError as exc:
        raise CliError(str(exc), 2) from None


def _run(args: argparse.Namespace, work: Callable[[Maintenance], Awaitable[int]]) -> int:
    """Open the data folder, run `work`, close; every failure becomes one line."""
    settings = Settings(data_dir=data_dir(args), catalog=catalog_url(args), **store_settings(args))

    async def main() -> int:
        m = await Maintenance.open(settings)
        try:
            return await work(m)
        finally:
            await m.close()

    try:
        return asyncio.run(main())
    except CliError:
        raise
    except CasdError as exc:
        raise CliError(exc.message) from None
    except sqlite3.Error as exc:
        raise CliError(f"catalogue {settings.catalog_path}: {exc}") from None
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise CliError(f"{exc.strerror or exc}{where}") from None
    except Exception as exc:  # a bug: still one line, never a traceback
        raise CliError(f"internal error: {type(exc).__name__}: {exc}") from None


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


# ---- gc ---------------------------------------------------------------------------------


def _plan_json(plan: GcPlan) -> dict:
    return {
        "grace": plan.grace,
        "expired_uploads": [u for u, _ in plan.expired_uploads],
        "unused_manifests": len(plan.unused_manifests),
        "chunks": [
            {"algo": c.digest.algo.value, "digest": c.digest.hex, "size": c.size}
            for c in (*plan.unfinished, *plan.chunks)
        ],
        "chunk_bytes": plan.chunk_bytes,
        "temp_files": [{"path": str(t.path), "size": t.size} for t in plan.temp_files],
        "orphan_blobs": [
            {"algo": b.digest.algo.value, "digest": b.digest.hex, "size": b.size}
            for b in plan.orphans
        ],
        "quarantined_rows": plan.quarantined,
        "bytes": plan.bytes,
    }


def _result_json(r: GcResult) -> dict:
    return {
        "uploads": r.uploads,
        "manifests": r.manifests,
        "chunks": [
            {"algo": c.digest.algo.value, "digest": c.digest.hex, "size": c.size} for c in r.chunks
        ],
        "kept": r.kept,
        "temp_files": [str(t.path) for t in r.temp_files],
        "orphan_blobs": [b.digest.hex for b in r.orphans],
        "quarantined_rows": r.quarantined,
        "bytes_freed": r.bytes_freed,
        "seconds": round(r.seconds, 3),
    }


def _plan_text(plan: GcPlan, verbose: bool) -> None:
    n_chunks = len(plan.chunks) + len(plan.unfinished)
    unfinished = (
        f", {len(plan.unfinished)} of them left by an interrupted gc" if plan.unfinished else ""
    )
    print(
        f"plan (grace {plan.grace:g} s): {len(plan.expired_uploads)} expired uploads,"
        f" {len(plan.unused_manifests)} unused manifests, {n_chunks} chunks"
        f" ({format_bytes(plan.chunk_bytes)}{unfinished}), {len(plan.temp_files)} stale temp files"
        f" ({format_bytes(plan.temp_bytes)}), {len(plan.orphans)} orphan blob files"
        f" ({format_bytes(plan.orphan_bytes)})"
    )
    if verbose:
        for uid, size in plan.expired_uploads:
            print(f"  upload {uid} ({size} bytes)")
        for c in (*plan.unfinished, *plan.chunks):
            print(f"  chunk {c.digest.algo.value} {c.digest.hex} {c.size}")
        for t in plan.temp_files:
            print(f"  temp {t.path} {t.size}")
        for b in plan.orphans:
            print(f"  orphan {b.digest.algo.value} {b.digest.hex} {b.size}")


def cmd_gc(args: argparse.Namespace) -> int:
    async def work(m: Maintenance) -> int:
        plan = await m.gc_plan(args.grace)
        if args.dry_run:
            if args.json:
                _print_json({"dry_run": True, "plan": _plan_json(plan)})
            else:
                _plan_text(plan, args.verbose)
                print(
                    f"dry run: nothing changed; would free up to {format_bytes(plan.bytes)}"
                    f" ({plan.bytes} bytes)"
                )
            return 0
        if not args.json:
            _plan_text(plan, args.verbose)
            sys.stdout.flush()
        result = await m.gc_execute(plan, args.batch_size)
        if args.json:
            _print_json(
                {"dry_run": False, "plan": _plan_json(plan), "removed": _result_json(result)}
            )
        else:
            kept = f"; {result.kept} chunks kept (in use again)" if result.kept else ""
            print(
                f"removed {result.uploads} uploads, {result.manifests} manifests,"
                f" {len(result.chunks)} chunks, {len(result.temp_files)} temp files,"
                f" {len(result.orphans)} orphan blob files{kept};"
                f" freed {format_bytes(result.bytes_freed)} ({result.bytes_freed} bytes)"
                f" in {result.seconds:.2f} s"
            )
        return 0

    return _run(args, work)


# ---- fsck -------------------------------------------------------------------------------


def _fsck_json(r: FsckReport) -> dict:
    return {
        "ok": r.ok,
        "deep": r.deep,
        "issues": [_issue_json(i) for i in r.issues],
        "notes": [_issue_json(i) for i in r.notes],
        "quarantined": list(r.quarantined),
        "blobs_checked": r.blobs_checked,
        "bytes_checked": r.bytes_checked,
        "seconds": round(r.seconds, 3),
        "deleting_chunks": r.deleting,
        "temp_files_in_flight": r.temp_in_flight,
    }


def _issue_json(i) -> dict:
    return {"kind": i.kind, "digest": i.digest, "detail": i.detail, "files": list(i.files)}


def cmd_fsck(args: argparse.Namespace) -> int:
    async def work(m: Maintenance) -> int:
        r = await m.fsck(deep=args.deep, workers=args.workers, repair=args.repair)
        if args.json:
            _print_json(_fsck_json(r))
            return 0 if r.ok else 1
        for i in r.issues:
            # File names in the detail are whatever clients sent: escape what a terminal obeys.
            line = f"{i.kind:<13} {i.digest or '-'}  {safe_text(i.detail)}"
            if i.files:
                line += f"; files: {', '.join(safe_text(f) for f in i.files)}"
            print(line)
        for i in r.notes:
            print(
                f"note: {i.kind} {i.digest or '-'}  {i.detail}; casd gc removes it once it"
                " is older than the grace period (not a problem)"
            )
        if r.quarantined:
            print(
                f"repaired: {len(r.quarantined)} chunk(s) moved to"
                f" {m.blobs.quarantine_location} and marked absent; uploading the files"
                " that use them again heals them"
            )
        how = (
            "md5/sha256 and xxh3-128"
            if r.deep
            else ("xxh3-128" if m.blobs.quick_rehash else "size (--deep rehashes)")
        )
        rate = r.bytes_checked / r.seconds / (1 << 20) if r.seconds else 0.0
        extra = ""
        if r.deleting:
            extra += f"; {r.deleting} chunks being deleted by gc (not a problem)"
        if r.temp_in_flight:
            extra += f"; {r.temp_in_flight} temp files in flight (not a problem)"
        verdict = f"{len(r.issues)} problem(s)" if r.issues else "no problems"
        print(
            f"fsck: {r.blobs_checked} blobs ({format_bytes(r.bytes_checked)}) checked by {how} in"
            f" {r.seconds:.2f} s ({rate:.0f} MiB/s){extra}; {verdict}"
        )
        return 0 if r.ok else 1

    return _run(args, work)


# ---- stats, ls, rm, export --------------------------------------------------------------


def _tenant_json(u: TenantUsage) -> dict:
    return {
        "files": u.files,
        "logical_bytes": u.logical_bytes,
        "pending_uploads": u.pending_uploads,
        "pending_bytes": u.pending_bytes,
    }


def _tenant_stats(name: str, u: TenantUsage, as_json: bool) -> int:
    if as_json:
        _print_json({"tenant": name, **_tenant_json(u)})
        return 0
    rows = [
        ("tenant", safe_text(name)),
        ("files owned", f"{u.files}"),
        ("logical bytes", f"{format_bytes(u.logical_bytes)} ({u.logical_bytes})"),
        ("pending uploads", f"{u.pending_uploads} ({format_bytes(u.pending_bytes)})"),
    ]
    for k, v in rows:
        print(f"{k + ':':<24}{v}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    async def work(m: Maintenance) -> int:
        tenants = await m.tenants()
        if args.tenant is not None:
            return _tenant_stats(args.tenant, tenants.get(args.tenant, TenantUsage()), args.json)
        s = await m.stats()
        # What deduplication saves: every tenant's files counted for each owner (or, without
        # tenants, every file once), against the bytes stored once for all of them.
        logical = sum(u.logical_bytes for u in tenants.values()) if tenants else s.logical_bytes
        saved = max(logical - s.physical_bytes, 0)
        if args.json:
            _print_json(
                {
                    "tenants": {name: _tenant_json(u) for name, u in tenants.items()},
                    "tenant_logical_bytes": logical,
                    "saved_bytes": saved,
                    "files": s.files,
                    "logical_bytes": s.logical_bytes,
                    "chunks": s.chunks,
                    "physical_bytes": s.physical_bytes,
                    "dedup_ratio": round(s.dedup_ratio, 4),
                    "pending_uploads": s.pending_uploads,
                    "pending_bytes": s.pending_bytes,
                    "expired_uploads": s.expired_uploads,
                    "deleting_chunks": s.deleting_chunks,
                    "pending_chunk_entries": s.pending_entries,
                    "pending_catalog_bytes": s.pending_catalog_bytes,
                    "catalog_bytes": s.catalog_bytes,
                    "quarantined_chunks": s.quarantined_chunks,
                }
            )
            return 0
        rows = [
            ("complete files", f"{s.files}"),
            ("logical bytes", f"{format_bytes(s.logical_bytes)} ({s.logical_bytes})"),
            ("distinct chunks", f"{s.chunks}"),
            ("physical bytes", f"{format_bytes(s.physical_bytes)} ({s.physical_bytes})"),
            ("dedup ratio", f"{s.dedup_ratio:.2f}"),
            (
                "pending uploads",
                f"{s.pending_uploads} ({format_bytes(s.pending_bytes)}, {s.pending_bytes} bytes)",
            ),
            (
                "pending chunk entries",
                f"{s.pending_entries} (~{format_bytes(s.pending_catalog_bytes)} of catalogue)",
            ),
            ("catalogue size", f"{format_bytes(s.catalog_bytes)} ({s.catalog_bytes})"),
        ]
        for name, u in tenants.items():
            rows.append(
                (
                    f"tenant {safe_text(name)}",
                    f"{u.files} files, {format_bytes(u.logical_bytes)} ({u.logical_bytes})",
                )
            )
        share = f", {saved / logical:.0%} of {format_bytes(logical)}" if logical else ""
        rows.append(("saved by dedup", f"{format_bytes(saved)} ({saved}){share}"))
        if s.quarantined_chunks:
            rows.append(("quarantined chunks", f"{s.quarantined_chunks} (re-upload heals)"))
        if s.expired_uploads:
            rows.append(("expired uploads", f"{s.expired_uploads} (casd gc drops them)"))
        if s.deleting_chunks:
            rows.append(("chunks being deleted", f"{s.deleting_chunks}"))
        for k, v in rows:
            print(f"{k + ':':<24}{v}")
        return 0

    return _run(args, work)


def _streaming(u: PendingUpload) -> bool:
    """A v1.1 streamed upload still open: its digest comes at merge."""
    return u.digest == placeholder(u.digest.algo)


def _upload_json(u: PendingUpload, now: float) -> dict:
    return {
        "id": u.id,
        "algo": u.digest.algo.value,
        "digest": None if _streaming(u) else u.digest.hex,
        "streaming": _streaming(u),
        "size": u.size,
        "chunk_entries": u.entries,
        "name": u.name,
        "created": format_timestamp(u.created),
        "expires_at": format_timestamp(u.expires_at),
        "expired": u.expires_at <= now,
        "client": u.client,
    }


def cmd_uploads_ls(args: argparse.Namespace) -> int:
    async def work(m: Maintenance) -> int:
        ups = await m.uploads()
        now = time.time()
        if args.json:
            _print_json([_upload_json(u, now) for u in ups])
            return 0
        for u in ups:
            expired = " (expired)" if u.expires_at <= now else ""
            print(
                f"{u.id}  {'(streaming: digest at merge)' if _streaming(u) else u.digest.hex}"
                f"  {u.size:>14}  {u.entries:>8} entries"
                f"  {format_timestamp(u.created)}  {format_timestamp(u.expires_at)}{expired}  {u.client or '-'}"
            )
        return 0

    return _run(args, work)


def cmd_uploads_abort(args: argparse.Namespace) -> int:
    ids = list(dict.fromkeys(args.ids))

    async def work(m: Maintenance) -> int:
        found = await m.abort_uploads(ids)
        unknown = [i for i in ids if i not in found]
        if args.json:
            _print_json({"aborted": found, "unknown": unknown})
        else:
            for uid in found:
                print(f"aborted {uid}")
        for uid in unknown:
            print(f"casd uploads abort: no pending upload {uid!r}", file=sys.stderr)
        return 1 if unknown else 0

    return _run(args, work)


def _file_json(f: FileEntry) -> dict:
    return {
        "algo": f.digest.algo.value,
        "digest": f.digest.hex,
        "size": f.size,
        "ext": f.ext,
        "name": f.name,
        "created": format_timestamp(f.created),
        "url": file_url(f.digest, f.ext),
    }


def cmd_ls(args: argparse.Namespace) -> int:
    async def work(m: Maintenance) -> int:
        files = await m.ls(args.tenant)
        if args.json:
            _print_json([_file_json(f) for f in files])
            return 0
        for f in files:
            name = safe_text(f.name) if f.name else "-"
            print(f"{f.digest.hex}{f.ext}  {f.size:>14}  {format_timestamp(f.created)}  {name}")
        return 0

    return _run(args, work)


def cmd_rm(args: argparse.Namespace) -> int:
    digest = _digest(args.digest)

    async def work(m: Maintenance) -> int:
        await m.rm(digest, args.tenant)
        if args.tenant is not None:
            print(
                f"removed tenant {safe_text(args.tenant)}'s ownership of {digest.hex}; the file"
                " goes once no tenant owns it, its chunks once nothing uses them (casd gc)"
            )
            return 0
        print(f"removed {digest.hex}; its chunks are garbage once nothing else uses them (casd gc)")
        return 0

    return _run(args, work)


def cmd_export(args: argparse.Namespace) -> int:
    digest = _digest(args.digest)

    async def work(m: Maintenance) -> int:
        entry, dest = await m.export(digest, args.path, args.force)
        print(f"wrote {dest} ({entry.size} bytes)")
        return 0

    return _run(args, work)
