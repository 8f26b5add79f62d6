"""FinePOSE denoiser: MixSTE backbone + FPP / FPC / PTS, CLIP text tower, variants, checkpoints.

Usage::

    from finepose.model import ModelConfig, build_model, load_checkpoint, save_checkpoint, VARIANTS
    model = build_model(ModelConfig().with_variant("finepose"))
    enc = model.encode_prompts(actions)      # once per batch / per sampling call; (B,) clips
    y0_hat = model(y_t, x2d, t, enc)         # y_t (B*H, F, J, 3), x2d (B, F, J, 2), t (B*H,) or (B,)
    model, ckpt = load_checkpoint(path)      # eval mode; the plain API for equivalence checks
    diffusion = diffusion_of(ckpt)           # the checkpoint's diffusion settings (imported: the released ones)
    x0 = sample(model, diffusion, x2d, actions, hypotheses=H, steps=M,
                noise=noise, step_noise=step_noise)   # (M, B, H, F, J, 3), prompts encoded once
    # test-time flip as released: on by default, from the checkpoint's joint set (flip=False: off)
    resolve_action("Directions 1", model.config.actions)   # -> "Directions": names are read by their first word
    with cpu_kernels(device): ...            # faster float32 kernels on CPU (finepose.model.perf)

Pass the 2D input and the actions once per clip (B rows), not repeated per hypothesis:
the model broadcasts them, and compat_official's prompt tiling (clip i mod B) is defined
over clips.

Switches (``ModelConfig``) and what each removes, in the paper's terms (Section 3.2):

- ``prompt``: what FPP builds. ``fine`` = the FPP block: 7 part-aware segments (person,
  action class, speed, head, body, arm, leg), each learnable context + the first 4
  CLIP tokens of its text (MPI-INF-3DHP: 6 segments, no action). ``none`` removes FPP:
  no text, no learnable prompt, no CLIP tower at all. The other values are the designs
  of Table 4, in place of FPP (see ``finepose.model.prompts``).
- ``add_pooled``: the pooled prompt P[L] is added to the input, Z_t = Concat(Y_t, X) +
  P[L] + F(t). Off: Z_t = Concat(Y_t, X) + F(t).
- ``fpc``: the FPC cross-attention from the spatial features Z_t^s to the prompt tokens
  P (equations 5a-5b). Off: no cross-attention; P reaches the backbone only through
  P[L] (input and, with ``pts``, the stylization).
- ``pts``: the PTS stylization of the FPC output by v = P[L] + F(t) (v = F(t) when there
  is no prompt), added to Z_t^s as a residual. Off: the cross-attention output is added
  through a plain zero-initialised Linear instead.
- ``compat_official``: the released code's behaviour (faults 1-3: context vectors frozen,
  clip i attends to the prompt of clip i mod B, pooled token at the action's own
  end-of-text index), only for the full FinePOSE model; imported checkpoints set it.

Variants (``VARIANTS[name]`` = overrides of those switches), one per table row:

Table 4 (prompt designs; FPC and PTS kept, P[L] added to the input):
  - ``wo_prompt``  w/o Prompt = Table 5 Baseline: no text and no learnable prompt, hence
    no FPP, no FPC, no PTS (prompt none). The D3DP/MixSTE denoiser conditioned on X and t.
  - ``m_prompt``   M-Prompt: a manually written sentence per action class (e.g.
    "a person is pointing directions with hands" for Directions; the sentences are data in
    finepose/resources/manual_prompts.json) tokenised whole (77 tokens, no learnable
    vectors) instead of FPP; pooled at the sentence's end-of-text.
  - ``s_prompt``   S-Prompt: one segment, learnable context (8) + the action class tokens (4).
  - ``c_prompt``   C-Prompt: the person, action class and speed segments of FPP (29 tokens),
    no body-part segments.
  - ``al_prompt``  AL-Prompt: 77 learnable vectors, no text at all (the same prompt for every
    clip); pooled at the last token.
  - ``finepose``   FinePOSE: FPP + FPC + PTS.
Table 5 (which blocks are present; FPP is the fine prompt):
  - ``wo_prompt``  Baseline (as above).
  - ``w_fpp``      w FPP: FPP only; P[L] is added to the input, no FPC, no PTS.
  - ``wo_fpp``     w/o FPP: no prompt, so FPC is infeasible; only PTS, stylising the spatial
    features Z_t^s by the timestep alone (v = F(t)): Z_t^s + PTS(Z_t^s, F(t)).
  - ``wo_fpc``     w/o FPC: FPP + PTS, no cross-attention. PTS then stylises the spatial
    features Z_t^s (what the cross-attention output would have been computed from) by
    v = P[L] + F(t): Z_t^s + PTS(Z_t^s, v); P[L] is also added to the input.
  - ``wo_pts``     w/o PTS: FPP + FPC; the cross-attention output goes through a plain Linear
    (no LayerNorm, no scale/shift by v, no SiLU): Z_t^s + Linear(Z_t^sp).

Checkpoints: ``save_checkpoint(path, model, extra)`` / ``load_checkpoint(path, device)``
(see ``finepose.model.checkpoint``). The authors' release: ``finepose.model.official`` and
finepose/docs/official_import.md.
"""
from finepose.model.checkpoint import (MODEL_FORMAT, checkpoint_dict, diffusion_of, diffusion_settings, load_checkpoint,
                                       read_checkpoint, save_checkpoint)
from finepose.model.config import H36M_ACTIONS, PROMPT_KINDS, VARIANT_LABELS, VARIANTS, ModelConfig, variant_of
from finepose.model.denoiser import (FinePOSE, PromptPoseCommunication, TimestepEmbedding, TimestepStylization,
                                     build_model)
from finepose.model.prompts import PartAwarePrompts, PromptEncoding, manual_prompts, prompt_segments, resolve_action
from finepose.model.perf import cpu_kernels
from finepose.model.sampling import denoise_fn, flip_permutation_of, sample

__all__ = [
    "FinePOSE", "ModelConfig", "VARIANTS", "VARIANT_LABELS", "H36M_ACTIONS", "PROMPT_KINDS", "MODEL_FORMAT",
    "build_model", "save_checkpoint", "load_checkpoint", "read_checkpoint", "checkpoint_dict", "variant_of",
    "diffusion_settings", "diffusion_of", "flip_permutation_of",
    "PartAwarePrompts", "PromptEncoding", "PromptPoseCommunication", "TimestepStylization", "TimestepEmbedding",
    "manual_prompts", "prompt_segments", "resolve_action", "denoise_fn", "sample", "cpu_kernels",
]
