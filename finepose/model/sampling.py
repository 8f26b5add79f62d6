"""The plain sampling API: FinePOSE denoiser + finepose.diffusion's DDIM sampler.

The prompt branch runs once per call (:func:`sample`), never per DDIM step or per
hypothesis; the 2D input is passed once per clip and broadcast over hypotheses.

    model, ckpt = load_checkpoint(path)            # model.joint_set: the checkpoint's joint set
    x0 = sample(model, diffusion, x2d, actions, hypotheses=20, steps=10, noise=..., step_noise=...)
    # x0: (M, B, H, F, J, 3), the x0 estimate after each of the M steps

The released evaluation averages every step's prediction with the prediction for the
mirrored input (test-time flip). :func:`sample` does so by default whenever it knows the
joint set's mirror permutation: the ``flip_permutation`` given, else the one of
``model.joint_set`` (set by ``load_checkpoint`` from the checkpoint). Without either,
or with ``flip=False``, it samples without flip and logs that it does.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Callable, Sequence

import torch

from finepose.io import FinePoseError

from finepose.model.denoiser import FinePOSE
from finepose.model.prompts import PromptEncoding

log = logging.getLogger(__name__)


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
           steps: int, eta: float = 1.0, flip: bool | None = None,
           flip_permutation: Sequence[int] | None = None,
           noise: torch.Tensor | None = None, step_noise: torch.Tensor | None = None,
           generator: torch.Generator | None = None, amp: bool = False) -> torch.Tensor:
    """DDIM-sample ``hypotheses`` 3D pose sequences per clip: (M, B, H, F, J, 3).

    x2d: (B, F, J, 2) screen-normalised; actions: B names. flip: average each step's
    prediction with the mirrored one (the released test-time flip); None (default): flip
    when the mirror permutation is known, True: flip or raise, False: no flip.
    flip_permutation: the joint set's mirror permutation; default: that of
    ``model.joint_set`` (see :func:`flip_permutation_of`). noise / step_noise /
    generator: see ``GaussianDiffusion.ddim_sample`` (explicit tensors make runs comparable).
    """
    from finepose.diffusion import flip_averaged, pose_mirror

    if flip is not False and flip_permutation is None:
        flip_permutation = flip_permutation_of(model)
        if flip_permutation is None:
            if flip:
                raise FinePoseError("sample(flip=True): the model has no joint_set (load it with load_checkpoint "
                                    "from a checkpoint that records one) and no flip_permutation was given")
            log.info("sampling WITHOUT test-time flip: the model records no joint set; pass flip_permutation "
                     "(finepose.skeleton.get_joint_set(name).flip_permutation) for the released evaluation")
    if flip is False:
        log.debug("sampling without test-time flip (flip=False); the released evaluation flips")
        flip_permutation = None
    prompts = model.encode_prompts(actions)  # once per sampling call
    fn = denoise_fn(model, x2d, prompts, amp=amp)
    if flip_permutation is not None:
        mirror = pose_mirror(flip_permutation)
        fn = flip_averaged(fn, mirror, denoise_fn(model, mirror(x2d), prompts, amp=amp))
    b, frames, joints, _ = x2d.shape
    return diffusion.ddim_sample(fn, (b, frames, joints, 3), hypotheses=hypotheses, steps=steps, eta=eta,
                                 generator=generator, noise=noise, step_noise=step_noise, device=x2d.device)


def flip_permutation_of(model: FinePOSE) -> list[int] | None:
    """The mirror permutation of the model's joint set (``model.joint_set``, recorded in its
    checkpoint and set by ``load_checkpoint``), or None when the model records none."""
    name = getattr(model, "joint_set", None)
    if not name:
        return None
    from finepose.skeleton import get_joint_set

    try:
        joint_set = get_joint_set(name)
    except (KeyError, ValueError, FinePoseError) as exc:
        raise FinePoseError(f"model joint set {name!r} is unknown ({exc}); pass flip_permutation") from exc
    perm = list(joint_set.flip_permutation)
    if len(perm) != model.config.joints:
        raise FinePoseError(f"model joint set {name!r} has {len(perm)} joints, the model {model.config.joints}")
    return perm
