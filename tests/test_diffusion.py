"""finepose.diffusion: schedule, forward process (1), loss, DDIM (2)-(3), flip averaging."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from finepose.diffusion import (
    BUFFER_NAMES,
    GaussianDiffusion,
    cosine_beta_schedule,
    ddim_time_pairs,
    flip_averaged,
    pose_mirror,
)

from conftest import SHARED_DATA

# H36M-17 left/right (CONTRACTS.md): mirror permutation
LEFT, RIGHT = (4, 5, 6, 11, 12, 13), (1, 2, 3, 14, 15, 16)
PERM = list(range(17))
for _l, _r in zip(LEFT, RIGHT):
    PERM[_l], PERM[_r] = _r, _l


@pytest.fixture(scope="module")
def diff() -> GaussianDiffusion:
    return GaussianDiffusion()


def _gt(batch=2, frames=5, joints=17, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, frames, joints, 3, generator=g) - 0.5) * 1.8  # inside +-1.1


# ---------------------------------------------------------------- schedule
def test_buffers_match_closed_form(diff):
    T, s = 1000, 0.008
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = np.array([min(1 - f(t + 1) / f(t), 0.999) for t in range(T)])
    abar = np.cumprod(1 - betas)
    # unclipped region: alpha_bar_t = f(t+1) / f(0) exactly (telescoping product)
    unclipped = betas < 0.999
    assert unclipped[:-1].all() and not unclipped[-1]  # only the last beta hits the clip
    np.testing.assert_allclose(abar[:-1], [f(t + 1) / f(0) for t in range(T - 1)], rtol=1e-10)
    prev = np.concatenate([[1.0], abar[:-1]])
    post_var = betas * (1 - prev) / (1 - abar)
    expected = {
        "betas": betas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": np.sqrt(abar),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - abar),
        "log_one_minus_alphas_cumprod": np.log(1 - abar),
        "sqrt_recip_alphas_cumprod": 1 / np.sqrt(abar),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / abar - 1),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(prev) / (1 - abar),
        "posterior_mean_coef2": (1 - prev) * np.sqrt(1 - betas) / (1 - abar),
    }
    buffers = dict(diff.named_buffers())
    assert list(buffers) == list(BUFFER_NAMES)
    for name, value in expected.items():
        assert buffers[name].dtype == torch.float64 and buffers[name].shape == (T,)
        np.testing.assert_allclose(buffers[name].numpy(), value, rtol=1e-9, atol=1e-12, err_msg=name)
    assert torch.equal(cosine_beta_schedule(T, s), buffers["betas"])


def test_buffer_names_are_the_released_checkpoints():
    path = SHARED_DATA.parent / "reference" / "finepose_state_dict_keys.json"
    if not path.is_file():
        pytest.skip(f"shared data: {path} is absent")
    entries = [e for e in json.loads(path.read_text()) if e["kind"] == "buffer" and e["key"].count(".") == 1]
    assert [e["key"].removeprefix("module.") for e in entries] == list(BUFFER_NAMES)
    assert all(e["shape"] == [1000] and e["dtype"] == "float64" for e in entries)


def test_buffers_stay_float64_on_move(diff):
    moved = GaussianDiffusion().to("cpu")
    assert all(b.dtype == torch.float64 for b in moved.buffers())


# ---------------------------------------------------------------- time grid
def test_released_time_grid():
    assert ddim_time_pairs(1000, 1) == [(999, -1)]
    assert ddim_time_pairs(1000, 10) == [(999, 899), (899, 799), (799, 699), (699, 599), (599, 499),
                                         (499, 399), (399, 299), (299, 199), (199, 99), (99, -1)]
    assert ddim_time_pairs(1000, 3) == [(999, 665), (665, 332), (332, -1)]  # truncation, not rounding
    assert ddim_time_pairs(1000, 1000)[-2:] == [(1, 0), (0, -1)]
    with pytest.raises(ValueError):
        ddim_time_pairs(1000, 0)
    with pytest.raises(ValueError):
        ddim_time_pairs(1000, 1001)


# ---------------------------------------------------------------- forward process (1)
def test_q_sample_statistics(diff):
    n = 200_000
    g = torch.Generator().manual_seed(1)
    for t in (0, 250, 600, 999):
        y0 = torch.full((n, 1, 1, 3), 0.4)
        noise = torch.randn(y0.shape, generator=g)
        y_t = diff.q_sample(y0, torch.full((n,), t), noise)
        abar = diff.alphas_cumprod[t].item()
        assert y_t.mean().item() == pytest.approx(math.sqrt(abar) * 0.4, abs=5e-3)
        assert y_t.std().item() == pytest.approx(math.sqrt(1 - abar), rel=1e-2, abs=2e-3)


def test_q_sample_exact_values(diff):
    y0 = torch.tensor([[1.0, -2.0, 0.5]]).reshape(1, 1, 1, 3)
    noise = torch.tensor([[0.3, 0.1, -1.0]]).reshape(1, 1, 1, 3)
    t = torch.tensor([400])
    a = diff.alphas_cumprod[400].item()
    expected = math.sqrt(a) * y0 + math.sqrt(1 - a) * noise
    torch.testing.assert_close(diff.q_sample(y0, t, noise), expected)
    with pytest.raises(ValueError):
        diff.q_sample(y0, torch.tensor([1, 2]), noise)


# ---------------------------------------------------------------- training
def test_training_loss_mpjpe_and_mse_values(diff):
    y0 = _gt()
    offset = torch.tensor([0.003, 0.004, 0.0])
    off_by = lambda y_t, t: y0 + offset  # noqa: E731  (error 5 mm at every joint)
    assert diff.training_loss(off_by, y0, loss="mpjpe").item() == pytest.approx(0.005, rel=1e-5)
    assert diff.training_loss(off_by, y0, loss="mse").item() == pytest.approx((9e-6 + 16e-6) / 3, rel=1e-4)
    with pytest.raises(ValueError):
        diff.training_loss(off_by, y0, loss="l1")


def test_training_uses_one_uniform_timestep_per_clip_and_clamped_inputs(diff):
    y0 = _gt(batch=64, frames=3)
    seen = {}

    def spy(y_t, t):
        seen["y_t"], seen["t"] = y_t, t
        return y0

    diff.training_loss(spy, y0, generator=torch.Generator().manual_seed(3))
    t = seen["t"]
    assert t.shape == (64,) and t.dtype == torch.long and 0 <= t.min() and t.max() < 1000
    assert len(set(t.tolist())) > 30  # drawn, not constant
    assert seen["y_t"].abs().max() <= 1.1 + 1e-6
    # the noisy input is exactly clamp(q_sample(y0, t, noise)) for the generator's noise
    g = torch.Generator().manual_seed(3)
    t2 = torch.randint(0, 1000, (64,), generator=g)
    noise = torch.randn(y0.shape, generator=g)
    assert torch.equal(t, t2)
    torch.testing.assert_close(seen["y_t"], diff.q_sample(y0, t2, noise).clamp(-1.1, 1.1))


def test_official_grad_scaling_is_half_mpjpe_squared(diff):
    y0 = _gt()
    direction = torch.randn(y0.shape, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([10, 500])

    def run(flag):
        w = torch.tensor(0.02, requires_grad=True)
        loss = diff.training_loss(lambda y, tt: y0 + w * direction, y0, t=t, noise=torch.zeros_like(y0),
                                  official_grad_scaling=flag)
        loss.backward()
        return loss.item(), w.grad.item()

    value_plain, grad_plain = run(False)
    value_scaled, grad_scaled = run(True)
    assert value_scaled == pytest.approx(value_plain)  # the reported value stays MPJPE
    assert grad_scaled == pytest.approx(value_plain * grad_plain, rel=1e-5)  # = backward(loss, loss)
    # and equals what the released code does: loss.backward(loss.clone().detach())
    w = torch.tensor(0.02, requires_grad=True)
    ref = torch.linalg.vector_norm(w * direction, dim=-1).mean()
    ref.backward(ref.detach().clone())
    assert grad_scaled == pytest.approx(w.grad.item(), rel=1e-5)
    with pytest.raises(ValueError):
        diff.training_loss(lambda y, tt: y0, y0, loss="mse", official_grad_scaling=True)


# ---------------------------------------------------------------- DDIM sampling
@pytest.mark.parametrize("hypotheses", [1, 3])
@pytest.mark.parametrize("steps", [1, 2, 3, 10])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_oracle_denoiser_returns_ground_truth(hypotheses, steps, eta, scale):
    diff = GaussianDiffusion(scale=scale)
    gt = _gt(batch=2, frames=4)
    oracle = lambda y_t, t: gt.repeat_interleave(hypotheses, dim=0)  # noqa: E731  (clip-major rows)
    out = diff.ddim_sample(oracle, gt.shape, hypotheses=hypotheses, steps=steps, eta=eta,
                           generator=torch.Generator().manual_seed(0))
    assert out.shape == (steps, 2, hypotheses, 4, 17, 3)
    torch.testing.assert_close(out, gt[None, :, None].expand_as(out), rtol=0, atol=1e-6)


def test_sampler_calls_the_denoiser_on_the_released_grid(diff):
    calls = []

    def spy(y_t, t):
        calls.append((tuple(y_t.shape), t.unique().tolist(), y_t.abs().max().item()))
        return torch.zeros_like(y_t)

    diff.ddim_sample(spy, (2, 4, 17, 3), hypotheses=5, steps=4, generator=torch.Generator().manual_seed(0))
    assert [c[1] for c in calls] == [[999], [749], [499], [249]]
    assert all(c[0] == (10, 4, 17, 3) for c in calls)
    assert all(c[2] <= 1.1 + 1e-6 for c in calls)  # the denoiser sees clamped inputs


def _hand_ddim(diff, denoise, y_T, step_noise, steps, eta):
    """Equations (2), (3a), (3b) written out in float64 numpy, independent of the module."""
    abar = diff.alphas_cumprod.numpy()
    y = y_T.astype(np.float64)
    outs = []
    for m, (t, t_next) in enumerate(ddim_time_pairs(1000, steps)):
        x0 = np.clip(denoise(np.clip(y, -1.1, 1.1)), -1.1, 1.1)
        outs.append(x0)
        if t_next < 0:
            break
        eps_t = (y - math.sqrt(abar[t]) * x0) / math.sqrt(1 - abar[t])
        sigma = eta * math.sqrt((1 - abar[t_next]) / (1 - abar[t])) * math.sqrt(1 - abar[t] / abar[t_next])
        y = math.sqrt(abar[t_next]) * x0 + math.sqrt(1 - abar[t_next] - sigma**2) * eps_t + sigma * step_noise[m]
    return np.stack(outs)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_equations_step_by_step(diff, eta):
    B, H, F, J, M = 2, 3, 4, 17, 5
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(B, H, F, J, 3, generator=g)
    step_noise = torch.randn(M, B, H, F, J, 3, generator=g)
    shrink = lambda y: 0.6 * y + 0.05  # noqa: E731  a denoiser that is not an oracle
    out = diff.ddim_sample(lambda y, t: shrink(y), (B, F, J, 3), hypotheses=H, steps=M, eta=eta,
                           noise=noise, step_noise=step_noise)
    expected = _hand_ddim(diff, shrink, noise.numpy(), step_noise.numpy(), M, eta)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_explicit_noise_makes_runs_identical_and_matches_the_generator_order(diff):
    B, H, F, J, M = 1, 4, 3, 17, 3
    fn = lambda y, t: torch.tanh(y) * 0.5  # noqa: E731
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(B, H, F, J, 3, generator=g)
    step_noise = torch.stack([torch.randn(B, H, F, J, 3, generator=g) for _ in range(M - 1)])
    a = diff.ddim_sample(fn, (B, F, J, 3), hypotheses=H, steps=M, noise=noise, step_noise=step_noise)
    b = diff.ddim_sample(fn, (B, F, J, 3), hypotheses=H, steps=M, noise=noise.clone(), step_noise=step_noise.clone())
    assert torch.equal(a, b)
    # the generator draws the initial noise first, then one tensor per noised step
    c = diff.ddim_sample(fn, (B, F, J, 3), hypotheses=H, steps=M, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, c)
    # an M-long step_noise (last entry unused) gives the same result
    padded = torch.cat([step_noise, torch.full_like(step_noise[:1], 1e6)])
    d = diff.ddim_sample(fn, (B, F, J, 3), hypotheses=H, steps=M, noise=noise, step_noise=padded)
    assert torch.equal(a, d)


def test_generator_seeding_is_reproducible(diff):
    fn = lambda y, t: 0.3 * y  # noqa: E731
    run = lambda seed: diff.ddim_sample(fn, (2, 3, 17, 3), hypotheses=2, steps=3,  # noqa: E731
                                        generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))
    # hypotheses differ from one another (independent initial noise)
    out = run(5)
    assert not torch.allclose(out[:, :, 0], out[:, :, 1])


def test_sampler_rejects_bad_arguments(diff):
    fn = lambda y, t: y  # noqa: E731
    with pytest.raises(ValueError):
        diff.ddim_sample(fn, (2, 3, 17, 3), hypotheses=2, steps=2, noise=torch.zeros(2, 3, 3, 17, 3))
    with pytest.raises(ValueError):
        diff.ddim_sample(fn, (2, 3, 17, 3), steps=2, eta=1.5)
    with pytest.raises(ValueError):
        diff.ddim_sample(fn, (2, 3, 17, 3), steps=3, step_noise=torch.zeros(1, 2, 1, 3, 17, 3))
    with pytest.raises(ValueError):
        diff.ddim_sample(lambda y, t: y[..., :2], (2, 3, 17, 3), steps=1)


# ---------------------------------------------------------------- flip averaging
def test_pose_mirror_negates_x_and_swaps_sides():
    flip = pose_mirror(PERM)
    y = torch.randn(2, 3, 17, 3, generator=torch.Generator().manual_seed(0))
    f = flip(y)
    assert torch.equal(f[..., 1, :], y[..., 4, :] * torch.tensor([-1.0, 1, 1]))
    assert torch.equal(f[..., 0, :], y[..., 0, :] * torch.tensor([-1.0, 1, 1]))
    assert torch.equal(flip(f), y)  # involution
    kp = torch.randn(4, 17, 2)
    assert torch.equal(pose_mirror(PERM)(kp)[..., 14, :], kp[..., 11, :] * torch.tensor([-1.0, 1]))
    with pytest.raises(ValueError):
        pose_mirror([0, 0, 1])


def test_flip_average_of_an_equivariant_denoiser_is_a_no_op(diff):
    flip = pose_mirror(PERM)

    def equi(y, t):  # y times a flip-invariant per-frame factor (pose norm, timestep)
        norm = torch.linalg.vector_norm(y, dim=(-2, -1), keepdim=True)
        return 0.1 * y * norm * (1 + t.float().reshape(-1, 1, 1, 1) / 1000)

    y = torch.randn(3, 4, 17, 3, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([999, 10, 400])
    torch.testing.assert_close(flip(equi(flip(y), t)), equi(y, t))  # the premise
    torch.testing.assert_close(flip_averaged(equi, flip)(y, t), equi(y, t))
    g = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    a = diff.ddim_sample(equi, (2, 4, 17, 3), hypotheses=3, steps=3, generator=g())
    b = diff.ddim_sample(flip_averaged(equi, flip), (2, 4, 17, 3), hypotheses=3, steps=3, generator=g())
    torch.testing.assert_close(a, b)


def test_flip_average_uses_the_mirrored_closure(diff):
    flip = pose_mirror(PERM)
    biased = lambda y, t: y + torch.tensor([0.1, 0.0, 0.0])  # noqa: E731  not equivariant
    y = torch.randn(2, 3, 17, 3, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([5, 6])
    # flip(flip(y) + b) = y + flip(b) = y - (0.1, 0, 0): the average cancels the bias
    torch.testing.assert_close(flip_averaged(biased, flip)(y, t), y)
    # a separate closure (e.g. over the mirrored 2D input) is the one used for the mirrored pass
    mirrored = lambda y, t: y + torch.tensor([0.0, 0.2, 0.0])  # noqa: E731
    expected = ((y + torch.tensor([0.1, 0.0, 0.0])) + (y + torch.tensor([0.0, 0.2, 0.0]))) / 2
    torch.testing.assert_close(flip_averaged(biased, flip, mirrored)(y, t), expected)


# ---------------------------------------------------------------- devices
@pytest.mark.gpu
def test_sampling_and_loss_on_cuda_match_cpu():
    if not torch.cuda.is_available():
        pytest.skip("gpu: CUDA is not available here")
    cpu = GaussianDiffusion()
    cuda = GaussianDiffusion().to("cuda")
    assert all(b.dtype == torch.float64 and b.is_cuda for b in cuda.buffers())
    fn = lambda y, t: torch.tanh(y) * 0.5 + t.float().reshape(-1, 1, 1, 1) * 1e-4  # noqa: E731
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 3, 4, 17, 3, generator=g)
    step_noise = torch.randn(4, 2, 3, 4, 17, 3, generator=g)
    a = cpu.ddim_sample(fn, (2, 4, 17, 3), hypotheses=3, steps=4, noise=noise, step_noise=step_noise)
    b = cuda.ddim_sample(fn, (2, 4, 17, 3), hypotheses=3, steps=4, noise=noise.cuda(), step_noise=step_noise.cuda())
    assert b.is_cuda
    torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)
    # a CPU generator drives a CUDA run with the same numbers as a CPU run
    c = cuda.ddim_sample(fn, (2, 4, 17, 3), hypotheses=3, steps=4, generator=torch.Generator().manual_seed(1),
                         device="cuda")
    d = cpu.ddim_sample(fn, (2, 4, 17, 3), hypotheses=3, steps=4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(c.cpu(), d, rtol=1e-5, atol=1e-5)
    y0 = _gt().cuda()
    loss = cuda.training_loss(lambda y, t: y0 + 0.001, y0, generator=torch.Generator().manual_seed(2))
    assert loss.is_cuda and loss.item() == pytest.approx(math.sqrt(3) * 0.001, rel=1e-4)
