"""Shared fixtures: settings for in-process apps, and a real `casd serve` subprocess."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import helpers
from casd.config import Settings
from helpers import RandomData

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

_URL_LINE = re.compile(r"serving (http://127\.0\.0\.1:(\d+))")


class Daemon:
    """A real `casd serve` process on 127.0.0.1, started the way a user starts it."""

    def __init__(self, data_dir: Path, log_path: Path, extra_args: tuple[str, ...] = ()):
        self.data_dir = data_dir
        self.log_path = log_path
        self.extra_args = extra_args
        self.port = 0
        self.url = ""
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> Daemon:
        assert self.proc is None, "already running"
        log = open(self.log_path, "a")  # noqa: SIM115 - the child keeps it; closed below
        start_offset = log.tell()
        cmd = [
            sys.executable, "-m", "casd", "serve",
            "--data", str(self.data_dir), "--host", "127.0.0.1", "--port", str(self.port),
            *self.extra_args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text()[start_offset:]
            m = _URL_LINE.search(text)
            if m:
                self.url, self.port = m.group(1), int(m.group(2))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"casd serve exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"casd serve did not announce its URL within {timeout}s")

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait: the clean shutdown a service manager does."""
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise

    def kill(self) -> None:
        """kill -9: no cleanup of any kind."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait()

    def restart(self) -> Daemon:
        self.kill()
        return self.start()

    def log(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def daemon_factory(tmp_path):
    """Start real daemons: `daemon_factory(*extra_args, data_dir=...)`; all stop at teardown."""
    started: list[Daemon] = []

    def make(*extra_args: str, data_dir: Path | None = None) -> Daemon:
        n = len(started)
        d = Daemon(
            data_dir or tmp_path / f"data{n}", tmp_path / f"daemon{n}.log", tuple(extra_args)
        )
        started.append(d)
        return d.start()

    yield make
    for d in started:
        d.kill()


@pytest.fixture
def daemon(daemon_factory) -> Daemon:
    """One real `casd serve` on a free 127.0.0.1 port with a fresh data folder."""
    return daemon_factory()


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path / "data", port=0)


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium driven by Playwright: skipped where it is missing, except in CI."""
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright package is not installed (pip install -e '.[test]')"
    if missing is None and not os.access(CHROMIUM, os.X_OK):
        missing = f"{CHROMIUM} is missing (apt-get install chromium)"
    if missing is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"browser tests cannot run in CI: {missing}")
        pytest.skip(missing)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def postgres_cluster():
    """A throwaway PostgreSQL cluster on 127.0.0.1 for the whole session (tests/engine_postgres.py):
    skipped where the server is not installed, except in CI."""
    from engine_postgres import Cluster, why_missing

    missing = why_missing()
    if missing is not None:
        if _in_ci():
            pytest.fail(f"PostgreSQL tests cannot run in CI: {missing}")
        pytest.skip(missing)
    cluster = Cluster()
    try:
        cluster.init()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def postgres_url(postgres_cluster) -> str:
    """The URL of a fresh, empty database of the session's cluster (with a password in it,
    which trust authentication ignores: what casd prints must never show it)."""
    return postgres_cluster.database()


def pytest_report_header(config) -> str:
    return f"random test data: CASD_TEST_SEED={helpers.TEST_SEED}"


@pytest.fixture
def rng(request) -> RandomData:
    """Seeded random test data; a failure report shows the seed that reproduces it."""
    request.node.user_properties.append(("CASD_TEST_SEED", helpers.TEST_SEED))
    print(f"random test data: CASD_TEST_SEED={helpers.TEST_SEED} reproduces this test's bytes")
    return RandomData(helpers.TEST_SEED, request.node.nodeid)


@pytest.fixture(autouse=True)
def _seeded_rand(request):
    """`helpers.rand(n)` draws from this test's seeded stream (see `helpers.rand`)."""
    helpers.current = helpers.Draws(RandomData(helpers.TEST_SEED, request.node.nodeid))
    yield
    helpers.current = None
