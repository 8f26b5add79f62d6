"""Multi-hypothesis aggregation: hypothesis mean, P-Best, J-Best (oracles), P-Agg and J-Agg (JPMA).

Pure functions over arrays (torch tensors or numpy arrays; the result has the input's
kind). Shapes:

    hyps          (*lead, H, F, J, 3)  root-relative hypotheses (e.g. lead = (B,) clips, or
                                       (M, B) with the DDIM step axis in front)
    gt            (*lead', F, J, 3)    root-relative ground truth, broadcastable to (*lead, F, J, 3)
    keypoints_2d  (*lead', F, J, 2)    the 2D input, in the same image units as the intrinsics
                                       (pixels, or screen-normalised with normalised intrinsics)
    trajectory    (*lead', F, 3)       ground-truth root position in camera coordinates,
                                       same unit as the poses
    intrinsics    {"f": (*c, 2), "c": (*c, 2), "k": (*c, 3) | None, "p": (*c, 2) | None}
                  (``finepose.camera.intrinsics_from_row``), or an array (*c, 4) fx fy cx cy
                  or (*c, 9) fx fy cx cy k1 k2 k3 p1 p2 (pinhole, Human3.6M distortion), or
                  (*c, 16): an Aria fisheye camera (EgoHumans), its 15 sensor-frame intrinsics
                  f c_u c_v k0..k5 p0 p1 s0..s3 and the upright image width (see
                  ``finepose.camera.project_aria``); the Mapping form of that is
                  {"aria": (*c, 15), "res_w": (*c,)}. *c is () for one camera or the trailing
                  part of *lead (e.g. (B,) for one camera per clip)

Modes (``aggregate(hyps, mode, ...)``):

    mean    average of the H hypotheses                                    (not an oracle)
    p_best  per clip, the hypothesis with the lowest MPJPE against gt        (oracle)
            -- chosen per clip (each index of *lead), never once per batch (released fault 5)
    j_best  per frame and joint, the hypothesis closest to gt                (oracle; the
            paper's tables report this, as the authors confirmed in their issue #4)
    p_agg   per frame, the hypothesis whose reprojection is closest to the 2D input
            (mean 2D distance over joints)                                   (not an oracle)
    j_agg   per frame and joint, the hypothesis whose reprojected joint is closest to the
            2D input: JPMA, the paper's equation (6)                         (not an oracle)

The released code prints the hypothesis *mean* under the label "P_Agg"; here ``p_agg`` is
the reprojection-based pose-level selection of D3DP, and ``mean`` is its own mode.

Reprojection adds a root trajectory to each root-relative hypothesis and projects it
with ``finepose.camera.project`` (pinhole, plus the Human3.6M distortion when k / p are
known) or ``finepose.camera.project_aria`` (EgoHumans' Aria fisheye). The trajectory is either the ground truth (``root="gt"``: the released
behaviour; the result is labelled ``uses_gt_root``) or estimated without ground truth
from the 2D input and the root-relative pose by linear least squares per frame
(``root="estimate"``: one translation from the hypothesis mean, shared by all
hypotheses, as a ground-truth root would be; ``root="estimate_each"``: one per hypothesis).
With ``root_joint`` (the joint the hypotheses are relative to; evaluate passes the joint
set's root) the estimate lies on that joint's 2D ray, so the root reprojects onto its own
2D and a wrong pose only moves it in depth (see ``estimate_root``).

Why J-Agg can lose to the mean (measured on real Human3.6M in results/h36m_real/README.md,
shown on constructed cases in tests/test_aggregate.py): the 2D reprojection sees a joint's
error in the image plane, hardly in depth. Picking one hypothesis per joint keeps that
hypothesis' depth error, which the mean divides by about sqrt(H) when the hypotheses' errors
are independent; for independent Gaussian errors the pick only ties the mean in x and y, so
J-Agg loses. It wins when some hypotheses are far off in a way the 2D shows (outliers).

Metrics are computed afterwards on the aggregated pose (``finepose.metrics``), so the
P-MPJPE of J-Agg aligns the aggregate, not each hypothesis (released fault 6).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from finepose.camera import ARIA_INTRINSICS, aria_ray_valid, project, project_aria, unproject_aria
from finepose.io import FinePoseError

MODES = ("mean", "p_best", "j_best", "p_agg", "j_agg")
ORACLE_MODES = frozenset({"p_best", "j_best"})
REPROJECTION_MODES = frozenset({"p_agg", "j_agg"})
ROOTS = ("gt", "estimate", "estimate_each")


# --------------------------------------------------------------------------------------
# array plumbing: numpy in -> numpy out, torch in -> torch out
# --------------------------------------------------------------------------------------
def _tensor(x: Any, like: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` as a floating tensor (on ``like``'s device and dtype when given)."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if like is not None:
        return t.to(device=like.device, dtype=like.dtype)
    return t if t.is_floating_point() else t.double()


def _out(x: torch.Tensor, numpy: bool) -> Any:
    return x.cpu().numpy() if numpy else x


def _check_hyps(hyps: torch.Tensor) -> None:
    if hyps.ndim < 4 or hyps.shape[-1] != 3:
        raise ValueError(f"hyps must be (*lead, H, F, J, 3), got {tuple(hyps.shape)}")


def _take(hyps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather along the hypothesis axis (-4) with ``index`` broadcastable to (*lead, 1, F, J, 3)."""
    index = index.expand(*hyps.shape[:-4], 1, *hyps.shape[-3:])
    return torch.take_along_dim(hyps, index, dim=-4).squeeze(-4)


# --------------------------------------------------------------------------------------
# the five modes
# --------------------------------------------------------------------------------------
def hypothesis_mean(hyps: Any) -> Any:
    """Mean over the H hypotheses: (*lead, H, F, J, 3) -> (*lead, F, J, 3)."""
    numpy = not isinstance(hyps, torch.Tensor)
    h = _tensor(hyps)
    _check_hyps(h)
    return _out(h.mean(dim=-4), numpy)


def p_best(hyps: Any, gt: Any, frame_mask: Any = None) -> tuple[Any, Any]:
    """Oracle: per clip, the hypothesis with the lowest MPJPE over its (valid) frames and joints.

    Returns (pose (*lead, F, J, 3), selected (*lead,)). ``frame_mask`` (*lead', F) excludes
    padded / invalid frames from the choice.
    """
    numpy = not isinstance(hyps, torch.Tensor)
    h = _tensor(hyps)
    _check_hyps(h)
    g = _tensor(gt, h).unsqueeze(-4)                                   # (*lead', 1, F, J, 3)
    err = torch.linalg.vector_norm(h - g, dim=-1)                       # (*lead, H, F, J)
    if frame_mask is None:
        per_hyp = err.mean(dim=(-2, -1))                                # (*lead, H)
    else:
        m = _tensor(frame_mask, h).unsqueeze(-2).unsqueeze(-1)          # (*lead', 1, F, 1)
        m = m.expand_as(err)
        per_hyp = (err * m).sum(dim=(-2, -1)) / m.sum(dim=(-2, -1)).clamp(min=1)
    selected = per_hyp.argmin(dim=-1)                                   # (*lead,)
    pose = _take(h, selected[..., None, None, None, None])
    return _out(pose, numpy), _out(selected, numpy)


def j_best(hyps: Any, gt: Any) -> tuple[Any, Any]:
    """Oracle: per frame and joint, the hypothesis whose joint is closest to gt.

    Returns (pose (*lead, F, J, 3), selected (*lead, F, J)).
    """
    numpy = not isinstance(hyps, torch.Tensor)
    h = _tensor(hyps)
    _check_hyps(h)
    err = torch.linalg.vector_norm(h - _tensor(gt, h).unsqueeze(-4), dim=-1)  # (*lead, H, F, J)
    selected = err.argmin(dim=-3)                                       # (*lead, F, J)
    pose = _take(h, selected.unsqueeze(-3).unsqueeze(-1))
    return _out(pose, numpy), _out(selected, numpy)


def p_agg(hyps: Any, keypoints_2d: Any, intrinsics: Any, root: str = "estimate",
          trajectory: Any = None, root_joint: int | None = None) -> tuple[Any, Any, bool]:
    """Per frame, the hypothesis whose reprojection is closest to the 2D input (mean over joints).

    Returns (pose (*lead, F, J, 3), selected (*lead, F), uses_gt_root).
    """
    numpy = not isinstance(hyps, torch.Tensor)
    h = _tensor(hyps)
    dist = _reprojection_distance(h, keypoints_2d, intrinsics, root, trajectory, root_joint)  # (*lead, H, F, J)
    selected = dist.mean(dim=-1).argmin(dim=-2)                         # (*lead, F)
    pose = _take(h, selected.unsqueeze(-2)[..., None, None])
    return _out(pose, numpy), _out(selected, numpy), root == "gt"


def j_agg(hyps: Any, keypoints_2d: Any, intrinsics: Any, root: str = "estimate",
          trajectory: Any = None, root_joint: int | None = None) -> tuple[Any, Any, bool]:
    """JPMA (equation (6)): per frame and joint, the hypothesis whose reprojected joint is
    closest to the 2D input. Returns (pose (*lead, F, J, 3), selected (*lead, F, J), uses_gt_root).
    """
    numpy = not isinstance(hyps, torch.Tensor)
    h = _tensor(hyps)
    dist = _reprojection_distance(h, keypoints_2d, intrinsics, root, trajectory, root_joint)  # (*lead, H, F, J)
    selected = dist.argmin(dim=-3)                                      # (*lead, F, J)
    pose = _take(h, selected.unsqueeze(-3).unsqueeze(-1))
    return _out(pose, numpy), _out(selected, numpy), root == "gt"


def aggregate(hyps: Any, mode: str, *, gt: Any = None, keypoints_2d: Any = None, intrinsics: Any = None,
              root: str = "estimate", trajectory: Any = None, frame_mask: Any = None,
              root_joint: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Aggregate hypotheses (*lead, H, F, J, 3) into one pose per frame (*lead, F, J, 3).

    Returns (pose, info) with info = {"mode", "oracle": bool, "uses_gt_root": bool,
    "root": "gt" | "estimate" | "estimate_each" | None, "selected": indices or None}.
    ``gt`` is needed by the oracles; ``keypoints_2d`` and ``intrinsics`` (and ``trajectory``
    when root="gt") by p_agg / j_agg; ``frame_mask`` only affects p_best; ``root_joint`` (the
    joint the hypotheses are relative to) puts an estimated root on that joint's 2D ray
    (``estimate_root``).
    """
    if mode not in MODES:
        raise ValueError(f"aggregation mode must be one of {MODES}, got {mode!r}")
    info: dict[str, Any] = {"mode": mode, "oracle": mode in ORACLE_MODES, "uses_gt_root": False,
                            "root": None, "selected": None}
    if mode == "mean":
        return hypothesis_mean(hyps), info
    if mode in ORACLE_MODES:
        if gt is None:
            raise FinePoseError(f"aggregation mode {mode!r} is an oracle and needs the ground-truth poses; "
                                "without ground truth use 'mean', 'p_agg' or 'j_agg'")
        pose, info["selected"] = p_best(hyps, gt, frame_mask) if mode == "p_best" else j_best(hyps, gt)
        return pose, info
    if keypoints_2d is None or intrinsics is None:
        raise FinePoseError(f"aggregation mode {mode!r} reprojects hypotheses and needs the 2D input and the "
                            "camera intrinsics (cameras.parquet fx, fy, cx, cy); give them or use 'mean'")
    fn = p_agg if mode == "p_agg" else j_agg
    pose, info["selected"], info["uses_gt_root"] = fn(hyps, keypoints_2d, intrinsics, root, trajectory, root_joint)
    info["root"] = root
    return pose, info


# --------------------------------------------------------------------------------------
# reprojection and root estimation
# --------------------------------------------------------------------------------------
def _camera(intrinsics: Any, like: torch.Tensor, extra_axes: int) -> dict[str, torch.Tensor | None]:
    """Intrinsics as tensors shaped (*c, 1 x extra_axes, n) to broadcast against points.

    Pinhole: {"f", "c", "k", "p"}; Aria fisheye: {"aria", "res_w"} (res_w with a trailing axis of 1).
    """
    if isinstance(intrinsics, Mapping):
        if intrinsics.get("aria") is not None:
            if intrinsics.get("res_w") is None:
                raise ValueError("Aria fisheye intrinsics need 'res_w' (the upright image width)")
            res_w = _tensor(intrinsics["res_w"], like)
            parts = {"aria": intrinsics["aria"], "res_w": res_w.reshape(*res_w.shape, 1)}
        else:
            parts = {key: intrinsics.get(key) for key in ("f", "c", "k", "p")}
            if parts["f"] is None or parts["c"] is None:
                raise ValueError("intrinsics need 'f' (fx, fy) and 'c' (cx, cy), or 'aria' and 'res_w'")
    else:
        arr = _tensor(intrinsics, like)
        if arr.shape[-1] == ARIA_INTRINSICS + 1:
            parts = {"aria": arr[..., :ARIA_INTRINSICS], "res_w": arr[..., ARIA_INTRINSICS:]}
        elif arr.shape[-1] in (4, 9):
            parts = {"f": arr[..., 0:2], "c": arr[..., 2:4],
                     "k": arr[..., 4:7] if arr.shape[-1] == 9 else None,
                     "p": arr[..., 7:9] if arr.shape[-1] == 9 else None}
        else:
            raise ValueError(f"an intrinsics array must end in 4 (fx fy cx cy), 9 (+ k1 k2 k3 p1 p2) or "
                             f"{ARIA_INTRINSICS + 1} (Aria fisheye + image width), got {tuple(arr.shape)}")
    out: dict[str, torch.Tensor | None] = {}
    for key, value in parts.items():
        if value is None:
            out[key] = None
            continue
        v = _tensor(value, like)
        out[key] = v.reshape(*v.shape[:-1], *([1] * extra_axes), v.shape[-1])
    return out


def _project(points: torch.Tensor, cam: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """Camera-space points (..., 3) -> pixels (..., 2) with the camera model of ``cam`` (from _camera)."""
    if "aria" in cam:
        return project_aria(points, cam["aria"], cam["res_w"][..., 0])
    return project(points, cam["f"], cam["c"], cam["k"], cam["p"])


def _normalised(keypoints_2d: torch.Tensor, cam: dict[str, torch.Tensor | None]
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pixels (..., 2) -> (undistorted normalised image coordinates (X/Z, Y/Z) (..., 2), valid (...) or None).

    For a fisheye, ``valid`` is False where a 2D point lies outside the lens' image circle
    (no ray projects there, e.g. a joint annotated outside the image): such joints must not
    steer the root estimate.
    """
    if "aria" in cam:
        rays = unproject_aria(keypoints_2d, cam["aria"], cam["res_w"][..., 0])
        return rays, aria_ray_valid(keypoints_2d, rays, cam["aria"], cam["res_w"][..., 0])
    return _undistort((keypoints_2d - cam["c"]) / cam["f"], cam["k"], cam["p"]), None


def reproject(poses: Any, trajectory: Any, intrinsics: Any) -> Any:
    """Root-relative poses (..., F, J, 3) + root trajectory (..., F, 3) -> 2D (..., F, J, 2).

    ``trajectory`` broadcasts against the poses' axes without J (use (*lead', 1, F, 3) to
    share it over a hypothesis axis); ``intrinsics`` (*c, n) against the axes without F and J.
    """
    numpy = not isinstance(poses, torch.Tensor)
    p = _tensor(poses)
    traj = _tensor(trajectory, p).unsqueeze(-2)                         # (..., F, 1, 3)
    cam = _camera(intrinsics, p, extra_axes=2)
    return _out(_project(p + traj, cam), numpy)


def _undistort(xy_d: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None, iterations: int = 20) -> torch.Tensor:
    """Invert the Human3.6M distortion (see finepose.camera) on normalised image coordinates."""
    if k is None and p is None:
        return xy_d
    xy = xy_d
    for _ in range(iterations):                                        # fixed point; distortion is mild
        r2 = (xy**2).sum(-1, keepdim=True)
        radial = 1.0 if k is None else 1 + k[..., 0:1] * r2 + k[..., 1:2] * r2**2 + k[..., 2:3] * r2**3
        if p is None:
            xy = xy_d / radial
        else:
            tan = (p * xy).sum(-1, keepdim=True)
            xy = (xy_d - p * r2) / (radial + tan)
    return xy


def estimate_root(poses: Any, keypoints_2d: Any, intrinsics: Any, weights: Any = None,
                  root_joint: int | None = None) -> Any:
    """Camera-space root translation T per frame from a root-relative pose and its 2D input.

    poses (..., F, J, 3), keypoints_2d (..., F, J, 2) -> T (..., F, 3), the linear least-squares
    solution of (X_j + T)_x - x_j (X_j + T)_z = 0 and (X_j + T)_y - y_j (X_j + T)_z = 0 over
    joints, where (x_j, y_j) are the undistorted normalised image coordinates (X/Z, Y/Z):
    ((u - c) / f) undistorted for a pinhole camera, the unprojected ray for an Aria fisheye
    camera (joints whose 2D lies outside the fisheye's image circle get weight 0). Exact for
    noise-free projections. ``weights`` (..., F, J) weight joints
    (e.g. detector confidences; zero drops a joint).

    ``root_joint``: the index of the joint the pose is relative to. Its 2D is then taken as
    the projection of the root itself: T is constrained to that joint's ray,
    T = s (x_r, y_r, 1) - X_r, and only the distance s is fitted to the other joints. The
    free fit spreads the pose's own error into a lateral shift of the root (on real data with
    a weak model 58-71 mm, 13-16 px at 5 m, which steers J-Agg's per-joint choice; see
    results/h36m_real/README.md); on the ray the root's 2D is matched exactly and a wrong pose
    costs only depth. Frames where that joint has weight 0 (or no ray) keep the free fit.
    """
    numpy = not isinstance(poses, torch.Tensor)
    given = _tensor(poses)
    pose = given.double()                                               # solve in float64
    kp = _tensor(keypoints_2d, pose)
    cam = _camera(intrinsics, pose, extra_axes=2)
    xy, valid = _normalised(kp, cam)                                    # (..., F, J, 2)
    x, y = xy[..., 0], xy[..., 1]                                       # (..., F, J)
    X, Y, Z = pose[..., 0], pose[..., 1], pose[..., 2]
    w = torch.ones_like(x) if weights is None else _tensor(weights, pose)
    if valid is not None:                                               # 2D outside a fisheye's image circle
        w = w * valid.to(w.dtype)
    rx, ry = x * Z - X, y * Z - Y                                       # right-hand sides
    sw, sx, sy = w.sum(-1), (w * x).sum(-1), (w * y).sum(-1)
    sxx = (w * (x * x + y * y)).sum(-1)
    zero = torch.zeros_like(sw)
    normal = torch.stack([torch.stack([sw, zero, -sx], -1),
                          torch.stack([zero, sw, -sy], -1),
                          torch.stack([-sx, -sy, sxx], -1)], -2)        # (..., F, 3, 3) A^T W A
    rhs = torch.stack([(w * rx).sum(-1), (w * ry).sum(-1), -(w * (x * rx + y * ry)).sum(-1)], -1)
    # Degenerate frames (no usable joint, or all joints at one 2D point) make A^T W A singular.
    # Solve them as T = 0 (finite; such frames carry no 2D evidence and are not scored) and
    # leave every well-posed frame's system untouched.
    scale = normal.diagonal(dim1=-2, dim2=-1).sum(-1)
    singular = torch.linalg.det(normal).abs() <= 1e-12 * scale.pow(3).clamp_min(1e-300)
    if bool(singular.any()):
        eye = torch.eye(3, dtype=normal.dtype, device=normal.device)
        normal = torch.where(singular[..., None, None], eye, normal)
        rhs = torch.where(singular[..., None], torch.zeros_like(rhs), rhs)
    T = torch.linalg.solve(normal, rhs.unsqueeze(-1)).squeeze(-1)     # batch axes broadcast
    if root_joint is not None:
        T = _root_on_its_ray(T, pose, x, y, w, root_joint)
    return _out(T.to(given.dtype), numpy)


def _root_on_its_ray(free: torch.Tensor, pose: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                     w: torch.Tensor, r: int) -> torch.Tensor:
    """T = s u - X_r with u = (x_r, y_r, 1), s the least-squares distance over the joints:
    s (x_r - x_j) = x_j (Z_j - Z_r) - (X_j - X_r), and the same in y. ``free`` (..., F, 3) is kept
    where the root joint carries no weight or the other joints do not pin s down."""
    rel = pose - pose[..., r:r + 1, :]                                  # (..., F, J, 3) relative to joint r
    dx, dy = x[..., r:r + 1] - x, y[..., r:r + 1] - y                   # (..., F, J)
    a, b = x * rel[..., 2] - rel[..., 0], y * rel[..., 2] - rel[..., 1]
    den = (w * (dx * dx + dy * dy)).sum(-1)
    scale = (w * (x * x + y * y + 1)).sum(-1)
    ok = (w[..., r] > 0) & (den > 1e-12 * scale.clamp_min(1e-300))
    s = (w * (dx * a + dy * b)).sum(-1) / torch.where(ok, den, torch.ones_like(den))
    xr, yr = torch.broadcast_tensors(x[..., r], y[..., r], s)[:2]
    ray = torch.stack([xr, yr, torch.ones_like(xr)], -1)
    on_ray = s.unsqueeze(-1) * ray - pose[..., r, :]
    return torch.where(ok.unsqueeze(-1), on_ray, free)


def _reprojection_distance(h: torch.Tensor, keypoints_2d: Any, intrinsics: Any, root: str,
                           trajectory: Any, root_joint: int | None = None) -> torch.Tensor:
    """2D distance of each hypothesis' reprojected joints to the 2D input: (*lead, H, F, J)."""
    _check_hyps(h)
    if root not in ROOTS:
        raise ValueError(f"root must be one of {ROOTS}, got {root!r}")
    kp = _tensor(keypoints_2d, h)                                       # (*lead', F, J, 2)
    if root == "gt":
        if trajectory is None:
            raise FinePoseError("root='gt' needs the ground-truth root trajectory (trajectory=...); "
                                "without it use root='estimate'")
        traj = _tensor(trajectory, h).unsqueeze(-3)                     # (*lead', 1, F, 3): shared over H
    elif root == "estimate":
        traj = estimate_root(h.mean(dim=-4), kp, intrinsics, root_joint=root_joint).unsqueeze(-3)  # (*lead, 1, F, 3)
    else:
        # One solve per hypothesis with H moved in front, so that per-clip intrinsics (*c) keep
        # aligning with the trailing clip axes of *lead rather than with the hypothesis axis.
        traj = estimate_root(h.movedim(-4, 0), kp, intrinsics, root_joint=root_joint).movedim(0, -3)  # (*lead, H, F, 3)
    cam = _camera(intrinsics, h, extra_axes=3)                          # (*c, 1, 1, 1, n)
    proj = _project(h + traj.unsqueeze(-2), cam)                       # (*lead, H, F, J, 2)
    return torch.linalg.vector_norm(proj - kp.unsqueeze(-4), dim=-1)
