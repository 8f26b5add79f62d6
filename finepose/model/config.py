"""ModelConfig (every size and switch of the denoiser) and the named ablation variants.

A variant is data: ``VARIANTS[name]`` is a dict of ModelConfig overrides. The
meaning of each switch, and which row of the paper's Tables 4 and 5 each variant
reproduces, is documented in :mod:`finepose.model` (the package docstring).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from finepose.io import FinePoseError

# The 15 Human3.6M action classes, canonical spelling (CONTRACTS.md).
H36M_ACTIONS = (
    "Directions", "Discussion", "Eating", "Greeting", "Phoning", "Photo", "Posing", "Purchases",
    "Sitting", "SittingDown", "Smoking", "Waiting", "WalkDog", "Walking", "WalkTogether",
)

PROMPT_KINDS = ("none", "manual", "single", "coarse", "learnable", "fine")
PROMPT_LAYOUTS = ("h36m", "3dhp")
# Prompt kinds that need an action text (impossible with the 3DHP layout, which has none).
_ACTION_PROMPTS = ("manual", "single", "coarse")


@dataclass
class ModelConfig:
    """Sizes and switches of the FinePOSE denoiser. Defaults are the released H36M model.

    width, depth, heads, mlp_ratio: the MixSTE backbone (D = width; depth spatial and depth
        temporal blocks; MLP hidden = width * mlp_ratio).
    frames, joints: clip length N and joints J (sizes of the learned positional embeddings).
    drop_path: stochastic-depth rate of the last block (linear from 0), training only.
    prompt: which prompt the FPP branch builds (none | manual | single | coarse | learnable | fine).
    add_pooled: add the pooled prompt embedding P[L] to the input embedding Z_t.
    fpc: the prompt-pose cross-attention (FPC). pts: the timestep stylization (PTS).
    compat_official: reproduce the released code's behaviour exactly (faults 1-3 of the
        README's "Faithful, and corrected"; finepose/docs/official_import.md), for imported checkpoints.
    prompt_layout: "h36m" (7 segments with the action class) or "3dhp" (6 segments, no action).
    actions: the action vocabulary; prompts are refused for other names (empty: any name).
    clip_model: the frozen CLIP text tower's architecture, an open_clip model name
        ("ViT-B-32") or "test-tiny" (a small random tower for tests).
    clip_pretrained: "openai" (open_clip's OpenAI weights, hub cache or download), a local
        file open_clip can load, or "none" (seeded random weights, recorded as "random").
    allow_random_clip: fall back to seeded random CLIP weights (loudly) when loading fails.
    clip_seed: seed of the random CLIP weights.
    """

    width: int = 512
    depth: int = 8
    heads: int = 8
    mlp_ratio: float = 2.0
    frames: int = 243
    joints: int = 17
    drop_path: float = 0.1
    prompt: str = "fine"
    add_pooled: bool = True
    fpc: bool = True
    pts: bool = True
    compat_official: bool = False
    prompt_layout: str = "h36m"
    actions: list[str] = field(default_factory=lambda: list(H36M_ACTIONS))
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "openai"
    allow_random_clip: bool = False
    clip_seed: int = 0

    def __post_init__(self) -> None:
        self.actions = list(self.actions)
        self.validate()

    # ---- construction helpers -------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "model config") -> "ModelConfig":
        """Build from a mapping; unknown keys are an error that names them."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise FinePoseError(f"{source}: unknown ModelConfig field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (what checkpoints store under ``model_config``)."""
        return asdict(self)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def with_variant(self, name: str) -> "ModelConfig":
        """This config with the switches of variant ``name`` applied."""
        if name not in VARIANTS:
            raise FinePoseError(f"unknown variant {name!r}; variants: {', '.join(VARIANTS)}")
        return self.replace(**VARIANTS[name])

    @property
    def uses_text(self) -> bool:
        """True when the model has the prompt branch (FPP) and hence the CLIP text tower."""
        return self.prompt != "none"

    # ---- validation -----------------------------------------------------------------
    def validate(self) -> None:
        def bad(msg: str) -> FinePoseError:
            return FinePoseError(f"model config: {msg}")

        for name in ("width", "depth", "heads", "frames", "joints"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(f"{name} must be a positive integer, got {value!r}")
        if self.width % self.heads:
            raise bad(f"width {self.width} is not divisible by heads {self.heads}")
        if self.width % 2:
            raise bad(f"width must be even (sinusoidal timestep embedding), got {self.width}")
        if not self.mlp_ratio > 0:
            raise bad(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if not 0.0 <= self.drop_path < 1.0:
            raise bad(f"drop_path must be in [0, 1), got {self.drop_path}")
        if self.prompt not in PROMPT_KINDS:
            raise bad(f"prompt must be one of {PROMPT_KINDS}, got {self.prompt!r}")
        if self.prompt_layout not in PROMPT_LAYOUTS:
            raise bad(f"prompt_layout must be one of {PROMPT_LAYOUTS}, got {self.prompt_layout!r}")
        for name in ("add_pooled", "fpc", "pts", "compat_official", "allow_random_clip"):
            if not isinstance(getattr(self, name), bool):
                raise bad(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.prompt == "none" and (self.add_pooled or self.fpc):
            raise bad("add_pooled and fpc need a prompt (prompt: none has no P to add or attend to; "
                      "Table 5: without FPP the FPC block is infeasible)")
        if self.prompt_layout == "3dhp" and self.prompt in _ACTION_PROMPTS:
            raise bad(f"prompt {self.prompt!r} needs an action text, but the 3dhp layout has none; "
                      "use prompt fine, learnable or none with prompt_layout 3dhp")
        if self.compat_official and not (self.prompt == "fine" and self.add_pooled and self.fpc and self.pts):
            raise bad("compat_official reproduces the released FinePOSE model only "
                      "(prompt fine, add_pooled, fpc and pts all true)")
        if not all(isinstance(a, str) and a for a in self.actions):
            raise bad(f"actions must be non-empty strings, got {self.actions!r}")
        if len(set(self.actions)) != len(self.actions):
            raise bad(f"actions has duplicates: {self.actions!r}")
        if not isinstance(self.clip_pretrained, str) or not self.clip_pretrained:
            raise bad(f"clip_pretrained must be 'openai', 'none' or a file path, got {self.clip_pretrained!r}")
        if not isinstance(self.clip_model, str) or not self.clip_model:
            raise bad(f"clip_model must be an open_clip model name or 'test-tiny', got {self.clip_model!r}")
        if not isinstance(self.clip_seed, int) or isinstance(self.clip_seed, bool):
            raise bad(f"clip_seed must be an integer, got {self.clip_seed!r}")

    def clip_source_kind(self) -> str:
        """'openai', 'none' or 'file' (clip_pretrained names a local file)."""
        if self.clip_pretrained in ("openai", "none"):
            return self.clip_pretrained
        return "file" if os.path.sep in self.clip_pretrained or os.path.exists(self.clip_pretrained) else "unknown"


# --------------------------------------------------------------------------------------
# Named variants: the rows of Tables 4 and 5 (see finepose.model's docstring)
# --------------------------------------------------------------------------------------
_FULL = {"add_pooled": True, "fpc": True, "pts": True}
VARIANTS: dict[str, dict[str, Any]] = {
    # Table 4 (designs of the prompt in FPP; FPC and PTS kept) and Table 5 "Baseline"
    "wo_prompt": {"prompt": "none", "add_pooled": False, "fpc": False, "pts": False},
    "m_prompt": {"prompt": "manual", **_FULL},
    "s_prompt": {"prompt": "single", **_FULL},
    "c_prompt": {"prompt": "coarse", **_FULL},
    "al_prompt": {"prompt": "learnable", **_FULL},
    "finepose": {"prompt": "fine", **_FULL},
    # Table 5 (which of FPP / FPC / PTS are present)
    "w_fpp": {"prompt": "fine", "add_pooled": True, "fpc": False, "pts": False},
    "wo_fpp": {"prompt": "none", "add_pooled": False, "fpc": False, "pts": True},
    "wo_fpc": {"prompt": "fine", "add_pooled": True, "fpc": False, "pts": True},
    "wo_pts": {"prompt": "fine", "add_pooled": True, "fpc": True, "pts": False},
}

# Paper row label of each variant (for tables and logs).
VARIANT_LABELS = {
    "wo_prompt": "w/o Prompt (Baseline)", "m_prompt": "M-Prompt", "s_prompt": "S-Prompt",
    "c_prompt": "C-Prompt", "al_prompt": "AL-Prompt", "finepose": "FinePOSE",
    "w_fpp": "w FPP", "wo_fpp": "w/o FPP", "wo_fpc": "w/o FPC", "wo_pts": "w/o PTS",
}


def variant_of(cfg: ModelConfig) -> str | None:
    """The variant whose switches ``cfg`` has (None when it matches none)."""
    for name, overrides in VARIANTS.items():
        if all(getattr(cfg, key) == value for key, value in overrides.items()):
            return name
    return None
