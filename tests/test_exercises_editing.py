"""Chapter 07's checkers: the package's answers pass, common mistakes are named, in-place changes caught."""
import torch

from ldm_teach.exercises import editing as checks
from ldm_teach.editing import blend_known_region, inpainting_input, start_step


def test_correct_answers_pass(capsys):
    assert checks.check_start_step(start_step)
    assert checks.check_blend_step(checks.reference_blend_step)
    assert checks.check_inpainting_input(inpainting_input)
    assert checks.check_controlled_skips(lambda skips, down_residuals, conditioning_scale:
                                         skips + conditioning_scale * down_residuals)
    assert capsys.readouterr().out.count("✅") == 4


def test_start_step_mistakes():
    result = checks.check_start_step(lambda n, s: n - min(round(n * s), n))
    assert not result and "truncates it with int()" in result.message and "strength=" in result.message
    result = checks.check_start_step(lambda n, s: int(n * (1 - s)))
    assert not result and "float rounding" in result.message
    result = checks.check_start_step(lambda n, s: float(n - int(n * s)))
    assert not result and "expected an int, got float" in result.message


def test_blend_step_mistakes():
    def inverted(latents, image_latents, noise, mask, scheduler, next_timestep):
        return checks.reference_blend_step(latents, image_latents, noise, 1 - mask, scheduler, next_timestep)

    assert "mask's meaning inverted" in checks.check_blend_step(inverted).message
    result = checks.check_blend_step(lambda latents, image_latents, noise, mask, scheduler, next_timestep:
                                     blend_known_region(latents, image_latents, mask))
    assert not result and "without noise" in result.message

    def in_place(latents, image_latents, noise, mask, scheduler, next_timestep):
        known = scheduler.add_noise(image_latents, noise, torch.tensor([next_timestep]))
        return latents.mul_(mask).add_((1 - mask) * known)

    assert "changed in place" in checks.check_blend_step(in_place).message  # autograd refuses it on a leaf


def test_inpainting_input_and_skips_mistakes():
    result = checks.check_inpainting_input(lambda model_input, mask, masked_image_latents:
                                           torch.cat([model_input, masked_image_latents, mask], 1))
    assert not result and "SD's order is latents, mask, masked image latents" in result.message
    result = checks.check_inpainting_input(lambda model_input, mask, masked_image_latents:
                                           torch.cat([model_input, mask, masked_image_latents], 0))
    assert not result and "raised RuntimeError" in result.message  # along the batch: the shapes do not fit
    result = checks.check_controlled_skips(lambda skips, down_residuals, conditioning_scale: skips + down_residuals)
    assert not result and "conditioning_scale left out" in result.message


def test_seeds_pick_other_cases_and_gradients_are_checked(capsys):
    assert checks.check_start_step(start_step, seed=7).seed == 7
    fixed = [(50, 0.8), (10, 0.55), (10, 1.0), (4, 0.3), (25, 0.5), (100, 0.29), (7, 0.99), (30, 0.35)]
    table = {case: start_step(*case) for case in fixed}
    assert not checks.check_start_step(lambda n, s: table.get((n, s), 0), seed=3)  # a table of the fixed cases

    def detached(latents, image_latents, noise, mask, scheduler, next_timestep):
        return checks.reference_blend_step(latents, image_latents, noise, mask, scheduler, next_timestep).detach()

    result = checks.check_blend_step(detached, seed=1)
    assert not result and "gradient" in result.message
