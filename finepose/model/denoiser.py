"""The FinePOSE denoiser D(Y_t, X, t, P) -> Y0_hat (Section 3.2) on a MixSTE backbone.

Data flow, shapes per clip batch (B clips, H hypotheses, N = B*H rows clip-major,
F frames, J joints, D = width):

    Z_t = Linear(Concat(X, Y_t)) + E_spatial + (F(t) + P[L])          (N, F, J, D)
        the 2D half of the Linear is computed once per clip, the 3D half per row
    spatial block 0 (MHSA over joints), spatial LayerNorm                -> Z_t^s
    FPC: cross-attention of Z_t^s to the prompt tokens P                 -> Z_t^sp
    PTS: Z_t^s + Linear(SiLU(LN(Z_t^sp) * (1 + scale(v)) + shift(v))),  v = P[L] + F(t)
    + E_temporal, temporal block 0 (MHSA over frames), temporal LayerNorm
    depth-1 more (spatial block, spatial LN, temporal block, temporal LN) pairs
    head: LayerNorm + Linear(D, 3)                                       (N, F, J, 3)

F(t) is the timestep embedding: sinusoid(D) -> Linear(D, 2D) -> GELU -> Linear(2D, D).
Blocks are pre-norm (MHSA with qkv bias, MLP ratio 2, GELU), drop path linear from 0
to ``drop_path``; block and backbone LayerNorms use eps 1e-6, the head, FPC, PTS and
text LayerNorms PyTorch's default 1e-5 (as released). All attention is
``finepose.model.perf.attention``: ``scaled_dot_product_attention`` on CUDA, its plain
matmul-softmax-matmul form on CPU (faster there at these short sequences; same math).

Layer names follow the paper; ``finepose.model.official`` maps the released names
(``STEblocks``, ``temporal_cross_attn`` ...) onto them.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from finepose.io import FinePoseError
from finepose.model.clip_text import load_text_weights
from finepose.model.config import ModelConfig, variant_of
from finepose.model.perf import attention
from finepose.model.prompts import PartAwarePrompts, PromptEncoding

BACKBONE_LN_EPS = 1e-6


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch of whole rows (dim 0) in training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (bias) and fused SDPA."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v)  # (n, heads, L, d)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + MHSA(LN(x)); x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BACKBONE_LN_EPS)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=BACKBONE_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class TimestepEmbedding(nn.Module):
    """F(t): sinusoidal embedding of t, then Linear(D, 2D), GELU, Linear(2D, D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * dim, dim)

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
        angles = t.float()[:, None] * freqs[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)  # (N, D)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.sinusoid(t))))


class PromptPoseCommunication(nn.Module):
    """FPC cross-attention, equations (5a)-(5b): Q = W_Q LN(Z_t^s), K = W_K LN(P), V = W_V LN(P).

    Every (frame, joint) token of a clip attends to the L prompt tokens of that clip's
    prompt; queries of a clip's hypotheses, joints and frames are one long query sequence
    against its prompt's keys, so nothing is repeated per hypothesis or joint.
    ``compat_official`` reproduces fault 2 of the release: with rows r = n*J + j of the
    (N*J, F) layout, row r attends to the prompt of clip (r mod B).
    """

    def __init__(self, dim: int, text_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.text_norm = nn.LayerNorm(text_dim)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(text_dim, dim)
        self.value = nn.Linear(text_dim, dim)

    def forward(self, z: torch.Tensor, prompts: PromptEncoding, compat_official: bool = False) -> torch.Tensor:
        n, joints, frames, dim = z.shape  # (N, J, F, D)
        b = prompts.clips
        d = dim // self.heads
        text = self.text_norm(prompts.tokens)                          # (P, L, Dt)
        k = self.key(text)[prompts.index]                              # (B, L, D)
        v = self.value(text)[prompts.index]
        q = self.query(self.norm(z))                                   # (N, J, F, D)
        if compat_official:
            q = q.reshape(n * joints // b, b, frames, dim).transpose(0, 1)  # rows r -> clip r mod B
        q = q.reshape(b, -1, self.heads, d).transpose(1, 2)            # (B, heads, S, d)
        k = k.view(b, -1, self.heads, d).transpose(1, 2)               # (B, heads, L, d)
        v = v.view(b, -1, self.heads, d).transpose(1, 2)
        out = attention(q, k, v).transpose(1, 2)  # (B, S, heads, d)
        if compat_official:
            out = out.reshape(b, n * joints // b, frames, dim).transpose(0, 1)
        return out.reshape(n, joints, frames, dim)


class TimestepStylization(nn.Module):
    """PTS (after MotionDiffuse's stylization): Linear(SiLU(LN(h) * (1 + w(v)) + b(v))), v = P[L] + F(t).

    ``emb_proj`` is phi followed by the two projections psi_w, psi_b (one Linear to 2D,
    applied to SiLU(v)); ``out`` is zero-initialised so the block starts as the identity
    of its residual connection.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.emb_proj = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # h: (N, ..., D); v: (N, D)
        scale, shift = self.emb_proj(F.silu(v)).chunk(2, dim=-1)
        shape = (v.shape[0],) + (1,) * (h.ndim - 2) + (h.shape[-1],)
        h = self.norm(h) * (1 + scale.view(shape)) + shift.view(shape)
        return self.out(F.silu(h))


class FinePOSE(nn.Module):
    """The denoiser with its prompt branch. See finepose.model for the variant switches.

    ``model(y_t, x2d, t, prompts) -> y0_hat``:
      y_t: (N, F, J, 3) noisy 3D poses (or (B, H, F, J, 3)), N = B*H rows clip-major;
      x2d: (B, F, J, 2) screen-normalised 2D keypoints, one per clip (not repeated per hypothesis);
      t: (N,) or (B,) timesteps (long), or an int;
      prompts: a PromptEncoding from ``encode_prompts`` (compute it once per batch or
        sampling call), a list of B action names (encoded on the spot), or None for
        variants without a prompt.
    Returns Y0_hat with the shape of y_t.
    """

    def __init__(self, cfg: ModelConfig, load_clip: bool = True):
        super().__init__()
        self.config = cfg
        dim = cfg.width
        self.joint_embed = nn.Linear(5, dim)  # Concat(X (2), Y_t (3)) per joint -> D
        self.spatial_pos = nn.Parameter(torch.zeros(1, cfg.joints, dim))
        self.temporal_pos = nn.Parameter(torch.zeros(1, cfg.frames, dim))
        self.time_embed = TimestepEmbedding(dim)
        rates = [cfg.drop_path * i / (cfg.depth - 1) if cfg.depth > 1 else 0.0 for i in range(cfg.depth)]
        self.spatial_blocks = nn.ModuleList(Block(dim, cfg.heads, cfg.mlp_ratio, r) for r in rates)
        self.temporal_blocks = nn.ModuleList(Block(dim, cfg.heads, cfg.mlp_ratio, r) for r in rates)
        self.spatial_norm = nn.LayerNorm(dim, eps=BACKBONE_LN_EPS)
        self.temporal_norm = nn.LayerNorm(dim, eps=BACKBONE_LN_EPS)
        self.head_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)
        self.prompts = PartAwarePrompts(cfg, clip_on_meta=load_clip) if cfg.uses_text else None
        text_dim = self.prompts.clip.width if self.prompts is not None else dim
        self.fpc = PromptPoseCommunication(dim, text_dim, cfg.heads) if cfg.fpc else None
        self.pts = TimestepStylization(dim) if cfg.pts else None
        self.fpc_out = None
        if cfg.fpc and not cfg.pts:  # w/o PTS: a plain (zero-initialised) output projection of Z_t^sp
            self.fpc_out = nn.Linear(dim, dim)
            nn.init.zeros_(self.fpc_out.weight)
            nn.init.zeros_(self.fpc_out.bias)
        if self.prompts is None:
            self.clip_weights = "unused"
        elif load_clip:
            self.clip_weights = load_text_weights(self.prompts.clip, cfg.clip_model, cfg.clip_pretrained,
                                                  cfg.allow_random_clip, cfg.clip_seed)
        else:
            self.clip_weights = "unloaded"  # filled by load_state_dict (load_checkpoint sets the label)

    @property
    def variant(self) -> str | None:
        return variant_of(self.config)

    # ---- prompts --------------------------------------------------------------------
    def encode_prompts(self, actions: Sequence[str]) -> PromptEncoding | None:
        """Run the prompt branch once per distinct action; None for variants without a prompt."""
        if self.prompts is None:
            return None
        return self.prompts(list(actions))

    def _prompts_for(self, prompts, clips: int) -> PromptEncoding | None:
        if self.prompts is None:
            return None
        if prompts is None:
            raise FinePoseError(f"variant {self.variant or self.config.prompt!r} needs prompts: pass "
                                "model.encode_prompts(actions) or a list of action names")
        if not isinstance(prompts, PromptEncoding):
            prompts = self.encode_prompts(prompts)
        if prompts.clips != clips:
            raise FinePoseError(f"prompts are for {prompts.clips} clips but x2d has {clips}; encode one action "
                                "per clip (x2d row), not per hypothesis")
        return prompts

    # ---- the denoiser -----------------------------------------------------------------
    def forward(self, y_t: torch.Tensor, x2d: torch.Tensor, t: torch.Tensor | int,
                prompts: PromptEncoding | Sequence[str] | None = None) -> torch.Tensor:
        cfg = self.config
        out_shape = y_t.shape
        if y_t.ndim == 5:
            y_t = y_t.reshape(-1, *y_t.shape[2:])
        n, frames, joints, _ = y_t.shape
        b = x2d.shape[0]
        if n % b or x2d.shape[1:] != (frames, joints, 2) or y_t.shape[-1] != 3:
            raise ValueError(f"y_t {tuple(out_shape)} and x2d {tuple(x2d.shape)} do not match: expected "
                             "y_t (B*H, F, J, 3) and x2d (B, F, J, 2)")
        if frames != cfg.frames or joints != cfg.joints:
            raise ValueError(f"model is for {cfg.frames} frames x {cfg.joints} joints, got {frames} x {joints}")
        hyp = n // b
        enc = self._prompts_for(prompts, b)
        t = torch.as_tensor(t, device=y_t.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(n)
        elif t.numel() == b and hyp > 1:
            t = t.repeat_interleave(hyp)
        elif t.numel() != n:
            raise ValueError(f"t must have N={n} or B={b} entries, got {t.numel()}")

        # conditioning: v = F(t) (+ P[L]), one vector per row
        time = self.time_embed(t)                                            # (N, D)
        v = time
        if enc is not None:
            v = time + enc.pooled[enc.index].repeat_interleave(hyp, dim=0).to(time.dtype)
        cond = v if cfg.add_pooled else time

        # Z_t = Linear(Concat(X, Y_t)) + E_s + cond; the 2D half once per clip
        w, bias = self.joint_embed.weight, self.joint_embed.bias
        e2d = F.linear(x2d, w[:, :2], bias)                                 # (B, F, J, D)
        e3d = F.linear(y_t, w[:, 2:])                                       # (N, F, J, D)
        dim = e3d.shape[-1]
        z = (e3d.view(b, hyp, frames, joints, dim) + e2d.unsqueeze(1)).view(n, frames, joints, dim)
        z = z + self.spatial_pos + cond[:, None, None, :]

        # spatial block 0 -> Z_t^s, then FPC (+ PTS) in the (N, J, F, D) layout
        z = self._spatial(0, z).transpose(1, 2).contiguous()               # (N, J, F, D)
        if self.fpc is not None or self.pts is not None:
            h = self.fpc(z, enc, cfg.compat_official) if self.fpc is not None else z
            z = z + (self.pts(h, v) if self.pts is not None else self.fpc_out(h))
        z = z + self.temporal_pos
        z = self._temporal(0, z)
        for i in range(1, cfg.depth):
            z = self._spatial(i, z.transpose(1, 2).contiguous()).transpose(1, 2).contiguous()
            z = self._temporal(i, z)
        out = self.head(self.head_norm(z)).transpose(1, 2)                  # (N, F, J, 3)
        return out.reshape(out_shape)

    def _spatial(self, i: int, z: torch.Tensor) -> torch.Tensor:
        n, frames, joints, dim = z.shape  # MHSA over the joints of each frame
        return self.spatial_norm(self.spatial_blocks[i](z.view(n * frames, joints, dim))).view(z.shape)

    def _temporal(self, i: int, z: torch.Tensor) -> torch.Tensor:
        n, joints, frames, dim = z.shape  # MHSA over the frames of each joint
        return self.temporal_norm(self.temporal_blocks[i](z.view(n * joints, frames, dim))).view(z.shape)


def build_model(cfg: ModelConfig, *, load_clip: bool = True) -> FinePOSE:
    """The FinePOSE denoiser for ``cfg``; ``load_clip=False`` skips the CLIP weights (filled by a checkpoint)."""
    if isinstance(cfg, dict):
        cfg = ModelConfig.from_dict(cfg)
    return FinePOSE(cfg, load_clip=load_clip)
