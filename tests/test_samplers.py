"""Karras σ (ldm_teach.sigmas, the Euler and DPM-Solver++ option) and Euler ancestral (ldm_teach.samplers)
against diffusers' schedulers step by step and inside seeded pipelines; bad input."""
import re
import warnings

import diffusers
import numpy as np
import pytest
import torch

from ldm_teach import editing, pretrained, samplers, schedulers
from ldm_teach.sigmas import karras_sigmas, sigma_to_timestep

SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, num_train_timesteps=1000)
SPACINGS = ["leading", "trailing", "linspace"]
PREDICTIONS = ["epsilon", "v_prediction"]
STEPS = [1, 2, 10, 25, 50, 100]  # 50 and 100: DPM-Solver++ with Karras σ visits its smallest timesteps twice
SHAPE = (2, 4, 8, 8)
KARRAS = {"EulerDiscreteScheduler": dict(use_karras_sigmas=True),
          "DPMSolverMultistepScheduler": dict(use_karras_sigmas=True, algorithm_type="dpmsolver++", solver_order=2),
          "EulerAncestralDiscreteScheduler": {}}


def make_pair(name, config):
    """(ours, diffusers') from one config, ours through pretrained.scheduler_from_diffusers."""
    reference = getattr(diffusers, name).from_config(config)
    return pretrained.scheduler_from_diffusers(reference), reference


def fake_model(x, t):
    """A deterministic stand-in for the U-Net: a smooth function of x and t."""
    t = float(t) / 1000
    return 0.7 * torch.tanh(x) + 0.2 * torch.sin(3 * x + t) + 0.1 * t


def run_both(ours, reference, num_inference_steps, seed=0):
    """Sample with both, each step fed diffusers' current x and a generator of its own seeded alike.

    Returns the worst difference of a step's result (and of scale_model_input's)."""
    ours.set_timesteps(num_inference_steps)
    reference.set_timesteps(num_inference_steps)
    assert ours.timesteps.dtype == reference.timesteps.dtype and torch.equal(ours.timesteps, reference.timesteps)
    assert torch.equal(ours.sigmas, reference.sigmas)
    assert float(ours.init_noise_sigma) == float(reference.init_noise_sigma)
    our_generator, reference_generator = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * reference.init_noise_sigma
    worst = worst_input = 0.0
    for t in reference.timesteps:
        model_input = reference.scale_model_input(x, t)
        worst_input = max(worst_input, (ours.scale_model_input(x, t) - model_input).abs().max().item())
        output = fake_model(model_input, t)
        ours_prev = ours.step(output, t, x, generator=our_generator)
        x = reference.step(output, t, x, generator=reference_generator).prev_sample
        assert ours_prev.dtype == x.dtype and ours_prev.shape == x.shape
        worst = max(worst, (ours_prev - x).abs().max().item())
    return worst, worst_input


CASES = [(name, spacing, prediction, steps) for name in KARRAS for spacing in SPACINGS for prediction in PREDICTIONS
         for steps in STEPS]


@pytest.mark.parametrize("name,spacing,prediction,steps", CASES, ids=["-".join(map(str, case)) for case in CASES])
def test_every_step_matches_diffusers(name, spacing, prediction, steps):
    config = {**SD15, **KARRAS[name], "timestep_spacing": spacing, "prediction_type": prediction}
    ours, reference = make_pair(name, config)
    worst, worst_input = run_both(ours, reference, steps)
    assert worst <= 1e-5 and worst_input <= 1e-6, f"worst step difference {worst:.3g}, input {worst_input:.3g}"


@pytest.mark.parametrize("name,config", [
    ("EulerDiscreteScheduler", dict(final_sigmas_type="sigma_min")),
    ("EulerDiscreteScheduler", dict(sigma_min=0.1, sigma_max=10.0, timestep_spacing="leading")),
    ("EulerDiscreteScheduler", dict(beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02)),
    ("DPMSolverMultistepScheduler", dict(final_sigmas_type="sigma_min", lower_order_final=False)),
    ("DPMSolverMultistepScheduler", dict(solver_order=1, prediction_type="sample")),
], ids=["euler-sigma-min", "euler-own-range", "euler-cosine", "dpm-sigma-min", "dpm-order-1-x0"])
@pytest.mark.parametrize("steps", [7, 30])
def test_other_karras_configurations_match_diffusers(name, config, steps):
    ours, reference = make_pair(name, {**SD15, **KARRAS[name], **config})
    worst, _ = run_both(ours, reference, steps)
    assert worst <= 1e-5


def test_dpm_karras_repeats_timesteps_and_counts_its_steps():
    """At 50 steps two Karras levels round to t = 1: the step counter, not the timestep, picks the σ."""
    ours, _ = make_pair("DPMSolverMultistepScheduler", {**SD15, **KARRAS["DPMSolverMultistepScheduler"]})
    ours.set_timesteps(50)
    timesteps = ours.timesteps.tolist()
    assert timesteps[-6:] == [6, 4, 2, 1, 1, 0] and len(set(timesteps)) == 49
    assert ours.sigmas[-3] < ours.sigmas[-4]  # the two visits of t = 1 have two different σ
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for t in ours.timesteps[:-2]:
        x = ours.step(fake_model(x, t), t, x)
    assert ours.step_index == 48 and ours.sigma_index(1) == 48  # the second t = 1 is next
    ours.set_timesteps(50)
    assert ours.step_index is None and ours.sigma_index(1) == 47  # a loop that starts at t = 1 starts at its first
    ours.set_begin_index(48)
    assert ours.sigma_index(1) == 48 and ours.sigma_index(2) == 46  # told where to start; other t by their place


def test_dpm_karras_on_the_cosine_schedule_truncates_and_runs_where_diffusers_fails():
    """diffusers casts the cosine schedule's Karras timesteps to int without rounding (we do too), so the first
    ones repeat; its rule for a repeated first timestep then skips a σ and ends in an IndexError. Ours visits
    every σ once."""
    config = {**KARRAS["DPMSolverMultistepScheduler"], "beta_schedule": "squaredcos_cap_v2"}
    ours, reference = make_pair("DPMSolverMultistepScheduler", config)
    ours.set_timesteps(7)
    reference.set_timesteps(7)
    assert torch.equal(ours.timesteps, reference.timesteps) and torch.equal(ours.sigmas, reference.sigmas)
    assert ours.timesteps.tolist()[:3] == [998, 998, 998]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for index, t in enumerate(ours.timesteps):
        assert ours.sigma_index(t) == index
        x = ours.step(fake_model(x, t), t, x)
    assert ours.step_index == 7 and torch.isfinite(x).all()
    with pytest.raises(IndexError):
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        for t in reference.timesteps:
            x = reference.step(fake_model(x, t), t, x).prev_sample


def test_karras_formula_and_the_map_back_to_timesteps():
    sigmas = karras_sigmas(0.03, 14.6, 5)
    ramp = np.linspace(0, 1, 5)
    expected = (14.6 ** (1 / 7) + ramp * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7
    np.testing.assert_allclose(sigmas, expected, rtol=1e-12)
    assert sigmas[0] == pytest.approx(14.6) and sigmas[-1] == pytest.approx(0.03)
    assert np.all(np.diff(sigmas) < 0) and np.all(np.diff(np.diff(sigmas)) > 0)  # big steps first, then small
    np.testing.assert_allclose(karras_sigmas(1.0, 9.0, 5, rho=1.0), [9, 7, 5, 3, 1])  # rho = 1: linear in σ
    training = np.array([0.1, 0.2, 0.4, 0.8])
    t = sigma_to_timestep(np.array([0.1, 0.4, np.sqrt(0.08), 0.05, 5.0]), np.log(training))
    np.testing.assert_allclose(t, [0, 2, 1.5, 0, 3])  # exact, halfway in log σ, clipped at both ends


# --- Euler ancestral ------------------------------------------------------------------------


def test_euler_ancestral_is_registered_and_round_trips_its_config():
    reference = diffusers.EulerAncestralDiscreteScheduler.from_config({**SD15, "timestep_spacing": "trailing"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = pretrained.scheduler_from_diffusers(reference)
    assert isinstance(ours, samplers.EulerAncestralDiscreteScheduler)
    assert {key: reference.config[key] for key in ours.config} == dict(ours.config)
    from_json = pretrained.scheduler_from_config({"_class_name": "EulerAncestralDiscreteScheduler", **SD15})
    assert isinstance(from_json, samplers.EulerAncestralDiscreteScheduler)
    assert "EulerAncestralDiscreteScheduler" in pretrained.PIPELINE_COMPONENTS["scheduler"]


def test_euler_ancestral_seeded_runs_match_diffusers_and_depend_on_the_seed():
    """Independent seeded runs, each with its own generator: the same final sample as diffusers'; another seed
    lands elsewhere; a list of generators draws sample i's noise from generator i, as randn_tensor does."""
    ours, reference = make_pair("EulerAncestralDiscreteScheduler", {**SD15, "timestep_spacing": "leading"})
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))

    def run(scheduler, generator, step):
        scheduler.set_timesteps(20)
        x = start * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = step(fake_model(scheduler.scale_model_input(x, t), t), t, x, generator=generator)
        return x

    theirs = run(reference, torch.Generator().manual_seed(5), lambda *a, **k: reference.step(*a, **k).prev_sample)
    mine = run(ours, torch.Generator().manual_seed(5), ours.step)
    assert (mine - theirs).abs().max() <= 1e-5
    assert (run(ours, torch.Generator().manual_seed(6), ours.step) - mine).abs().max() > 0.01
    listed = [torch.Generator().manual_seed(s) for s in (5, 6)]
    theirs = run(reference, listed, lambda *a, **k: reference.step(*a, **k).prev_sample)
    mine = run(ours, [torch.Generator().manual_seed(s) for s in (5, 6)], ours.step)
    assert (mine - theirs).abs().max() <= 1e-5


def test_load_pipeline_reads_an_euler_ancestral_folder(tiny_diffusers_pipeline, tmp_path):
    """A folder that diffusers' save_pretrained wrote with Euler ancestral: model_index.json and
    scheduler_config.json name the class, and load_pipeline builds ours with the same config."""
    reference, _ = tiny_diffusers_pipeline
    euler_a = diffusers.EulerAncestralDiscreteScheduler.from_config(reference.scheduler.config)
    diffusers.StableDiffusionPipeline(**{**reference.components, "scheduler": euler_a}).save_pretrained(tmp_path)
    ours = pretrained.load_pipeline(tmp_path)
    assert type(ours.scheduler) is samplers.EulerAncestralDiscreteScheduler
    assert dict(ours.scheduler.config) == {key: euler_a.config[key] for key in ours.scheduler.config}
    assert ours.scheduler.config.steps_offset == 1 and ours.scheduler.config.beta_schedule == "scaled_linear"


def test_ancestral_split_lands_on_the_next_level():
    sigma_from, sigma_to = torch.tensor(3.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    sigma_up, sigma_down = samplers.ancestral_sigmas(sigma_from, sigma_to)
    assert float(sigma_up) == pytest.approx((4 * 5 / 9) ** 0.5) and float(sigma_down) < 2.0
    assert float(sigma_up**2 + sigma_down**2) == pytest.approx(4.0)
    assert samplers.ancestral_sigmas(torch.tensor(3.0), torch.tensor(0.0)) == (0.0, 0.0)


def test_euler_ancestral_ignores_karras_sigmas_as_diffusers_does_and_warns():
    euler_karras = diffusers.EulerDiscreteScheduler.from_config({**SD15, "use_karras_sigmas": True})
    reference = diffusers.EulerAncestralDiscreteScheduler.from_config(euler_karras.config)
    with pytest.warns(UserWarning, match="ignores use_karras_sigmas=True, as diffusers"):
        ours = pretrained.scheduler_from_diffusers(reference)
    ours.set_timesteps(10)
    reference.set_timesteps(10)
    assert torch.equal(ours.sigmas, reference.sigmas) and torch.equal(ours.timesteps, reference.timesteps)


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
@pytest.mark.parametrize("value", ["yes", 1, 0.0, [True]])
def test_use_karras_sigmas_must_be_a_bool(name, value):
    with pytest.raises(TypeError, match=re.escape(f"use_karras_sigmas={value!r}") + r" .*is not a bool"):
        schedulers.SCHEDULERS[name](use_karras_sigmas=value)
    assert schedulers.SCHEDULERS[name](use_karras_sigmas=np.bool_(True)).config.use_karras_sigmas is True
    assert schedulers.SCHEDULERS[name](use_karras_sigmas=None).config.use_karras_sigmas is False


@pytest.mark.parametrize("args, error, message", [
    ((0.03, 14.6, 10, 0.0), ValueError, r"rho=0.0 must be positive"),
    ((0.03, 14.6, 10, -7), ValueError, r"rho=-7.0 must be positive"),
    ((0.03, 14.6, 10, float("nan")), ValueError, r"rho=nan is not a finite number"),
    ((0.03, 14.6, 10, "7"), TypeError, r"rho='7' is a string"),
    ((14.6, 0.03, 10, 7.0), ValueError, r"sigma_min=14.6 and sigma_max=0.03 must satisfy 0 <= sigma_min <= sigma_max"),
    ((-0.1, 14.6, 10, 7.0), ValueError, r"sigma_min=-0.1"),
    ((0.03, 14.6, 0, 7.0), ValueError, r"num_inference_steps=0 must be at least 1"),
    ((0.03, 14.6, 2.5, 7.0), TypeError, r"num_inference_steps=2.5 is not an int"),
])
def test_karras_sigmas_refuses_bad_arguments(args, error, message):
    with pytest.raises(error, match=message):
        karras_sigmas(*args)


@pytest.mark.parametrize("config, error, message", [
    (dict(sigma_min=-1.0), ValueError, r"sigma_min=-1.0 is a noise level and cannot be negative"),
    (dict(sigma_max="10"), TypeError, r"sigma_max='10' is a string"),
])
def test_euler_sigma_range_is_checked(config, error, message):
    with pytest.raises(error, match=message):
        schedulers.EulerDiscreteScheduler(use_karras_sigmas=True, **config)


def test_euler_own_range_upside_down_fails_before_anything_changes():
    scheduler = schedulers.EulerDiscreteScheduler(use_karras_sigmas=True, sigma_min=10.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="sigma_min=10.0 and sigma_max=1.0"):
        scheduler.set_timesteps(10)
    assert scheduler.timesteps is None  # nothing half-set


def test_euler_ancestral_bad_input():
    with pytest.raises(ValueError, match=r"prediction_type='sample'; use one of \('epsilon', 'v_prediction'\)"):
        samplers.EulerAncestralDiscreteScheduler(prediction_type="sample")
    with pytest.raises(ValueError, match=r"rescale_betas_zero_snr=True is not supported"):
        samplers.EulerAncestralDiscreteScheduler(rescale_betas_zero_snr=True)
    scheduler = samplers.EulerAncestralDiscreteScheduler(**SD15)
    x = torch.zeros(SHAPE)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        scheduler.step(x, 999, x)
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match=r"t=500 is not one of this scheduler's 10 timesteps"):
        scheduler.step(x, 500, x)
    with pytest.raises(ValueError, match=r"3 generators were passed for a batch of 2"):
        scheduler.step(x, scheduler.timesteps[0], x, generator=[torch.Generator()] * 3)
    with pytest.raises(ValueError, match=r"begin_index=10 is past the last of the 10 timesteps"):
        scheduler.set_begin_index(10)


# --- in the pipelines: 50 Karras steps, where DPM-Solver++ visits t = 1 twice ----------------

TOLERANCE = 3e-3  # DESIGN.md's bar for seeded images
PROMPTS = ["a red circle at the top left", "a small blue square"]


@pytest.fixture(scope="module")
def dpm_karras_pipelines(tiny_diffusers_pipeline):
    """diffusers' text-to-image, img2img and inpainting (blending) pipelines and ours on the shared tiny weights,
    all with DPM++ 2M Karras (SD 1.5's config)."""
    reference, folder = tiny_diffusers_pipeline
    config = {**SD15, **KARRAS["DPMSolverMultistepScheduler"], "timestep_spacing": "leading"}
    ours = pretrained.load_pipeline(folder)
    pairs = {}
    classes = {"text": (diffusers.StableDiffusionPipeline, type(ours)),
               "img2img": (diffusers.StableDiffusionImg2ImgPipeline, editing.StableDiffusionImg2Img),
               "inpaint": (diffusers.StableDiffusionInpaintPipeline, editing.StableDiffusionInpaint)}
    for kind, (theirs_class, ours_class) in classes.items():
        scheduler = diffusers.DPMSolverMultistepScheduler.from_config(config)
        theirs = theirs_class(**{**reference.components, "scheduler": scheduler})
        theirs.set_progress_bar_config(disable=True)
        ours_scheduler = pretrained.scheduler_from_diffusers(scheduler)
        pairs[kind] = theirs, ours_class(**{**ours.components, "scheduler": ours_scheduler})
    return pairs


def images_of_both(pair, **options):
    theirs, mine = pair
    a = theirs(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="np", **options).images
    b = mine(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="np", progress=False, **options).images
    assert b.shape == a.shape and b.std() > 0.01 and np.abs(b[0] - b[1]).max() > 0.01  # real, different images
    return a, b


def test_fifty_dpm_karras_steps_match_diffusers(dpm_karras_pipelines):
    a, b = images_of_both(dpm_karras_pipelines["text"], num_inference_steps=50, guidance_scale=7.5, height=32, width=32)
    assert np.abs(a - b).max() < TOLERANCE


def test_img2img_starting_at_a_repeated_timestep_matches_diffusers(dpm_karras_pipelines):
    """strength 0.05 of 50 steps starts at position 48, the second visit of t = 1: the scheduler must be told
    (set_begin_index, as diffusers' pipeline tells it), since looking t = 1 up would give position 47."""
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    a, b = images_of_both(dpm_karras_pipelines["img2img"], image=images, strength=0.05, num_inference_steps=50,
                          guidance_scale=7.5)
    assert np.abs(a - b).max() < TOLERANCE
    assert dpm_karras_pipelines["img2img"][1].scheduler.step_index == 50  # started at 48, took two steps


def test_inpainting_blends_at_the_counted_sigma(dpm_karras_pipelines):
    """Blending noises the known region to the next step's σ; at the repeated t = 1 that is the counter's σ."""
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(2, 1, 32, 32)
    masks[:, :, 8:24, 4:20] = 1.0
    a, b = images_of_both(dpm_karras_pipelines["inpaint"], image=images, mask_image=masks, strength=1.0,
                          num_inference_steps=50, guidance_scale=7.5, height=32, width=32)
    assert np.abs(a - b).max() < TOLERANCE
