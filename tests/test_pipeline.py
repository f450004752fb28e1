"""ldm_teach.pipeline against diffusers' StableDiffusionPipeline on the same tiny random weights; bad input."""
import warnings

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, PNDMScheduler)

from ldm_teach import pretrained
from ldm_teach.pipeline import StableDiffusion, classifier_free_guidance, draw_latents

TOLERANCE = 3e-3  # DESIGN.md's bar for seeded images; on CPU in float32 they agree to about 1e-6
PROMPTS = ["a red circle at the top left", "a small blue square"]
NEGATIVES = ["blurry", "a green triangle"]
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                      set_alpha_to_one=False, skip_prk_steps=True, clip_sample=False)


@pytest.fixture(scope="module")
def pipelines(tiny_diffusers_pipeline):
    """(diffusers' pipeline, ours loaded by load_pipeline from the folder diffusers wrote).

    Tests swap the schedulers of both; the shared session pipeline gets its own back afterwards.
    """
    reference, folder = tiny_diffusers_pipeline
    saved_scheduler = reference.scheduler
    yield reference, pretrained.load_pipeline(folder)
    reference.scheduler = saved_scheduler


def use_scheduler(pipelines, scheduler_class, **config):
    """Give both pipelines the same scheduler: diffusers' class from SD 1.5's config, ours from it."""
    reference, ours = pipelines
    reference.scheduler = scheduler_class.from_config({**SD15_SCHEDULER, **config})
    ours.scheduler = pretrained.scheduler_from_diffusers(reference.scheduler)
    return reference, ours


def both(pipelines, prompt, **options):
    """The images of diffusers' pipeline and ours for the same arguments and the same seeded CPU generator."""
    reference, ours = pipelines
    seed = options.pop("seed", 0)
    theirs = reference(prompt, generator=torch.Generator().manual_seed(seed), **options).images
    mine = ours(prompt, generator=torch.Generator().manual_seed(seed), progress=False, **options).images
    return theirs, mine


SCHEDULERS = {"PNDM": (PNDMScheduler, {}), "DDIM": (DDIMScheduler, {}), "Euler": (EulerDiscreteScheduler, {}),
              "DPM-Solver++": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2)),
              "Euler-Karras": (EulerDiscreteScheduler, dict(use_karras_sigmas=True)),
              "DPM++-2M-Karras": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2,
                                                                   use_karras_sigmas=True)),
              "Euler-ancestral": (EulerAncestralDiscreteScheduler, {})}


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0], ids=["guided", "unguided"])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_images_match_diffusers(pipelines, name, guidance_scale):
    scheduler_class, config = SCHEDULERS[name]
    pipelines = use_scheduler(pipelines, scheduler_class, **config)
    negative = NEGATIVES if guidance_scale > 1 else None  # diffusers ignores it unguided; we warn
    theirs, mine = both(pipelines, PROMPTS, negative_prompt=negative, num_inference_steps=5,
                        guidance_scale=guidance_scale, height=64, width=40, output_type="np")
    assert mine.shape == theirs.shape == (2, 64, 40, 3) and mine.dtype == np.float32
    assert np.abs(mine - theirs).max() < TOLERANCE
    assert mine.std() > 0.01  # a real image, not a constant one that would match anything
    assert np.abs(mine[0] - mine[1]).max() > 0.01  # the two prompts give two different images


def test_output_types_and_a_tall_image(pipelines):
    pipelines = use_scheduler(pipelines, PNDMScheduler)
    options = dict(num_inference_steps=3, guidance_scale=5.0, height=48, width=72)
    theirs, mine = both(pipelines, "a tall picture", output_type="pil", **options)
    assert len(mine) == 1 and mine[0].size == theirs[0].size == (72, 48) and mine[0].mode == "RGB"
    assert np.abs(np.asarray(mine[0], dtype=int) - np.asarray(theirs[0], dtype=int)).max() <= 1  # 8-bit rounding
    theirs, mine = both(pipelines, "a tall picture", output_type="pt", **options)
    assert mine.shape == theirs.shape == (1, 3, 48, 72) and (mine - theirs).abs().max() < TOLERANCE
    assert 0 <= mine.min() and mine.max() <= 1
    theirs, mine = both(pipelines, "a tall picture", output_type="latent", **options)
    assert mine.shape == (1, 4, 6, 9) and (mine - theirs).abs().max() < 1e-4


def test_generator_lists_and_images_per_prompt(pipelines):
    """One generator per image: image i of the batch is the image a single run with generator i gives."""
    reference, ours = use_scheduler(pipelines, DDIMScheduler)
    options = dict(num_inference_steps=3, guidance_scale=7.5, height=32, width=32, output_type="np",
                   num_images_per_prompt=2)
    generators = [torch.Generator().manual_seed(seed) for seed in (1, 2, 3, 4)]
    theirs = reference(PROMPTS, generator=generators, **options).images
    generators = [torch.Generator().manual_seed(seed) for seed in (1, 2, 3, 4)]
    mine = ours(PROMPTS, generator=generators, progress=False, **options).images
    assert mine.shape == (4, 32, 32, 3) and np.abs(mine - theirs).max() < TOLERANCE
    alone = ours(PROMPTS[1], generator=torch.Generator().manual_seed(4), progress=False,
                 **{**options, "num_images_per_prompt": 1}).images
    assert np.abs(alone[0] - mine[3]).max() < 1e-5


@pytest.mark.parametrize("scheduler_class, extra",
                         [(DDIMScheduler, dict(eta=0.7)), (DDPMScheduler, {}), (EulerAncestralDiscreteScheduler, {})],
                         ids=["DDIM", "DDPM", "Euler-a"])
def test_stochastic_steps_draw_noise_like_diffusers(pipelines, scheduler_class, extra):
    """One generator, and a list of one per image: each step's noise drawn as diffusers' randn_tensor draws it."""
    reference, ours = pipelines = use_scheduler(pipelines, scheduler_class)
    options = dict(num_inference_steps=4, guidance_scale=3.0, height=32, width=32, output_type="np", **extra)
    theirs, mine = both(pipelines, PROMPTS, **options)
    assert np.abs(mine - theirs).max() < TOLERANCE
    theirs = reference(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in (3, 4)], **options).images
    mine = ours(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in (3, 4)], progress=False, **options).images
    assert np.abs(mine - theirs).max() < TOLERANCE
    alone = ours(PROMPTS[1], generator=torch.Generator().manual_seed(4), progress=False, **options).images
    assert np.abs(alone[0] - mine[1]).max() < 1e-5  # image i is the image generator i gives alone


def test_the_loop_calls_back_at_every_step_and_guidance_is_one_batch(pipelines):
    _, ours = use_scheduler(pipelines, EulerDiscreteScheduler)
    seen, batches = [], []
    hook = ours.unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    try:
        final = ours(PROMPTS, num_inference_steps=4, guidance_scale=7.5, height=32, width=32, output_type="latent",
                     generator=torch.Generator().manual_seed(0), progress=False,
                     callback=lambda step, t, latents: seen.append((step, float(t), latents.clone()))).images
        ours(PROMPTS, num_inference_steps=4, guidance_scale=1.0, height=32, width=32, progress=False)
    finally:
        hook.remove()
    assert [step for step, _, _ in seen] == [0, 1, 2, 3]
    assert [t for _, t, _ in seen] == ours.scheduler.timesteps.tolist()
    assert torch.equal(seen[-1][2], final)
    assert batches == [4] * 4 + [2] * 4  # guided: prompts' and unconditional rows in one call; unguided: no second row


def test_default_size_and_the_guidance_formula(pipelines):
    _, ours = pipelines
    assert ours.default_size() == 8 * 8 and ours.vae_scale_factor == 8
    image = ours("x", num_inference_steps=1, output_type="np", progress=False).images
    assert image.shape == (1, 64, 64, 3)
    uncond, text = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.allclose(classifier_free_guidance(uncond, text, 1.0), text, atol=1e-6)
    assert torch.equal(classifier_free_guidance(uncond, text, 0.0), uncond)
    assert torch.allclose(classifier_free_guidance(uncond, text, 3.0), text + 2 * (text - uncond), atol=1e-6)


def test_latents_are_drawn_on_the_generators_device():
    generator = torch.Generator().manual_seed(3)
    latents = draw_latents((2, 4, 3, 5), generator, torch.device("cpu"), torch.float32)
    assert torch.equal(latents, torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(3)))
    one_by_one = draw_latents((2, 4, 3, 5), [torch.Generator().manual_seed(s) for s in (3, 4)], "cpu", torch.float32)
    for index, seed in enumerate((3, 4)):
        assert torch.equal(one_by_one[index], torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(seed)))
    with pytest.raises(ValueError, match="3 generators were passed for a batch of 2"):
        draw_latents((2, 4, 3, 5), [torch.Generator()] * 3, "cpu", torch.float32)


# --- bad input ------------------------------------------------------------------------------


def test_size_must_be_a_multiple_of_8(pipelines):
    _, ours = pipelines
    with pytest.raises(ValueError, match=r"height=100 is not a positive multiple of 8.*height=96 or height=104"):
        ours("x", height=100, width=64, num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="width=0"):
        ours("x", height=64, width=0, num_inference_steps=1, progress=False)


def test_long_prompts_are_cut_with_a_warning_naming_the_dropped_words(pipelines):
    _, ours = pipelines
    long_prompt = " ".join(["cat"] * 74) + " then a dog and a bird"
    with pytest.warns(UserWarning, match="prompt 0 is 82 tokens long.*'a dog and a bird'"):
        ours(long_prompt, num_inference_steps=1, height=32, width=32, progress=False)
    with pytest.warns(UserWarning, match="negative prompt 1 .*'a dog and a bird'"):
        ours(PROMPTS, negative_prompt=["", long_prompt], num_inference_steps=1, height=32, width=32, progress=False)


def test_negative_prompts_must_match_the_prompts(pipelines):
    _, ours = pipelines
    with pytest.raises(ValueError, match="3 negative prompts were given for 2 prompts"):
        ours(PROMPTS, negative_prompt=["a", "b", "c"], num_inference_steps=1, progress=False)
    with pytest.raises(TypeError, match="negative_prompt must be a str or a list of str"):
        ours(PROMPTS, negative_prompt=[1, 2], num_inference_steps=1, progress=False)
    with pytest.warns(UserWarning, match="negative_prompt has no effect at guidance_scale <= 1"):
        ours("x", negative_prompt="y", guidance_scale=1.0, num_inference_steps=1, height=32, width=32, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a single string is used for every prompt, without a warning
        ours(PROMPTS, negative_prompt="blurry", num_inference_steps=1, height=32, width=32, progress=False)


def test_other_bad_arguments(pipelines):
    _, ours = pipelines
    with pytest.raises(TypeError, match="prompt must be a str or a non-empty list of str"):
        ours([], num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="output_type='jpeg' is not one of"):
        ours("x", output_type="jpeg", num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match=r"latents has shape \(1, 4, 4, 4\), but 64x64 images of this batch need"):
        ours("x", latents=torch.zeros(1, 4, 4, 4), num_inference_steps=1, progress=False)


def test_a_device_or_dtype_mix_is_refused(pipelines):
    _, ours = pipelines
    mixed = StableDiffusion(ours.unet, ours.vae, ours.text_encoder, ours.tokenizer, ours.scheduler)
    mixed.vae = type(ours.vae)(ours.vae.config).double()
    with pytest.raises(ValueError, match=r"vae torch.float64 on cpu.*pipe.to\(device, dtype\)"):
        mixed("x", num_inference_steps=1, progress=False)


def test_mismatched_components_are_refused(pipelines):
    _, ours = pipelines
    from ldm_teach.clip import TextEncoder, TextEncoderConfig

    with pytest.raises(ValueError, match="32-wide text features, but the text encoder writes 64-wide"):
        StableDiffusion(ours.unet, ours.vae, TextEncoder(TextEncoderConfig.tiny()), ours.tokenizer, ours.scheduler)


def test_half_precision_runs_through(tiny_diffusers_pipeline):
    """bfloat16 on the CPU (float16 is the GPU's): latents drawn and guided in the models' dtype, images close
    to float32's. Where a GPU is at hand the chapter's full profile measures SD 1.5 in float16."""
    _, folder = tiny_diffusers_pipeline
    full = pretrained.load_pipeline(folder)
    half = pretrained.load_pipeline(folder, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.vae.post_quant_conv.weight.dtype == torch.bfloat16
    options = dict(num_inference_steps=4, guidance_scale=7.5, height=32, width=32, output_type="np", progress=False)
    latents = half(PROMPTS, generator=torch.Generator().manual_seed(0), **{**options, "output_type": "latent"}).images
    assert latents.dtype == torch.bfloat16
    reference = full(PROMPTS, generator=torch.Generator().manual_seed(0), **options).images
    image = half(PROMPTS, generator=torch.Generator().manual_seed(0), **options).images
    assert image.dtype == np.float32 and np.isfinite(image).all()
    assert np.abs(image - reference).mean() < 0.02


def test_the_empty_prompt_is_a_prompt_like_any_other(pipelines):
    """"" is what guidance uses as the unconditional; asked for directly it samples the unconditional model."""
    pipelines = use_scheduler(pipelines, DDIMScheduler)
    theirs, mine = both(pipelines, ["", "a cat"], num_inference_steps=3, guidance_scale=1.0, height=32, width=32,
                        output_type="np")
    assert np.abs(mine - theirs).max() < TOLERANCE
    guided_empty = pipelines[1]("", num_inference_steps=3, guidance_scale=7.5, height=32, width=32,
                                generator=torch.Generator().manual_seed(0), output_type="np", progress=False).images
    assert np.abs(guided_empty - mine[:1]).max() < 1e-5  # guiding "" against "" changes nothing


# --- bad input that used to give NaN images or raw errors (issue 15) -------------------------

BAD_CALLS = {  # argument -> (value, error type, what the message must say)
    "eta=-1": (dict(eta=-1.0), ValueError, r"eta=-1.0 must lie in \[0, 1\]"),
    "eta=2": (dict(eta=2.0), ValueError, r"eta=2.0 must lie in \[0, 1\]"),
    "guidance nan": (dict(guidance_scale=float("nan")), ValueError, "guidance_scale=nan is not a finite number"),
    "guidance inf": (dict(guidance_scale=float("inf")), ValueError, "guidance_scale=inf is not a finite number"),
    "guidance str": (dict(guidance_scale="7.5"), TypeError, "guidance_scale='7.5' is a string.*guidance_scale=7.5"),
    "steps 2.5": (dict(num_inference_steps=2.5), TypeError, "num_inference_steps=2.5 is not an int"),
    "steps str": (dict(num_inference_steps="10"), TypeError, "num_inference_steps='10' is a string"),
    "height str": (dict(height="64"), TypeError, "height='64' is a string.*height=64"),
    "images 0": (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt=0 must be at least 1"),
    "seed for generator": (dict(generator=42), TypeError,
                           r"generator=42 \(int\) is not a torch.Generator.*torch.Generator\(\).manual_seed\(42\)"),
    "seeds for generators": (dict(generator=[torch.Generator(), 3]), TypeError, r"generator=3 \(int\)"),
    "numpy latents": (dict(latents=np.zeros((1, 4, 8, 8), np.float32)), TypeError,
                      r"latents is a NumPy array of shape \(1, 4, 8, 8\).*torch.from_numpy"),
    "nan latents": (dict(latents=torch.full((1, 4, 8, 8), float("nan"))), ValueError,
                    "latents holds 256 NaN or infinite values out of 256"),
    "callback not callable": (dict(callback="print"), TypeError, "callback='print' is not callable"),
}


@pytest.mark.parametrize("label", BAD_CALLS)
def test_bad_arguments_are_refused_before_any_work(pipelines, label):
    _, ours = pipelines
    options, error, message = BAD_CALLS[label]
    calls = []
    hook = ours.unet.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(error, match=message):
            ours("x", **{**dict(num_inference_steps=2, height=64, width=64, progress=False), **options})
    finally:
        hook.remove()
    assert calls == [], "the U-Net ran before the bad argument was refused"


def test_numpy_integers_are_accepted_and_give_the_same_images(pipelines):
    _, ours = pipelines
    plain = ours(PROMPTS, num_inference_steps=2, height=32, width=40, num_images_per_prompt=1, output_type="np",
                 generator=torch.Generator().manual_seed(0), progress=False).images
    numpy = ours(PROMPTS, num_inference_steps=np.int64(2), height=np.int32(32), width=np.int64(40),
                 num_images_per_prompt=np.int64(1), guidance_scale=np.float32(7.5), output_type="np",
                 generator=torch.Generator().manual_seed(0), progress=False).images
    assert np.array_equal(plain, numpy)


def test_moving_to_a_missing_gpu_says_so(pipelines, monkeypatch):
    _, ours = pipelines
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    with pytest.raises(RuntimeError, match=r"device='cuda' was asked for, but torch sees no CUDA GPU.*device='cpu'"):
        ours.to("cuda")
    with pytest.raises(ValueError, match="device='gpu' is not a device torch knows"):
        ours.to("gpu")
    assert ours.device.type == "cpu"
