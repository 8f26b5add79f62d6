"""Download or copy a dataset release into a data folder: sha256-checked, resumable, safely extracted.

Usage:
  python -m finepose fetch --source URL_OR_PATH --dest DIR [--sha256 HEX] [--no-extract]
                           [--credentials-env PREFIX]
  python -m finepose fetch --config config.yaml --dataset NAME --dest DIR

SOURCE is an http(s) URL, a local archive or a local directory:
  - URL: downloaded into DIR/NAME.part, resumed with HTTP Range requests when a
    transfer is cut (re-run the command to resume after it gave up), checked
    against --sha256 and only then renamed to its final name. A bad checksum is
    an error and the bad download is deleted.
  - local directory: used in place, through a link DIR/<folder name> -> folder
    (nothing is copied).
  - local archive: checked against --sha256 and extracted straight from where
    it lies (with --no-extract: linked, not copied).
Archives (.tar, .tar.gz/.tgz, .tar.bz2, .tar.xz, .zip; names without a known
extension are recognised by content) are extracted into a temporary folder
inside DIR, then moved into DIR. Members with absolute paths, '..', links
pointing outside DIR, or device files make the whole archive fail with nothing
extracted. Tar archives are extracted by Python's tarfile with its "data"
extraction filter (Python 3.11.4 or later; older Pythons get a clear error),
zip archives by our own checked writer. Downloaded archives are deleted once
extracted.

DIR/.fetched.json records what was fetched (source, sha256, files), so a second
run with the same source is a no-op (--force fetches again).

Credentials (Human3.6M needs a login) come only from environment variables whose
names start with the prefix given by --credentials-env (or `credentials_env:`
in the config):
  PREFIX_USERNAME and PREFIX_PASSWORD   HTTP basic auth
  PREFIX_TOKEN                          bearer token (used if set)
  PREFIX_COOKIE                         Cookie header (e.g. a browser session)
They are never read from config files and never written to logs, errors or
.fetched.json (URLs are shown with any login and secret query values masked).

Config (`datasets.<NAME>.fetch` in config.yaml):
  datasets:
    h36m:
      fetch:
        credentials_env: H36M
        sources:
          - {url: "https://example.org/h36m.zip", sha256: "<64 hex>", extract: true}
          - {path: /data/h36m_sh_detections}
Each source takes exactly one of `url`/`path`, and optionally `sha256`,
`extract` (default true), `name` (file or link name in DIR) and
`credentials_env`. Relative paths are relative to the working directory.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import fcntl
import hashlib
import http.client
import json
import logging
import os
import posixpath
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

import requests
import urllib3
from tqdm import tqdm

from finepose.io import FinePoseError, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

MARKER = ".fetched.json"
MARKER_FORMAT = 1
LOCK_FILE = ".fetch.lock"
DOWNLOADS = ".downloads"  # archives wait here (inside DIR) until extracted
_CHUNK = 1 << 20
_MAX_BACKOFF_S = 30.0

# Archive kinds by file name; longest suffix first so ".tar.gz" wins over ".gz".
_ARCHIVE_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".tar.gz", "tar"), (".tar.bz2", "tar"), (".tar.xz", "tar"),
    (".tgz", "tar"), (".tbz2", "tar"), (".tbz", "tar"), (".txz", "tar"), (".tar", "tar"),
    (".zip", "zip"),
)
# Data files that may be zip/tar inside (.npz is a zip) but are never unpacked.
_DATA_SUFFIXES = frozenset({
    ".npz", ".npy", ".h5", ".hdf5", ".mat", ".json", ".pt", ".pth", ".ckpt", ".parquet",
    ".csv", ".txt", ".pkl", ".yaml", ".yml", ".cdf", ".mp4", ".avi", ".jpg", ".png", ".gz",
    ".bz2", ".xz",
})
# Query parameters whose values are masked when a URL is shown.
_SECRET_QUERY_KEY = re.compile(r"token|key|sig|signature|secret|pass|pwd|auth|credential|session", re.I)
_ENV_PREFIX = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


# ----------------------------------------------------------------------------- secrets


def redact_url(url: str) -> str:
    """``url`` as safe to print: login masked, secret-looking query values masked, fragment dropped."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = "&".join(
            f"{quote(k, safe='')}={'***' if _SECRET_QUERY_KEY.search(k) else quote(v, safe='')}"
            for k, v in pairs
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


@dataclass(frozen=True)
class Credentials:
    """A login taken from the environment. ``describe`` names variables, never values."""

    prefix: str | None
    auth: Any = None  # a requests auth object, or None
    cookie: str | None = None  # "name=value; name2=value2", sent only to the source's host
    secrets: tuple[str, ...] = ()
    describe: str = ""  # e.g. "H36M_USERNAME/H36M_PASSWORD"

    def __repr__(self) -> str:  # never show the values
        return f"Credentials(prefix={self.prefix!r}, from={self.describe!r})"

    @property
    def given(self) -> bool:
        return self.auth is not None or bool(self.cookie)

    def scrub(self, text: str) -> str:
        """``text`` with every secret value (raw and %-encoded) replaced by ***."""
        for secret in sorted(self.secrets, key=len, reverse=True):
            if len(secret) < 3:  # masking 1-2 characters would mangle the message, not protect anything
                continue
            for form in {secret, quote(secret, safe=""), quote(secret)}:
                text = text.replace(form, "***")
        return text


def _env_var_help(prefix: str) -> str:
    return (f"{prefix}_USERNAME and {prefix}_PASSWORD (HTTP basic auth) or {prefix}_TOKEN (bearer token)")


def credentials_from_env(prefix: str | None, environ: Any = None) -> Credentials:
    """Read ``<PREFIX>_TOKEN`` or ``<PREFIX>_USERNAME``/``<PREFIX>_PASSWORD`` (and ``<PREFIX>_COOKIE``)."""
    if not prefix:
        return Credentials(prefix=None)
    if not _ENV_PREFIX.match(prefix):
        raise FinePoseError(
            f"credentials_env {prefix!r} is not a valid environment variable prefix: use letters, digits "
            "and '_' (for example H36M, which reads H36M_USERNAME/H36M_PASSWORD or H36M_TOKEN)"
        )
    env = os.environ if environ is None else environ
    user, password = env.get(f"{prefix}_USERNAME"), env.get(f"{prefix}_PASSWORD")
    token, cookie = env.get(f"{prefix}_TOKEN"), env.get(f"{prefix}_COOKIE")
    secrets: list[str] = [s for s in (password, token, cookie) if s]
    names: list[str] = []
    auth = None
    if token:
        auth, names = _BearerAuth(token), [f"{prefix}_TOKEN"]
    elif user or password:
        if not (user and password):
            missing = f"{prefix}_PASSWORD" if user else f"{prefix}_USERNAME"
            present = f"{prefix}_USERNAME" if user else f"{prefix}_PASSWORD"
            raise FinePoseError(f"{present} is set but {missing} is not: export both (or {prefix}_TOKEN instead)")
        auth, names = requests.auth.HTTPBasicAuth(user, password), [f"{prefix}_USERNAME", f"{prefix}_PASSWORD"]
        secrets.append(user)
    if cookie:
        names.append(f"{prefix}_COOKIE")
        secrets += [pair.partition("=")[2].strip() for pair in cookie.split(";")]
    return Credentials(prefix=prefix, auth=auth, cookie=cookie or None, secrets=tuple(secrets),
                       describe="/".join(names))


class _BearerAuth(requests.auth.AuthBase):
    """``Authorization: Bearer <token>``; its repr never shows the token."""

    def __init__(self, token: str):
        self._token = token

    def __call__(self, request):
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "_BearerAuth(***)"


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Source:
    kind: str  # "url" | "directory" | "file"
    label: str  # what logs, errors and the marker show: redacted URL or absolute path
    url: str | None = None  # URL without its login
    path: Path | None = None
    url_login: tuple[str, str] | None = None


def _parse_source(source: str | os.PathLike) -> _Source:
    text = os.fspath(source).strip() if not isinstance(source, str) else source.strip()
    if not text:
        raise FinePoseError("empty fetch source: give a URL, an archive or a folder")
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if scheme:
        name = scheme.group(1).lower()
        parts = urlsplit(text)
        if name == "file":
            text = unquote(parts.path)
        elif name not in ("http", "https"):
            raise FinePoseError(
                f"unsupported source {redact_url(text)}: fetch reads http(s) URLs, archives and folders"
            )
        else:
            login = None
            netloc = parts.netloc
            if "@" in netloc:
                userinfo, netloc = netloc.rsplit("@", 1)
                user, _, password = userinfo.partition(":")
                login = (unquote(user), unquote(password)) if user or password else None
            if not parts.hostname:
                raise FinePoseError(f"source {redact_url(text)} has no host name")
            url = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
            # The label keeps a masked "***@" so logs show that a login was used, never which.
            return _Source("url", redact_url(text), url=url, url_login=login)
    path = Path(text).expanduser().absolute()
    if path.is_dir():
        return _Source("directory", str(path), path=path)
    if path.is_file():
        return _Source("file", str(path), path=path)
    if path.exists():
        raise FinePoseError(f"source {path} is neither a file nor a folder")
    raise FinePoseError(
        f"source {path} does not exist: fix the path (relative paths are relative to {Path.cwd()}), "
        "or give the release's http(s) URL"
    )


def _check_sha256(sha256: str | None, where: str = "--sha256") -> str | None:
    if sha256 is None:
        return None
    value = str(sha256).strip().lower()
    if not _SHA256.match(value):
        raise FinePoseError(f"{where}: {sha256!r} is not a sha256 (64 hexadecimal digits)")
    return value


def _safe_filename(name: str, where: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise FinePoseError(f"{where}: {name!r} is not a plain file name (no folders, not '.' or '..')")
    return name


def _url_filename(url: str) -> str:
    base = unquote(posixpath.basename(urlsplit(url).path))
    return base if base and base not in (".", "..") and "\\" not in base else "download"


def _archive_kind(name: str) -> str | None:
    lower = name.lower()
    return next((kind for suffix, kind in _ARCHIVE_SUFFIXES if lower.endswith(suffix)), None)


def _maybe_archive(name: str) -> bool:
    """True when the name says nothing: the content decides (e.g. ``download.php?id=3``)."""
    return _archive_kind(name) is None and Path(name).suffix.lower() not in _DATA_SUFFIXES


def _sniff_archive(path: Path) -> str | None:
    if zipfile.is_zipfile(path):
        return "zip"
    with contextlib.suppress(Exception):
        if tarfile.is_tarfile(path):
            return "tar"
    return None


# ----------------------------------------------------------------------------- marker and lock


def _read_marker(dest: Path) -> dict:
    path = dest / MARKER
    if not path.exists():
        return {"format": MARKER_FORMAT, "entries": []}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") == MARKER_FORMAT and isinstance(data.get("entries"), list):
            return data
        log.warning("%s has an unknown format; it will be rewritten", path)
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("%s is unreadable (%s); it will be rewritten", path, exc)
    return {"format": MARKER_FORMAT, "entries": []}


def _entry_key(entry: dict) -> tuple:
    return (entry.get("source"), bool(entry.get("extract")), entry.get("name"))


def _record(dest: Path, entry: dict) -> None:
    marker = _read_marker(dest)
    key = _entry_key(entry)
    marker["entries"] = [e for e in marker["entries"] if _entry_key(e) != key] + [entry]
    atomic_write_json(dest / MARKER, marker)


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    lock_path = dest / LOCK_FILE
    with open(lock_path, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FinePoseError(
                f"another fetch is writing into {dest} (it holds {lock_path}); wait for it to finish, then run again"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _source_stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _is_current(entry: dict | None, dest: Path, src: _Source, expected: str | None) -> bool:
    """True when ``entry`` (from .fetched.json) already holds what this request would fetch."""
    if not entry:
        return False
    if expected is not None and entry.get("sha256") != expected:
        return False
    if src.kind == "file" and entry.get("source_stat") != _source_stat(src.path):
        return False
    if src.kind == "directory" and entry.get("link"):
        link = dest / entry["path"]
        if not link.is_symlink() or os.readlink(link) != str(src.path):
            return False
    return all(os.path.lexists(dest / rel) for rel in entry.get("files", []))


# ----------------------------------------------------------------------------- public API


def fetch(
    source: str | os.PathLike,
    dest_dir: str | os.PathLike,
    *,
    sha256: str | None = None,
    extract: bool = True,
    credentials_env: str | None = None,
    progress: bool = True,
    name: str | None = None,
    force: bool = False,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
) -> Path:
    """Fetch one source into ``dest_dir`` and return where its content now lies.

    Returns ``dest_dir`` for an extracted archive (its members are merged into
    ``dest_dir``), ``dest_dir/<name>`` for a downloaded or linked file, and the
    link ``dest_dir/<folder name>`` (or the folder itself when it already lies
    inside ``dest_dir``) for a local folder. ``retries`` bounds the attempts
    after a connection error or HTTP 429/5xx, waiting ``backoff * 2**n`` s
    (at most 30 s) between them; ``timeout`` is the seconds without data after
    which an attempt counts as failed. Raises ``FinePoseError`` with the fix.
    """
    path, _ = _fetch_one(
        source, dest_dir, sha256=sha256, extract=extract, credentials_env=credentials_env,
        progress=progress, name=name, force=force, retries=retries, backoff=backoff, timeout=timeout,
    )
    return path


def fetch_dataset(
    spec: dict,
    dest_dir: str | os.PathLike,
    *,
    progress: bool = True,
    force: bool = False,
    where: str = "fetch",
    **options: Any,
) -> dict:
    """Fetch every source of a config entry (``datasets.<NAME>.fetch``) into ``dest_dir``.

    ``spec`` is ``{"sources": [{"url" | "path": ..., "sha256": ..., "extract": ..., "name": ...}, ...],
    "credentials_env": "PREFIX"}``; ``where`` names the entry in errors. ``options`` go to
    :func:`fetch` (``retries``, ``backoff``, ``timeout``). Returns a JSON-able report:
    ``{"dest", "up_to_date", "sources": [{"source", "kind", "path", "sha256", "files", "up_to_date"}]}``.
    """
    if not isinstance(spec, dict):
        raise FinePoseError(f"{where} must be a mapping with a 'sources' list, not {type(spec).__name__}")
    _reject_config_credentials(spec, where)
    unknown = sorted(set(spec) - {"sources", "credentials_env"})
    if unknown:
        raise FinePoseError(f"{where}: unknown key(s) {unknown}; allowed: sources, credentials_env")
    sources = spec.get("sources")
    if isinstance(sources, (str, dict)):
        sources = [sources]
    if not sources or not isinstance(sources, list):
        raise FinePoseError(f"{where}.sources must be a non-empty list of {{url: ...}} or {{path: ...}} entries")
    default_env = spec.get("credentials_env")
    dest = Path(dest_dir).expanduser().absolute()
    report: dict[str, Any] = {"dest": str(dest), "sources": []}
    for index, item in enumerate(sources):
        at = f"{where}.sources[{index}]"
        item = _normalise_source_entry(item, at)
        source = item.get("url", item.get("path"))
        path, entry = _fetch_one(
            source, dest, sha256=_check_sha256(item.get("sha256"), f"{at}.sha256"),
            extract=bool(item.get("extract", True)), credentials_env=item.get("credentials_env", default_env),
            progress=progress, name=item.get("name"), force=force, **options,
        )
        report["sources"].append({
            "source": entry["source"], "kind": entry["kind"], "path": str(path), "sha256": entry.get("sha256"),
            "files": len(entry.get("files", [])), "up_to_date": entry["up_to_date"],
        })
    report["up_to_date"] = all(s["up_to_date"] for s in report["sources"])
    return report


_CREDENTIAL_KEYS = frozenset({
    "username", "user", "login", "password", "passwd", "pass", "token", "api_key", "apikey", "auth",
    "authorization", "cookie", "secret", "credentials",
})


def _reject_config_credentials(mapping: dict, where: str) -> None:
    found = sorted(k for k in mapping if str(k).lower() in _CREDENTIAL_KEYS)
    if found:
        raise FinePoseError(
            f"{where} holds credentials ({', '.join(found)}): logins never go in config files. Remove them, "
            "set `credentials_env: PREFIX` there and export " + _env_var_help("PREFIX")
        )


def _normalise_source_entry(item: Any, where: str) -> dict:
    if isinstance(item, (str, os.PathLike)):
        text = os.fspath(item)
        item = {"url": text} if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text) else {"path": text}
    if not isinstance(item, dict):
        raise FinePoseError(f"{where} must be a mapping with 'url' or 'path', not {type(item).__name__}")
    _reject_config_credentials(item, where)
    unknown = sorted(set(item) - {"url", "path", "sha256", "extract", "name", "credentials_env"})
    if unknown:
        raise FinePoseError(
            f"{where}: unknown key(s) {unknown}; allowed: url, path, sha256, extract, name, credentials_env"
        )
    if ("url" in item) == ("path" in item):
        raise FinePoseError(f"{where} needs exactly one of 'url' and 'path'")
    if "url" in item:
        url = str(item["url"])
        if not re.match(r"^https?://", url, re.I):
            raise FinePoseError(f"{where}.url {redact_url(url)} is not an http(s) URL (local files go under 'path')")
        if "@" in urlsplit(url).netloc:
            raise FinePoseError(
                f"{where}.url {redact_url(url)} carries a login: logins never go in config files. Remove it from "
                "the URL, set `credentials_env: PREFIX` and export " + _env_var_help("PREFIX")
            )
    if "extract" in item and not isinstance(item["extract"], bool):
        raise FinePoseError(f"{where}.extract must be true or false, not {item['extract']!r}")
    return item


# ----------------------------------------------------------------------------- one source


def _fetch_one(
    source, dest_dir, *, sha256, extract, credentials_env, progress, name, force,
    retries: int = 5, backoff: float = 1.0, timeout: float = 60.0,
) -> tuple[Path, dict]:
    src = _parse_source(source)
    expected = _check_sha256(sha256)
    if name is not None:
        name = _safe_filename(str(name), "name")
    if retries < 0 or timeout <= 0 or backoff < 0:
        raise FinePoseError("retries and backoff must be >= 0 and timeout > 0")
    dest = Path(dest_dir).expanduser().absolute()
    if dest.exists() and not dest.is_dir():
        raise FinePoseError(f"destination {dest} is a file: give a folder as --dest")
    if src.kind == "directory" and expected is not None:
        raise FinePoseError(f"--sha256 was given for {src.label}, a folder: sha256 checks apply to files and archives")
    if src.kind == "directory" and src.path.resolve() in dest.resolve().parents:
        raise FinePoseError(
            f"destination {dest} lies inside the source folder {src.path}: a link there would loop. "
            "Give a --dest outside it"
        )
    dest.mkdir(parents=True, exist_ok=True)
    request = {"source": src.label, "extract": bool(extract), "name": name}
    with _locked(dest):
        previous = next((e for e in _read_marker(dest)["entries"] if _entry_key(e) == _entry_key(request)), None)
        if not force and _is_current(previous, dest, src, expected):
            log.info("%s: already fetched into %s (per %s); nothing to do", src.label, dest, MARKER)
            return dest / previous["path"], {**previous, "up_to_date": True}
        if src.kind == "directory":
            entry = _use_directory(src, dest, name)
        elif src.kind == "file":
            entry = _use_local_file(src, dest, expected, extract, name)
        else:
            creds = credentials_from_env(credentials_env)
            entry = _use_url(src, dest, expected, extract, name, creds, progress=progress, retries=retries,
                             backoff=backoff, timeout=timeout)
        entry = {**request, **entry, "kind": src.kind,
                 "fetched_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        _record(dest, entry)
    return dest / entry["path"], {**entry, "up_to_date": False}


def _link(dest: Path, link_name: str, target: Path) -> Path:
    """Point ``dest/link_name`` at ``target`` (atomic: a temporary link renamed over the name)."""
    link = dest / link_name
    if link.is_symlink():
        if os.readlink(link) == str(target):
            return link
        log.info("%s pointed to %s; it now points to %s", link, os.readlink(link), target)
    elif link.exists():
        raise FinePoseError(
            f"{link} already exists and is not a link; fetch will not replace it with a link to {target}. "
            "Move it away, or give the source another name ('name' in the config)"
        )
    tmp = dest / f".{link_name}.link-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    return link


def _use_directory(src: _Source, dest: Path, name: str | None) -> dict:
    real_src, real_dest = src.path.resolve(), dest.resolve()
    if real_src == real_dest or real_dest in real_src.parents:
        log.info("%s already lies in %s; used in place", src.path, dest)
        return {"path": os.path.relpath(real_src, real_dest), "files": [], "link": False, "sha256": None}
    link_name = name or src.path.name
    link = _link(dest, link_name, src.path)
    log.info("linked %s -> %s (used in place, nothing copied)", link, src.path)
    return {"path": link_name, "files": [link_name], "link": True, "sha256": None}


def _use_local_file(src: _Source, dest: Path, expected: str | None, extract: bool, name: str | None) -> dict:
    digest = None
    if expected is not None:
        digest = sha256_file(src.path)
        if digest != expected:
            raise FinePoseError(
                f"sha256 mismatch for {src.path}: expected {expected}, got {digest}. The file was left as it is; "
                "check that it is the right release file (or fix the sha256 in the config)"
            )
    stat_now = _source_stat(src.path)
    kind = None
    if extract:
        kind = _archive_kind(src.path.name) or (_sniff_archive(src.path) if _maybe_archive(src.path.name) else None)
    if kind:
        files = _extract_archive(src.path, kind, dest, src.label)
        return {"path": ".", "files": files, "sha256": digest, "source_stat": stat_now}
    link_name = name or src.path.name
    _link(dest, link_name, src.path)
    log.info("linked %s -> %s (used in place, nothing copied)", dest / link_name, src.path)
    return {"path": link_name, "files": [link_name], "sha256": digest, "source_stat": stat_now, "link": True}


def _use_url(src: _Source, dest: Path, expected: str | None, extract: bool, name: str | None, creds: Credentials,
             *, progress: bool, retries: int, backoff: float, timeout: float) -> dict:
    if src.url_login is not None:
        if creds.given:
            log.warning("%s carries a login in the URL; the one from %s is used instead", src.label, creds.describe)
        else:
            log.warning("%s carries a login in the URL; prefer --credentials-env (URLs show in process lists)",
                        src.label)
            user, password = src.url_login
            creds = Credentials(prefix=None, auth=requests.auth.HTTPBasicAuth(user, password),
                                secrets=tuple(s for s in (user, password) if s), describe="the URL's login")
    filename = name or _safe_filename(_url_filename(src.url), f"file name of {src.label}")
    staged = extract and (_archive_kind(filename) is not None or _maybe_archive(filename))
    stage_dir = dest / DOWNLOADS if staged else dest
    final = stage_dir / filename
    digest = None
    if expected is not None and final.is_file():  # a verified download whose extraction did not finish
        if sha256_file(final) == expected:
            log.info("reusing %s (sha256 matches)", final)
            digest = expected
    if digest is None:
        digest = _download(src, final, expected, creds, progress=progress, retries=retries, backoff=backoff,
                           timeout=timeout)
    kind = None
    if extract:
        kind = _archive_kind(filename) or (_sniff_archive(final) if _maybe_archive(filename) else None)
    if kind:
        try:
            files = _extract_archive(final, kind, dest, src.label)
        except FinePoseError:  # corrupt or unsafe content
            if expected is None:  # unverified: a re-run downloads it again anyway
                with contextlib.suppress(FileNotFoundError):
                    final.unlink()
                _remove_empty(stage_dir)
            raise
        final.unlink()
        _remove_empty(stage_dir)
        return {"path": ".", "files": files, "sha256": digest}
    if stage_dir != dest:
        os.replace(final, dest / filename)
        _remove_empty(stage_dir)
    return {"path": filename, "files": [filename], "sha256": digest}


def _remove_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


# ----------------------------------------------------------------------------- HTTP download


class _Transient(Exception):
    """An attempt failed in a way worth retrying (connection cut, timeout, HTTP 429/5xx)."""


_NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    requests.exceptions.ConnectionError, requests.exceptions.Timeout, requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError, http.client.HTTPException, ConnectionError, TimeoutError,
)


def _describe_network_error(exc: BaseException, timeout: float, creds: Credentials) -> str:
    chain = _exception_chain(exc)
    # urllib3's NewConnectionError subclasses its TimeoutError: test it first.
    refused = any(isinstance(e, urllib3.exceptions.NewConnectionError) for e in chain)
    if not refused and any(
        isinstance(e, (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)) for e in chain
    ):
        return f"timed out (no data for {timeout:g} s)"
    deepest = chain[-1]
    text = deepest.args[0] if deepest.args and isinstance(deepest.args[0], str) else str(deepest)
    errno_at = text.find("[Errno")
    text = text[errno_at:] if errno_at >= 0 else f"{type(deepest).__name__}: {text}"
    text = creds.scrub(text.strip(" )'\""))[:300]
    if refused:
        return f"could not connect ({text})"
    return f"connection broken ({text})"


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it wraps (requests wraps urllib3, which wraps the socket error)."""
    chain = [exc]
    for _ in range(6):  # bounded walk
        current = chain[-1]
        inner = getattr(current, "reason", None)
        if not isinstance(inner, BaseException):
            inner = current.args[0] if current.args and isinstance(current.args[0], BaseException) else None
        if inner is None or inner in chain:
            break
        chain.append(inner)
    return chain


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """'bytes 100-199/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000)."""
    match = re.match(r"^\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*$", value or "")
    if not match:
        return None, None
    start = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return start, total


def _download(src: _Source, final: Path, expected: str | None, creds: Credentials, *, progress: bool,
              retries: int, backoff: float, timeout: float) -> str:
    """Download ``src.url`` to ``final`` through ``final.part``; returns the sha256 of the bytes."""
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    meta_path = final.with_name(final.name + ".part.json")
    meta = None
    with contextlib.suppress(OSError, ValueError):
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if part.exists() and (not isinstance(meta, dict) or meta.get("source") != src.label):
        log.info("discarding %s: it is a partial download of another source", part)
        part.unlink()
        meta = None
    state = {"validator": (meta or {}).get("validator")}
    failures = restarts = 0
    session = requests.Session()
    session.headers.update({"User-Agent": "finepose-fetch/1", "Accept-Encoding": "identity"})
    if creds.cookie:  # in the jar, bound to this host: a redirect elsewhere does not carry it
        host = urlsplit(src.url).hostname
        for pair in creds.cookie.split(";"):
            cookie_name, sep, value = pair.strip().partition("=")
            if cookie_name and sep:
                session.cookies.set(cookie_name, value, domain=host, path="/")
    with session:
        while True:  # bounded: `failures` <= retries, `restarts` <= 2
            try:
                digest = _attempt(session, src, final, part, meta_path, state, creds, progress=progress,
                                  timeout=timeout)
            except _Transient as exc:
                reason = str(exc)
            except requests.exceptions.SSLError as exc:
                detail = creds.scrub(str(_exception_chain(exc)[-1]))[:300]
                raise FinePoseError(f"TLS error talking to {src.label}: {detail}") from None
            except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema) as exc:
                raise FinePoseError(f"invalid URL {src.label}: {creds.scrub(str(exc))}") from None
            except _NETWORK_ERRORS as exc:
                reason = _describe_network_error(exc, timeout, creds)
            except requests.exceptions.RequestException as exc:  # too many redirects, bad headers, ...
                raise FinePoseError(
                    f"request to {src.label} failed: {type(exc).__name__}: {creds.scrub(str(exc))[:300]}"
                ) from None
            else:
                if digest is None:  # the server refused the resume range: start again from byte 0
                    restarts += 1
                    if restarts > 2:
                        raise FinePoseError(f"{src.label}: the server keeps refusing the download range; giving up")
                    continue
                break
            failures += 1
            if failures > retries:
                kept = ""
                if part.exists() and part.stat().st_size:
                    kept = (f" The {part.stat().st_size} bytes received so far are kept in {part}; "
                            "run fetch again to resume.")
                raise FinePoseError(
                    f"could not download {src.label}: {reason} (gave up after {failures} attempt(s)).{kept}"
                ) from None
            wait = min(backoff * 2 ** (failures - 1), _MAX_BACKOFF_S)
            log.warning("%s: %s; retry %d/%d in %.1f s", src.label, reason, failures, retries, wait)
            time.sleep(wait)

    if expected is not None and digest != expected:
        for leftover in (part, meta_path):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        raise FinePoseError(
            f"sha256 mismatch for {final.name} downloaded from {src.label}: expected {expected}, got {digest}. "
            "The download was deleted. Check the URL and sha256 in the config (a wrong login often yields an "
            "HTML page instead of the file), then run fetch again"
        )
    with open(part, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(part, final)
    with contextlib.suppress(FileNotFoundError):
        meta_path.unlink()
    if expected is None:
        log.info("%s: no sha256 given; downloaded file has sha256 %s (add it to the config to pin it)",
                 final.name, digest)
    log.info("downloaded %s (%d bytes) to %s", src.label, final.stat().st_size, final)
    return digest


def _attempt(session, src: _Source, final: Path, part: Path, meta_path: Path, state: dict, creds: Credentials,
             *, progress: bool, timeout: float) -> str | None:
    """One GET. Returns the sha256 when ``part`` is complete, None to restart from byte 0; raises _Transient."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if state.get("validator"):
            headers["If-Range"] = state["validator"]
        log.info("resuming %s from byte %d", src.label, offset)
    response = session.get(src.url, headers=headers, stream=True, timeout=(min(timeout, 30.0), timeout),
                           auth=creds.auth, allow_redirects=True)
    with response:
        status = response.status_code
        if status in (401, 403):
            raise FinePoseError(_auth_error(status, src, creds))
        if status in (404, 410):
            raise FinePoseError(
                f"HTTP {status} (not found) for {src.label}: check the URL in the config or on the command line"
            )
        if status in _RETRY_STATUS:
            raise _Transient(f"HTTP {status} {response.reason or ''}".strip())
        if status == 416:  # nothing left to send from `offset`: the part may already be complete
            _, total = _parse_content_range(response.headers.get("Content-Range"))
            if offset and total == offset:
                log.info("%s: %s is already complete", src.label, part.name)
                return sha256_file(part)
            log.info("%s: server refused range bytes=%d-; downloading again from byte 0", src.label, offset)
            part.unlink(missing_ok=True)
            return None
        if status == 206 and offset:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != offset:
                log.info("%s: server answered the wrong range; downloading again from byte 0", src.label)
                part.unlink(missing_ok=True)
                return None
            mode = "ab"
        elif status == 200:
            if offset:
                log.info("%s: server ignored the Range request; downloading again from byte 0", src.label)
            offset, mode = 0, "wb"
            length = response.headers.get("Content-Length", "")
            total = int(length) if length.isdigit() else None
            content_type = response.headers.get("Content-Type", "").lower()
            if "text/html" in content_type and not final.name.lower().endswith((".html", ".htm")):
                raise FinePoseError(
                    f"{src.label} answered with an HTML page instead of the file (often a login or error page): "
                    "check the URL and the login (--credentials-env)"
                )
            state["validator"] = _validator(response.headers)
            atomic_write_json(meta_path, {"source": src.label, "validator": state["validator"]})
        else:
            raise FinePoseError(f"HTTP {status} {response.reason or ''} from {src.label}: unexpected answer")

        digest = hashlib.sha256()
        if mode == "ab":
            with open(part, "rb") as existing:
                for chunk in iter(lambda: existing.read(_CHUNK), b""):
                    digest.update(chunk)
        show = progress and sys.stderr.isatty()

        with open(part, mode) as out, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                           unit_divisor=1024, desc=final.name, disable=not show,
                                           leave=False) as bar:
            stream = response.raw.stream(_CHUNK, decode_content=False)
            while True:  # ends when the server's body ends or the connection breaks
                try:
                    chunk = next(stream)
                except StopIteration:
                    break
                except _NETWORK_ERRORS as exc:
                    out.flush()
                    raise _Transient(_describe_network_error(exc, timeout, creds)) from None
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        size = part.stat().st_size
        if total is not None and size < total:
            raise _Transient(f"connection closed after {size} of {total} bytes")
        if total is not None and size > total:
            log.info("%s: %s is longer than the file (%d > %d bytes); downloading again", src.label, part.name,
                     size, total)
            part.unlink()
            return None
        return digest.hexdigest()


def _validator(headers) -> str | None:
    """A strong ETag, else Last-Modified: sent as If-Range so a changed file restarts instead of mixing."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified")


def _auth_error(status: int, src: _Source, creds: Credentials) -> str:
    what = "Unauthorized" if status == 401 else "Forbidden"
    if creds.given and creds.prefix is None:
        how = "the server rejected the login given in the URL; check it (or use --credentials-env instead)"
    elif creds.given:
        how = (f"the server rejected the login from {creds.describe}; check those environment variables and "
               "that this account may download the file")
    elif creds.prefix:
        how = f"none of the login variables is set: export {_env_var_help(creds.prefix)}"
    else:
        how = ("the server needs a login. Name the environment variables that hold it with --credentials-env "
               "PREFIX (or `credentials_env: PREFIX` in the config's fetch entry) and export "
               + _env_var_help("PREFIX"))
    return f"HTTP {status} ({what}) from {src.label}: {how}"


# ----------------------------------------------------------------------------- safe extraction


class _Unsafe(FinePoseError):
    pass


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class _SafeExtractor:
    """Our rules for archive members, and a writer for zip members under ``root``.

    Tar members are written by ``tarfile`` itself through its ``data`` extraction
    filter (Python >= 3.11.4), which refuses absolute and escaping paths, links
    that leave the destination and device files, each checked against the folder
    as it is when that member is written. What the filter does not do is here:
    the stricter name rules of :meth:`relative` (the filter would silently strip a
    leading '/', and it allows '..' that stays inside), hard links only to files
    earlier in the archive, the final :meth:`verify` (a link that looked inside
    when made can point outside once later links exist), the list of extracted
    files, our messages, and the writer for zip archives, which have no filter:
    every zip write checks the real (link-resolved) parent folder at the moment
    of writing and opens files with O_NOFOLLOW.
    """

    def __init__(self, root: Path, label: str):
        self.root = os.path.realpath(root)
        self.label = label
        self.files: list[str] = []
        self.links: list[str] = []

    def unsafe(self, member: str, why: str) -> _Unsafe:
        return _Unsafe(
            f"unsafe archive {self.label}: member {member!r} {why}. Nothing was extracted; the archive is "
            "damaged or malicious, get it from a trusted source"
        )

    def relative(self, raw: str) -> str | None:
        """Archive member name -> normalised relative POSIX path (None for the archive root itself)."""
        name = raw.replace("\\", "/")
        if "\x00" in name:
            raise self.unsafe(raw, "has a NUL byte in its name")
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
            raise self.unsafe(raw, "has an absolute path")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise self.unsafe(raw, "has '..' in its path")
        return "/".join(parts) if parts else None

    def _place(self, rel: str, raw: str, *, is_dir: bool = False) -> str:
        path = os.path.join(self.root, *rel.split("/"))
        parent = os.path.dirname(path)
        if not _within(os.path.realpath(parent), self.root):
            raise self.unsafe(raw, "goes through a link that points outside the destination")
        try:
            os.makedirs(parent, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise self.unsafe(raw, "lies under a path that the archive also holds as a file") from None
        if not _within(os.path.realpath(parent), self.root):
            raise self.unsafe(raw, "goes through a link that points outside the destination")
        if os.path.lexists(path):
            if os.path.isdir(path) and not os.path.islink(path):
                if not is_dir:
                    raise self.unsafe(raw, "would replace a folder of the same archive")
            else:  # a duplicate member: replace it, never write through it
                os.unlink(path)
        return path

    def add_dir(self, rel: str, raw: str) -> None:
        path = self._place(rel, raw, is_dir=True)
        if not os.path.isdir(path):
            os.mkdir(path, 0o755)

    def add_file(self, rel: str, raw: str, data: BinaryIO, mode: int, mtime: float | None) -> None:
        path = self._place(rel, raw)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(data, out, _CHUNK)
        os.chmod(path, ((mode or 0o644) & 0o755) | 0o600)  # no setuid/setgid/sticky, no group/other write
        if mtime is not None:
            with contextlib.suppress(OSError, OverflowError, ValueError):
                os.utime(path, (mtime, mtime), follow_symlinks=False)
        self.files.append(rel)

    def add_symlink(self, rel: str, raw: str, target: str) -> None:
        norm = target.replace("\\", "/")
        if not norm or "\x00" in norm:
            raise self.unsafe(raw, "is a link with an empty or invalid target")
        if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
            raise self.unsafe(raw, f"is a link to the absolute path {target!r}")
        path = self._place(rel, raw)
        link_dir = os.path.realpath(os.path.dirname(path))
        if not _within(os.path.normpath(os.path.join(link_dir, norm)), self.root) or not _within(
            os.path.realpath(os.path.join(link_dir, norm)), self.root
        ):
            raise self.unsafe(raw, f"is a link pointing outside the destination ({target!r})")
        os.symlink(target, path)
        self.files.append(rel)
        self.links.append(rel)

    def verify(self) -> None:
        """After all members: every link and every file's folder still resolves inside the root."""
        for rel in self.links:
            if not _within(os.path.realpath(os.path.join(self.root, rel)), self.root):
                raise self.unsafe(rel, "is a link that resolves outside the destination (through other links)")
        for rel in self.files:
            if not _within(os.path.realpath(os.path.dirname(os.path.join(self.root, rel))), self.root):
                raise self.unsafe(rel, "lies under a link that resolves outside the destination")


def _extract_tar(archive: Path, ex: _SafeExtractor) -> None:
    """Extract with ``tarfile``'s ``data`` filter, wrapped in our rules and messages (see _SafeExtractor)."""
    files: set[str] = set()  # regular files so far: the only allowed hard-link targets

    def guard(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
        raw = member.name
        rel = ex.relative(raw)
        if rel is None:
            if member.isdir():
                return None  # the archive's own root ('.', './')
            raise ex.unsafe(raw, "has an empty name")
        try:
            member = tarfile.data_filter(member, dest)
        except tarfile.FilterError as exc:
            raise ex.unsafe(raw, _refusal(member, exc)) from None
        if member.islnk():
            target = posixpath.normpath(member.linkname.replace("\\", "/"))
            if target not in files:
                raise ex.unsafe(raw, f"is a hard link to {member.linkname!r}, which is not a file earlier in the "
                                     "archive")
        elif not (member.isreg() or member.isdir() or member.issym()):
            raise ex.unsafe(raw, f"has an unsupported type {member.type!r}")
        if member.isreg() or member.islnk():
            files.add(rel)
        elif rel in files:
            files.discard(rel)  # a later member of another type replaces the file
        if not member.isdir():
            ex.files.append(rel)
            if member.issym():
                ex.links.append(rel)
        return member

    with tarfile.open(archive, "r:*") as tar:
        # members=tar: one pass over the archive (members are read as they are extracted)
        tar.extractall(ex.root, members=tar, filter=guard)


def _refusal(member: tarfile.TarInfo, exc: tarfile.FilterError) -> str:
    """Why tarfile's data filter refused ``member``, in the words of our other messages."""
    kind = "hard link" if member.islnk() else "link"
    if isinstance(exc, tarfile.AbsolutePathError):
        return "has an absolute path"
    if isinstance(exc, tarfile.AbsoluteLinkError):
        return f"is a {kind} to the absolute path {member.linkname!r}"
    if isinstance(exc, tarfile.LinkOutsideDestinationError):
        return f"is a {kind} pointing outside the destination ({member.linkname!r})"
    if isinstance(exc, tarfile.OutsideDestinationError):
        return "would be written outside the destination (through a link of the archive)"
    if isinstance(exc, tarfile.SpecialFileError):
        if member.ischr() or member.isblk():
            return "is a device file"
        return "is a FIFO" if member.isfifo() else "is a special file"
    return f"was refused by tarfile's data filter ({exc})"


def _require_tar_filters(label: str) -> None:
    if not hasattr(tarfile, "data_filter"):  # added in Python 3.11.4 (and backported to 3.8.17, 3.9.17, 3.10.12)
        raise FinePoseError(
            f"cannot extract {label} safely: tar extraction needs Python 3.11.4 or later (tarfile's extraction "
            f"filters), this is Python {sys.version.split()[0]}. Upgrade Python, or extract the archive yourself "
            "and fetch the folder (--source DIR)"
        )


def _extract_zip(archive: Path, ex: _SafeExtractor) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            raw = info.filename
            rel = ex.relative(raw)
            mode = info.external_attr >> 16 if info.create_system == 3 else 0  # 3: Unix permissions
            if mode and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)):
                raise ex.unsafe(raw, "is a device file")
            if mode and (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
                raise ex.unsafe(raw, "is a FIFO or socket")
            if rel is None:
                if info.is_dir():
                    continue
                raise ex.unsafe(raw, "has an empty name")
            if info.is_dir():
                ex.add_dir(rel, raw)
            elif mode and stat.S_ISLNK(mode):
                ex.add_symlink(rel, raw, zf.read(info).decode("utf-8", errors="strict"))
            else:
                mtime = None
                with contextlib.suppress(OverflowError, ValueError):
                    mtime = time.mktime(info.date_time + (0, 0, -1))
                with zf.open(info) as data:
                    ex.add_file(rel, raw, data, stat.S_IMODE(mode) if mode else 0o644, mtime)


def _extract_archive(archive: Path, kind: str, dest: Path, label: str) -> list[str]:
    """Extract into a temporary folder inside ``dest``, then move the members into ``dest``.

    Returns the extracted files and links, relative to ``dest`` (sorted POSIX paths).
    """
    if kind != "zip":
        _require_tar_filters(label)
    tmp = Path(tempfile.mkdtemp(prefix=f".extract-{archive.name}-", dir=dest))
    try:
        ex = _SafeExtractor(tmp, label)
        try:
            (_extract_zip if kind == "zip" else _extract_tar)(archive, ex)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, UnicodeDecodeError,
                NotImplementedError, RuntimeError) as exc:  # the last two: encrypted / unsupported zip members
            raise FinePoseError(
                f"cannot read {archive} as a {kind} archive ({type(exc).__name__}: {exc}); it is truncated or not "
                "an archive: fetch it again (or pass --no-extract to keep the file as it is)"
            ) from None
        except _lzma_error() as exc:
            raise FinePoseError(f"cannot read {archive}: corrupt xz data ({exc}); fetch it again") from None
        except OSError as exc:
            if exc.errno is not None:  # a real I/O error (disk full, permissions): not the archive's fault
                raise
            # gzip and bz2 report bad data as OSError without an errno
            raise FinePoseError(f"cannot read {archive}: {exc}; it is truncated or corrupt: fetch it again") from None
        ex.verify()
        _merge_into(tmp, dest, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # never follows links
    log.info("extracted %d file(s) from %s into %s", len(ex.files), label, dest)
    return sorted(ex.files)


def _lzma_error() -> type[BaseException]:
    try:
        import lzma

        return lzma.LZMAError
    except ImportError:  # pragma: no cover - Python without lzma
        return tarfile.TarError


def _merge_into(src: Path, dst: Path, dest_root: Path) -> None:
    """Move the tree ``src`` into ``dst``: new names by rename, existing folders merged, files replaced."""
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        target = os.path.join(dst, entry.name)
        shown = os.path.relpath(target, dest_root)
        src_is_dir = entry.is_dir(follow_symlinks=False)
        if os.path.islink(target):
            if src_is_dir:
                raise FinePoseError(
                    f"cannot extract folder {shown!r}: {target} is a link (to {os.readlink(target)}) and fetch will "
                    "not write through it. Use another --dest for this archive"
                )
            os.replace(entry.path, target)
        elif os.path.isdir(target):
            if not src_is_dir:
                raise FinePoseError(f"cannot extract file {shown!r}: {target} is a folder. Move it away first")
            _merge_into(Path(entry.path), Path(target), dest_root)
        elif os.path.lexists(target):
            if src_is_dir:
                raise FinePoseError(f"cannot extract folder {shown!r}: {target} is a file. Move it away first")
            os.replace(entry.path, target)
        else:
            os.rename(entry.path, target)


# ----------------------------------------------------------------------------- CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to fetch (one of)")
    what.add_argument("--source", metavar="URL_OR_PATH", help="http(s) URL, local archive or local folder")
    what.add_argument("--config", metavar="YAML", type=Path, help="config file holding datasets.<NAME>.fetch")
    parser.add_argument("--dataset", metavar="NAME", help="dataset entry in --config")
    parser.add_argument("--dest", metavar="DIR", type=Path, required=True, help="folder to fetch into")
    parser.add_argument("--sha256", metavar="HEX", help="expected sha256 of the file (with --source)")
    parser.add_argument("--no-extract", action="store_true", help="keep archives as they are (with --source)")
    parser.add_argument("--name", metavar="FILE", help="file or link name in DIR (with --source)")
    parser.add_argument("--credentials-env", metavar="PREFIX",
                        help="read the login from PREFIX_USERNAME/PREFIX_PASSWORD or PREFIX_TOKEN")
    parser.add_argument("--force", action="store_true", help="fetch again even if .fetched.json says it is done")
    parser.add_argument("--retries", type=int, default=5, help="retries after a connection error (default 5)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds without data before retrying (default 60)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _load_dataset_spec(config: Path, dataset: str) -> dict:
    import yaml

    try:
        with open(config, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise FinePoseError(f"config {config} does not exist: give the path to config.yaml") from None
    except yaml.YAMLError as exc:
        raise FinePoseError(f"config {config} is not valid YAML: {exc}") from None
    datasets = data.get("datasets") if isinstance(data, dict) else None
    if not isinstance(datasets, dict) or dataset not in datasets:
        known = sorted(datasets) if isinstance(datasets, dict) else []
        raise FinePoseError(f"config {config} has no datasets.{dataset} (datasets there: {known or 'none'})")
    entry = datasets[dataset]
    if not isinstance(entry, dict) or "fetch" not in entry:
        raise FinePoseError(
            f"config {config} has no datasets.{dataset}.fetch: add `fetch: {{sources: [{{url: ...}}]}}` there, "
            "or call fetch with --source"
        )
    return entry["fetch"]


def run(args: argparse.Namespace) -> int:
    options = {"retries": args.retries, "timeout": args.timeout}
    progress = not args.no_progress
    if args.config is not None:
        if args.source is not None:
            raise FinePoseError("give either --source or --config/--dataset, not both")
        if not args.dataset:
            raise FinePoseError("--config needs --dataset NAME (the entry under datasets: in the config)")
        if args.sha256 or args.no_extract or args.name:
            raise FinePoseError("--sha256, --no-extract and --name go with --source; with --config put "
                                "sha256/extract/name in the config's sources")
        spec = _load_dataset_spec(args.config, args.dataset)
        if args.credentials_env:
            spec = {**spec, "credentials_env": args.credentials_env} if isinstance(spec, dict) else spec
        report = fetch_dataset(spec, args.dest, progress=progress, force=args.force,
                               where=f"{args.config}: datasets.{args.dataset}.fetch", **options)
    else:
        if args.source is None:
            raise FinePoseError("nothing to fetch: give --source URL_OR_PATH, or --config FILE --dataset NAME")
        if args.dataset:
            raise FinePoseError("--dataset goes with --config")
        path, entry = _fetch_one(args.source, args.dest, sha256=args.sha256, extract=not args.no_extract,
                                 credentials_env=args.credentials_env, progress=progress, name=args.name,
                                 force=args.force, **options)
        report = {"dest": str(Path(args.dest).absolute()), "up_to_date": entry["up_to_date"], "sources": [{
            "source": entry["source"], "kind": entry["kind"], "path": str(path), "sha256": entry.get("sha256"),
            "files": len(entry.get("files", [])), "up_to_date": entry["up_to_date"],
        }]}
    print(json.dumps(report, indent=2))
    return 0
