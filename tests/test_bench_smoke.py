"""`python -m bench --quick` runs end to end and prints the one table with every figure.

Only the shape of the output is checked: benchmark numbers are never asserted in tests,
because they depend on the machine and its load (bench/RESULTS.md holds measured ones).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


# Slow: the whole bench at --quick, half a minute.
@pytest.mark.slow
def test_quick_bench_prints_the_table_with_every_row(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--tmp", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| # | figure | casd / value | machine limit | ratio | target | met? / note |" in out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    keys = {line.split("|")[1].strip() for line in rows}
    for key in (
        "L1",
        "L2",
        "L3",
        "L4",
        "L5",
        "B1",
        "B2",
        "B3",
        "B4",
        "B5",
        "B6",
        "B7",
        "B1c",
        "B3c",
        "B8",
        "B9",
        "C1",
    ):
        assert key in keys, f"row {key} missing from:\n{out}"
    body = "\n".join(rows)
    for limit in (
        "MD5, one core",
        "SHA-256, one core",
        "fsync each",
        "plain aiohttp PUT",
        "web.FileResponse",
    ):
        assert limit in body, f"limit {limit!r} missing from:\n{out}"
    # Every casd row states a figure with a unit; B1 is compared to the floor of this run.
    b1 = r"\| B1 \| fresh upload .*\| \d+\.\d\d s = \d+ MB/s \| floor \d+\.\d\d s \(L1, L3/L3b\) \| \d+\.\d\d \|"
    assert re.search(b1, body), out
    for algo in ("MD5", "SHA-256"):
        per_gib = rf"\| B1 \| … daemon CPU seconds per GiB ingested, {algo} \| \d+\.\d\d s \|"
        assert re.search(per_gib, body), out
    # "Two machines" (taskset) is measured, or says why not where it cannot pin two cores.
    two = r"\| B1 \| … \"two machines\": .*\| (\d+\.\d\d s \| slower side's floor|skipped)"
    assert re.search(two, body), out
    # The shared engines (S3 + PostgreSQL) give their rows, or one saying why they could not.
    engines = re.search(
        r"\| E1 \| fresh upload of the .* file to S3 \(moto\) \+ PostgreSQL \|"
        r" \d+ MB/s \| local \+ SQLite \d+ MB/s \| \d+\.\d\d \|",
        body,
    )
    if engines is None:
        assert os.environ.get("CI", "").lower() not in ("1", "true", "yes"), out  # CI has both
        assert re.search(r"\| E1 \| shared engines \(S3 \+ PostgreSQL\) \| skipped \|", body), out
    else:
        for key in ("E2", "E3", "E4"):
            assert key in keys, f"row {key} missing from:\n{out}"
    assert "fixed-size chunking resends everything after an insertion" in body
    assert "FastCDC 1 MiB: 1 KiB inserted at the front: chunks sent" in body
    # Nothing is left behind in the temp folder it was given.
    assert list(tmp_path.iterdir()) == []
