"""Convert the authors' released FinePOSE checkpoint to ours (compat_official: true).

Reads ``checkpoint['model_pos']`` (the state_dict of the model wrapped in
nn.DataParallel: every key starts with ``module.``): the 12 float64 diffusion
buffers, the denoiser ``pose_estimator.*`` and its whole frozen CLIP ViT-B/32
(``pose_estimator.clip_text.*``, vision tower included). Every key is mapped onto
our model or explicitly dropped after a shape check (the diffusion buffers, which
finepose.diffusion recomputes; CLIP's vision tower, text_projection and logit_scale,
which the text branch never uses); a key left unmapped, or one of our keys left
without a source, is an error that lists them. Shapes are checked against our model.
The result loads with ``finepose.model.load_checkpoint`` and runs the released
computation (compat_official: faults 1-3 of the released code kept; see
finepose/docs/official_import.md and the README's "Faithful, and corrected").

The checkpoint also records the released diffusion and sampling settings (cosine
schedule over T = the released buffers' length, s = 0.008, scale 1, clamp 1.1; DDIM
eta 1, H = 20, M = 10, test-time flip), its joint set (so sampling flips as released),
and which CLIP weights it holds: "from checkpoint sha256:<hex>", the sha256 of the
CLIP text-tower tensors (``clip_text_sha256``). Layer names: ``official_to_ours``.

``python -m finepose import-official CKPT --dataset h36m|3dhp --out OURS.pt``
"""
from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from finepose.io import FinePoseError, sha256_file
from finepose.model.config import H36M_ACTIONS, ModelConfig

log = logging.getLogger(__name__)

DIFFUSION_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
DATASETS = {"h36m": "h36m", "3dhp": "3dhp"}
_PE = "pose_estimator."

# Released context-vector names -> our segment names.
CONTEXT_NAMES = {"ctx_subject": "person", "ctx_verb": "action", "ctx_speed": "speed", "ctx_head": "head",
        "ctx_body": "body", "ctx_arm": "arm", "ctx_leg": "leg"}

# (released pattern, our replacement) for pose_estimator.* keys; first match wins.
NAME_RULES: tuple[tuple[str, str], ...] = (
    (r"Spatial_pos_embed", "spatial_pos"),
    (r"Temporal_pos_embed", "temporal_pos"),
    (r"(ctx_\w+)", "<ctx>"),
    (r"Spatial_patch_to_embedding\.(weight|bias)", r"joint_embed.\1"),
    (r"time_mlp\.1\.(weight|bias)", r"time_embed.fc1.\1"),
    (r"time_mlp\.3\.(weight|bias)", r"time_embed.fc2.\1"),
    (r"STEblocks\.(\d+)\.(.+)", r"spatial_blocks.\1.\2"),
    (r"TTEblocks\.(\d+)\.(.+)", r"temporal_blocks.\1.\2"),
    (r"Spatial_norm\.(weight|bias)", r"spatial_norm.\1"),
    (r"Temporal_norm\.(weight|bias)", r"temporal_norm.\1"),
    (r"head\.0\.(weight|bias)", r"head_norm.\1"),
    (r"head\.1\.(weight|bias)", r"head.\1"),
    (r"temporal_cross_attn\.(norm|text_norm|query|key|value)\.(weight|bias)", r"fpc.\1.\2"),
    (r"temporal_cross_attn\.proj_out\.emb_layers\.1\.(weight|bias)", r"pts.emb_proj.\1"),
    (r"temporal_cross_attn\.proj_out\.norm\.(weight|bias)", r"pts.norm.\1"),
    (r"temporal_cross_attn\.proj_out\.out_layers\.2\.(weight|bias)", r"pts.out.\1"),
    (r"textTransEncoder\.layers\.(\d+)\.(.+)", r"prompts.encoder.layers.\1.\2"),
    (r"text_ln\.(weight|bias)", r"prompts.norm.\1"),
    (r"text_proj\.0\.(weight|bias)", r"prompts.pool_proj.\1"),
    (r"clip_text\.(token_embedding\.weight|positional_embedding|ln_final\.(?:weight|bias))", r"prompts.clip.\1"),
    (r"clip_text\.(transformer\.resblocks\.\d+\..+)", r"prompts.clip.\1"),
)
# Released keys dropped on purpose (after a shape check): unused by the text branch.
CLIP_UNUSED = re.compile(r"clip_text\.(visual\..+|text_projection|logit_scale)")


# Globals a released checkpoint may hold besides tensors (the training loop saves numpy's RandomState
# of its data generator and may save argparse args): constructors of plain data, safe to allow.
_SAFE_GLOBALS = re.compile(
    r"numpy\.(_?core\.multiarray\.(_reconstruct|scalar)|ndarray|dtype|dtypes\.\w+DType"
    r"|random\._pickle\.__\w+_ctor|random\._(mt19937\.MT19937|pcg64\.PCG64(DXSM)?|philox\.Philox|sfc64\.SFC64)"
    r"|random\.mtrand\.RandomState)|collections\.OrderedDict|argparse\.Namespace")


def _resolve_global(name: str):
    import importlib
    import warnings

    module, _, attr = name.rpartition(".")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy.core -> numpy._core in numpy 2
        return getattr(importlib.import_module(module), attr)


def _torch_load_released(path: Path):
    """torch.load with weights_only=True, allowing only the plain-data globals in _SAFE_GLOBALS."""
    import pickle

    allowed: dict[str, object] = {}
    names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    for _ in range(64):
        unsafe = [name for name in names if not _SAFE_GLOBALS.fullmatch(name)]
        if unsafe:
            raise FinePoseError(f"{path}: the checkpoint pickles objects other than tensors and plain data "
                                f"({unsafe}); refusing to unpickle them. Re-save only checkpoint['model_pos'] with "
                                "torch.save in a trusted environment and import that file")
        allowed.update({name: _resolve_global(name) for name in names})
        try:
            with torch.serialization.safe_globals([(obj, name) for name, obj in allowed.items()]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:  # a global only met while unpickling (e.g. numpy dtype classes)
            found = re.search(r"but got <class '([\w.]+)'>|Unsupported global: GLOBAL ([\w.]+)", str(exc))
            if not found or (found.group(1) or found.group(2)) in allowed:
                raise
            names = [found.group(1) or found.group(2)]
    raise FinePoseError(f"{path}: too many pickled globals to allow one by one")


def load_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """``checkpoint['model_pos']`` of a released checkpoint (plain tensors).

    Read with ``torch.load(weights_only=True)``; the numpy RandomState and arrays the
    released training loop stores beside the weights are allowed, nothing else.
    """
    path = Path(path)
    if not path.is_file():
        raise FinePoseError(f"{path}: released checkpoint not found")
    try:
        ckpt = _torch_load_released(path)
    except FinePoseError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise FinePoseError(f"{path}: cannot read it with torch.load(weights_only=True) ({exc})") from exc
    if not isinstance(ckpt, Mapping) or "model_pos" not in ckpt:
        keys = list(ckpt)[:10] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise FinePoseError(f"{path}: not a released FinePOSE checkpoint (no 'model_pos'; top level: {keys})")
    state = ckpt["model_pos"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FinePoseError(f"{path}: 'model_pos' is not a state dict of tensors")
    return dict(state)


def _our_name(key: str) -> str | None:
    for pattern, repl in NAME_RULES:
        if re.fullmatch(pattern, key):
            if repl == "<ctx>":
                return f"prompts.ctx.{CONTEXT_NAMES[key]}" if key in CONTEXT_NAMES else None
            return re.sub(pattern, repl, key)
    return None


def official_to_ours(key: str) -> str | None:
    """Our state-dict name for a released one, or None for a key that has no counterpart.

    ``key`` as in the released ``model_pos`` (``module.pose_estimator.STEblocks.0.attn.qkv.weight``)
    or without the ``module.`` / ``pose_estimator.`` prefixes. None: the 12 diffusion buffers
    (recomputed by finepose.diffusion), CLIP's vision tower, text_projection and logit_scale
    (unused by the text branch), and any name the rules (``NAME_RULES``) do not know.
    The map is one-to-one over the released keys that do map::

        official_to_ours("module.pose_estimator.STEblocks.3.mlp.fc1.bias")  # 'spatial_blocks.3.mlp.fc1.bias'
        official_to_ours("ctx_verb")                                         # 'prompts.ctx.action'
    """
    key = key[len("module."):] if key.startswith("module.") else key
    key = key[len(_PE):] if key.startswith(_PE) else key
    if key in DIFFUSION_BUFFERS or CLIP_UNUSED.fullmatch(key):
        return None
    return _our_name(key)


def official_name_map(keys) -> dict[str, str | None]:
    """``{released key: official_to_ours(key)}`` for every key of a released state dict (or key list)."""
    return {k: official_to_ours(k) for k in keys}


CLIP_PREFIX = "prompts.clip."


def clip_text_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a CLIP text tower's weights, independent of where they were stored.

    ``tensors``: the text tower's state dict (``token_embedding.weight``, ``positional_embedding``,
    ``transformer.resblocks.*``, ``ln_final.*``), or any state dict holding it under
    ``prompts.clip.`` (ours). Hashed: each name, shape and float32 little-endian bytes, in name
    order. The same digest from another state dict (e.g. open_clip's OpenAI ViT-B/32 text tower,
    ``finepose.model.clip_text.pretrained_text_state``) means the same weights.
    """
    import hashlib

    import numpy as np

    tower = {k[len(CLIP_PREFIX):]: v for k, v in tensors.items() if k.startswith(CLIP_PREFIX)} or dict(tensors)
    digest = hashlib.sha256()
    for name in sorted(tower):
        value = tower[name].detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
        digest.update(f"{name}:{tuple(value.shape)}\n".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def released_settings(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(diffusion, eval) settings of the released code, as stored in an imported checkpoint.

    Diffusion: the cosine schedule (s = 0.008) over T = the length of the released buffers,
    scale 1, clamp 1.1 (official_code_notes: inputs clamped to +-1.1 * scale). Sampling: DDIM
    with eta 1, H = 20 hypotheses, M = 10 steps and test-time flip (paper Sec. 4, as D3DP).
    """
    betas = state.get("betas", state.get("module.betas"))
    timesteps = int(betas.shape[0]) if betas is not None else 1000
    return ({"timesteps": timesteps, "cosine_s": 0.008, "scale": 1.0, "clamp": 1.1},
            {"hypotheses": 20, "steps": 10, "eta": 1.0, "flip": True})


def infer_config(state: Mapping[str, torch.Tensor], dataset: str) -> ModelConfig:
    """ModelConfig of a released state dict (``pose_estimator.*`` keys, ``module.`` stripped)."""
    if dataset not in DATASETS:
        raise FinePoseError(f"--dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    need = [f"{_PE}Spatial_patch_to_embedding.weight", f"{_PE}Spatial_pos_embed", f"{_PE}Temporal_pos_embed",
            f"{_PE}STEblocks.0.mlp.fc1.weight"]
    missing = [k for k in need if k not in state]
    if missing:
        raise FinePoseError(f"released state dict lacks {missing}; is this a FinePOSE checkpoint?")
    width = int(state[f"{_PE}Spatial_patch_to_embedding.weight"].shape[0])
    depth = len({m.group(1) for k in state if (m := re.match(rf"{re.escape(_PE)}STEblocks\.(\d+)\.", k))})
    has_action = f"{_PE}ctx_verb" in state
    layout = DATASETS[dataset]
    if has_action != (layout == "h36m"):
        raise FinePoseError(f"--dataset {dataset}: the checkpoint {'has' if has_action else 'lacks'} the action "
                            f"context (ctx_verb), so it is {'an H36M' if has_action else 'a 3DHP'} model; "
                            "pass the matching --dataset")
    return ModelConfig(
        width=width, depth=depth, heads=8,  # the release hard-codes 8 heads
        mlp_ratio=state[f"{_PE}STEblocks.0.mlp.fc1.weight"].shape[0] / width,
        frames=int(state[f"{_PE}Temporal_pos_embed"].shape[1]), joints=int(state[f"{_PE}Spatial_pos_embed"].shape[1]),
        drop_path=0.1, prompt="fine", add_pooled=True, fpc=True, pts=True, compat_official=True,
        prompt_layout=layout, actions=list(H36M_ACTIONS) if layout == "h36m" else [],
        clip_model="ViT-B-32", clip_pretrained="openai", allow_random_clip=False, clip_seed=0)


def _expected_clip_unused() -> dict[str, tuple[int, ...]]:
    """Shapes of the CLIP ViT-B/32 keys the text branch does not use (built on the meta device)."""
    import open_clip

    cfg = open_clip.get_model_config("ViT-B-32")
    with torch.device("meta"):
        clip = open_clip.CLIP(**cfg, quick_gelu=True)
    return {f"{_PE}clip_text.{k}": tuple(v.shape) for k, v in clip.state_dict().items()
            if CLIP_UNUSED.fullmatch(f"clip_text.{k}")}


def convert_official(state_dict: Mapping[str, torch.Tensor], dataset: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Map a released ``model_pos`` state dict onto ours: (ModelConfig with compat_official, our state dict).

    Raises FinePoseError listing every released key that maps nowhere, every key of our
    model left without a source, and every shape that differs.
    """
    from finepose.diffusion import cosine_beta_schedule, schedule_buffers
    from finepose.model.denoiser import build_model

    state = {}
    for key, value in state_dict.items():
        if not key.startswith("module."):
            raise FinePoseError(f"released key {key!r} lacks the 'module.' prefix of the nn.DataParallel state dict")
        state[key[len("module."):]] = value
    cfg = infer_config(state, dataset)
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in build_model(cfg, load_clip=False).state_dict().items()}

    out: dict[str, torch.Tensor] = {}
    unmapped, bad_shape, dropped, off_schedule = [], [], [], []
    unused_shapes = _expected_clip_unused()
    expected_buffers = schedule_buffers(cosine_beta_schedule(1000))
    for key, value in state.items():
        if key in DIFFUSION_BUFFERS:
            if value.dtype != torch.float64 or value.ndim != 1:
                bad_shape.append(f"{key}: {tuple(value.shape)} {value.dtype} (expected 1-D float64)")
            elif value.shape == expected_buffers[key].shape and not torch.allclose(
                    value, expected_buffers[key], rtol=1e-6, atol=1e-9, equal_nan=True):
                off_schedule.append(key)
            dropped.append(key)
            continue
        if not key.startswith(_PE):
            unmapped.append(key)
            continue
        if CLIP_UNUSED.fullmatch(key[len(_PE):]):
            if unused_shapes.get(key) != tuple(value.shape):
                bad_shape.append(f"{key}: {tuple(value.shape)} (CLIP ViT-B/32 has {unused_shapes.get(key)})")
            dropped.append(key)
            continue
        name = _our_name(key[len(_PE):])
        if name is None or name not in ours:
            unmapped.append(key)
            continue
        if tuple(value.shape) != ours[name]:
            bad_shape.append(f"{key} -> {name}: {tuple(value.shape)} != {ours[name]}")
            continue
        out[name] = value.detach().to(torch.float32).contiguous()
    if off_schedule:
        log.warning("released diffusion buffers %s differ from the cosine schedule (T=1000, s=0.008) that "
                    "finepose.diffusion recomputes; sampling will use finepose.diffusion's", off_schedule)
    missing_unused = sorted(set(unused_shapes) - set(state))
    missing_ours = sorted(set(ours) - set(out))
    missing_buffers = sorted(set(DIFFUSION_BUFFERS) - set(state))
    problems = []
    if unmapped:
        problems.append(f"{len(unmapped)} released key(s) map to nothing: {unmapped}")
    if bad_shape:
        problems.append(f"{len(bad_shape)} shape mismatch(es): {bad_shape}")
    if missing_ours:
        problems.append(f"{len(missing_ours)} of our key(s) have no released source: {missing_ours}")
    if missing_unused or missing_buffers:
        problems.append(f"released key(s) missing: {['module.' + k for k in missing_buffers + missing_unused]}")
    if problems:
        raise FinePoseError("cannot convert the released checkpoint: " + "; ".join(problems))
    log.info("mapped %d released keys onto ours, dropped %d (diffusion buffers, CLIP vision/projection)",
             len(out), len(dropped))
    return cfg, out


def import_official(ckpt_path: str | Path, dataset: str, out_path: str | Path) -> dict[str, Any]:
    """Convert ``ckpt_path`` and write our checkpoint to ``out_path``; returns a JSON-able report."""
    from finepose.model.checkpoint import save_checkpoint
    from finepose.model.denoiser import build_model

    state = load_official_state_dict(ckpt_path)
    cfg, ours = convert_official(state, dataset)
    with torch.device("meta"):
        model = build_model(cfg, load_clip=False)
    model.load_state_dict(ours, strict=True, assign=True)
    # The release pickles whatever CLIP its training loop loaded; record what this file holds
    # (a digest comparable with any text tower's, see clip_text_sha256), not a claim of "openai".
    clip_sha = clip_text_sha256(ours)
    model.clip_weights = f"from checkpoint sha256:{clip_sha}"
    digest = sha256_file(ckpt_path)
    diffusion, sampling = released_settings(state)
    extra = {"variant": "finepose", "dataset": "h36m" if dataset == "h36m" else "mpi_inf_3dhp",
             "joint_set": "h36m17" if dataset == "h36m" else "mpi_inf_3dhp17",
             "diffusion": diffusion, "eval": sampling, "clip_sha256": clip_sha,
             "official_import": {"source": str(ckpt_path), "sha256": digest, "dataset": dataset,
                                 "keys_mapped": len(ours), "keys_in_release": len(state),
                                 "clip_text_sha256": clip_sha}}
    save_checkpoint(out_path, model, extra)
    log.info("imported %s: CLIP text tower sha256 %s; joint set %s (sampling flips as released); "
             "diffusion %s; eval %s", ckpt_path, clip_sha, extra["joint_set"], diffusion, sampling)
    return {"out": str(out_path), "model_config": cfg.to_dict(), "diffusion": diffusion, "eval": sampling,
            "clip_weights": model.clip_weights, **extra["official_import"]}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="the released checkpoint (.bin/.pth with 'model_pos')")
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS),
                        help="which released model it is: h36m (7 prompt segments) or 3dhp (6, no action)")
    parser.add_argument("--out", required=True, type=Path, help="our checkpoint to write (atomically)")


def run(args: argparse.Namespace) -> int:
    report = import_official(args.checkpoint, args.dataset, args.out)
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0
