"""--config FILE / $CASD_CONFIG: TOML keys per flag, precedence, refusals, --check-config."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request

import pytest

from casd.cli import build_parser
from casd.cli_common import parse_args_with_config
from helpers import casd_run


def casd(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CASD_")}
    full_env.update(env or {})
    return casd_run(*args, env=full_env)


def settings_of(out: str) -> dict[str, str]:
    return dict(line.split(" = ", 1) for line in out.splitlines())


@pytest.fixture
def no_casd_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("CASD_"):
            monkeypatch.delenv(k)


def parse(argv, monkeypatch, **env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return parse_args_with_config(build_parser(), argv)


def test_precedence_flag_env_file_default(tmp_path, monkeypatch, no_casd_env):
    cfg = tmp_path / "casd.toml"
    cfg.write_text('port = 9001\nhost = "127.0.0.2"\nmax-chunk-size = "1MiB"\nio_workers = 3\n')
    a = parse(["serve", "--config", str(cfg)], monkeypatch)
    assert (a.port, a.host, a.max_chunk_size, a.io_workers) == (9001, "127.0.0.2", 1 << 20, 3)
    assert a.max_chunks == 1_000_000  # default: in neither
    a = parse(["serve", "--config", str(cfg)], monkeypatch, CASD_PORT="9002")
    assert a.port == 9002  # env over file
    a = parse(["serve", "--config", str(cfg), "--port", "9003"], monkeypatch, CASD_PORT="9002")
    assert a.port == 9003  # flag over env
    monkeypatch.delenv("CASD_PORT")
    a = parse(["serve"], monkeypatch, CASD_CONFIG=str(cfg))
    assert a.port == 9001  # the file named by the environment


def test_one_file_for_every_command(tmp_path, monkeypatch, no_casd_env):
    cfg = tmp_path / "casd.toml"
    cfg.write_text(f'data = "{tmp_path / "d"}"\nport = 9001\ngrace = 7\njson = true\n')
    a = parse(["gc", "--config", str(cfg)], monkeypatch)
    # A key of another command (port) is not an error here; gc's own keys apply.
    assert (a.grace, a.json, str(a.data)) == (7.0, True, str(tmp_path / "d"))
    a = parse(["stats"], monkeypatch, CASD_CONFIG=str(cfg))
    assert a.json is True


def test_admin_command_uses_the_files_data_folder(daemon, tmp_path):
    cfg = tmp_path / "casd.toml"
    cfg.write_text(f'data = "{daemon.data_dir}"\n')
    r = casd("stats", "--json", env={"CASD_CONFIG": str(cfg)})
    assert r.returncode == 0, r.stderr
    assert "files" in json.loads(r.stdout)
    assert not (tmp_path / "casd-data").exists()


def test_daemon_reads_the_file(daemon_factory, tmp_path):
    cfg = tmp_path / "casd.toml"
    cfg.write_text('token = "from-file"\nlog-format = "json"\n')
    d = daemon_factory("--config", str(cfg))
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"{d.url}/v1/files/{'a' * 32}")
    assert exc.value.code == 401
    req = urllib.request.Request(
        f"{d.url}/v1/files/{'a' * 32}", headers={"Authorization": "Bearer from-file"}
    )
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req)
    assert exc.value.code == 404
    assert d.log().lstrip().startswith("{")


@pytest.mark.parametrize(
    "text, needle",
    [
        ("bogus = 1\n", "unknown key 'bogus'"),
        ('port = "abc"\n', "key 'port'"),
        ('sync = "SOMETIMES"\n', "key 'sync'"),
        ("upload-ttl = true\n", "key 'upload_ttl'"),
        ('max-chunk-size = "lots"\n', "key 'max_chunk_size'"),
        ("port = [\n", "not valid TOML"),
        ("[serve]\nport = 1\n", "unknown key 'serve'"),
        ('server = "http://x"\n', "unknown key 'server'"),  # a key of upload, which reads no file
    ],
)
def test_bad_files_are_refused_in_one_line(tmp_path, text, needle):
    cfg = tmp_path / "casd.toml"
    cfg.write_text(text)
    r = casd("serve", "--check-config", "--config", str(cfg))
    assert r.returncode == 2, r
    assert needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_bad_value_for_an_admin_flag(tmp_path):
    cfg = tmp_path / "casd.toml"
    cfg.write_text("json = 1\n")
    r = casd("stats", "--config", str(cfg), "--data", str(tmp_path))
    assert r.returncode == 2 and "key 'json': must be true or false" in r.stderr


def test_missing_file_is_refused(tmp_path):
    r = casd("gc", "--config", str(tmp_path / "nope.toml"))
    assert r.returncode == 2 and "nope.toml" in r.stderr and "Traceback" not in r.stderr


def test_check_config_prints_effective_settings_and_masks_secrets(tmp_path):
    cfg = tmp_path / "casd.toml"
    cfg.write_text('port = 9123\ntoken = "hush-hush"\nlog_level = "warning"\n')
    r = casd(
        "serve", "--check-config", "--data", str(tmp_path / "d"), env={"CASD_CONFIG": str(cfg)}
    )
    assert r.returncode == 0, r.stderr
    s = settings_of(r.stdout)
    assert s["port"] == "9123" and s["token"] == "(set)" and s["log_level"] == "warning"
    assert "hush-hush" not in r.stdout
    assert not (tmp_path / "d").exists()  # checking writes nothing
    r = casd("serve", "--check-config", "--port", "70000")
    assert r.returncode == 2 and "--port" in r.stderr


def test_streamed_uploads_are_on_unless_turned_off(monkeypatch, no_casd_env):
    assert parse(["serve"], monkeypatch).stream_uploads is True
    assert parse(["serve", "--no-stream-uploads"], monkeypatch).stream_uploads is False
    assert parse(["serve"], monkeypatch, CASD_STREAM_UPLOADS="0").stream_uploads is False
    assert parse(["serve"], monkeypatch, CASD_STREAM_UPLOADS="1").stream_uploads is True
