"""Camera geometry: world <-> camera transforms, projection with distortion, screen normalisation.

Conventions (Human3.6M):
- World and camera coordinates are right-handed; the camera looks along +z, x to the
  right and y down in the image.
- ``R`` is the world-to-camera rotation and ``t`` the camera centre in world
  coordinates: ``X_cam = R @ (X_world - t)``. In ``cameras.h5`` (3d-pose-baseline
  layout) the stored matrix is the transpose, ``R = R_h5.T`` and ``t = T``; in the
  reference JSON (VideoPose3D layout) the orientation is the quaternion (w, x, y, z) of
  the camera-to-world rotation, so ``R = quaternion_to_matrix(q).T``.
- Distortion is the Human3.6M model (radial k1..k3, tangential p1, p2) with ``p`` in
  the reference JSON's order; ``cameras.h5`` stores the same two numbers swapped
  (``p = p_h5[::-1]``). With ``(x, y) = (X/Z, Y/Z)`` and ``r2 = x^2 + y^2``::

      radial = 1 + k1 r2 + k2 r2^2 + k3 r2^3
      tan    = p1 x + p2 y
      x_d    = x (radial + tan) + p1 r2
      y_d    = y (radial + tan) + p2 r2
      u, v   = fx x_d + cx, fy y_d + cy

  This is the formula of the dataset's own MATLAB code (and of VideoPose3D); it is
  not OpenCV's Brown-Conrady model (which has factors of 2 and pairs p differently).
- Screen normalisation maps pixels to [-1, 1] by the image width, keeping the aspect:
  ``x / w * 2 - 1``, ``y / w * 2 - h / w``.

Projection and normalisation functions accept numpy arrays or torch tensors (the
camera parameters are converted to the points' type, dtype and device) and broadcast
parameters against the points' leading dimensions.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from finepose.io import FinePoseError

# Camera ids in the order VideoPose3D's npz files index cameras (0..3).
H36M_CAMERA_IDS = ("54138969", "55011271", "58860488", "60457274")
H36M_SUBJECTS = ("S1", "S5", "S6", "S7", "S8", "S9", "S11")


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _param(value: Any, like: Any) -> Any:
    """``value`` as an array of the same kind (numpy/torch), float dtype and device as ``like``."""
    if _is_torch(like):
        import torch

        if isinstance(value, torch.Tensor):  # e.g. per-clip intrinsics already on the GPU
            return value.to(dtype=like.dtype, device=like.device)
        return torch.as_tensor(np.asarray(value, dtype=np.float64), dtype=like.dtype, device=like.device)
    dtype = like.dtype if np.issubdtype(np.asarray(like).dtype, np.floating) else np.float64
    return np.asarray(value, dtype=dtype)


def _float(x: Any) -> Any:
    if _is_torch(x):
        return x if x.is_floating_point() else x.float()
    x = np.asarray(x)
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)


# --- rotations ----------------------------------------------------------------------------

def quaternion_to_matrix(q: Any) -> np.ndarray:
    """Unit quaternion (w, x, y, z) -> 3x3 rotation matrix that rotates vectors by q."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def world_to_camera(points: Any, R: Any, t: Any) -> Any:
    """(..., 3) world points -> camera coordinates, ``R @ (X - t)``; t in the points' units."""
    points = _float(points)
    return _rotate(points - _param(t, points), _param(R, points).T)


def camera_to_world(points: Any, R: Any, t: Any) -> Any:
    """Inverse of ``world_to_camera``: ``R.T @ X + t``."""
    points = _float(points)
    return _rotate(points, _param(R, points)) + _param(t, points)


def _rotate(points: Any, matrix_t: Any) -> Any:
    """(..., 3) @ (3, 3) as one matrix product (a stack of tiny products is ~10x slower)."""
    shape = points.shape
    return (points.reshape(-1, 3) @ matrix_t).reshape(shape)


# --- projection ---------------------------------------------------------------------------

def project(points: Any, f: Any, c: Any, k: Any = None, p: Any = None, clamp: bool = True) -> Any:
    """(..., 3) camera-space points -> (..., 2) pixels with the Human3.6M distortion model.

    ``f``, ``c`` are (..., 2) focal lengths and principal point in pixels, ``k`` (..., 3)
    radial and ``p`` (..., 2) tangential coefficients (None = no distortion); all
    broadcast against ``points[..., :2]``. ``clamp`` limits x/z and y/z to [-1, 1] before
    the distortion polynomial (as VideoPose3D does) so that points far outside the field
    of view, e.g. from a noisy 3D hypothesis, cannot blow up; real H36M poses stay well
    inside (|x/z| < 0.6).
    """
    points = _float(points)
    xy = points[..., :2] / points[..., 2:3]                       # (..., 2) normalised image plane
    if clamp:
        xy = xy.clip(-1.0, 1.0)
    if k is not None or p is not None:
        r2 = xy[..., 0:1] ** 2 + xy[..., 1:2] ** 2                # (..., 1)
        radial = 1.0
        if k is not None:
            k = _param(k, points)
            radial = 1.0 + k[..., 0:1] * r2 + k[..., 1:2] * r2 ** 2 + k[..., 2:3] * r2 ** 3
        if p is not None:
            p = _param(p, points)
            tan = p[..., 0:1] * xy[..., 0:1] + p[..., 1:2] * xy[..., 1:2]
            xy = xy * (radial + tan) + p * r2
        else:
            xy = xy * radial
    return _param(f, points) * xy + _param(c, points)


def project_pinhole(points: Any, f: Any, c: Any) -> Any:
    """(..., 3) camera-space points -> (..., 2) pixels, no distortion and no clamping."""
    return project(points, f, c, clamp=False)


# --- intrinsics from 2D/3D correspondences (datasets whose calibration may not match) -----

def fit_intrinsics(points_3d: np.ndarray, points_2d: np.ndarray) -> dict[str, float]:
    """Least-squares fx, fy, cx, cy with u = fx X/Z + cx, v = fy Y/Z + cy over all finite joints."""
    xy = points_3d[..., :2] / points_3d[..., 2:3]
    keep = np.isfinite(xy).all(-1) & np.isfinite(points_2d).all(-1) & (points_3d[..., 2] > 0)
    if keep.sum() < 4:
        raise ValueError("fewer than 4 usable joints to fit intrinsics from")
    out = {}
    for axis, (f, c) in enumerate((("fx", "cx"), ("fy", "cy"))):
        design = np.stack([xy[..., axis][keep], np.ones(int(keep.sum()))], axis=1)
        (scale, offset), *_ = np.linalg.lstsq(design, points_2d[..., axis][keep], rcond=None)
        out[f], out[c] = float(scale), float(offset)
    return out


def reprojection_error(points_3d: np.ndarray, points_2d: np.ndarray, intrinsics: Mapping[str, float]) -> float:
    """Mean pixel distance between the pinhole projection of the 3D and the given 2D over finite joints."""
    f = np.array([intrinsics["fx"], intrinsics["fy"]], dtype=np.float64)
    c = np.array([intrinsics["cx"], intrinsics["cy"]], dtype=np.float64)
    error = np.linalg.norm(project_pinhole(np.asarray(points_3d, dtype=np.float64), f, c) - points_2d, axis=-1)
    return float(np.nanmean(error)) if np.isfinite(error).any() else float("nan")


def choose_intrinsics(points_3d: np.ndarray, points_2d: np.ndarray, calibrated: Mapping[str, float] | None,
                      max_reprojection_px: float) -> tuple[dict[str, float], str, float, float | None]:
    """Calibration when consistent with the 2D, else the fit: (intrinsics, source, error, calibration error)."""
    calib_error = None
    if calibrated is not None:
        calib_error = reprojection_error(points_3d, points_2d, calibrated)
        if calib_error <= max_reprojection_px:
            return dict(calibrated), "calibration", calib_error, calib_error
    fitted = fit_intrinsics(points_3d, points_2d)
    return fitted, "fitted", reprojection_error(points_3d, points_2d, fitted), calib_error


# --- Aria fisheye (EgoHumans) -------------------------------------------------------------
# Aria's FisheyeRadTanThinPrism camera, 15 intrinsics in the *unrotated* sensor frame:
# [f, c_u, c_v, k0..k5, p0, p1, s0..s3]. With (a, b) = (X/Z, Y/Z), r = |(a, b)|, theta = atan r:
#     xr  = theta (1 + k0 theta^2 + ... + k5 theta^12) (a, b) / r
#     n   = |xr|^2
#     u_n = xr_x + 2 p0 xr_x^2 + p0 n + s0 n + s1 n^2
#     v_n = xr_y + 2 p1 xr_y^2 + p1 n + s2 n + s3 n^2
#     (u, v) = f (u_n, v_n) + (c_u, c_v)
# (the official EgoHumans code's ``aria_camera.vec_image_from_cam``, with its per-axis
# tangential term, so that it reproduces the benchmark's 2D). EgoHumans stores images
# rotated upright: upright points are X' = -Y, Y' = X, Z' = Z and upright pixels
# (u', v') = (W - v, u) for a W-pixel-wide image. Like ``project``, these functions take
# numpy arrays or torch tensors and broadcast the (..., 15) intrinsics against the points.
ARIA_INTRINSICS = 15
_ARIA_EPS = 1e-9
_ARIA_MAX_THETA = 1.55  # rad, just inside 90 degrees: tan stays finite


def _ops(x: Any):
    if _is_torch(x):
        import torch

        return torch.atan, torch.tan, torch.where, torch.stack
    return np.arctan, np.tan, np.where, np.stack


def _aria(intrinsics: Any, like: Any) -> tuple[Any, Any, Any, Any, Any]:
    intr = _param(intrinsics, like)
    if intr.shape[-1] != ARIA_INTRINSICS:
        raise ValueError(f"Aria fisheye intrinsics end in {ARIA_INTRINSICS} values, got {tuple(intr.shape)}")
    return intr[..., 0:1], intr[..., 1:3], intr[..., 3:9], intr[..., 9:11], intr[..., 11:15]


def _theta_polynomial(theta: Any, k: Any) -> tuple[Any, Any]:
    """(theta (1 + sum k_i theta^(2i+2)), its derivative in theta)."""
    theta_sq = theta * theta
    radial, slope, power = 1.0, 1.0, theta_sq
    for i in range(k.shape[-1]):
        radial = radial + k[..., i:i + 1] * power
        slope = slope + (2 * i + 3) * k[..., i:i + 1] * power
        power = power * theta_sq
    return theta * radial, slope


def _aria_tangential(xr: Any, tangential: Any, prism: Any, stack) -> Any:
    """The tangential and thin-prism offset added to the radially distorted point xr (..., 2)."""
    n = (xr * xr).sum(-1)[..., None]
    offset = 2.0 * xr * tangential * xr + n * tangential
    prism_uv = stack([(prism[..., 0:1] * n + prism[..., 1:2] * n * n)[..., 0],
                      (prism[..., 2:3] * n + prism[..., 3:4] * n * n)[..., 0]], -1)
    return offset + prism_uv


def rotate_3d_to_upright(points: Any) -> Any:
    """(..., 3) unrotated Aria sensor frame -> upright image frame: X' = -Y, Y' = X, Z' = Z."""
    points = _float(points)
    return _ops(points)[3]([-points[..., 1], points[..., 0], points[..., 2]], -1)


def rotate_3d_to_raw(points: Any) -> Any:
    """Inverse of ``rotate_3d_to_upright``: X = Y', Y = -X'."""
    points = _float(points)
    return _ops(points)[3]([points[..., 1], -points[..., 0], points[..., 2]], -1)


def project_aria_raw(points: Any, intrinsics: Any) -> Any:
    """(..., 3) points in the unrotated sensor frame -> (..., 2) raw fisheye pixels.

    Points on or behind the image plane (z <= 0) give (-1, -1), as in the official code.
    """
    points = _float(points)
    atan, _, where, stack = _ops(points)
    f, c, k, tangential, prism = _aria(intrinsics, points)
    z = points[..., 2:3]
    safe_z = where(z > 0, z, z * 0 + 1)
    ab = points[..., :2] / safe_z
    r = (ab * ab).sum(-1)[..., None] ** 0.5
    safe_r = where(r < _ARIA_EPS, r * 0 + 1, r)
    theta = atan(r)
    distorted, _ = _theta_polynomial(theta, k)
    xr = where(r < _ARIA_EPS, ab, distorted / safe_r * ab)
    uv = f * (xr + _aria_tangential(xr, tangential, prism, stack)) + c
    return where(z > 0, uv, uv * 0 - 1.0)


def unproject_aria_raw(pixels: Any, intrinsics: Any, iterations: int = 20) -> Any:
    """Inverse of ``project_aria_raw`` up to depth: (..., 2) raw pixels -> (..., 2) (X/Z, Y/Z).

    The tangential and thin-prism terms are removed by fixed-point iteration (they are
    small), then theta is solved from the radial polynomial by Newton's method, kept in
    [0, 1.55] rad. Pixels outside the lens' image circle (beyond the polynomial's largest
    radius, e.g. an image corner) have no inverse: the result is finite but does not
    project back to them (``aria_ray_valid`` tells).
    """
    pixels = _float(pixels)
    _, tan, where, stack = _ops(pixels)
    f, c, k, tangential, prism = _aria(intrinsics, pixels)
    d = (pixels - c) / f
    xr = d
    for _ in range(iterations):
        xr = d - _aria_tangential(xr, tangential, prism, stack)
    rho = (xr * xr).sum(-1)[..., None] ** 0.5
    theta = rho
    for _ in range(iterations):
        value, slope = _theta_polynomial(theta, k)
        slope = where(slope > 1e-6, slope, slope * 0 + 1e-6)
        theta = (theta - (value - rho) / slope).clip(0.0, _ARIA_MAX_THETA)
    safe_rho = where(rho < _ARIA_EPS, rho * 0 + 1, rho)
    return where(rho < _ARIA_EPS, xr, xr * tan(theta) / safe_rho)


def aria_ray_valid(pixels: Any, rays: Any, intrinsics: Any, res_w: Any, tolerance_px: float = 0.5) -> Any:
    """(..., ) bool: whether the upright rays (X/Z, Y/Z) from ``unproject_aria`` project back onto
    the upright ``pixels`` (False outside the lens' image circle, where there is no inverse)."""
    pixels = _float(pixels)
    rays = _param(rays, pixels)
    back = project_aria(_ops(rays)[3]([rays[..., 0], rays[..., 1], rays[..., 0] * 0 + 1], -1), intrinsics, res_w)
    error = ((back - pixels) ** 2).sum(-1) ** 0.5
    return error <= tolerance_px


def project_aria(points: Any, intrinsics: Any, res_w: Any) -> Any:
    """(..., 3) upright camera-frame points -> (..., 2) upright pixels (image ``res_w`` pixels wide)."""
    raw = project_aria_raw(rotate_3d_to_raw(points), intrinsics)
    w = _param(res_w, raw)
    return _ops(raw)[3]([w - raw[..., 1], raw[..., 0]], -1)


def unproject_aria(pixels: Any, intrinsics: Any, res_w: Any, iterations: int = 20) -> Any:
    """(..., 2) upright pixels -> (..., 2) upright normalised coordinates (X'/Z, Y'/Z)."""
    pixels = _float(pixels)
    stack = _ops(pixels)[3]
    w = _param(res_w, pixels)
    ab = unproject_aria_raw(stack([pixels[..., 1], w - pixels[..., 0]], -1), intrinsics, iterations)
    return stack([-ab[..., 1], ab[..., 0]], -1)


# cameras.parquet rows of model fisheye_aria: the upright image's fx=fy=f, cx = width - c_u,
# cy = c_v, k = the 6 radial and p = the 6 tangential/thin-prism terms.

def camera_row_intrinsics(intrinsics: np.ndarray, res_w: int) -> dict[str, Any]:
    """15 Aria intrinsics (unrotated) -> the camera-table fields (the upright encoding of finepose/data/egohumans.py)."""
    intr = [float(v) for v in intrinsics]
    return {"fx": intr[0], "fy": intr[0], "cx": res_w - intr[2], "cy": intr[1], "k": intr[3:9], "p": intr[9:15]}


def aria_intrinsics_from_row(row: Mapping[str, Any]) -> np.ndarray:
    """Inverse of ``camera_row_intrinsics``: a cameras.parquet row -> the 15 unrotated Aria intrinsics."""
    if row.get("fx") is None:
        raise ValueError(f"camera {row.get('camera')} of {row.get('subject')} has no intrinsics "
                         f"(intrinsics_source {row.get('intrinsics_source')!r})")
    k, p = row.get("k"), row.get("p")
    if k is None or p is None or len(k) != 6 or len(p) != 6:
        raise ValueError(f"camera {row.get('camera')} of {row.get('subject')}: the fisheye_aria row lacks its 6 "
                         "radial (k) and 6 tangential/thin-prism (p) terms")
    return np.array([row["fx"], row["cy"], row["res_w"] - row["cx"], *row["k"], *row["p"]], dtype=np.float64)


def project_fisheye_aria(points: np.ndarray, row: Mapping[str, Any]) -> np.ndarray:
    """(..., 3) upright camera-frame points (as in the frame table) -> (..., 2) upright pixels, with a camera row."""
    return project_aria(np.asarray(points, dtype=np.float64), aria_intrinsics_from_row(row), row["res_w"])


def normalize_screen(pixels: Any, w: float, h: float) -> Any:
    """Pixels -> screen coordinates: x in [-1, 1], y scaled by the same factor (``y/w*2 - h/w``)."""
    pixels = _float(pixels)
    return pixels / w * 2 - _param([1.0, h / w], pixels)


def denormalize_screen(screen: Any, w: float, h: float) -> Any:
    """Inverse of ``normalize_screen``."""
    screen = _float(screen)
    return (screen + _param([1.0, h / w], screen)) * w / 2


# --- camera objects -----------------------------------------------------------------------

@dataclass(frozen=True)
class Camera:
    """One calibrated camera of one subject's recordings.

    ``t`` is in millimetres (the calibration's unit); ``world_to_camera`` takes the
    points' unit. ``p`` follows the module convention (reference JSON order).
    """

    id: str
    res_w: int
    res_h: int
    f: np.ndarray                 # (2,) fx, fy pixels
    c: np.ndarray                 # (2,) cx, cy pixels
    k: np.ndarray                 # (3,) radial
    p: np.ndarray                 # (2,) tangential
    R: np.ndarray | None = None   # (3, 3) world -> camera rotation
    t: np.ndarray | None = None   # (3,) camera centre, world mm
    subject: str | None = None

    def world_to_camera(self, points: Any, unit: str = "mm") -> Any:
        if self.R is None or self.t is None:
            raise ValueError(f"camera {self.id} of {self.subject} has no extrinsics")
        return world_to_camera(points, self.R, self.t * _UNIT_SCALE[unit])

    def camera_to_world(self, points: Any, unit: str = "mm") -> Any:
        if self.R is None or self.t is None:
            raise ValueError(f"camera {self.id} of {self.subject} has no extrinsics")
        return camera_to_world(points, self.R, self.t * _UNIT_SCALE[unit])

    def project(self, points_cam: Any, distort: bool = True, clamp: bool = True) -> Any:
        if distort:
            return project(points_cam, self.f, self.c, self.k, self.p, clamp=clamp)
        return project(points_cam, self.f, self.c, clamp=clamp)

    def table_row(self, dataset: str, subject: str | None = None) -> dict[str, Any]:
        """A row for ``finepose.data.table.build_camera_table``."""
        return dict(dataset=dataset, subject=subject or self.subject, camera=self.id,
                    res_w=int(self.res_w), res_h=int(self.res_h),
                    fx=float(self.f[0]), fy=float(self.f[1]), cx=float(self.c[0]), cy=float(self.c[1]),
                    k=[float(v) for v in self.k], p=[float(v) for v in self.p],
                    model="pinhole_radtan", intrinsics_source="calibration")


_UNIT_SCALE = {"mm": 1.0, "m": 1e-3}


def intrinsics_from_row(row: Mapping[str, Any]) -> dict[str, np.ndarray | None]:
    """A cameras.parquet row -> keyword arguments for ``project`` (f, c, k, p).

    Missing distortion becomes None (pinhole). Raises ValueError when the row has no
    focal length (``intrinsics_source == 'missing'``).
    """
    if row.get("fx") is None or row.get("cx") is None:
        raise ValueError(f"camera {row.get('camera')} of {row.get('subject')} has no intrinsics")
    k, p = row.get("k"), row.get("p")
    return dict(f=np.array([row["fx"], row["fy"]], dtype=np.float64),
                c=np.array([row["cx"], row["cy"]], dtype=np.float64),
                k=np.asarray(k, dtype=np.float64) if k else None,
                p=np.asarray(p, dtype=np.float64) if p else None)


def load_h36m_cameras(path: str | Path | None = None) -> dict[tuple[str, str], Camera]:
    """Human3.6M cameras from the reference JSON: {(subject, camera_id): Camera}.

    ``path`` defaults to the copy shipped as package data
    (``finepose/resources/h36m_cameras.json``). Subjects without extrinsics (S2-S4)
    are left out.
    """
    if path is None:
        # beside this module, not via importlib.resources: run from a clone's parent folder,
        # "finepose" may be the clone folder itself (a namespace package)
        text = (Path(__file__).resolve().parent / "resources" / "h36m_cameras.json").read_text()
        origin = "finepose/resources/h36m_cameras.json"
    else:
        origin = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise FinePoseError(f"{origin}: cannot read camera file ({exc})") from exc
    try:
        data = json.loads(text)
        intrinsics = {str(cam["id"]): cam for cam in data["intrinsics"]}
        out: dict[tuple[str, str], Camera] = {}
        for subject, extrinsics in data["extrinsics"].items():
            for cam_id, ext in zip(intrinsics, extrinsics):
                if not ext:
                    continue
                intr = intrinsics[cam_id]
                out[(subject, cam_id)] = Camera(
                    id=cam_id, res_w=int(intr["res_w"]), res_h=int(intr["res_h"]),
                    f=np.asarray(intr["focal_length"], dtype=np.float64),
                    c=np.asarray(intr["center"], dtype=np.float64),
                    k=np.asarray(intr["radial_distortion"], dtype=np.float64),
                    p=np.asarray(intr["tangential_distortion"], dtype=np.float64),
                    R=quaternion_to_matrix(ext["orientation"]).T,
                    t=np.asarray(ext["translation"], dtype=np.float64),
                    subject=subject,
                )
    except (KeyError, TypeError, ValueError) as exc:
        raise FinePoseError(f"{origin}: not a Human3.6M camera file in the reference layout ({exc!r})") from exc
    return out


def h36m_resolution(camera_id: str) -> tuple[int, int]:
    """(res_w, res_h) of a Human3.6M camera (the sensor size does not depend on the subject)."""
    for (_, cam_id), cam in load_h36m_cameras().items():
        if cam_id == camera_id:
            return cam.res_w, cam.res_h
    raise KeyError(f"unknown Human3.6M camera id {camera_id!r}; known: {', '.join(H36M_CAMERA_IDS)}")
