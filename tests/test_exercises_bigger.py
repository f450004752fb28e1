"""Chapter 08's checkers: right answers written differently pass, common mistakes are named, gradients and
in-place changes are checked, and the references are the package's own samplers."""
import math

import numpy as np
import torch

from ldm_teach import diffusion, samplers
from ldm_teach.exercises import bigger as checks
from ldm_teach.sigmas import karras_sigmas


# --- right answers, written differently -------------------------------------------------------


def karras_loop(sigma_min, sigma_max, num_inference_steps, rho):
    """Level by level, in float64, with the n = 1 case by hand."""
    if num_inference_steps == 1:
        return sigma_max.double().reshape(1)
    levels = []
    for i in range(num_inference_steps):
        fraction = i / (num_inference_steps - 1)
        levels.append((sigma_max.double() ** (1 / rho) * (1 - fraction) + sigma_min.double() ** (1 / rho) * fraction)
                      ** rho)
    return torch.stack(levels)


def ancestral_in_float32(model_output, x, sigma_from, sigma_to, noise):
    """In float32, through x̂_0's variance-preserving split written as k-diffusion does."""
    model_output, x, noise = model_output.float(), x.float(), noise.float()
    sigma_from, sigma_to = sigma_from.float(), sigma_to.float()
    sigma_up = torch.minimum(sigma_to, (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2).sqrt())
    sigma_down = (sigma_to**2 - sigma_up**2).sqrt()
    denoised = x - sigma_from * model_output
    return denoised + (x - denoised) / sigma_from * sigma_down + sigma_up * noise


def velocity_by_gather(x0, noise, t, alphas_cumprod):
    alpha = alphas_cumprod.double().gather(0, t).sqrt()[(...,) + (None,) * (x0.ndim - 1)]  # (B, 1, ...)
    sigma = (1 - alphas_cumprod.double().gather(0, t)).sqrt()[(...,) + (None,) * (x0.ndim - 1)]
    return alpha * noise - sigma * x0


def test_right_answers_written_differently_pass(capsys):
    assert checks.check_karras_sigmas(checks.reference_karras_sigmas)
    assert checks.check_karras_sigmas(karras_loop)
    assert checks.check_karras_sigmas(lambda sigma_min, sigma_max, n, rho:  # in float32
                                      checks.reference_karras_sigmas(sigma_min.float(), sigma_max.float(), n, rho))
    assert checks.check_euler_ancestral_step(checks.reference_euler_ancestral_step)
    assert checks.check_euler_ancestral_step(ancestral_in_float32)
    assert checks.check_velocity(diffusion.velocity)
    assert checks.check_velocity(velocity_by_gather)
    printed = capsys.readouterr().out
    assert printed.count("✅") == 7 and "gradients through sigma_min, sigma_max" in printed


def test_the_references_are_the_packages_samplers():
    """The checker's torch Karras levels are sigmas.karras_sigmas's; its ancestral step is the scheduler's step."""
    for args in [(0.0292, 14.6146, 10, 7.0), (0.1, 10.0, 5, 3.0), (0.03, 14.6, 1, 7.0)]:
        ours = checks.reference_karras_sigmas(torch.tensor(args[0], dtype=torch.float64),
                                              torch.tensor(args[1], dtype=torch.float64), *args[2:])
        np.testing.assert_allclose(ours.numpy(), karras_sigmas(*args), rtol=1e-12)
    scheduler = samplers.EulerAncestralDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                         beta_end=0.012)
    scheduler.set_timesteps(10)
    x, model_output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = scheduler.timesteps[3]
    stepped = scheduler.step(model_output, t, x, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    expected = checks.reference_euler_ancestral_step(model_output, x, scheduler.sigmas[3], scheduler.sigmas[4], noise)
    torch.testing.assert_close(stepped, expected, rtol=0, atol=1e-5)


def test_scalars_are_printed_and_the_seed_picks_other_cases(capsys):
    result = checks.check_karras_sigmas(lambda sigma_min, sigma_max, n, rho: torch.zeros(n), seed=4)
    assert not result and result.seed == 4 and result.case == 1
    assert "sigma_min: tensor(0.0292, dtype torch.float64)" in result.message and "rho: 7.0" in result.message
    assert "❌ karras_sigmas" in capsys.readouterr().out

    def fixed_cases_only(sigma_min, sigma_max, n, rho):  # right on the fixed cases, wrong on the one the seed draws
        if round(sigma_min.item(), 4) in (0.0292, 0.002, 0.1, 0.03):
            return checks.reference_karras_sigmas(sigma_min, sigma_max, n, rho)
        return torch.zeros(n, dtype=torch.float64)

    for seed in (0, 3):
        result = checks.check_karras_sigmas(fixed_cases_only, seed=seed)
        assert not result and result.case == 4


# --- typical wrong answers, each with its hint --------------------------------------------------


def test_karras_mistakes():
    def rho_misplaced(sigma_min, sigma_max, n, rho):
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        return (sigma_max**rho + ramp * (sigma_min**rho - sigma_max**rho)) ** (1 / rho)

    result = checks.check_karras_sigmas(rho_misplaced)
    assert not result and "ρ in the wrong place" in result.message
    result = checks.check_karras_sigmas(lambda sigma_min, sigma_max, n, rho:
                                        checks.reference_karras_sigmas(sigma_min, sigma_max, n, rho).flip(0))
    assert not result and "increasing order" in result.message
    result = checks.check_karras_sigmas(lambda sigma_min, sigma_max, n, rho:
                                        checks.reference_karras_sigmas(sigma_min, sigma_max, n, rho).detach())
    assert not result and "no gradient reaches `sigma_min`" in result.message and ".detach()" in result.message

    def through_floats(sigma_min, sigma_max, n, rho):  # math on Python floats: right values, no gradient
        low, high = sigma_min.detach().item(), sigma_max.detach().item()
        return torch.tensor([(high ** (1 / rho) + i / max(n - 1, 1) * (low ** (1 / rho) - high ** (1 / rho))) ** rho
                             for i in range(n)], dtype=torch.float64)

    assert "gradient" in checks.check_karras_sigmas(through_floats).message
    result = checks.check_karras_sigmas(lambda sigma_min, sigma_max, n, rho: torch.linspace(0, 1, n + 1))
    assert not result and "expected shape (10,), got (11,)" in result.message and "one level per step" in result.message


def test_euler_ancestral_mistakes():
    def without_sqrt(model_output, x, sigma_from, sigma_to, noise):
        sigma_up = sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2
        sigma_down = (sigma_to**2 - sigma_up) ** 0.5
        return x + model_output * (sigma_down - sigma_from) + noise * sigma_up

    result = checks.check_euler_ancestral_step(without_sqrt)
    assert not result and "σ_up without the square root" in result.message and "sigma_to: tensor(10.2" in result.message

    def euler_to_sigma_to(model_output, x, sigma_from, sigma_to, noise):
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        return x + model_output * (sigma_to - sigma_from) + noise * sigma_up

    assert "all the way to σ_to" in checks.check_euler_ancestral_step(euler_to_sigma_to).message

    def in_place(model_output, x, sigma_from, sigma_to, noise):
        sigma_up, sigma_down = samplers.ancestral_sigmas(sigma_from, sigma_to)
        x += model_output * (sigma_down - sigma_from)  # changes the caller's x
        return x + noise * sigma_up

    result = checks.check_euler_ancestral_step(in_place)
    assert not result and "in place" in result.message

    def detached(model_output, x, sigma_from, sigma_to, noise):
        return checks.reference_euler_ancestral_step(model_output.detach(), x, sigma_from, sigma_to, noise)

    result = checks.check_euler_ancestral_step(detached)
    assert not result and "no gradient reaches `model_output`: is it detached" in result.message


def test_velocity_mistakes():
    def sign_error(x0, noise, t, alphas_cumprod):
        return -diffusion.velocity(x0, noise, t, alphas_cumprod)

    result = checks.check_velocity(sign_error)
    assert not result and "the sign flipped" in result.message
    result = checks.check_velocity(lambda x0, noise, t, alphas_cumprod:  # the arguments swapped
                                   diffusion.velocity(noise, x0, t, alphas_cumprod))
    assert not result and "ε and x_0 swapped" in result.message
    result = checks.check_velocity(lambda x0, noise, t, alphas_cumprod:
                                   diffusion.velocity(x0, noise, t, alphas_cumprod).detach())
    assert not result and "no gradient reaches `x0`" in result.message

    def in_place(x0, noise, t, alphas_cumprod):
        alpha_prod = alphas_cumprod[t].reshape(-1, *[1] * (x0.ndim - 1)).to(x0.dtype)
        return noise.mul_(alpha_prod.sqrt()) - (1 - alpha_prod).sqrt() * x0

    result = checks.check_velocity(in_place)
    assert not result and "in place" in result.message

    def unbroadcast(x0, noise, t, alphas_cumprod):
        return alphas_cumprod[t].sqrt() * noise - (1 - alphas_cumprod[t]).sqrt() * x0

    result = checks.check_velocity(unbroadcast)
    assert not result and ("reshape it to (B, 1, ...)" in result.message or "raised RuntimeError" in result.message)


def test_the_last_ancestral_step_adds_no_noise():
    """At σ_to = 0 the split gives σ_up = σ_down = 0 and the step returns x̂_0: an answer that divides by σ_to fails."""
    def divides_by_sigma_to(model_output, x, sigma_from, sigma_to, noise):
        sigma_up = sigma_to * (1 - sigma_to**2 / sigma_from**2) ** 0.5
        ratio = sigma_up / sigma_to  # NaN at σ_to = 0
        return x + model_output * ((sigma_to**2 - sigma_up**2) ** 0.5 - sigma_from) + noise * ratio * sigma_to

    result = checks.check_euler_ancestral_step(divides_by_sigma_to)
    assert not result and "NaN or inf" in result.message and "case 3" in result.message
    assert math.isclose(float(samplers.ancestral_sigmas(torch.tensor(0.5), torch.tensor(0.0))[1]), 0.0)
