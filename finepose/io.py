"""Side-effect helpers shared by every stage: atomic writes, file hashes, clear I/O errors.

Every file the pipeline produces (Parquet tables, checkpoints, JSON summaries,
tables, figures) is written to a temporary file in the destination folder and
renamed over the final name, so a killed job never leaves a half-written
output under its final name. A full disk during such a write is a
:class:`DiskFullError` naming the file (the earlier file stays as it was), and
release files that cannot be decoded (:func:`load_npz`, :func:`reading_release_file`)
are a :class:`FinePoseError` naming the file, never a decoder's own traceback.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success.

    The temporary file lives in the same folder (same file system), so the final
    ``os.replace`` is atomic. On any exception the temporary file is removed and
    whatever stood at ``path`` before is left untouched.

    >>> with atomic_path("out/table.parquet") as tmp:
    ...     write_something(tmp)
    """
    path = Path(path)
    with disk_full_guard(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(path), suffix=suffix if suffix is not None else ".tmp",
                                        dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            yield tmp
            # mkstemp creates the file 0600; give it the permissions a plain open() would.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            with open(tmp, "rb+") as handle:  # make the bytes durable before the rename
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise


def temp_prefix(path: str | os.PathLike) -> str:
    """The name prefix of :func:`atomic_path`'s temporary files for ``path`` (``.<name>.``)."""
    return f".{Path(path).name}."


def remove_stale_temps(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete temporary files that :func:`atomic_path` left beside ``folder/<name>`` when a run was killed.

    Only our own temp names are touched: ``.<name>.<8 random characters><suffix>`` where the
    suffix ends in ``.tmp``. Call it only while no other process writes these names
    (e.g. under a lock). Returns the removed paths.
    """
    folder = Path(folder)
    removed = []
    for name in names:
        pattern = re.compile(re.escape(temp_prefix(name)) + r"[A-Za-z0-9_]{8}(\.[A-Za-z0-9_.]+)?\.tmp")
        for candidate in folder.glob(temp_prefix(name) + "*"):
            if pattern.fullmatch(candidate.name) and candidate.is_file() and not candidate.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    candidate.unlink()
                removed.append(candidate)
    return sorted(removed)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class FinePoseError(Exception):
    """An error a user can act on: the message names the file and the fix.

    The CLI prints these without a traceback and exits with status 2.
    """


class DiskFullError(FinePoseError):
    """A write failed because the file system is full (or the user's quota is spent)."""


_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def is_disk_full(exc: BaseException) -> bool:
    """True for an OSError that means "no space left" (pyarrow reports it without an errno, in the text)."""
    if not isinstance(exc, OSError):
        return False
    if exc.errno in _DISK_FULL_ERRNOS:
        return True
    text = str(exc)
    return "No space left on device" in text or "Disk quota exceeded" in text


@contextlib.contextmanager
def disk_full_guard(path: str | os.PathLike) -> Iterator[None]:
    """Turn a "no space left" OSError raised inside the block into a :class:`DiskFullError` naming ``path``."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        path = Path(path)
        raise DiskFullError(
            f"{path}: disk full while writing it ({exc.strerror or exc}). The earlier file under this name, if "
            f"any, is unchanged. Free space on that file system (`df -h {path.parent}`) or write elsewhere, then "
            "rerun the same command"
        ) from exc


REFETCH_HINT = ("fetch it again (`python -m finepose fetch` checks the sha256 given in the config's fetch entry) "
                "or compare `sha256sum` of the file with the release's checksum")


@contextlib.contextmanager
def reading_release_file(path: str | os.PathLike, kind: str) -> Iterator[None]:
    """Any failure to decode a release file inside the block becomes a FinePoseError naming it.

    Damaged files make decoders raise nearly anything (zlib.error, UnpicklingError,
    AttributeError, KeyError, OSError without errno, MemoryError for a size field that
    was hit); all of these mean the same thing to the user: the file is truncated or
    corrupt. FinePoseErrors raised inside (e.g. "no array X") pass through, and a
    file that cannot be opened at all (permissions, missing) says so instead.
    """
    try:
        yield
    except FinePoseError:
        raise
    except Exception as exc:  # noqa: BLE001 - every decoder failure means a damaged file
        raise release_file_error(path, kind, exc) from exc


def release_file_error(path: str | os.PathLike, kind: str, exc: BaseException) -> FinePoseError:
    """The FinePoseError for a release file whose decoder raised ``exc`` (see :func:`reading_release_file`)."""
    if isinstance(exc, FinePoseError):
        return exc
    if isinstance(exc, (PermissionError, FileNotFoundError, IsADirectoryError)):
        return FinePoseError(f"{path}: cannot read this {kind} file ({exc.strerror or exc})")
    text = str(exc).strip()
    detail = f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__
    return FinePoseError(f"{path}: truncated or corrupt {kind} file ({detail}); {REFETCH_HINT}")


def load_npz(path: str | os.PathLike, key: str, *, shown: str | None = None,
             expected: str = "an npz file of this release", allow_pickle: bool = True) -> Any:
    """The array ``key`` of the npz file ``path``; a pickled 0-d object array comes back as its object.

    ``shown`` is the name used in messages (default: the path). A missing key names
    the keys found; any decoding failure is a "truncated or corrupt" FinePoseError.
    ``allow_pickle`` (the VideoPose3D files are pickled dicts) runs code from the file:
    read only files you trust.
    """
    import numpy as np

    shown = str(path) if shown is None else shown
    with reading_release_file(shown, "npz"):
        with np.load(path, allow_pickle=allow_pickle) as npz:
            if key not in npz.files:
                raise FinePoseError(f"{shown}: no array {key!r} (found {', '.join(npz.files) or 'nothing'}); "
                                    f"not {expected}")
            value = npz[key]
        if value.dtype == object and value.shape == ():
            value = value.item()
    return value
