"""The train verb: a tiny CPU run, exact resume, refusing foreign checkpoints, DDP == one process,
and a real-data run on Human3.6M whose validation MPJPE falls."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from engine_helpers import run_config, write_config, write_dataset
from finepose.data.table import load_sequences
from finepose.io import FinePoseError
from finepose.runconfig import resolve_run_config
from finepose.train import TrainStep, split_validation, train

REPO = Path(__file__).resolve().parents[1]


def resolved(cfg: dict) -> dict:
    return resolve_run_config(cfg, source="test config")


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("tiny_h36m"))


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory) -> tuple[dict, Path]:
    cfg = resolved(run_config(data_dir))
    run_dir = tmp_path_factory.mktemp("run")
    result = train(cfg, run_dir, device="cpu")
    assert result["status"] == "done"
    return cfg, run_dir


# ---------------------------------------------------------------------------------------------
def test_tiny_run_writes_checkpoints_logs_and_done(finished_run):
    cfg, run_dir = finished_run
    for rel in ("checkpoints/last.pt", "checkpoints/best.pt", "log.jsonl", "train.log", "done.json"):
        assert (run_dir / rel).is_file(), rel
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    ckpt = torch.load(run_dir / "checkpoints/last.pt", map_location="cpu", weights_only=True)
    assert ckpt["variant"] == "finepose" and ckpt["dataset"] == "h36m" and ckpt["joint_set"] == "h36m17"
    assert ckpt["position"] == {"epoch": 2, "batch": 0, "step": ckpt["position"]["step"]}
    assert {"torch", "numpy", "python", "generator"} <= set(ckpt["rng"][0])
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.993 ** 2)
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("epoch") == 2
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    assert all(r["loss"] > 0 and r["clips_per_s"] > 0 and "lr" in r for r in steps)
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert all(np.isfinite(r["val_mpjpe"]) for r in epochs)
    done = json.loads((run_dir / "done.json").read_text())
    assert done["steps"] == ckpt["position"]["step"] and done["validation"].startswith("held-out training subjects")
    assert done["best_val_mpjpe"] == pytest.approx(min(r["val_mpjpe"] for r in epochs))
    # a finished run is a no-op the second time
    mtime = (run_dir / "checkpoints/last.pt").stat().st_mtime_ns
    assert train(cfg, run_dir, device="cpu")["status"] == "done"
    assert (run_dir / "checkpoints/last.pt").stat().st_mtime_ns == mtime


def test_interrupted_and_resumed_run_equals_uninterrupted(finished_run, tmp_path):
    cfg, reference = finished_run
    run_dir = tmp_path / "interrupted"
    first = train(cfg, run_dir, device="cpu", max_steps=4)          # stops mid-epoch 0 (checkpoint every 3)
    assert first["status"] == "stopped" and not (run_dir / "done.json").exists()
    # the launcher's SIGUSR2 handler sets its flag during step 6; the trainer stops after step 7
    from finepose import launch

    def preempt(step, model):
        if step == 6:
            launch._PREEMPTION.set(signal.SIGUSR2)

    try:
        second = train(cfg, run_dir, device="cpu", probe=preempt)
    finally:
        launch._PREEMPTION.clear()
    assert second["status"] == "preempted" and second["step"] == 7
    third = train(cfg, run_dir, device="cpu")
    assert third["status"] == "done"
    assert_same_weights(weights(reference / "checkpoints/last.pt"), weights(run_dir / "checkpoints/last.pt"))
    ref_opt = torch.load(reference / "checkpoints/last.pt", weights_only=True)["optimizer"]["state"]
    new_opt = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["optimizer"]["state"]
    for k in ref_opt:
        assert torch.equal(ref_opt[k]["exp_avg_sq"], new_opt[k]["exp_avg_sq"])
    # the log holds each step once, as if the run had never stopped
    steps = [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "step"]
    assert steps == sorted(set(steps))


def test_memmap_cache_progress_bar_and_more_epochs(data_dir, tmp_path, capsys):
    """data.memmap gives the same run as in-memory arrays; a finished run asked for more epochs continues."""
    base = run_config(data_dir, train={"epochs": 1, "max_steps_per_epoch": 2, "checkpoint_every_steps": 0})
    plain = resolved(base)
    mapped = resolved({**base, "data": {**base["data"], "memmap": True}})
    assert train(plain, tmp_path / "plain", device="cpu")["status"] == "done"
    assert train(mapped, tmp_path / "mapped", device="cpu", progress=True)["status"] == "done"
    assert list((tmp_path / "mapped" / "cache").glob("*/x2d.npy"))
    assert "tiny" in capsys.readouterr().err                         # the tqdm bar (desc = run name)
    assert_same_weights(weights(tmp_path / "plain/checkpoints/last.pt"), weights(tmp_path / "mapped/checkpoints/last.pt"))
    longer = resolved({**base, "train": {**base["train"], "epochs": 2}})
    result = train(longer, tmp_path / "plain", device="cpu")
    assert result["status"] == "done" and result["steps"] == 4 and result["epochs"] == 2


def test_refuses_a_checkpoint_of_another_variant_dataset_or_model(finished_run, tmp_path):
    cfg, run_dir = finished_run
    other = dict(cfg)
    other["variant"] = "wo_prompt"
    (run_dir / "done.json").rename(run_dir / "done.json.bak")   # force the resume path
    try:
        with pytest.raises(FinePoseError, match="checkpoint is for variant 'finepose', this run is variant 'wo_prompt'"):
            train(resolved(other), run_dir, device="cpu")
        wider = resolved({**cfg, "model": {**cfg["model"], "width": 64}})
        with pytest.raises(FinePoseError, match="different model definition.*model.width: 32 != 64"):
            train(wider, run_dir, device="cpu")
        with pytest.raises(FinePoseError, match="--resume never"):
            train(cfg, run_dir, device="cpu", resume="never")
    finally:
        (run_dir / "done.json.bak").rename(run_dir / "done.json")


def test_refuses_data_of_another_dataset(data_dir, tmp_path):
    cfg = resolved({**run_config(data_dir), "dataset": "mpi_inf_3dhp"})
    with pytest.raises(FinePoseError, match="holds dataset 'h36m', the run config says dataset 'mpi_inf_3dhp'"):
        train(cfg, tmp_path / "r", device="cpu")


def test_validation_is_carved_from_training_subjects(data_dir):
    seqs = load_sequences(data_dir, split="train")
    train_part, val_part = split_validation(seqs, None, 0.34, 0)
    assert val_part and {s.split for s in val_part} == {"train"}
    assert not ({(s.subject, s.sequence) for s in train_part} & {(s.subject, s.sequence) for s in val_part})
    assert split_validation(seqs, None, 0.34, 0)[1] == val_part        # fixed by val_seed
    held = split_validation(seqs, ["S5"], 0.1, 0)
    assert {s.subject for s in held[1]} == {"S5"} and "S5" not in {s.subject for s in held[0]}
    with pytest.raises(FinePoseError, match="both training and test"):
        train(resolved(run_config(data_dir, data={"dir": str(data_dir), "train_subjects": ["S1", "S9"],
                                                  "test_subjects": ["S9"], "val_subjects": None})),
              Path("/nonexistent/never-written"), device="cpu")


def test_masked_frames_add_no_loss_and_no_gradient():
    """TrainStep's loss = sum of the unmasked frames' errors / all frames; masked frames count 0."""
    from finepose.diffusion import GaussianDiffusion
    from finepose.model import ModelConfig, build_model
    from engine_helpers import TINY_MODEL

    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**TINY_MODEL, "actions": ["Walking"]}))
    diffusion = GaussianDiffusion()
    step = TrainStep(model, diffusion, "mpjpe")
    y0 = torch.randn(2, 27, 17, 3) * 0.2
    x2d = torch.randn(2, 27, 17, 2) * 0.5
    mask = torch.ones(2, 27, dtype=torch.bool)
    mask[0, 20:] = False
    t, noise = torch.tensor([10, 500]), torch.randn_like(y0)
    actions = ["Walking", "Walking"]
    value = step(x2d, y0, mask, t, noise, actions)
    value.backward()
    got = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    y_t = diffusion.q_sample(y0, t, noise)
    pred = model(diffusion.model_input(y_t), x2d, t, model.encode_prompts(actions))
    per_frame = torch.linalg.vector_norm(pred - y0, dim=-1).mean(-1)          # (B, F)
    expected = (per_frame * mask).sum() / mask.numel()
    expected.backward()
    want = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    torch.testing.assert_close(value, expected)
    assert len(got) == len(want) and all(torch.allclose(g, w, atol=1e-7) for g, w in zip(got, want))
    assert (per_frame[0, 20:] > 0).all()                                        # there was error to hide


# --------------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _grad_saver(path: Path):
    def probe(step: int, model) -> None:
        if step == 1:
            torch.save({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, path)
    return probe


def _ddp_worker(rank: int, world: int, port: int, cfg: dict, run_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = train(cfg, Path(run_dir), device="cpu", probe=_grad_saver(Path(run_dir).with_name(f"grads{rank}.pt")))
    assert result["status"] == "done"


def test_two_process_gloo_ddp_equals_one_process(data_dir, tmp_path):
    """Same global batch of 4 clips: 1 process x 4 vs 2 gloo processes x 2.

    The averaged gradients agree to float rounding. The weights then agree too,
    except where a gradient is mathematically zero (attention key biases): Adam
    divides that rounding noise by its own size, so such elements are excluded.
    """
    cfg = resolved(run_config(data_dir, train={"epochs": 1, "checkpoint_every_steps": 0, "max_steps_per_epoch": 4}))
    single = tmp_path / "single"
    assert train(cfg, single, device="cpu", probe=_grad_saver(tmp_path / "grads_single.pt"))["status"] == "done"
    double = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg, str(double)), nprocs=2, join=True)
    ckpt = torch.load(double / "checkpoints/last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["position"]["step"] == 4
    g1 = torch.load(tmp_path / "grads_single.pt", weights_only=True)
    for rank in (0, 1):                                       # every rank holds the global-batch gradient
        g2 = torch.load(tmp_path / f"grads{rank}.pt", weights_only=True)
        assert g1.keys() == g2.keys()
        for name in g1:                                       # float rounding: relative to the tensor's scale
            scale = max(g1[name].abs().max().item(), 1e-12)
            torch.testing.assert_close(g2[name], g1[name], rtol=0, atol=1e-5 * scale, msg=name)
    w1, w2 = weights(single / "checkpoints/last.pt"), weights(double / "checkpoints/last.pt")
    init = torch.load(single / "checkpoints/last.pt", weights_only=True)
    moved = 0
    for name, grad in g1.items():
        real = grad.abs() > max(1e-4 * grad.abs().max().item(), 1e-7)   # not a zero gradient's rounding noise
        torch.testing.assert_close(w2[name][real], w1[name][real], rtol=0, atol=1e-5, msg=name)
        moved += int(real.sum())
    assert moved > 0.8 * sum(g.numel() for g in g1.values())
    assert init["position"]["step"] == 4


# --------------------------------------------------------------------------------------------- CLI
def test_cli_train_verb(data_dir, tmp_path):
    config = write_config(tmp_path / "run.json", run_config(data_dir, train={"epochs": 1, "max_steps_per_epoch": 2}))
    proc = subprocess.run([sys.executable, "-m", "finepose", "train", str(config), "--out", str(tmp_path / "run"),
                           "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "run" / "done.json").read_text())["steps"] == 2
    bad = write_config(tmp_path / "bad.json", {**run_config(data_dir), "train": {"lr": "fast"}})
    proc = subprocess.run([sys.executable, "-m", "finepose", "train", str(bad), "--out", str(tmp_path / "bad")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "train.lr must be a positive number" in proc.stderr


# --------------------------------------------------------------------------------------------- real data
@pytest.mark.slow
@pytest.mark.shared_data
def test_real_h36m_validation_mpjpe_falls(h36m_raw, tmp_path):
    """600 steps of a tiny model on real Human3.6M (GT 2D, 7 recordings of S1/S5/S6, about 1.5 min on
    2 cores): validation MPJPE falls far below its untrained start and below the trivial predictor
    that always outputs the mean training pose."""
    from finepose.data.h36m import prepare

    raw = tmp_path / "raw"                    # a subset of the release, linked (never copied)
    raw.mkdir()
    os.symlink(h36m_raw / "cameras.h5", raw / "cameras.h5")
    for subject, names in {"S1": ("Walking 1", "Eating", "Directions"), "S5": ("Walking", "Eating 1"),
                           "S6": ("Walking", "Directions")}.items():
        folder = raw / subject / "MyPoses" / "3D_positions"
        folder.mkdir(parents=True)
        for name in names:
            os.symlink(h36m_raw / subject / "MyPoses" / "3D_positions" / f"{name}.h5", folder / f"{name}.h5")
    prepare(raw, tmp_path / "h36m", sources_2d=[])
    cfg = resolved(run_config(
        tmp_path / "h36m",
        data={"dir": str(tmp_path / "h36m"), "val_subjects": ["S6"], "train_subjects": ["S1", "S5", "S6"]},
        model={**run_config(tmp_path)["model"], "width": 64, "heads": 4},
        train={"epochs": 6, "batch_size": 8, "lr": 2e-3, "lr_decay": 0.95, "max_steps_per_epoch": 100,
               "checkpoint_every_steps": 0, "log_every_steps": 50, "val_max_windows": 48, "val_batch_size": 16},
    ))
    result = train(cfg, tmp_path / "run", device="cpu")
    assert result["status"] == "done"
    epochs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    val = [r["val_mpjpe"] for r in epochs if r["kind"] == "epoch"]
    start, mean_pose = _baselines(cfg)
    print(f"validation MPJPE (mm): untrained {start:.1f}, mean training pose {mean_pose:.1f}, "
          f"per epoch {[round(v, 1) for v in val]}")
    assert min(val) < 0.6 * start
    assert val[-1] < 0.9 * mean_pose


def _baselines(cfg: dict) -> tuple[float, float]:
    """Validation MPJPE (mm) of the untrained model (same validation windows) and of the mean training pose."""
    from finepose.train import Dist, build, load_train_data, resolve_model_config, seed_everything, validation_mpjpe

    data = load_train_data(cfg)
    seed_everything(cfg["seed"], 0)
    model, diffusion = build(cfg, resolve_model_config(cfg, 17, data.actions), torch.device("cpu"))
    dist = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), created_group=False)
    untrained = validation_mpjpe(model, diffusion, data.val, cfg, cfg["model"]["frames"], dist, 0)
    mean_pose = data.train.y3d[data.train.valid].mean(axis=0)
    mean_error = np.linalg.norm(data.val.y3d[data.val.valid] - mean_pose, axis=-1).mean() * 1000
    return untrained, float(mean_error)


def test_ctrl_c_saves_last_checkpoint_and_resumes_exactly(finished_run, tmp_path):
    """Ctrl-C (SIGINT) finishes the step in flight, saves last.pt and returns 'interrupted';
    resuming ends with the uninterrupted run's weights, and the caller's handler is restored."""
    cfg, reference = finished_run
    run_dir = tmp_path / "ctrl_c"
    before = signal.getsignal(signal.SIGINT)

    def press_ctrl_c(step, model):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    first = train(cfg, run_dir, device="cpu", probe=press_ctrl_c)
    assert first["status"] == "interrupted" and first["step"] == 6
    assert signal.getsignal(signal.SIGINT) is before
    saved = torch.load(run_dir / "checkpoints/last.pt", map_location="cpu", weights_only=True)
    assert saved["position"]["step"] == 6 and not (run_dir / "done.json").exists()
    assert train(cfg, run_dir, device="cpu")["status"] == "done"
    assert_same_weights(weights(reference / "checkpoints/last.pt"), weights(run_dir / "checkpoints/last.pt"))
