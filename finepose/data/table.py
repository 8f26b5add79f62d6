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
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from finepose.io import FinePoseError, atomic_path

METADATA_KEY = b"finepose"
FRAMES_FILE = "frames.parquet"
CAMERAS_FILE = "cameras.parquet"
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


def write_table(table: pa.Table, path: str | Path) -> None:
    """Write a Parquet file atomically (temp file in the same folder, then rename)."""
    with atomic_path(path, suffix=".parquet.tmp") as tmp:
        # Row groups of 64k rows keep column statistics fine-grained, so subject/split
        # filters in load_sequences skip most of a large table instead of scanning it.
        pq.write_table(table, tmp, compression="zstd", row_group_size=1 << 16)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``finepose`` schema metadata of a Parquet file, without reading its rows."""
    path = Path(path)
    if not path.exists():
        raise FinePoseError(f"{path}: no such file; run `python -m finepose prepare` for this dataset first")
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise FinePoseError(f"{path}: not a readable Parquet file ({exc}); delete it and rerun prepare") from exc
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def is_up_to_date(out_dir: str | Path, source_files: Mapping[str, str], reader_version: str,
                  options: Mapping[str, Any] | None = None) -> bool:
    """True when ``out_dir`` already holds tables made from exactly these inputs.

    Readers call this first so that a second run on unchanged input is a no-op.
    """
    out_dir = Path(out_dir)
    frames, cameras = out_dir / FRAMES_FILE, out_dir / CAMERAS_FILE
    if not (frames.exists() and cameras.exists()):
        return False
    try:
        meta = read_metadata(frames)
    except FinePoseError:
        return False
    return (
        meta.get("source_files") == dict(source_files)
        and meta.get("reader_version") == reader_version
        and meta.get("options", {}) == dict(options or {})
    )


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
