"""The samplers people use: Euler ancestral ("Euler a"), beside Chapter 01's five (Chapter 08).

Chapter 08, section "The samplers people use". Two names come up in every model card and web UI:

* "DPM++ 2M Karras": DPM-Solver++(2M) on Karras et al.'s noise levels, our
  ``DPMSolverMultistepScheduler(use_karras_sigmas=True)`` (the levels are in ``sigmas.py``), and
  "Euler Karras", ``EulerDiscreteScheduler(use_karras_sigmas=True)``;
* "Euler a": Euler ancestral, built here. Each step goes *past* the next noise level with a
  deterministic Euler step and then adds fresh noise to land on it, like DDPM's ancestral
  sampling written in σ. Its images keep changing as the number of steps grows (each run adds
  new noise), where a deterministic solver's converge.

``ALL_SCHEDULERS`` maps each diffusers class name that ldm_teach implements to its class; the
loaders (``pretrained.scheduler_from_config``, ``load_pipeline``) pick schedulers from it.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from .schedulers import (COMMON_DEFAULTS, SCHEDULERS, EulerDiscreteScheduler, draw_noise, interpolate_sigmas,
                         spaced_timesteps)


def ancestral_sigmas(sigma_from, sigma_to):
    """(σ_up, σ_down): split the step σ_from -> σ_to into a deterministic part and fresh noise.

    σ_up² = σ_to² (σ_from² - σ_to²) / σ_from² is the variance of the noise added back (the DDPM
    posterior's, in σ), and σ_down = √(σ_to² - σ_up²) the level the Euler step aims at, so that
    σ_down² + σ_up² = σ_to²: the sample lands at noise level σ_to. At σ_to = 0 both are 0.
    """
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_up, sigma_down


class EulerAncestralDiscreteScheduler(EulerDiscreteScheduler):
    """Euler ancestral sampling in σ (k-diffusion's ``sample_euler_ancestral``, diffusers' class of this name).

    With x̂_0 from the model's output and (σ_up, σ_down) = ``ancestral_sigmas(σ_i, σ_{i+1})``:

        x_{i+1} = x_i + (σ_down - σ_i) · (x_i - x̂_0) / σ_i + σ_up · z,   z ~ N(0, I),

    z drawn from the caller's generator at every step (the last one too, where σ_up = 0), with
    the shape and dtype of the model's output, as diffusers draws it, so a seeded run repeats
    diffusers' seeded run. Timesteps, σ, ``init_noise_sigma``, ``scale_model_input`` and
    ``add_noise`` are Euler's; diffusers' class has no Karras σ and always ends at σ = 0.
    """

    config_defaults = {**COMMON_DEFAULTS, "timestep_spacing": "linspace"}
    unsupported_defaults = {"rescale_betas_zero_snr": False}
    choices = {"prediction_type": ("epsilon", "v_prediction")}

    @classmethod
    def read_config(cls, config: dict) -> dict:
        """Euler's checks; ``use_karras_sigmas=True`` (carried over from an Euler config) is ignored, as diffusers
        ignores it, with a warning, since the σ are then not Karras'."""
        if config.get("use_karras_sigmas"):
            warnings.warn(f"{cls.__name__} ignores use_karras_sigmas=True, as diffusers' class of that name does: "
                          "its noise levels follow timestep_spacing. Drop the key to silence this warning.",
                          stacklevel=5)
        return super().read_config(config)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Euler's n (float) timesteps and their n + 1 σ, the last one 0."""
        num_inference_steps = self.check_num_inference_steps(num_inference_steps)
        timesteps = spaced_timesteps(self.config.timestep_spacing, num_inference_steps,
                                     self.config.num_train_timesteps, self.config.steps_offset).astype(np.float32)
        sigmas = interpolate_sigmas(timesteps, self.training_sigmas())  # (n,)
        self.use_schedule(timesteps, np.concatenate([sigmas, [0.0]]), device)  # n + 1 sigmas

    def step(self, model_output: torch.Tensor, t, x: torch.Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """One ancestral step from σ_i to σ_{i+1}: Euler down to σ_down, then noise of standard deviation σ_up
        drawn from ``generator`` (one generator, or one per sample of the batch)."""
        self.check_step_inputs(model_output, x)
        index = self.sigma_index(t)
        sigma, sigma_next = self.sigmas[index], self.sigmas[index + 1]
        x = x.to(torch.float32)
        x0 = self.predict_x0(model_output, x, sigma)
        sigma_up, sigma_down = ancestral_sigmas(sigma, sigma_next)
        derivative = (x - x0) / sigma
        x_next = x + derivative * (sigma_down - sigma)
        x_next = x_next + draw_noise(model_output, generator) * sigma_up
        self.step_index = index + 1
        return x_next.to(model_output.dtype)


ALL_SCHEDULERS = {**SCHEDULERS, EulerAncestralDiscreteScheduler.__name__: EulerAncestralDiscreteScheduler}
