"""finepose.data.fetch against a real HTTP server on 127.0.0.1, started per test.

The server (http.server in a thread) serves in-memory files and can be told to
cut the connection after N bytes, ignore Range requests, require basic auth or
answer slowly. It records every request it saw, so the tests check what went
over the wire (Range headers, request counts), not just the end result.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import re
import socket
import stat
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from finepose.cli import main as cli_main
from finepose.data import fetch as fetch_mod
from finepose.data.fetch import MARKER, fetch, fetch_dataset, redact_url
from finepose.io import FinePoseError

FAST = {"backoff": 0.0, "timeout": 5.0, "progress": False}
PASSWORD = "s3cr3t-Pa55word!"


# ----------------------------------------------------------------------------- server


class _State:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.content_type = "application/octet-stream"
        self.cut_after: int | None = None  # bytes of body sent before the connection is cut
        self.cuts_left = 0  # how many responses get cut
        self.ignore_range = False
        self.auth: tuple[str, str] | None = None
        self.delay_s = 0.0
        self.seen: list[dict] = []  # one entry per request: path, range, status
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _finish(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        state: _State = self.server.state
        path = urlsplit(self.path).path
        requested = self.headers.get("Range")
        record = {"path": path, "range": requested, "status": None, "cookie": self.headers.get("Cookie"),
                  "authorization": self.headers.get("Authorization")}
        with state.lock:
            state.seen.append(record)
        if state.delay_s:
            time.sleep(state.delay_s)
        if state.auth is not None:
            token = base64.b64encode(f"{state.auth[0]}:{state.auth[1]}".encode()).decode()
            if self.headers.get("Authorization") != f"Basic {token}":
                record["status"] = 401
                return self._finish(401, {"WWW-Authenticate": 'Basic realm="test"'})
        body = state.files.get(path)
        if body is None:
            record["status"] = 404
            return self._finish(404, {"Content-Type": "text/plain"}, b"no such file")
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        start, status = 0, 200
        headers = {"Content-Type": state.content_type, "ETag": etag}
        if not state.ignore_range:
            headers["Accept-Ranges"] = "bytes"
            match = re.fullmatch(r"bytes=(\d+)-", requested or "")
            if_range = self.headers.get("If-Range")
            if match and (if_range is None or if_range == etag):
                start = int(match.group(1))
                if start >= len(body):
                    record["status"] = 416
                    return self._finish(416, {"Content-Range": f"bytes */{len(body)}"})
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        payload = body[start:]
        record["status"] = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        with state.lock:
            cut = state.cuts_left > 0 and state.cut_after is not None and len(payload) > state.cut_after
            if cut:
                state.cuts_left -= 1
        if cut:
            self.wfile.write(payload[: state.cut_after])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)  # the client sees the body end early
            return
        self.wfile.write(payload)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # cut connections are on purpose
        pass


@pytest.fixture
def server(monkeypatch, tmp_path):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no ~/.netrc login sneaking in
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.state = _State()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = lambda path: f"http://127.0.0.1:{httpd.server_address[1]}{path}"
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
        assert not thread.is_alive()


def _payload(size: int, seed: int = 0) -> bytes:
    return bytes((i * 131 + seed * 7 + (i >> 8)) % 251 for i in range(size))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _no_partial_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith((".part", ".part.json")) or ".extract-" in p.name]


# ----------------------------------------------------------------------------- archives


def _tar_gz(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buffer.getvalue()


RELEASE = {
    "release/S1/MyPoses/3D_positions/Walking.h5": _payload(3000, 1),
    "release/S1/StackedHourglass/Walking.54138969.h5": _payload(2000, 2),
    "release/README.txt": b"demo release\n",
}


# ----------------------------------------------------------------------------- downloads


def test_plain_download_checks_sha256_and_records_marker(server, tmp_path):
    data = _payload(300_000)
    server.state.files["/data/poses.bin"] = data
    dest = tmp_path / "raw"
    path = fetch(server.url("/data/poses.bin"), dest, sha256=_sha(data).upper(), **FAST)
    assert path == dest / "poses.bin"
    assert path.read_bytes() == data
    assert _no_partial_files(dest) == []
    marker = json.loads((dest / MARKER).read_text())
    (entry,) = marker["entries"]
    assert entry["sha256"] == _sha(data) and entry["files"] == ["poses.bin"]
    assert entry["source"] == server.url("/data/poses.bin")


def test_bad_checksum_is_an_error_and_leaves_no_file(server, tmp_path):
    data = _payload(50_000)
    server.state.files["/poses.bin"] = data
    wrong = "0" * 64
    dest = tmp_path / "raw"
    with pytest.raises(FinePoseError) as info:
        fetch(server.url("/poses.bin"), dest, sha256=wrong, **FAST)
    message = str(info.value)
    assert "poses.bin" in message and wrong in message and _sha(data) in message
    assert not (dest / "poses.bin").exists()
    assert _no_partial_files(dest) == []
    assert not (dest / MARKER).exists()


def test_interrupted_transfer_is_kept_as_part_and_resumed(server, tmp_path):
    data = _payload(200_000)
    server.state.files["/big.bin"] = data
    server.state.cut_after, server.state.cuts_left = 70_000, 1
    dest = tmp_path / "raw"
    with pytest.raises(FinePoseError, match="run fetch again to resume") as info:
        fetch(server.url("/big.bin"), dest, sha256=_sha(data), retries=0, **FAST)
    part = dest / fetch_mod.DOWNLOADS / "big.bin.part"  # a name that may be an archive waits in .downloads
    assert str(part) in str(info.value)
    assert not list(dest.rglob("big.bin"))  # never under the final name while partial
    received = part.stat().st_size
    assert 0 < received < len(data)
    assert part.read_bytes() == data[:received]

    path = fetch(server.url("/big.bin"), dest, sha256=_sha(data), retries=0, **FAST)
    assert path.read_bytes() == data
    assert server.state.seen[-1]["range"] == f"bytes={received}-"
    assert server.state.seen[-1]["status"] == 206
    assert _no_partial_files(dest) == []


def test_cut_connection_is_retried_and_resumed_within_one_call(server, tmp_path, caplog):
    data = _payload(150_000, 3)
    server.state.files["/big.bin"] = data
    server.state.cut_after, server.state.cuts_left = 40_000, 2
    caplog.set_level(logging.INFO, logger="finepose")
    path = fetch(server.url("/big.bin"), tmp_path / "raw", sha256=_sha(data), retries=3, **FAST)
    assert path.read_bytes() == data
    ranges = [r["range"] for r in server.state.seen]
    assert ranges[0] is None and len(ranges) == 3
    assert all(r and r.startswith("bytes=") and r != "bytes=0-" for r in ranges[1:])
    assert "retry 1/3" in caplog.text


def test_server_that_ignores_range_restarts_from_zero(server, tmp_path, caplog):
    data = _payload(120_000, 4)
    server.state.files["/big.bin"] = data
    server.state.ignore_range = True
    server.state.cut_after, server.state.cuts_left = 50_000, 1
    caplog.set_level(logging.INFO, logger="finepose")
    path = fetch(server.url("/big.bin"), tmp_path / "raw", sha256=_sha(data), retries=2, **FAST)
    assert path.read_bytes() == data
    (first, second) = server.state.seen
    assert second["range"] is not None and second["status"] == 200  # asked to resume, got everything again
    assert "ignored the Range request" in caplog.text


def test_complete_part_answered_416_is_finished_without_download(server, tmp_path):
    data = _payload(80_000, 5)
    server.state.files["/big.bin"] = data
    server.state.cut_after, server.state.cuts_left = 30_000, 1
    dest = tmp_path / "raw"
    with pytest.raises(FinePoseError):
        fetch(server.url("/big.bin"), dest, retries=0, **FAST)
    part = dest / fetch_mod.DOWNLOADS / "big.bin.part"
    part.write_bytes(data)  # the rest arrived before the process died, say
    path = fetch(server.url("/big.bin"), dest, sha256=_sha(data), retries=0, **FAST)
    assert path.read_bytes() == data
    assert server.state.seen[-1]["status"] == 416


def test_not_found_and_timeout_and_refused_are_clear(server, tmp_path):
    with pytest.raises(FinePoseError, match=r"HTTP 404 \(not found\)"):
        fetch(server.url("/missing.zip"), tmp_path / "a", **FAST)
    server.state.files["/slow.bin"] = b"x" * 10
    server.state.delay_s = 0.6
    with pytest.raises(FinePoseError, match=r"timed out .*gave up after 2 attempt") as info:
        fetch(server.url("/slow.bin"), tmp_path / "b", retries=1, backoff=0.0, timeout=0.2, progress=False)
    assert "slow.bin" in str(info.value)
    assert not (tmp_path / "b" / "slow.bin").exists()
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(FinePoseError, match="could not connect"):
        fetch(f"http://127.0.0.1:{port}/x.bin", tmp_path / "c", retries=1, **FAST)


# ----------------------------------------------------------------------------- credentials


def test_401_without_credentials_names_the_env_vars(server, tmp_path, monkeypatch):
    for var in ("TESTSRV_USERNAME", "TESTSRV_PASSWORD", "TESTSRV_TOKEN", "TESTSRV_COOKIE"):
        monkeypatch.delenv(var, raising=False)
    server.state.files["/h36m.zip"] = _zip({"a.txt": b"a"})
    server.state.auth = ("alice", PASSWORD)
    with pytest.raises(FinePoseError) as info:
        fetch(server.url("/h36m.zip"), tmp_path / "raw", credentials_env="TESTSRV", **FAST)
    message = str(info.value)
    assert "401" in message
    for var in ("TESTSRV_USERNAME", "TESTSRV_PASSWORD", "TESTSRV_TOKEN"):
        assert var in message
    with pytest.raises(FinePoseError, match="--credentials-env PREFIX"):
        fetch(server.url("/h36m.zip"), tmp_path / "raw", **FAST)
    assert not (tmp_path / "raw" / "a.txt").exists()


def test_credentials_from_env_work_and_never_leak(server, tmp_path, monkeypatch, caplog, capsys):
    caplog.set_level(logging.DEBUG)  # urllib3's and requests' debug logs too
    data = _payload(40_000, 6)
    server.state.files["/h36m.bin"] = data
    server.state.auth = ("alice", PASSWORD)
    monkeypatch.setenv("TESTSRV_USERNAME", "alice")
    monkeypatch.setenv("TESTSRV_PASSWORD", PASSWORD)
    path = fetch(server.url("/h36m.bin"), tmp_path / "ok", credentials_env="TESTSRV", sha256=_sha(data), **FAST)
    assert path.read_bytes() == data

    texts = []
    monkeypatch.setenv("TESTSRV_PASSWORD", PASSWORD + "-wrong")
    with pytest.raises(FinePoseError, match="rejected the login from TESTSRV_USERNAME/TESTSRV_PASSWORD") as info:
        fetch(server.url("/h36m.bin"), tmp_path / "bad", credentials_env="TESTSRV", **FAST)
    texts.append(str(info.value))

    # A login in the URL (command line only) works too, and is masked wherever the URL is shown.
    server.state.cut_after, server.state.cuts_left = 10_000, 1
    url = server.url("/h36m.bin").replace("http://", f"http://alice:{PASSWORD}@")
    path = fetch(url, tmp_path / "url", retries=2, **FAST)
    assert path.read_bytes() == data
    bad_url = server.url("/h36m.bin").replace("http://", "http://alice:wrong-but-secret-pw@")
    with pytest.raises(FinePoseError) as info:
        fetch(bad_url, tmp_path / "url2", **FAST)
    texts.append(str(info.value))
    assert "***@127.0.0.1" in str(info.value)

    texts += [caplog.text, *capsys.readouterr()]
    texts += [p.read_text() for p in tmp_path.rglob(MARKER)]
    for text in texts:
        assert PASSWORD not in text and "wrong-but-secret-pw" not in text
    assert "retry 1/2" in caplog.text  # the logs did cover a retried, resumed transfer


def test_token_and_cookie_from_env_are_sent(server, tmp_path, monkeypatch):
    server.state.files["/a.bin"] = b"payload"
    monkeypatch.setenv("TESTSRV_COOKIE", "session=abc123def; theme=dark")
    monkeypatch.delenv("TESTSRV_TOKEN", raising=False)
    fetch(server.url("/a.bin"), tmp_path / "raw", credentials_env="TESTSRV", **FAST)
    assert server.state.seen[-1]["cookie"] in ("session=abc123def; theme=dark", "theme=dark; session=abc123def")
    monkeypatch.setenv("TESTSRV_TOKEN", "tok-123456")
    fetch(server.url("/a.bin"), tmp_path / "raw_token", credentials_env="TESTSRV", **FAST)
    assert server.state.seen[-1]["authorization"] == "Bearer tok-123456"
    monkeypatch.delenv("TESTSRV_TOKEN")
    with pytest.raises(FinePoseError, match="TESTSRV_USERNAME is set but TESTSRV_PASSWORD is not"):
        monkeypatch.setenv("TESTSRV_USERNAME", "alice")
        monkeypatch.delenv("TESTSRV_PASSWORD", raising=False)
        fetch(server.url("/a.bin"), tmp_path / "raw2", credentials_env="TESTSRV", **FAST)


def test_config_credentials_are_refused(tmp_path):
    with pytest.raises(FinePoseError, match="logins never go in config files") as info:
        fetch_dataset({"sources": [{"url": "http://127.0.0.1:9/a.zip", "password": PASSWORD}]}, tmp_path)
    assert PASSWORD not in str(info.value)
    with pytest.raises(FinePoseError, match="carries a login") as info:
        fetch_dataset({"sources": [{"url": f"http://bob:{PASSWORD}@127.0.0.1:9/a.zip"}]}, tmp_path)
    assert PASSWORD not in str(info.value)


def test_redact_url_masks_login_and_secret_query_values():
    shown = redact_url(f"https://bob:{PASSWORD}@example.org/get?file=h36m.zip&token=abc123xyz#frag")
    assert shown == "https://***@example.org/get?file=h36m.zip&token=***"


# ----------------------------------------------------------------------------- extraction


def test_tar_gz_download_is_extracted_and_archive_removed(server, tmp_path):
    archive = _tar_gz(RELEASE)
    server.state.files["/h36m.tar.gz"] = archive
    dest = tmp_path / "raw"
    path = fetch(server.url("/h36m.tar.gz"), dest, sha256=_sha(archive), **FAST)
    assert path == dest
    for name, data in RELEASE.items():
        assert (dest / name).read_bytes() == data
    assert not (dest / "h36m.tar.gz").exists() and not (dest / fetch_mod.DOWNLOADS).exists()
    assert _no_partial_files(dest) == []
    (entry,) = json.loads((dest / MARKER).read_text())["entries"]
    assert entry["files"] == sorted(RELEASE) and entry["sha256"] == _sha(archive)


def test_zip_without_extension_is_recognised_and_merged(server, tmp_path):
    server.state.files["/get"] = _zip(RELEASE)  # like download.php?id=..: the content decides
    server.state.files["/detections.tar.gz"] = _tar_gz({"release/S1/extra/cpn.npz": b"npz-bytes"})
    dest = tmp_path / "raw"
    fetch(server.url("/get"), dest, **FAST)
    fetch(server.url("/detections.tar.gz"), dest, **FAST)
    for name, data in RELEASE.items():
        assert (dest / name).read_bytes() == data
    assert (dest / "release/S1/extra/cpn.npz").read_bytes() == b"npz-bytes"
    assert len(json.loads((dest / MARKER).read_text())["entries"]) == 2


def test_data_files_that_are_zips_are_not_unpacked(server, tmp_path):
    npz = _zip({"positions_3d.npy": b"\x93NUMPY"})  # an .npz is a zip inside
    server.state.files["/data_3d_h36m.npz"] = npz
    path = fetch(server.url("/data_3d_h36m.npz"), tmp_path / "raw", **FAST)
    assert path.read_bytes() == npz


def _evil_tar(kind: str, outside: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        def add(info: tarfile.TarInfo, data: bytes = b"") -> None:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)

        add(tarfile.TarInfo("good/first.txt"), b"fine")
        if kind == "traversal":
            add(tarfile.TarInfo("good/../../../escaped.txt"), b"pwned")
        elif kind == "absolute":
            add(tarfile.TarInfo(str(outside / "escaped.txt")), b"pwned")
        elif kind == "symlink":
            link = tarfile.TarInfo("good/out")
            link.type, link.linkname = tarfile.SYMTYPE, "../../outside"
            add(link)
            add(tarfile.TarInfo("good/out/escaped.txt"), b"pwned")
        elif kind == "symlink-absolute":
            link = tarfile.TarInfo("good/out")
            link.type, link.linkname = tarfile.SYMTYPE, str(outside)
            add(link)
            add(tarfile.TarInfo("good/out/escaped.txt"), b"pwned")
        elif kind == "symlink-chain":  # each link looks inside on its own; together they leave
            a = tarfile.TarInfo("a")
            a.type, a.linkname = tarfile.SYMTYPE, "b/../outside"
            add(a)
            b = tarfile.TarInfo("b")
            b.type, b.linkname = tarfile.SYMTYPE, "."
            add(b)
            add(tarfile.TarInfo("a/escaped.txt"), b"pwned")
        elif kind == "hardlink":
            link = tarfile.TarInfo("good/hard")
            link.type, link.linkname = tarfile.LNKTYPE, str(outside / "secret.txt")
            add(link)
        elif kind == "device":
            dev = tarfile.TarInfo("good/null")
            dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3
            add(dev)
    return buffer.getvalue()


def _evil_zip(kind: str, outside: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("good/first.txt", b"fine")
        if kind == "traversal":
            zf.writestr("good/../../../escaped.txt", b"pwned")
        elif kind == "absolute":
            zf.writestr(str(outside / "escaped.txt"), b"pwned")
        elif kind == "symlink":
            info = zipfile.ZipInfo("good/out")
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "../../outside")
            zf.writestr("good/out/escaped.txt", b"pwned")
        elif kind == "backslash":
            zf.writestr("good\\..\\..\\..\\escaped.txt", b"pwned")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("fmt", "kind", "why"),
    [
        ("tar", "traversal", "'..'"),
        ("tar", "absolute", "absolute path"),
        ("tar", "symlink", "link pointing outside"),
        ("tar", "symlink-absolute", "link to the absolute path"),
        ("tar", "symlink-chain", "outside"),
        ("tar", "hardlink", "hard link"),
        ("tar", "device", "device file"),
        ("zip", "traversal", "'..'"),
        ("zip", "absolute", "absolute path"),
        ("zip", "symlink", "link pointing outside"),
        ("zip", "backslash", "'..'"),
    ],
)
def test_unsafe_members_are_rejected_with_nothing_written(tmp_path, fmt, kind, why):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("keep me")
    dest = tmp_path / "deep" / "er" / "raw"
    dest.parent.mkdir(parents=True)
    archive = tmp_path / f"evil.{'tar.gz' if fmt == 'tar' else 'zip'}"
    archive.write_bytes(_evil_tar(kind, outside) if fmt == "tar" else _evil_zip(kind, outside))
    before = sorted(p for p in tmp_path.rglob("*") if not p.is_relative_to(dest))
    with pytest.raises(FinePoseError, match="unsafe archive") as info:
        fetch(archive, dest, progress=False)
    assert why in str(info.value) and "Nothing was extracted" in str(info.value)
    after = sorted(p for p in tmp_path.rglob("*") if not p.is_relative_to(dest))
    assert after == before  # nothing appeared anywhere outside dest
    assert (outside / "secret.txt").read_text() == "keep me"
    assert sorted(p.name for p in dest.iterdir()) == [fetch_mod.LOCK_FILE]  # nor inside it
    assert archive.exists()  # the user's archive is never deleted


def _tar_with(tmp_path, build) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        def add(name: str, data: bytes = b"", **attrs) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            for key, value in attrs.items():
                setattr(info, key, value)
            tar.addfile(info, io.BytesIO(data) if data else None)

        build(add)
    archive = tmp_path / "release.tar.gz"
    archive.write_bytes(buffer.getvalue())
    return archive


def test_tar_goes_through_tarfiles_data_filter(tmp_path, monkeypatch):
    seen = []
    real = tarfile.data_filter

    def spy(member, dest):
        seen.append(member.name)
        return real(member, dest)

    monkeypatch.setattr(tarfile, "data_filter", spy)

    def build(add):
        add("release/run.sh", b"#!/bin/sh\n", mode=0o6775)            # setuid/setgid and group write
        add("release/data.bin", b"12345", mode=0o666)
        add("release/copy.bin", type=tarfile.LNKTYPE, linkname="release/data.bin")
        add("release/latest", type=tarfile.SYMTYPE, linkname="data.bin")
        add("release/./sub/", type=tarfile.DIRTYPE, mode=0o777)

    dest = tmp_path / "raw"
    fetch(_tar_with(tmp_path, build), dest, progress=False)
    assert seen == ["release/run.sh", "release/data.bin", "release/copy.bin", "release/latest", "release/./sub"]
    assert stat.S_IMODE((dest / "release/run.sh").stat().st_mode) == 0o755   # high bits and g/o write dropped
    assert stat.S_IMODE((dest / "release/data.bin").stat().st_mode) == 0o644
    assert (dest / "release/copy.bin").read_bytes() == b"12345"
    assert os.path.samefile(dest / "release/copy.bin", dest / "release/data.bin")  # a hard link, inside
    assert os.readlink(dest / "release/latest") == "data.bin" and (dest / "release/sub").is_dir()
    (entry,) = json.loads((dest / MARKER).read_text())["entries"]
    assert entry["files"] == ["release/copy.bin", "release/data.bin", "release/latest", "release/run.sh"]


@pytest.mark.parametrize(("kind", "why"), [
    ("hardlink-forward", "not a file earlier in the archive"),
    ("hardlink-escape", "hard link pointing outside"),
    ("fifo", "is a FIFO"),
    ("dangling-chain", "resolves outside the destination"),
])
def test_more_unsafe_tar_members(tmp_path, kind, why):
    def build(add):
        add("good/first.txt", b"fine")
        if kind == "hardlink-forward":
            add("good/hard", type=tarfile.LNKTYPE, linkname="good/later.txt")
            add("good/later.txt", b"later")
        elif kind == "hardlink-escape":
            add("good/hard", type=tarfile.LNKTYPE, linkname="../../outside/secret.txt")
        elif kind == "fifo":
            add("good/pipe", type=tarfile.FIFOTYPE)
        elif kind == "dangling-chain":  # each link looks inside when made; no member goes through them
            add("a", type=tarfile.SYMTYPE, linkname="b/../outside")
            add("b", type=tarfile.SYMTYPE, linkname=".")

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("keep me")
    dest = tmp_path / "deep" / "raw"
    dest.parent.mkdir()
    with pytest.raises(FinePoseError, match="unsafe archive") as info:
        fetch(_tar_with(tmp_path, build), dest, progress=False)
    assert why in str(info.value) and "Nothing was extracted" in str(info.value)
    assert sorted(p.name for p in dest.iterdir()) == [fetch_mod.LOCK_FILE]
    assert (outside / "secret.txt").read_text() == "keep me"


def test_tar_without_extraction_filters_is_a_clear_error(tmp_path, monkeypatch):
    archive = tmp_path / "release.tar.gz"
    archive.write_bytes(_tar_gz(RELEASE))
    monkeypatch.delattr(tarfile, "data_filter")  # as on Python < 3.11.4
    with pytest.raises(FinePoseError, match=r"release\.tar\.gz safely: tar extraction needs Python 3\.11\.4 or "
                                            r"later .*--source DIR"):
        fetch(archive, tmp_path / "raw", progress=False)
    assert not [p for p in (tmp_path / "raw").iterdir() if p.name != fetch_mod.LOCK_FILE]


def test_corrupt_archive_is_a_clear_error(tmp_path):
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(_tar_gz(RELEASE)[:200])
    with pytest.raises(FinePoseError, match="broken.tar.gz"):
        fetch(archive, tmp_path / "raw", progress=False)
    assert not [p for p in (tmp_path / "raw").iterdir() if p.name != fetch_mod.LOCK_FILE]


# ----------------------------------------------------------------------------- local sources


def test_local_directory_is_linked_not_copied(tmp_path):
    source = tmp_path / "h36m_release"
    (source / "S1").mkdir(parents=True)
    (source / "S1" / "poses.h5").write_bytes(b"h5")
    dest = tmp_path / "raw"
    path = fetch(source, dest, progress=False)
    assert path == dest / "h36m_release" and path.is_symlink()
    assert path.resolve() == source.resolve()
    assert (path / "S1" / "poses.h5").read_bytes() == b"h5"
    assert fetch(source, dest, progress=False) == path  # no-op
    inside = dest / "already_here"
    inside.mkdir()
    assert fetch(inside, dest, progress=False) == inside  # used in place, no link
    with pytest.raises(FinePoseError, match="folder"):
        fetch(source, dest, sha256="a" * 64, progress=False)


def test_local_archive_is_checked_and_extracted_in_place(tmp_path):
    archive = tmp_path / "release.zip"
    archive.write_bytes(_zip(RELEASE))
    dest = tmp_path / "raw"
    with pytest.raises(FinePoseError, match="sha256 mismatch") as info:
        fetch(archive, dest, sha256="b" * 64, progress=False)
    assert str(archive) in str(info.value) and _sha(archive.read_bytes()) in str(info.value)
    assert archive.exists() and not (dest / "release").exists()
    assert fetch(archive, dest, sha256=_sha(archive.read_bytes()), progress=False) == dest
    for name, data in RELEASE.items():
        assert (dest / name).read_bytes() == data
    assert archive.exists()  # the user's file stays where it was
    kept = fetch(archive, tmp_path / "raw2", extract=False, progress=False)
    assert kept.is_symlink() and kept.resolve() == archive.resolve()


# ----------------------------------------------------------------------------- no-op, dataset spec, CLI


def test_second_run_with_same_spec_is_a_no_op(server, tmp_path):
    archive = _tar_gz(RELEASE)
    data = _payload(5000, 9)
    server.state.files["/h36m.tar.gz"] = archive
    server.state.files["/cameras.bin"] = data
    local = tmp_path / "local_detections"
    local.mkdir()
    spec = {"sources": [
        {"url": server.url("/h36m.tar.gz"), "sha256": _sha(archive)},
        {"url": server.url("/cameras.bin"), "extract": False},
        {"path": str(local)},
    ]}
    dest = tmp_path / "raw"
    first = fetch_dataset(spec, dest, progress=False, backoff=0.0)
    assert not first["up_to_date"] and len(server.state.seen) == 2
    marker_before = (dest / MARKER).read_text()
    second = fetch_dataset(spec, dest, progress=False, backoff=0.0)
    assert second["up_to_date"] and all(s["up_to_date"] for s in second["sources"])
    assert len(server.state.seen) == 2  # nothing went over the wire
    assert (dest / MARKER).read_text() == marker_before
    assert [s["path"] for s in second["sources"]] == [str(dest), str(dest / "cameras.bin"),
                                                      str(dest / "local_detections")]
    (dest / "release" / "README.txt").unlink()  # a file went missing: fetch again
    third = fetch_dataset(spec, dest, progress=False, backoff=0.0)
    assert not third["sources"][0]["up_to_date"] and third["sources"][1]["up_to_date"]
    assert (dest / "release" / "README.txt").exists() and len(server.state.seen) == 3


def test_cli_source_and_config(server, tmp_path, capsys):
    archive = _zip(RELEASE)
    server.state.files["/h36m.zip"] = archive
    dest = tmp_path / "raw"
    rc = cli_main(["fetch", "--source", server.url("/h36m.zip"), "--dest", str(dest),
                   "--sha256", _sha(archive), "--retries", "1"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sources"][0]["files"] == len(RELEASE) and not report["up_to_date"]

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"datasets": {"h36m": {"fetch": {
        "sources": [{"url": server.url("/h36m.zip"), "sha256": _sha(archive)}]}}}}))
    rc = cli_main(["fetch", "--config", str(config), "--dataset", "h36m", "--dest", str(dest)])
    assert rc == 0 and json.loads(capsys.readouterr().out)["up_to_date"]  # the --source run already did it

    assert cli_main(["fetch", "--config", str(config), "--dataset", "mpi", "--dest", str(dest)]) == 2
    assert "no datasets.mpi" in capsys.readouterr().err
    assert cli_main(["fetch", "--source", server.url("/h36m.zip"), "--dest", str(tmp_path / "bad"),
                     "--sha256", "c" * 64, "--retries", "0"]) == 2
    err = capsys.readouterr().err
    assert "sha256 mismatch" in err and "c" * 64 in err
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fetch", "--help"])
    assert exit_info.value.code == 0
    assert "credentials" in capsys.readouterr().out.lower()
