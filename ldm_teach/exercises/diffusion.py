"""Checkers for chapter 01's exercises: the closed-form forward process, the posterior mean, a DDIM step."""
from __future__ import annotations

from typing import Callable

import torch

from .. import diffusion
from .base import CheckResult, compare


def random_schedule(generator: torch.Generator) -> torch.Tensor:
    """ᾱ_t of one of SD's three beta schedules, picked at random, T = 1000 (float32, as the package makes it)."""
    schedule = ["linear", "scaled_linear", "squaredcos_cap_v2"][int(torch.randint(3, (), generator=generator))]
    return diffusion.alphas_cumprod_from_betas(diffusion.make_betas(schedule, 1000, 0.00085, 0.012))


def _without_square_roots(x0, t, noise, alphas_cumprod):
    alpha_prod = alphas_cumprod[t].reshape(-1, *[1] * (x0.ndim - 1))  # (B, 1, ...)
    return alpha_prod * x0 + (1 - alpha_prod) * noise


def check_q_sample(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 01): ``q_sample(x0, t, noise, alphas_cumprod)`` -> x_t, for a batch of steps t;
    differentiable in x0 and noise, which it leaves unchanged."""
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for shape in [(8, 2), (4, 3, 8, 8), (1, 1)]:
        cases.append(dict(
            x0=torch.randn(shape, generator=generator),
            t=torch.randint(0, 1000, (shape[0],), generator=generator),
            noise=torch.randn(shape, generator=generator),
            alphas_cumprod=random_schedule(generator),
        ))
    mistakes = {
        "the square roots left out (ᾱ_t and 1 - ᾱ_t where √ᾱ_t and √(1 - ᾱ_t) belong)": _without_square_roots,
        "the two coefficients swapped (noise scaled by √ᾱ_t)": lambda x0, t, noise, alphas_cumprod: diffusion.q_sample(
            noise, t, x0, alphas_cumprod),
        "alphas_cumprod[t - 1] instead of alphas_cumprod[t]": lambda x0, t, noise, alphas_cumprod: diffusion.q_sample(
            x0, (t - 1).clamp(min=0), noise, alphas_cumprod),
    }
    return compare("q_sample", learner, diffusion.q_sample, cases, mistakes, gradients=("x0", "noise"),
                   shape_hint="alphas_cumprod[t] has shape (B,); reshape it to (B, 1, ...) so it broadcasts over x0.",
                   seed=seed)


def check_posterior_mean(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 01): ``posterior_mean(x0, x_t, t, alphas_cumprod)``, the mean of q(x_{t-1} | x_t, x_0),
    for one integer step t (ᾱ_{-1} = 1); differentiable in x0 and x_t."""
    generator = torch.Generator().manual_seed(seed)
    steps = [500, 1, 999, 0, int(torch.randint(2, 999, (), generator=generator))]
    cases = []
    for shape, t in zip([(16, 2), (2, 3, 4, 4), (5, 2), (3, 2), (4, 2)], steps):
        cases.append(dict(
            x0=torch.randn(shape, generator=generator),
            x_t=torch.randn(shape, generator=generator),
            t=t,
            alphas_cumprod=random_schedule(generator),
        ))

    def swapped(x0, x_t, t, alphas_cumprod):
        return diffusion.q_posterior_mean(x_t, x0, t, alphas_cumprod)

    def previous_step(x0, x_t, t, alphas_cumprod):  # ᾱ_t and ᾱ_{t-1} one step off
        return diffusion.q_posterior_mean(x0, x_t, max(t - 1, 0), alphas_cumprod)

    mistakes = {"x_0 and x_t swapped": swapped,
                "the step off by one: ᾱ_{t-1} and ᾱ_{t-2} used where ᾱ_t and ᾱ_{t-1} belong": previous_step}
    # at small t, β_t = 1 - ᾱ_t/ᾱ_{t-1} cancels: any float32 formula is up to ~2e-4 from the exact mean there
    return compare("posterior_mean", learner, diffusion.q_posterior_mean, cases, mistakes, gradients=("x0", "x_t"),
                   rtol=1e-4, atol=1e-3, seed=seed)


def reference_ddim_step(eps, x_t, alpha_prod_t, alpha_prod_prev):
    """One deterministic DDIM step (η = 0): predict x_0, then re-noise it to the previous level."""
    x0 = (x_t - (1 - alpha_prod_t) ** 0.5 * eps) / alpha_prod_t**0.5
    return alpha_prod_prev**0.5 * x0 + (1 - alpha_prod_prev) ** 0.5 * eps


def check_ddim_step(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 01): ``ddim_step(eps, x_t, alpha_prod_t, alpha_prod_prev)`` -> x_{t_prev} with η = 0;
    differentiable in eps and x_t."""
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for shape in [(8, 2), (2, 4, 8, 8), (3, 2)]:
        alphas_cumprod = random_schedule(generator)
        t, t_prev = sorted(torch.randint(0, 1000, (2,), generator=generator).tolist(), reverse=True)
        t_prev = min(t_prev, 998)
        cases.append(dict(
            eps=torch.randn(shape, generator=generator),
            x_t=torch.randn(shape, generator=generator),
            alpha_prod_t=alphas_cumprod[max(t, t_prev + 1)],
            alpha_prod_prev=alphas_cumprod[t_prev],
        ))

    def forgot_renoise(eps, x_t, alpha_prod_t, alpha_prod_prev):
        return (x_t - (1 - alpha_prod_t) ** 0.5 * eps) / alpha_prod_t**0.5

    def levels_swapped(eps, x_t, alpha_prod_t, alpha_prod_prev):
        return reference_ddim_step(eps, x_t, alpha_prod_prev, alpha_prod_t)

    mistakes = {"returned the predicted x_0 without moving it to the previous noise level": forgot_renoise,
                "alpha_prod_t and alpha_prod_prev swapped: x_0 predicted with ᾱ_prev and re-noised with ᾱ_t":
                    levels_swapped}
    # the division by √ᾱ_t amplifies float32 rounding near t = 999 (√ᾱ_t ≈ 0.07): a relative tolerance
    return compare("ddim_step", learner, reference_ddim_step, cases, mistakes, gradients=("eps", "x_t"),
                   rtol=1e-5, atol=1e-5, seed=seed)
