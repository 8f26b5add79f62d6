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
    untrained = validation_mpjpe(model, diffusion, data.val, cfg, cfg["model"]["frames"], dist)
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


# --------------------------------------------------------------------------------------------- schedule
def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_schedule_is_a_function_of_the_global_step():
    from finepose.train import Schedule

    def sched(**train):
        return Schedule.from_config(resolved({"train": train})["train"], steps_per_epoch=10)

    paper = sched(lr=1e-3, lr_decay=0.5, epochs=3)
    assert paper.total == 30 and paper.epoch_steps == 10
    assert [paper.lr_at(s) for s in (0, 10, 20)] == pytest.approx([1e-3, 5e-4, 2.5e-4], rel=1e-12)
    assert paper.lr_at(5) == pytest.approx(1e-3 * 0.5 ** 0.5, rel=1e-12)          # per step, not per epoch
    capped = sched(lr=1e-3, lr_decay=0.5, epochs=3, max_steps_per_epoch=4)
    assert capped.total == 12 and capped.epoch_steps == 4
    assert [capped.lr_at(s) for s in range(12)] == [paper.lr_at(s) for s in range(12)]  # the cap is cadence only
    warm = sched(lr=1e-3, warmup_steps=4, lr_schedule="cosine", lr_floor=1e-5, steps=24)
    assert warm.total == 24
    assert [warm.lr_at(s) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert warm.lr_at(4) == pytest.approx(1e-3) and warm.lr_at(14) == pytest.approx((1e-3 + 1e-5) / 2)
    assert warm.lr_at(24) == pytest.approx(1e-5)
    assert all(warm.lr_at(s) > warm.lr_at(s + 1) for s in range(4, 24))
    with pytest.raises(FinePoseError, match="warmup_steps 40 is not fewer than the run's 30 steps"):
        sched(warmup_steps=40, epochs=3)


def test_epoch_cap_changes_only_the_cadence(data_dir, tmp_path):
    """train.max_steps_per_epoch used to restart the clip order and decay the lr per capped epoch:
    now the same step budget with and without it trains bit-identical weights."""
    base = run_config(data_dir, train={"steps": 7, "lr_decay": 0.5, "checkpoint_every_steps": 0})
    full = resolved(base)
    capped = resolved({**base, "train": {**base["train"], "max_steps_per_epoch": 2}})
    assert train(full, tmp_path / "full", device="cpu")["status"] == "done"
    assert train(capped, tmp_path / "capped", device="cpu")["status"] == "done"
    assert_same_weights(weights(tmp_path / "full/checkpoints/last.pt"), weights(tmp_path / "capped/checkpoints/last.pt"))
    lrs = {name: [r["lr"] for r in _log(tmp_path / name) if r["kind"] == "step"] for name in ("full", "capped")}
    assert lrs["full"] == lrs["capped"] and len(lrs["full"]) == 7
    assert lrs["full"][5] == pytest.approx(1e-3 * 0.5, rel=1e-12)      # 5 steps = one pass over the 20 clips
    capped_epochs = [r for r in _log(tmp_path / "capped") if r["kind"] == "epoch"]
    assert [r["step"] for r in capped_epochs] == [2, 4, 6, 7]            # validation every capped epoch
    assert json.loads((tmp_path / "full/done.json").read_text())["steps_per_epoch"] == 5


def test_step_budget_validates_every_n_steps_and_logs_the_noise_spread(data_dir, tmp_path):
    cfg = resolved(run_config(data_dir, train={"steps": 8, "val_every_steps": 3, "checkpoint_every_steps": 0}))
    result = train(cfg, tmp_path / "r", device="cpu")
    assert result["status"] == "done" and result["steps"] == 8
    vals = [r for r in _log(tmp_path / "r") if "val_mpjpe" in r]
    # val_every_steps replaces the per-epoch validation; epochs still end (last.pt) at 5 and 8
    assert [(r["kind"], r["step"]) for r in vals] == [("val", 3), ("val", 6), ("epoch", 8)]
    assert [r["step"] for r in _log(tmp_path / "r") if r["kind"] == "epoch"] == [5, 8]
    for r in vals:
        a, b = r["val_mpjpe_seeds"]
        assert r["val_mpjpe"] == a and r["val_noise_spread"] == pytest.approx(abs(a - b)) and a != b
        assert r["val_noise_seeds"] == [0, 1] and r["val_mode"] == "mean"
    best = min(vals, key=lambda r: r["val_mpjpe"])
    done = json.loads((tmp_path / "r/done.json").read_text())
    assert done["best_step"] == best["step"] and done["best_val_mpjpe"] == pytest.approx(best["val_mpjpe"])
    assert _ckpt(tmp_path / "r/checkpoints/best.pt")["position"]["step"] == best["step"]


def test_resume_mid_warmup_and_mid_run_is_bit_exact(data_dir, tmp_path):
    """Warm-up + cosine over a step budget, validation every 3 steps: stopped in the warm-up (step 2)
    and after a validation (step 5), resumed twice; weights, optimizer state, lr, best.pt and the
    log equal the uninterrupted run's."""
    cfg = resolved(run_config(data_dir, train={"steps": 11, "warmup_steps": 4, "lr_schedule": "cosine",
                                               "lr_floor": 1e-5, "val_every_steps": 3,
                                               "checkpoint_every_steps": 0}))
    ref, run_dir = tmp_path / "ref", tmp_path / "resumed"
    assert train(cfg, ref, device="cpu")["status"] == "done"
    assert train(cfg, run_dir, device="cpu", max_steps=2)["status"] == "stopped"
    assert _ckpt(run_dir / "checkpoints/last.pt")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(7.5e-4)
    assert train(cfg, run_dir, device="cpu", max_steps=5)["status"] == "stopped"
    assert train(cfg, run_dir, device="cpu")["status"] == "done"
    for name in ("last.pt", "best.pt"):
        a, b = _ckpt(ref / "checkpoints" / name), _ckpt(run_dir / "checkpoints" / name)
        assert_same_weights(a["state_dict"], b["state_dict"])
        assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
        for k, state in a["optimizer"]["state"].items():
            for field in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(state[field], b["optimizer"]["state"][k][field]), (name, k, field)
        assert a["position"] == b["position"] and a["best"] == b["best"]
    assert _ckpt(ref / "checkpoints/last.pt")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-5)

    def comparable(records):
        drop = ("clips_per_s", "data_s", "step_s", "val_s")
        return [{k: v for k, v in r.items() if k not in drop} for r in records if r["kind"] in ("step", "val", "epoch")]

    assert comparable(_log(ref)) == comparable(_log(run_dir))


# --------------------------------------------------------------------------------------------- validation
def _val_setup(cfg: dict):
    from finepose.train import Dist, build, load_train_data, resolve_model_config, seed_everything

    data = load_train_data(cfg)
    seed_everything(cfg["seed"], 0)
    model, diffusion = build(cfg, resolve_model_config(cfg, 17, data.actions), torch.device("cpu"))
    dist = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), created_group=False)
    return data, model, diffusion, dist


def test_validation_noise_is_fixed_and_independent_of_the_run_seed(data_dir):
    from finepose.train import validation_mpjpe, validation_window_ids

    cfg = resolved(run_config(data_dir, train={"val_hypotheses": 2, "val_steps": 2}))
    data, model, diffusion, dist = _val_setup(cfg)
    first = validation_mpjpe(model, diffusion, data.val, cfg, 27, dist)
    assert validation_mpjpe(model, diffusion, data.val, cfg, 27, dist) == first      # the same noise every time
    other_run = resolved({**cfg, "seed": 5})
    assert validation_mpjpe(model, diffusion, data.val, other_run, 27, dist) == first  # not the training seed's
    assert validation_mpjpe(model, diffusion, data.val, cfg, 27, dist, seed=1) != first
    # j_agg (the GT-free aggregation) is what is scored when configured
    agg = resolved({**cfg, "train": {**cfg["train"], "val_mode": "j_agg"}})
    j = validation_mpjpe(model, diffusion, data.val, agg, 27, dist)
    assert np.isfinite(j) and j != first
    # a window subset is spread over every validation sequence, not the first N windows
    ids = validation_window_ids(100, 10)
    assert len(ids) == 10 and ids[0] == 0 and ids[-1] == 99 and np.all(np.diff(ids) >= 10)
    assert list(validation_window_ids(7, 10)) == list(range(7))


# --------------------------------------------------------------------------------------------- reliability
class _Killed(Exception):
    """A simulated kill between two checkpoint writes."""


@pytest.mark.parametrize("kill_at", ["copy", "best_write"])
def test_kill_between_the_best_and_last_writes_never_leaves_a_stale_best(data_dir, tmp_path, monkeypatch, kill_at):
    """Validation improves at every epoch; a kill at the final epoch's second checkpoint write (or its
    best.pt write) must not leave best.pt holding the previous best after the rerun finishes."""
    import finepose.train as tr

    scores = iter(range(1000, 0, -1))
    monkeypatch.setattr(tr, "validation_mpjpe", lambda *a, **k: float(next(scores)))
    cfg = resolved(run_config(data_dir, train={"checkpoint_every_steps": 0}))
    run_dir = tmp_path / "r"
    copy, save = tr._copy_atomic, tr._save
    calls = {"copy": 0, "best_write": 0}

    def killing_copy(src, dst):
        calls["copy"] += 1
        if kill_at == "copy" and calls["copy"] == 2:
            raise _Killed
        copy(src, dst)

    def killing_save(path, model, extra):
        if Path(path).name == "best.pt":
            calls["best_write"] += 1
            if kill_at == "best_write" and calls["best_write"] == 2:
                raise _Killed
        save(path, model, extra)

    monkeypatch.setattr(tr, "_copy_atomic", killing_copy)
    monkeypatch.setattr(tr, "_save", killing_save)
    with pytest.raises(_Killed):
        train(cfg, run_dir, device="cpu")
    monkeypatch.setattr(tr, "_copy_atomic", copy)
    monkeypatch.setattr(tr, "_save", save)
    assert train(cfg, run_dir, device="cpu")["status"] == "done"
    done = json.loads((run_dir / "done.json").read_text())
    assert done["best_epoch"] == 1
    assert_same_weights(weights(run_dir / "checkpoints/best.pt"), weights(run_dir / "checkpoints/last.pt"))
    assert _ckpt(run_dir / "checkpoints/best.pt")["best"]["step"] == done["best_step"] == done["steps"]


def test_a_second_trainer_on_the_run_folder_is_refused(data_dir, tmp_path):
    """Another process holds the run folder's lock: train() refuses, naming its pid and host; once that
    process is killed (no clean-up), the lock is gone and training runs."""
    run_dir = tmp_path / "locked"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from finepose.train import RunLock; "
         "lock = RunLock(Path(sys.argv[1])); lock.acquire(); print('locked', flush=True); sys.stdin.read()", str(run_dir)],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = resolved(run_config(data_dir, train={"epochs": 1, "max_steps_per_epoch": 1}))
        with pytest.raises(FinePoseError, match=rf"another trainer is running on this run folder \(pid {holder.pid} "
                                                rf"on host {socket.gethostname()}"):
            train(cfg, run_dir, device="cpu")
        assert not (run_dir / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait(timeout=60)
    assert train(cfg, run_dir, device="cpu")["status"] == "done"


def test_resume_checks_the_data_not_only_the_model(finished_run, tmp_path, monkeypatch):
    cfg, run_dir = finished_run
    other_source = resolved({**cfg, "data": {**cfg["data"], "source_2d": "sh"}})
    with pytest.raises(FinePoseError, match=r"trained on other data \(data.source_2d: 'gt' != 'sh'\)"):
        train(other_source, run_dir, device="cpu")
    other = write_dataset(tmp_path / "other", seed=1)                 # same layout, other content
    with pytest.raises(FinePoseError, match=r"trained on other data \(data.dataset.source_files"):
        train(resolved({**cfg, "data": {**cfg["data"], "dir": str(other)}}), run_dir, device="cpu")
    # the same prepared data through another path (relative here) is the same data
    data_dir = Path(cfg["data"]["dir"])
    monkeypatch.chdir(data_dir.parent)
    same = resolved({**cfg, "data": {**cfg["data"], "dir": data_dir.name}})
    assert train(same, run_dir, device="cpu")["status"] == "done"


def test_a_relative_data_dir_that_is_not_there_says_where_it_looked(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = resolved(run_config(data_dir, data={"dir": "results/h36m/data"}))
    with pytest.raises(FinePoseError, match=r"data.dir 'results/h36m/data' is relative, so it is taken relative "
                                            rf"to the current directory {tmp_path}.*prepare"):
        train(cfg, tmp_path / "r", device="cpu")


def test_truncated_last_checkpoint_gets_a_clear_error(data_dir, tmp_path):
    cfg = resolved(run_config(data_dir))
    run_dir = tmp_path / "r"
    assert train(cfg, run_dir, device="cpu", max_steps=4)["status"] == "stopped"
    last = run_dir / "checkpoints/last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(FinePoseError, match=r"last.pt: this run's last checkpoint is truncated or corrupt") as err:
        train(cfg, run_dir, device="cpu")
    assert "Delete it to restart" in str(err.value) and "import-official" not in str(err.value)


def test_disk_full_while_checkpointing_says_so_and_keeps_the_previous_checkpoint(data_dir, tmp_path, monkeypatch):
    import errno

    cfg = resolved(run_config(data_dir, train={"checkpoint_every_steps": 1}))
    run_dir = tmp_path / "r"
    real_save = torch.save
    calls = []

    def full_disk(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    last = run_dir / "checkpoints/last.pt"
    with pytest.raises(FinePoseError, match=rf"{last}: disk full"):
        train(cfg, run_dir, device="cpu")
    assert _ckpt(last)["position"]["step"] == 1                       # the previous checkpoint, intact
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.pt"]   # no temporary file left


@pytest.mark.timeout(600)
def test_sigterm_of_a_bare_train_saves_after_the_step_and_exits_143(data_dir, tmp_path):
    """`python -m finepose train` without a launcher: SIGTERM mid-epoch with checkpoint_every_steps 0
    saves last.pt after the step in flight and exits 143; the rerun ends with the uninterrupted
    run's weights."""
    long = {**run_config(data_dir), "train": {**run_config(data_dir)["train"], "epochs": 40,
                                               "checkpoint_every_steps": 0}}
    config = write_config(tmp_path / "run.json", long)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "finepose", "train", str(config), "--out", str(run_dir),
                             "--device", "cpu"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    try:
        import time

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            log_file = run_dir / "log.jsonl"
            if log_file.exists() and any('"kind": "step"' in line and json.loads(line)["step"] >= 2
                                         for line in log_file.read_text().splitlines() if line.strip()):
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out
    saved = _ckpt(run_dir / "checkpoints/last.pt")["position"]
    assert 2 <= saved["step"] < 200 and not (run_dir / "done.json").exists()
    assert "SIGTERM: saving last.pt" in out
    uninterrupted = resolved(long)
    assert train(uninterrupted, tmp_path / "ref", device="cpu", max_steps=saved["step"] + 3)["status"] == "stopped"
    assert train(uninterrupted, run_dir, device="cpu", max_steps=saved["step"] + 3)["status"] == "stopped"
    assert_same_weights(weights(tmp_path / "ref/checkpoints/last.pt"), weights(run_dir / "checkpoints/last.pt"))
