"""Checkers for chapter 07's exercises (editing and control): the start step for a strength, one blending
step, the 9-channel input, the skips a ControlNet steers (``base.compare`` does the comparing)."""
from __future__ import annotations

from typing import Callable

import torch

from ..editing import blend_known_region, inpainting_input, start_step
from .base import CheckResult, compare, verdict


def check_start_step(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 07): ``start_step(num_inference_steps, strength)`` -> how many of the schedule's
    first steps img2img skips, as diffusers' ``get_timesteps`` computes it."""
    generator = torch.Generator().manual_seed(seed)
    cases = [(50, 0.8), (10, 0.55), (10, 1.0), (4, 0.3), (25, 0.5), (100, 0.29), (7, 0.99), (30, 0.35)]
    cases += [(int(torch.randint(2, 200, (), generator=generator)), float(torch.rand((), generator=generator)) * 0.98 + 0.01)
              for _ in range(4)]  # and a few the seed picks, so an answer cannot be a table of the fixed ones
    mistakes = {
        "rounding int(n · strength) to the nearest integer: diffusers truncates it with int()":
            lambda n, s: n - min(round(n * s), n),
        "returning the number of steps that run, int(n · strength), instead of the number skipped":
            lambda n, s: min(int(n * s), n),
        "computing int(n · (1 − strength)): float rounding makes it differ from n − int(n · strength)":
            lambda n, s: int(n * (1 - s)),
    }
    for number, (n, strength) in enumerate(cases, start=1):
        expected = start_step(n, strength)
        try:
            got = learner(n, strength)
        except Exception as error:  # the learner's code may fail in any way; report it, don't crash
            return verdict(False, f"start_step: your function raised {type(error).__name__}: {error} "
                                   f"(num_inference_steps={n}, strength={strength}).", "start_step", number, seed)
        if not isinstance(got, int) or isinstance(got, bool):
            return verdict(False, f"start_step: expected an int, got {type(got).__name__} "
                                   f"(num_inference_steps={n}, strength={strength}).", "start_step", number, seed)
        if got != expected:
            message = (f"start_step: num_inference_steps={n}, strength={strength}: expected {expected}, got {got}.")
            for mistake, wrong in mistakes.items():
                if wrong(n, strength) == got:
                    message += f"\n  Hint: your result matches a common mistake: {mistake}."
                    break
            return verdict(False, message, "start_step", number, seed)
    return verdict(True, f"start_step: correct on {len(cases)} cases, float rounding included.", "start_step", None, seed)


def reference_blend_step(latents, image_latents, noise, mask, scheduler, next_timestep):
    """The latents after one step of inpainting by blending: the scheduler's new ``latents`` where ``mask`` is
    1, the known image's latents noised to ``next_timestep`` (the next step's level) where it is 0."""
    known = scheduler.add_noise(image_latents, noise, torch.tensor([next_timestep]))
    return blend_known_region(latents, known, mask)


def check_blend_step(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 07): ``blend_step(latents, image_latents, noise, mask, scheduler, next_timestep)``."""
    from ..schedulers import DDIMScheduler

    generator = torch.Generator().manual_seed(seed)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    scheduler.set_timesteps(10)
    cases = []
    for batch, height, width, step in [(2, 8, 8, 3), (1, 6, 10, 8)]:
        shape = (batch, 4, height, width)
        cases.append(dict(latents=torch.randn(shape, generator=generator, dtype=torch.float64),
                          image_latents=torch.randn(shape, generator=generator, dtype=torch.float64),
                          noise=torch.randn(shape, generator=generator, dtype=torch.float64),
                          mask=(torch.rand(batch, 1, height, width, generator=generator) > 0.5).double(),
                          scheduler=scheduler, next_timestep=int(scheduler.timesteps[step])))
    mistakes = {
        "the mask's meaning inverted: 1 (white) means repaint, so the new latents go where mask == 1":
            lambda **c: reference_blend_step(**{**c, "mask": 1 - c["mask"]}),
        "the known latents put back without noise: at step t they must be noised to the next step's level":
            lambda latents, image_latents, noise, mask, scheduler, next_timestep:
                blend_known_region(latents, image_latents, mask),
        "the known region noised to the start (timestep 999) rather than to next_timestep":
            lambda **c: reference_blend_step(**{**c, "next_timestep": int(scheduler.timesteps[0])}),
    }
    return compare("blend_step", learner, reference_blend_step, cases, mistakes, atol=1e-10,
                   gradients=("latents", "image_latents"), seed=seed)


def check_inpainting_input(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 07): ``inpainting_input(model_input, mask, masked_image_latents)`` -> the 9-channel
    U-Net's input (B, 9, h, w)."""
    generator = torch.Generator().manual_seed(seed)
    cases = [dict(model_input=torch.randn(batch, 4, h, w, generator=generator, dtype=torch.float64),
                  mask=(torch.rand(batch, 1, h, w, generator=generator) > 0.5).double(),
                  masked_image_latents=torch.randn(batch, 4, h, w, generator=generator, dtype=torch.float64))
             for batch, h, w in [(2, 8, 8), (4, 6, 10)]]
    mistakes = {
        "the mask after the masked image's latents: SD's order is latents, mask, masked image latents":
            lambda model_input, mask, masked_image_latents: torch.cat([model_input, masked_image_latents, mask], 1),
        "the mask first: SD's order is latents (channels 0-3), mask (4), masked image latents (5-8)":
            lambda model_input, mask, masked_image_latents: torch.cat([mask, model_input, masked_image_latents], 1),
    }
    return compare("inpainting_input", learner, inpainting_input, cases, mistakes, atol=1e-12, seed=seed)


def reference_controlled_skips(skips, down_residuals, conditioning_scale):
    """The U-Net's skips (N, B, C, h, w) with a ControlNet's residuals added, scaled by ``conditioning_scale``."""
    return skips + conditioning_scale * down_residuals


def check_controlled_skips(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 07): ``controlled_skips(skips, down_residuals, conditioning_scale)`` -> the skips
    (N, B, C, h, w), stacked, that the U-Net's up path reads when a ControlNet steers it."""
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for count, scale in [(4, 0.7), (6, 1.0), (3, 0.0)]:
        skips = torch.randn(count, 2, 8, 4, 4, generator=generator, dtype=torch.float64)
        cases.append(dict(skips=skips, down_residuals=torch.randn(skips.shape, generator=generator,
                                                                  dtype=torch.float64),
                          conditioning_scale=scale))
    mistakes = {
        "the residuals replace the skips instead of being added to them":
            lambda skips, down_residuals, conditioning_scale: conditioning_scale * down_residuals,
        "conditioning_scale left out":
            lambda skips, down_residuals, conditioning_scale: skips + down_residuals,
        "the skips scaled instead of the residuals":
            lambda skips, down_residuals, conditioning_scale: conditioning_scale * skips + down_residuals,
    }
    return compare("controlled_skips", learner, reference_controlled_skips, cases, mistakes, atol=1e-12,
                   gradients=("down_residuals",), seed=seed)
