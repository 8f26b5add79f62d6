"""A fourth dataset, defined entirely outside finepose/ and workflow/, runs end to end.

Its reader (tests/fourth_dataset/reader.py) declares a 15-joint set with a COCO-17
mapping, 3 cameras, two actions, and reads a release in a text format of its own. With
only a config entry (`reader: fourth_dataset.reader`) and that folder on PYTHONPATH,
`snakemake` prepares it, trains a tiny model, evaluates it, writes its
generic table and its figures, and `lift` turns COCO-17 detections into its joints.
Also here: the grep that keeps engine code from keying on dataset or joint-set names.
"""
from __future__ import annotations

import ast
import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from test_workflow import copy_workflow, load_config, save_config, smk

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _lab_config(wf: Path, release: Path) -> dict:
    cfg = load_config(wf / "config.yaml")
    cfg["title"] = "TEST (synthetic lab15 data, tiny model)"
    cfg["datasets"] = {"lab": {"reader": "fourth_dataset.reader", "fetch": {"sources": [{"path": str(release)}]},
                               "release": release.name, "prepare": {"cameras": ["cam_a", "cam_b", "cam_c"]},
                               "sources_2d": ["gt"]}}
    cfg["experiments"] = [{"name": "lab15", "dataset": "lab", "variants": ["finepose"], "seeds": [0]}]
    cfg["train"] = {**cfg["train"], "epochs": 1, "max_steps_per_epoch": 4, "val_max_windows": 2}
    cfg["inference"] = {**cfg["inference"], "hypotheses": 2, "steps": 2}
    cfg["tables"] = {"compare_mode": "j_best", "gt_free_mode": "j_agg"}      # no paper table: none is about lab15
    return cfg


@pytest.fixture(scope="module")
def lab_workflow(tmp_path_factory) -> Path:
    from fourth_dataset import reader

    wf = copy_workflow(tmp_path_factory.mktemp("lab_wf"))
    release = reader.synthesize(tmp_path_factory.mktemp("lab_data") / "lab15_release", frames=60)
    save_config(wf / "config.yaml", _lab_config(wf, release))
    result = smk(wf, "--cores", "2", "--quiet", "rules", env=_env(), check=False, timeout=900)
    if result.returncode != 0:
        log = "\n".join(p.read_text()[-3000:] for p in sorted((wf / "results" / "logs").rglob("*.log")))
        raise AssertionError(f"snakemake failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}\n--- logs ---\n{log}")
    return wf


def test_the_fourth_dataset_runs_end_to_end(lab_workflow: Path, capsys):
    wf = lab_workflow
    from finepose.data.table import read_metadata

    meta = read_metadata(wf / "results/data/processed/lab/frames.parquet")
    assert meta["dataset"] == "lab15" and meta["dataset_info"]["joint_set"]["name"] == "lab15"
    assert len(meta["dataset_info"]["joint_set"]["joint_names"]) == 15 and "coco17" in meta["dataset_info"]["mappings"]
    cams = {r["camera"] for r in pq.read_table(wf / "results/data/processed/lab/cameras.parquet").to_pylist()}
    assert cams == {"cam_a", "cam_b", "cam_c"}

    # training: the data's joint count and the description's actions and prompt layout
    run = json.loads((wf / "results/configs/lab/gt/finepose/s0.json").read_text())
    assert run["dataset"] == "lab15"
    import torch

    ckpt = torch.load(wf / "results/runs/lab/gt/finepose/s0/checkpoints/best.pt", weights_only=True)
    assert ckpt["model_config"]["joints"] == 15 and ckpt["model_config"]["actions"] == ["wave", "squat"]
    assert ckpt["model_config"]["prompt_layout"] == "h36m" and ckpt["dataset_info"]["name"] == "lab15"

    # evaluation: the groupings the description declares
    summary = json.loads((wf / "results/metrics/lab/gt/finepose/s0/h2_m2/summary.json").read_text())
    groups = {r["group"] for r in summary["results"]}
    assert {"all", "action", "subject", "sequence", "action_subject"} <= groups
    assert {r["key"] for r in summary["results"] if r["group"] == "subject"} == {"L3"}
    assert summary["provenance"]["dataset_info"]["label"].startswith("Lab-15")

    # its generic table: overall, per action, per subject, action x subject (any variant: test_tables.py)
    tables = wf / "results/tables"
    assert not any((tables / f"table{i}.md").exists() for i in range(1, 7))
    md = (tables / "results_lab.md").read_text()
    assert "Lab-15 (our motion-capture lab)" in md and "J-Best†" in md and "J-Agg" in md
    rows = list(csv.reader((tables / "results_lab.csv").read_text().splitlines()))
    header, body = rows[0], rows[1:]
    assert header[:5] == ["Group", "Key", "Metric", "FinePOSE, gt: J-Best†", "FinePOSE, gt: J-Agg"]
    groups = [(r[0], r[1]) for r in body]
    assert ("all", "all") in groups and ("action", "wave") in groups and ("subject", "L3") in groups
    assert ("action × subject", "squat | L3") in groups
    all_mpjpe = next(r for r in body if r[:3] == ["all", "all", "MPJPE↓"])
    assert all(float(v) > 0 for v in all_mpjpe[3:-1])
    assert "results_lab" in (tables / "sources.csv").read_text()

    # its figures
    figures = {p.name for p in (wf / "results/figures").glob("*.png")}
    assert {"steps_lab.png", "skeleton_lab.png"} <= figures

    # lift: COCO-17 detections become lab15 joints through the description's mapping
    from fourth_dataset import reader
    from finepose.data.table import load_sequences

    seq = load_sequences(wf / "results/data/processed/lab", split="test")[0]
    keypoints = wf / "coco.npy"
    np.save(keypoints, reader.coco17_from(seq.keypoints_2d[:40]))
    out = wf / "lifted"
    best = str(wf / "results/runs/lab/gt/finepose/s0/checkpoints/best.pt")
    from finepose import cli

    code = cli.main(["lift", best, str(keypoints), "--image-size", "640", "480", "--out", str(out), "--format",
                     "coco17", "--hypotheses", "2", "--steps", "2", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err[-3000:]
    poses = np.load(out / "poses3d.npy")
    assert poses.shape == (1, 40, 15, 3) and np.isfinite(poses).all()
    assert json.loads((out / "lift.json").read_text())["joint_set"] == "lab15"
    # H36M-17 input: the dataset declares no mapping from it, so lift refuses, naming it
    np.save(keypoints, np.zeros((40, 17, 2)) + 100.0)
    capsys.readouterr()
    code = cli.main(["lift", best, str(keypoints), "--image-size", "640", "480", "--out", str(wf / "lifted2"),
                     "--format", "h36m17", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "no mapping h36m17->lab15" in err and "use --format coco17" in err, err
    assert not (wf / "lifted2").exists()


def test_reader_options_are_checked_against_the_readers_schema(tmp_path: Path):
    from fourth_dataset import reader

    wf = copy_workflow(tmp_path)
    cfg = _lab_config(wf, tmp_path / "lab15_release")
    cfg["datasets"]["lab"]["prepare"] = {"cameras": "cam_a", "colour": True}
    save_config(wf / "config.yaml", cfg)
    result = smk(wf, "-n", env=_env(), check=False)
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "datasets.lab.prepare.cameras: 'cam_a' is not of type 'array'" in text
    assert "datasets.lab.prepare: Additional properties are not allowed ('colour' was unexpected)" in text
    cfg["datasets"]["lab"]["reader"] = "fourth_dataset.no_such_reader"
    save_config(wf / "config.yaml", cfg)
    text = "".join(smk(wf, "-n", env=_env(), check=False).__dict__[k] for k in ("stdout", "stderr"))
    assert "datasets.lab.reader" in text and "fourth_dataset.no_such_reader" in text
    assert reader.INFO.name == "lab15"


# ----------------------------------------------------------------------------- nothing keys on names

ENGINE = ["finepose/train.py", "finepose/evaluate.py", "finepose/figures.py", "finepose/tables.py",
          "finepose/results.py", "finepose/runconfig.py", "finepose/lift.py", "finepose/aggregate.py",
          "finepose/metrics.py", "finepose/data/windows.py", "finepose/data/table.py", "finepose/data/prepare.py",
          "finepose/launch.py", "finepose/cli.py"]
WORKFLOW = ["workflow/rules/common.smk", "workflow/rules/data.smk", "workflow/rules/train.smk",
            "workflow/rules/evaluate.smk", "workflow/rules/tables.smk", "workflow/schemas/config.schema.yaml"]


def _names() -> set[str]:
    """Every built-in dataset, reader and joint-set name."""
    from finepose import datasets, skeleton

    names = set(skeleton.JOINT_SETS) | set(datasets.known_readers())
    names |= {datasets.load_reader(r).INFO.name for r in ("h36m", "mpi_inf_3dhp", "egohumans")}
    return names


def _string_constants(path: Path) -> list[tuple[int, str]]:
    """(line, value) of every string literal that is not a docstring."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def _workflow_hits(rel: str, text: str, names: set[str]) -> list[str]:
    """Names quoted ("h36m") or listed ([a, b]) in rule/schema code, comments and schema prose left out."""
    hits = []
    for number, line in enumerate(text.splitlines(), 1):
        code = line.split("#", 1)[0]
        if rel.endswith(".yaml") and ("description:" in code or code.strip().startswith("-")):
            continue
        for match in re.finditer(r"""(["'])(\w+)\1|\[([\w, ]+)\]""", code):
            words = [match.group(2)] if match.group(2) else [w.strip() for w in match.group(3).split(",")]
            hits += [f"{rel}:{number}: {w!r}" for w in words if w in names]
    return hits


def test_no_engine_code_names_a_dataset_or_joint_set():
    """Train, evaluate, tables, figures, run configs, lift and the rules read descriptions instead."""
    names = _names()
    hits = [f"{rel}:{line}: {value!r}" for rel in ENGINE for line, value in _string_constants(REPO / rel)
            if value in names]
    for rel in WORKFLOW:
        hits += _workflow_hits(rel, (REPO / rel).read_text(), names)
    assert not hits, "engine code keys on dataset / joint-set names:\n" + "\n".join(hits)


def test_the_grep_would_catch_a_name_comparison(tmp_path: Path):
    sample = tmp_path / "x.py"
    sample.write_text('"""mentions h36m in prose"""\nif cfg["dataset"] == "mpi_inf_3dhp":\n    pass\n')
    assert [v for _, v in _string_constants(sample) if v in _names()] == ["mpi_inf_3dhp"]
    smk_text = 'MULTI = ("egohumans",)  # egohumans in a comment\nreader: {enum: [h36m, other]}\n'
    assert _workflow_hits("x.smk", smk_text, _names()) == ["x.smk:1: 'egohumans'", "x.smk:2: 'h36m'"]
