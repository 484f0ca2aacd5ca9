"""The README's commands are the real ones: the walk-through runs as pasted."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_block_after(heading: str) -> str:
    section = README.split(heading, 1)[1]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


def test_readme_starts_with_install_run_and_the_ci_test_command():
    first = re.search(r"```sh\n(.*?)```", README, re.S).group(1).splitlines()
    commands = [line.split("#")[0].strip() for line in first]
    assert commands[0].startswith("pip install")
    assert commands[1] == "casd serve"
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(rf"^{re.escape(commands[2])}$", ci, re.M), "README and .ci/run differ"


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("md5sum")), reason="needs curl")
def test_curl_walk_through_works_when_pasted(daemon, tmp_path):
    script = code_block_after("## Walk-through with curl")
    r = subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=tmp_path,
        env={"CASD": daemon.url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert json.loads(lines[0])["status"] == "pending"
    assert json.loads(lines[1])["stored"] is True
    assert json.loads(lines[2]) == {"stored": True, "missing": []}
    assert json.loads(lines[3])["status"] == "complete"
    assert lines[4] == "identical"
    assert json.loads(lines[5])["status"] == "complete"
