"""Camera model: rotations, projection with distortion (by hand and on real H36M data), screen normalisation."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from finepose.camera import (
    H36M_CAMERA_IDS, H36M_SUBJECTS, camera_to_world, denormalize_screen, intrinsics_from_row, load_h36m_cameras,
    normalize_screen, project, project_pinhole, quaternion_to_matrix, world_to_camera,
)
from finepose.io import FinePoseError
from finepose.skeleton import H36M32_TO_17, convert

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "h36m_cameras.json"
LIMBS = [1, 2, 3, 4, 5, 6, 11, 12, 13, 14, 15, 16]  # the 12 joints MPII and H36M-17 share one to one


def test_quaternion_to_matrix():
    half = np.sqrt(0.5)
    np.testing.assert_allclose(quaternion_to_matrix([half, 0, 0, half]),  # 90 degrees about z
                               [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-12)
    q = np.random.default_rng(0).normal(size=4)
    R = quaternion_to_matrix(q)
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(R) == pytest.approx(1.0)
    np.testing.assert_allclose(quaternion_to_matrix(-q), R, atol=1e-12)  # q and -q: same rotation


def test_world_camera_round_trip():
    rng = np.random.default_rng(1)
    R, t = quaternion_to_matrix(rng.normal(size=4)), rng.normal(size=3) * 1000
    X = rng.normal(size=(5, 17, 3)) * 1000
    Xc = world_to_camera(X, R, t)
    np.testing.assert_allclose(Xc[2, 3], R @ (X[2, 3] - t))
    np.testing.assert_allclose(camera_to_world(Xc, R, t), X, atol=1e-9)


def test_pinhole_by_hand():
    uv = project_pinhole(np.array([0.1, -0.2, 2.0]), f=[1000, 1100], c=[500, 400])
    np.testing.assert_allclose(uv, [1000 * 0.05 + 500, 1100 * -0.1 + 400])


def test_distortion_by_hand():
    k, p = np.array([-0.2, 0.25, -0.003]), np.array([-0.001, 0.0015])
    f, c = np.array([1145.0, 1143.8]), np.array([512.5, 515.5])
    X = np.array([[0.3, -0.25, 3.0], [-1.1, 0.4, 4.2], [0.0, 0.0, 5.0]])
    uv = project(X, f, c, k, p)
    for point, got in zip(X, uv):
        x, y = point[0] / point[2], point[1] / point[2]
        r2 = x * x + y * y
        radial = 1 + k[0] * r2 + k[1] * r2 ** 2 + k[2] * r2 ** 3
        # expanded form of the H36M model: x(radial + p1 x + p2 y) + p1 r2, ...
        xd = x * radial + p[0] * (x * x + r2) + p[1] * x * y
        yd = y * radial + p[1] * (y * y + r2) + p[0] * x * y
        np.testing.assert_allclose(got, [f[0] * xd + c[0], f[1] * yd + c[1]], rtol=1e-12)
    np.testing.assert_allclose(uv[2], c)  # the optical axis is not distorted


def test_clamp_bounds_far_off_axis_points():
    f, c, k = [1000, 1000], [500, 500], [0.5, 0.5, 0.5]
    far = np.array([50.0, 0.0, 1.0])  # x/z = 50, behind a huge polynomial without the clamp
    assert project(far, f, c, k, clamp=True)[0] == pytest.approx(1000 * (1 + 0.5 * 3) + 500)
    assert project(far, f, c, k, clamp=False)[0] > 1e12


def test_torch_matches_numpy_and_keeps_gradients():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(4, 17, 3)) * 0.3 + [0, 0, 4]
    cam = load_h36m_cameras()[("S9", "55011271")]
    expected = project(X, cam.f, cam.c, cam.k, cam.p)
    Xt = torch.tensor(X, requires_grad=True)
    got = project(Xt, cam.f, cam.c, cam.k, cam.p)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-12)
    got.sum().backward()
    assert torch.isfinite(Xt.grad).all()
    screen = normalize_screen(got.detach(), 1000, 1002)
    np.testing.assert_allclose(screen.numpy(), normalize_screen(expected, 1000, 1002))
    # batched cameras: parameters broadcast against the points' leading dimensions
    f = np.stack([cam.f, cam.f * 2])[:, None, :]           # (2, 1, 2)
    uv = project(np.stack([X[0], X[0]]), f, cam.c)         # same points, two cameras
    np.testing.assert_allclose(uv[1] - cam.c, 2 * (uv[0] - cam.c))


def test_screen_normalisation():
    w, h = 1000, 1002
    pts = np.array([[0, 0], [w, h], [w / 2, h / 2], [250, 600]], dtype=float)
    norm = normalize_screen(pts, w, h)
    np.testing.assert_allclose(norm[0], [-1, -h / w])
    np.testing.assert_allclose(norm[1], [1, h / w])
    np.testing.assert_allclose(norm[2], [0, 0], atol=1e-12)
    np.testing.assert_allclose(norm[3], [250 / w * 2 - 1, 600 / w * 2 - h / w])
    np.testing.assert_allclose(denormalize_screen(norm, w, h), pts)


def test_package_cameras():
    cams = load_h36m_cameras()
    assert set(cams) == {(s, c) for s in H36M_SUBJECTS for c in H36M_CAMERA_IDS}
    cam = cams[("S1", "54138969")]
    assert (cam.res_w, cam.res_h) == (1000, 1002)
    np.testing.assert_allclose(cam.R @ cam.R.T, np.eye(3), atol=1e-6)
    row = cam.table_row("h36m")
    assert row["subject"] == "S1" and row["model"] == "pinhole_radtan"
    kw = intrinsics_from_row(row)
    np.testing.assert_allclose(project(np.array([0.2, 0.1, 4.0]), **kw), cam.project(np.array([0.2, 0.1, 4.0])))
    with pytest.raises(ValueError, match="no intrinsics"):
        intrinsics_from_row({"camera": "x", "subject": "S1", "fx": None, "cx": None})


def test_package_cameras_are_the_reference_file():
    if not REFERENCE.is_file():
        pytest.skip(f"shared data: {REFERENCE} is absent")
    packaged = Path(__file__).resolve().parents[1] / "finepose" / "resources" / "h36m_cameras.json"
    assert json.loads(packaged.read_text()) == json.loads(REFERENCE.read_text())


def test_bad_camera_file_names_it(tmp_path):
    bad = tmp_path / "cams.json"
    bad.write_text('{"intrinsics": []}')
    with pytest.raises(FinePoseError, match="cams.json"):
        load_h36m_cameras(bad)


# --- real data -------------------------------------------------------------------------------

@pytest.mark.shared_data
def test_reference_json_agrees_with_cameras_h5(h36m_raw):
    from finepose.data.h36m import _read_cameras_h5

    from_h5 = _read_cameras_h5(h36m_raw / "cameras.h5", "cameras.h5")
    from_json = load_h36m_cameras()
    assert set(from_h5) == set(from_json)
    for key, a in from_h5.items():
        b = from_json[key]
        np.testing.assert_allclose(a.R, b.R, atol=1e-6)
        np.testing.assert_allclose(a.t, b.t, atol=1e-3)     # mm; the JSON holds float32 values
        for name in ("f", "c", "k", "p"):
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-6, err_msg=f"{key} {name}")


@pytest.mark.shared_data
@pytest.mark.parametrize("subject,world_name,sh_name", [
    ("S1", "Directions 1", "Directions_1"), ("S5", "Phoning", "Phoning"), ("S9", "Walking", "Walking"),
    ("S11", "Eating", "Eating"),
])
def test_real_projection_lands_near_stacked_hourglass(h36m_raw, subject, world_name, sh_name):
    import h5py

    with h5py.File(h36m_raw / subject / "MyPoses" / "3D_positions" / f"{world_name}.h5") as handle:
        world = handle["3D_positions"][()].T.reshape(-1, 32, 3)[:, list(H36M32_TO_17)]   # (N, 17, 3) mm
    cams = load_h36m_cameras()
    for camera_id in H36M_CAMERA_IDS:
        cam = cams[(subject, camera_id)]
        points = cam.world_to_camera(world / 1000, unit="m")
        assert 1.5 < points[..., 2].min() and points[..., 2].max() < 9.0   # person in front, metres
        uv = cam.project(points)
        with h5py.File(h36m_raw / subject / "StackedHourglass" / f"{sh_name}.{camera_id}.h5") as handle:
            sh = convert(handle["poses"][()], "mpii16", "h36m17")
        assert len(sh) == len(uv)
        error = np.linalg.norm(sh[:, LIMBS] - uv[:, LIMBS], axis=-1).mean()
        assert 4.0 < error < 30.0, (camera_id, error)           # one camera and sequence
        # without distortion the limbs land measurably further away near the image border
        assert np.abs(cam.project(points, distort=False) - uv).max() > 1.0


# --- Aria fisheye (EgoHumans) ----------------------------------------------------------------
ARIA = np.array([610.0, 715.0, 705.0, 0.4, -0.46, 0.2, 0.05, -0.06, 0.01, 2e-4, -1.5e-4, -3e-4, 1e-5, 2e-4, -1e-5])


def _aria_points(n=200, seed=0):
    """Points up to ~65 degrees off the optical axis, 0.5-6 m away (Aria's RGB field of view is ~110 degrees)."""
    rng = np.random.default_rng(seed)
    angle, azimuth = rng.uniform(0, np.radians(65), n), rng.uniform(0, 2 * np.pi, n)
    depth = rng.uniform(0.5, 6.0, n)
    return np.stack([np.tan(angle) * np.cos(azimuth) * depth, np.tan(angle) * np.sin(azimuth) * depth, depth], -1)


def test_aria_unprojection_inverts_the_projection_numpy_and_torch():
    from finepose.camera import project_aria, project_aria_raw, unproject_aria, unproject_aria_raw

    points = _aria_points()
    ray = points[:, :2] / points[:, 2:]
    np.testing.assert_allclose(unproject_aria_raw(project_aria_raw(points, ARIA), ARIA), ray, atol=1e-9)
    # upright frame (EgoHumans' images are rotated): X' = -Y, Y' = X, pixels (W - v, u)
    upright = np.stack([-points[:, 1], points[:, 0], points[:, 2]], -1)
    px = project_aria(upright, ARIA, 1408)
    raw = project_aria_raw(points, ARIA)
    np.testing.assert_allclose(px, np.stack([1408 - raw[:, 1], raw[:, 0]], -1))
    np.testing.assert_allclose(unproject_aria(px, ARIA, 1408), upright[:, :2] / upright[:, 2:], atol=1e-9)
    # torch in -> torch out, same numbers; per-point intrinsics broadcast
    t_px = project_aria(torch.tensor(upright), torch.tensor(ARIA).expand(len(points), -1), torch.tensor(1408.0))
    assert isinstance(t_px, torch.Tensor)
    np.testing.assert_allclose(t_px.numpy(), px, atol=1e-9)
    back = unproject_aria(t_px, torch.tensor(ARIA), 1408)
    np.testing.assert_allclose(back.numpy(), upright[:, :2] / upright[:, 2:], atol=1e-9)
    # the optical axis maps to the principal point and back; behind the camera gives (-1, -1)
    np.testing.assert_allclose(project_aria_raw(np.array([0.0, 0.0, 2.0]), ARIA), ARIA[1:3])
    np.testing.assert_allclose(unproject_aria_raw(ARIA[1:3], ARIA), [0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(project_aria_raw(np.array([0.3, 0.1, -1.0]), ARIA), [-1.0, -1.0])
