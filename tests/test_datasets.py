"""Dataset descriptions and the reader registry (finepose/datasets.py), and open joint sets."""
from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from finepose import datasets, skeleton
from finepose.datasets import DatasetInfo, describe, load_reader
from finepose.io import FinePoseError

TESTS = Path(__file__).resolve().parent


@pytest.fixture()
def on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def test_builtin_readers_describe_their_datasets():
    h36m, mpi, ego = (load_reader(n).INFO for n in ("h36m", "mpi_inf_3dhp", "egohumans"))
    assert (h36m.label, h36m.joint_set.num_joints, h36m.headline_average) == ("Human3.6M", 17, "actions")
    assert "coco17" in h36m.mappings                        # lift takes COCO-17 for an H36M model
    assert "pck_auc" in mpi.metrics and mpi.prompt_layout == datasets.PROMPT_WITHOUT_ACTION
    assert mpi.mappings == {}                               # no COCO mapping: lift refuses, naming it
    assert ego.multi_person and ego.splits == ("test",) and "video_means" in ego.metrics
    for info in (h36m, mpi, ego):
        assert DatasetInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info


def test_outside_readers_register_on_equal_terms(on_path, monkeypatch):
    by_path = load_reader("fourth_dataset.reader")
    assert by_path.INFO.joint_set.num_joints == 15
    entry = metadata.EntryPoint(name="lab15", value="fourth_dataset.reader", group=datasets.ENTRY_POINT_GROUP)
    monkeypatch.setattr(datasets.importlib_metadata, "entry_points",
                        lambda group: [entry] if group == datasets.ENTRY_POINT_GROUP else [])
    assert load_reader("lab15") is by_path and "lab15" in datasets.known_readers()
    with pytest.raises(FinePoseError, match=r"unknown dataset reader 'nope'; known: .*egohumans.*lab15"):
        load_reader("nope")
    with pytest.raises(FinePoseError, match=r"cannot import fourth_dataset\.missing"):
        load_reader("fourth_dataset.missing")
    with pytest.raises(FinePoseError, match=r"json\.decoder has no INFO = finepose\.datasets\.DatasetInfo"):
        load_reader("json.decoder")         # importable, but declares no dataset


def test_the_prepared_table_carries_the_description(on_path, tmp_path):
    from fourth_dataset import reader

    from finepose.data.prepare import configure_parser, run

    release = reader.synthesize(tmp_path / "release", frames=30)
    import argparse

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert run(parser.parse_args(["--dataset", "fourth_dataset.reader", "--raw", str(release),
                                  "--out", str(tmp_path / "out"), "--option", 'cameras=["cam_a"]'])) == 0
    info = describe(tmp_path / "out")
    assert info == reader.INFO and info.joint_set.name == "lab15"
    with pytest.raises(FinePoseError, match=r"cameras: 'cam_a' is not of type 'array'"):
        run(parser.parse_args(["--dataset", "fourth_dataset.reader", "--raw", str(release),
                               "--out", str(tmp_path / "out2"), "--option", "cameras=cam_a"]))
    with pytest.raises(FinePoseError, match=r"has no option layout"):
        run(parser.parse_args(["--dataset", "fourth_dataset.reader", "--raw", str(release),
                               "--out", str(tmp_path / "out2"), "--layout", "videopose3d"]))


def test_a_table_from_before_descriptions_uses_its_readers():
    info = describe({"dataset": "h36m", "reader": "finepose.data.h36m", "joint_set": "h36m17"})
    assert info.label == "Human3.6M"
    with pytest.raises(FinePoseError, match=r"no dataset description .*rerun `python -m finepose prepare --force`"):
        describe({"dataset": "x", "joint_set": "h36m17"})


def test_a_description_makes_its_joint_set_known_in_a_fresh_process(on_path, tmp_path):
    """What a later process (evaluate, lift) gets from the metadata alone, without importing the reader."""
    from fourth_dataset import reader

    text = json.dumps(reader.INFO.to_dict())
    code = ("import json, sys; from finepose.datasets import DatasetInfo; from finepose import skeleton;"
            "info = DatasetInfo.from_dict(json.loads(sys.argv[1]));"
            "print(skeleton.get_joint_set('lab15').num_joints, ('coco17', 'lab15') in skeleton.CONVERSIONS,"
            " 'fourth_dataset' in sys.modules)")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code, text], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(TESTS.parent), "PATH": "/usr/bin:/bin"})
    assert out.stdout.split() == ["15", "True", "False"]


def test_joint_sets_are_open_but_never_redefined():
    mine = skeleton.JointSet(name="tri3", joint_names=("root", "l", "r"), parents=(-1, 0, 0), left=(1,), right=(2,),
                             root=0)
    weights = skeleton.mapping_by_name("coco17", mine, [{"left_hip": 0.5, "right_hip": 0.5}, "left_hip", "right_hip"])
    skeleton.register_joint_set(mine, {"coco17": weights})
    skeleton.register_joint_set(mine, {"coco17": weights})                 # the same again: fine
    coco = np.arange(17 * 2, dtype=float).reshape(17, 2)
    out = skeleton.convert(coco, "coco17", "tri3")
    assert np.allclose(out[0], (coco[11] + coco[12]) / 2) and np.allclose(out[1], coco[11])
    other = skeleton.JointSet(name="tri3", joint_names=("a", "b", "c"), parents=(-1, 0, 0), left=(1,), right=(2,),
                              root=0)
    with pytest.raises(ValueError, match="already defined differently"):
        skeleton.register_joint_set(other)
    with pytest.raises(ValueError, match=r"\['nose_tip'\] are not all coco17 joint names"):
        skeleton.mapping_by_name("coco17", mine, ["nose_tip", "left_hip", "right_hip"])
    with pytest.raises(ValueError, match="2 target joints, expected 3"):
        skeleton.register_joint_set(mine, {"h36m17": [{0: 1.0}, {1: 1.0}]})


def test_a_bad_description_is_refused_clearly():
    js = skeleton.get_joint_set("h36m17")
    with pytest.raises(ValueError, match="unknown metrics"):
        DatasetInfo(name="x", label="X", joint_set=js, metrics=("mpjpe", "bleu"))
    with pytest.raises(ValueError, match="splits .* must include test"):
        DatasetInfo(name="x", label="X", joint_set=js, splits=("train",))
    with pytest.raises(FinePoseError, match="newer than this finepose"):
        DatasetInfo.from_dict({**DatasetInfo(name="x", label="X", joint_set=js).to_dict(), "version": 99})
