"""Checkers for chapter 05's exercises: one training step, caption dropout, the EMA update."""
from __future__ import annotations

import copy
from functools import partial
from typing import Callable

import torch

from .. import diffusion
from .base import CheckResult, GeneratorSeed, Rejected, compare


def tiny_unet(seed: int, channels: int = 4, context_dim: int = 16):
    """A small random U-Net (two levels, 8 and 16 channels) for the checkers."""
    from ..unet import UNet, UNetConfig

    torch.manual_seed(seed)
    return UNet(UNetConfig.tiny(in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                                norm_num_groups=4, attention_head_dim=2, cross_attention_dim=context_dim))


def count_calls(module: torch.nn.Module, function: Callable, *args):
    """``function(*args)`` and the number of times ``module``'s forward ran meanwhile."""
    calls = []
    hook = module.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        return function(*args), len(calls)
    finally:
        hook.remove()


def check_training_step(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 05): ``training_step(unet, latents, context, alphas_cumprod, generator)`` -> the
    loss of one step of latent diffusion training: t drawn with ``torch.randint(0, T, (B,), generator=...)``,
    then ε with ``torch.randn(latents.shape, generator=...)``, the latents noised to x_t, and the MSE
    between ``unet(x_t, t, context)`` and ε. One U-Net call; the gradients on the U-Net's parameters are
    compared with the reference's. (The checker passes a fresh ``torch.Generator`` seeded from its own ``seed``.)"""
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for batch, side, schedule in [(4, 8, "scaled_linear"), (2, 4, "linear"), (3, 6, "squaredcos_cap_v2")]:
        cases.append(dict(unet=tiny_unet(int(torch.randint(0, 2**31, (), generator=generator))),
                          latents=torch.randn(batch, 4, side, side, generator=generator),
                          context=torch.randn(batch, 5, 16, generator=generator),
                          alphas_cumprod=diffusion.NoiseSchedule.make(schedule, 1000, 0.00085, 0.012).alphas_cumprod,
                          generator=GeneratorSeed(torch.randint(0, 2**31, (), generator=generator))))

    def reference(unet, latents, context, alphas_cumprod, generator, target="noise", noise_first=False, low=0):
        step_generator = generator.generator()
        T = len(alphas_cumprod)
        if noise_first:
            noise = torch.randn(latents.shape, generator=step_generator)
            t = torch.randint(0, T, (len(latents),), generator=step_generator)
        else:
            t = torch.randint(low, T + low, (len(latents),), generator=step_generator)
            noise = torch.randn(latents.shape, generator=step_generator)
        noise = noise.to(latents.dtype)
        x_t = diffusion.q_sample(latents, t, noise, alphas_cumprod)
        wanted = {"noise": noise, "latents": latents, "x_t": x_t}[target]
        return torch.nn.functional.mse_loss(unet(x_t, t, context), wanted)

    def run_learner(unet, latents, context, alphas_cumprod, generator):
        loss, calls = count_calls(unet, learner, unet, latents, context, alphas_cumprod, generator.generator())
        if calls != 1:
            raise Rejected(f"the U-Net ran {calls} times; one training step calls it once, on the whole batch")
        return loss

    mistakes = {
        "the U-Net's output compared with the clean latents instead of the noise ε": partial(reference, target="latents"),
        "the U-Net's output compared with the noisy latents x_t instead of the noise ε": partial(reference, target="x_t"),
        "ε drawn before t: the same math on other random numbers; draw t first, then ε": partial(reference, noise_first=True),
        "t drawn from 1 to T (torch.randint(1, T + 1, ...)); the package's steps are 0 to T - 1": partial(reference, low=1),
    }
    return compare("training_step", run_learner, reference, cases, mistakes, gradients=("unet",),
                   rtol=1e-5, atol=1e-6, shape_hint="return the mean squared error, one number: a 0-d tensor.",
                   seed=seed)


def check_caption_dropout(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 05): ``caption_dropout(context, empty_context, probability, generator)``: each
    caption's context (B, L, D) replaced, whole, by the empty prompt's (L, D) where
    ``torch.rand(B, generator=generator)`` falls below ``probability``; the inputs stay unchanged."""
    from ..train import caption_dropout

    generator = torch.Generator().manual_seed(seed)
    cases = [dict(context=torch.randn(batch, length, width, generator=generator),
                  empty_context=torch.randn(length, width, generator=generator), probability=probability,
                  generator=GeneratorSeed(torch.randint(0, 2**31, (), generator=generator)))
             for batch, length, width, probability in [(64, 7, 8, 0.1), (16, 77, 4, 0.5), (8, 3, 2, 1.0)]]

    def reference(context, empty_context, probability, generator, fill=None, keep_below=False):
        drop = torch.rand(len(context), generator=generator.generator()) < probability  # (B,)
        drop = ~drop if keep_below else drop
        empty = empty_context if fill is None else torch.full_like(empty_context, fill)
        return torch.where(drop[:, None, None], empty, context)

    def package(context, empty_context, probability, generator):
        return caption_dropout(context, empty_context, probability, generator.generator())

    mistakes = {
        "dropped captions set to zeros instead of the empty prompt's features (the pipeline's unconditional "
        "input is the encoded empty prompt, not zeros)": partial(reference, fill=0.0),
        "the test inverted: captions dropped where the draw is at least `probability`, so 90% are dropped at 0.1":
            partial(reference, keep_below=True),
    }
    return compare("caption_dropout",
                   lambda context, empty_context, probability, generator: learner(
                       context, empty_context, probability, generator.generator()),
                   package, cases, mistakes, rtol=0, atol=0, seed=seed)


def check_ema_update(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 05): ``ema_update(ema_model, model, decay)`` moves each parameter of ``ema_model``
    in place to decay·ema + (1 - decay)·model and leaves ``model`` alone; it returns nothing."""
    from ..train import ema_update

    generator = torch.Generator().manual_seed(seed)
    cases = []
    for decay, width in [(0.999, 6), (0.9, 3), (0.5, 5)]:
        torch.manual_seed(int(torch.randint(0, 2**31, (), generator=generator)))
        model = torch.nn.Sequential(torch.nn.Linear(width, 4), torch.nn.SiLU(), torch.nn.Linear(4, 2))
        cases.append(dict(ema_model=copy.deepcopy(model).requires_grad_(False), model=model, decay=decay))
        with torch.no_grad():  # the EMA lags behind a model that has moved on
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator))

    def flat(module):
        return torch.cat([p.detach().flatten() for p in module.parameters()])

    def run(update, ema_model, model, decay):
        ema_model, model = copy.deepcopy(ema_model), copy.deepcopy(model)
        before = flat(model).clone()
        result = update(ema_model, model, decay)
        if result is not None and not isinstance(result, torch.nn.Module):
            raise Rejected(f"ema_update returned a {type(result).__name__}; update ema_model's parameters in place "
                           f"(.lerp_, .mul_().add_(), .copy_) and return nothing")
        if not torch.equal(flat(model), before):
            raise Rejected("the model's own weights changed; only ema_model's may change")
        return flat(ema_model)

    def swapped(ema_model, model, decay):
        with torch.no_grad():
            for ema_parameter, parameter in zip(ema_model.parameters(), model.parameters()):
                ema_parameter.copy_(decay * parameter + (1 - decay) * ema_parameter)

    mistakes = {
        "decay and 1 - decay swapped: the EMA jumps almost all the way to the new weights": partial(run, swapped),
        "ema_model left unchanged: assign into its parameters in place (.lerp_, .mul_().add_(), .copy_)":
            partial(run, lambda ema_model, model, decay: None),
    }
    return compare("ema_update", partial(run, learner), partial(run, ema_update), cases, mistakes,
                   rtol=1e-6, atol=1e-6, seed=seed)
