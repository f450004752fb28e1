"""Checkers for chapter 06's exercises: classifier-free guidance, the denoising loop, decoding latents."""
from __future__ import annotations

import copy
from functools import partial
from typing import Callable

import torch

from .base import CheckResult, Rejected, compare
from .training import count_calls


def reference_guidance(noise_uncond, noise_text, guidance_scale):
    """Classifier-free guidance's formula, ε_uncond + s·(ε_text − ε_uncond), for every s (no s ≤ 1 shortcut)."""
    return noise_uncond + guidance_scale * (noise_text - noise_uncond)


def check_guidance(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 06): ``guidance(noise_uncond, noise_text, guidance_scale)``, classifier-free
    guidance's combination of the unconditional and the text-conditioned noise predictions, for any s."""
    generator = torch.Generator().manual_seed(seed)
    scales = [7.5, 1.0, 0.0, float(torch.empty(()).uniform_(1.5, 12.0, generator=generator))]
    cases = [dict(noise_uncond=torch.randn(shape, generator=generator),
                  noise_text=torch.randn(shape, generator=generator), guidance_scale=scale)
             for shape, scale in zip([(2, 4, 8, 8), (1, 4, 6, 10), (3, 4, 4, 4), (1, 4, 4, 6)], scales)]
    mistakes = {  # the shortcut first: at s = 0 the swapped formulas also give ε_text
        "the pipeline's shortcut for s ≤ 1 (return ε_text) in the formula: the pipeline skips the unconditional "
        "pass there to save a U-Net call, but this function is the formula, which gives ε_uncond at s = 0":
            lambda noise_uncond, noise_text, guidance_scale: noise_text if guidance_scale <= 1 else None,
        "the two predictions swapped: ε_text + s·(ε_uncond − ε_text) pushes away from the prompt":
            lambda noise_uncond, noise_text, guidance_scale: noise_text + guidance_scale * (noise_uncond - noise_text),
        "the step taken from ε_text instead of ε_uncond: ε_text + s·(ε_text − ε_uncond)":
            lambda noise_uncond, noise_text, guidance_scale: noise_text + guidance_scale * (noise_text - noise_uncond),
        "only the text prediction scaled: ε_uncond + s·ε_text":
            lambda noise_uncond, noise_text, guidance_scale: noise_uncond + guidance_scale * noise_text,
        "the difference not scaled by guidance_scale (that is plain ε_text)":
            lambda noise_uncond, noise_text, guidance_scale: noise_text,
    }
    return compare("guidance", learner, reference_guidance, cases, mistakes, gradients=("noise_uncond", "noise_text"),
                   rtol=1e-5, atol=1e-6, seed=seed)


def reference_denoising_loop(unet, scheduler, latents, context, uncond_context, guidance_scale: float,
                             num_inference_steps: int, init_sigma: bool = True, scale_input: bool = True,
                             halves_swapped: bool = False) -> torch.Tensor:
    """The sampling loop of chapter 06 (on a copy of ``scheduler``); the flags make the checker's common mistakes."""
    scheduler = copy.deepcopy(scheduler)  # the learner gets the scheduler untouched, timesteps not yet set
    scheduler.set_timesteps(num_inference_steps)
    latents = latents * scheduler.init_noise_sigma if init_sigma else latents
    both_contexts = torch.cat([uncond_context, context])  # (2B, L, D): unconditional rows first
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = torch.cat([latents] * 2)  # (2B, C, h, w)
            model_input = scheduler.scale_model_input(model_input, t) if scale_input else model_input
            noise_uncond, noise_text = unet(model_input, t, both_contexts).chunk(2)
            if halves_swapped:
                noise_uncond, noise_text = noise_text, noise_uncond
            latents = scheduler.step(reference_guidance(noise_uncond, noise_text, guidance_scale), t, latents)
    return latents


def check_denoising_loop(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 06): ``denoise(unet, scheduler, latents, context, uncond_context, guidance_scale,
    num_inference_steps)`` -> the final latents, the whole guided sampling loop written out, with one
    U-Net call per step (on the unconditional and the text rows together) and the inputs left unchanged."""
    from ..schedulers import DDIMScheduler, EulerDiscreteScheduler
    from ..unet import UNet, UNetConfig

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    unet = UNet(UNetConfig.tiny(cross_attention_dim=32)).eval().requires_grad_(False)
    sd15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    cases = []
    for scheduler, batch, scale, steps in [(EulerDiscreteScheduler(**sd15), 2, 7.5, 4),
                                           (DDIMScheduler(**sd15, steps_offset=1), 1, 3.0, 3)]:
        cases.append(dict(unet=unet, scheduler=scheduler, latents=torch.randn(batch, 4, 8, 8, generator=generator),
                          context=torch.randn(batch, 7, 32, generator=generator),
                          uncond_context=torch.randn(batch, 7, 32, generator=generator),
                          guidance_scale=scale, num_inference_steps=steps))

    def run_learner(unet, scheduler, latents, context, uncond_context, guidance_scale, num_inference_steps):
        latents_out, calls = count_calls(unet, learner, unet, scheduler, latents, context, uncond_context,
                                         guidance_scale, num_inference_steps)
        if calls != num_inference_steps and isinstance(latents_out, torch.Tensor):
            raise Rejected(f"the U-Net ran {calls} times for {num_inference_steps} steps; the statement asks for one "
                           f"call per step, on torch.cat([latents] * 2) with the two contexts stacked (B, L, D) each")
        return latents_out

    mistakes = {
        "the starting latents not multiplied by scheduler.init_noise_sigma (Euler starts from noise of std σ_max)":
            partial(reference_denoising_loop, init_sigma=False),
        "scheduler.scale_model_input(model_input, t) left out (Euler's U-Net must see x / √(σ² + 1))":
            partial(reference_denoising_loop, scale_input=False),
        "the two halves of the U-Net's output swapped: the unconditional rows come first":
            partial(reference_denoising_loop, halves_swapped=True),
        "no guidance: the text prediction alone (that is guidance_scale = 1)":
            lambda **case: reference_denoising_loop(**{**case, "guidance_scale": 1.0}),
    }
    # float32 reference: the schedulers keep their tables in float32, so a float64 run would mix dtypes
    return compare("denoise", run_learner, reference_denoising_loop, cases, mistakes, float64=False,
                   rtol=1e-4, atol=1e-4, seed=seed)


def reference_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents in the U-Net's (scaled) space -> images (B, 3, H, W) in [0, 1], as the pipeline decodes them."""
    with torch.no_grad():
        return (vae.decode(latents / vae.scaling_factor) * 0.5 + 0.5).clamp(0, 1)


def check_decode_latents(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 06): ``decode(vae, latents)`` -> images (B, 3, H, W) in [0, 1]: undo the
    scaling factor, decode, and map the decoder's [-1, 1] to [0, 1]."""
    from dataclasses import replace

    from ..vae import AutoencoderKL, VAEConfig

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(replace(VAEConfig.tiny(), scaling_factor=0.18215)).eval().requires_grad_(False)
    with torch.no_grad():  # a louder decoder, so that its output leaves [-1, 1] and clipping matters
        vae.decoder.conv_out.weight.mul_(4)
    cases = [dict(vae=vae, latents=torch.randn(shape, generator=generator)) for shape in [(2, 4, 8, 8), (1, 4, 6, 10)]]

    def decoded(vae, latents, scale=None):
        with torch.no_grad():
            return vae.decode(latents / vae.scaling_factor if scale is None else latents * scale)

    mistakes = {
        "the latents multiplied by vae.scaling_factor instead of divided by it":
            lambda vae, latents: (decoded(vae, latents, vae.scaling_factor) * 0.5 + 0.5).clamp(0, 1),
        "the latents not divided by vae.scaling_factor before decoding":
            lambda vae, latents: (decoded(vae, latents, 1.0) * 0.5 + 0.5).clamp(0, 1),
        "the images left in the decoder's [-1, 1] (map them with x / 2 + 0.5)":
            lambda vae, latents: decoded(vae, latents).clamp(-1, 1),
        "the images not clipped to [0, 1] (the decoder's output is not bounded)":
            lambda vae, latents: decoded(vae, latents) * 0.5 + 0.5,
    }
    return compare("decode", learner, reference_decode, cases, mistakes, rtol=1e-5, atol=1e-5, seed=seed)
