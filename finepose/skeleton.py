"""Joint sets (names, parents, left/right) and conversions between them.

Every keypoint array in finepose carries joints in the order of one named
``JointSet``; the frame table records that name in its schema metadata
(``joint_set``). The sets:

``h36m32``          the 32 Human3.6M motion-capture joints (D3_Positions order)
``h36m17``          the 17 joints every lifting method uses: h36m32 joints
                    [0,1,2,3,6,7,8,12,13,14,15,17,18,19,25,26,27]
``mpi_inf_3dhp28``  MPI-INF-3DHP training annotations ('all' set)
``mpi_inf_3dhp17``  MPI-INF-3DHP test annotations ('relevant' set, protocol order)
``mpii16``          MPII order, as written by the Stacked Hourglass detector
``coco17``          COCO keypoints (2D detectors, EgoHumans)

``convert(keypoints, src, dst)`` maps arrays between sets where a standard
mapping exists; see ``CONVERSIONS`` and the notes in ``convert``.

The registry is open: a dataset declares its own joint set (and, where one exists,
its mapping from ``coco17`` or ``h36m17``) in its description
(``finepose.datasets.DatasetInfo``), which calls :func:`register_joint_set`. The
definition travels with the prepared data and the checkpoint (:meth:`JointSet.to_dict`),
so a later process knows the set without importing the reader.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class JointSet:
    """A named joint order with its kinematic tree and mirror pairs.

    ``parents[j]`` is the index of joint j's parent, -1 for a tree root.
    ``left``/``right`` are index tuples of equal length, paired in order
    (``left[i]`` mirrors ``right[i]``). ``root`` is the joint that root-relative
    poses subtract (None when the set has no such joint, e.g. COCO: use the
    hip midpoint).
    """

    name: str
    joint_names: tuple[str, ...]
    parents: tuple[int, ...]
    left: tuple[int, ...]
    right: tuple[int, ...]
    root: int | None
    flip_permutation: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.joint_names)
        if len(self.parents) != n:
            raise ValueError(f"{self.name}: {len(self.parents)} parents for {n} joints")
        if len(self.left) != len(self.right):
            raise ValueError(f"{self.name}: left and right lists differ in length")
        if len(set(self.left) | set(self.right)) != 2 * len(self.left):
            raise ValueError(f"{self.name}: left and right lists overlap or repeat")
        if any(not (-1 <= p < n) or p == j for j, p in enumerate(self.parents)):
            raise ValueError(f"{self.name}: parent index out of range")
        perm = np.arange(n)
        perm[list(self.left)] = self.right
        perm[list(self.right)] = self.left
        perm.setflags(write=False)
        object.__setattr__(self, "flip_permutation", perm)

    @property
    def num_joints(self) -> int:
        return len(self.joint_names)

    def index(self, joint_name: str) -> int:
        return self.joint_names.index(joint_name)

    def bones(self) -> list[tuple[int, int]]:
        """(parent, child) pairs of the kinematic tree."""
        return [(p, j) for j, p in enumerate(self.parents) if p >= 0]

    def root_joints(self) -> list[int]:
        """The joints whose mean is the root: ``root``, else the hips (e.g. COCO-17), else every joint."""
        if self.root is not None:
            return [int(self.root)]
        return [i for i, n in enumerate(self.joint_names) if "hip" in n.lower()] or list(range(self.num_joints))

    def to_dict(self) -> dict:
        """A JSON-able definition (what the frame table's metadata and checkpoints carry)."""
        return {"name": self.name, "joint_names": list(self.joint_names), "parents": list(self.parents),
                "left": list(self.left), "right": list(self.right), "root": self.root}

    @classmethod
    def from_dict(cls, data: dict) -> "JointSet":
        try:
            return cls(name=str(data["name"]), joint_names=tuple(str(n) for n in data["joint_names"]),
                       parents=tuple(int(p) for p in data["parents"]), left=tuple(int(i) for i in data["left"]),
                       right=tuple(int(i) for i in data["right"]),
                       root=None if data.get("root") is None else int(data["root"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a joint set definition ({exc}): {data!r:.200}") from None


# --- Human3.6M, 32 joints (names after the dataset's metadata; "site" = end effector) ---
_H36M32_NAMES = (
    "hip", "r_up_leg", "r_leg", "r_foot", "r_toe_base", "r_toe_site",
    "l_up_leg", "l_leg", "l_foot", "l_toe_base", "l_toe_site",
    "spine", "spine1", "neck", "head", "head_site",
    "l_shoulder", "l_arm", "l_fore_arm", "l_hand", "l_hand_thumb", "l_thumb_site", "l_wrist_end", "l_wrist_site",
    "r_shoulder", "r_arm", "r_fore_arm", "r_hand", "r_hand_thumb", "r_thumb_site", "r_wrist_end", "r_wrist_site",
)
H36M32 = JointSet(
    name="h36m32",
    joint_names=_H36M32_NAMES,
    parents=(-1, 0, 1, 2, 3, 4, 0, 6, 7, 8, 9, 0, 11, 12, 13, 14, 12, 16, 17, 18, 19, 20, 19, 22,
             12, 24, 25, 26, 27, 28, 27, 30),
    left=(6, 7, 8, 9, 10, 16, 17, 18, 19, 20, 21, 22, 23),
    right=(1, 2, 3, 4, 5, 24, 25, 26, 27, 28, 29, 30, 31),
    root=0,
)

# The 17 joints kept by every lifting method, as h36m32 indices.
H36M32_TO_17 = (0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 15, 17, 18, 19, 25, 26, 27)

H36M17 = JointSet(
    name="h36m17",
    joint_names=("pelvis", "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "spine", "thorax",
                 "neck_nose", "head", "l_shoulder", "l_elbow", "l_wrist", "r_shoulder", "r_elbow", "r_wrist"),
    parents=(-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 9, 8, 11, 12, 8, 14, 15),
    left=(4, 5, 6, 11, 12, 13),
    right=(1, 2, 3, 14, 15, 16),
    root=0,
)

# --- MPI-INF-3DHP ---
# Training annotations: the 28-joint 'all' set of the official MATLAB utilities
# (mpii_get_joint_set('all')), 0-based here.
MPI_INF_3DHP28 = JointSet(
    name="mpi_inf_3dhp28",
    joint_names=("spine3", "spine4", "spine2", "spine", "pelvis", "neck", "head", "head_top",
                 "left_clavicle", "left_shoulder", "left_elbow", "left_wrist", "left_hand",
                 "right_clavicle", "right_shoulder", "right_elbow", "right_wrist", "right_hand",
                 "left_hip", "left_knee", "left_ankle", "left_foot", "left_toe",
                 "right_hip", "right_knee", "right_ankle", "right_foot", "right_toe"),
    parents=(2, 0, 3, 4, -1, 1, 5, 6, 5, 8, 9, 10, 11, 5, 13, 14, 15, 16, 4, 18, 19, 20, 21,
             4, 23, 24, 25, 26),
    left=(8, 9, 10, 11, 12, 18, 19, 20, 21, 22),
    right=(13, 14, 15, 16, 17, 23, 24, 25, 26, 27),
    root=4,
)

# 1-based indices of the 17 test joints in the 28-joint list, from the protocol file.
_MPI28_TO_17_1BASED = (8, 6, 15, 16, 17, 10, 11, 12, 24, 25, 26, 19, 20, 21, 5, 4, 7)
MPI_INF_3DHP28_TO_17 = tuple(i - 1 for i in _MPI28_TO_17_1BASED)

# Test annotations ('relevant' set), in the protocol's order. The side labels follow the
# official names; finepose/data/mpi_inf_3dhp.py checks them against real bone directions.
MPI_INF_3DHP17 = JointSet(
    name="mpi_inf_3dhp17",
    joint_names=("head_top", "neck", "right_shoulder", "right_elbow", "right_wrist",
                 "left_shoulder", "left_elbow", "left_wrist", "right_hip", "right_knee", "right_ankle",
                 "left_hip", "left_knee", "left_ankle", "pelvis", "spine", "head"),
    parents=(16, 15, 1, 2, 3, 1, 5, 6, 14, 8, 9, 14, 11, 12, -1, 14, 1),
    left=(5, 6, 7, 11, 12, 13),
    right=(2, 3, 4, 8, 9, 10),
    root=14,
)

# --- 2D detector sets ---
MPII16 = JointSet(
    name="mpii16",
    joint_names=("r_ankle", "r_knee", "r_hip", "l_hip", "l_knee", "l_ankle", "pelvis", "thorax",
                 "upper_neck", "head_top", "r_wrist", "r_elbow", "r_shoulder", "l_shoulder", "l_elbow", "l_wrist"),
    parents=(1, 2, 6, 6, 3, 4, -1, 6, 7, 8, 11, 12, 7, 7, 13, 14),
    left=(3, 4, 5, 13, 14, 15),
    right=(2, 1, 0, 12, 11, 10),
    root=6,
)

# COCO has no pelvis: root is None (root-relative code uses the hip midpoint). The tree
# hangs from the nose only so that bones can be drawn and measured.
COCO17 = JointSet(
    name="coco17",
    joint_names=("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
                 "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
                 "left_knee", "right_knee", "left_ankle", "right_ankle"),
    parents=(-1, 0, 0, 1, 2, 0, 0, 5, 6, 7, 8, 5, 6, 11, 12, 13, 14),
    left=(1, 3, 5, 7, 9, 11, 13, 15),
    right=(2, 4, 6, 8, 10, 12, 14, 16),
    root=None,
)

# The 2D inputs `lift` accepts from users (a dataset's description maps them to its own set).
STANDARD_INPUTS = ("coco17", "h36m17")

JOINT_SETS: dict[str, JointSet] = {js.name: js for js in (H36M32, H36M17, MPI_INF_3DHP28, MPI_INF_3DHP17,
                                                           MPII16, COCO17)}


def get_joint_set(name: str) -> JointSet:
    """The joint set called ``name`` (built in, or registered by a dataset description)."""
    try:
        return JOINT_SETS[name]
    except KeyError:
        raise ValueError(f"unknown joint set {name!r}; known: {', '.join(JOINT_SETS)} (a dataset's own set is "
                         "known once its description is read: finepose.datasets.describe)") from None


def register_joint_set(joint_set: JointSet,
                       conversions: dict[str, list[dict[int, float]]] | None = None) -> JointSet:
    """Make ``joint_set`` (and conversions *into* it, keyed by source set) known to ``get_joint_set``/``convert``.

    Registering the same definition again is a no-op; a different definition under a
    known name is an error (two datasets may not disagree about what a joint set is).
    """
    known = JOINT_SETS.get(joint_set.name)
    if known is not None and known.to_dict() != joint_set.to_dict():
        raise ValueError(f"joint set {joint_set.name!r} is already defined differently; give the new set "
                         "its own name")
    JOINT_SETS.setdefault(joint_set.name, joint_set)
    for src, weights in (conversions or {}).items():
        source = get_joint_set(src)
        weights = [{int(i): float(w) for i, w in dict(m).items()} for m in weights]
        if len(weights) != joint_set.num_joints:
            raise ValueError(f"conversion {src}->{joint_set.name}: {len(weights)} target joints, "
                             f"expected {joint_set.num_joints}")
        if any(not m or any(not 0 <= i < source.num_joints for i in m) for m in weights):
            raise ValueError(f"conversion {src}->{joint_set.name}: a target joint has no source, or a "
                             f"source index is outside {src}'s {source.num_joints} joints")
        old = CONVERSIONS.get((src, joint_set.name))
        if old is not None and old != weights:
            raise ValueError(f"conversion {src}->{joint_set.name} is already defined differently")
        CONVERSIONS[(src, joint_set.name)] = weights
    return JOINT_SETS[joint_set.name]


def conversions_into(name: str) -> dict[str, list[dict[int, float]]]:
    """{source set: weights} of every known conversion into joint set ``name``."""
    return {src: weights for (src, dst), weights in CONVERSIONS.items() if dst == name}


def mapping_by_name(source: str, target: JointSet, mapping: "list[dict[str, float]] | tuple") -> list[dict[int, float]]:
    """Per target joint, {source joint name: weight} -> the index form ``register_joint_set`` takes."""
    src = get_joint_set(source)
    out = []
    for j, entry in enumerate(mapping):
        entry = {entry: 1.0} if isinstance(entry, str) else dict(entry)
        try:
            out.append({src.index(n): float(w) for n, w in entry.items()})
        except ValueError:
            raise ValueError(f"mapping {source}->{target.name}, joint {target.joint_names[j]}: "
                             f"{sorted(entry)} are not all {source} joint names") from None
    return out


# --- Conversions ------------------------------------------------------------------------
# Each conversion is, per destination joint, a weighted mean of source joints:
# dst[j] = sum_k w[j][k] * src[idx[j][k]]. Selections have one source with weight 1.

def _selection(indices: tuple[int, ...]) -> list[dict[int, float]]:
    return [{i: 1.0} for i in indices]


def _mix(*pairs: tuple[int, float]) -> dict[int, float]:
    out: dict[int, float] = {}
    for index, weight in pairs:
        out[index] = out.get(index, 0.0) + weight
    return out


def _mpii16_to_h36m17() -> list[dict[int, float]]:
    m = MPII16.index
    pelvis, thorax = m("pelvis"), m("thorax")
    return [
        {pelvis: 1.0},                                  # pelvis: MPII pelvis
        {m("r_hip"): 1.0}, {m("r_knee"): 1.0}, {m("r_ankle"): 1.0},
        {m("l_hip"): 1.0}, {m("l_knee"): 1.0}, {m("l_ankle"): 1.0},
        _mix((pelvis, 0.5), (thorax, 0.5)),             # spine: midway pelvis -> thorax
        {thorax: 1.0},                                  # thorax: MPII thorax
        {m("upper_neck"): 1.0},                         # neck_nose: MPII upper neck
        {m("head_top"): 1.0},                           # head: MPII head top
        {m("l_shoulder"): 1.0}, {m("l_elbow"): 1.0}, {m("l_wrist"): 1.0},
        {m("r_shoulder"): 1.0}, {m("r_elbow"): 1.0}, {m("r_wrist"): 1.0},
    ]


def _coco17_to_h36m17() -> list[dict[int, float]]:
    c = COCO17.index
    lh, rh, ls, rs = c("left_hip"), c("right_hip"), c("left_shoulder"), c("right_shoulder")
    return [
        _mix((lh, 0.5), (rh, 0.5)),                               # pelvis: hip midpoint
        {rh: 1.0}, {c("right_knee"): 1.0}, {c("right_ankle"): 1.0},
        {lh: 1.0}, {c("left_knee"): 1.0}, {c("left_ankle"): 1.0},
        _mix((lh, 0.25), (rh, 0.25), (ls, 0.25), (rs, 0.25)),     # spine: midway hip-mid -> shoulder-mid
        _mix((ls, 0.5), (rs, 0.5)),                               # thorax: shoulder midpoint
        {c("nose"): 1.0},                                         # neck_nose: nose
        _mix((c("left_eye"), 0.25), (c("right_eye"), 0.25),       # head: centre of eyes and ears
             (c("left_ear"), 0.25), (c("right_ear"), 0.25)),
        {ls: 1.0}, {c("left_elbow"): 1.0}, {c("left_wrist"): 1.0},
        {rs: 1.0}, {c("right_elbow"): 1.0}, {c("right_wrist"): 1.0},
    ]


CONVERSIONS: dict[tuple[str, str], list[dict[int, float]]] = {
    ("h36m32", "h36m17"): _selection(H36M32_TO_17),
    ("mpi_inf_3dhp28", "mpi_inf_3dhp17"): _selection(MPI_INF_3DHP28_TO_17),
    ("mpii16", "h36m17"): _mpii16_to_h36m17(),
    ("coco17", "h36m17"): _coco17_to_h36m17(),
}


def _gather_plan(weights: list[dict[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """(dst, K) source indices and weights, padded by repeating a used index with weight 0."""
    width = max(len(w) for w in weights)
    idx = np.zeros((len(weights), width), dtype=np.intp)
    wts = np.zeros((len(weights), width), dtype=np.float64)
    for j, mapping in enumerate(weights):
        items = list(mapping.items())
        for k in range(width):
            i, w = items[k] if k < len(items) else (items[0][0], 0.0)
            idx[j, k], wts[j, k] = i, w
    return idx, wts


def convert(keypoints: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Map keypoints (..., J_src, C) from joint set ``src`` to ``dst`` (..., J_dst, C).

    C is any number of channels (2D, 3D, or with a confidence channel).

    Mappings:
    - ``h36m32 -> h36m17``: selection of joints [0,1,2,3,6,7,8,12,13,14,15,17,18,19,25,26,27].
    - ``mpi_inf_3dhp28 -> mpi_inf_3dhp17``: selection by the protocol's indices.
    - ``mpii16 -> h36m17`` (Stacked Hourglass): limbs and pelvis one to one; H36M thorax =
      MPII thorax, neck_nose = MPII upper neck, head = MPII head top; spine (absent in MPII)
      is synthesised midway between pelvis and thorax.
    - ``coco17 -> h36m17``: limbs one to one; pelvis = hip midpoint; thorax = shoulder
      midpoint; spine = midway between those two; neck_nose = nose; head = mean of the eyes
      and ears (COCO has no head top, so this sits lower than H36M's head joint).
    A synthesised joint is NaN when any joint it is made from is NaN (a missing detection
    stays missing). ``src == dst`` returns a copy.
    """
    values = np.asarray(keypoints)
    source, target = get_joint_set(src), get_joint_set(dst)
    if values.ndim < 2 or values.shape[-2] != source.num_joints:
        raise ValueError(f"keypoints of shape {values.shape} do not hold the {source.num_joints} joints of {src}")
    if src == dst:
        return values.copy()
    try:
        weights = CONVERSIONS[(src, dst)]
    except KeyError:
        known = ", ".join(f"{a}->{b}" for a, b in CONVERSIONS)
        raise ValueError(f"no conversion {src}->{dst}; known: {known}") from None
    assert len(weights) == target.num_joints
    idx, wts = _gather_plan(weights)
    if (wts == 1.0).sum(axis=1).tolist() == [1] * len(weights) and idx.shape[1] == 1:
        return values[..., idx[:, 0], :].copy()
    dtype = values.dtype if np.issubdtype(values.dtype, np.floating) else np.float64
    gathered = values[..., idx, :].astype(dtype, copy=False)           # (..., J_dst, K, C)
    return np.einsum("...jkc,jk->...jc", gathered, wts.astype(dtype))
