"""ldm_teach.pipeline_sdxl against diffusers' StableDiffusionXLPipeline on the same tiny random weights."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from tiny_sdxl import saved_sdxl_pipeline

from ldm_teach import pipeline, pretrained
from ldm_teach.clip import Tokenizer
from ldm_teach.pipeline_sdxl import StableDiffusionXL

TOLERANCE = 3e-3  # DESIGN.md's bar for seeded images
PROMPTS = ["a red circle at the top left", "a small blue square"]


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory):
    """A tiny random SDXL pipeline (tests/tiny_sdxl.py), saved by diffusers."""
    return saved_sdxl_pipeline(tmp_path_factory.mktemp("tiny_sdxl"))[1]


@pytest.fixture(scope="module")
def pipelines(reference_folder):
    """diffusers' pipeline read back from its folder, and ours built from the same folder's parts."""
    reference = StableDiffusionXLPipeline.from_pretrained(reference_folder, add_watermarker=False)
    reference.set_progress_bar_config(disable=True)
    ours = StableDiffusionXL(
        unet=pretrained.load_unet(reference_folder), vae=pretrained.load_vae(reference_folder),
        text_encoder=pretrained.load_text_encoder(reference_folder),
        text_encoder_2=pretrained.load_text_encoder(reference_folder, "text_encoder_2"),
        tokenizer=Tokenizer.from_folder(reference_folder / "tokenizer"),
        tokenizer_2=Tokenizer.from_folder(reference_folder / "tokenizer_2"),
        scheduler=pretrained.scheduler_from_diffusers(reference.scheduler))
    return reference, ours


def both(pipelines, prompt, seed=0, **options):
    reference, ours = pipelines
    theirs = reference(prompt, generator=torch.Generator().manual_seed(seed), **options).images
    mine = ours(prompt, generator=torch.Generator().manual_seed(seed), progress=False, **options).images
    return theirs, mine


def test_the_parts_load_as_sdxl_parts(pipelines):
    _, ours = pipelines
    assert ours.unet.config.addition_embed_type == "text_time" and ours.vae.config.force_upcast
    assert ours.text_encoder.text_projection is None and ours.text_encoder_2.config.projection_dim == 32
    assert ours.tokenizer.pad_token == "<|endoftext|>" and ours.tokenizer_2.pad_token == "!"


@pytest.mark.parametrize("options", [
    dict(negative_prompt=["blurry", "a green triangle"], prompt_2=["a circle", "a square"],
         negative_prompt_2="dark"),
    dict(),  # no negative prompt: force_zeros_for_empty_prompt gives zeros for the unconditional rows
    dict(guidance_scale=1.0),
    dict(original_size=(32, 96), crops_coords_top_left=(8, 16), target_size=(128, 128)),
], ids=["negatives-and-second-prompts", "zeroed-negatives", "unguided", "micro-conditioning"])
def test_images_match_diffusers(pipelines, options):
    options = {"guidance_scale": 5.0, **options}
    theirs, mine = both(pipelines, PROMPTS, num_inference_steps=4, height=64, width=48, output_type="np", **options)
    assert mine.shape == theirs.shape == (2, 64, 48, 3)
    assert np.abs(mine - theirs).max() < TOLERANCE
    assert mine.std() > 0.01 and np.abs(mine[0] - mine[1]).max() > 0.01


def test_micro_conditioning_changes_the_image(pipelines):
    _, ours = pipelines
    run = lambda **sizes: ours(PROMPTS[0], num_inference_steps=3, height=64, width=64, output_type="np",  # noqa: E731
                               generator=torch.Generator().manual_seed(0), progress=False, **sizes).images
    assert np.abs(run() - run(crops_coords_top_left=(32, 0))).max() > 1e-3


def test_prompt_embeddings_match_diffusers(pipelines):
    reference, ours = pipelines
    for options in (dict(negative_prompt="blurry"), dict()):
        theirs = reference.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=2, **options)
        mine = ours.encode_prompt(PROMPTS, num_images_per_prompt=2, **options)
        for name, a, b in zip(("context", "negative context", "pooled", "negative pooled"), theirs, mine):
            assert a.shape == b.shape and (a - b).abs().max() < 1e-4, name
    assert mine[1].abs().max() == 0  # the zeroed negatives
    ours.force_zeros_for_empty_prompt = False
    try:
        reference.register_to_config(force_zeros_for_empty_prompt=False)
        theirs = reference.encode_prompt(PROMPTS, device="cpu")
        mine = ours.encode_prompt(PROMPTS)
        assert mine[1].abs().max() > 0.1 and (theirs[1] - mine[1]).abs().max() < 1e-4  # the encoded ""
    finally:
        ours.force_zeros_for_empty_prompt = True
        reference.register_to_config(force_zeros_for_empty_prompt=True)


def test_denoising_end_stops_early_as_diffusers_does(pipelines):
    theirs, mine = both(pipelines, PROMPTS[1], num_inference_steps=10, denoising_end=0.6, height=48, width=48,
                        output_type="latent")
    assert mine.shape == (1, 4, 6, 6) and (mine - theirs).abs().max() < 1e-4
    steps = []
    pipelines[1](PROMPTS[1], num_inference_steps=10, denoising_end=0.6, height=48, width=48, output_type="latent",
                 callback=lambda step, t, latents: steps.append(int(t)), progress=False)
    assert len(steps) == 6 and min(steps) >= 400


def test_float16_decode_is_upcast_when_the_vae_asks(pipelines):
    _, ours = pipelines
    latents = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    reference = ours.decode_latents(latents)
    ours.vae.half()
    try:
        upcast = ours.decode_latents(latents.half())
        assert upcast.dtype == torch.float32 and ours.vae.post_quant_conv.weight.dtype == torch.float16
        assert (upcast - reference).abs().max() < 5e-3  # float16 weights, float32 arithmetic
        ours.vae.config.force_upcast = False
        assert ours.decode_latents(latents.half()).dtype == torch.float16
    finally:
        ours.vae.config.force_upcast = True
        ours.vae.float()


def test_components_make_a_new_pipeline_and_the_class_is_in_pipeline(pipelines):
    _, ours = pipelines
    assert pipeline.StableDiffusionXL is StableDiffusionXL
    again = StableDiffusionXL(**ours.components)
    assert set(ours.components) == {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                    "scheduler"}
    assert again.unet is ours.unet and again.text_encoder_2 is ours.text_encoder_2


def test_bad_inputs_raise_clear_errors(pipelines, tiny_diffusers_pipeline):
    _, ours = pipelines
    with pytest.raises(ValueError, match=r"2 prompt_2s were given for 1 prompts"):
        ours("a", prompt_2=["b", "c"], num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match=r"denoising_end=1.5 must lie strictly between 0 and 1"):
        ours("a", denoising_end=1.5, num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match=r"crops_coords_top_left=\(0,\).*two numbers each"):
        ours("a", crops_coords_top_left=(0,), num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match=r"height=60 is not a positive multiple of 8"):
        ours("a", height=60, num_inference_steps=1, progress=False)
    sd15 = pretrained.load_pipeline(tiny_diffusers_pipeline[1])
    with pytest.raises(ValueError, match=r"addition_embed_type=None, not SDXL's 'text_time'"):
        StableDiffusionXL(**{**ours.components, "unet": sd15.unet})
    with pytest.raises(ValueError, match=r"projection_dim=None"):
        StableDiffusionXL(**{**ours.components, "text_encoder_2": ours.text_encoder})
