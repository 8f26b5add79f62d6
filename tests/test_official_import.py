"""The released checkpoint's import (key map, shapes, errors) and the compat_official computation.

The synthetic released checkpoint has exactly the keys, shapes and dtypes listed in
../shared/reference/finepose_state_dict_keys.json (values: a distinct constant per key, so
a mis-mapped tensor is caught). The compat computation is checked against a literal,
unoptimised transcription of the released forward pass (explicit concatenation of the 2D
input per hypothesis, repeated time embeddings, tiled prompt keys, einsum attention),
written here from the facts of the release (finepose/docs/official_import.md).
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from finepose.cli import main as cli_main
from finepose.io import FinePoseError
from finepose.model import ModelConfig, build_model, load_checkpoint
from finepose.model.clip_text import tokenize
from finepose.model.official import (clip_text_sha256, convert_official, load_official_state_dict, official_name_map,
                                     official_to_ours)

KEYS_JSON = Path(__file__).resolve().parents[2] / "shared" / "reference" / "finepose_state_dict_keys.json"
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@pytest.fixture(scope="module")
def released_keys() -> list[dict]:
    if not KEYS_JSON.is_file():
        pytest.skip(f"shared data: {KEYS_JSON} is absent (the reference key list; present in CI)")
    return json.loads(KEYS_JSON.read_text())


def _fill(i: int) -> float:
    return float(i % 997) / 997.0 - 0.5


def synthetic_release(entries: list[dict]) -> dict[str, torch.Tensor]:
    """A 'model_pos' with the exact keys, shapes and dtypes; key i holds the constant _fill(i)."""
    return {e["key"]: torch.full(e["shape"], _fill(i), dtype=_DTYPES[e["dtype"]]) for i, e in enumerate(entries)}


def _save_release(state: dict[str, torch.Tensor], path: Path) -> Path:
    """Saved as the released training loop does: numpy RandomState and optimizer state beside the weights."""
    import numpy as np

    torch.save({"epoch": 80, "lr": 1e-5, "random_state": np.random.RandomState(1234),
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]},
                "model_pos": state}, path)
    return path


class _Payload:
    def __reduce__(self):
        import os

        return (os.getcwd, ())


def test_released_file_is_read_without_unpickling_code(tmp_path):
    state = {"module.betas": torch.zeros(1000, dtype=torch.float64)}
    assert load_official_state_dict(_save_release(state, tmp_path / "ok.bin")).keys() == state.keys()
    torch.save({"model_pos": state, "hook": _Payload()}, tmp_path / "code.bin")
    with pytest.raises(FinePoseError, match=r"getcwd.*refusing"):
        load_official_state_dict(tmp_path / "code.bin")


# --------------------------------------------------------------------------------------
# Key mapping
# --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_import_official_maps_every_key(released_keys, tmp_path):
    state = synthetic_release(released_keys)
    src = _save_release(state, tmp_path / "released.bin")
    out = tmp_path / "ours.pt"
    assert cli_main(["import-official", str(src), "--dataset", "h36m", "--out", str(out)]) == 0
    ckpt = torch.load(out, weights_only=True)  # plain tensors and values only
    cfg = ckpt["model_config"]
    assert cfg["compat_official"] is True and cfg["prompt_layout"] == "h36m"
    assert (cfg["width"], cfg["depth"], cfg["frames"], cfg["joints"]) == (512, 8, 243, 17)
    assert ckpt["variant"] == "finepose" and ckpt["joint_set"] == "h36m17"
    ours = ckpt["state_dict"]
    # what was loaded, not a claim: the digest of the CLIP text tensors the file holds
    assert ckpt["clip_weights"] == f"from checkpoint sha256:{clip_text_sha256(ours)}"
    assert ckpt["clip_sha256"] == ckpt["official_import"]["clip_text_sha256"] == clip_text_sha256(ours)
    # the released diffusion and sampling settings are stored, and used when the checkpoint is loaded
    assert ckpt["diffusion"] == {"timesteps": 1000, "cosine_s": 0.008, "scale": 1.0, "clamp": 1.1}
    assert ckpt["eval"] == {"hypotheses": 20, "steps": 10, "eta": 1.0, "flip": True}
    fill = {e["key"]: _fill(i) for i, e in enumerate(released_keys)}
    pe = "module.pose_estimator."
    expect = {
        "joint_embed.weight": pe + "Spatial_patch_to_embedding.weight",
        "spatial_pos": pe + "Spatial_pos_embed",
        "temporal_pos": pe + "Temporal_pos_embed",
        "prompts.ctx.person": pe + "ctx_subject",
        "prompts.ctx.action": pe + "ctx_verb",
        "prompts.ctx.leg": pe + "ctx_leg",
        "time_embed.fc2.bias": pe + "time_mlp.3.bias",
        "spatial_blocks.7.attn.qkv.weight": pe + "STEblocks.7.attn.qkv.weight",
        "temporal_blocks.3.mlp.fc1.bias": pe + "TTEblocks.3.mlp.fc1.bias",
        "head_norm.weight": pe + "head.0.weight",
        "head.weight": pe + "head.1.weight",
        "fpc.text_norm.bias": pe + "temporal_cross_attn.text_norm.bias",
        "pts.emb_proj.weight": pe + "temporal_cross_attn.proj_out.emb_layers.1.weight",
        "pts.out.weight": pe + "temporal_cross_attn.proj_out.out_layers.2.weight",
        "prompts.encoder.layers.2.self_attn.in_proj_weight": pe + "textTransEncoder.layers.2.self_attn.in_proj_weight",
        "prompts.norm.weight": pe + "text_ln.weight",
        "prompts.pool_proj.bias": pe + "text_proj.0.bias",
        "prompts.clip.token_embedding.weight": pe + "clip_text.token_embedding.weight",
        "prompts.clip.transformer.resblocks.11.mlp.c_proj.weight": pe + "clip_text.transformer.resblocks.11.mlp.c_proj.weight",
        "prompts.clip.ln_final.bias": pe + "clip_text.ln_final.bias",
    }
    for name, src_key in expect.items():
        assert torch.all(ours[name] == fill[src_key]), name
    # every value of ours comes from exactly one released tensor: all fills are distinct per key
    released_text = {k for k in fill if k.startswith(pe) and ".visual." not in k
                     and not k.endswith(("text_projection", "logit_scale"))}
    assert len(ours) == len(released_text)
    assert not any("visual" in k for k in ours)
    model, _ = load_checkpoint(out)
    assert model.config.compat_official and not model.training and model.clip_weights == ckpt["clip_weights"]
    assert model.joint_set == "h36m17"    # sample() flips with it by default
    assert not any(p.requires_grad for p in model.prompts.clip.parameters())
    assert not any(p.requires_grad for p in model.prompts.ctx.parameters())  # released: never trained


@pytest.mark.slow
def test_import_rejects_unknown_and_missing_keys(released_keys, tmp_path):
    state = synthetic_release(released_keys)
    extra = dict(state)
    extra["module.pose_estimator.mystery_layer.weight"] = torch.zeros(3)
    with pytest.raises(FinePoseError, match=r"map to nothing.*mystery_layer"):
        convert_official(extra, "h36m")
    missing = dict(state)
    del missing["module.pose_estimator.STEblocks.3.attn.qkv.bias"]
    del missing["module.pose_estimator.clip_text.visual.ln_post.bias"]
    with pytest.raises(FinePoseError) as err:
        convert_official(missing, "h36m")
    assert "spatial_blocks.3.attn.qkv.bias" in str(err.value)
    assert "clip_text.visual.ln_post.bias" in str(err.value)
    wrong = dict(state)
    wrong["module.pose_estimator.head.1.weight"] = torch.zeros(4, 512)
    with pytest.raises(FinePoseError, match=r"shape mismatch.*head\.1\.weight"):
        convert_official(wrong, "h36m")
    with pytest.raises(FinePoseError, match="3DHP|3dhp"):
        convert_official(state, "3dhp")
    nomodule = {k.removeprefix("module."): v for k, v in list(state.items())[:3]}
    with pytest.raises(FinePoseError, match="module."):
        convert_official(nomodule, "h36m")
    path = tmp_path / "not_released.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(FinePoseError, match="model_pos"):
        load_official_state_dict(path)


@pytest.mark.slow
def test_import_3dhp_layout(released_keys):
    state = synthetic_release(released_keys)
    pe = "module.pose_estimator."
    del state[pe + "ctx_verb"]
    for name, n in {"subject": 5, "speed": 8, "head": 8, "body": 8, "arm": 12, "leg": 12}.items():
        state[pe + f"ctx_{name}"] = torch.zeros(n, 512)
    cfg, ours = convert_official(state, "3dhp")
    assert cfg.prompt_layout == "3dhp" and cfg.compat_official and cfg.actions == []
    assert ours["prompts.ctx.person"].shape == (5, 512) and "prompts.ctx.action" not in ours
    with pytest.raises(FinePoseError, match="3DHP model"):
        convert_official(state, "h36m")


# --------------------------------------------------------------------------------------
# The released computation, transcribed literally, vs. our compat_official model
# --------------------------------------------------------------------------------------
def _mhsa(x, qkv, proj, heads):
    n, length, c = x.shape
    q, k, v = qkv(x).reshape(n, length, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
    return proj((attn @ v).transpose(1, 2).reshape(n, length, c))


def _block(blk, x, heads):
    x = x + _mhsa(blk.norm1(x), blk.attn.qkv, blk.attn.proj, heads)
    return x + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(x))))


def _clip_text(tower, x):
    length, width = x.shape[1], x.shape[2]
    heads = tower.transformer.resblocks[0].attn.heads
    x = x + tower.positional_embedding[:length]
    mask = torch.full((length, length), float("-inf")).triu(1)
    for blk in tower.transformer.resblocks:
        h = blk.ln_1(x)
        q, k, v = F.linear(h, blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (z.reshape(z.shape[0], length, heads, -1).transpose(1, 2) for z in (q, k, v))
        a = (q @ k.transpose(-2, -1) / math.sqrt(width // heads) + mask).softmax(-1)
        x = x + blk.attn.out_proj((a @ v).transpose(1, 2).reshape(x.shape))
        h = blk.mlp.c_fc(blk.ln_2(x))
        x = x + blk.mlp.c_proj(h * torch.sigmoid(1.702 * h))
    return tower.ln_final(x)


def released_forward(model, y, x2d, t, actions, fixed=False):
    """The released eval-mode forward: y (b, h, f, n, 3), x2d (b, f, n, 2), t (b,), one action per clip.

    fixed=True applies our three fixes instead (pooled at the action segment's end-of-text,
    clip i attends to its own prompt); the context-vector gradient is not visible in a forward.
    """
    p = model.prompts
    heads = model.config.heads
    b, h, f, n, _ = y.shape
    dim = model.config.width
    emb = p.clip.token_embedding
    act_ids = torch.tensor([tokenize(a) for a in actions])                         # (b, 77)
    pre = emb(torch.tensor([tokenize(s) for s in ["A person", "speed", "head", "body", "arm", "leg"]]))
    act = emb(act_ids)
    ctx = p.ctx
    x = torch.cat([
        torch.cat([ctx["person"].expand(b, -1, -1), pre[0, :4].expand(b, -1, -1)], 1),
        torch.cat([ctx["action"].expand(b, -1, -1), act[:, :4]], 1),
        *[torch.cat([ctx[s].expand(b, -1, -1), pre[i, :4].expand(b, -1, -1)], 1)
          for i, s in enumerate(["speed", "head", "body", "arm", "leg"], start=1)],
    ], dim=1)                                                                        # (b, 77, Dt)
    xf_out = p.norm(p.encoder(_clip_text(p.clip, x)))
    eot = act_ids.argmax(dim=-1)
    where = 7 + 8 + eot.clamp(max=3) if fixed else eot
    xf_proj = p.pool_proj(xf_out[torch.arange(b), where])                           # (b, D)

    x = torch.cat((x2d[:, None].repeat(1, h, 1, 1, 1), y), dim=-1).reshape(b * h * f, n, 5)
    x = model.joint_embed(x) + model.spatial_pos
    half = dim // 2
    freqs = torch.exp(torch.arange(half) * -(math.log(10000) / (half - 1)))
    sin = t[:, None] * freqs[None]
    te = model.time_embed.fc2(F.gelu(model.time_embed.fc1(torch.cat((sin.sin(), sin.cos()), -1))))
    te = (te + xf_proj)[:, None, None, None, :].repeat(1, h, f, n, 1).reshape(b * h * f, n, dim)
    x = x + te
    x = model.spatial_norm(_block(model.spatial_blocks[0], x, heads))
    x = x.reshape(b * h, f, n, dim).permute(0, 2, 1, 3).reshape(b * h * n, f, dim)  # (b h n) f c
    rows = b * h * n
    fpc, pts = model.fpc, model.pts
    q = fpc.query(fpc.norm(x)).view(rows, f, heads, -1)
    key, value = fpc.key(fpc.text_norm(xf_out)), fpc.value(fpc.text_norm(xf_out))  # (b, 77, D)
    tile = (lambda z: z.repeat_interleave(rows // b, 0)) if fixed else (lambda z: z.repeat(rows // b, 1, 1))
    key, value = tile(key).view(rows, 77, heads, -1), tile(value).view(rows, 77, heads, -1)
    weight = (torch.einsum("bnhd,bmhd->bnmh", q, key) / math.sqrt(dim // heads)).softmax(dim=2)
    z = torch.einsum("bnmh,bmhd->bnhd", weight, value).reshape(rows, f, dim)
    style = pts.emb_proj(F.silu(te.view(rows, f, dim)))[:, 0:1, :]
    scale, shift = style.chunk(2, dim=2)
    x = x + pts.out(F.silu(pts.norm(z) * (1 + scale) + shift))
    x = x + model.temporal_pos
    x = model.temporal_norm(_block(model.temporal_blocks[0], x, heads))
    x = x.reshape(b * h, n, f, dim).permute(0, 2, 1, 3)
    for i in range(1, model.config.depth):
        x = model.spatial_norm(_block(model.spatial_blocks[i], x.reshape(b * h * f, n, dim), heads))
        x = x.reshape(b * h, f, n, dim).permute(0, 2, 1, 3).reshape(b * h * n, f, dim)
        x = model.temporal_norm(_block(model.temporal_blocks[i], x, heads))
        x = x.reshape(b * h, n, f, dim).permute(0, 2, 1, 3)
    return model.head(model.head_norm(x)).reshape(b, h, f, n, 3)


def _tiny(compat: bool):
    cfg = ModelConfig(width=32, depth=2, heads=4, frames=9, joints=17, drop_path=0.0, clip_model="test-tiny",
                      clip_pretrained="none", compat_official=compat)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = build_model(cfg).eval()
    with torch.no_grad():  # non-trivial PTS output layer and positional embeddings
        for prm in (model.pts.out.weight, model.pts.out.bias, model.spatial_pos, model.temporal_pos):
            prm.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("compat", [True, False], ids=["compat_official", "fixed"])
def test_denoiser_matches_released_computation(compat):
    model = _tiny(compat)
    gen = torch.Generator().manual_seed(1)
    b, h = 3, 2
    actions = ["Directions", "WalkDog", "SittingDown"]  # end-of-text at 2, 3 and cut off (4)
    y = torch.randn(b, h, 9, 17, 3, generator=gen)
    x2d = torch.randn(b, 9, 17, 2, generator=gen)
    t = torch.tensor([999, 500, 3])
    with torch.no_grad():
        ref = released_forward(model, y, x2d, t, actions, fixed=not compat)
        ours = model(y.reshape(b * h, 9, 17, 3), x2d, t, model.encode_prompts(actions)).reshape(b, h, 9, 17, 3)
        ours5 = model(y, x2d, t.repeat_interleave(h), actions)
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.allclose(ours5, ours, atol=1e-6)
    if compat:  # the released tiling really differs from the fixed computation
        fixed = released_forward(model, y, x2d, t, actions, fixed=True)
        assert (fixed - ref).abs().max() > 1e-4


# --------------------------------------------------------------------------------------
# The import API: name map, CLIP digest, stored settings, flip from the joint set, action names
# --------------------------------------------------------------------------------------
def test_official_name_map_is_public_and_one_to_one(released_keys):
    keys = [e["key"] for e in released_keys]
    names = official_name_map(keys)
    assert official_to_ours("module.pose_estimator.STEblocks.3.mlp.fc1.bias") == "spatial_blocks.3.mlp.fc1.bias"
    assert official_to_ours("pose_estimator.TTEblocks.0.attn.proj.weight") == "temporal_blocks.0.attn.proj.weight"
    assert official_to_ours("ctx_verb") == "prompts.ctx.action"
    assert official_to_ours("module.pose_estimator.temporal_cross_attn.proj_out.out_layers.2.bias") == "pts.out.bias"
    assert official_to_ours("module.betas") is None                                # recomputed diffusion buffer
    assert official_to_ours("module.pose_estimator.clip_text.visual.conv1.weight") is None   # unused vision tower
    assert official_to_ours("module.pose_estimator.mystery.weight") is None
    mapped = [v for v in names.values() if v is not None]
    assert len(mapped) == len(set(mapped))                                          # one-to-one
    with torch.device("meta"):
        ours = build_model(ModelConfig(compat_official=True, clip_pretrained="none", allow_random_clip=True),
                           load_clip=False).state_dict()
    assert set(mapped) == set(ours)                                                 # and onto our model
    # the map is what the converter uses
    state = synthetic_release(released_keys)
    _, converted = convert_official(state, "h36m")
    for key, name in names.items():
        if name is not None:
            assert torch.equal(converted[name], state[key].float()), key


def test_clip_digest_names_the_weights_not_the_storage():
    tower = {"token_embedding.weight": torch.arange(12.0).reshape(4, 3), "ln_final.bias": torch.ones(3)}
    ours = {f"prompts.clip.{k}": v.double() for k, v in tower.items()} | {"head.weight": torch.zeros(2)}
    assert clip_text_sha256(tower) == clip_text_sha256(ours)           # prefix, dtype, other keys: irrelevant
    changed = dict(tower, **{"ln_final.bias": torch.tensor([1.0, 1.0, 1.0 + 1e-6])})
    assert clip_text_sha256(changed) != clip_text_sha256(tower)


def _tiny_checkpoint(tmp_path, **extra) -> Path:
    from finepose.model import save_checkpoint

    path = tmp_path / "tiny.pt"
    save_checkpoint(path, _tiny(True), extra)
    return path


def test_sample_flips_as_released_from_the_checkpoints_joint_set(tmp_path, caplog):
    import logging

    from finepose.diffusion import GaussianDiffusion
    from finepose.model import sample
    from finepose.skeleton import get_joint_set

    model, _ = load_checkpoint(_tiny_checkpoint(tmp_path, joint_set="h36m17"))
    diffusion = GaussianDiffusion()
    x2d = torch.randn(2, 9, 17, 2, generator=torch.Generator().manual_seed(0))

    def run(**kw):
        return sample(model, diffusion, x2d, ["Walking", "Eating"], hypotheses=2, steps=2,
                      generator=torch.Generator().manual_seed(1), **kw)

    perm = get_joint_set("h36m17").flip_permutation
    default, explicit, off = run(), run(flip_permutation=perm), run(flip=False)
    assert torch.equal(default, explicit)                      # the released flip, without being asked
    assert (default - off).abs().max() > 1e-4
    bare = _tiny(True)                                         # no checkpoint, no joint set: said so
    with caplog.at_level(logging.INFO, logger="finepose.model.sampling"):
        sample(bare, diffusion, x2d, ["Walking", "Eating"], hypotheses=1, steps=1)
    assert "WITHOUT test-time flip" in caplog.text
    with pytest.raises(FinePoseError, match="no joint_set"):
        sample(bare, diffusion, x2d, ["Walking", "Eating"], hypotheses=1, steps=1, flip=True)


def test_imported_diffusion_settings_are_used(tmp_path):
    from finepose.evaluate import load_model
    from finepose.model import diffusion_settings

    path = _tiny_checkpoint(tmp_path, joint_set="h36m17",
                            diffusion={"timesteps": 500, "cosine_s": 0.008, "scale": 1.0, "clamp": 1.3})
    _, diffusion, ckpt = load_model(path, torch.device("cpu"))
    assert diffusion_settings(ckpt)["timesteps"] == 500
    assert diffusion.num_timesteps == 500 and diffusion.clamp == 1.3


def test_take_names_are_read_by_their_first_word():
    from finepose.model import resolve_action

    assert resolve_action("Directions 1", ["Directions", "Eating"]) == "Directions"
    assert resolve_action("Eating", ["Directions", "Eating"]) == "Eating"
    assert resolve_action("Anything 2", []) == "Anything 2"
    with pytest.raises(FinePoseError, match=r"first word.*'Juggling'"):
        resolve_action("Juggling 1", ["Directions", "Eating"])
    model = _tiny(True)
    with torch.no_grad():
        a = model.encode_prompts(["Directions 1", "SittingDown 2"])
        b = model.encode_prompts(["Directions", "SittingDown"])
    assert a.keys == b.keys == ("Directions", "SittingDown")
    assert torch.equal(a.pooled, b.pooled) and torch.equal(a.tokens, b.tokens)
