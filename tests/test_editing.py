"""ldm_teach.editing against diffusers' img2img and inpainting pipelines on the same tiny random weights; bad input."""
import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, PNDMScheduler, StableDiffusionImg2ImgPipeline,
                       StableDiffusionInpaintPipeline, UNet2DConditionModel)
from PIL import Image

from ldm_teach import pretrained
from ldm_teach.editing import (StableDiffusionImg2Img, StableDiffusionInpaint, blend_known_region, image_tensor,
                               inpainting_input, mask_tensor, start_step)
from ldm_teach.pipeline import StableDiffusion

TOLERANCE = 3e-3  # DESIGN.md's bar for seeded images; on CPU in float32 they agree to about 1e-5
PROMPTS = ["a red circle at the top left", "a small blue square"]
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                      set_alpha_to_one=False, skip_prk_steps=True, clip_sample=False)
SCHEDULERS = {"PNDM": (PNDMScheduler, {}), "DDIM": (DDIMScheduler, {}), "Euler": (EulerDiscreteScheduler, {}),
              "DPM-Solver++": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2)),
              "Euler-Karras": (EulerDiscreteScheduler, dict(use_karras_sigmas=True)),
              "DPM++-2M-Karras": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2,
                                                                   use_karras_sigmas=True)),
              "Euler-ancestral": (EulerAncestralDiscreteScheduler, {})}
HEIGHT, WIDTH = 64, 40  # non-square: a swapped height and width shows


def random_images(count=2, height=HEIGHT, width=WIDTH, seed=1):
    return torch.rand(count, 3, height, width, generator=torch.Generator().manual_seed(seed))


def box_masks(count=2, height=HEIGHT, width=WIDTH):
    """White (repaint) boxes, a different one per image, with soft edges that binarisation must cut at 0.5."""
    masks = torch.zeros(count, 1, height, width)
    for index in range(count):
        masks[index, :, 8 + 8 * index:40, 4:28 + 4 * index] = 1.0
    masks[:, :, 40:42] = 0.6  # >= 0.5: repaint
    masks[:, :, 42:44] = 0.4  # < 0.5: keep
    return masks


@pytest.fixture(scope="module")
def references(tiny_diffusers_pipeline, tmp_path_factory):
    """diffusers' pipelines and ours: the shared tiny text-to-image models, and a 9-channel inpainting U-Net
    of the same shape saved by diffusers' save_pretrained and read back by our load_pipeline."""
    text_to_image, folder = tiny_diffusers_pipeline
    torch.manual_seed(1)
    unet9 = UNet2DConditionModel(**{**dict(text_to_image.unet.config), "in_channels": 9})
    with torch.no_grad():  # perturb the norms' 1s and 0s so that a swapped or skipped norm shows
        for name, parameter in unet9.named_parameters():
            if "norm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    inpaint9 = StableDiffusionInpaintPipeline(**{**text_to_image.components, "unet": unet9})
    folder9 = tmp_path_factory.mktemp("tiny_inpaint") / "pipeline"
    inpaint9.save_pretrained(folder9)
    ours = pretrained.load_pipeline(folder)
    ours9 = pretrained.load_pipeline(folder9)
    return {"diffusers": text_to_image, "diffusers9": inpaint9, "ours": ours, "ours9": ours9}


def pair(references, kind, name):
    """diffusers' pipeline of ``kind`` and ours, both with a fresh scheduler ``name`` (SD 1.5's config)."""
    scheduler_class, config = SCHEDULERS[name]
    scheduler = scheduler_class.from_config({**SD15_SCHEDULER, **config})
    ours_scheduler = pretrained.scheduler_from_diffusers(scheduler)
    if kind == "img2img":
        theirs = StableDiffusionImg2ImgPipeline(**{**references["diffusers"].components, "scheduler": scheduler})
        mine = StableDiffusionImg2Img(**{**references["ours"].components, "scheduler": ours_scheduler})
    elif kind == "inpaint4":
        theirs = StableDiffusionInpaintPipeline(**{**references["diffusers"].components, "scheduler": scheduler})
        mine = StableDiffusionInpaint(**{**references["ours"].components, "scheduler": ours_scheduler})
    else:
        theirs = StableDiffusionInpaintPipeline(**{**references["diffusers9"].components, "scheduler": scheduler})
        mine = StableDiffusionInpaint(**{**references["ours9"].components, "scheduler": ours_scheduler})
    theirs.set_progress_bar_config(disable=True)
    return theirs, mine


def both(theirs, mine, prompt, seed=0, **options):
    """Images of diffusers' pipeline and ours for the same arguments and the same seeded CPU generator."""
    a = theirs(prompt, generator=torch.Generator().manual_seed(seed), **options).images
    b = mine(prompt, generator=torch.Generator().manual_seed(seed), progress=False, **options).images
    return a, b


def assert_close_and_real(theirs, mine, shape=(2, HEIGHT, WIDTH, 3)):
    assert mine.shape == theirs.shape == shape and mine.dtype == np.float32
    assert np.abs(mine - theirs).max() < TOLERANCE
    assert mine.std() > 0.01  # a real image, not a constant one that would match anything
    assert np.abs(mine[0] - mine[1]).max() > 0.01  # two prompts, two images


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0], ids=["guided", "unguided"])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_img2img_matches_diffusers(references, name, guidance_scale):
    theirs, mine = pair(references, "img2img", name)
    a, b = both(theirs, mine, PROMPTS, image=random_images(), strength=0.6, num_inference_steps=6,
                guidance_scale=guidance_scale, output_type="np")
    assert_close_and_real(a, b)


@pytest.mark.parametrize("strength", [1.0, 0.7])
@pytest.mark.parametrize("guidance_scale", [7.5, 1.0], ids=["guided", "unguided"])
@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("kind", ["inpaint4", "inpaint9"], ids=["blending", "9-channel"])
def test_inpainting_matches_diffusers(references, kind, name, guidance_scale, strength):
    theirs, mine = pair(references, kind, name)
    a, b = both(theirs, mine, PROMPTS, image=random_images(), mask_image=box_masks(), strength=strength,
                height=HEIGHT, width=WIDTH, num_inference_steps=4, guidance_scale=guidance_scale, output_type="np")
    assert_close_and_real(a, b)


@pytest.mark.parametrize("name", ["DDIM", "Euler-ancestral"])  # Euler ancestral draws each step's noise from them too
@pytest.mark.parametrize("kind", ["img2img", "inpaint4", "inpaint9"])
def test_pil_inputs_one_image_for_many_and_generator_lists(references, kind, name):
    """A PIL image and mask used for 2 prompts x 2 images each; one generator per image, as diffusers pairs them."""
    theirs, mine = pair(references, kind, name)
    array = (random_images(1)[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    image = Image.fromarray(array)
    mask = Image.fromarray((box_masks(1)[0, 0].numpy() * 255).round().astype("uint8"))
    options = dict(image=image, num_inference_steps=3, guidance_scale=5.0, output_type="np", num_images_per_prompt=2)
    if kind != "img2img":
        options.update(mask_image=mask, strength=0.8, height=HEIGHT, width=WIDTH)
    generators = [torch.Generator().manual_seed(seed) for seed in range(4)]
    a = theirs(PROMPTS, generator=generators, **options).images
    generators = [torch.Generator().manual_seed(seed) for seed in range(4)]
    b = mine(PROMPTS, generator=generators, progress=False, **options).images
    assert b.shape == (4, HEIGHT, WIDTH, 3) and np.abs(a - b).max() < TOLERANCE
    assert np.abs(b[0] - b[1]).max() > 0.01  # two seeds, two images


def test_pil_output_and_latents(references):
    theirs, mine = pair(references, "img2img", "Euler")
    a, b = both(theirs, mine, "x", image=random_images(1), strength=0.5, num_inference_steps=4, output_type="pil")
    assert b[0].size == a[0].size == (WIDTH, HEIGHT)
    assert np.abs(np.asarray(a[0], dtype=int) - np.asarray(b[0], dtype=int)).max() <= 1  # 8-bit rounding
    a, b = both(theirs, mine, "x", image=random_images(1), strength=0.5, num_inference_steps=4, output_type="latent")
    assert b.shape == (1, 4, HEIGHT // 8, WIDTH // 8) and (a - b).abs().max() < 1e-4


def test_strength_picks_the_start_step(references):
    assert [start_step(10, s) for s in (1.0, 0.8, 0.55, 0.1)] == [0, 2, 5, 9]
    assert start_step(50, 0.8) == 10 and start_step(4, 0.3) == 3  # int(4 x 0.3) = int(1.2) = 1 step is run
    assert start_step(100, 0.29) == 72  # 100 x 0.29 = 28.999999999999996 in floats: 28 steps, as in diffusers
    _, mine = pair(references, "img2img", "DDIM")
    seen = []
    mine("x", image=random_images(1), strength=0.55, num_inference_steps=10, progress=False,
         callback=lambda step, t, latents: seen.append(int(t)))
    mine.scheduler.set_timesteps(10)
    assert seen == mine.scheduler.timesteps[5:].tolist()  # int(10 x 0.55) = 5 steps, the last five


def test_blending_keeps_the_known_region_exactly(references):
    """After the last step the unmasked latents are the image's own (its posterior sample, the first draw)."""
    _, mine = pair(references, "inpaint4", "DDIM")
    images, masks = random_images(1), box_masks(1)
    latents = mine("x", image=images, mask_image=masks, num_inference_steps=3, output_type="latent",
                   generator=torch.Generator().manual_seed(5), progress=False).images
    known = mine.encode_images(images * 2 - 1, torch.Generator().manual_seed(5))
    keep = torch.nn.functional.interpolate(masks, size=latents.shape[-2:]) == 0  # (1, 1, h, w)
    keep = keep.expand_as(latents)
    assert torch.equal(latents[keep], known[keep])
    assert (latents[~keep] - known[~keep]).abs().max() > 0.1  # the masked region was repainted


def test_the_two_inpainting_steps():
    latents, known = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)
    mask = (torch.rand(2, 1, 3, 5) > 0.5).float()
    blended = blend_known_region(latents, known, mask)
    assert torch.equal(blended, torch.where(mask.bool(), latents, known))
    stacked = inpainting_input(latents, mask, known)
    assert stacked.shape == (2, 9, 3, 5) and torch.equal(stacked[:, 4:5], mask) and torch.equal(stacked[:, 5:], known)


def test_inputs_are_read_like_diffusers():
    soft = torch.tensor([[0.0, 0.49], [0.5, 1.0]])
    assert mask_tensor(soft).tolist() == [[[[0.0, 0.0], [1.0, 1.0]]]]
    pil = Image.fromarray(np.array([[0, 127], [128, 255]], dtype=np.uint8))
    assert mask_tensor(pil).tolist() == [[[[0.0, 0.0], [1.0, 1.0]]]]  # 127/255 < 0.5 <= 128/255
    rgb = Image.fromarray(np.full((8, 16, 3), 255, dtype=np.uint8))
    assert image_tensor(rgb).shape == (1, 3, 8, 16) and image_tensor(rgb).min() == 1.0


def test_load_pipeline_gives_the_class_the_folder_names_and_components_are_shared(references):
    assert type(references["ours"]) is StableDiffusion
    assert type(references["ours9"]) is StableDiffusionInpaint and references["ours9"].unet.config.in_channels == 9
    img2img = StableDiffusionImg2Img(**references["ours"].components)
    assert img2img.unet is references["ours"].unet and img2img.scheduler is references["ours"].scheduler


def test_single_file_inpainting_checkpoints(references, tmp_path):
    """save_single_file writes a 9-channel U-Net; load_single_file returns an inpainting pipeline from it."""
    ours9 = references["ours9"]
    path = tmp_path / "inpainting.safetensors"
    pretrained.save_single_file(ours9, path)
    loaded = pretrained.load_single_file(path, unet_config=ours9.unet.config, vae_config=ours9.vae.config,
                                         text_encoder_config=ours9.text_encoder.config)
    assert type(loaded) is StableDiffusionInpaint
    assert torch.equal(loaded.unet.conv_in.weight, ours9.unet.conv_in.weight)


# --- bad input ------------------------------------------------------------------------------

BAD_CALLS = {  # label -> (pipeline kind, arguments, error type, what the message must say)
    "img2img size": ("img2img", dict(image=random_images(1, 60, 40)), ValueError,
                     r"image is 60x40 \(height x width\): height=60 is not a positive multiple of 8.*height=56"),
    "inpaint size": ("inpaint4", dict(image=random_images(1, 64, 44), mask_image=box_masks(1, 64, 44)), ValueError,
                     r"image is 64x44.*width=44 is not a positive multiple of 8"),
    "mask size": ("inpaint4", dict(image=random_images(1), mask_image=box_masks(1, 32, 40)), ValueError,
                  r"mask_image is 32x40 but image is 64x40"),
    "height asked": ("inpaint9", dict(image=random_images(1), mask_image=box_masks(1), height=32), ValueError,
                     r"height=32 was asked for, but image is 64x40"),
    "strength 0": ("img2img", dict(image=random_images(1), strength=0.0), ValueError,
                   r"strength=0.0 must lie in \(0, 1\]"),
    "strength 1.5": ("inpaint4", dict(image=random_images(1), mask_image=box_masks(1), strength=1.5), ValueError,
                     r"strength=1.5 must lie in \(0, 1\]"),
    "strength nan": ("img2img", dict(image=random_images(1), strength=float("nan")), ValueError,
                     "strength=nan is not a finite number"),
    "no step left": ("img2img", dict(image=random_images(1), strength=0.1, num_inference_steps=5), ValueError,
                     r"strength=0.1 with num_inference_steps=5 runs int\(5 x 0.1\) = 0 denoising steps"),
    "8-bit image": ("img2img", dict(image=random_images(1) * 255), ValueError, r"outside \[0, 1\].*x / 255"),
    "[-1, 1] image": ("img2img", dict(image=random_images(1) * 2 - 1), ValueError, r"x \* 0.5 \+ 0.5"),
    "numpy image": ("img2img", dict(image=np.zeros((1, 3, 64, 40), np.float32)), TypeError, "torch.from_numpy"),
    "grey image": ("img2img", dict(image=torch.rand(1, 1, 64, 40)), ValueError, r"pass RGB images \(B, 3, H, W\)"),
    "three images": ("img2img", dict(image=random_images(3)), ValueError,
                     r"3 images were passed for 1 images.*pass one image for all of them"),
    "mask values": ("inpaint4", dict(image=random_images(1), mask_image=box_masks(1) * 255), ValueError,
                    r"mask_image holds values in \[0, 255\]"),
    "mask type": ("inpaint4", dict(image=random_images(1), mask_image="mask.png"), TypeError,
                  "mask_image is a str; pass a PIL image"),
    "seed": ("img2img", dict(image=random_images(1), generator=3), TypeError, r"generator=3 \(int\)"),
}


@pytest.mark.parametrize("label", BAD_CALLS)
def test_bad_input_is_refused_before_any_work(references, label):
    kind, options, error, message = BAD_CALLS[label]
    _, mine = pair(references, kind, "DDIM")
    calls = []
    hook = mine.unet.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(error, match=message):
            mine("x", **{**dict(num_inference_steps=2, progress=False), **options})
    finally:
        hook.remove()
    assert calls == [], "the U-Net ran before the bad argument was refused"


def test_u_nets_of_the_wrong_width_are_refused(references):
    ours, ours9 = references["ours"], references["ours9"]
    with pytest.raises(ValueError, match="the U-Net takes 9-channel latents, but the VAE makes 4-channel ones"):
        StableDiffusionImg2Img(**ours9.components)
    with pytest.raises(ValueError, match="the U-Net takes 9-channel latents"):
        StableDiffusion(**ours9.components)
    unet5 = type(ours.unet)(type(ours.unet.config)(**{**vars(ours.unet.config), "in_channels": 5}))
    with pytest.raises(ValueError, match=r"the U-Net takes 5 input channels; inpainting needs .* \(4\) or .* \(9"):
        StableDiffusionInpaint(**{**ours.components, "unet": unet5})


def test_the_contract_names():
    from ldm_teach import pipeline

    assert pipeline.StableDiffusionImg2Img is StableDiffusionImg2Img
    assert pipeline.StableDiffusionInpaint is StableDiffusionInpaint
    with pytest.raises(AttributeError, match="has no attribute 'StableDiffusionOutpaint'"):
        pipeline.StableDiffusionOutpaint
