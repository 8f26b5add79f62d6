"""FPP: fine-grained part-aware prompt learning (FinePOSE Section 3.2, equations 4a-4b).

A prompt is K segments laid end to end in CLIP's 77-token context. Segment k of
length L_k is a learnable context r_k of shape (L_k - 4, D), N(0, 0.02) initialised,
followed by the first 4 CLIP token embeddings of its text (start-of-text, then the
text's BPE tokens, end-of-text, padding; the released code's ``x[:, :4]``):

    p_k = Concat(r_k, E_tok(text_k)[:4])                                      (4a, 4b)

The H36M layout is {person 7, action 12, speed 10, head 10, body 10, arm 14, leg 14}
= 77 with texts "A person", the action class name, "speed", "head", "body", "arm",
"leg" (as released). The MPI-INF-3DHP layout has no action text: {person 9, speed 12,
head 12, body 12, arm 16, leg 16} = 77. The prompt, plus CLIP's positional
embedding, goes through the frozen CLIP text transformer and ln_final (causal
attention), then a trainable 4-layer TransformerEncoder and a LayerNorm: those are
the prompt tokens P (L x D) that FPC attends to. The pooled prompt P[L] is a Linear
of one token of P:

- with an action segment: that segment's end-of-text token, i.e. position
  ``start(action) + (L_action - 4) + min(e, 3)``, where e is the index of
  <end_of_text> in the action's own tokenisation (e = 2 for one-token names like
  "Directions", 3 for "WalkDog"); a name of three or more BPE tokens
  ("SittingDown": e = 4) has its end-of-text cut by the 4-token window, and the
  segment's last kept token is used;
- manual sentences (M-Prompt): the sentence's end-of-text, as in CLIP;
- prompts without action text (3DHP layout, AL-Prompt): the last token (76), as released.

``compat_official`` reproduces the released code instead (faults 1 and 3 of the
README's "Faithful, and corrected"; finepose/docs/official_import.md): the CLIP
transformer runs under ``no_grad`` so the context vectors never receive a gradient
(they are then frozen, exactly as they stayed in the release), and the pooled token is read at position e of the whole 77-token sequence
(inside the person segment's context vectors). Fault 2 (which clip attends to which
prompt) is in :class:`finepose.model.denoiser.PromptPoseCommunication`.

The branch depends on the action only: :meth:`PartAwarePrompts.forward` runs CLIP and
the text encoder once per DISTINCT prompt in a batch and returns an index from clips
to prompt rows (:class:`PromptEncoding`).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from finepose.io import FinePoseError
from finepose.model.clip_text import build_text_tower, tokenize
from finepose.model.config import ModelConfig

N_TEXT_TOKENS = 4  # "the first four tokens are taken as representations" (Section 3.2)
EOT_TOKEN = 49407
ACTION = "<action>"   # segment text placeholder: the clip's action class name
MANUAL = "<manual>"   # segment text placeholder: the action's manual sentence (M-Prompt)
MANUAL_PROMPTS_RESOURCE = "manual_prompts.json"


@dataclass(frozen=True)
class Segment:
    """One prompt segment: ``length`` tokens = (length - n_text) context vectors + n_text text tokens."""

    name: str
    length: int
    text: str | None       # fixed text, ACTION, MANUAL, or None (context vectors only)
    n_text: int

    @property
    def n_ctx(self) -> int:
        return self.length - self.n_text


def _seg(name: str, length: int, text: str | None) -> Segment:
    return Segment(name, length, text, 0 if text is None else N_TEXT_TOKENS)


_FINE_H36M = (_seg("person", 7, "A person"), _seg("action", 12, ACTION), _seg("speed", 10, "speed"),
              _seg("head", 10, "head"), _seg("body", 10, "body"), _seg("arm", 14, "arm"), _seg("leg", 14, "leg"))
_FINE_3DHP = (_seg("person", 9, "A person"), _seg("speed", 12, "speed"), _seg("head", 12, "head"),
              _seg("body", 12, "body"), _seg("arm", 16, "arm"), _seg("leg", 16, "leg"))


def prompt_segments(prompt: str, layout: str) -> tuple[Segment, ...]:
    """The segments of each prompt kind (see finepose.model's docstring for the ablations)."""
    if prompt == "fine":
        return _FINE_H36M if layout == "h36m" else _FINE_3DHP
    if prompt == "coarse":       # C-Prompt: action class + "person" + "speed", with learnable context
        return _FINE_H36M[:3]
    if prompt == "single":       # S-Prompt: learnable context + action class
        return (_FINE_H36M[1],)
    if prompt == "learnable":    # AL-Prompt: learnable vectors only, no text
        return (_seg("learned", 77, None),)
    if prompt == "manual":       # M-Prompt: the whole tokenised sentence, no learnable vectors
        return (Segment("sentence", 77, MANUAL, 77),)
    raise FinePoseError(f"prompt {prompt!r} has no segments")


def resolve_action(name: str, vocabulary: Sequence[str]) -> str:
    """The vocabulary entry a clip's action name stands for.

    The rule of the released code: a name that is not in the vocabulary is read by its
    first word, so Human3.6M take names such as "Directions 1" or "SittingDown 2" prompt
    as "Directions" / "SittingDown". Any other name is refused, with the rule and the
    vocabulary in the message. An empty vocabulary accepts every name as it is.
    """
    if not vocabulary or name in vocabulary:
        return name
    words = str(name).split()
    if words and words[0] in vocabulary:
        return words[0]
    raise FinePoseError(f"action {name!r} is not in the model's action vocabulary ({', '.join(vocabulary)}); "
                        "a name outside it is read by its first word (\"Directions 1\" -> \"Directions\"), "
                        f"and {words[0] if words else name!r} is not in it either. Use one of these names "
                        "(for training: set model.actions to the dataset's actions)")


@functools.lru_cache(maxsize=1)
def manual_prompts() -> dict[str, str]:
    """Action name -> manual sentence (finepose/resources/manual_prompts.json)."""
    # the package folder of this module (see finepose.camera.load_h36m_cameras)
    text = (Path(__file__).resolve().parents[1] / "resources" / MANUAL_PROMPTS_RESOURCE).read_text("utf-8")
    return dict(json.loads(text)["prompts"])


@dataclass
class PromptEncoding:
    """The prompt branch's output for a batch of clips.

    tokens: (P, L, D_text) prompt tokens P (after the trainable encoder and LayerNorm);
    pooled: (P, width) pooled prompt P[L]; index: (B,) long, clip b uses row index[b];
    keys: the P distinct prompt keys (action names, or "" for action-free prompts).
    """

    tokens: torch.Tensor
    pooled: torch.Tensor
    index: torch.Tensor
    keys: tuple[str, ...]

    @property
    def clips(self) -> int:
        return int(self.index.shape[0])

    def to(self, device: torch.device | str) -> "PromptEncoding":
        return PromptEncoding(self.tokens.to(device), self.pooled.to(device), self.index.to(device), self.keys)


class PartAwarePrompts(nn.Module):
    """FPP: learnable part-aware prompts -> frozen CLIP text tower -> trainable text encoder.

    Parameters: ``ctx.<segment>`` (learnable context vectors), ``clip.*`` (frozen CLIP text
    tower, requires_grad False), ``encoder.*`` (4-layer TransformerEncoder, d = CLIP width,
    ff 4d, GELU, post-norm as nn.TransformerEncoderLayer), ``norm`` (LayerNorm), ``pool_proj``
    (Linear D_text -> width, gives P[L]).
    """

    def __init__(self, cfg: ModelConfig, clip_on_meta: bool = False):
        super().__init__()
        self.cfg = cfg
        self.segments = prompt_segments(cfg.prompt, cfg.prompt_layout)
        if clip_on_meta:  # weights are assigned right after (load_text_weights): skip a pointless init
            with torch.device("meta"):
                self.clip = build_text_tower(cfg.clip_model)
        else:
            self.clip = build_text_tower(cfg.clip_model)
        self.clip.requires_grad_(False)
        dim = self.clip.width
        self.length = sum(s.length for s in self.segments)
        if self.length > self.clip.context_length:
            raise FinePoseError(f"prompt of {self.length} tokens exceeds CLIP's context {self.clip.context_length}")
        if dim % cfg.heads:
            raise FinePoseError(f"model config: CLIP text width {dim} is not divisible by heads {cfg.heads}")
        self.ctx = nn.ParameterDict()
        for seg in self.segments:
            if seg.n_ctx > 0:
                self.ctx[seg.name] = nn.Parameter(torch.randn(seg.n_ctx, dim) * 0.02)
        if cfg.compat_official:  # released behaviour: the context never learns (fault 1)
            self.ctx.requires_grad_(False)
        layer = nn.TransformerEncoderLayer(d_model=dim, nhead=cfg.heads, dim_feedforward=4 * dim, dropout=0.0,
                                           activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.pool_proj = nn.Linear(dim, cfg.width)
        self.uses_action = any(s.text in (ACTION, MANUAL) for s in self.segments)

    # ---- what each prompt consists of ---------------------------------------------
    def prompt_key(self, action: str) -> str:
        """The key that identifies a clip's prompt: the action name, or "" when prompts ignore it."""
        if not self.uses_action:
            return ""
        action = resolve_action(action, self.cfg.actions)
        if any(s.text == MANUAL for s in self.segments) and action not in manual_prompts():
            raise FinePoseError(f"no manual prompt for action {action!r} in finepose/resources/"
                                f"{MANUAL_PROMPTS_RESOURCE}; add a sentence for it there")
        return action

    def _text(self, seg: Segment, key: str) -> str:
        if seg.text == ACTION:
            return key
        if seg.text == MANUAL:
            return manual_prompts()[key]
        return seg.text

    def pooled_position(self, key: str) -> int:
        """Index in the prompt of the token that P[L] is read from (see the module docstring)."""
        if self.cfg.compat_official and any(s.text == ACTION for s in self.segments):
            return _eot(tokenize(key))  # fault 3: argmax of the action's own tokens, as a whole-prompt index
        start = 0
        for seg in self.segments:
            if seg.text == MANUAL:
                return start + _eot(tokenize(self._text(seg, key)))
            if seg.text == ACTION:
                return start + seg.n_ctx + min(_eot(tokenize(key)), seg.n_text - 1)
            start += seg.length
        return self.length - 1

    def input_embeddings(self, keys: Sequence[str]) -> torch.Tensor:
        """(P, L, D) CLIP input for the distinct prompts ``keys``: context vectors + token embeddings."""
        device = self.clip.token_embedding.weight.device
        parts = []
        for seg in self.segments:
            if seg.n_ctx:
                parts.append(self.ctx[seg.name].unsqueeze(0).expand(len(keys), -1, -1))
            if seg.n_text:
                ids = torch.tensor([tokenize(self._text(seg, k))[: seg.n_text] for k in keys], device=device)
                parts.append(self.clip.embed(ids))
        return torch.cat(parts, dim=1)  # (P, L, D)

    # ---- the branch -------------------------------------------------------------------
    def forward(self, actions: Sequence[str]) -> PromptEncoding:
        """Encode the prompts of a batch of clips; the text branch runs once per distinct prompt."""
        if isinstance(actions, str):
            raise TypeError("actions must be a sequence of action names, one per clip, not a single string")
        keys_per_clip = [self.prompt_key(a) for a in actions]
        keys = tuple(dict.fromkeys(keys_per_clip))  # distinct, in order of first appearance
        row = {k: i for i, k in enumerate(keys)}
        device = self.clip.token_embedding.weight.device
        index = torch.tensor([row[k] for k in keys_per_clip], dtype=torch.long, device=device)
        x = self.input_embeddings(keys)
        if self.cfg.compat_official:
            with torch.no_grad():  # fault 1 of the release: no gradient reaches the context vectors
                x = self.clip(x)
        else:
            x = self.clip(x)       # frozen weights, but the gradient flows through to the context
        tokens = self.norm(self.encoder(x))  # (P, L, D)
        where = torch.tensor([self.pooled_position(k) for k in keys], dtype=torch.long, device=device)
        pooled = self.pool_proj(tokens[torch.arange(len(keys), device=device), where])  # (P, width)
        return PromptEncoding(tokens=tokens, pooled=pooled, index=index, keys=keys)


def _eot(ids: Sequence[int]) -> int:
    """Index of <end_of_text> (the argmax of CLIP token ids, as CLIP pools)."""
    return max(range(len(ids)), key=lambda i: ids[i])
