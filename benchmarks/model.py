"""Benchmark: FinePOSE training step and flip sampling call, CPU (2 threads) and CUDA.

Cases (the released model: width 512, depth 8, 8 heads, the real CLIP ViT-B/32 text
architecture with seeded random weights, recorded as clip_weights "random"):

  (a) 27 frames, batch 2 (two different actions): training step = prompt branch, forward,
      MPJPE loss (released gradient scaling), backward, AdamW step; sampling call = one
      DDIM call with H=5 hypotheses, M=2 steps, test-time flip, prompts encoded once.
  (b) 243 frames, batch 1, H=20, M=10, flip: CUDA only (skipped with the reason on CPU).
  (t) training throughput at 243 frames, batch 4 (the paper's) to 32: CUDA only; each batch's
      step time, MFU and projected_paper_training_h (100 epochs of ~12,000 clips with flips).
  (s) the small real-data preset's training step (width 48, depth 3, 27 frames, batch 32,
      test-tiny CLIP): seconds, CPU seconds and the fraction of this CPU's GEMM ceiling.

On CUDA: bf16 autocast, peak allocated memory, and model FLOPs utilisation (FLOPs counted
with torch.utils.flop_counter over one call, divided by time and the GPU's dense bf16
peak). On CPU: torch.set_num_threads(--threads), peak RSS of the phase (VmHWM after a
reset), and a roofline: this CPU's float32 GEMM rate on the model's Linear shapes, the
time a phase's FLOPs need at that rate (no float32 implementation of the same math can
be faster), the fraction of it achieved, and the largest speed-up over the official
times that the ceiling allows. The reference is the released implementation on this 2-core machine for (a):
1.85-2.34 s per training step, 9.8-10.5 s per flip sampling call.

    .venv/bin/python benchmarks/model.py [--device cpu|cuda|all] [--repeats 5] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_CPU_A = {"train_step_s": [1.85, 2.34], "flip_sampling_call_s": [9.8, 10.5]}
# Dense bf16 tensor-core peaks (FLOP/s) for MFU; matched against torch.cuda.get_device_name().
GPU_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}
CASES = {
    "a": {"frames": 27, "batch": 2, "hypotheses": 5, "steps": 2, "devices": ("cpu", "cuda")},
    "b": {"frames": 243, "batch": 1, "hypotheses": 20, "steps": 10, "devices": ("cuda",)},
}
# (t) training throughput of the released model at 243 frames: the paper's batch (4 clips) and larger
# batches (same 100 epochs in fewer steps; the lr would be scaled, e.g. linearly, up to 32 clips, beyond
# which one step covers more than 1/400 of an epoch and the schedule's 100 epochs lose their meaning).
TRAIN_BATCHES = (4, 8, 16, 32)
PAPER_TRAIN_CLIPS = 12_000   # non-overlapping 243-frame clips of S1, S5-S8 (4 cameras) with their flipped copies
PAPER_EPOCHS = 100
# (s) the small real-data preset (workflow/presets/h36m_real.yaml): width 48, depth 3, 4 heads,
# 27 frames, batch 32, the test-tiny CLIP tower, FinePOSE prompts; a CPU training step (issue 9).
SMALL = {"width": 48, "depth": 3, "heads": 4, "mlp_ratio": 2.0, "frames": 27, "batch": 32,
         "clip_model": "test-tiny"}
ACTIONS = ("Walking", "Eating")


def _rss_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) on Linux
    except OSError:
        pass


def _rss_peak_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, repeats: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    _sync(device)
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    # cpu_s: CPU seconds of this process (all threads); robust to other processes on a shared machine
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
            "max_s": round(max(times), 4), "median_cpu_s": round(statistics.median(cpu), 4), "repeats": repeats}


def cpu_gemm_ceiling(width: int = 512, mlp_ratio: float = 2.0, repeats: int = 10,
                     token_counts: tuple[int, ...] = (918, 4590)) -> dict:
    """This CPU's float32 GEMM rate on the model's own linear-layer shapes (GFLOP/s, current threads).

    The denoiser's FLOPs are almost all in Linear layers (qkv, proj, fc1, fc2 of every block) over
    a few hundred to a few thousand tokens; no float32 implementation of the same math can run
    faster than these GEMMs do. Measured with the default (MKL) and the oneDNN routing; the best
    shape and backend is the ceiling used for the lower bounds.
    """
    import torch

    hidden = int(width * mlp_ratio)
    backend = torch.backends.mkldnn.matmul
    previous = backend.fp32_precision
    shapes = ((width, 3 * width), (width, width), (width, hidden), (hidden, width))  # qkv, proj, fc1, fc2
    rates: dict[str, dict[str, float]] = {}
    try:
        for routing, precision in (("mkl", "none"), ("onednn", "bf16")):
            backend.fp32_precision = precision
            for tokens in token_counts:  # case (a): a training batch (2 x 27 x 17) and a sampling call (10 rows)
                total_flop, total_s = 0.0, 0.0
                for k, n in shapes:
                    a, w, b = torch.randn(tokens, k), torch.randn(n, k), torch.randn(n)
                    for _ in range(2):
                        torch.nn.functional.linear(a, w, b)
                    start = time.perf_counter()
                    for _ in range(repeats):
                        torch.nn.functional.linear(a, w, b)
                    total_s += time.perf_counter() - start
                    total_flop += 2.0 * tokens * k * n * repeats
                rates.setdefault(routing, {})[f"{tokens}_tokens"] = round(total_flop / total_s / 1e9, 1)
    finally:
        backend.fp32_precision = previous
    return {"gflops": max(v for r in rates.values() for v in r.values()), "by_backend_and_tokens": rates,
            "threads": torch.get_num_threads(),
            "note": "float32 Linear (GEMM + bias) at the block's four shapes; the mix qkv/proj/fc1/fc2"}


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def _peak_flops(device) -> float | None:
    import torch

    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_BF16_PEAK.items() if key in name), None)


def kernel_context(device_type: str, tuned: bool, bf16: bool):
    """A fresh context applying the kernel choices: finepose.model.perf.cpu_kernels (CPU) and bf16 autocast."""
    import contextlib

    import torch

    from finepose.model.perf import cpu_kernels

    stack = contextlib.ExitStack()
    if tuned:
        stack.enter_context(cpu_kernels(device_type))
    stack.enter_context(torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16))
    return stack


def _applied(device_type: str, tuned: bool) -> dict | None:
    from finepose.model.perf import cpu_kernels

    if device_type != "cpu":
        return None
    if not tuned:
        return {"matmul": "default (MKL)", "attention": "default (flash)"}
    with cpu_kernels(device_type) as applied:
        return dict(applied)


def run_baseline(name: str, repeats: int, warmup: int) -> dict:
    """The released computation, transcribed literally (tests/test_official_import.released_forward:
    2D input repeated per hypothesis, text branch in every denoiser call, prompt keys tiled, einsum
    attention, MKL GEMMs, torch's default AdamW), timed under the same conditions as ours."""
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from test_official_import import released_forward

    from finepose.diffusion import GaussianDiffusion, flip_averaged, pose_mirror
    from finepose.model import ModelConfig, build_model
    from finepose.skeleton import get_joint_set

    case = CASES[name]
    frames, batch, hyp, steps = case["frames"], case["batch"], case["hypotheses"], case["steps"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        torch.manual_seed(0)
        model = build_model(ModelConfig(frames=frames, clip_pretrained="none", compat_official=True))
    diffusion = GaussianDiffusion(timesteps=1000)
    mirror = pose_mirror(get_joint_set("h36m17").flip_permutation)
    g = torch.Generator().manual_seed(0)
    x2d = torch.rand(batch, frames, 17, 2, generator=g).mul(2).sub(1)
    y0 = torch.randn(batch, frames, 17, 3, generator=g) * 0.3
    actions = [ACTIONS[i % len(ACTIONS)] for i in range(batch)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=6e-5, weight_decay=0.1)

    def closed(inputs_2d, h):
        def fn(y_t, t):
            out = released_forward(model, y_t.view(batch, h, frames, 17, 3), inputs_2d, t[::h], actions)
            return out.reshape(y_t.shape)
        return fn

    def train_step():
        model.train()
        loss = diffusion.training_loss(closed(x2d, 1), y0, loss="mpjpe", official_grad_scaling=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sampling_call():
        model.eval()
        with torch.no_grad():
            fn = flip_averaged(closed(x2d, hyp), mirror, closed(mirror(x2d), hyp))
            return diffusion.ddim_sample(fn, (batch, frames, 17, 3), hypotheses=hyp, steps=steps,
                                         generator=torch.Generator().manual_seed(1))

    cpu = torch.device("cpu")
    return {"train_step": _time(train_step, cpu, repeats, warmup),
            "flip_sampling_call": _time(sampling_call, cpu, repeats, warmup)}


def run_case(name: str, device_name: str, repeats: int, warmup: int, compat: bool, tuned: bool = True,
             cpu_bf16: bool = False, fused_adamw: bool = True, baseline: bool = False) -> dict:
    import torch

    from finepose.diffusion import GaussianDiffusion
    from finepose.model import ModelConfig, build_model, sample
    from finepose.skeleton import get_joint_set

    case = CASES[name]
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    frames, batch, hyp, steps = case["frames"], case["batch"], case["hypotheses"], case["steps"]
    cfg = ModelConfig(frames=frames, clip_pretrained="none", compat_official=compat)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the random-CLIP warning: recorded below
        torch.manual_seed(0)
        model = build_model(cfg).to(device)
    diffusion = GaussianDiffusion(timesteps=1000).to(device)
    flip = get_joint_set("h36m17").flip_permutation
    g = torch.Generator().manual_seed(0)
    x2d = torch.rand(batch, frames, 17, 2, generator=g).mul(2).sub(1).to(device)
    y0 = (torch.randn(batch, frames, 17, 3, generator=g) * 0.3).to(device)
    y0[:, :, 0] = 0
    actions = [ACTIONS[i % len(ACTIONS)] for i in range(batch)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=6e-5, betas=(0.9, 0.999), weight_decay=0.1, fused=fused_adamw or None)
    bf16 = cuda or cpu_bf16

    def kernels():
        return kernel_context(device.type, tuned, bf16)

    # accuracy of the chosen kernels: one denoiser call vs the default float32 path
    probe_y = torch.randn(batch * 2, frames, 17, 3, generator=g).to(device)
    probe_t = torch.tensor([999, 500] * batch).to(device)
    with torch.no_grad():
        enc = model.eval().encode_prompts(actions)
        reference = model(probe_y, x2d, probe_t, enc).float()
        with kernels():
            probe = model(probe_y, x2d, probe_t, enc).float()
    applied = _applied(device.type, tuned)
    deviation = float((probe - reference).abs().max() / reference.abs().max())

    def train_step():
        model.train()
        with kernels():
            prompts = model.encode_prompts(actions)
            loss = diffusion.training_loss(lambda y_t, t: model(y_t, x2d, t, prompts).float(), y0,
                                           loss="mpjpe", official_grad_scaling=True)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sampling_call():
        model.eval()
        with kernels():
            return sample(model, diffusion, x2d, actions, hypotheses=hyp, steps=steps, flip_permutation=flip,
                          generator=torch.Generator(device=device).manual_seed(1))

    result = {"case": name, "device": device_name, "frames": frames, "batch": batch, "hypotheses": hyp,
              "steps": steps, "flip": True, "compat_official": compat, "clip_weights": model.clip_weights,
              "precision": "bf16 autocast" if bf16 else "float32",
              "cpu_kernels": None if cuda else applied,
              "adamw": "fused" if fused_adamw else "default",
              "max_rel_deviation_vs_default_fp32": deviation,
              "trainable_params_M": round(sum(p.numel() for p in params) / 1e6, 2)}
    for label, fn in (("train_step", train_step), ("flip_sampling_call", sampling_call)):
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        else:
            _rss_reset()
        timing = _time(fn, device, repeats, warmup)
        if cuda:
            timing["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        else:
            timing["peak_rss_mib"] = _rss_peak_mib()
        flops = _flops(fn)
        timing["model_gflop"] = round(flops / 1e9, 1)
        timing["achieved_tflops"] = round(flops / timing["median_s"] / 1e12, 3)
        if cuda:
            peak = _peak_flops(device)
            timing["mfu"] = round(flops / timing["median_s"] / peak, 4) if peak else None
            timing["gpu_bf16_peak_tflops"] = peak / 1e12 if peak else None
        result[label] = timing
    if baseline and not cuda:
        base = run_baseline(name, repeats, warmup)
        result["released_style_baseline_same_conditions"] = base
        result["speedup_vs_baseline"] = {
            label: {"wall": round(base[label]["median_s"] / result[label]["median_s"], 2),
                    "cpu_time": round(base[label]["median_cpu_s"] / result[label]["median_cpu_s"], 2)}
            for label in ("train_step", "flip_sampling_call")}
    if not cuda:
        ceiling = cpu_gemm_ceiling()
        result["cpu_fp32_gemm_ceiling"] = ceiling
        for label in ("train_step", "flip_sampling_call"):
            bound = result[label]["model_gflop"] / ceiling["gflops"]
            result[label]["lower_bound_s_at_gemm_ceiling"] = round(bound, 3)
            result[label]["fraction_of_gemm_ceiling"] = round(bound / result[label]["median_s"], 3)
    if name == "a" and not cuda:
        result["official_reference_s"] = OFFICIAL_CPU_A
        # the most any float32 implementation of the same math could gain over the official times here
        result["max_possible_speedup_vs_official"] = {
            label: [round(v / result[label]["lower_bound_s_at_gemm_ceiling"], 2) for v in OFFICIAL_CPU_A[key]]
            for label, key in (("train_step", "train_step_s"), ("flip_sampling_call", "flip_sampling_call_s"))}
        result["speedup_vs_official"] = {
            "train_step": [round(v / result["train_step"]["median_s"], 2) for v in OFFICIAL_CPU_A["train_step_s"]],
            "flip_sampling_call": [round(v / result["flip_sampling_call"]["median_s"], 2)
                                   for v in OFFICIAL_CPU_A["flip_sampling_call_s"]]}
    return result


def _train_setup(device, frames: int, batch: int, cfg_kwargs: dict, compile_mode: str = "none"):
    """A model, diffusion, optimiser and inputs for a training step of ``batch`` clips (distinct actions cycle)."""
    import torch

    from finepose.diffusion import GaussianDiffusion
    from finepose.model import ModelConfig, build_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        torch.manual_seed(0)
        model = build_model(ModelConfig(frames=frames, clip_pretrained="none", allow_random_clip=True,
                                        **cfg_kwargs)).to(device)
    if compile_mode != "none":
        model.compile(mode=compile_mode)
    diffusion = GaussianDiffusion(timesteps=1000).to(device)
    g = torch.Generator().manual_seed(0)
    x2d = torch.rand(batch, frames, 17, 2, generator=g).mul(2).sub(1).to(device)
    y0 = (torch.randn(batch, frames, 17, 3, generator=g) * 0.3).to(device)
    y0[:, :, 0] = 0
    actions = [("Walking", "Eating", "Sitting", "Phoning", "Greeting", "Posing")[i % 6] for i in range(batch)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=6e-5, betas=(0.9, 0.999), weight_decay=0.1, fused=True)
    bf16 = device.type == "cuda"

    def step():
        model.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            prompts = model.encode_prompts(actions)
            loss = diffusion.training_loss(lambda y_t, t: model(y_t, x2d, t, prompts).float(), y0,
                                           loss="mpjpe", official_grad_scaling=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step, params


def run_train_throughput(device_name: str, repeats: int, warmup: int, batches=TRAIN_BATCHES,
                         compile_mode: str = "none") -> dict:
    """(t): the released model's training step at 243 frames and each batch; projected_paper_training_h."""
    import torch

    device = torch.device(device_name)
    rows = []
    for batch in batches:
        try:
            model, step, params = _train_setup(device, 243, batch, {}, compile_mode)
            torch.cuda.reset_peak_memory_stats(device)
            timing = _time(step, device, repeats, warmup + (2 if compile_mode != "none" else 0))
            timing["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            flops = _flops(step)
        except torch.OutOfMemoryError as exc:
            rows.append({"batch": batch, "skipped": f"out of memory ({str(exc).splitlines()[0]})"})
            torch.cuda.empty_cache()
            continue
        peak = _peak_flops(device)
        steps = PAPER_EPOCHS * PAPER_TRAIN_CLIPS / batch
        timing.update(batch=batch, model_gflop=round(flops / 1e9, 1),
                      mfu=round(flops / timing["median_s"] / peak, 4) if peak else None,
                      clips_per_s=round(batch / timing["median_s"], 2), steps_for_100_epochs=int(steps),
                      projected_paper_training_h=round(steps * timing["median_s"] / 3600, 2))
        rows.append(timing)
        del model, step, params
        torch.cuda.empty_cache()
    paper = next((r for r in rows if r.get("batch") == 4 and "median_s" in r), None)
    return {"case": "t", "device": device_name, "frames": 243, "precision": "bf16 autocast", "compile": compile_mode,
            "recipe": f"{PAPER_EPOCHS} epochs x {PAPER_TRAIN_CLIPS} clips (with flips); paper batch 4 = "
                      f"{PAPER_EPOCHS * PAPER_TRAIN_CLIPS // 4} steps",
            "batches": rows, "projected_paper_training_h": paper["projected_paper_training_h"] if paper else None,
            "projected_training_h_at_largest_batch": next(
                (r["projected_paper_training_h"] for r in reversed(rows) if "median_s" in r), None)}


def run_small(device_name: str, repeats: int, warmup: int) -> dict:
    """(s): the small real-data preset's training step (issue 9): seconds, CPU seconds, share of the GEMM ceiling."""
    import torch

    device = torch.device(device_name)
    kwargs = {k: SMALL[k] for k in ("width", "depth", "heads", "mlp_ratio", "clip_model")}
    model, step, params = _train_setup(device, SMALL["frames"], SMALL["batch"], kwargs)
    if device.type != "cuda":
        _rss_reset()
    timing = _time(step, device, repeats, warmup)
    flops = _flops(step)
    result = {"case": "s", "device": device_name, **SMALL, "precision": "bf16 autocast" if device.type == "cuda"
              else "float32", "attention_on_cpu": "explicit (finepose.model.perf.attention)",
              "trainable_params_M": round(sum(p.numel() for p in params) / 1e6, 3),
              "train_step": {**timing, "model_gflop": round(flops / 1e9, 2)}}
    if device.type != "cuda":
        ceiling = cpu_gemm_ceiling(width=SMALL["width"], mlp_ratio=SMALL["mlp_ratio"],
                                   token_counts=(SMALL["batch"] * SMALL["frames"] * 17,))
        result["cpu_fp32_gemm_ceiling"] = ceiling
        result["train_step"]["peak_rss_mib"] = _rss_peak_mib()
        result["train_step"]["lower_bound_s_at_gemm_ceiling"] = round(flops / 1e9 / ceiling["gflops"], 4)
        # CPU seconds against the ceiling at the threads used: robust to other processes' load
        result["train_step"]["fraction_of_gemm_ceiling"] = round(
            flops / 1e9 / ceiling["gflops"] / (timing["median_cpu_s"] / ceiling["threads"]), 3)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    parser.add_argument("--cases", default="a,b,t,s", help="comma-separated cases (a, b, t: training throughput "
                        "at 243 frames, CUDA; s: the small preset's training step)")
    parser.add_argument("--train-batches", default=",".join(map(str, TRAIN_BATCHES)),
                        help="case t: batches to time (default 4,8,16,32)")
    parser.add_argument("--compile", default="none", help="case t: torch.compile mode of the denoiser")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--compat", action="store_true", help="benchmark compat_official (released behaviour)")
    parser.add_argument("--cpu-kernels", choices=("default", "tuned"), default="tuned",
                        help="tuned: finepose.model.perf.cpu_kernels (oneDNN float32 GEMMs when exact, math SDPA)")
    parser.add_argument("--cpu-bf16", action="store_true", help="bf16 autocast on CPU too (not identical math)")
    parser.add_argument("--default-adamw", action="store_true", help="torch's default AdamW instead of fused")
    parser.add_argument("--baseline", action="store_true",
                        help="also time the released computation transcribed literally (CPU), same conditions")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    out = {"benchmark": "model", "torch": torch.__version__, "machine": platform.machine(),
           "cpu": platform.processor() or platform.machine(), "cpu_threads": args.threads,
           "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "results": []}
    for name in [c.strip() for c in args.cases.split(",") if c.strip()]:
        if name == "s":
            for dev in devices:
                if dev == "cuda" and not torch.cuda.is_available():
                    continue
                out["results"].append(run_small(dev, args.repeats, args.warmup))
            continue
        if name == "t":
            if "cuda" not in devices or not torch.cuda.is_available():
                out["results"].append({"case": "t", "device": "cuda", "skipped": "case t (243 frames, batch 4-32 "
                                       "training) runs on CUDA only; no CUDA device here" if "cuda" in devices
                                       else "case t runs on CUDA only"})
            else:
                batches = tuple(int(b) for b in args.train_batches.split(","))
                out["results"].append(run_train_throughput("cuda", args.repeats, args.warmup, batches, args.compile))
            continue
        for dev in devices:
            if dev not in CASES[name]["devices"]:
                out["results"].append({"case": name, "device": dev, "skipped": f"case {name} runs on CUDA only "
                                       "(243 frames x 20 hypotheses x 10 steps is too slow for a 2-core CPU)"})
                continue
            if dev == "cuda" and not torch.cuda.is_available():
                out["results"].append({"case": name, "device": dev, "skipped": "no CUDA device on this machine"})
                continue
            out["results"].append(run_case(name, dev, args.repeats, args.warmup, args.compat,
                                           args.cpu_kernels == "tuned", args.cpu_bf16, not args.default_adamw,
                                           args.baseline))
    out["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        from finepose.io import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
