"""Joint sets and conversions: structure, contract order, hand-computed conversions."""
import numpy as np
import pytest

from finepose.skeleton import (
    H36M32_TO_17, JOINT_SETS, MPI_INF_3DHP28_TO_17, JointSet, convert, get_joint_set,
)

ALL = sorted(JOINT_SETS)


def _ancestors(parents, joint):
    out = []
    while parents[joint] >= 0:
        joint = parents[joint]
        out.append(joint)
        assert len(out) <= len(parents), "cycle in parents"
    return out


@pytest.mark.parametrize("name", ALL)
def test_joint_set_structure(name):
    js = get_joint_set(name)
    assert js.name == name and js.num_joints == len(js.joint_names) == len(js.parents)
    roots = [j for j, p in enumerate(js.parents) if p == -1]
    assert len(roots) == 1, "one tree"
    for j in range(js.num_joints):
        _ancestors(js.parents, j)  # terminates: no cycles
    if js.root is not None:
        assert js.parents[js.root] == -1
    perm = js.flip_permutation
    assert sorted(perm.tolist()) == list(range(js.num_joints))
    np.testing.assert_array_equal(perm[perm], np.arange(js.num_joints))  # an involution
    # mirror pairs carry mirrored names, and the unpaired joints are the midline ones
    for left, right in zip(js.left, js.right):
        ln, rn = js.joint_names[left], js.joint_names[right]
        assert ln.startswith(("l_", "left_")) and rn.startswith(("r_", "right_")), (ln, rn)
        assert ln.split("_", 1)[1] == rn.split("_", 1)[1]
    sided = {j for j, n in enumerate(js.joint_names) if n.startswith(("l_", "r_", "left_", "right_"))}
    assert sided == set(js.left) | set(js.right)


def test_h36m17_is_the_contract_order():
    js = get_joint_set("h36m17")
    assert js.joint_names == ("pelvis", "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "spine",
                              "thorax", "neck_nose", "head", "l_shoulder", "l_elbow", "l_wrist", "r_shoulder",
                              "r_elbow", "r_wrist")
    assert js.left == (4, 5, 6, 11, 12, 13) and js.right == (1, 2, 3, 14, 15, 16) and js.root == 0
    assert js.flip_permutation.tolist() == [0, 4, 5, 6, 1, 2, 3, 7, 8, 9, 10, 14, 15, 16, 11, 12, 13]


@pytest.mark.parametrize("src,dst,indices", [("h36m32", "h36m17", H36M32_TO_17),
                                             ("mpi_inf_3dhp28", "mpi_inf_3dhp17", MPI_INF_3DHP28_TO_17)])
def test_selections_keep_the_tree_and_sides(src, dst, indices):
    big, small = get_joint_set(src), get_joint_set(dst)
    assert len(indices) == small.num_joints
    # every kept joint's parent is an ancestor of it in the full skeleton, except the H36M
    # shoulders: the mocap tree hangs them from spine1, the 17-joint tree from the thorax
    # (in the data the shoulder joints 16 and 24 sit on joint 13; see test_h36m)
    rewired = {("h36m17", "l_shoulder"), ("h36m17", "r_shoulder")}
    for j, p in enumerate(small.parents):
        if p >= 0 and (dst, small.joint_names[j]) not in rewired:
            assert indices[p] in _ancestors(big.parents, indices[j]), (small.joint_names[j], small.joint_names[p])
    # sides survive the selection
    assert {indices[j] for j in small.left} <= set(big.left)
    assert {indices[j] for j in small.right} <= set(big.right)
    x = np.random.default_rng(0).random((2, 5, big.num_joints, 3))
    np.testing.assert_array_equal(convert(x, src, dst), x[:, :, list(indices)])


def test_h36m32_selection_indices():
    assert H36M32_TO_17 == (0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 15, 17, 18, 19, 25, 26, 27)


def test_mpi_inf_3dhp_selection_matches_protocol_names():
    big, small = get_joint_set("mpi_inf_3dhp28"), get_joint_set("mpi_inf_3dhp17")
    # protocol file: 1-based [8, 6, 15, 16, 17, 10, 11, 12, 24, 25, 26, 19, 20, 21, 5, 4, 7]
    assert [i + 1 for i in MPI_INF_3DHP28_TO_17] == [8, 6, 15, 16, 17, 10, 11, 12, 24, 25, 26, 19, 20, 21, 5, 4, 7]
    assert [big.joint_names[i] for i in MPI_INF_3DHP28_TO_17] == list(small.joint_names)
    assert small.joint_names[14] == "pelvis" and small.root == 14
    assert small.right == (2, 3, 4, 8, 9, 10) and small.left == (5, 6, 7, 11, 12, 13)


def test_mpii16_to_h36m17_by_hand():
    mpii = get_joint_set("mpii16")
    kp = np.arange(32, dtype=float).reshape(16, 2)
    out = convert(kp, "mpii16", "h36m17")
    h = get_joint_set("h36m17")
    same = {"pelvis": "pelvis", "r_hip": "r_hip", "r_knee": "r_knee", "r_ankle": "r_ankle", "l_hip": "l_hip",
            "l_knee": "l_knee", "l_ankle": "l_ankle", "thorax": "thorax", "neck_nose": "upper_neck",
            "head": "head_top", "l_shoulder": "l_shoulder", "l_elbow": "l_elbow", "l_wrist": "l_wrist",
            "r_shoulder": "r_shoulder", "r_elbow": "r_elbow", "r_wrist": "r_wrist"}
    for dst_name, src_name in same.items():
        np.testing.assert_array_equal(out[h.index(dst_name)], kp[mpii.index(src_name)])
    np.testing.assert_allclose(out[h.index("spine")], (kp[6] + kp[7]) / 2)  # midway pelvis -> thorax


def test_coco17_to_h36m17_by_hand():
    c = get_joint_set("coco17")
    kp = np.random.default_rng(1).random((3, 17, 2))
    out = convert(kp, "coco17", "h36m17")
    h = get_joint_set("h36m17")
    hips = (kp[:, c.index("left_hip")] + kp[:, c.index("right_hip")]) / 2
    shoulders = (kp[:, c.index("left_shoulder")] + kp[:, c.index("right_shoulder")]) / 2
    np.testing.assert_allclose(out[:, h.index("pelvis")], hips)
    np.testing.assert_allclose(out[:, h.index("thorax")], shoulders)
    np.testing.assert_allclose(out[:, h.index("spine")], (hips + shoulders) / 2)
    np.testing.assert_allclose(out[:, h.index("neck_nose")], kp[:, 0])
    np.testing.assert_allclose(out[:, h.index("head")], kp[:, 1:5].mean(axis=1))
    np.testing.assert_array_equal(out[:, h.index("l_wrist")], kp[:, c.index("left_wrist")])
    np.testing.assert_array_equal(out[:, h.index("r_ankle")], kp[:, c.index("right_ankle")])


def test_conversion_keeps_missing_joints_missing_and_nothing_else():
    kp = np.random.default_rng(2).random((4, 16, 2))
    kp[1, get_joint_set("mpii16").index("thorax")] = np.nan
    out = convert(kp, "mpii16", "h36m17")
    h = get_joint_set("h36m17")
    missing = np.isnan(out[1]).any(axis=-1)
    assert set(np.flatnonzero(missing)) == {h.index("spine"), h.index("thorax")}
    assert np.isfinite(out[[0, 2, 3]]).all()


def test_flip_of_a_mirror_symmetric_pose_is_itself():
    js = get_joint_set("h36m17")
    pose = np.zeros((17, 3))
    rng = np.random.default_rng(3)
    for left, right in zip(js.left, js.right):
        pose[right] = rng.random(3)
        pose[left] = pose[right] * [-1, 1, 1]
    for mid in set(range(17)) - set(js.left) - set(js.right):
        pose[mid] = [0, *rng.random(2)]
    flipped = pose[js.flip_permutation] * [-1, 1, 1]
    np.testing.assert_allclose(flipped, pose)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown joint set 'h36m16'"):
        get_joint_set("h36m16")
    with pytest.raises(ValueError, match="no conversion h36m17->coco17"):
        convert(np.zeros((17, 2)), "h36m17", "coco17")
    with pytest.raises(ValueError, match="16 joints of mpii16"):
        convert(np.zeros((5, 17, 2)), "mpii16", "h36m17")
    with pytest.raises(ValueError, match="overlap"):
        JointSet("bad", ("a", "b"), (-1, 0), (1,), (1,), 0)
    same = np.ones((2, 17, 3))
    out = convert(same, "h36m17", "h36m17")
    assert out is not same and np.array_equal(out, same)
