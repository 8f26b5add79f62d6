"""finepose.model: variants, prompt branch (fixes vs. compat), CLIP weights policy, checkpoints.

Tiny sizes throughout (width 32, depth 2, 9 frames, the 'test-tiny' CLIP text tower).
"""
from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch

from finepose.io import FinePoseError
from finepose.model import (VARIANTS, ModelConfig, PromptEncoding, build_model, load_checkpoint, manual_prompts,
                            sample, save_checkpoint)
from finepose.model.clip_text import tokenize

FRAMES, JOINTS = 9, 17
TINY = dict(width=32, depth=2, heads=4, frames=FRAMES, joints=JOINTS, drop_path=0.0, clip_model="test-tiny",
            clip_pretrained="none")


def tiny(variant: str = "finepose", seed: int = 0, **overrides) -> torch.nn.Module:
    cfg = ModelConfig(**{**TINY, **overrides}).with_variant(variant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the (tested) random-CLIP warning
        torch.manual_seed(seed)
        model = build_model(cfg)
    with torch.no_grad():  # make every block matter (the released init zeroes PTS's output layer)
        for module in (model.pts, model.fpc_out):
            if module is not None:
                for prm in (module.out if hasattr(module, "out") else module).parameters():
                    prm.normal_(0, 0.2)
        model.temporal_pos.normal_(0, 0.2)
    return model


def inputs(b: int, h: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(b * h, FRAMES, JOINTS, 3, generator=g)
    x2d = torch.randn(b, FRAMES, JOINTS, 2, generator=g)
    t = torch.randint(0, 1000, (b * h,), generator=g)
    return y, x2d, t


# --------------------------------------------------------------------------------------
# Shapes and variants
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_runs_forward_and_backward(variant):
    model = tiny(variant).train()
    y, x2d, t = inputs(3, 2)
    enc = model.encode_prompts(["Directions", "WalkDog", "Directions"])
    out = model(y, x2d, t, enc)
    assert out.shape == y.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert trainable and not no_grad, f"parameters without gradient: {no_grad}"
    cfg = model.config
    assert (enc is None) == (cfg.prompt == "none")
    assert (model.prompts is None) == (cfg.prompt == "none")
    assert (model.fpc is not None) == cfg.fpc and (model.pts is not None) == cfg.pts
    assert model.clip_weights == ("unused" if cfg.prompt == "none" else "random")
    assert model.variant == variant


def test_variant_switches_follow_the_paper():
    assert VARIANTS["wo_prompt"] == {"prompt": "none", "add_pooled": False, "fpc": False, "pts": False}
    assert VARIANTS["w_fpp"] == {"prompt": "fine", "add_pooled": True, "fpc": False, "pts": False}
    assert VARIANTS["wo_fpp"] == {"prompt": "none", "add_pooled": False, "fpc": False, "pts": True}
    assert VARIANTS["wo_fpc"]["fpc"] is False and VARIANTS["wo_fpc"]["pts"] is True
    assert VARIANTS["wo_pts"]["fpc"] is True and VARIANTS["wo_pts"]["pts"] is False
    for name in ("m_prompt", "s_prompt", "c_prompt", "al_prompt", "finepose"):  # Table 4 keeps FPC and PTS
        assert VARIANTS[name]["fpc"] and VARIANTS[name]["pts"] and VARIANTS[name]["add_pooled"]
    lengths = {name: tiny(name).prompts.length for name in ("m_prompt", "s_prompt", "c_prompt", "al_prompt")}
    assert lengths == {"m_prompt": 77, "s_prompt": 12, "c_prompt": 29, "al_prompt": 77}


def test_hypotheses_share_the_2d_input_and_timesteps_broadcast():
    model = tiny().eval()
    b, h = 2, 3
    y, x2d, _ = inputs(b, h)
    t_clip = torch.tensor([700, 20])
    actions = ["Eating", "Phoning"]
    with torch.no_grad():
        shared = model(y, x2d, t_clip, model.encode_prompts(actions))
        # the same computation with the 2D input, timesteps and prompts repeated per hypothesis
        repeated = model(y, x2d.repeat_interleave(h, 0), t_clip.repeat_interleave(h),
                         model.encode_prompts([a for a in actions for _ in range(h)]))
        five = model(y.view(b, h, FRAMES, JOINTS, 3), x2d, t_clip, actions)
        scalar = model(y, x2d, 700, actions)
    assert torch.allclose(shared, repeated, atol=1e-5)
    assert torch.allclose(five.reshape(shared.shape), shared, atol=1e-6)
    assert torch.allclose(scalar[:h], shared[:h], atol=1e-6)
    with pytest.raises(FinePoseError, match="per clip"):
        model(y, x2d, t_clip, model.encode_prompts(["Eating"] * (b * h)))
    with pytest.raises(ValueError, match="frames"):
        model(torch.zeros(2, FRAMES + 1, JOINTS, 3), torch.zeros(2, FRAMES + 1, JOINTS, 2), 5, actions)


def test_config_validation_names_the_problem():
    with pytest.raises(FinePoseError, match="infeasible"):
        ModelConfig(prompt="none", add_pooled=False, fpc=True)
    with pytest.raises(FinePoseError, match="3dhp layout has none"):
        ModelConfig(prompt="manual", prompt_layout="3dhp")
    with pytest.raises(FinePoseError, match="released FinePOSE model only"):
        ModelConfig(compat_official=True).with_variant("wo_pts")
    with pytest.raises(FinePoseError, match="not divisible"):
        ModelConfig(width=30, heads=4)
    with pytest.raises(FinePoseError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({"width": 32, "depht": 2})
    with pytest.raises(FinePoseError, match="unknown variant"):
        ModelConfig().with_variant("finepose_v2")


# --------------------------------------------------------------------------------------
# FPP: the fixes and compat_official
# --------------------------------------------------------------------------------------
def test_context_vectors_learn_when_fixed_and_not_in_compat():
    fixed = tiny("finepose").train()
    y, x2d, t = inputs(2, 1)
    fixed(y, x2d, t, ["Greeting", "Photo"]).square().mean().backward()
    for name, ctx in fixed.prompts.ctx.items():
        assert ctx.requires_grad and ctx.grad is not None and ctx.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in fixed.prompts.clip.parameters())  # CLIP itself stays frozen

    compat = tiny("finepose", compat_official=True).train()
    compat(y, x2d, t, ["Greeting", "Photo"]).square().mean().backward()
    assert all(not c.requires_grad and c.grad is None for c in compat.prompts.ctx.values())
    assert compat.prompts.encoder.layers[0].linear1.weight.grad is not None  # the text encoder still trains


def test_each_clip_attends_to_its_own_prompt():
    model = tiny().eval()
    y, x2d, t = inputs(3, 2)
    with torch.no_grad():
        a = model(y, x2d, t, ["Directions", "WalkDog", "Sitting"]).view(3, 2, FRAMES, JOINTS, 3)
        b = model(y, x2d, t, ["Directions", "Eating", "Sitting"]).view(3, 2, FRAMES, JOINTS, 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])  # clips 0 and 2 are untouched
    assert (a[1] - b[1]).abs().max() > 1e-4
    compat = tiny(compat_official=True).eval()
    with torch.no_grad():  # released fault 2: rows attend to the prompt of clip (row mod B)
        a = compat(y, x2d, t, ["Directions", "WalkDog", "Sitting"]).view(3, 2, FRAMES, JOINTS, 3)
        b = compat(y, x2d, t, ["Directions", "Eating", "Sitting"]).view(3, 2, FRAMES, JOINTS, 3)
    assert (a[0] - b[0]).abs().max() > 1e-4


def test_pooled_token_position():
    fine = tiny().prompts
    # action segment starts at 7 and holds 8 context vectors, then [SOT, tokens..., EOT] cut to 4
    assert [fine.pooled_position(a) for a in ("Directions", "WalkDog", "SittingDown")] == [17, 18, 18]
    assert tokenize("SittingDown").index(49407) == 4  # its end-of-text falls outside the 4 kept tokens
    compat = tiny(compat_official=True).prompts
    assert [compat.pooled_position(a) for a in ("Directions", "WalkDog", "SittingDown")] == [2, 3, 4]
    assert tiny(prompt_layout="3dhp", actions=[]).prompts.pooled_position("") == 76
    assert tiny("s_prompt").prompts.pooled_position("Directions") == 10
    assert tiny("c_prompt").prompts.pooled_position("WalkDog") == 18
    assert tiny("al_prompt").prompts.pooled_position("") == 76
    manual = tiny("m_prompt").prompts
    sentence = manual_prompts()["Directions"]
    assert sentence == "a person is pointing directions with hands"
    assert manual.pooled_position("Directions") == tokenize(sentence).index(49407)


def test_manual_prompts_cover_h36m_and_errors_name_the_fix():
    from finepose.model import H36M_ACTIONS

    assert set(H36M_ACTIONS) <= set(manual_prompts())
    assert {"tagging", "legoassemble", "fencing"} <= set(manual_prompts())
    model = tiny("m_prompt", actions=[])
    with pytest.raises(FinePoseError, match="manual_prompts.json"):
        model.encode_prompts(["Juggling"])
    with pytest.raises(FinePoseError, match="vocabulary"):
        tiny().encode_prompts(["Juggling"])


def test_3dhp_layout_has_one_prompt_for_every_clip():
    model = tiny(prompt_layout="3dhp", actions=[]).eval()
    assert [s.name for s in model.prompts.segments] == ["person", "speed", "head", "body", "arm", "leg"]
    assert [s.length for s in model.prompts.segments] == [9, 12, 12, 12, 16, 16]
    enc = model.encode_prompts(["Sitting", "none", "Sports"])
    assert enc.tokens.shape[0] == 1 and enc.index.tolist() == [0, 0, 0]
    y, x2d, t = inputs(3, 1)
    assert model(y, x2d, t, enc).shape == y.shape


def test_prompt_branch_runs_once_per_distinct_action_and_once_per_sampling_call():
    from finepose.diffusion import GaussianDiffusion

    model = tiny().eval()
    calls = []
    model.prompts.clip.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    enc = model.encode_prompts(["Walking", "Eating", "Walking", "Walking", "Eating"])
    assert calls == [2] and enc.index.tolist() == [0, 1, 0, 0, 1] and enc.keys == ("Walking", "Eating")
    calls.clear()
    diffusion = GaussianDiffusion(timesteps=1000)
    _, x2d, _ = inputs(2, 1)
    flip = list(range(JOINTS))
    flip[1:4], flip[4:7] = [4, 5, 6], [1, 2, 3]
    x0 = sample(model, diffusion, x2d, ["Walking", "Walking"], hypotheses=4, steps=3,
                flip_permutation=flip, generator=torch.Generator().manual_seed(0))
    assert x0.shape == (3, 2, 4, FRAMES, JOINTS, 3)
    assert calls == [1]  # one distinct action, one text-branch run for 3 steps x 2 flips x 4 hypotheses


def test_sampling_with_explicit_noise_is_reproducible():
    from finepose.diffusion import GaussianDiffusion

    model = tiny().eval()
    diffusion = GaussianDiffusion(timesteps=1000)
    _, x2d, _ = inputs(2, 1)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 3, FRAMES, JOINTS, 3, generator=g)
    step_noise = torch.randn(2, 2, 3, FRAMES, JOINTS, 3, generator=g)
    runs = [sample(model, diffusion, x2d, ["Posing", "Waiting"], hypotheses=3, steps=2, noise=noise,
                   step_noise=step_noise) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


# --------------------------------------------------------------------------------------
# CLIP weights: recorded, loud, never silently random
# --------------------------------------------------------------------------------------
def test_random_clip_is_recorded_and_loud(caplog):
    cfg = ModelConfig(**TINY)
    with caplog.at_level(logging.WARNING), pytest.warns(RuntimeWarning, match="RANDOM CLIP WEIGHTS"):
        model = build_model(cfg)
    assert model.clip_weights == "random"
    assert "RANDOM CLIP WEIGHTS" in caplog.text and "clip_pretrained is 'none'" in caplog.text
    with pytest.warns(RuntimeWarning):
        again = build_model(cfg)  # seeded: the same random tower every time, whatever the global RNG
    assert all(torch.equal(a, b) for a, b in zip(model.prompts.clip.state_dict().values(),
                                                   again.prompts.clip.state_dict().values()))


def test_failed_clip_load_is_an_error_unless_random_is_allowed(tmp_path, caplog):
    missing = str(tmp_path / "no_such_clip.pt")
    with pytest.raises(FinePoseError) as err:
        build_model(ModelConfig(**{**TINY, "clip_model": "ViT-B-32", "clip_pretrained": missing}))
    message = str(err.value)
    assert "clip_pretrained: none" in message and "allow_random_clip: true" in message and missing in message
    with caplog.at_level(logging.WARNING), pytest.warns(RuntimeWarning, match="allow_random_clip is true"):
        model = build_model(ModelConfig(**{**TINY, "clip_pretrained": missing, "allow_random_clip": True}))
    assert model.clip_weights == "random" and "RANDOM CLIP WEIGHTS" in caplog.text


def test_clip_weights_load_from_a_local_file_through_open_clip(tmp_path):
    import open_clip

    arch = {"embed_dim": 16, "quick_gelu": True,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (tmp_path / "finepose-test-clip.json").write_text(json.dumps(arch))
    open_clip.add_model_config(tmp_path / "finepose-test-clip.json")
    torch.manual_seed(5)
    clip = open_clip.create_model("finepose-test-clip", pretrained=None)
    weights = tmp_path / "clip_weights.pt"
    torch.save(clip.state_dict(), weights)
    model = build_model(ModelConfig(**{**TINY, "clip_model": "finepose-test-clip", "clip_pretrained": str(weights)}))
    assert model.clip_weights == str(weights)
    ours = model.prompts.clip.state_dict()
    for key, value in clip.state_dict().items():
        if key.startswith(("token_embedding", "positional_embedding", "transformer.", "ln_final")):
            assert torch.equal(ours[key], value), key
    assert not hasattr(model.prompts.clip, "visual")
    # the tower computes what open_clip's CLIP computes (before its final projection)
    ids = torch.tensor([tokenize("a person is walking")])
    with torch.no_grad():
        x = clip.token_embedding(ids) + clip.positional_embedding
        ref = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
        got = model.prompts.clip(model.prompts.clip.embed(ids))
    assert torch.allclose(got, ref, atol=1e-5)


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------
def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = tiny("wo_pts").eval()
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(path, model, {"dataset": "h36m", "joint_set": "h36m17", "epoch": 3,
                                  "history": [{"loss": 0.5}]})
    raw = torch.load(path, weights_only=True)
    assert raw["variant"] == "wo_pts" and raw["dataset"] == "h36m" and raw["joint_set"] == "h36m17"
    assert raw["clip_weights"] == "random" and raw["model_config"]["fpc"] is True and raw["epoch"] == 3
    assert not list(path.parent.glob(".*tmp"))  # atomic write left no temporary file
    loaded, ckpt = load_checkpoint(path)
    assert not loaded.training and loaded.clip_weights == "random" and ckpt["history"] == [{"loss": 0.5}]
    assert not any(p.requires_grad for p in loaded.prompts.clip.parameters())
    assert all(p.requires_grad for p in loaded.prompts.ctx.parameters())
    y, x2d, t = inputs(2, 2)
    with torch.no_grad():
        assert torch.equal(loaded(y, x2d, t, ["Smoking", "Purchases"]), model(y, x2d, t, ["Smoking", "Purchases"]))


def test_checkpoint_of_another_model_is_refused(tmp_path):
    model = tiny("finepose")
    path = tmp_path / "finepose.pt"
    save_checkpoint(path, model)
    with pytest.raises(FinePoseError, match=r"variant 'finepose'.*'wo_fpc' was requested"):
        load_checkpoint(path, variant="wo_fpc")
    other = ModelConfig(**TINY).with_variant("wo_fpc")
    with pytest.raises(FinePoseError) as err:
        load_checkpoint(path, config=other)
    assert "fpc: True != False" in str(err.value) and str(path) in str(err.value)
    model2, _ = load_checkpoint(path, config=model.config.replace(allow_random_clip=True), variant="finepose")
    assert model2.variant == "finepose"
    with pytest.raises(FinePoseError, match="extra may not set"):
        save_checkpoint(tmp_path / "x.pt", model, {"state_dict": {}})
    released = tmp_path / "released.bin"
    torch.save({"model_pos": {}}, released)
    with pytest.raises(FinePoseError, match="import-official"):
        load_checkpoint(released)


def test_prompt_encoding_is_a_plain_structure():
    enc = tiny().encode_prompts(["Walking"])
    assert isinstance(enc, PromptEncoding) and enc.clips == 1 and enc.to("cpu").keys == ("Walking",)


def test_cpu_kernels_keep_float32_math_and_restore_settings():
    from finepose.model.perf import cpu_kernels, onednn_fp32_probe

    model = tiny().eval()
    y, x2d, t = inputs(2, 2)
    before = torch.backends.mkldnn.matmul.fp32_precision
    with torch.no_grad():
        reference = model(y, x2d, t, ["Walking", "Eating"])
        with cpu_kernels("cpu") as applied:
            tuned = model(y, x2d, t, ["Walking", "Eating"])
        with cpu_kernels("cuda") as untouched:
            assert untouched == {"matmul": "default", "attention": "default"}
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    assert applied["attention"] == "math"
    assert applied["matmul"] == ("onednn-fp32" if onednn_fp32_probe()["exact"] else "default")
    assert (tuned - reference).abs().max() <= 1e-5 * reference.abs().max()


@pytest.mark.gpu
def test_model_on_cuda_matches_cpu():
    """GPU correctness: the denoiser, a training step and a flip sampling call on CUDA agree with CPU float32."""
    if not torch.cuda.is_available():
        pytest.skip("gpu: no CUDA device")
    from finepose.diffusion import GaussianDiffusion

    model = tiny().eval()
    y, x2d, t = inputs(2, 3)
    actions = ["Walking", "Eating"]
    with torch.no_grad():
        reference = model(y, x2d, t, actions)
        gpu = model.cuda()
        out = gpu(y.cuda(), x2d.cuda(), t.cuda(), actions)
        assert out.is_cuda and out.dtype == torch.float32
        assert (out.cpu() - reference).abs().max() <= 1e-4 * reference.abs().max()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = gpu(y.cuda(), x2d.cuda(), t.cuda(), actions).float()
        assert (low.cpu() - reference).abs().max() <= 5e-2 * reference.abs().max()

    gpu.train()
    loss = GaussianDiffusion().cuda().training_loss(lambda y_t, tt: gpu(y_t, x2d.cuda(), tt, actions), y[::3].cuda(),
                                                     generator=torch.Generator().manual_seed(0))
    loss.backward()
    grads = [p.grad for p in gpu.parameters() if p.requires_grad]
    assert all(g is not None and g.is_cuda and torch.isfinite(g).all() for g in grads)
    assert gpu.prompts.ctx["action"].grad.abs().sum() > 0  # the context vectors learn on CUDA too

    gpu.eval()
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 3, FRAMES, JOINTS, 3, generator=g)
    step_noise = torch.randn(2, 2, 3, FRAMES, JOINTS, 3, generator=g)
    flip = list(range(JOINTS))
    flip[1:4], flip[4:7] = [4, 5, 6], [1, 2, 3]
    cpu_model = tiny().eval()  # same seed, same weights as the model now on the GPU
    on_cpu = sample(cpu_model, GaussianDiffusion(), x2d, actions, hypotheses=3, steps=2, flip_permutation=flip,
                    noise=noise, step_noise=step_noise)
    on_gpu = sample(gpu, GaussianDiffusion().cuda(), x2d.cuda(), actions, hypotheses=3, steps=2,
                    flip_permutation=flip, noise=noise.cuda(), step_noise=step_noise.cuda())
    assert on_gpu.is_cuda and (on_gpu.cpu() - on_cpu).abs().max() <= 1e-3 * on_cpu.abs().max()


def test_explicit_cpu_attention_matches_sdpa_and_the_switch_restores():
    """The denoiser's CPU attention (plain matmul-softmax-matmul) is SDPA's math to float32 rounding."""
    import torch.nn.functional as F

    from finepose.model.perf import attention, set_cpu_attention

    g = torch.Generator().manual_seed(0)
    for shape in ((6, 4, 17, 12), (3, 8, 27, 64), (2, 4, 459, 16)):
        q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        assert (attention(q, k, v).double() - ref).abs().max() <= 1e-5
    model = tiny().eval()
    y, x2d, t = inputs(2, 2)
    with torch.no_grad():
        explicit = model(y, x2d, t, ["Walking", "Eating"])
        previous = set_cpu_attention("sdpa")
        try:
            fused = model(y, x2d, t, ["Walking", "Eating"])
        finally:
            assert set_cpu_attention(previous) == "sdpa"
    assert previous == "explicit"
    assert (explicit - fused).abs().max() <= 1e-5 * fused.abs().max()
    with pytest.raises(ValueError, match="explicit"):
        set_cpu_attention("flash")


def test_ddim_step_reads_the_schedule_once_and_follows_new_buffers():
    """The DDIM step's host copy of the schedule equals the buffers and is refreshed when they change."""
    from finepose.diffusion import GaussianDiffusion

    d = GaussianDiffusion(timesteps=100)
    host = d.host_schedule()
    assert host["alphas_cumprod"] == d.alphas_cumprod.tolist() and d.host_schedule() is host
    y, x0 = torch.randn(2, 5, 17, 3), torch.randn(2, 5, 17, 3)
    eps = d.predict_noise_from_x0(y, torch.full((2,), 50), x0)
    a_t, a_next = d.alphas_cumprod[50].item(), d.alphas_cumprod[30].item()
    want = a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps              # eta = 0
    assert torch.equal(d.ddim_step(y, x0, 50, 30, 0.0, None), want)
    state = {k: v.clone() for k, v in d.state_dict().items()}
    state["alphas_cumprod"][50] = 0.5
    d.load_state_dict(state)
    assert d.host_schedule()["alphas_cumprod"][50] == 0.5
