"""Pose metrics as pure functions over arrays (MMPose style): MPJPE, P-MPJPE, N-MPJPE, MPJVE,
per-joint and per-group means, and the MPI-INF-3DHP PCK / AUC protocol without MATLAB.

Conventions
- Poses are ``(..., J, 3)`` arrays (numpy or torch; computed in float64 numpy). Errors are
  returned in millimetres: ``unit`` names the input's unit ("m", the frame table's unit,
  or "mm").
- Alignment is per pose (one frame's J joints): ``"none"``, ``"procrustes"`` (similarity
  transform: scale, rotation without reflection, translation; P-MPJPE, "Protocol #2")
  or ``"scale"`` (least-squares scale only; N-MPJPE). It is applied to whatever pose it
  is given, so P-MPJPE of an aggregated pose (J-Agg, J-Best, ...) aligns the aggregate,
  never each hypothesis separately.
- ``mask``: which errors count. Either broadcastable to the per-joint errors ``(..., J)``
  or one dimension shorter (a per-pose / per-frame mask ``(...,)``).
- MPI-INF-3DHP (``../shared/reference/mpi_inf_3dhp_protocol.md``): PCK and AUC over the
  14 joints of the 8 groups (pelvis, spine and head excluded); an error counts as correct
  when it is *strictly below* the threshold; AUC averages PCK over the 31 thresholds
  0, 5, ..., 150 mm. Because the 0 mm threshold counts nothing, a perfect prediction
  scores AUC = 100 * 30/31 = 96.77, exactly as the official MATLAB scripts would.
"""
from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

UNIT_TO_MM = {"m": 1000.0, "mm": 1.0}
ALIGNMENTS = ("none", "procrustes", "scale")


def _np(x: Any) -> np.ndarray:
    """numpy float64 view of a numpy array or torch tensor (moved to CPU)."""
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _unit(unit: str) -> float:
    try:
        return UNIT_TO_MM[unit]
    except KeyError:
        raise ValueError(f"unit must be one of {sorted(UNIT_TO_MM)}, got {unit!r}") from None


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape or pred.ndim < 2 or pred.shape[-1] != 3:
        raise ValueError(f"pred and gt must both be (..., J, 3), got {pred.shape} and {gt.shape}")


# --------------------------------------------------------------------------------------
# Alignment
# --------------------------------------------------------------------------------------
def similarity_transform(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares similarity transform (Umeyama) taking each pred pose onto its gt pose.

    pred, gt: (..., J, 3). Returns scale (...,), rotation R (..., 3, 3) (det +1) and
    translation t (..., 3) minimising sum_j ||s * R @ pred_j + t - gt_j||^2.
    """
    pred, gt = _np(pred), _np(gt)
    _check_pair(pred, gt)
    mu_p, mu_g = pred.mean(-2, keepdims=True), gt.mean(-2, keepdims=True)
    p0, g0 = pred - mu_p, gt - mu_g                               # (..., J, 3) centred
    cov = np.swapaxes(g0, -1, -2) @ p0                            # (..., 3, 3) sum_j g_j p_j^T
    u, sing, vt = np.linalg.svd(cov)
    d = np.sign(np.linalg.det(u @ vt))                            # -1: the optimum would reflect
    d = np.where(d == 0, 1.0, d)
    fix = np.ones(sing.shape)
    fix[..., -1] = d
    rot = (u * fix[..., None, :]) @ vt                            # U diag(1, 1, d) V^T
    var_p = (p0**2).sum(axis=(-2, -1))
    scale = np.divide((sing * fix).sum(-1), var_p, out=np.zeros_like(var_p), where=var_p > 0)
    trans = mu_g[..., 0, :] - scale[..., None] * (rot @ mu_p[..., 0, :, None])[..., 0]
    return scale, rot, trans


def procrustes_align(pred: Any, gt: Any) -> np.ndarray:
    """pred (..., J, 3) mapped by its best similarity transform onto gt (P-MPJPE alignment)."""
    pred = _np(pred)
    scale, rot, trans = similarity_transform(pred, gt)
    return scale[..., None, None] * (pred @ np.swapaxes(rot, -1, -2)) + trans[..., None, :]


def scale_align(pred: Any, gt: Any) -> np.ndarray:
    """pred (..., J, 3) times its least-squares scale s = <pred, gt> / <pred, pred> (N-MPJPE)."""
    pred, gt = _np(pred), _np(gt)
    _check_pair(pred, gt)
    num = (pred * gt).sum(axis=(-2, -1))
    den = (pred * pred).sum(axis=(-2, -1))
    scale = np.divide(num, den, out=np.zeros_like(den), where=den > 0)
    return scale[..., None, None] * pred


def align(pred: Any, gt: Any, alignment: str = "none") -> np.ndarray:
    """Apply one of ``ALIGNMENTS`` per pose."""
    if alignment == "none":
        return _np(pred)
    if alignment == "procrustes":
        return procrustes_align(pred, gt)
    if alignment == "scale":
        return scale_align(pred, gt)
    raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")


# --------------------------------------------------------------------------------------
# Errors and masked means
# --------------------------------------------------------------------------------------
def joint_errors(pred: Any, gt: Any, alignment: str = "none", unit: str = "m") -> np.ndarray:
    """Per-joint Euclidean errors in mm after per-pose alignment: (..., J)."""
    pred, gt = _np(pred), _np(gt)
    _check_pair(pred, gt)
    return np.linalg.norm(align(pred, gt, alignment) - gt, axis=-1) * _unit(unit)


def _expand_mask(mask: Any, shape: tuple[int, ...]) -> np.ndarray:
    if type(mask).__module__.startswith("torch"):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask).astype(bool)
    if mask.ndim == len(shape) - 1 and mask.shape == shape[:-1]:
        mask = mask[..., None]                                    # a per-pose mask
    try:
        return np.broadcast_to(mask, shape)
    except ValueError:
        raise ValueError(f"mask of shape {mask.shape} does not fit errors of shape {shape}") from None


def masked_mean(values: Any, mask: Any = None, axis: int | tuple[int, ...] | None = None) -> Any:
    """Mean of ``values`` where ``mask`` (see module notes) is true; NaN where nothing counts."""
    values = _np(values)
    if mask is None:
        return values.mean(axis=axis) if values.size else np.nan
    m = _expand_mask(mask, values.shape)
    total = np.where(m, values, 0.0).sum(axis=axis)
    count = m.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count


def mpjpe(pred: Any, gt: Any, mask: Any = None, unit: str = "m", alignment: str = "none") -> float:
    """Mean per-joint position error (mm) over all poses and joints (Protocol #1)."""
    return float(masked_mean(joint_errors(pred, gt, alignment, unit), mask))


def p_mpjpe(pred: Any, gt: Any, mask: Any = None, unit: str = "m") -> float:
    """MPJPE after a per-pose similarity (Procrustes) alignment of ``pred`` (Protocol #2)."""
    return mpjpe(pred, gt, mask, unit, alignment="procrustes")


def n_mpjpe(pred: Any, gt: Any, mask: Any = None, unit: str = "m") -> float:
    """MPJPE after a per-pose least-squares scale of ``pred``."""
    return mpjpe(pred, gt, mask, unit, alignment="scale")


def per_joint_mpjpe(pred: Any, gt: Any, mask: Any = None, unit: str = "m", alignment: str = "none") -> np.ndarray:
    """MPJPE of each joint (mm): (J,)."""
    err = joint_errors(pred, gt, alignment, unit)
    flat = err.reshape(-1, err.shape[-1])
    if mask is None:
        return flat.mean(axis=0)
    m = _expand_mask(mask, err.shape).reshape(flat.shape)
    return masked_mean(flat, m, axis=0)


def velocity_errors(pred: Any, gt: Any, mask: Any = None, unit: str = "m", axis: int = -3) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-joint velocity errors (mm per frame) and the matching mask.

    pred, gt: (..., F, J, 3) with consecutive frames along ``axis`` (default -3). Velocities
    are first differences; one counts only where both of its frames are valid. Returns
    errors (..., F-1, J) and the mask for them (None when ``mask`` is None).
    """
    pred, gt = _np(pred), _np(gt)
    _check_pair(pred, gt)
    vel_err = np.linalg.norm(np.diff(pred, axis=axis) - np.diff(gt, axis=axis), axis=-1) * _unit(unit)
    if mask is None:
        return vel_err, None
    err_shape = pred.shape[:-1]
    m = _expand_mask(mask, err_shape)
    ax = axis if axis < 0 else axis - pred.ndim
    ax += 1                                                        # the same frame axis in (..., F, J)
    n = m.shape[ax]
    first = np.take(m, np.arange(0, n - 1), axis=ax)
    second = np.take(m, np.arange(1, n), axis=ax)
    return vel_err, first & second


def mpjve(pred: Any, gt: Any, mask: Any = None, unit: str = "m", axis: int = -3) -> float:
    """Mean per-joint velocity error (mm per frame) along the frame axis."""
    vel_err, m = velocity_errors(pred, gt, mask, unit, axis)
    return float(masked_mean(vel_err, m))


# --------------------------------------------------------------------------------------
# Grouping: per action / subject / sequence / activity
# --------------------------------------------------------------------------------------
def group_means(values: Any, keys: Sequence[Hashable] | np.ndarray, mask: Any = None) -> dict[Hashable, dict[str, float]]:
    """Frame-pooled mean of ``values`` per key: {key: {"mean": m, "count": n}}.

    values: (N,) per-frame values (e.g. per-frame MPJPE) or (N, J); keys: (N,) labels
    (action, subject, sequence, ...); mask: (N,) frames that count. Keys keep the order of
    their first appearance. Pooling frames is what "All" means in the 3DHP protocol; for
    the Human3.6M convention (mean over actions of per-action means) use ``mean_of_groups``.
    """
    values = _np(values)
    keys = np.asarray(keys)
    if keys.shape[0] != values.shape[0]:
        raise ValueError(f"{keys.shape[0]} keys for {values.shape[0]} values")
    frame_mask = np.ones(values.shape[0], bool) if mask is None else np.asarray(_np(mask)).astype(bool).reshape(-1)
    out: dict[Hashable, dict[str, float]] = {}
    for key in dict.fromkeys(keys.tolist()):
        sel = (keys == key) & frame_mask
        if sel.any():
            out[key] = {"mean": float(values[sel].mean()), "count": int(sel.sum())}
    return out


def mean_of_groups(groups: Mapping[Hashable, Mapping[str, float]]) -> float:
    """Unweighted mean of per-group means (e.g. the Human3.6M "Avg" over 15 actions)."""
    if not groups:
        return float("nan")
    return float(np.mean([g["mean"] for g in groups.values()]))


# --------------------------------------------------------------------------------------
# MPI-INF-3DHP: PCK@150mm and AUC (protocol file; no MATLAB)
# --------------------------------------------------------------------------------------
# The 17 test joints in the protocol's order (= finepose.skeleton "mpi_inf_3dhp17").
MPI_INF_3DHP17_NAMES = (
    "head_top", "neck", "right_shoulder", "right_elbow", "right_wrist",
    "left_shoulder", "left_elbow", "left_wrist", "right_hip", "right_knee", "right_ankle",
    "left_hip", "left_knee", "left_ankle", "pelvis", "spine", "head",
)
# Joint groups of the official evaluation (pelvis, spine and head are not scored).
PCK_JOINT_GROUPS: dict[str, tuple[str, ...]] = {
    "head": ("head_top",),
    "neck": ("neck",),
    "shoulder": ("right_shoulder", "left_shoulder"),
    "elbow": ("right_elbow", "left_elbow"),
    "wrist": ("right_wrist", "left_wrist"),
    "hip": ("right_hip", "left_hip"),
    "knee": ("right_knee", "left_knee"),
    "ankle": ("right_ankle", "left_ankle"),
}
PCK_THRESHOLD_MM = 150.0
AUC_THRESHOLDS_MM = np.arange(0.0, 151.0, 5.0)                    # 0, 5, ..., 150: 31 thresholds
MPI_INF_3DHP_ACTIVITIES = ("Standing/Walking", "Exercising", "Sitting", "Reaching/Crouching",
                           "On The Floor", "Sports", "Miscellaneous")  # activity_annotation 1..7
MPI_INF_3DHP_SCENES: dict[str, tuple[str, ...]] = {
    "GS": ("TS1", "TS2"), "noGS": ("TS3", "TS4"), "Outdoor": ("TS5", "TS6"),
}


def pck_joint_indices(joint_names: Sequence[str] = MPI_INF_3DHP17_NAMES,
                      groups: Mapping[str, Sequence[str]] | None = None) -> dict[str, list[int]]:
    """Indices of each PCK joint group in an array whose joints are named ``joint_names``."""
    groups = PCK_JOINT_GROUPS if groups is None else groups
    names = list(joint_names)
    missing = [n for g in groups.values() for n in g if n not in names]
    if missing:
        raise ValueError(f"joint order lacks the PCK joints {missing}; names given: {names}")
    return {g: [names.index(n) for n in members] for g, members in groups.items()}


def _scored(errors_mm: Any, joint_names: Sequence[str], mask: Any) -> np.ndarray:
    """The 14 scored joints' errors as a flat vector (masked frames dropped)."""
    errors_mm = _np(errors_mm)
    if errors_mm.shape[-1] != len(joint_names):
        raise ValueError(f"errors have {errors_mm.shape[-1]} joints, joint_names {len(joint_names)}")
    idx = [i for members in pck_joint_indices(joint_names).values() for i in members]
    sel = errors_mm[..., idx]
    if mask is not None:
        sel = sel[_expand_mask(mask, errors_mm.shape)[..., idx]]
    return sel.reshape(-1)


def pck(errors_mm: Any, threshold: float = PCK_THRESHOLD_MM, mask: Any = None,
        joint_names: Sequence[str] = MPI_INF_3DHP17_NAMES) -> float:
    """100 * fraction of the 14 scored joints' errors strictly below ``threshold`` (mm).

    errors_mm: (..., J) per-joint errors in mm (``joint_errors``), joints named ``joint_names``.
    """
    scored = _scored(errors_mm, joint_names, mask)
    return float(100.0 * np.mean(scored < threshold)) if scored.size else float("nan")


def pck_curve(errors_mm: Any, thresholds: Iterable[float] = AUC_THRESHOLDS_MM, mask: Any = None,
              joint_names: Sequence[str] = MPI_INF_3DHP17_NAMES) -> np.ndarray:
    """PCK at each threshold: (len(thresholds),)."""
    scored = _scored(errors_mm, joint_names, mask)
    thresholds = np.asarray(list(thresholds), dtype=np.float64)
    if not scored.size:
        return np.full(thresholds.shape, np.nan)
    return 100.0 * (scored[None, :] < thresholds[:, None]).mean(axis=1)


def auc(errors_mm: Any, thresholds: Iterable[float] = AUC_THRESHOLDS_MM, mask: Any = None,
        joint_names: Sequence[str] = MPI_INF_3DHP17_NAMES) -> float:
    """Mean PCK over the thresholds 0:5:150 mm (strictly below; 0 included)."""
    return float(pck_curve(errors_mm, thresholds, mask, joint_names).mean())


def mpi_inf_3dhp_report(errors_mm: Any, sequences: Sequence[str], activities: Sequence[Any],
                        mask: Any = None, joint_names: Sequence[str] = MPI_INF_3DHP17_NAMES) -> list[dict[str, Any]]:
    """The protocol's tables from per-frame joint errors.

    errors_mm: (N, J) per-joint errors (mm) of N frames; sequences: (N,) "TS1".."TS6";
    activities: (N,) activity names (``MPI_INF_3DHP_ACTIVITIES``) or codes 1..7; mask: (N,)
    frames that count (``valid_frame``). Returns rows ``{"group", "key", "frames", "mpjpe",
    "pck", "auc", "pck_groups", "auc_groups"}`` for group "sequence" (each TS present),
    "activity" (each activity present, protocol order), "scene" (GS / noGS / Outdoor, when
    any of their sequences is present) and "all" (every counted frame pooled: the paper's
    Table 3). MPJPE is over all J joints; PCK / AUC over the 14 scored joints (pooled, which
    equals the official joint-count weighting of the groups).
    """
    errors_mm = _np(errors_mm)
    if errors_mm.ndim != 2:
        raise ValueError(f"errors_mm must be (N, J), got {errors_mm.shape}")
    n = errors_mm.shape[0]
    sequences = np.asarray(sequences).astype(str)
    activities = np.asarray([_activity_name(a) for a in activities])
    if sequences.shape != (n,) or activities.shape != (n,):
        raise ValueError(f"sequences and activities must have shape ({n},)")
    frame_mask = np.ones(n, bool) if mask is None else _np(mask).astype(bool).reshape(-1)
    groups = pck_joint_indices(joint_names)

    def row(group: str, key: str, sel: np.ndarray) -> dict[str, Any]:
        sel = sel & frame_mask
        err = errors_mm[sel]
        return {
            "group": group, "key": key, "frames": int(sel.sum()),
            "mpjpe": float(err.mean()) if err.size else float("nan"),
            "pck": pck(err, joint_names=joint_names), "auc": auc(err, joint_names=joint_names),
            "pck_groups": {g: float(100.0 * np.mean(err[:, i] < PCK_THRESHOLD_MM)) if err.size else float("nan")
                           for g, i in groups.items()},
            "auc_groups": {g: float(100.0 * np.mean(err[:, i][None] < AUC_THRESHOLDS_MM[:, None, None]))
                           if err.size else float("nan") for g, i in groups.items()},
        }

    rows = []
    for seq in sorted(set(sequences[frame_mask].tolist()), key=_sequence_order):
        rows.append(row("sequence", seq, sequences == seq))
    present = set(activities[frame_mask].tolist())
    for act in [a for a in MPI_INF_3DHP_ACTIVITIES if a in present] + sorted(present - set(MPI_INF_3DHP_ACTIVITIES)):
        rows.append(row("activity", act, activities == act))
    for scene, members in MPI_INF_3DHP_SCENES.items():
        sel = np.isin(sequences, members)
        if (sel & frame_mask).any():
            rows.append(row("scene", scene, sel))
    rows.append(row("all", "all", np.ones(n, bool)))
    return rows


def _activity_name(a: Any) -> str:
    if isinstance(a, str):
        return a
    code = int(a)
    if not 1 <= code <= len(MPI_INF_3DHP_ACTIVITIES):
        raise ValueError(f"activity code {a} is outside 1..{len(MPI_INF_3DHP_ACTIVITIES)}")
    return MPI_INF_3DHP_ACTIVITIES[code - 1]


def _sequence_order(name: str) -> tuple[int, str]:
    digits = "".join(ch for ch in name if ch.isdigit())
    return (int(digits) if digits else 1 << 30, name)
