"""The forward (noising) process and the training objective of diffusion models.

Chapter 01 builds this file top to bottom:

1. a *beta schedule* says how much noise each of the T forward steps adds;
2. ``alphas_cumprod`` (written ᾱ_t in the equations) is the product of (1 - β_s) up to t;
3. the closed form q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I) noises any clean sample to any
   step in one go (``q_sample``), which is what makes training cheap;
4. the DDPM objective: predict the noise that was added, with a mean squared error
   (``diffusion_loss``).

The schedules are computed exactly as diffusers computes them (same formulas, same float32
arithmetic), so the schedulers built on them give diffusers' numbers to the last bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checks import as_float, as_int

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def cosine_alphas_cumprod(t: torch.Tensor | float, offset: float = 0.008):
    """ᾱ(t) of the cosine schedule (Nichol & Dhariwal 2021), for t in [0, 1]."""
    if isinstance(t, torch.Tensor):
        return torch.cos((t + offset) / (1 + offset) * math.pi / 2) ** 2
    return math.cos((t + offset) / (1 + offset) * math.pi / 2) ** 2


def make_betas(
    beta_schedule: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
) -> torch.Tensor:
    """The T noise variances β_1..β_T, shape (T,), float32.

    * ``linear``: evenly spaced from ``beta_start`` to ``beta_end`` (DDPM).
    * ``scaled_linear``: evenly spaced in √β, then squared (Stable Diffusion: 0.00085 to 0.012).
    * ``squaredcos_cap_v2``: the cosine schedule, each β capped at 0.999.
    """
    num_train_timesteps = as_int(num_train_timesteps, "num_train_timesteps", minimum=1)
    beta_start, beta_end = as_float(beta_start, "beta_start"), as_float(beta_end, "beta_end")
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        if min(beta_start, beta_end) < 0:
            raise ValueError(f"beta_start={beta_start} and beta_end={beta_end} must be positive: "
                             "'scaled_linear' spaces their square roots evenly.")
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        T = num_train_timesteps
        # β_t = 1 - ᾱ(t/T) / ᾱ((t-1)/T), in Python floats as the reference does.
        betas = torch.tensor([
            min(1 - cosine_alphas_cumprod((i + 1) / T) / cosine_alphas_cumprod(i / T), 0.999) for i in range(T)
        ], dtype=torch.float32)
    else:
        raise ValueError(f"beta_schedule={beta_schedule!r} is not known; use one of {BETA_SCHEDULES}.")
    check_betas(betas, f"the {beta_schedule!r} schedule from beta_start={beta_start} to beta_end={beta_end}")
    return betas


def check_betas(betas: torch.Tensor, what: str) -> None:
    """Refuse noise variances outside (0, 1): β ≤ 0 adds no noise (or imaginary noise), β ≥ 1 erases the signal
    in one step and makes ᾱ zero or negative, and every sampler then divides by zero."""
    if not torch.isfinite(betas).all() or betas.min() <= 0 or betas.max() >= 1:
        raise ValueError(
            f"{what} gives betas from {betas.min().item():.4g} to {betas.max().item():.4g}; every beta must lie "
            "strictly between 0 and 1 (SD: beta_start=0.00085, beta_end=0.012, 'scaled_linear')."
        )


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = ∏_{s ≤ t} (1 - β_s): how much of the clean signal survives to step t."""
    return torch.cumprod(1.0 - betas, dim=0)


def signal_to_noise(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 - ᾱ_t), the ratio of signal power to noise power at step t."""
    return alphas_cumprod / (1.0 - alphas_cumprod)


def _per_sample(values: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped to broadcast against ``like``: (B,) -> (B, 1, 1, ...)."""
    t = torch.as_tensor(t, device=values.device).long()
    if t.ndim == 0:
        t = t.expand(like.shape[0] if like.ndim > 0 else 1)
    if t.ndim != 1 or (like.ndim > 0 and t.shape[0] not in (1, like.shape[0])):
        raise ValueError(
            f"t must be an int or a (B,) tensor with B={like.shape[0]} (the batch of x), got shape {tuple(t.shape)}."
        )
    if int(t.min()) < 0 or int(t.max()) >= len(values):
        raise ValueError(f"t must lie in [0, {len(values) - 1}], got values from {int(t.min())} to {int(t.max())}.")
    out = values[t].to(like.dtype).to(like.device)
    return out.reshape(-1, *([1] * (like.ndim - 1)))  # (B, 1, 1, ...)


def q_sample(x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Noise clean samples to step t in one go: x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε.

    x0 and noise have the same shape (B, ...); t is an int or a (B,) tensor of steps
    in [0, T-1]. The same formula as diffusers' ``scheduler.add_noise``.
    """
    if noise.shape != x0.shape:
        raise ValueError(
            f"noise has shape {tuple(noise.shape)} but x0 has shape {tuple(x0.shape)}; "
            "draw the noise with torch.randn_like(x0)."
        )
    sqrt_alpha_prod = _per_sample(alphas_cumprod, t, x0) ** 0.5
    sqrt_one_minus_alpha_prod = (1 - _per_sample(alphas_cumprod, t, x0)) ** 0.5
    return sqrt_alpha_prod * x0 + sqrt_one_minus_alpha_prod * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The v-prediction target v = √ᾱ_t ε - √(1 - ᾱ_t) x_0 (Salimans & Ho 2022), diffusers' ``get_velocity``.

    Where x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε moves along a circle as t grows, v is its velocity: a
    target that stays of size one at every t, where predicting ε tells little at high noise and
    predicting x_0 little at low noise. SD 2.x's 768-pixel models predict it (Chapter 08).
    x0 and noise (B, ...); t an int or a (B,) tensor.
    """
    if noise.shape != x0.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)} but x0 has shape {tuple(x0.shape)}; "
                         "pass the noise that was added to this x0.")
    alpha_prod = _per_sample(alphas_cumprod, t, x0)  # (B, 1, 1, ...)
    return alpha_prod**0.5 * noise - (1 - alpha_prod) ** 0.5 * x0


def q_step(x_prev: torch.Tensor, t: int, noise: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """One forward step: x_t = √(1 - β_t) x_{t-1} + √β_t ε, the definition q_sample shortcuts."""
    beta = betas[t].to(x_prev.dtype)
    return (1 - beta) ** 0.5 * x_prev + beta**0.5 * noise


def predict_x0(x_t: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Invert q_sample given a noise estimate: x̂_0 = (x_t - √(1 - ᾱ_t) ε̂) / √ᾱ_t."""
    alpha_prod = _per_sample(alphas_cumprod, t, x_t)
    return (x_t - (1 - alpha_prod) ** 0.5 * eps) / alpha_prod**0.5


def q_posterior_mean(x0: torch.Tensor, x_t: torch.Tensor, t: int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Mean of q(x_{t-1} | x_t, x_0), the Gaussian the reverse process learns to match.

    μ̃_t = √ᾱ_{t-1} β_t / (1 - ᾱ_t) · x_0 + √α_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · x_t,
    with ᾱ_{-1} = 1 at the first step.
    """
    alpha_prod = alphas_cumprod[t]
    alpha_prod_prev = alphas_cumprod[t - 1] if t > 0 else torch.ones((), dtype=alphas_cumprod.dtype)
    beta = 1 - alpha_prod / alpha_prod_prev
    x0_coefficient = alpha_prod_prev**0.5 * beta / (1 - alpha_prod)
    xt_coefficient = (1 - beta) ** 0.5 * (1 - alpha_prod_prev) / (1 - alpha_prod)
    return x0_coefficient * x0 + xt_coefficient * x_t


def q_posterior_variance(t: int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Variance of q(x_{t-1} | x_t, x_0): β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · β_t."""
    alpha_prod = alphas_cumprod[t]
    alpha_prod_prev = alphas_cumprod[t - 1] if t > 0 else torch.ones((), dtype=alphas_cumprod.dtype)
    return (1 - alpha_prod_prev) / (1 - alpha_prod) * (1 - alpha_prod / alpha_prod_prev)


@dataclass
class NoiseSchedule:
    """A beta schedule with everything derived from it, for training and for the figures."""

    betas: torch.Tensor

    @classmethod
    def make(cls, beta_schedule="linear", num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02):
        return cls(make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end))

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return alphas_cumprod_from_betas(self.betas)

    def q_sample(self, x0, t, noise):
        return q_sample(x0, t, noise, self.alphas_cumprod)


def diffusion_loss(
    model,
    x0: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *model_args,
    prediction_type: str = "epsilon",
    generator: torch.Generator | None = None,
    **model_kwargs,
) -> torch.Tensor:
    """The DDPM training objective (Ho et al. 2020, "L_simple") on one batch.

    Draw t uniformly from {0..T-1} and ε ~ N(0, I), noise x0 to x_t, ask the model for its
    prediction and return the mean squared error against the target: ε itself
    (``prediction_type="epsilon"``) or the velocity v = √ᾱ_t ε - √(1 - ᾱ_t) x_0
    (``"v_prediction"``). Extra arguments (the text context, say) go to the model.
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type={prediction_type!r} is not known; use 'epsilon' or 'v_prediction'.")
    batch = x0.shape[0]
    t = torch.randint(0, len(alphas_cumprod), (batch,), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    x_t = q_sample(x0, t, noise, alphas_cumprod)
    prediction = model(x_t, t, *model_args, **model_kwargs)
    target = noise if prediction_type == "epsilon" else velocity(x0, noise, t, alphas_cumprod)
    return F.mse_loss(prediction, target)


# --- the toy denoiser and the reverse process (chapter 01) -----------------------------------


def sinusoidal_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sines and cosines of t at geometrically spaced frequencies: (B,) -> (B, dim).

    A network reads a step number far better this way than as one raw number; the U-Net
    uses the same idea (chapter 04).
    """
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    angles = t.float()[:, None] * frequencies[None, :]  # (B, half)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (B, dim)


class ToyDenoiser(torch.nn.Module):
    """ε_θ(x_t, t) for 2-D points: a small MLP fed the point and sinusoidal features of t."""

    def __init__(self, data_dim: int = 2, hidden: int = 128, time_dim: int = 32, depth: int = 3):
        super().__init__()
        self.time_dim = time_dim
        layers, width = [], data_dim + time_dim
        for _ in range(depth):
            layers += [torch.nn.Linear(width, hidden), torch.nn.SiLU()]
            width = hidden
        layers.append(torch.nn.Linear(hidden, data_dim))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])  # (B,)
        return self.net(torch.cat([x, sinusoidal_features(t, self.time_dim)], dim=1))  # (B, data_dim)


@torch.no_grad()
def generate(model, scheduler, shape: tuple[int, ...], num_inference_steps: int,
             generator: torch.Generator | None = None, progress: bool = False, **scheduler_step_kwargs) -> torch.Tensor:
    """The reverse process: start from pure noise and let the scheduler walk it back, one model call a step.

    The same loop drives every scheduler and, with a U-Net and text, Stable Diffusion itself.
    """
    scheduler.set_timesteps(num_inference_steps)
    x = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma  # x_T
    timesteps = scheduler.timesteps
    if progress:
        from tqdm.auto import tqdm

        timesteps = tqdm(timesteps, desc=type(scheduler).__name__, leave=False)
    for t in timesteps:
        model_input = scheduler.scale_model_input(x, t)
        prediction = model(model_input, t)
        x = scheduler.step(prediction, t, x, generator=generator, **scheduler_step_kwargs)
    return x
