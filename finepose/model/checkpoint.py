"""Checkpoint I/O: a dict of plain tensors and plain Python values, written atomically.

Layout (``torch.load(path, weights_only=True)`` reads it)::

    {"model_format": "finepose-model-1",
     "model_config": {ModelConfig fields},          # plain dict
     "state_dict": {name: tensor},                  # the whole model, frozen CLIP text tower included
     "clip_weights": "openai" | "<path>" | "random" | "unused" | "from checkpoint sha256:<hex>",
     "variant": "finepose" | ... | None, "dataset": ..., "joint_set": ...,
     ...extra keys of the caller (trainer state and run_config, provenance;
        imported checkpoints: "diffusion", "eval" and "official_import")}

The CLIP text weights are stored, so a checkpoint is self-contained: loading it never
needs the CLIP download, and a model trained on random CLIP weights stays marked as such.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn

from finepose.io import FinePoseError, atomic_path
from finepose.model.config import ModelConfig, variant_of
from finepose.model.denoiser import FinePOSE, build_model

MODEL_FORMAT = "finepose-model-1"
_RESERVED = ("model_format", "model_config", "state_dict", "clip_weights")
# Fields that do not change what a checkpoint's model computes (a loading policy only).
_NOT_COMPARED = ("allow_random_clip",)


def _unwrap(model: nn.Module) -> FinePOSE:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / DataParallel
        model = model.module
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if not isinstance(model, FinePOSE):
        raise TypeError(f"save_checkpoint needs a FinePOSE model, got {type(model).__name__}")
    return model


def checkpoint_dict(model: nn.Module, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint dict of ``model`` (CPU tensors) plus ``extra`` (variant, dataset, joint_set, ...)."""
    model = _unwrap(model)
    extra = dict(extra or {})
    clash = [k for k in _RESERVED if k in extra]
    if clash:
        raise FinePoseError(f"save_checkpoint: extra may not set {clash}; they come from the model")
    ckpt: dict[str, Any] = {
        "model_format": MODEL_FORMAT,
        "model_config": model.config.to_dict(),
        "state_dict": {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()},
        "clip_weights": model.clip_weights,
        "variant": variant_of(model.config),
        "dataset": None,
        "joint_set": None,
    }
    ckpt.update(extra)
    return ckpt


def save_checkpoint(path: str | os.PathLike, model: nn.Module, extra: Mapping[str, Any] | None = None) -> None:
    """Write ``checkpoint_dict(model, extra)`` to ``path`` atomically (temp file + rename)."""
    ckpt = checkpoint_dict(model, extra)
    with atomic_path(path, suffix=".pt.tmp") as tmp:
        torch.save(ckpt, tmp)


def config_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """``key: a != b`` for every compared ModelConfig field that differs."""
    keys = sorted((set(a) | set(b)) - set(_NOT_COMPARED))
    return [f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def read_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that name the file and the fix."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError as exc:
        raise FinePoseError(f"{path}: checkpoint not found") from exc
    except Exception as exc:  # noqa: BLE001
        raise FinePoseError(f"{path}: cannot read as a finepose checkpoint with torch.load(weights_only=True) "
                            f"({exc}); for the authors' released checkpoint run "
                            "`python -m finepose import-official` first") from exc
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "state_dict" not in ckpt:
        hint = " (it looks like the authors' release: convert it with `python -m finepose import-official`)" \
            if isinstance(ckpt, dict) and "model_pos" in ckpt else ""
        raise FinePoseError(f"{path}: not a finepose checkpoint (no model_config/state_dict){hint}")
    return ckpt


# The diffusion settings GaussianDiffusion is built from, with finepose.runconfig's defaults
# (those of the released code: cosine schedule s = 0.008, T = 1000, scale 1, clamp 1.1).
DIFFUSION_KEYS = ("timesteps", "cosine_s", "scale", "clamp")


def diffusion_settings(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The diffusion settings a checkpoint was trained with: its run config's ``diffusion``
    section, else the checkpoint's own ``diffusion`` entry (imported checkpoints), over the defaults."""
    from finepose.runconfig import DEFAULTS

    stored = (ckpt.get("run_config") or {}).get("diffusion") or ckpt.get("diffusion") or {}
    return {k: stored.get(k, DEFAULTS["diffusion"][k]) for k in DIFFUSION_KEYS}


def diffusion_of(ckpt: Mapping[str, Any]):
    """``GaussianDiffusion`` built from :func:`diffusion_settings` (CPU)."""
    from finepose.diffusion import GaussianDiffusion

    return GaussianDiffusion(**diffusion_settings(ckpt))


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu", *,
                    config: ModelConfig | Mapping[str, Any] | None = None,
                    variant: str | None = None) -> tuple[FinePOSE, dict[str, Any]]:
    """Load a checkpoint into a new model in eval mode on ``device``; returns (model, checkpoint dict).

    ``config`` / ``variant``: the model the caller expects; a checkpoint of another model
    definition or variant is refused with an error naming both.
    """
    ckpt = read_checkpoint(path, device="cpu")
    stored = ckpt["model_config"]
    if config is not None:
        wanted = config.to_dict() if isinstance(config, ModelConfig) else ModelConfig.from_dict(config).to_dict()
        diff = config_differences(stored, wanted)
        if diff:
            raise FinePoseError(f"{path}: checkpoint model config differs from the requested one "
                                f"(checkpoint != requested: {'; '.join(diff)})")
    if variant is not None and ckpt.get("variant") != variant:
        raise FinePoseError(f"{path}: checkpoint is of variant {ckpt.get('variant')!r}, "
                            f"but variant {variant!r} was requested")
    cfg = ModelConfig.from_dict(stored, source=f"{path}: model_config")
    with torch.device("meta"):
        model = build_model(cfg, load_clip=False)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True, assign=True)
    except RuntimeError as exc:
        raise FinePoseError(f"{path}: state_dict does not fit its model_config ({exc})") from exc
    model.clip_weights = ckpt.get("clip_weights", "unknown")
    model.joint_set = ckpt.get("joint_set")   # sample() derives the test-time flip from it
    model.to(device)
    model.eval()
    return model, ckpt
