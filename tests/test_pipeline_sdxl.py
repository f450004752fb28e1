"""ldm_teach.pipeline_sdxl against diffusers' StableDiffusionXLPipeline on the same tiny random weights."""
import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ldm_teach import pipeline, pretrained
from ldm_teach.clip import BUNDLED_VOCABULARY, Tokenizer, clip_vocabulary, read_bpe_merges
from ldm_teach.pipeline_sdxl import StableDiffusionXL

TOLERANCE = 3e-3  # DESIGN.md's bar for seeded images
PROMPTS = ["a red circle at the top left", "a small blue square"]


def write_vocabulary(folder):
    merges = read_bpe_merges(BUNDLED_VOCABULARY)
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(clip_vocabulary(merges)), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    return str(folder / "vocab.json"), str(folder / "merges.txt")


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory):
    """A tiny random SDXL pipeline, as diffusers' own tests build it (two CLIP encoders, the second with its
    projection and eos_token_id 2; a U-Net with a level without attention and the added embedding), saved."""
    root = tmp_path_factory.mktemp("tiny_sdxl")
    vocabulary = write_vocabulary(root / "vocabulary")
    tokenizer = CLIPTokenizer(*vocabulary, model_max_length=77)
    tokenizer_2 = CLIPTokenizer(*vocabulary, model_max_length=77, pad_token="!")  # OpenCLIP pads with "!"
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8)
    vae = AutoencoderKL(block_out_channels=(16, 16, 32, 32), down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, norm_num_groups=8, sample_size=64,
                        scaling_factor=0.13025)
    text_config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                       vocab_size=49408, bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_act="gelu")
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config, projection_dim=32))
    with torch.no_grad():  # perturb the norms' 1s and 0s (and the zero biases) so a skipped one shows
        for model in (unet, vae, text_encoder, text_encoder_2):
            for name, parameter in model.named_parameters():
                if "norm" in name or (parameter == 0).all():
                    parameter.add_(0.1 * torch.randn_like(parameter))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")  # SDXL base's
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)
    pipe.save_pretrained(root / "pipeline")
    return root / "pipeline"


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
