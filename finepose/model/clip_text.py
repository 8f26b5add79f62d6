"""The frozen CLIP text tower E_tx of the FPP branch, and where its weights come from.

FinePOSE uses OpenAI's CLIP ViT-B/32; only its text transformer is needed (token
embedding, positional embedding, 12 causal residual blocks with QuickGELU, final
LayerNorm). :class:`CLIPTextTower` is that tower with exactly the OpenAI / open_clip
parameter names (``token_embedding.weight``, ``positional_embedding``,
``transformer.resblocks.N.{ln_1,attn.in_proj_*,attn.out_proj,ln_2,mlp.c_fc,mlp.c_proj}``,
``ln_final``), run with fused causal attention. It never holds the vision tower.

Weights (``ModelConfig.clip_pretrained``), via open_clip:

- ``"openai"``: ``open_clip.create_model(clip_model, pretrained="openai")`` — the hub
  cache, or a download when online. Recorded as ``"openai"``.
- a local file path that open_clip can load (a full CLIP state dict). Recorded as the path.
- ``"none"``: the same architecture with random weights, seeded by ``clip_seed``
  (open_clip's own initialisation). Recorded as ``"random"``, with a loud warning.

A failed load is an error explaining both ways out, unless ``allow_random_clip`` is
true, in which case the random tower is built and the warning says why.
``clip_model="test-tiny"`` is a small random tower (width 32, 2 layers, the real
49408-token vocabulary and 77-token context) that tests use to stay fast.
"""
from __future__ import annotations

import functools
import logging
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finepose.io import FinePoseError

log = logging.getLogger(__name__)

# A small CLIP-like text tower for tests: real tokenizer and context, tiny width and depth.
TEST_TINY = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2, "mlp_ratio": 4.0}
_TOKENIZER_MODEL = "ViT-B-32"  # every supported tower uses CLIP's BPE vocabulary of 49408 tokens
CLIP_LN_EPS = 1e-5


def text_architecture(clip_model: str) -> dict[str, Any]:
    """Text-tower sizes of ``clip_model``: context_length, vocab_size, width, heads, layers, mlp_ratio."""
    if clip_model == "test-tiny":
        return dict(TEST_TINY)
    import open_clip

    cfg = open_clip.get_model_config(clip_model)
    if cfg is None:
        raise FinePoseError(f"model config: clip_model {clip_model!r} is not an open_clip model name "
                            f"(e.g. 'ViT-B-32') nor 'test-tiny'")
    text = cfg["text_cfg"]
    unsupported = [k for k in ("hf_model_name", "embed_cls", "no_causal_mask", "ls_init_value") if text.get(k)]
    if unsupported or text.get("pool_type", "argmax") != "argmax":
        raise FinePoseError(f"model config: clip_model {clip_model!r} has a text tower this model does not "
                            f"support ({unsupported or text.get('pool_type')}); use 'ViT-B-32'")
    return {"context_length": int(text.get("context_length", 77)), "vocab_size": int(text.get("vocab_size", 49408)),
            "width": int(text["width"]), "heads": int(text["heads"]), "layers": int(text["layers"]),
            "mlp_ratio": float(text.get("mlp_ratio", 4.0))}


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    """CLIP's BPE tokenizer (77 tokens, <start_of_text> 49406, <end_of_text> 49407, 0-padded)."""
    import open_clip

    return open_clip.get_tokenizer(_TOKENIZER_MODEL)


@functools.lru_cache(maxsize=4096)
def tokenize(text: str) -> tuple[int, ...]:
    """Token ids of one text, as ``clip.tokenize(text, truncate=True)[0]`` (77 ids)."""
    return tuple(int(i) for i in clip_tokenizer()([text])[0].tolist())


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _CausalSelfAttention(nn.Module):
    """nn.MultiheadAttention's parameters (in_proj_weight/bias, out_proj), fused causal SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (n, heads, L, d)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))


class _CLIPMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = _QuickGELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class _CLIPBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=CLIP_LN_EPS)
        self.attn = _CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=CLIP_LN_EPS)
        self.mlp = _CLIPMlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _CLIPTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.resblocks = nn.ModuleList(_CLIPBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class CLIPTextTower(nn.Module):
    """CLIP's text transformer without the output projection (frozen in FinePOSE).

    ``embed(ids)``: (P, L) token ids -> (P, L, width) token embeddings.
    ``forward(x)``: (P, L, width) input embeddings (token embeddings and/or learnable
    context vectors), L <= context_length -> ln_final(transformer(x + pos[:L])), causal.
    """

    def __init__(self, context_length: int, vocab_size: int, width: int, heads: int, layers: int,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.context_length, self.width = context_length, width
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(context_length, width))
        self.transformer = _CLIPTransformer(width, layers, heads, mlp_ratio)
        self.ln_final = nn.LayerNorm(width, eps=CLIP_LN_EPS)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        if length > self.context_length:
            raise ValueError(f"prompt of {length} tokens exceeds CLIP's context of {self.context_length}")
        x = x + self.positional_embedding[:length].to(x.dtype)
        return self.ln_final(self.transformer(x))


def build_text_tower(clip_model: str) -> CLIPTextTower:
    """An uninitialised-weights tower of ``clip_model``'s text architecture (fill it with load_text_weights)."""
    return CLIPTextTower(**text_architecture(clip_model))


# --------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------
def _text_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keep = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.")
    return {k: v for k, v in state.items() if k.startswith(keep)}


def random_text_state(clip_model: str, seed: int) -> dict[str, torch.Tensor]:
    """open_clip's initialisation of the text tower, seeded; the global RNG is left untouched."""
    from open_clip.transformer import QuickGELU, TextTransformer

    arch = text_architecture(clip_model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower = TextTransformer(output_dim=None, act_layer=QuickGELU, **arch)
    return _text_keys(tower.state_dict())


def pretrained_text_state(clip_model: str, pretrained: str) -> dict[str, torch.Tensor]:
    """Text-tower weights through open_clip (OpenAI tag or a local file); the vision tower is dropped."""
    import open_clip

    if clip_model == "test-tiny":
        raise FileNotFoundError("clip_model 'test-tiny' has no pretrained weights (it is a random test tower)")
    log.info("loading CLIP %s weights %r through open_clip (hub cache, download or file)", clip_model, pretrained)
    model = open_clip.create_model(clip_model, pretrained=pretrained, force_quick_gelu=True, require_pretrained=True)
    state = _text_keys(model.state_dict())
    del model  # the vision tower goes with it
    return state


def load_text_weights(tower: CLIPTextTower, clip_model: str, pretrained: str, allow_random: bool,
                      seed: int) -> str:
    """Fill ``tower`` with CLIP weights; return the label recorded everywhere ("openai", the path, "random").

    The weights are assigned (``load_state_dict(assign=True)``), so ``tower`` may live on the meta
    device; its parameters keep requires_grad False.
    """
    reason = None
    if pretrained == "none":
        reason = "clip_pretrained is 'none'"
    else:
        try:
            tower.load_state_dict(pretrained_text_state(clip_model, pretrained), assign=True)
            return pretrained
        except Exception as exc:  # noqa: BLE001 - any failure to get the weights is handled below
            if not allow_random:
                raise FinePoseError(
                    f"cannot load the CLIP {clip_model} text weights {pretrained!r}: {exc}. Either make the real "
                    "weights available (open_clip's 'openai' weights in the Hugging Face hub cache, e.g. "
                    "timm/vit_base_patch32_clip_224.openai, or a local CLIP state-dict file given as "
                    "model.clip_pretrained), or accept seeded random CLIP weights with model.clip_pretrained: none "
                    "or model.allow_random_clip: true (results are then recorded as clip_weights 'random' and "
                    "are not comparable with the paper)") from exc
            reason = f"loading {pretrained!r} failed ({exc}) and allow_random_clip is true"
    message = (f"RANDOM CLIP WEIGHTS: the frozen CLIP {clip_model} text tower has seeded random weights "
               f"(clip_seed {seed}) because {reason}. Text prompts carry no language meaning; results are "
               "recorded as clip_weights 'random' and are not comparable with the paper.")
    log.warning("!" * 20 + " " + message + " " + "!" * 20)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    tower.load_state_dict(random_text_state(clip_model, seed), assign=True)
    return "random"
