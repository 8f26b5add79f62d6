"""The VideoPose3D npz layout, for any dataset whose description names the joints.

VideoPose3D (and many lifting codebases after it) ship a dataset as::

    data_3d_<name>.npz             positions_3d[subject][action] (N, J3, 3) world metres
    data_2d_<name>_<source>.npz    positions_2d[subject][action][camera_index] (N, J2, 2) pixels,
                                   metadata {layout_name, num_joints, keypoints_symmetry}

A :class:`Layout` says, for one dataset, what ``<name>`` is, how the 3D file's joints become
the description's joint set, which 2D layouts (``layout_name``, ``num_joints``) are accepted
and in which joint set they are (converted with ``finepose.skeleton.convert``), and which
camera each camera index is. The readers here check shapes, dicts and the symmetry
metadata against that, and raise errors that name the file and the entry. A reader
(``finepose.data.h36m`` for Human3.6M) builds its Layout from its ``INFO`` and adds what
is its own (action names, cameras, splits).

npz files of this layout are pickled object arrays (``allow_pickle``): read only files you
trust, as with VideoPose3D itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from finepose import skeleton
from finepose.io import FinePoseError
from finepose.io import load_npz as io_load_npz


@dataclass(frozen=True)
class Layout:
    """How one dataset uses the layout (see the module docstring)."""

    name: str                                   # data_3d_<name>.npz, data_2d_<name>_<source>.npz
    joint_set: skeleton.JointSet                # the frame table's (the description's) joints
    joints_3d: int                              # joints per frame in positions_3d
    select_3d: tuple[int, ...] | None = None    # positions_3d joints -> joint_set (None: the same order)
    layouts_2d: Mapping[tuple[str, int], str] = field(default_factory=dict)  # (layout_name, J2) -> joint set
    camera_ids: tuple[str, ...] = ()            # camera name of each camera index
    subject_order: Callable[[str], Any] = str   # sort key of subject names

    @property
    def file_3d(self) -> str:
        return f"data_3d_{self.name}.npz"

    @property
    def prefix_2d(self) -> str:
        return f"data_2d_{self.name}_"


def load_npz(path: Path, rel: str, key: str, what: str = "VideoPose3D npz file") -> Any:
    """One array (a pickled dict comes back as the dict) of an npz file, with errors that name it
    (any decoding failure is a "truncated or corrupt" FinePoseError: finepose.io.load_npz)."""
    return io_load_npz(path, key, shown=rel, expected=f"a {what}")


def find_2d_files(raw_dir: Path, layout: Layout) -> dict[str, Path]:
    """{source: data_2d_<name>_<source>.npz} in ``raw_dir``."""
    prefix = layout.prefix_2d
    return {f.name[len(prefix):-4]: f for f in sorted(raw_dir.glob(f"{prefix}*.npz"))}


def read_3d(raw_dir: Path, layout: Layout, what: str) -> list[tuple[str, str, np.ndarray]]:
    """(subject, action name, world positions (N, J, 3) float64 in the layout's joint set) per take."""
    rel = layout.file_3d
    positions = load_npz(raw_dir / rel, rel, "positions_3d", what)
    if not isinstance(positions, dict):
        raise FinePoseError(f"{rel}: positions_3d is not a {{subject: {{action: array}}}} dict")
    out = []
    for subject in sorted(positions, key=layout.subject_order):
        actions = positions[subject]
        if not isinstance(actions, dict):
            raise FinePoseError(f"{rel}: positions_3d[{subject!r}] is not an {{action: array}} dict")
        for name in sorted(actions):
            values = np.asarray(actions[name])
            if values.ndim != 3 or values.shape[1:] != (layout.joints_3d, 3):
                raise FinePoseError(f"{rel} [{subject}][{name}]: array has shape {values.shape}, expected "
                                    f"(frames, {layout.joints_3d}, 3): world positions in metres")
            world = values if layout.select_3d is None else values[:, list(layout.select_3d)]
            out.append((subject, name, world.astype(np.float64)))
    if not out:
        raise FinePoseError(f"{rel}: positions_3d holds no sequences")
    return out


def read_2d(path: Path, rel: str, layout: Layout) -> list[tuple[str, str, str, np.ndarray]]:
    """(subject, action name, camera id, keypoints (N, J, 2) float32 in the layout's joint set) per take and camera."""
    meta = load_npz(path, rel, "metadata")
    positions = load_npz(path, rel, "positions_2d")
    if not isinstance(meta, dict) or not isinstance(positions, dict):
        raise FinePoseError(f"{rel}: metadata / positions_2d are not dicts; not a VideoPose3D 2D file")
    key = (meta.get("layout_name"), meta.get("num_joints"))
    if key not in layout.layouts_2d:
        accepted = ", ".join(f"layout_name {n!r} with num_joints {j}" for n, j in layout.layouts_2d)
        raise FinePoseError(f"{rel}: 2D layout {key[0]!r} with {key[1]} joints is not supported; expected {accepted}")
    source_set = skeleton.get_joint_set(layout.layouts_2d[key])
    symmetry = [list(map(int, side)) for side in meta.get("keypoints_symmetry", [])]
    if symmetry and symmetry != [list(source_set.left), list(source_set.right)]:
        raise FinePoseError(f"{rel}: keypoints_symmetry {symmetry} does not match the {source_set.name} order "
                            f"(left {list(source_set.left)}, right {list(source_set.right)})")
    joints = int(key[1])
    out = []
    for subject in sorted(positions, key=layout.subject_order):
        for name in sorted(positions[subject]):
            per_camera = positions[subject][name]
            if len(per_camera) > len(layout.camera_ids):
                raise FinePoseError(f"{rel} [{subject}][{name}]: {len(per_camera)} cameras, the dataset has "
                                    f"{len(layout.camera_ids)}")
            for index, values in enumerate(per_camera):
                values = np.asarray(values)
                if values.ndim != 3 or values.shape[1:] != (joints, 2):
                    raise FinePoseError(f"{rel} [{subject}][{name}][{index}]: array has shape {values.shape}, "
                                        f"expected (frames, {joints}, 2)")
                kp = values.astype(np.float32)                      # the table stores float32
                if source_set.name != layout.joint_set.name:
                    kp = skeleton.convert(kp, source_set.name, layout.joint_set.name)
                out.append((subject, name, layout.camera_ids[index], kp))
    return out


def layouts_2d_for(joint_set: skeleton.JointSet, names: Iterable[tuple[str, str]]) -> dict[tuple[str, int], str]:
    """{(layout_name, joints): joint set} for the given (layout_name, joint set) pairs that convert to ``joint_set``."""
    out = {}
    for layout_name, set_name in names:
        source = skeleton.get_joint_set(set_name)
        if set_name == joint_set.name or (set_name, joint_set.name) in skeleton.CONVERSIONS:
            out[(layout_name, source.num_joints)] = set_name
    return out
