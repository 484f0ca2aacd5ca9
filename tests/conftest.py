"""Shared fixtures: settings for in-process apps, and a real `casd serve` subprocess."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

import helpers
from casd.config import Settings
from casd.web import create_app
from helpers import RandomData

# PYTHONDONTWRITEBYTECODE (set on some machines to keep checkouts clean) would make every
# daemon and CLI process the tests start compile casd from source again (a sixth of its
# start) and every xdist worker rewrite every test module. Their bytecode goes to one cache
# folder outside the checkout instead, for this session and the processes it starts.
if os.environ.pop("PYTHONDONTWRITEBYTECODE", None):
    os.environ.setdefault(
        "PYTHONPYCACHEPREFIX", str(Path(tempfile.gettempdir()) / "casd-test-pycache")
    )
    sys.pycache_prefix = os.environ["PYTHONPYCACHEPREFIX"]
    sys.dont_write_bytecode = False

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

_URL_LINE = re.compile(r"serving (http://127\.0\.0\.1:(\d+))")


class Daemon:
    """A real `casd serve` process on 127.0.0.1. With `fork` (the default) the process is
    forked from tests/daemon_launcher.py with casd already imported; without, it is started
    the way a user starts it, `python -m casd serve ...` (tests of start-up use that)."""

    def __init__(
        self,
        data_dir: Path,
        log_path: Path,
        extra_args: tuple[str, ...] = (),
        fork: bool = True,
    ):
        self.data_dir = data_dir
        self.log_path = log_path
        self.extra_args = extra_args
        self.fork = fork
        self.port = 0
        self.url = ""
        self.proc: subprocess.Popen | helpers.ForkedProcess | None = None

    def start(self, timeout: float = 30.0) -> Daemon:
        assert self.proc is None, "already running"
        log = open(self.log_path, "a")  # noqa: SIM115 - the child keeps it; closed below
        start_offset = log.tell()
        cmd = [
            sys.executable,
            "-m",
            "casd",
            "serve",
            "--data",
            str(self.data_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.extra_args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.fork:
            log.close()
            launcher = helpers.Launcher.get()
            answer = launcher.request(
                op="start", argv=cmd[3:], env=env, cwd=os.getcwd(), log=str(self.log_path)
            )
            if "started" not in answer:
                raise RuntimeError(f"the daemon launcher could not start casd: {answer}")
            self.proc = helpers.ForkedProcess(launcher, answer["started"], cmd)
        else:
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
    """Start real daemons: `daemon_factory(*extra_args, data_dir=..., fork=...)`; all stop at
    teardown. `fork=False` starts `python -m casd serve` itself (see Daemon)."""
    started: list[Daemon] = []

    def make(*extra_args: str, data_dir: Path | None = None, fork: bool = True) -> Daemon:
        n = len(started)
        d = Daemon(
            data_dir or tmp_path / f"data{n}",
            tmp_path / f"daemon{n}.log",
            tuple(extra_args),
            fork=fork,
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


@pytest.fixture
async def client(aiohttp_client, settings):
    """The app in this process on `settings` (a module may override either fixture), and a
    test client for it; `helpers.app_client` makes one with settings changed."""
    return await aiohttp_client(create_app(settings))


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


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: two workers per core. Much of a test's time is waiting (a daemon starting,
    a timeout the test drives, another process's answer), so a second worker per core keeps
    the cores busy: the fast loop took 67 s with one worker per core on two cores, 52 s with
    1.5 and 49 s with two (at a load of about 2), for nearly the same CPU time."""
    return 2 * len(os.sched_getaffinity(0))


def pytest_sessionfinish(session) -> None:
    helpers.Launcher.close_own()


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


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gate:
    """A TCP forwarder in front of a server that the test can close and open again: the
    server's state survives while its clients see it go down (connections refused and cut)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = _free_port()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.open()

    def open(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def close(self) -> None:
        """Refuse new connections and cut every open one."""
        sock, self._listener = self._listener, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            sock.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


class S3Server:
    """moto's standalone S3 server on 127.0.0.1, and a botocore client for test set-up."""

    def __init__(self, proc: subprocess.Popen, port: int):
        self.proc = proc
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        import botocore.session

        self.client = botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1"
        )

    def new_bucket(self) -> str:
        name = f"casd-{uuid.uuid4().hex[:20]}"
        self.client.create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Every object's key and size."""
        out = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix
        ):
            out.update({o["Key"]: o["Size"] for o in page.get("Contents", ())})
        return out


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "casd-test",
    "AWS_SECRET_ACCESS_KEY": "casd-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server, started once per session; skipped where moto is missing, except in
    CI. Dummy credentials go into this process's environment, which daemons inherit."""
    try:
        import aiobotocore  # noqa: F401 - only checking that the S3 engine can run
        import moto.server  # noqa: F401
    except ImportError as exc:
        missing = f"S3 tests need moto[server] and aiobotocore (pip install -e '.[test]'): {exc}"
        if _in_ci():
            pytest.fail(missing)
        pytest.skip(missing)
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    port = _free_port()
    with open(Path(os.environ.get("TMPDIR", "/tmp")) / f"casd-moto-{port}.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto's S3 server did not start on port {port}")
            time.sleep(0.1)
    try:
        yield S3Server(proc, port)
    finally:
        proc.kill()
        proc.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket for one test."""
    return s3_server.new_bucket()
