"""casd/protocol.py: the wire constants and formatters both sides share, and that it stays a leaf."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from casd import protocol
from casd.digest import Algo, Digest

ROOT = Path(__file__).resolve().parents[1]


def casd_imports(path: Path) -> set[str]:
    """The casd modules a source file imports (`from casd import x` counts as casd.x)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "casd"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "casd":
            if node.module == "casd":
                out |= {f"casd.{a.name}" for a in node.names}
            else:
                out.add(node.module)
    return out


def test_protocol_imports_nothing_of_casd_but_digest():
    assert casd_imports(ROOT / "casd" / "protocol.py") == {"casd.digest"}


def test_client_package_imports_no_server_module():
    for path in sorted((ROOT / "casd" / "client").glob("*.py")):
        for module in casd_imports(path):
            assert module in ("casd.digest", "casd.protocol", "casd.chunking") or module.startswith(
                "casd.client."
            ), f"{path.name} imports {module}"


def test_chunking_is_a_leaf():
    assert casd_imports(ROOT / "casd" / "chunking.py") == set()


@pytest.mark.parametrize(
    "ext,ok",
    [
        (".iso", True),
        (".TAR-gz_1", True),
        ("." + "x" * 16, True),
        ("." + "x" * 17, False),
        (".", False),
        ("iso", False),
        (".is o", False),
        (".iso\n", False),
        ("", False),
    ],
)
def test_ext_pattern(ext, ok):
    assert bool(protocol.EXT_RE.match(ext)) is ok


def test_file_url_and_path():
    d = Digest.parse(Algo.MD5, "9E107D9D372BB6826BD81D3542A419D6")
    assert protocol.file_url(d, ".iso") == "/v1/files/9e107d9d372bb6826bd81d3542a419d6.iso"
    assert protocol.file_path(d.hex) == "/v1/files/9e107d9d372bb6826bd81d3542a419d6"
    m = protocol.FILE_PATH_RE.search(protocol.file_url(d, ".iso"))
    assert m is not None and (m.group(1), m.group(2)) == (d.hex, ".iso")


@pytest.mark.parametrize(
    "n,text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (2_621_440, "2.5 MiB"),
        (5 << 30, "5.0 GiB"),
        (1 << 40, "1.0 TiB"),
        (3 << 50, "3072.0 TiB"),
    ],
)
def test_format_bytes(n, text):
    assert protocol.format_bytes(n) == text


def test_format_timestamp_is_rfc3339_utc():
    assert protocol.format_timestamp(0) == "1970-01-01T00:00:00Z"
    assert protocol.format_timestamp(1_700_000_000.9) == "2023-11-14T22:13:20Z"


def test_retryable_statuses():
    assert [
        s
        for s in (400, 401, 404, 408, 409, 413, 416, 422, 429, 500, 503, 507)
        if protocol.is_retryable_status(s)
    ] == [408, 429, 500, 503, 507]
