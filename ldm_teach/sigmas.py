"""Noise levels for the σ-samplers: Karras et al.'s ρ-spaced schedule and the map from σ back to timesteps.

Chapter 08, section "The samplers people use". The Euler and DPM-Solver++ schedulers of Chapter 01
visit evenly spaced *timesteps*, so their noise levels σ_t = √((1 - ᾱ_t) / ᾱ_t) follow whatever
the beta schedule makes of them. Karras et al. (2022, "Elucidating the Design Space of
Diffusion-Based Generative Models") space the *noise levels* instead, so that the steps crowd
where the image's fine detail forms, at small σ:

    σ_i = (σ_max^(1/ρ) + i / (n - 1) · (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ,   i = 0 .. n - 1,

with ρ = 7 (the paper's choice; ρ = 1 is linear in σ, and a large ρ tends to even steps in log σ).
The U-Net was trained on integer timesteps, not on σ, so each σ_i goes back to the (fractional)
timestep whose σ it is, by interpolating log σ between training steps: ``sigma_to_timestep``.
Switched on by diffusers' configuration key ``use_karras_sigmas=True``; "DPM++ 2M Karras" in
A1111 is ``DPMSolverMultistepScheduler(use_karras_sigmas=True)``.

NumPy in float64, on purpose: diffusers computes these in NumPy, and only the same arithmetic gives
the same timesteps to the last bit.
"""
from __future__ import annotations

import numpy as np

from .checks import as_float, as_int

KARRAS_RHO = 7.0  # Karras et al. 2022, and diffusers' fixed value


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = KARRAS_RHO) -> np.ndarray:
    """The n noise levels of Karras et al. (2022), from ``sigma_max`` down to ``sigma_min``: (n,) float64.

    Evenly spaced in σ^(1/ρ): with ρ = 7 the steps are large at high noise and small near σ_min.
    diffusers' ``_convert_to_karras`` (and k-diffusion's ``get_sigmas_karras`` without its final 0).
    """
    sigma_min, sigma_max = as_float(sigma_min, "sigma_min"), as_float(sigma_max, "sigma_max")
    num_inference_steps = as_int(num_inference_steps, "num_inference_steps", minimum=1)
    rho = as_float(rho, "rho")
    if rho <= 0:
        raise ValueError(f"rho={rho} must be positive: the noise levels are spaced evenly in σ^(1/ρ) "
                         f"(Karras et al. use rho={KARRAS_RHO}; rho=1 spaces them evenly in σ).")
    if not 0 <= sigma_min <= sigma_max:
        raise ValueError(f"sigma_min={sigma_min} and sigma_max={sigma_max} must satisfy 0 <= sigma_min <= sigma_max: "
                         "the schedule runs from the largest noise level down to the smallest.")
    ramp = np.linspace(0, 1, num_inference_steps)  # (n,) from 0 to 1
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_timestep(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each σ: log σ interpolated between the training steps' log σ_t.

    ``log_sigmas`` (T,) holds log σ_t of the training timesteps 0..T-1 (increasing). A σ between
    σ_k and σ_{k+1} maps to k + w with w = (log σ_k - log σ) / (log σ_k - log σ_{k+1}); a σ outside
    the trained range is clipped to timestep 0 or T - 1. diffusers' ``_sigma_to_t``, for all σ at once.
    """
    log_sigma = np.log(np.maximum(np.asarray(sigmas), 1e-10))  # (n,)
    distances = log_sigma - log_sigmas[:, np.newaxis]  # (T, n)
    low = np.cumsum(distances >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)  # (n,) the step below
    high = low + 1
    weight = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return (1 - weight) * low + weight * high  # (n,)
