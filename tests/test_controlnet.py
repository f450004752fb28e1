"""ldm_teach.controlnet against diffusers' ControlNetModel and StableDiffusionControlNetPipeline; bad input."""
import numpy as np
import pytest
import torch
from diffusers import (ControlNetModel, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       PNDMScheduler, StableDiffusionControlNetPipeline)

from ldm_teach import pretrained
from ldm_teach.pretrained_editing import controlnet_key
from ldm_teach.controlnet import ControlNet, ControlNetConfig, StableDiffusionControlNet, zero_convolution
from ldm_teach.pipeline import StableDiffusion

TOLERANCE = 3e-3  # DESIGN.md's bar for seeded images
PROMPTS = ["a red circle at the top left", "a small blue square"]
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                      set_alpha_to_one=False, skip_prk_steps=True, clip_sample=False)
SCHEDULERS = {"PNDM": (PNDMScheduler, {}), "DDIM": (DDIMScheduler, {}), "Euler": (EulerDiscreteScheduler, {}),
              "DPM-Solver++": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2))}
HEIGHT, WIDTH = 64, 40


def perturb(model, seed=0):
    """Give the zero convolutions and the norms' 1s and 0s random values: a zero convolution left at zero
    would hide any mistake behind it, and a swapped or skipped norm should show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "controlnet_" in name or "norm" in name or "conv_out" in name:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


def control_images(count=2, height=HEIGHT, width=WIDTH, seed=2):
    return torch.rand(count, 3, height, width, generator=torch.Generator().manual_seed(seed))


# Several shapes: SD-like two levels; three levels, one layer each, a DownBlock in the middle, linear
# projections, explicit heads, two transformer layers and BGR control images; a tiny one on f = 4 latents.
CONFIGS = {
    "two levels": dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8, cross_attention_dim=32,
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=4,
                       conditioning_embedding_out_channels=(8, 16, 16, 32)),
    "three levels": dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                         cross_attention_dim=24, use_linear_projection=True, num_attention_heads=(2, 4, 2),
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                         transformer_layers_per_block=(2, 1, 1), controlnet_conditioning_channel_order="bgr",
                         conditioning_embedding_out_channels=(8, 8, 16, 16)),
    "f = 4": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=64,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=4,
                  conditioning_embedding_out_channels=(8, 16, 32)),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_controlnet_matches_diffusers(name):
    torch.manual_seed(0)
    reference = perturb(ControlNetModel(**CONFIGS[name])).eval()
    ours = pretrained.controlnet_from_diffusers(reference)
    factor = ours.config.control_downsample_factor
    x = torch.randn(2, 4, 8, 6)
    context = torch.randn(2, 7, CONFIGS[name]["cross_attention_dim"])
    control = torch.rand(2, 3, 8 * factor, 6 * factor)
    t = torch.tensor([999, 10])
    with torch.no_grad():
        down_ref, mid_ref = reference(x, t, encoder_hidden_states=context, controlnet_cond=control,
                                      conditioning_scale=0.7, return_dict=False)
        down, mid = ours(x, t, context, control, conditioning_scale=0.7)
    assert len(down) == len(down_ref) and all(a.shape == b.shape for a, b in zip(down, down_ref))
    assert max((a - b).abs().max().item() for a, b in zip(down, down_ref)) < 1e-4
    assert (mid - mid_ref).abs().max() < 1e-4
    assert min(d.abs().max().item() for d in down) > 1e-3  # every residual is non-zero: the test can fail
    assert set(dict(ours.named_parameters())) == {controlnet_key(k)
                                                   for k, _ in reference.named_parameters()}


def test_the_full_sd15_controlnet_has_diffusers_parameter_count():
    with torch.device("meta"):
        reference = ControlNetModel(cross_attention_dim=768)  # lllyasviel/sd-controlnet-canny's config
        ours = ControlNet(ControlNetConfig.sd15())
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    assert 361_000_000 < count < 362_000_000  # about 361 M: the down path and middle of SD 1.5's 860 M U-Net


def test_a_new_controlnet_leaves_the_unet_unchanged(tiny_diffusers_pipeline):
    """from_unet copies the down path and middle; its zero convolutions make the residuals exactly zero."""
    reference, folder = tiny_diffusers_pipeline
    unet = pretrained.load_pipeline(folder).unet
    controlnet = ControlNet.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    diffusers_copy = ControlNetModel.from_unet(reference.unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    ours_state = controlnet.state_dict()
    theirs_state = pretrained.controlnet_from_diffusers(diffusers_copy).state_dict()
    for key in ours_state:
        if not key.startswith("controlnet_cond_embedding.") or key.startswith("controlnet_cond_embedding.conv_out"):
            assert torch.equal(ours_state[key], theirs_state[key]), key  # copied or zero, as diffusers does
    x, context = torch.randn(1, 4, 8, 5), torch.randn(1, 77, 32)
    with torch.no_grad():
        down, mid = controlnet(x, 500, context, control_images(1))
        assert all(torch.equal(d, torch.zeros_like(d)) for d in down) and torch.equal(mid, torch.zeros_like(mid))
        assert torch.equal(unet(x, 500, context, down_residuals=down, mid_residual=mid), unet(x, 500, context))
    conv = zero_convolution(3)
    assert torch.equal(conv(torch.randn(1, 3, 2, 2)), torch.zeros(1, 3, 2, 2))


@pytest.fixture(scope="module")
def references(tiny_diffusers_pipeline, tmp_path_factory):
    """diffusers' ControlNet pipeline on the shared tiny models with a perturbed ControlNet, saved by
    save_pretrained and read back by our load_pipeline."""
    text_to_image, _ = tiny_diffusers_pipeline
    torch.manual_seed(3)
    controlnet = perturb(ControlNetModel.from_unet(text_to_image.unet,
                                                   conditioning_embedding_out_channels=(8, 16, 16, 32)), seed=3)
    theirs = StableDiffusionControlNetPipeline(**text_to_image.components, controlnet=controlnet)
    folder = tmp_path_factory.mktemp("tiny_controlnet") / "pipeline"
    theirs.save_pretrained(folder)
    return theirs, pretrained.load_pipeline(folder), folder


def pair(references, name):
    theirs, ours, _ = references
    scheduler_class, config = SCHEDULERS[name]
    scheduler = scheduler_class.from_config({**SD15_SCHEDULER, **config})
    theirs = StableDiffusionControlNetPipeline(**{**theirs.components, "scheduler": scheduler})
    theirs.set_progress_bar_config(disable=True)
    mine = StableDiffusionControlNet(**{**ours.components, "scheduler": pretrained.scheduler_from_diffusers(scheduler)})
    return theirs, mine


def both(theirs, mine, prompt, seed=0, **options):
    a = theirs(prompt, generator=torch.Generator().manual_seed(seed), **options).images
    b = mine(prompt, generator=torch.Generator().manual_seed(seed), progress=False, **options).images
    return a, b


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0], ids=["guided", "unguided"])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_pipeline_matches_diffusers(references, name, guidance_scale):
    theirs, mine = pair(references, name)
    a, b = both(theirs, mine, PROMPTS, image=control_images(), controlnet_conditioning_scale=0.8,
                num_inference_steps=4, guidance_scale=guidance_scale, output_type="np")
    assert b.shape == a.shape == (2, HEIGHT, WIDTH, 3) and np.abs(a - b).max() < TOLERANCE
    assert b.std() > 0.01 and np.abs(b[0] - b[1]).max() > 0.01


def test_one_control_image_for_several_images_and_guidance_windows(references):
    theirs, mine = pair(references, "DDIM")
    options = dict(image=control_images(1), num_inference_steps=5, guidance_scale=5.0, output_type="np",
                   num_images_per_prompt=2, control_guidance_start=0.2, control_guidance_end=0.8)
    a, b = both(theirs, mine, PROMPTS, **options)
    assert b.shape == (4, HEIGHT, WIDTH, 3) and np.abs(a - b).max() < TOLERANCE


def test_the_control_changes_the_image_and_scale_zero_is_text_to_image(references):
    _, mine = pair(references, "DDIM")
    options = dict(num_inference_steps=3, guidance_scale=7.5, output_type="np", height=HEIGHT, width=WIDTH)
    plain = StableDiffusion(**{k: v for k, v in mine.components.items() if k != "controlnet"})
    text_only = plain("x", generator=torch.Generator().manual_seed(0), progress=False, **options).images
    off = mine("x", image=control_images(1), controlnet_conditioning_scale=0.0,
               generator=torch.Generator().manual_seed(0), progress=False, **options).images
    on = mine("x", image=control_images(1), generator=torch.Generator().manual_seed(0), progress=False,
              **options).images
    assert np.abs(off - text_only).max() < 1e-5
    assert np.abs(on - text_only).max() > 0.01


def test_load_controlnet_and_the_pipeline_folder(references):
    theirs, ours, folder = references
    assert type(ours) is StableDiffusionControlNet and set(ours.components) == {
        "unet", "vae", "text_encoder", "tokenizer", "scheduler", "controlnet"}
    loaded = pretrained.load_controlnet(folder / "controlnet")  # a ControlNet folder of its own, as on the hub
    assert torch.equal(loaded.controlnet_mid_block.weight, theirs.controlnet.controlnet_mid_block.weight)
    assert torch.equal(pretrained.load_controlnet(folder, "controlnet").conv_in.weight, loaded.conv_in.weight)


# --- bad input ------------------------------------------------------------------------------

BAD_CALLS = {
    "size not a multiple of 8": (dict(image=control_images(1, 60, 40)), ValueError,
                                 r"control image is 60x40 .*height=60 is not a positive multiple of 8"),
    "size asked for differs": (dict(image=control_images(1), height=32), ValueError,
                               r"height=32 was asked for, but the control image is 64x40"),
    "three control images": (dict(image=control_images(3)), ValueError,
                             "3 control images were passed for 1 prompts"),
    "guess mode": (dict(image=control_images(1), guess_mode=True), ValueError, "guess_mode=True .* not implemented"),
    "window": (dict(image=control_images(1), control_guidance_start=0.8, control_guidance_end=0.2), ValueError,
               r"control_guidance_start=0.8 and control_guidance_end=0.2 must satisfy 0 <= start < end <= 1"),
    "scale": (dict(image=control_images(1), controlnet_conditioning_scale="1"), TypeError,
              "controlnet_conditioning_scale='1' is a string"),
    "8-bit control image": (dict(image=control_images(1) * 255), ValueError, r"outside \[0, 1\]"),
}


@pytest.mark.parametrize("label", BAD_CALLS)
def test_bad_input_is_refused_before_any_work(references, label):
    options, error, message = BAD_CALLS[label]
    _, mine = pair(references, "DDIM")
    calls = []
    hook = mine.unet.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(error, match=message):
            mine("x", **{**dict(num_inference_steps=2, progress=False), **options})
    finally:
        hook.remove()
    assert calls == []


def test_a_controlnet_of_other_widths_is_refused(references):
    _, ours, _ = references
    other = ControlNet(ControlNetConfig(**{**CONFIGS["three levels"], "cross_attention_dim": 32}))
    with pytest.raises(ValueError, match=r"does not fit this U-Net \(block_out_channels: ControlNet \(16, 32, 32\) "
                                         r"vs U-Net \(32, 64\); layers_per_block: ControlNet 1 vs U-Net 2"):
        StableDiffusionControlNet(**{**ours.components, "controlnet": other})
    with pytest.raises(ValueError, match=r"control_image has shape \(1, 3, 32, 24\).*takes \(1, 3, 64, 48\)"):
        ours.controlnet(torch.randn(1, 4, 8, 6), 10, torch.randn(1, 77, 32), torch.rand(1, 3, 32, 24))


def test_unsupported_diffusers_options_are_refused():
    config = dict(ControlNetModel(**{**CONFIGS["two levels"], "global_pool_conditions": True}).config)
    with pytest.raises(ValueError, match=r"global_pool_conditions=True \(only False is supported\)"):
        ControlNetConfig.from_diffusers_config(config)
    with pytest.raises(ValueError, match="controlnet_conditioning_channel_order='rbg' must be 'rgb' or 'bgr'"):
        ControlNetConfig(controlnet_conditioning_channel_order="rbg")


def test_the_contract_names():
    from ldm_teach import pipeline, pretrained_editing

    assert pipeline.StableDiffusionControlNet is StableDiffusionControlNet
    assert pretrained.load_controlnet is pretrained_editing.load_controlnet
    assert pretrained.controlnet_from_diffusers is pretrained_editing.controlnet_from_diffusers
