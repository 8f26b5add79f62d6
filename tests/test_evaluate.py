"""The evaluate verb: summary format, every frame scored once, oracle labels, multi-human stacking."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine_helpers import run_config, write_config, write_dataset
from finepose.evaluate import evaluate, stack_characters
from finepose.io import FinePoseError, sha256_file
from finepose.metrics import joint_errors
from finepose.runconfig import resolve_run_config
from finepose.train import train

REPO = Path(__file__).resolve().parents[1]
MODES = ("mean", "p_best", "j_best", "p_agg", "j_agg")
LENGTHS = (60, 40, 10)     # with 27-frame windows: 2 full + 6-frame tail, 1 full + 13-frame tail, one short
INVALID = (5, 9)


def trained(data_dir: Path, run_dir: Path, **overrides) -> Path:
    cfg = resolve_run_config(run_config(data_dir, train={"epochs": 1, "max_steps_per_epoch": 3,
                                                         "checkpoint_every_steps": 0}, **overrides))
    assert train(cfg, run_dir, device="cpu")["status"] == "done"
    return run_dir / "checkpoints" / "best.pt"


@pytest.fixture(scope="module")
def h36m(tmp_path_factory):
    data = write_dataset(tmp_path_factory.mktemp("data"), lengths=LENGTHS, invalid=INVALID)
    ckpt = trained(data, tmp_path_factory.mktemp("run"))
    out = tmp_path_factory.mktemp("metrics")
    summary = evaluate(ckpt, out, data_dir=data, hypotheses=3, steps=2, batch_size=3, device="cpu")
    return data, ckpt, out, summary


def test_summary_format_and_provenance(h36m):
    data, ckpt, out, summary = h36m
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    prov = summary["provenance"]
    assert prov["checkpoint"] == str(ckpt) and prov["checkpoint_sha256"] == sha256_file(ckpt)
    assert (prov["variant"], prov["dataset"], prov["source_2d"], prov["hypotheses"], prov["steps"]) == \
        ("finepose", "h36m", "gt", 3, 2)
    assert prov["flip"] is True and prov["seed"] == 0 and prov["clip_weights"] == "random"
    assert prov["demo"] is False and prov["run_config"]["model"]["width"] == 32
    assert prov["oracle_modes"] == ["j_best", "p_best"] and prov["every_frame_once"] is True
    keys = {"mode", "oracle", "step", "group", "key", "frames", "mpjpe", "p_mpjpe", "n_mpjpe", "mpjve", "pck", "auc"}
    rows = summary["results"]
    assert all(set(r) == keys for r in rows)
    assert {(r["mode"], r["step"]) for r in rows} == {(m, s) for m in MODES for s in (1, 2)}
    assert {r["group"] for r in rows} == {"all", "action", "subject", "sequence", "action_subject"}  # its description
    assert all(r["oracle"] == (r["mode"] in ("p_best", "j_best")) for r in rows)
    actions = {r["key"] for r in rows if r["group"] == "action"}
    assert actions == {"Walking", "Eating"}
    assert {r["key"] for r in rows if r["group"] == "sequence"} == {"S9/Walking 0", "S9/Eating 1", "S9/Walking 2"}
    assert {r["key"] for r in rows if r["group"] == "action_subject"} == {"Walking | S9", "Eating | S9"}
    assert prov["dataset_info"]["name"] == "h36m" and prov["dataset_info"]["joint_set"]["name"] == "h36m17"
    assert all(r["pck"] is None and r["mpjpe"] > 0 and r["p_mpjpe"] <= r["mpjpe"] for r in rows)


def test_every_frame_scored_exactly_once(h36m):
    data, ckpt, out, summary = h36m
    total = sum(LENGTHS)
    invalid = INVALID[1] - INVALID[0]
    for row in summary["results"]:
        if row["group"] == "all":
            assert row["frames"] == total - invalid                 # S9 only, invalid frames excluded
    frames = pq.read_table(out / "frames.parquet").to_pandas()
    assert len(frames) == total * len(MODES)
    counts = frames.groupby(["mode", "sequence", "frame"]).size()
    assert (counts == 1).all() and len(counts) == total * len(MODES)
    assert frames["valid"].sum() == (total - invalid) * len(MODES)
    assert frames.loc[~frames["valid"], "mpjpe"].isna().all()
    final = {r["mode"]: r for r in summary["results"] if r["group"] == "all" and r["step"] == 2}
    for mode, group in frames[frames["valid"]].groupby("mode"):
        assert group["mpjpe"].mean() == pytest.approx(final[mode]["mpjpe"], rel=1e-9)
        assert group["p_mpjpe"].mean() == pytest.approx(final[mode]["p_mpjpe"], rel=1e-9)
    # action rows pool frames: their frame-weighted mean is the 'all' row
    acts = [r for r in summary["results"] if r["group"] == "action" and r["step"] == 2 and r["mode"] == "mean"]
    pooled = sum(r["mpjpe"] * r["frames"] for r in acts) / sum(r["frames"] for r in acts)
    assert pooled == pytest.approx(final["mean"]["mpjpe"])


def test_oracle_modes_bound_the_others(h36m):
    _, _, _, summary = h36m
    final = {r["mode"]: r["mpjpe"] for r in summary["results"] if r["group"] == "all" and r["step"] == 2}
    assert final["j_best"] <= final["p_best"] + 1e-9


def test_results_do_not_depend_on_batch_size(h36m, tmp_path):
    data, ckpt, _, summary = h36m
    again = evaluate(ckpt, tmp_path / "m", data_dir=data, hypotheses=3, steps=2, batch_size=1, device="cpu",
                     modes=["mean", "j_best"])
    want = {(r["mode"], r["step"], r["group"], r["key"]): r["mpjpe"] for r in summary["results"]}
    for r in again["results"]:
        assert r["mpjpe"] == pytest.approx(want[(r["mode"], r["step"], r["group"], r["key"])], rel=1e-5)


def test_refuses_other_dataset(h36m, tmp_path):
    _, ckpt, _, _ = h36m
    other = write_dataset(tmp_path / "ego", dataset="egohumans", joint_set="coco17", actions=("tagging",))
    with pytest.raises(FinePoseError, match="trained on dataset 'h36m', but .* holds dataset 'egohumans'"):
        evaluate(ckpt, tmp_path / "m", data_dir=other, hypotheses=1, steps=1, device="cpu")


def test_stack_characters_keeps_zeros_out_of_view():
    a = (np.array([0, 1, 2, 3]), np.ones((4, 2, 3)))
    b = (np.array([2, 3, 5]), 2 * np.ones((3, 2, 3)))
    stacked, present, frames = stack_characters([a, b])
    assert stacked.shape == (2, 5, 2, 3) and frames.tolist() == [0, 1, 2, 3, 5]
    assert present.tolist() == [[True, True, True, True, False], [False, False, True, True, True]]
    assert (stacked[0, 4] == 0).all() and (stacked[1, :2] == 0).all() and (stacked[1, 4] == 2).all()


def test_multi_human_video_and_activity_means(tmp_path):
    """EgoHumans-like data: 2 characters per video, one leaves the view (absent rows), and frames 2-3 of
    every first video are invalid for both; Aria-like fisheye cameras, reprojected by P-Agg/J-Agg."""
    subjects = {"S1": "train", "S2": "train", "S3": "train", "V1": "test", "V2": "test"}
    data = write_dataset(tmp_path / "ego", subjects=subjects, lengths=(40, 30), dataset="egohumans",
                         joint_set="coco17", actions=("tagging", "fencing"), persons=2, gaps=True, invalid=(2, 4),
                         camera_model="fisheye_aria")
    ckpt = trained(data, tmp_path / "run", dataset="egohumans",
                   data={"dir": str(data), "val_subjects": ["S3"], "val_fraction": 0.0})
    summary = evaluate(ckpt, tmp_path / "m", data_dir=data, hypotheses=2, steps=2, batch_size=4, device="cpu")
    prov = summary["provenance"]
    assert prov["multi_human"] is True and prov["modes_skipped"] == [] and prov["modes_skipped_reason"] is None
    assert {r["mode"] for r in summary["results"]} >= {"p_agg", "j_agg", "j_best"}
    rows = [r for r in summary["results"] if r["step"] == 2 and r["mode"] == "j_best"]
    videos = {r["key"]: r for r in rows if r["group"] == "video"}
    assert set(videos) == {"V1/tagging 0/cam0", "V1/fencing 1/cam0", "V2/tagging 0/cam0", "V2/fencing 1/cam0"}
    gap, invalid = 7, 2 * 2
    assert videos["V1/tagging 0/cam0"]["frames"] == 2 * 40 - gap - invalid   # out-of-view frames are not scored
    assert videos["V1/fencing 1/cam0"]["frames"] == 2 * 30 - gap
    stacks = np.load(tmp_path / "m" / "multihuman.npz")
    for key, row in videos.items():
        pred, gt, scored = stacks[f"{key}|j_best"], stacks[f"{key}|gt"], stacks[f"{key}|scored"]
        assert pred.shape[:2] == scored.shape and pred.shape[0] == 2 and pred.shape[2:] == (17, 3)
        assert (pred[~scored] == 0).all() and (np.abs(pred[scored]).sum(axis=(1, 2)) > 0).all()
        assert (~scored).sum() == gap + (invalid if "tagging 0" in key else 0)
        assert joint_errors(pred[scored], gt[scored]).mean() == pytest.approx(row["mpjpe"], rel=1e-5)
    activities = {r["key"]: r["mpjpe"] for r in rows if r["group"] == "activity"}
    assert set(activities) == {"tagging", "fencing"}
    for activity, value in activities.items():
        assert value == pytest.approx(np.mean([v["mpjpe"] for k, v in videos.items() if activity in k]))
    (overall,) = [r for r in rows if r["group"] == "all"]
    assert overall["mpjpe"] == pytest.approx(np.mean(list(activities.values())))


def test_cli_evaluate_verb(h36m, tmp_path):
    data, ckpt, _, _ = h36m
    out = tmp_path / "metrics"
    proc = subprocess.run([sys.executable, "-m", "finepose", "evaluate", str(ckpt), "--data", str(data),
                           "--source-2d", "gt", "--hypotheses", "2", "--steps", "1", "--no-flip", "--device", "cpu",
                           "--modes", "mean", "j_agg", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["provenance"]["flip"] is False and summary["provenance"]["modes"] == ["mean", "j_agg"]
    assert (out / "frames.parquet").is_file()
    proc = subprocess.run([sys.executable, "-m", "finepose", "evaluate", str(tmp_path / "missing.pt"),
                           "--data", str(data), "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "no such checkpoint" in proc.stderr


def test_mpi_inf_3dhp_activities_change_within_a_sequence_and_get_pck(tmp_path):
    from finepose.metrics import MPI_INF_3DHP_ACTIVITIES as ACTS

    subjects = {"S1": "train", "S2": "train", "S3": "train", "TS1": "test", "TS5": "test"}
    data = write_dataset(tmp_path / "3dhp", subjects=subjects, lengths=(50,), dataset="mpi_inf_3dhp",
                         joint_set="mpi_inf_3dhp17", actions=ACTS[:2], switch_action=True, sequence_is_subject=True)
    ckpt = trained(data, tmp_path / "run", dataset="mpi_inf_3dhp",
                   data={"dir": str(data), "val_subjects": ["S3"], "val_fraction": 0.0})
    import torch

    assert torch.load(ckpt, weights_only=True)["model_config"]["prompt_layout"] == "3dhp"
    summary = evaluate(ckpt, tmp_path / "m", data_dir=data, hypotheses=2, steps=1, device="cpu", modes=["j_best"])
    rows = [r for r in summary["results"] if r["step"] == 1]
    assert {r["group"] for r in rows} == {"all", "activity", "sequence"}
    assert {r["key"] for r in rows if r["group"] == "sequence"} == {"TS1", "TS5"}
    acts = {r["key"]: r for r in rows if r["group"] == "activity"}
    assert set(acts) == set(ACTS[:2]) and all(r["frames"] == 50 for r in acts.values())   # 25 + 25 frames each
    (overall,) = [r for r in rows if r["group"] == "all"]
    assert overall["frames"] == 100 and 0 <= overall["auc"] <= overall["pck"] <= 100
    for metric in ("mpjpe", "pck", "auc"):     # pooled 'all' = frame-weighted mean of the activities
        assert overall[metric] == pytest.approx(sum(r[metric] * r["frames"] for r in acts.values()) / 100)
    frames = pq.read_table(tmp_path / "m" / "frames.parquet").to_pandas()
    assert sorted(frames["action"].unique()) == sorted(ACTS[:2]) and frames["pck"].notna().all()


def test_sequence_without_any_valid_frame_is_listed_not_scored(tmp_path):
    """A camera the detector never ran on (real case: S11 'Directions' 54138969 has no SH file)
    has no valid frame: it is left out and named in the provenance, and the GT-free modes,
    whose root solve would see all-zero 2D, still run."""
    data = write_dataset(tmp_path / "data", lengths=(30, 40), invalid=(0, 30))
    ckpt = trained(data, tmp_path / "run")
    summary = evaluate(ckpt, tmp_path / "m", data_dir=data, hypotheses=2, steps=1, batch_size=2, device="cpu",
                       modes=["j_agg", "p_agg"])
    prov = summary["provenance"]
    assert prov["sequences_without_valid_frames"] == ["S9/Walking 0/cam0/0"]
    assert {r["key"] for r in summary["results"] if r["group"] == "sequence"} == {"S9/Eating 1"}
    assert all(np.isfinite(r["mpjpe"]) for r in summary["results"])


def test_intrinsics_table_reprojects_pinhole_and_fisheye_and_names_what_it_cannot():
    from types import SimpleNamespace

    from finepose.evaluate import intrinsics_table

    def source(*rows):
        return SimpleNamespace(sequences=[{"subject": f"S{i}", "camera": "c", "camera_info": r} for i, r in enumerate(rows)])

    pinhole = {"fx": 1000.0, "fy": 1001.0, "cx": 500.0, "cy": 490.0, "k": None, "p": None, "model": "pinhole",
               "res_w": 1000}
    fisheye = {"fx": 610.0, "fy": 610.0, "cx": 703.0, "cy": 715.0, "k": [0.4, -0.46, 0.2, 0.05, -0.06, 0.01],
               "p": [2e-4, -1.5e-4, -3e-4, 1e-5, 2e-4, -1e-5], "model": "fisheye_aria", "res_w": 1408}
    table, why = intrinsics_table(source(pinhole, pinhole))
    assert why is None and table.shape == (2, 9) and table[0].tolist() == [1000, 1001, 500, 490, 0, 0, 0, 0, 0]
    table, why = intrinsics_table(source(fisheye))
    assert why is None and table.shape == (1, 16)
    assert table[0, :3].tolist() == [610.0, 715.0, 1408 - 703.0] and table[0, 15] == 1408   # sensor frame + width
    table, why = intrinsics_table(source({**fisheye, "k": None, "intrinsics_source": "missing"}))
    assert table is None and "S0 camera c" in why and "fisheye_aria" in why and "'missing'" in why
    table, why = intrinsics_table(source(pinhole, fisheye))
    assert table is None and "mix camera models" in why
    table, why = intrinsics_table(source({**pinhole, "model": "orthographic"}))
    assert table is None and "'orthographic' is not supported" in why


def test_progress_logs_count_rate_and_eta_when_not_on_a_terminal(caplog):
    from finepose.evaluate import Progress

    caplog.set_level(logging.INFO, logger="finepose.evaluate")
    bar = Progress(10, "windows", "evaluate gt", show_bar=False, every_s=0.0)
    bar.update(4)
    bar.update(6)
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("evaluate gt: 4/10 windows (40%)") and "ETA" in lines[0]
    assert lines[1].startswith("evaluate gt: 10/10 windows (100%)") and lines[1].endswith("ETA 0:00:00")
    caplog.clear()
    quiet = Progress(10, "windows", "evaluate gt", show_bar=False, every_s=3600.0)
    quiet.update(3)                                                    # within the interval: no line
    assert not caplog.records
    quiet.update(7)                                                    # the last one is always logged
    assert len(caplog.records) == 1


def test_a_bad_out_is_refused_before_any_work(tmp_path, monkeypatch):
    import finepose.evaluate as ev

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(ev, "load_model", no_loading)
    afile = tmp_path / "metrics"
    afile.write_text("")
    with pytest.raises(FinePoseError, match=r"--out .*metrics: is an existing file, not a folder"):
        evaluate(tmp_path / "best.pt", afile, data_dir=tmp_path, device="cpu")
    with pytest.raises(FinePoseError, match=r"metrics is a file, so no folder can be created below it"):
        evaluate(tmp_path / "best.pt", afile / "h20_m10", data_dir=tmp_path, device="cpu")


def test_relative_data_dir_is_found_from_another_working_directory(tmp_path, monkeypatch):
    base = tmp_path / "workflow"
    write_dataset(base / "results" / "data" / "h36m", lengths=(30,))
    monkeypatch.chdir(base)                                   # trained where the relative data.dir resolves
    ckpt = trained(Path("results/data/h36m"), base / "results" / "runs" / "tiny")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    summary = evaluate(ckpt, elsewhere / "m", hypotheses=1, steps=1, batch_size=2, device="cpu", modes=["mean"])
    assert Path(summary["provenance"]["data_dir"]) == base / "results" / "data" / "h36m"
    lone = tmp_path / "lone.pt"                               # a copy with no workflow folder above it
    lone.write_bytes(ckpt.read_bytes())
    with pytest.raises(FinePoseError, match=r"data\.dir 'results/data/h36m' is relative .*pass --data DIR"):
        evaluate(lone, elsewhere / "m2", device="cpu")


def _rows(summary):
    return {(r["mode"], r["step"], r["group"], r["key"]): r for r in summary["results"]}


def _assert_same_metrics(a, b, rel):
    ra, rb = _rows(a), _rows(b)
    assert ra.keys() == rb.keys()
    for key, row in ra.items():
        other = rb[key]
        assert row["frames"] == other["frames"], key
        for metric in ("mpjpe", "p_mpjpe", "n_mpjpe", "mpjve"):
            if row[metric] is None:
                assert other[metric] is None, (key, metric)
            else:
                assert other[metric] == pytest.approx(row[metric], rel=rel, abs=rel), (key, metric)


def test_cross_sequence_batching_and_overlap_score_like_one_window_at_a_time(h36m, tmp_path):
    """Batch size 1 never mixes sequences; one batch of all 6 windows spans all three, with the
    scoring thread and input prefetching on (the CUDA defaults): every metric of every mode,
    step and group within 1e-6, and the per-frame table the same."""
    data, ckpt, _, _ = h36m
    per_seq = evaluate(ckpt, tmp_path / "one", data_dir=data, hypotheses=3, steps=2, batch_size=1, device="cpu",
                       overlap=False)
    across = evaluate(ckpt, tmp_path / "all", data_dir=data, hypotheses=3, steps=2, batch_size=64, device="cpu",
                      overlap=True)
    assert per_seq["provenance"]["windows"] == 6 and across["provenance"]["batch_size"] == 64
    assert across["provenance"]["overlap"] is True and per_seq["provenance"]["overlap"] is False
    _assert_same_metrics(per_seq, across, rel=1e-6)
    one = pq.read_table(tmp_path / "one" / "frames.parquet").to_pandas()
    alls = pq.read_table(tmp_path / "all" / "frames.parquet").to_pandas()
    key = ["mode", "sequence", "frame"]
    one, alls = one.sort_values(key).reset_index(drop=True), alls.sort_values(key).reset_index(drop=True)
    assert (one[key] == alls[key]).all().all()
    np.testing.assert_allclose(alls["mpjpe"].to_numpy(float), one["mpjpe"].to_numpy(float), rtol=1e-6, atol=1e-6)


def test_default_batch_size_on_cpu_is_the_configured_one_and_auto_falls_back_to_it(h36m, tmp_path):
    from finepose.evaluate import _batch_size

    data, ckpt, _, summary = h36m
    auto = evaluate(ckpt, tmp_path / "auto", data_dir=data, hypotheses=3, steps=2, batch_size="auto", device="cpu",
                    modes=["mean"])
    assert auto["provenance"]["batch_size"] == auto["provenance"]["run_config"]["eval"]["batch_size"]
    assert "not a CUDA device" in auto["provenance"]["batch_sizing"]["reason"]
    want = _rows(summary)
    for key, row in _rows(auto).items():
        assert row["mpjpe"] == pytest.approx(want[key]["mpjpe"], rel=1e-6)
    assert _batch_size("auto") == "auto" and _batch_size("12") == 12
    with pytest.raises(Exception, match="integer >= 1 or 'auto'"):
        _batch_size("0")
    with pytest.raises(FinePoseError, match="integer >= 1 or 'auto'"):
        evaluate(ckpt, tmp_path / "bad", data_dir=data, batch_size=0.5, device="cpu")
    with pytest.raises(FinePoseError, match="compile must be one of"):
        evaluate(ckpt, tmp_path / "bad", data_dir=data, compile="fast", device="cpu")


@pytest.mark.gpu
def test_cuda_evaluation_matches_cpu_float32(h36m, tmp_path):
    """GPU: auto batch size, overlap, float32 and bf16 autocast, and CUDA graphs (torch.compile
    reduce-overhead) against the CPU float32 numbers. Tolerances: float32 on CUDA 1e-3 relative
    (TF32 off by default in PyTorch for matmuls; different kernels and reduction orders), bf16 5e-2."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("gpu: no CUDA device")
    data, ckpt, _, summary = h36m
    fp32 = evaluate(ckpt, tmp_path / "fp32", data_dir=data, hypotheses=3, steps=2, device="cuda", amp=False)
    assert fp32["provenance"]["batch_sizing"]["per_window_mib"] > 0 and fp32["provenance"]["overlap"] is True
    _assert_same_metrics(summary, fp32, rel=1e-3)
    bf16 = evaluate(ckpt, tmp_path / "bf16", data_dir=data, hypotheses=3, steps=2, device="cuda", amp=True)
    _assert_same_metrics(summary, bf16, rel=5e-2)
    graphs = evaluate(ckpt, tmp_path / "graphs", data_dir=data, hypotheses=3, steps=2, device="cuda", amp=True,
                      compile="reduce-overhead", batch_size=2)
    _assert_same_metrics(summary, graphs, rel=5e-2)
