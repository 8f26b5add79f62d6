"""The canonical frame table: one Parquet row per frame of one person in one camera.

Every dataset reader (``finepose.data.h36m``, ``.mpi_inf_3dhp``, ``.egohumans``)
writes ``<out>/frames.parquet`` and ``<out>/cameras.parquet`` through this
module; the training and evaluation engine reads them through it. Nothing else
touches the Parquet layout.

Frame table columns
-------------------
dataset, split, subject, action, sequence, camera, person : string
frame         : int32, frame index within the sequence (0-based)
keypoints_2d  : fixed_size_list<float32>[J*2], ground-truth 2D in pixels
                (3D projected with the camera, or the dataset's own annot2)
keypoints_3d  : fixed_size_list<float32>[J*3], camera coordinates, metres
valid         : bool, frame is scored / usable (NaN frames are kept, marked False)
keypoints_2d_<source> : fixed_size_list<float32>[J*2], nullable, a detector's 2D
                in pixels (``sh``, ``cpn_ft_h36m_dbb``, ...), null where the
                detector has no output for that frame
confidence_2d_<source> : fixed_size_list<float32>[J], optional per-joint scores
Extra dataset-specific columns are allowed (e.g. ``keypoints_3d_univ`` for 3DHP).

Camera table columns
--------------------
dataset, subject, camera : string
res_w, res_h : int32
fx, fy, cx, cy : float64 (pixels), null when unknown
k : list<float64> radial distortion (H36M: 3 values), p : list<float64> tangential (2)
model : string, ``pinhole`` | ``pinhole_radtan`` (H36M) | ``fisheye_aria`` | ``unknown``
intrinsics_source : string, ``calibration`` | ``fitted`` | ``missing``

Schema metadata (key ``finepose``) is a JSON object with at least:
``dataset``, ``joint_set`` (a name in ``finepose.skeleton``), ``dataset_info`` (the reader's
``finepose.datasets.DatasetInfo.to_dict()``: joint set definition and mappings, actions,
prompt layout, multi-person, camera model, metric families, groupings), ``units``,
``sources_2d`` (list of detector source names), ``source_files``
({relative path: sha256}), ``reader`` (module) and ``reader_version``.

One dataset, one commit
-----------------------
A reader writes its two tables with :func:`write_dataset`, which commits them as
one unit: both tables are written to temporary files, the old ``manifest.json``
is removed, both are renamed into place, and a new ``manifest.json`` is written
last. The manifest records each table's sha256 and size, the input identity
(``source_files``, ``reader``, ``reader_version``, ``options``, the release
folder) and a random ``commit`` id that both tables also carry in their metadata
(keys ``commit`` and ``prepared_from``, the release folder). So a kill or a full disk at any point leaves either the
previous complete dataset or a folder that every reader refuses:

* :func:`is_up_to_date` (a rerun of prepare) accepts the folder only when the
  manifest matches the inputs and both tables' sizes and sha256;
* :func:`read_metadata`, :func:`read_table`, :func:`load_sequences` and
  :func:`load_cameras` check that a table carrying a commit id belongs to the
  folder's manifest (commit id and size), and otherwise say which prepare
  command to run.

Tables written on their own with :func:`write_table` (tests, other tools, output
of earlier versions) carry no commit id and are read as they are.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from finepose.io import FinePoseError, atomic_path, atomic_write_json, remove_stale_temps, sha256_file

log = logging.getLogger(__name__)

METADATA_KEY = b"finepose"
FRAMES_FILE = "frames.parquet"
CAMERAS_FILE = "cameras.parquet"
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".prepare.lock"
MANIFEST_FORMAT = 1
_TABLE_FILES = (CAMERAS_FILE, FRAMES_FILE)
_PARQUET_TMP = ".parquet.tmp"
STRING_COLUMNS = ("dataset", "split", "subject", "action", "sequence", "camera", "person")
SOURCE_PREFIX = "keypoints_2d_"
CONFIDENCE_PREFIX = "confidence_2d_"


def _fixed_list(values: np.ndarray, width: int, mask: np.ndarray | None = None) -> pa.Array:
    """(rows, ...) float array -> fixed_size_list<float32>[width]; rows where ``mask`` is True are null."""
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    null_mask = pa.array(mask, type=pa.bool_()) if mask is not None and mask.any() else None
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), width, mask=null_mask)


def build_frame_table(
    columns: Mapping[str, Any],
    num_joints: int,
    metadata: Mapping[str, Any],
) -> pa.Table:
    """Assemble a frame table from numpy columns, checking shapes and dtypes.

    ``columns`` holds the string columns (sequences of str, or one str for the whole
    table), ``frame`` (int), ``keypoints_2d`` (rows, J, 2), ``keypoints_3d``
    (rows, J, 3), ``valid`` (rows,) bool, and optional ``keypoints_2d_<source>``
    (rows, J, 2) with NaN rows meaning "no detection" (stored as null).
    """
    rows = len(columns["frame"])
    arrays: dict[str, pa.Array] = {}
    for name in STRING_COLUMNS:
        value = columns[name]
        if isinstance(value, str):
            arrays[name] = pa.array([value] * rows, type=pa.string()).dictionary_encode()
        else:
            if len(value) != rows:
                raise ValueError(f"column {name!r} has {len(value)} rows, expected {rows}")
            arrays[name] = pa.array(list(value), type=pa.string()).dictionary_encode()
    arrays["frame"] = pa.array(np.asarray(columns["frame"], dtype=np.int32))
    for name, dims in (("keypoints_2d", 2), ("keypoints_3d", 3)):
        values = np.asarray(columns[name])
        if values.shape != (rows, num_joints, dims):
            raise ValueError(f"{name} has shape {values.shape}, expected ({rows}, {num_joints}, {dims})")
        arrays[name] = _fixed_list(values, num_joints * dims)
    arrays["valid"] = pa.array(np.asarray(columns["valid"], dtype=bool))
    for name, value in columns.items():
        if name in arrays or name in STRING_COLUMNS:
            continue
        values = np.asarray(value)
        if name.startswith(SOURCE_PREFIX) or name == "keypoints_3d_univ":
            dims = 2 if name.startswith(SOURCE_PREFIX) else 3
            if values.shape != (rows, num_joints, dims):
                raise ValueError(f"{name} has shape {values.shape}, expected ({rows}, {num_joints}, {dims})")
            # A row with any non-finite value is "no detection" (null), never zeros.
            missing = ~np.isfinite(values.reshape(rows, -1)).all(axis=1)
            arrays[name] = _fixed_list(np.nan_to_num(values), num_joints * dims, missing)
        elif name.startswith(CONFIDENCE_PREFIX):
            arrays[name] = _fixed_list(values, num_joints)
        else:
            arrays[name] = pa.array(values)
    table = pa.table(arrays)
    meta = dict(metadata)
    meta.setdefault("num_joints", num_joints)
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})


def _write_parquet(table: pa.Table, path: str | Path) -> None:
    # Row groups of 64k rows keep column statistics fine-grained, so subject/split
    # filters in load_sequences skip most of a large table instead of scanning it.
    pq.write_table(table, path, compression="zstd", row_group_size=1 << 16)


def write_table(table: pa.Table, path: str | Path) -> None:
    """Write a Parquet file atomically (temp file in the same folder, then rename).

    For a dataset's frames and cameras tables use :func:`write_dataset`, which
    commits the two together.
    """
    with atomic_path(path, suffix=_PARQUET_TMP) as tmp:
        _write_parquet(table, tmp)


def _table_meta(table: pa.Table) -> dict[str, Any]:
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def _with_meta(table: pa.Table, **extra: Any) -> pa.Table:
    meta = {**_table_meta(table), **extra}
    return table.replace_schema_metadata({**(table.schema.metadata or {}),
                                          METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})


@contextlib.contextmanager
def _writer_lock(out_dir: Path) -> Iterator[None]:
    """One prepare at a time writes into ``out_dir`` (flock on ``out_dir/.prepare.lock``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lock_path = out_dir / LOCK_FILE
    with open(lock_path, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FinePoseError(f"another prepare is writing into {out_dir} (it holds {lock_path}); "
                                "wait for it to finish, then run again") from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(out_dir: Path) -> None:
    """Delete the temporary files a killed earlier prepare left in ``out_dir`` (our own names only)."""
    for path in remove_stale_temps(out_dir, (*_TABLE_FILES, MANIFEST_FILE)):
        log.info("removed %s, left by an interrupted earlier run", path)


def _prepare_command(out_dir: Path, dataset: str | None, raw_dir: str | None) -> str:
    return (f"python -m finepose prepare --dataset {dataset or '<dataset>'} --raw {raw_dir or '<release folder>'} "
            f"--out {out_dir}")


def write_dataset(out_dir: str | Path, frames: pa.Table, cameras: pa.Table, *,
                  raw_dir: str | Path | None = None) -> dict[str, Any]:
    """Commit a dataset's frames and cameras tables as one unit; returns the manifest.

    Both tables go to temporary files first (a full disk here leaves the previous
    dataset exactly as it was), then the old manifest is removed, both tables are
    renamed into place and the new manifest is written last. The input identity
    recorded in the manifest is taken from the frames table's metadata.
    """
    out_dir = Path(out_dir)
    meta = _table_meta(frames)
    commit = uuid.uuid4().hex
    raw = str(Path(raw_dir).resolve()) if raw_dir is not None else None
    # both tables carry the commit id (and the release folder, for the "run this" messages)
    frames, cameras = (_with_meta(t, commit=commit, prepared_from=raw) for t in (frames, cameras))
    with _writer_lock(out_dir):
        _remove_leftovers(out_dir)
        manifest_path = out_dir / MANIFEST_FILE
        entries: dict[str, dict[str, Any]] = {}
        with atomic_path(out_dir / CAMERAS_FILE, suffix=_PARQUET_TMP) as cameras_tmp, \
                atomic_path(out_dir / FRAMES_FILE, suffix=_PARQUET_TMP) as frames_tmp:
            for name, data, tmp in ((CAMERAS_FILE, cameras, cameras_tmp), (FRAMES_FILE, frames, frames_tmp)):
                _write_parquet(data, tmp)
                entries[name] = {"sha256": sha256_file(tmp), "bytes": tmp.stat().st_size}
            # From here until the new manifest exists the folder reads as "not committed".
            manifest_path.unlink(missing_ok=True)
        manifest = {
            "format": MANIFEST_FORMAT, "commit": commit, "dataset": meta.get("dataset"),
            "reader": meta.get("reader"), "reader_version": meta.get("reader_version"),
            "options": meta.get("options", {}), "source_files": meta.get("source_files", {}),
            "raw": raw, "tables": entries,
        }
        atomic_write_json(manifest_path, manifest)
    return manifest


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """``data_dir/manifest.json``, checked for shape; a FinePoseError saying what to run when absent or damaged."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FinePoseError(
            f"{data_dir}: no {MANIFEST_FILE}, so its tables were never committed together (prepare was "
            f"interrupted, or the tables were copied in by hand); run `{_prepare_command(data_dir, None, None)}` "
            "(no --force needed: it rebuilds what is not committed)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FinePoseError(f"{path}: unreadable ({exc}); run `{_prepare_command(data_dir, None, None)}` "
                            "to rebuild the dataset") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("tables"), dict) or "commit" not in manifest:
        raise FinePoseError(f"{path}: not a finepose dataset manifest; run "
                            f"`{_prepare_command(data_dir, None, None)}` to rebuild the dataset")
    return manifest


def _check_committed(path: Path, meta: Mapping[str, Any]) -> None:
    """A frames/cameras table must belong to its folder's manifest (same commit id and size)."""
    if path.name not in _TABLE_FILES:
        return
    manifest_path = path.parent / MANIFEST_FILE
    commit = meta.get("commit")
    if commit is None and not manifest_path.exists():
        return  # a table written on its own (write_table): nothing to check it against
    if commit is not None and not manifest_path.exists():
        raise FinePoseError(
            f"{path}: the dataset in {path.parent} is incomplete: {MANIFEST_FILE} is missing, so prepare was "
            f"interrupted while replacing the tables; run "
            f"`{_prepare_command(path.parent, meta.get('dataset'), meta.get('prepared_from'))}` "
            "(no --force needed: it rebuilds what is not committed)")
    manifest = read_manifest(path.parent)
    entry = manifest["tables"].get(path.name)
    size = path.stat().st_size
    if manifest.get("commit") != commit or not isinstance(entry, dict) or entry.get("bytes") != size:
        why = ("is not listed in it" if not isinstance(entry, dict)
               else f"has {size} bytes, the manifest says {entry.get('bytes')}" if entry.get("bytes") != size
               else "comes from another prepare run than the manifest")
        command = _prepare_command(path.parent, manifest.get("dataset") or meta.get("dataset"),
                                   manifest.get("raw") or meta.get("prepared_from"))
        raise FinePoseError(
            f"{path} does not belong to the dataset recorded in {manifest_path}: it {why} (an interrupted prepare, "
            f"or files copied in by hand). Run `{command}` (no --force needed: it rebuilds what is not committed)")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``finepose`` schema metadata of a Parquet file, without reading its rows.

    A dataset table (frames/cameras) that carries a commit id is checked against
    its folder's manifest first (see "One dataset, one commit" above).
    """
    path = Path(path)
    if not path.exists():
        raise FinePoseError(f"{path}: no such file; run `python -m finepose prepare` for this dataset first")
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise FinePoseError(f"{path}: not a readable Parquet file ({exc}); delete it and rerun prepare") from exc
    raw = (schema.metadata or {}).get(METADATA_KEY)
    meta = json.loads(raw) if raw else {}
    _check_committed(path, meta)
    return meta


def is_up_to_date(out_dir: str | Path, source_files: Mapping[str, str], reader_version: str,
                  options: Mapping[str, Any] | None = None) -> bool:
    """True when ``out_dir`` holds a committed dataset made from exactly these inputs.

    Readers call this first so that a second run on unchanged input is a no-op. The
    manifest must match the inputs, and both tables must match the manifest (size,
    sha256, commit id); anything else (no manifest, a table from another run, a
    damaged file) means "rebuild". Temporary files a killed earlier run left in
    ``out_dir`` are removed here (when no other prepare is writing there).
    """
    out_dir = Path(out_dir)
    if out_dir.is_dir():
        with contextlib.suppress(FinePoseError):
            with _writer_lock(out_dir):
                _remove_leftovers(out_dir)
    try:
        manifest = read_manifest(out_dir)
    except FinePoseError:
        return False
    if (manifest.get("source_files") != dict(source_files) or manifest.get("reader_version") != reader_version
            or manifest.get("options", {}) != json.loads(json.dumps(dict(options or {})))):
        return False
    for name in _TABLE_FILES:
        path, entry = out_dir / name, manifest["tables"].get(name)
        try:
            if not isinstance(entry, dict) or path.stat().st_size != entry.get("bytes"):
                return False
            if sha256_file(path) != entry.get("sha256") or read_metadata(path).get("commit") != manifest["commit"]:
                return False
        except (OSError, FinePoseError):
            return False
    return True


def read_table(path: str | Path, columns: Iterable[str] | None = None,
               filters: list | None = None) -> pa.Table:
    path = Path(path)
    read_metadata(path)  # clear error for a missing or damaged file
    return pq.read_table(path, columns=list(columns) if columns is not None else None, filters=filters)


def list_to_numpy(column: pa.ChunkedArray | pa.Array, inner: tuple[int, ...]) -> np.ndarray:
    """fixed_size_list<float32> column -> (rows, *inner) float32; null rows become NaN."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = int(np.prod(inner))
    values = column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    # ``.values`` of a sliced array starts at the slice's offset * width.
    start = column.offset * width
    out = values[start:start + len(column) * width].reshape((len(column),) + inner).copy()
    if column.null_count:
        out[~column.is_valid().to_numpy(zero_copy_only=False)] = np.nan
    return out


@dataclass
class Sequence:
    """One sequence of one person seen by one camera, as numpy arrays."""

    dataset: str
    subject: str
    action: str                  # the first frame's action (3DHP activities vary per frame: read the table)
    sequence: str
    camera: str
    person: str
    split: str
    frame: np.ndarray            # (N,) int32
    keypoints_2d: np.ndarray     # (N, J, 2) pixels, from the requested 2D source
    keypoints_3d: np.ndarray     # (N, J, 3) camera coordinates, metres
    valid: np.ndarray            # (N,) bool; False where 3D or 2D is missing / NaN
    keypoints_2d_gt: np.ndarray  # (N, J, 2) ground-truth 2D, for reprojection checks
    camera_info: dict[str, Any] = field(default_factory=dict)  # a cameras.parquet row

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.subject, self.sequence, self.camera, self.person)


def load_sequences(
    data_dir: str | Path,
    source_2d: str = "gt",
    subjects: Iterable[str] | None = None,
    split: str | None = None,
) -> list[Sequence]:
    """Read a prepared dataset folder into per-(subject, sequence, camera, person) arrays.

    ``source_2d`` is ``gt`` (the ``keypoints_2d`` column) or a detector source
    name (column ``keypoints_2d_<source>``). Frames where the chosen source has
    no detection are marked invalid, never dropped.
    """
    data_dir = Path(data_dir)
    frames_path = data_dir / FRAMES_FILE
    meta = read_metadata(frames_path)
    num_joints = int(meta["num_joints"])
    column_2d = "keypoints_2d" if source_2d == "gt" else SOURCE_PREFIX + source_2d
    names = pq.read_schema(frames_path).names
    if column_2d not in names:
        available = ["gt"] + [n[len(SOURCE_PREFIX):] for n in names if n.startswith(SOURCE_PREFIX)]
        raise FinePoseError(
            f"{frames_path}: no 2D source {source_2d!r}; available: {', '.join(available)}"
        )
    wanted = list(STRING_COLUMNS) + ["frame", "keypoints_2d", "keypoints_3d", "valid"]
    if column_2d != "keypoints_2d":
        wanted.append(column_2d)
    table = _read_rows(frames_path, wanted, subjects=subjects, split=split)
    if table.num_rows == 0:
        return []
    cameras = load_cameras(data_dir)

    def codes(name: str) -> tuple[np.ndarray, np.ndarray]:
        """Dictionary-encode a string column: (per-row int codes, distinct values)."""
        column = table.column(name).combine_chunks()
        if not pa.types.is_dictionary(column.type):
            column = column.dictionary_encode()
        return (column.indices.to_numpy(zero_copy_only=False).astype(np.int64),
                column.dictionary.to_numpy(zero_copy_only=False).astype(str))

    encoded = {name: codes(name) for name in STRING_COLUMNS}
    frame = table.column("frame").to_numpy()
    kp2d_gt = list_to_numpy(table.column("keypoints_2d"), (num_joints, 2))
    kp3d = list_to_numpy(table.column("keypoints_3d"), (num_joints, 3))
    kp2d = kp2d_gt if column_2d == "keypoints_2d" else list_to_numpy(table.column(column_2d), (num_joints, 2))
    valid = table.column("valid").to_numpy(zero_copy_only=False).astype(bool)
    valid &= np.isfinite(kp2d).all(axis=(1, 2)) & np.isfinite(kp3d).all(axis=(1, 2))

    # Group rows by (subject, sequence, camera, person) on the integer codes: one lexsort.
    key_codes = [encoded[n][0] for n in ("subject", "sequence", "camera", "person")]
    order = np.lexsort([frame] + key_codes[::-1])
    sorted_keys = np.stack([k[order] for k in key_codes], axis=1)
    bounds = np.flatnonzero((np.diff(sorted_keys, axis=0) != 0).any(axis=1)) + 1

    def value(name: str, row: int) -> str:
        row_codes, dictionary = encoded[name]
        return str(dictionary[row_codes[row]])

    out = []
    for rows in np.split(order, bounds):
        r0 = rows[0]
        subject, camera = value("subject", r0), value("camera", r0)
        out.append(Sequence(
            dataset=value("dataset", r0), subject=subject, action=value("action", r0),
            sequence=value("sequence", r0), camera=camera, person=value("person", r0),
            split=value("split", r0), frame=frame[rows], keypoints_2d=kp2d[rows],
            keypoints_3d=kp3d[rows], valid=valid[rows], keypoints_2d_gt=kp2d_gt[rows],
            camera_info=cameras.get((subject, camera), {}),
        ))
    out.sort(key=lambda s: s.key)
    return out


def _read_rows(path: Path, columns: list[str], *, subjects: Iterable[str] | None,
               split: str | None) -> pa.Table:
    """Read ``columns`` for the rows of the given subjects/split, touching only row groups that hold them.

    The filter columns are dictionary-encoded strings, cheap to read in full; the float
    columns are read only for the row groups that contain a matching row.
    """
    parquet = pq.ParquetFile(path)
    if subjects is None and split is None:
        return parquet.read(columns=columns)
    keys = parquet.read(columns=[c for c, v in (("subject", subjects), ("split", split)) if v is not None])
    mask = np.ones(keys.num_rows, dtype=bool)
    if subjects is not None:
        mask &= np.isin(keys.column("subject").to_numpy(zero_copy_only=False).astype(str), list(subjects))
    if split is not None:
        mask &= keys.column("split").to_numpy(zero_copy_only=False).astype(str) == split
    sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    groups = [i for i in range(len(sizes)) if mask[starts[i]:starts[i + 1]].any()]
    if not groups:
        return parquet.schema_arrow.empty_table().select(columns)
    table = parquet.read_row_groups(groups, columns=columns)
    kept = np.concatenate([mask[starts[i]:starts[i + 1]] for i in groups])
    return table.filter(pa.array(kept))


def load_cameras(data_dir: str | Path) -> dict[tuple[str, str], dict[str, Any]]:
    """cameras.parquet as {(subject, camera): row dict}."""
    path = Path(data_dir) / CAMERAS_FILE
    read_metadata(path)
    rows = pq.read_table(path).to_pylist()
    return {(row["subject"], row["camera"]): row for row in rows}


def build_camera_table(rows: list[Mapping[str, Any]], metadata: Mapping[str, Any]) -> pa.Table:
    """Camera table from row dicts (see the module docstring for the columns)."""
    schema = pa.schema([
        ("dataset", pa.string()), ("subject", pa.string()), ("camera", pa.string()),
        ("res_w", pa.int32()), ("res_h", pa.int32()),
        ("fx", pa.float64()), ("fy", pa.float64()), ("cx", pa.float64()), ("cy", pa.float64()),
        ("k", pa.list_(pa.float64())), ("p", pa.list_(pa.float64())),
        ("model", pa.string()), ("intrinsics_source", pa.string()),
    ])
    normalised = [{name: row.get(name) for name in schema.names} for row in rows]
    table = pa.Table.from_pylist(normalised, schema=schema)
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(dict(metadata), sort_keys=True).encode()})
