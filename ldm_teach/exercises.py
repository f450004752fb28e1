"""Checkers for the chapters' exercises.

A checker runs the learner's function and the package's own on the same random inputs and
says what is off: an exception, a wrong type, shape or dtype, or the worst value and where
it is. Where a wrong answer matches a common mistake, it names the mistake. It prints its
verdict and returns a ``CheckResult`` that is truthy when the function passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import diffusion


@dataclass
class CheckResult:
    passed: bool
    message: str

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        return self.message


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)}, dtype {value.dtype}"
    return f"{type(value).__name__}"


def compare(name: str, learner: Callable, reference: Callable, cases: list[dict],
            mistakes: dict[str, Callable] | None = None, atol: float = 1e-5) -> CheckResult:
    """Run ``learner`` and ``reference`` on each case (keyword arguments) and report the first difference."""
    for number, case in enumerate(cases, start=1):
        inputs = ", ".join(f"{key}: {_describe(value)}" for key, value in case.items())
        expected = reference(**case)
        try:
            got = learner(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in case.items()})
        except Exception as error:  # the learner's code may fail in any way; report it, don't crash
            return _verdict(False, f"{name}: your function raised {type(error).__name__}: {error}\n"
                                   f"  on case {number} with {inputs}.")
        if not isinstance(got, torch.Tensor):
            return _verdict(False, f"{name}: expected a torch.Tensor, your function returned {_describe(got)}.")
        if got.shape != expected.shape:
            return _verdict(False, f"{name}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)} "
                                   f"on case {number} ({inputs}). Check how t broadcasts against x.")
        if got.dtype != expected.dtype:
            return _verdict(False, f"{name}: expected dtype {expected.dtype}, got {got.dtype}.")
        if not torch.isfinite(got).all():
            return _verdict(False, f"{name}: your result has NaN or inf values on case {number}.")
        difference = (got - expected).abs()
        worst = float(difference.max())
        if worst > atol:
            where = tuple(int(i) for i in torch.unravel_index(difference.argmax(), difference.shape))
            message = (f"{name}: values differ on case {number} ({inputs}).\n"
                       f"  worst |difference| {worst:.3g} at index {where}: "
                       f"got {float(got[where]):.6g}, expected {float(expected[where]):.6g}.")
            for mistake, wrong in (mistakes or {}).items():
                if torch.allclose(got, wrong(**case), atol=atol):
                    message += f"\n  Hint: your result matches a common mistake: {mistake}."
                    break
            return _verdict(False, message)
    return _verdict(True, f"{name}: correct on {len(cases)} random cases (tolerance {atol:g}).")


def _verdict(passed: bool, message: str) -> CheckResult:
    print(("✅ " if passed else "❌ ") + message)
    return CheckResult(passed, message)


def _random_schedule(generator: torch.Generator) -> torch.Tensor:
    schedule = ["linear", "scaled_linear", "squaredcos_cap_v2"][int(torch.randint(3, (), generator=generator))]
    return diffusion.alphas_cumprod_from_betas(diffusion.make_betas(schedule, 1000, 0.00085, 0.012))


def _without_square_roots(x0, t, noise, alphas_cumprod):
    alpha_prod = alphas_cumprod[t].reshape(-1, *[1] * (x0.ndim - 1))  # (B, 1, ...)
    return alpha_prod * x0 + (1 - alpha_prod) * noise


def check_q_sample(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 01): ``q_sample(x0, t, noise, alphas_cumprod)`` -> x_t, for a batch of steps t."""
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for shape in [(8, 2), (4, 3, 8, 8), (1, 1)]:
        cases.append(dict(
            x0=torch.randn(shape, generator=generator),
            t=torch.randint(0, 1000, (shape[0],), generator=generator),
            noise=torch.randn(shape, generator=generator),
            alphas_cumprod=_random_schedule(generator),
        ))
    mistakes = {
        "the square roots left out (ᾱ_t and 1 - ᾱ_t where √ᾱ_t and √(1 - ᾱ_t) belong)": _without_square_roots,
        "the two coefficients swapped (noise scaled by √ᾱ_t)": lambda x0, t, noise, alphas_cumprod: diffusion.q_sample(
            noise, t, x0, alphas_cumprod),
        "alphas_cumprod[t - 1] instead of alphas_cumprod[t]": lambda x0, t, noise, alphas_cumprod: diffusion.q_sample(
            x0, (t - 1).clamp(min=0), noise, alphas_cumprod),
    }
    return compare("q_sample", learner, diffusion.q_sample, cases, mistakes)


def check_posterior_mean(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 01): ``posterior_mean(x0, x_t, t, alphas_cumprod)``, the mean of q(x_{t-1} | x_t, x_0)."""
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for shape, t in [((16, 2), 500), ((2, 3, 4, 4), 1), ((5, 2), 999), ((3, 2), 0)]:
        cases.append(dict(
            x0=torch.randn(shape, generator=generator),
            x_t=torch.randn(shape, generator=generator),
            t=t,
            alphas_cumprod=_random_schedule(generator),
        ))

    def swapped(x0, x_t, t, alphas_cumprod):
        return diffusion.q_posterior_mean(x_t, x0, t, alphas_cumprod)

    return compare("posterior_mean", learner, diffusion.q_posterior_mean, cases, {"x_0 and x_t swapped": swapped})


def reference_ddim_step(eps, x_t, alpha_prod_t, alpha_prod_prev):
    """One deterministic DDIM step (η = 0): predict x_0, then re-noise it to the previous level."""
    x0 = (x_t - (1 - alpha_prod_t) ** 0.5 * eps) / alpha_prod_t**0.5
    return alpha_prod_prev**0.5 * x0 + (1 - alpha_prod_prev) ** 0.5 * eps


def check_ddim_step(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 01): ``ddim_step(eps, x_t, alpha_prod_t, alpha_prod_prev)`` -> x_{t_prev} with η = 0."""
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for shape in [(8, 2), (2, 4, 8, 8)]:
        alphas_cumprod = _random_schedule(generator)
        t, t_prev = sorted(torch.randint(0, 1000, (2,), generator=generator).tolist(), reverse=True)
        cases.append(dict(
            eps=torch.randn(shape, generator=generator),
            x_t=torch.randn(shape, generator=generator),
            alpha_prod_t=alphas_cumprod[t],
            alpha_prod_prev=alphas_cumprod[t_prev],
        ))

    def forgot_renoise(eps, x_t, alpha_prod_t, alpha_prod_prev):
        return (x_t - (1 - alpha_prod_t) ** 0.5 * eps) / alpha_prod_t**0.5

    mistakes = {"returned the predicted x_0 without moving it to the previous noise level": forgot_renoise}
    return compare("ddim_step", learner, reference_ddim_step, cases, mistakes)


# --- chapter 02: the VAE ---------------------------------------------------------------------


# --- chapter 03: CLIP ------------------------------------------------------------------------


# --- chapter 04: the U-Net -------------------------------------------------------------------
