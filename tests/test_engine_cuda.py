"""The engine on a GPU: training with bf16 autocast, resuming, and evaluation on CUDA agree with CPU.

Skips without CUDA (CI has no GPU); run on a GPU machine with
``python -m pytest tests/test_engine_cuda.py``.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine_helpers import run_config, write_dataset
from finepose.evaluate import evaluate
from finepose.model import load_checkpoint
from finepose.runconfig import resolve_run_config
from finepose.train import train

pytestmark = pytest.mark.gpu


def _headline(summary: dict, mode: str, step: int) -> float:
    return next(r["mpjpe"] for r in summary["results"]
                if r["mode"] == mode and r["step"] == step and r["group"] == "all")


def test_train_resume_and_evaluate_on_cuda(tmp_path: Path):
    if not torch.cuda.is_available():
        pytest.skip("gpu: no CUDA device")
    data = write_dataset(tmp_path / "data", lengths=(60, 40))
    cfg = resolve_run_config(run_config(data, train={"epochs": 2, "max_steps_per_epoch": 4, "checkpoint_every_steps": 2,
                                                     "amp": True}))
    run = tmp_path / "run"
    assert train(cfg, run, device="cuda", max_steps=3)["status"] == "stopped"          # bf16 autocast on CUDA
    assert train(cfg, run, device="cuda")["status"] == "done"                          # resumes from last.pt
    assert (run / "done.json").is_file()
    model, _ = load_checkpoint(run / "checkpoints" / "best.pt")
    assert all(torch.isfinite(p).all() for p in model.parameters())

    # the checkpoint scored on CPU and on CUDA in float32 gives the same numbers; bf16 autocast stays close
    ckpt = run / "checkpoints" / "best.pt"
    kwargs = dict(data_dir=data, hypotheses=3, steps=2, batch_size=4)
    on_cpu = evaluate(ckpt, tmp_path / "m_cpu", device="cpu", **kwargs)
    on_gpu = evaluate(ckpt, tmp_path / "m_gpu", device="cuda", amp=False, **kwargs)
    assert on_gpu["provenance"]["device"].startswith("cuda") and on_gpu["provenance"]["precision"] == "float32"
    for mode in ("j_best", "p_best", "j_agg", "mean"):
        assert _headline(on_gpu, mode, 2) == pytest.approx(_headline(on_cpu, mode, 2), rel=1e-3)
    amp = evaluate(ckpt, tmp_path / "m_amp", device="cuda", **kwargs)
    assert amp["provenance"]["precision"] == "bf16 autocast"
    assert _headline(amp, "j_best", 2) == pytest.approx(_headline(on_cpu, "j_best", 2), rel=5e-2)
