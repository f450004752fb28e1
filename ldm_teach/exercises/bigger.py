"""Checkers for chapter 08's exercises (bigger models, the samplers people use): Karras et al.'s noise
levels, one Euler ancestral step, the v-prediction target (``base.compare`` does the comparing)."""
from __future__ import annotations

from typing import Callable

import torch

from .. import diffusion
from ..samplers import ancestral_sigmas
from .base import CheckResult, compare
from .diffusion import random_schedule


def reference_karras_sigmas(sigma_min, sigma_max, num_inference_steps, rho):
    """Karras et al.'s n noise levels from ``sigma_max`` down to ``sigma_min``, spaced evenly in σ^(1/ρ), as torch
    operations (so that they are differentiable in the 0-d tensors ``sigma_min`` and ``sigma_max``)."""
    ramp = torch.linspace(0, 1, num_inference_steps, dtype=sigma_max.dtype)  # (n,)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho  # (n,)


def check_karras_sigmas(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 08): ``karras_sigmas(sigma_min, sigma_max, num_inference_steps, rho)`` -> the (n,) noise
    levels σ_i = (σ_max^(1/ρ) + i/(n-1) · (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ, largest first; ``sigma_min`` and
    ``sigma_max`` are 0-d tensors, and the result is differentiable in both."""
    generator = torch.Generator().manual_seed(seed)
    uniform = lambda low, high: float(torch.empty(()).uniform_(low, high, generator=generator))  # noqa: E731
    levels = [(0.0292, 14.6146, 10, 7.0), (0.002, 80.0, 18, 7.0), (0.1, 10.0, 5, 3.0),
              (uniform(0.01, 0.1), uniform(5, 20), int(torch.randint(2, 40, (), generator=generator)), uniform(2, 9)),
              (0.03, 14.6, 1, 7.0)]  # one step: σ_max alone
    cases = [dict(sigma_min=torch.tensor(low, dtype=torch.float64), sigma_max=torch.tensor(high, dtype=torch.float64),
                  num_inference_steps=n, rho=rho) for low, high, n, rho in levels]
    mistakes = {
        "ρ in the wrong place: the levels are spaced evenly in σ^(1/ρ) and the result raised to ρ, "
        "not spaced in σ^ρ and raised to 1/ρ":
            lambda sigma_min, sigma_max, num_inference_steps, rho:
                reference_karras_sigmas(sigma_min, sigma_max, num_inference_steps, 1 / rho),
        "the levels in increasing order: a sampler visits the largest σ first":
            lambda **case: reference_karras_sigmas(**case).flip(0),
        "the ramp i / n instead of i / (n - 1): the last level must be σ_min itself":
            lambda sigma_min, sigma_max, num_inference_steps, rho:
                (sigma_max ** (1 / rho) + torch.arange(num_inference_steps, dtype=torch.float64) / num_inference_steps
                 * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho,
        "ρ ignored (levels evenly spaced in σ)":
            lambda sigma_min, sigma_max, num_inference_steps, rho:
                reference_karras_sigmas(sigma_min, sigma_max, num_inference_steps, 1.0),
    }
    return compare("karras_sigmas", learner, reference_karras_sigmas, cases, mistakes, rtol=1e-5, atol=1e-7,
                   gradients=("sigma_min", "sigma_max"),
                   shape_hint="return one level per step: a (num_inference_steps,) tensor.", seed=seed)


def reference_euler_ancestral_step(model_output, x, sigma_from, sigma_to, noise):
    """One Euler ancestral step for an ε-predicting model: Euler from σ_from down to σ_down, then ``noise`` scaled
    by σ_up, where σ_up² = σ_to² (σ_from² - σ_to²) / σ_from² and σ_down² = σ_to² - σ_up²."""
    sigma_up, sigma_down = ancestral_sigmas(sigma_from, sigma_to)
    x0 = x - sigma_from * model_output  # the model's estimate of the clean sample
    derivative = (x - x0) / sigma_from  # the probability-flow ODE's slope dx/dσ
    return x + derivative * (sigma_down - sigma_from) + noise * sigma_up


def _ancestral_with(model_output, x, sigma_from, sigma_to, noise, sigma_up, sigma_down):
    return x + model_output * (sigma_down - sigma_from) + noise * sigma_up


def check_euler_ancestral_step(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 08): ``euler_ancestral_step(model_output, x, sigma_from, sigma_to, noise)`` -> the sample
    at noise level σ_to: split the step into σ_up and σ_down, take Euler's step to σ_down with the model's noise
    prediction, add ``noise`` times σ_up. The σ are 0-d tensors; differentiable in model_output and x."""
    generator = torch.Generator().manual_seed(seed)
    levels = [(14.6146, 10.2), (1.3, 0.9), (0.5, 0.0),  # the last step lands on σ = 0: no noise is added
              (float(torch.empty(()).uniform_(3, 12, generator=generator)),
               float(torch.empty(()).uniform_(0.5, 2.5, generator=generator)))]
    cases = []
    for (sigma_from, sigma_to), shape in zip(levels, [(2, 4, 8, 8), (1, 4, 6, 10), (3, 4, 4, 4), (2, 4, 4, 6)]):
        cases.append(dict(model_output=torch.randn(shape, generator=generator, dtype=torch.float64),
                          x=torch.randn(shape, generator=generator, dtype=torch.float64) * (sigma_from**2 + 1) ** 0.5,
                          sigma_from=torch.tensor(sigma_from, dtype=torch.float64),
                          sigma_to=torch.tensor(sigma_to, dtype=torch.float64),
                          noise=torch.randn(shape, generator=generator, dtype=torch.float64)))

    def variance_as_std(model_output, x, sigma_from, sigma_to, noise):
        variance = sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2
        return _ancestral_with(model_output, x, sigma_from, sigma_to, noise, variance, (sigma_to**2 - variance) ** 0.5)

    def euler_to_sigma_to(model_output, x, sigma_from, sigma_to, noise):
        sigma_up, _ = ancestral_sigmas(sigma_from, sigma_to)
        return _ancestral_with(model_output, x, sigma_from, sigma_to, noise, sigma_up, sigma_to)

    def noise_times_sigma_to(model_output, x, sigma_from, sigma_to, noise):
        _, sigma_down = ancestral_sigmas(sigma_from, sigma_to)
        return _ancestral_with(model_output, x, sigma_from, sigma_to, noise, sigma_to, sigma_down)

    mistakes = {
        "σ_up without the square root: σ_to² (σ_from² - σ_to²) / σ_from² is the added noise's variance; "
        "its standard deviation σ_up is the square root of it": variance_as_std,
        "the Euler step taken all the way to σ_to: it must stop at σ_down, so that the added noise brings "
        "the sample back up to σ_to": euler_to_sigma_to,
        "the noise scaled by σ_to instead of σ_up": noise_times_sigma_to,
        "no noise added (that is the deterministic step to σ_down)":
            lambda **case: reference_euler_ancestral_step(**{**case, "noise": torch.zeros_like(case["noise"])}),
    }
    return compare("euler_ancestral_step", learner, reference_euler_ancestral_step, cases, mistakes,
                   rtol=1e-5, atol=1e-6, gradients=("model_output", "x"), seed=seed)


def check_velocity(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 08): ``velocity(x0, noise, t, alphas_cumprod)`` -> v = √ᾱ_t ε - √(1 - ᾱ_t) x_0, the target of
    v-prediction (SD 2.x's 768-pixel models), for a batch of steps t; differentiable in x0 and noise."""
    generator = torch.Generator().manual_seed(seed)
    cases = [dict(x0=torch.randn(shape, generator=generator, dtype=torch.float64),
                  noise=torch.randn(shape, generator=generator, dtype=torch.float64),
                  t=torch.randint(0, 1000, (shape[0],), generator=generator),
                  alphas_cumprod=random_schedule(generator))
             for shape in [(8, 2), (4, 3, 8, 8), (2, 4, 6, 10)]]
    cases[0]["t"][:2] = torch.tensor([0, 999])  # both ends of the schedule

    def combine(x0, noise, t, alphas_cumprod, of_noise, of_x0):
        alpha_prod = alphas_cumprod[t].reshape(-1, *[1] * (x0.ndim - 1)).to(x0.dtype)  # (B, 1, ...)
        return of_noise(alpha_prod) * noise + of_x0(alpha_prod) * x0

    mistakes = {
        "the sign flipped: v = √ᾱ_t ε − √(1 − ᾱ_t) x_0, not √(1 − ᾱ_t) x_0 − √ᾱ_t ε":
            lambda **c: combine(**c, of_noise=lambda a: -a**0.5, of_x0=lambda a: (1 - a) ** 0.5),
        "a plus where the minus belongs: √ᾱ_t ε + √(1 − ᾱ_t) x_0 is x_t's formula with the roles swapped":
            lambda **c: combine(**c, of_noise=lambda a: a**0.5, of_x0=lambda a: (1 - a) ** 0.5),
        "ε and x_0 swapped: √ᾱ_t multiplies the noise ε in v":
            lambda **c: combine(**c, of_noise=lambda a: -(1 - a) ** 0.5, of_x0=lambda a: a**0.5),
        "the square roots left out (ᾱ_t and 1 − ᾱ_t where √ᾱ_t and √(1 − ᾱ_t) belong)":
            lambda **c: combine(**c, of_noise=lambda a: a, of_x0=lambda a: -(1 - a)),
    }
    return compare("velocity", learner, diffusion.velocity, cases, mistakes, rtol=1e-5, atol=1e-6,
                   gradients=("x0", "noise"),
                   shape_hint="alphas_cumprod[t] has shape (B,); reshape it to (B, 1, ...) so it broadcasts over x0.",
                   seed=seed)
