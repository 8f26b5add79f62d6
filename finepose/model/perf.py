"""CPU kernel choices for the denoiser, with identical float32 math.

On some CPUs oneDNN's float32 GEMMs are much faster than MKL's (about twice, on the
AMD EPYC this project measured on 2026-11-22); on others they are equal (another
2-core EPYC with AVX2, 2026-11-29: ~145 GFLOP/s each on the model's shapes; see
``benchmarks/model.py``'s ``cpu_fp32_gemm_ceiling``). PyTorch
routes float32 matmuls to oneDNN when ``torch.backends.mkldnn.matmul.fp32_precision``
is ``"bf16"`` — a hint that *allows* bf16 down-conversion. Only CPUs with AMX
actually down-convert; elsewhere oneDNN computes in float32. :func:`cpu_kernels`
therefore probes once: it enables the routing only if a float32 matmul under it
matches float64 to float32 accuracy, and otherwise leaves MKL in place.

At the short sequences of this model (17 joints, tens of frames) every CPU
backend of ``scaled_dot_product_attention`` loses to the plain form
softmax(q k^T / sqrt(d)) v: the math backend pays for its "safe softmax" checks
(isneginf, all, where over every score), and the flash kernel's inner tiny GEMMs
collapse under the oneDNN routing (up to 10x slower on the temporal shapes). So the
denoiser's attention (:func:`attention`) is the plain form on CPU (switch:
:func:`set_cpu_attention`) and SDPA (flash / cuDNN / memory-efficient kernels) on
CUDA; the same float32 math either way. The context below also selects the math
backend for the remaining SDPA calls on CPU (the CLIP text tower's causal attention).
For a CUDA device the context does nothing.

    with cpu_kernels(device):
        loss = ...; loss.backward()
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Iterator

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
CPU_ATTENTION = ("explicit", "sdpa")
_cpu_attention = "explicit"


def set_cpu_attention(kind: str) -> str:
    """Choose the denoiser's attention on CPU: "explicit" (default; fastest measured here) or
    "sdpa" (torch's scaled_dot_product_attention, whichever backend is active). Returns the previous one."""
    global _cpu_attention
    if kind not in CPU_ATTENTION:
        raise ValueError(f"cpu attention must be one of {CPU_ATTENTION}, got {kind!r}")
    previous, _cpu_attention = _cpu_attention, kind
    return previous


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (..., L, d) tensors: the plain form on CPU, SDPA elsewhere."""
    if q.device.type == "cpu" and _cpu_attention == "explicit":
        scores = torch.matmul(q * (q.shape[-1] ** -0.5), k.transpose(-2, -1))
        return torch.matmul(scores.softmax(dim=-1), v)
    return F.scaled_dot_product_attention(q, k, v)
FP32_EXACT_TOLERANCE = 1e-5  # max relative error of a float32 GEMM (K = 512) is ~1e-6; bf16's ~1e-3


@functools.lru_cache(maxsize=1)
def onednn_fp32_probe() -> dict:
    """Whether oneDNN-routed matmuls compute in float32 here: {"exact": bool, "rel_error": float}."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2048, 512, generator=g)
    b = torch.randn(512, 512, generator=g)
    reference = a.double() @ b.double()
    backend = torch.backends.mkldnn.matmul
    previous = backend.fp32_precision
    try:
        backend.fp32_precision = "bf16"
        out = a @ b
    finally:
        backend.fp32_precision = previous
    err = float((out.double() - reference).abs().max() / reference.abs().max())
    return {"exact": err < FP32_EXACT_TOLERANCE, "rel_error": err}


@contextlib.contextmanager
def cpu_kernels(device: torch.device | str = "cpu", onednn_matmul: bool = True,
                math_attention: bool = True) -> Iterator[dict]:
    """Apply the CPU kernel choices inside the block (no-op unless ``device`` is a CPU); yields what was applied."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    applied = {"matmul": "default", "attention": "default"}
    stack = contextlib.ExitStack()
    with stack:
        if torch.device(device).type != "cpu":
            yield applied
            return
        if onednn_matmul and torch.backends.mkldnn.is_available():
            probe = onednn_fp32_probe()
            if probe["exact"]:
                backend = torch.backends.mkldnn.matmul
                stack.callback(setattr, backend, "fp32_precision", backend.fp32_precision)
                backend.fp32_precision = "bf16"
                applied["matmul"] = "onednn-fp32"
            else:
                log.info("oneDNN would down-convert float32 matmuls here (rel. error %.1e); keeping the default",
                         probe["rel_error"])
        if math_attention:
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            applied["attention"] = "math"
        yield applied
