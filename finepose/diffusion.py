"""Diffusion for 3D pose lifting, as in FinePOSE Section 3.1 (and 3.3).

Read top to bottom like the paper:

1. the variance schedule {beta_t} (cosine, T = 1000, s = 0.008) and the derived
   quantities, kept as float64 buffers under the names of the released
   checkpoint's 12 diffusion buffers, so an imported checkpoint can be compared
   with them key by key;
2. the diffusion process, equation (1): ``q_sample``;
3. the denoiser's objective: it predicts the clean poses Y_0 ("x0 objective"),
   with the input clamped to +-clamp*scale and divided by ``scale``;
4. training (Section 3.3): one uniform timestep per clip, loss ``mpjpe`` (what
   the released code optimises; optionally with its gradient scaling) or
   ``mse`` (what the paper states);
5. inference: DDIM, equations (2), (3a), (3b), on the released time grid, with
   H hypotheses, M steps, eta, optional test-time flip averaging, and the x0
   estimate of every step returned.

Shapes: a pose sequence batch is ``(B, F, J, 3)`` (clips, frames, joints, xyz);
hypotheses add an axis, ``(B, H, F, J, 3)``; the sampler returns
``(M, B, H, F, J, 3)``, one x0 estimate per DDIM step.

The denoiser is any callable ``denoise_fn(y_t, t) -> y0_hat`` with ``y_t`` of
shape ``(N, F, J, 3)`` (already clamped and divided by ``scale``) and ``t`` of
shape ``(N,)`` (long); it returns the clean poses in pose units (not multiplied
by ``scale``). In the sampler ``N = B * H`` and rows are ordered clip-major:
row ``b * H + h`` is hypothesis ``h`` of clip ``b``; the caller closes over the
2D input and the prompts (and repeats or broadcasts them over hypotheses).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Names and order of the 12 float64 buffers in the released checkpoint (`module.<name>`).
BUFFER_NAMES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)

LOSSES = ("mpjpe", "mse")


# --------------------------------------------------------------------------------------
# 1. Variance schedule
# --------------------------------------------------------------------------------------
def cosine_beta_schedule(timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021), float64, shape ``(timesteps,)``.

    alpha_bar(u) = cos^2(((u / T) + s) / (1 + s) * pi / 2) / alpha_bar(0) on the grid
    u = 0..T, and beta_t = 1 - alpha_bar(t + 1) / alpha_bar(t), clipped to [0, max_beta].
    """
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    u = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
    alpha_bar = torch.cos(((u / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    alpha_bar = alpha_bar / alpha_bar[0]
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(0, max_beta)


def schedule_buffers(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """The 12 float64 quantities derived from ``betas`` (names as in the released checkpoint).

    alpha_t = 1 - beta_t and alpha_bar_t = prod_{s<=t} alpha_s (the paper's notation under
    equation (1)); the posterior q(Y_{t-1} | Y_t, Y_0) terms are kept for checkpoint
    compatibility only (DDIM sampling does not use them).
    """
    betas = betas.to(torch.float64)
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)  # alpha_bar_t
    alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    return {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": torch.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        # the posterior variance is 0 at t = 0: clip before the log
        "posterior_log_variance_clipped": torch.log(posterior_variance.clamp(min=1e-20)),
        "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
    }


def ddim_time_pairs(timesteps: int, steps: int) -> list[tuple[int, int]]:
    """The released DDIM time grid: ``steps`` pairs (t, t_next), from t = T-1 down.

    times = linspace(-1, T-1, steps+1) (float32), truncated toward zero to integers,
    reversed; consecutive pairs. The last pair always has t_next = -1, which means
    "no further noising: the x0 estimate is the result". E.g. T = 1000, steps = 10:
    (999, 899), (899, 799), ..., (99, -1); steps = 3: (999, 665), (665, 332), (332, -1).
    """
    if not 1 <= steps <= timesteps:
        raise ValueError(f"DDIM steps must be in [1, {timesteps}], got {steps}")
    grid = torch.linspace(-1, timesteps - 1, steps + 1, dtype=torch.float32)
    times = list(reversed(grid.to(torch.int64).tolist()))  # int conversion truncates toward 0
    return list(zip(times[:-1], times[1:]))


# --------------------------------------------------------------------------------------
# Test-time flip (mirror x, swap left/right joints), averaged at every DDIM step
# --------------------------------------------------------------------------------------
def pose_mirror(flip_permutation: Sequence[int] | torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A flip function for ``(..., J, C)`` poses: negate x (channel 0), then swap joints.

    ``flip_permutation[j]`` is the joint that j becomes under mirroring (its left/right
    counterpart, or j itself), as in ``finepose.skeleton.JointSet.flip_permutation``.
    Works for 3D poses and 2D keypoints alike. The flip is an involution.
    """
    perm = torch.as_tensor(list(map(int, flip_permutation)), dtype=torch.long)
    if sorted(perm.tolist()) != list(range(len(perm))):
        raise ValueError(f"flip_permutation is not a permutation: {perm.tolist()}")

    def flip(pose: torch.Tensor) -> torch.Tensor:
        if pose.shape[-2] != len(perm):
            raise ValueError(f"flip: poses have {pose.shape[-2]} joints, the permutation {len(perm)}")
        mirrored = pose.index_select(-2, perm.to(pose.device))
        sign = torch.ones(pose.shape[-1], dtype=pose.dtype, device=pose.device)
        sign[0] = -1
        return mirrored * sign

    return flip


def flip_averaged(
    denoise_fn: DenoiseFn,
    flip_fn: Callable[[torch.Tensor], torch.Tensor],
    mirrored_denoise_fn: DenoiseFn | None = None,
) -> DenoiseFn:
    """Test-time flip augmentation at each step: 0.5 * (D(y) + flip(D'(flip(y)))).

    ``D'`` is ``mirrored_denoise_fn``: the same denoiser closed over the *mirrored* 2D
    input (and the same prompts). It defaults to ``denoise_fn`` itself, which is right only
    when the denoiser has no conditioning that must be mirrored too (e.g. in tests); with
    a real 2D input pass the mirrored closure, as the released code feeds the flipped 2D.
    The released code flips the clamped, scaled input and averages before the output is
    rescaled and clamped; wrapping ``denoise_fn`` here reproduces exactly that order.
    """
    other = denoise_fn if mirrored_denoise_fn is None else mirrored_denoise_fn

    def averaged(y_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        direct = denoise_fn(y_t, t)
        mirrored = flip_fn(other(flip_fn(y_t), t))
        return (direct + mirrored) / 2

    return averaged


# --------------------------------------------------------------------------------------
# The diffusion model
# --------------------------------------------------------------------------------------
class GaussianDiffusion(nn.Module):
    """Schedule, forward process (1), x0 objective, training loss and DDIM sampler (2)-(3).

    Buffers are float64 and keep their dtype under ``.to(device)``; do not call ``.half()``
    or ``.to(dtype)`` on a module that holds this one (the arithmetic here casts to the
    poses' dtype where needed).
    """

    def __init__(self, timesteps: int = 1000, cosine_s: float = 0.008, scale: float = 1.0, clamp: float = 1.1):
        super().__init__()
        if scale <= 0 or clamp <= 0:
            raise ValueError(f"scale and clamp must be positive, got scale={scale}, clamp={clamp}")
        self.num_timesteps = int(timesteps)
        self.cosine_s = float(cosine_s)
        self.scale = float(scale)
        self.clamp = float(clamp)
        for name, value in schedule_buffers(cosine_beta_schedule(self.num_timesteps, self.cosine_s)).items():
            self.register_buffer(name, value)

    def extra_repr(self) -> str:
        return f"timesteps={self.num_timesteps}, cosine_s={self.cosine_s}, scale={self.scale}, clamp={self.clamp}"

    def host_schedule(self) -> dict[str, list[float]]:
        """The schedule values the sampler needs, as Python floats (float64), read from the buffers once.

        Cached against the buffers' identity and version, so a ``load_state_dict`` or ``.to()`` (which
        replace or rewrite the buffers) refreshes it; the DDIM loop then never reads a device tensor back.
        """
        names = ("alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod")
        key = tuple((id(getattr(self, n)), getattr(self, n)._version) for n in names)
        cached = self.__dict__.get("_host_schedule")
        if cached is None or cached[0] != key:
            cached = (key, {n: getattr(self, n).detach().cpu().tolist() for n in names})
            self.__dict__["_host_schedule"] = cached
        return cached[1]

    def _at(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """float64 buffer values at timesteps ``t`` (N,), shaped (N, 1, ..., 1) for broadcasting."""
        values = getattr(self, name)[t.to(device=getattr(self, name).device, dtype=torch.long)]
        return values.reshape(-1, *([1] * (ndim - 1)))

    # ---- 2. diffusion process, equation (1) -------------------------------------------
    def q_sample(self, y0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Y_t = sqrt(alpha_bar_t) * Y_0 + sqrt(1 - alpha_bar_t) * eps   (1)

        y0, noise: (N, ...) in the diffusion's (scaled) space; t: (N,) long in [0, T).
        Computed in float64 (as released), returned in ``y0``'s dtype.
        """
        if noise.shape != y0.shape:
            raise ValueError(f"q_sample: noise shape {tuple(noise.shape)} != y0 shape {tuple(y0.shape)}")
        self._check_t(t, y0.shape[0])
        a = self._at("sqrt_alphas_cumprod", t, y0.ndim).to(y0.device)
        b = self._at("sqrt_one_minus_alphas_cumprod", t, y0.ndim).to(y0.device)
        return (a * y0.double() + b * noise.double()).to(y0.dtype)

    # ---- 3. the denoiser's objective: predict Y_0 ------------------------------------
    def model_input(self, y_t: torch.Tensor) -> torch.Tensor:
        """What the denoiser sees: Y_t clamped to +-clamp*scale, divided by scale."""
        bound = self.clamp * self.scale
        return y_t.clamp(-bound, bound) / self.scale

    def predict_x0(self, denoise_fn: DenoiseFn, y_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Y0_hat in the scaled space: clamp(D(model_input(Y_t), t) * scale, +-clamp*scale)."""
        out = denoise_fn(self.model_input(y_t), t)
        if out.shape != y_t.shape:
            raise ValueError(f"denoise_fn returned shape {tuple(out.shape)}, expected {tuple(y_t.shape)}")
        bound = self.clamp * self.scale
        return (out.to(y_t.dtype) * self.scale).clamp(-bound, bound)

    def predict_noise_from_x0(self, y_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps_t = (Y_t - sqrt(alpha_bar_t) * Y0_hat) / sqrt(1 - alpha_bar_t)   (3a)

        Written as (sqrt(1/alpha_bar_t) * Y_t - Y0_hat) / sqrt(1/alpha_bar_t - 1), the same
        quantity, in float64 as released (the unclamped Y_t enters here), cast back to Y_t's dtype.
        """
        recip = self._at("sqrt_recip_alphas_cumprod", t, y_t.ndim).to(y_t.device)
        recipm1 = self._at("sqrt_recipm1_alphas_cumprod", t, y_t.ndim).to(y_t.device)
        return ((recip * y_t.double() - x0.double()) / recipm1).to(y_t.dtype)

    # ---- 4. training ------------------------------------------------------------------
    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> torch.Tensor:
        """One timestep per clip, uniform on {0, ..., T-1}: (batch,) long."""
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator,
                          device=generator.device if generator is not None else device)
        return t.to(device) if device is not None else t

    def training_loss(
        self,
        denoise_fn: DenoiseFn,
        y0: torch.Tensor,
        t: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        loss: str = "mpjpe",
        *,
        noise: torch.Tensor | None = None,
        official_grad_scaling: bool = False,
    ) -> torch.Tensor:
        """Loss of the x0 prediction for clean root-relative poses ``y0`` (B, F, J, 3).

        t: (B,) timesteps, one per clip; drawn uniformly when None. noise: (B, F, J, 3);
        drawn from ``generator`` (or the global RNG) when None. The denoiser sees
        clamp(q_sample(y0 * scale, t, noise)) / scale and must return y0 (pose units).

        loss = "mpjpe": mean over clips, frames and joints of ||Y0_hat - Y0||_2 (as released).
        loss = "mse": mean of the squared coordinate errors (the paper's MSE).
        official_grad_scaling (mpjpe only): the released code calls backward with the loss
        value as the gradient, which optimises 0.5 * MPJPE^2; with this flag the returned
        tensor still has the MPJPE as its value, but its gradient is that of 0.5 * MPJPE^2.
        """
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if official_grad_scaling and loss != "mpjpe":
            raise ValueError("official_grad_scaling applies to loss='mpjpe' only")
        batch = y0.shape[0]
        if t is None:
            t = self.sample_timesteps(batch, generator, device=y0.device)
        self._check_t(t, batch)
        t = t.to(y0.device)
        if noise is None:
            noise = _randn(y0.shape, generator, y0.device, y0.dtype)
        y_t = self.q_sample(y0 * self.scale, t, noise)
        pred = denoise_fn(self.model_input(y_t), t)
        if pred.shape != y0.shape:
            raise ValueError(f"denoise_fn returned shape {tuple(pred.shape)}, expected {tuple(y0.shape)}")
        pred = pred.to(y0.dtype)
        if loss == "mse":
            return torch.mean((pred - y0) ** 2)
        value = torch.linalg.vector_norm(pred - y0, dim=-1).mean()
        if not official_grad_scaling:
            return value
        # value of MPJPE, gradient of 0.5 * MPJPE^2 (= MPJPE * dMPJPE, what backward(loss) does)
        objective = 0.5 * value**2
        return value.detach() + (objective - objective.detach())

    # ---- 5. inference: DDIM, equations (2), (3) ---------------------------------------
    def ddim_step(
        self,
        y_t: torch.Tensor,
        x0: torch.Tensor,
        t: int,
        t_next: int,
        eta: float,
        noise: torch.Tensor | None,
    ) -> torch.Tensor:
        """One DDIM update from timestep t to t_next given the x0 estimate (scaled space).

        Y_{t_next} = sqrt(alpha_bar_next) * Y0_hat + sqrt(1 - alpha_bar_next - sigma_t^2) * eps_t
                     + sigma_t * eps                                                      (2)
        sigma_t = eta * sqrt((1 - alpha_bar_next) / (1 - alpha_bar_t)) * sqrt(1 - alpha_bar_t / alpha_bar_next)  (3b)
        t_next < 0 (last step of the released grid): the result is Y0_hat itself, no noise.
        """
        if t_next < 0:
            return x0
        host = self.host_schedule()
        # (3a) with the float64 schedule values as Python scalars: the same float64 arithmetic as
        # predict_noise_from_x0, but no device tensor is indexed or read back (no host sync per step)
        eps_t = ((host["sqrt_recip_alphas_cumprod"][t] * y_t.double() - x0.double())
                 / host["sqrt_recipm1_alphas_cumprod"][t]).to(y_t.dtype)
        a_t = host["alphas_cumprod"][t]
        a_next = host["alphas_cumprod"][t_next]
        sigma = eta * math.sqrt((1 - a_next) / (1 - a_t) * (1 - a_t / a_next))  # (3b)
        c = math.sqrt(max(1 - a_next - sigma**2, 0.0))
        y_next = math.sqrt(a_next) * x0 + c * eps_t
        if sigma > 0:
            if noise is None:
                raise ValueError("ddim_step: eta > 0 needs a noise tensor")
            y_next = y_next + sigma * noise
        return y_next

    @torch.no_grad()
    def ddim_sample(
        self,
        denoise_fn: DenoiseFn,
        shape: Sequence[int],
        hypotheses: int = 1,
        steps: int = 1,
        eta: float = 1.0,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        step_noise: torch.Tensor | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """DDIM sampling of H hypotheses in M steps; returns the x0 estimate of every step.

        shape: (B, F, J, 3). Returns (M, B, H, F, J, 3) in pose units (divided by ``scale``;
        with scale 1.0 these are exactly the released code's per-step x0 estimates).
        Randomness, in this order (the released order): the initial noise Y_T ~ N(0, I) of
        shape (B, H, F, J, 3), then one noise tensor per step that is followed by another
        step (the last step of the grid adds none). Give them explicitly as ``noise``
        (B, H, F, J, 3) and ``step_noise`` (M, B, H, F, J, 3) or (M-1, B, H, F, J, 3) (entry
        m is used after step m; the last entry of an M-long tensor is unused), or draw them
        from ``generator`` (on the generator's device, then moved), or else from the global
        RNG. eta = 0 draws no step noise.
        """
        if len(shape) != 4:
            raise ValueError(f"shape must be (B, F, J, 3), got {tuple(shape)}")
        if hypotheses < 1:
            raise ValueError(f"hypotheses must be >= 1, got {hypotheses}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        batch = int(shape[0])
        full = (batch, hypotheses, *map(int, shape[1:]))  # (B, H, F, J, 3)
        pairs = ddim_time_pairs(self.num_timesteps, steps)
        if device is None:
            device = noise.device if noise is not None else self.betas.device
        if noise is None:
            noise = _randn(full, generator, device, dtype)
        elif tuple(noise.shape) != full:
            raise ValueError(f"noise must have shape {full}, got {tuple(noise.shape)}")
        if step_noise is not None and (tuple(step_noise.shape[1:]) != full or step_noise.shape[0] not in (steps, steps - 1)):
            raise ValueError(f"step_noise must have shape ({steps} or {steps - 1}, *{full}), got {tuple(step_noise.shape)}")

        n = batch * hypotheses
        y = noise.to(device=device, dtype=dtype).reshape(n, *full[2:])  # (B*H, F, J, 3), clip-major
        estimates = []
        for m, (t, t_next) in enumerate(pairs):
            t_batch = torch.full((n,), t, dtype=torch.long, device=device)
            x0 = self.predict_x0(denoise_fn, y, t_batch)
            estimates.append(x0)
            if t_next < 0:
                break
            eps = None
            if eta > 0:
                if step_noise is not None:
                    eps = step_noise[m].to(device=device, dtype=dtype).reshape(y.shape)
                else:
                    eps = _randn(full, generator, device, dtype).reshape(y.shape)
            y = self.ddim_step(y, x0, t, t_next, eta, eps)
        out = torch.stack(estimates) / self.scale  # (M, B*H, F, J, 3)
        return out.reshape(len(pairs), *full)

    @staticmethod
    def _check_t(t: torch.Tensor, batch: int) -> None:
        if t.ndim != 1 or t.shape[0] != batch:
            raise ValueError(f"t must have shape ({batch},), one timestep per clip; got {tuple(t.shape)}")


def _randn(shape: Sequence[int], generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """Standard normal noise; drawn on the generator's own device when one is given."""
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    drawn = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype)
    return drawn.to(device)
