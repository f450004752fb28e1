"""ldm_teach.schedulers against diffusers' schedulers: timesteps, every step, seeded noise, add_noise, errors."""
import os
import re
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers
import pytest
import torch

from ldm_teach import pretrained, schedulers

NAMES = ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"]
SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
            timestep_spacing="leading", set_alpha_to_one=False, clip_sample=False, skip_prk_steps=True)
COMMON_CONFIGS = {
    "sd15": SD15,
    "linear-trailing-v": dict(beta_schedule="linear", timestep_spacing="trailing", prediction_type="v_prediction",
                              skip_prk_steps=True),
    "cosine-linspace": dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace", skip_prk_steps=True),
    "defaults": {},
}
EXTRA_CONFIGS = {
    "DDPMScheduler": {
        "clip-sample": dict(clip_sample=True, clip_sample_range=0.5, timestep_spacing="leading", steps_offset=1),
        "fixed-large-x0": dict(variance_type="fixed_large", prediction_type="sample"),
    },
    "DDIMScheduler": {
        "clip-sample-trained-betas": dict(clip_sample=True, set_alpha_to_one=True, prediction_type="sample",
                                          trained_betas=torch.linspace(1e-4, 0.02, 1000).tolist()),
    },
    "PNDMScheduler": {
        "runge-kutta-sd15": {**SD15, "skip_prk_steps": False},
        "runge-kutta-linspace-v": dict(timestep_spacing="linspace", prediction_type="v_prediction"),
    },
    "EulerDiscreteScheduler": {
        "sd15-sigma-min-v": {**SD15, "final_sigmas_type": "sigma_min", "prediction_type": "v_prediction"},
    },
    "DPMSolverMultistepScheduler": {
        "order-1": dict(SD15, solver_order=1),
        "lower-order-final-sigma-min": dict(SD15, final_sigmas_type="sigma_min"),
        "no-lower-order-final-sigma-min": dict(SD15, lower_order_final=False, final_sigmas_type="sigma_min"),
        "euler-at-final-x0": dict(euler_at_final=True, final_sigmas_type="sigma_min", prediction_type="sample"),
    },
}
STEPS = [1, 10, 25, 50]


def runge_kutta_pndm(name, config):
    """PNDM without skip_prk_steps (diffusers' default) warms up with Runge-Kutta steps and needs n >= 4."""
    return name == "PNDMScheduler" and not config.get("skip_prk_steps", False)


CASES = [(name, label, config, steps) for name in NAMES
         for label, config in {**COMMON_CONFIGS, **EXTRA_CONFIGS[name]}.items()
         for steps in STEPS if not (runge_kutta_pndm(name, config) and steps < 4)]
SHAPE = (2, 4, 8, 8)


def make_pair(name, config):
    """(ours, diffusers') built from one config; diffusers ignores keys of other schedulers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = getattr(diffusers, name).from_config(config)
    return pretrained.scheduler_from_diffusers(reference), reference


def fake_model(x, t):
    """A deterministic stand-in for the U-Net: a smooth function of x and t."""
    t = float(t) / 1000
    return 0.7 * torch.tanh(x) + 0.2 * torch.sin(3 * x + t) + 0.1 * t


def step_kwargs(name, generator, eta, reference=False):
    """The step's keyword arguments: ours all take the generator (diffusers' PNDM does not), DDIM also eta."""
    kwargs = {} if reference and name == "PNDMScheduler" else {"generator": generator}
    return {**kwargs, "eta": eta} if name == "DDIMScheduler" else kwargs


def run_both(ours, reference, name, num_inference_steps, seed=0, eta=0.0):
    """Sample with both, feeding both diffusers' current x; return the worst step difference and both finals.

    Each scheduler gets its own generator, seeded alike, so stochastic steps must draw the same noise.
    """
    ours.set_timesteps(num_inference_steps)
    reference.set_timesteps(num_inference_steps)
    assert ours.timesteps.dtype == reference.timesteps.dtype
    assert torch.equal(ours.timesteps, reference.timesteps)
    assert float(ours.init_noise_sigma) == float(reference.init_noise_sigma)
    our_generator = torch.Generator().manual_seed(seed)
    reference_generator = torch.Generator().manual_seed(seed)

    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * reference.init_noise_sigma
    x_ours = x.clone()
    worst = 0.0
    for t in reference.timesteps:
        model_input = reference.scale_model_input(x, t)
        torch.testing.assert_close(ours.scale_model_input(x, t), model_input, rtol=0, atol=1e-6)
        output = fake_model(model_input, t)
        ours_prev = ours.step(output, t, x, **step_kwargs(name, our_generator, eta))
        x = reference.step(output, t, x, **step_kwargs(name, reference_generator, eta, reference=True)).prev_sample
        assert ours_prev.dtype == x.dtype and ours_prev.shape == x.shape
        worst = max(worst, (ours_prev - x).abs().max().item())
        x_ours = ours_prev
    return worst, x_ours, x


@pytest.mark.parametrize("name,label,config,num_inference_steps", CASES,
                         ids=[f"{name}-{label}-{steps}" for name, label, _, steps in CASES])
def test_sampling_loop_matches_diffusers(name, label, config, num_inference_steps):
    ours, reference = make_pair(name, config)
    worst, _, _ = run_both(ours, reference, name, num_inference_steps)
    assert worst <= 1e-5, f"worst step difference {worst:.3g}"


def test_ddpm_1000_steps_matches_diffusers():
    ours, reference = make_pair("DDPMScheduler", dict(SD15, steps_offset=0))
    worst, final_ours, final_reference = run_both(ours, reference, "DDPMScheduler", 1000, seed=3)
    assert worst <= 1e-5
    torch.testing.assert_close(final_ours, final_reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("config", [SD15, dict(timestep_spacing="trailing", clip_sample=True)])
def test_seeded_stochastic_run_matches_diffusers(name, config):
    """An independent seeded run (DDPM; DDIM with eta=1) lands where diffusers' seeded run lands."""
    ours, reference = make_pair(name, config)
    ours.set_timesteps(25)
    reference.set_timesteps(25)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    finals = []
    for scheduler, step_of in ((ours, lambda *a, **k: ours.step(*a, **k)),
                               (reference, lambda *a, **k: reference.step(*a, **k).prev_sample)):
        generator = torch.Generator().manual_seed(1234)
        x = start.clone()
        for t in scheduler.timesteps:
            x = step_of(fake_model(x, t), t, x, **step_kwargs(name, generator, eta=1.0))
        finals.append(x)
    torch.testing.assert_close(finals[0], finals[1], rtol=0, atol=1e-5)
    assert not torch.allclose(finals[0], start)  # the run did move


def test_generator_changes_the_ddpm_result():
    """A different seed gives a different sample (the noise really comes from the caller's generator)."""
    ours, _ = make_pair("DDPMScheduler", SD15)
    ours.set_timesteps(10)
    x = torch.zeros(SHAPE)
    t = ours.timesteps[0]
    first = ours.step(fake_model(x, t), t, x, generator=torch.Generator().manual_seed(0))
    second = ours.step(fake_model(x, t), t, x, generator=torch.Generator().manual_seed(1))
    assert (first - second).abs().max() > 0.01


@pytest.mark.parametrize("name", NAMES)
def test_add_noise_matches_diffusers(name):
    ours, reference = make_pair(name, SD15)
    ours.set_timesteps(50)
    reference.set_timesteps(50)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    t = reference.timesteps[[3, 40]]  # one timestep per sample
    torch.testing.assert_close(ours.add_noise(x0, noise, t), reference.add_noise(x0, noise, t), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip_keeps_every_key_without_warnings(name):
    """Every key of a diffusers config is understood: ours or switched off; the values carry over."""
    reference = getattr(diffusers, name).from_config(SD15)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = pretrained.scheduler_from_diffusers(reference)
    assert type(ours).__name__ == name
    for key, value in ours.config.items():
        assert value == reference.config[key], key
    assert ours.config.steps_offset == ours.config["steps_offset"] == 1


def test_scheduler_from_config_reads_a_scheduler_config_json():
    sd15_json = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                 "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                 "steps_offset": 1, "trained_betas": None}
    ours = pretrained.scheduler_from_config(sd15_json)
    assert isinstance(ours, schedulers.PNDMScheduler)
    ours.set_timesteps(50)
    assert ours.timesteps[:4].tolist() == [981, 961, 961, 941] and len(ours.timesteps) == 51


def test_unknown_scheduler_class_lists_the_supported_ones():
    with pytest.raises(ValueError, match="LMSDiscreteScheduler.*DDIMScheduler"):
        pretrained.scheduler_from_config({"_class_name": "LMSDiscreteScheduler"})
    with pytest.raises(ValueError, match=r"has no '_class_name' \(its keys: \['beta_end'\]\)"):
        pretrained.scheduler_from_config({"beta_end": 0.012})


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("key,value", [("beta_schedule", "foo"), ("timestep_spacing", "bar"), ("prediction_type", "x")])
def test_unknown_config_values_are_refused(name, key, value):
    with pytest.raises(ValueError, match=f"{key}='{value}'"):
        schedulers.SCHEDULERS[name](**{key: value})


@pytest.mark.parametrize("name,key,value", [
    ("EulerDiscreteScheduler", "use_exponential_sigmas", True),
    ("DPMSolverMultistepScheduler", "use_beta_sigmas", True),
    ("DPMSolverMultistepScheduler", "algorithm_type", "sde-dpmsolver++"),
    ("DDIMScheduler", "thresholding", True),
    ("DDPMScheduler", "rescale_betas_zero_snr", True),
    ("DDPMScheduler", "variance_type", "learned_range"),
    ("DPMSolverMultistepScheduler", "solver_order", 3),
])
def test_unsupported_features_are_refused(name, key, value):
    with pytest.raises(ValueError, match=re.escape(f"{key}={value!r}")):
        schedulers.SCHEDULERS[name](**{key: value})


def test_misspelt_key_warns():
    with pytest.warns(UserWarning, match="beta_shedule"):
        schedulers.DDIMScheduler(beta_shedule="scaled_linear")


@pytest.mark.parametrize("name", NAMES)
def test_too_many_steps_and_step_before_set_timesteps(name):
    scheduler = schedulers.SCHEDULERS[name](num_train_timesteps=100)
    with pytest.raises(ValueError, match="num_inference_steps=101.*num_train_timesteps=100"):
        scheduler.set_timesteps(101)
    x = torch.zeros(SHAPE)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        scheduler.step(x, 50, x)


def test_offset_pushing_a_timestep_past_the_last_is_refused():
    """SD 1.5's steps_offset=1 with 1000 leading steps would ask for timestep 1000 (diffusers fails with an IndexError)."""
    scheduler = schedulers.DDPMScheduler(**SD15)
    with pytest.raises(ValueError, match="steps_offset=1"):
        scheduler.set_timesteps(1000)


def test_pndm_runge_kutta_needs_four_steps():
    with pytest.raises(ValueError, match="skip_prk_steps"):
        schedulers.PNDMScheduler(skip_prk_steps=False).set_timesteps(3)


def test_step_refuses_a_timestep_not_in_the_schedule():
    scheduler = schedulers.EulerDiscreteScheduler()
    scheduler.set_timesteps(10)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="t=500"):
        scheduler.step(x, 500, x)


# --- bad input: errors that name the value (issue 15) --------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("t", [5, -1, 2000])
def test_every_step_refuses_timesteps_outside_the_schedule(name, t):
    scheduler = schedulers.SCHEDULERS[name](**SD15)
    scheduler.set_timesteps(10)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match=rf"t={t}\b"):
        scheduler.step(x, t, x)


@pytest.mark.parametrize("eta", [-0.5, 1.5, float("nan")])
def test_ddim_refuses_eta_outside_zero_one(eta):
    scheduler = schedulers.DDIMScheduler(**SD15)
    scheduler.set_timesteps(10)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match=f"eta={eta}"):
        scheduler.step(x, scheduler.timesteps[0], x, eta=eta)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("steps, error, message", [
    (2.5, TypeError, r"num_inference_steps=2.5 is not an int.*num_inference_steps=2 or num_inference_steps=3"),
    ("10", TypeError, r"num_inference_steps='10' is a string.*num_inference_steps=10"),
    (10.0, TypeError, r"num_inference_steps=10.0 is not an int; pass num_inference_steps=10"),
    (True, TypeError, r"num_inference_steps=True is not an int"),
])
def test_set_timesteps_refuses_non_integers(name, steps, error, message):
    with pytest.raises(error, match=message):
        schedulers.SCHEDULERS[name]().set_timesteps(steps)


@pytest.mark.parametrize("name", NAMES)
def test_numpy_integers_work_wherever_ints_do(name):
    import numpy as np

    ours = schedulers.SCHEDULERS[name](**{**SD15, "num_train_timesteps": np.int64(1000), "steps_offset": np.int32(1)})
    plain = schedulers.SCHEDULERS[name](**SD15)
    ours.set_timesteps(np.int64(10))
    plain.set_timesteps(10)
    assert torch.equal(ours.timesteps, plain.timesteps)
    assert type(ours.config.num_train_timesteps) is int and type(ours.num_inference_steps) is int
    x = torch.linspace(-1, 1, 512).reshape(SHAPE)
    t = ours.timesteps[0]
    index = np.int64(t) if t.dtype == torch.int64 else t  # Euler's timesteps are floats
    assert torch.equal(ours.step(x, index, x, generator=torch.Generator().manual_seed(0)),
                       plain.step(x, t, x, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("config, message", [
    (dict(beta_end=1.5), r"beta_end=1.5 gives betas from 0.0001 to 1.5; every beta must lie strictly between 0 and 1"),
    (dict(beta_start=-0.1), r"beta_start=-0.1 .* gives betas from -0.1"),
    (dict(beta_start=0.0), r"beta_start=0.0 .* gives betas from 0 "),
    (dict(beta_schedule="scaled_linear", beta_end=2.0), r"'scaled_linear' schedule .* beta_end=2.0"),
    (dict(beta_schedule="scaled_linear", beta_start=-0.01), r"beta_start=-0.01 and beta_end=0.02 must be positive"),
    (dict(trained_betas=[0.01] * 10), r"trained_betas has 10 values, but num_train_timesteps=1000"),
    (dict(trained_betas=[1.5] * 1000), r"trained_betas gives betas from 1.5 to 1.5"),
    (dict(trained_betas=[float("nan")] * 1000), r"trained_betas gives betas from nan"),
])
@pytest.mark.parametrize("name", NAMES)
def test_betas_outside_zero_one_are_refused(name, config, message):
    with pytest.raises(ValueError, match=message):
        schedulers.SCHEDULERS[name](**config)


@pytest.mark.parametrize("key, value", [("num_train_timesteps", "1000"), ("beta_start", "0.00085"),
                                        ("steps_offset", "1"), ("num_train_timesteps", 1000.5)])
def test_numbers_given_as_strings_are_refused(key, value):
    with pytest.raises(TypeError, match=f"{key}={value!r}"):
        schedulers.DDIMScheduler(**{key: value})


def test_a_timestep_given_as_a_string_is_refused():
    scheduler = schedulers.DDIMScheduler()
    scheduler.set_timesteps(10)
    x = torch.zeros(SHAPE)
    with pytest.raises(TypeError, match="t='900' is a string"):
        scheduler.step(x, "900", x)


@pytest.mark.parametrize("name", NAMES)
def test_a_model_output_of_another_shape_is_refused(name):
    scheduler = schedulers.SCHEDULERS[name](**SD15)
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match=r"model_output has shape \(1, 4, 8, 8\) but the sample x has shape \(2, 4, 8, 8\)"):
        scheduler.step(torch.zeros(1, 4, 8, 8), scheduler.timesteps[0], torch.zeros(2, 4, 8, 8))
