"""The plain sampling API: FinePOSE denoiser + finepose.diffusion's DDIM sampler.

The prompt branch runs once per call (:func:`sample`), never per DDIM step or per
hypothesis; the 2D input is passed once per clip and broadcast over hypotheses.

    x0 = sample(model, diffusion, x2d, actions, hypotheses=20, steps=10,
                flip_permutation=joint_set.flip_permutation, noise=..., step_noise=...)
    # x0: (M, B, H, F, J, 3), the x0 estimate after each of the M steps
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Sequence

import torch

from finepose.model.denoiser import FinePOSE
from finepose.model.prompts import PromptEncoding


def denoise_fn(model: FinePOSE, x2d: torch.Tensor, prompts: PromptEncoding | None,
               amp: bool = False) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(y_t (B*H, F, J, 3), t (B*H,)) -> y0_hat`` closed over the 2D input (B, F, J, 2) and prompts.

    amp: bf16 autocast on CUDA (float32 output); ignored on CPU.
    """
    use_amp = amp and x2d.device.type == "cuda"

    def fn(y_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else nullcontext()
        with ctx:
            return model(y_t, x2d, t, prompts).float()

    return fn


@torch.no_grad()
def sample(model: FinePOSE, diffusion, x2d: torch.Tensor, actions: Sequence[str], *, hypotheses: int,
           steps: int, eta: float = 1.0, flip_permutation: Sequence[int] | None = None,
           noise: torch.Tensor | None = None, step_noise: torch.Tensor | None = None,
           generator: torch.Generator | None = None, amp: bool = False) -> torch.Tensor:
    """DDIM-sample ``hypotheses`` 3D pose sequences per clip: (M, B, H, F, J, 3).

    x2d: (B, F, J, 2) screen-normalised; actions: B names; flip_permutation: the joint
    set's mirror permutation to average each step's prediction with the mirrored one
    (the released test-time flip), or None. noise / step_noise / generator: see
    ``GaussianDiffusion.ddim_sample`` (explicit tensors make runs comparable).
    """
    from finepose.diffusion import flip_averaged, pose_mirror

    prompts = model.encode_prompts(actions)  # once per sampling call
    fn = denoise_fn(model, x2d, prompts, amp=amp)
    if flip_permutation is not None:
        mirror = pose_mirror(flip_permutation)
        fn = flip_averaged(fn, mirror, denoise_fn(model, mirror(x2d), prompts, amp=amp))
    b, frames, joints, _ = x2d.shape
    return diffusion.ddim_sample(fn, (b, frames, joints, 3), hypotheses=hypotheses, steps=steps, eta=eta,
                                 generator=generator, noise=noise, step_noise=step_noise, device=x2d.device)
