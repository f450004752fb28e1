"""Checkers for chapter 02's exercises: the reparameterisation trick, the KL term, the scaling factor."""
from __future__ import annotations

from typing import Callable

import torch

from .base import CheckResult, compare


def _posterior(mean: torch.Tensor, logvar: torch.Tensor):
    from ..vae import DiagonalGaussian  # imported here: each chapter's checkers keep their imports to themselves

    return DiagonalGaussian(torch.cat([mean, logvar], dim=1))  # moments (B, 2C, h, w)


def _latent_moments(generator: torch.Generator) -> list[dict]:
    cases = []
    for shape in [(2, 4, 8, 8), (3, 4, 5, 7), (1, 2, 4, 4)]:
        cases.append(dict(
            mean=2 * torch.randn(shape, generator=generator),
            logvar=torch.empty(shape).uniform_(-8.0, 2.0, generator=generator),
        ))
    return cases


def check_reparameterise(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 02): ``reparameterise(mean, logvar, eps)`` -> z = mean + std * eps; the checker
    back-propagates through z and compares the gradients on mean and logvar with the reference's."""
    generator = torch.Generator().manual_seed(seed)
    cases = [dict(**moments, eps=torch.randn(moments["mean"].shape, generator=generator))
             for moments in _latent_moments(generator)]

    def reference(mean, logvar, eps):
        return mean + torch.exp(0.5 * logvar) * eps  # what DiagonalGaussian.sample computes

    mistakes = {
        "the log-variance used as the standard deviation (mean + logvar * eps)":
            lambda mean, logvar, eps: mean + logvar * eps,
        "the variance used where the standard deviation belongs (exp(logvar) instead of exp(0.5 * logvar))":
            lambda mean, logvar, eps: mean + logvar.exp() * eps,
        "the square root taken twice (exp(0.25 * logvar))":
            lambda mean, logvar, eps: mean + (0.25 * logvar).exp() * eps,
        "eps left out: that returns the mean, the mode, not a sample": lambda mean, logvar, eps: mean,
    }
    return compare("reparameterise", learner, reference, cases, mistakes, gradients=("mean", "logvar"),
                   rtol=1e-5, atol=1e-6, seed=seed)


def check_kl_divergence(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 02): ``kl_divergence(mean, logvar)`` -> KL(N(mean, exp(logvar)) || N(0, I)) per sample, (B,);
    differentiable in mean and logvar."""
    cases = _latent_moments(torch.Generator().manual_seed(seed))

    def reference(mean, logvar):
        return _posterior(mean, logvar).kl()

    mistakes = {
        "the factor 1/2 left out": lambda mean, logvar: 2 * reference(mean, logvar),
        "a mean over the latent entries instead of a sum":
            lambda mean, logvar: reference(mean, logvar) / mean[0].numel(),
        "the sign of the log-variance term flipped (+ logvar instead of - logvar)":
            lambda mean, logvar: 0.5 * torch.sum(mean**2 + logvar.exp() - 1 + logvar, dim=(1, 2, 3)),
        "the standard deviation used where the variance belongs (exp(0.5 * logvar) instead of exp(logvar))":
            lambda mean, logvar: 0.5 * torch.sum(mean**2 + (0.5 * logvar).exp() - 1 - logvar, dim=(1, 2, 3)),
        "the mean's term left out (KL of the spread alone)":
            lambda mean, logvar: 0.5 * torch.sum(logvar.exp() - 1 - logvar, dim=(1, 2, 3)),
    }
    return compare("kl_divergence", learner, reference, cases, mistakes, gradients=("mean", "logvar"),
                   rtol=1e-5, atol=1e-4, seed=seed,
                   shape_hint="return one KL per image: sum over the channel and spatial dimensions (1, 2, 3) only.")


def reference_scaling_factor(latents: torch.Tensor) -> torch.Tensor:
    """LDM's rule: one number, 1 / (the standard deviation of every latent value in the batch)."""
    return 1.0 / latents.flatten().std()


def check_scaling_factor(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 02): ``scaling_factor(latents)`` -> the one number that gives a batch of latents unit
    variance (a 0-d tensor or a Python float)."""
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for shape, spread, offset in [((8, 4, 16, 16), 5.49, 0.8), ((16, 4, 8, 8), 2.5, -0.3), ((4, 4, 32, 16), 4.0, 1.5)]:
        channel_spread = spread * torch.tensor([1.0, 0.6, 1.3, 0.9]).view(1, 4, 1, 1)  # channels differ, as SD's do
        cases.append(dict(latents=offset + channel_spread * torch.randn(shape, generator=generator)))

    def as_tensor(latents):
        value = learner(latents)
        return torch.tensor(float(value)) if isinstance(value, (float, int)) else value

    mistakes = {
        "the standard deviation itself, not its reciprocal": lambda latents: latents.flatten().std(),
        "1 / variance instead of 1 / standard deviation": lambda latents: 1.0 / latents.flatten().var(),
        "1 / root mean square: the mean was not subtracted (std measures the spread about the mean)":
            lambda latents: latents.pow(2).mean().rsqrt(),
        "the average of per-channel factors instead of one factor from all values":
            lambda latents: (1.0 / latents.transpose(0, 1).flatten(1).std(dim=1)).mean(),
    }
    # either estimate of the std passes: the biased and unbiased ones differ by 1/(2n) ≈ 6e-5 relatively here
    return compare("scaling_factor", as_tensor, reference_scaling_factor, cases, mistakes, rtol=2e-4, atol=0,
                   shape_hint="return one number for the whole batch: SD multiplies every channel by the same factor.",
                   seed=seed)

