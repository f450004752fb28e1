"""ldm_teach.pipeline_sdxl_refiner (and pretrained_sdxl) against diffusers' SDXL pipelines on tiny random folders."""
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from PIL import Image
from tiny_sdxl import perturbed, sdxl_parts, sdxl_unet

from ldm_teach import pipeline, pretrained
from ldm_teach.pipeline_sdxl import StableDiffusionXL
from ldm_teach.pipeline_sdxl_refiner import StableDiffusionXLImg2Img, aesthetic_conditioning

TOLERANCE = 3e-3  # DESIGN.md's bar for seeded images
PROMPTS = ["a red circle at the top left", "a small blue square"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny random SDXL base and refiner (tests/tiny_sdxl.py) sharing their VAE and second text encoder, as
    the real pair does; the refiner has no first encoder (context 32 wide), 5 time_ids and
    force_zeros_for_empty_prompt=False, as stabilityai's refiner folder says. Both saved by diffusers."""
    root = tmp_path_factory.mktemp("tiny_sdxl_pair")
    torch.manual_seed(0)
    base_unet, refiner_unet = perturbed(sdxl_unet(64, time_ids=6), sdxl_unet(32, time_ids=5))
    parts = sdxl_parts(root / "vocabulary")
    StableDiffusionXLPipeline(unet=base_unet, **parts, add_watermarker=False).save_pretrained(root / "base")
    refiner_parts = {**parts, "text_encoder": None, "tokenizer": None}
    StableDiffusionXLImg2ImgPipeline(unet=refiner_unet, **refiner_parts, requires_aesthetics_score=True,
                                     force_zeros_for_empty_prompt=False,
                                     add_watermarker=False).save_pretrained(root / "refiner")
    return root / "base", root / "refiner"


@pytest.fixture(scope="module")
def pipelines(folders):
    """{"base": (diffusers', ours), "refiner": (diffusers', ours)}: each read back from its folder, ours by
    pretrained.load_pipeline."""
    pairs = {}
    for name, folder, reference_class in zip(("base", "refiner"), folders,
                                             (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline)):
        reference = reference_class.from_pretrained(folder, add_watermarker=False)
        reference.set_progress_bar_config(disable=True)
        pairs[name] = (reference, pretrained.load_pipeline(folder))
    return pairs


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def picture(height=64, width=48):
    """A smooth seeded RGB picture (PIL), the same for both pipelines."""
    low = torch.rand(1, 3, height // 8, width // 8, generator=seeded(7))
    pixels = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear")[0]  # (3, H, W) in [0, 1]
    return Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def test_load_pipeline_returns_the_class_the_folder_names(pipelines):
    base, refiner = pipelines["base"][1], pipelines["refiner"][1]
    assert type(base) is StableDiffusionXL and base.force_zeros_for_empty_prompt
    assert type(refiner) is StableDiffusionXLImg2Img and pipeline.StableDiffusionXLImg2Img is StableDiffusionXLImg2Img
    assert refiner.text_encoder is None and refiner.tokenizer is None and refiner.requires_aesthetics_score
    assert not refiner.force_zeros_for_empty_prompt and refiner.unet.config.cross_attention_dim == 32
    assert set(refiner.models()) == {"unet", "vae", "text_encoder_2"} and refiner.tokenizer_2.pad_token == "!"


@pytest.mark.parametrize("options", [
    dict(),  # no negative prompt: the refiner's folder says encode "" (force_zeros_for_empty_prompt=False)
    dict(negative_prompt=["blurry", "dark"], aesthetic_score=8.0, negative_aesthetic_score=1.0,
         original_size=(32, 96), crops_coords_top_left=(8, 16), negative_crops_coords_top_left=(4, 0)),
    dict(guidance_scale=1.0),
], ids=["encoded-empty-negatives", "negatives-scores-and-sizes", "unguided"])
def test_refiner_alone_matches_diffusers(pipelines, options):
    reference, ours = pipelines["refiner"]
    options = {"guidance_scale": 5.0, "strength": 0.6, "num_inference_steps": 5, "output_type": "np", **options}
    theirs = reference(PROMPTS, image=picture(), generator=seeded(), **options).images
    mine = ours(PROMPTS, image=picture(), generator=seeded(), progress=False, **options).images
    assert mine.shape == theirs.shape == (2, 64, 48, 3)
    difference = np.abs(mine - theirs).max()
    print(f"refiner alone {options}: max |ours - diffusers| = {difference:.2e}")
    assert difference < TOLERANCE
    assert mine.std() > 0.01 and np.abs(mine[0] - mine[1]).max() > 0.01


def test_base_then_refiner_matches_diffusers(pipelines):
    """The ensemble of experts: base for the timesteps >= the cutoff at 0.7, the refiner below it."""
    runs = {}
    for who, index in (("diffusers", 0), ("ours", 1)):
        base, refiner = pipelines["base"][index], pipelines["refiner"][index]
        quiet = {} if who == "diffusers" else {"progress": False}
        latents = base(PROMPTS[1], num_inference_steps=10, denoising_end=0.7, height=48, width=48,
                       output_type="latent", generator=seeded(1), **quiet).images
        images = refiner(PROMPTS[1], image=latents, num_inference_steps=10, denoising_start=0.7,
                         output_type="np", generator=seeded(2), **quiet).images
        runs[who] = latents, images
    (their_latents, theirs), (my_latents, mine) = runs["diffusers"], runs["ours"]
    assert my_latents.shape == (1, 4, 6, 6) and (my_latents - their_latents).abs().max() < 1e-4
    difference = np.abs(mine - theirs).max()
    print(f"base(denoising_end=0.7) -> refiner(denoising_start=0.7): max |ours - diffusers| = {difference:.2e}")
    assert mine.shape == (1, 48, 48, 3) and difference < TOLERANCE and mine.std() > 0.01

    steps = {"base": [], "refiner": []}
    base, refiner = pipelines["base"][1], pipelines["refiner"][1]
    latents = base(PROMPTS[1], num_inference_steps=10, denoising_end=0.7, height=48, width=48, output_type="latent",
                   callback=lambda step, t, x: steps["base"].append(int(t)), progress=False).images
    refiner(PROMPTS[1], image=latents, num_inference_steps=10, denoising_start=0.7, output_type="latent",
            callback=lambda step, t, x: steps["refiner"].append(int(t)), progress=False)
    assert min(steps["base"]) >= 300 > max(steps["refiner"])  # T - 0.7 T = 300: each expert its own share
    assert len(steps["base"]) + len(steps["refiner"]) == 10 and len(steps["refiner"]) == 3


def test_base_unet_image_to_image_matches_diffusers(pipelines):
    """Base's parts as image to image: both encoders, 6 time_ids (requires_aesthetics_score=False), a tensor image."""
    reference = StableDiffusionXLImg2ImgPipeline(**pipelines["base"][0].components)
    reference.set_progress_bar_config(disable=True)
    ours = StableDiffusionXLImg2Img(**pipelines["base"][1].components)
    image = torch.from_numpy(np.asarray(picture(48, 64), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    options = dict(negative_prompt="blurry", prompt_2="a circle", strength=0.8, num_inference_steps=5,
                   output_type="np", crops_coords_top_left=(8, 0), target_size=(96, 128))
    theirs = reference(PROMPTS[0], image=image, generator=seeded(3), **options).images
    mine = ours(PROMPTS[0], image=image, generator=seeded(3), progress=False, **options).images
    difference = np.abs(mine - theirs).max()
    print(f"base U-Net image to image: max |ours - diffusers| = {difference:.2e}")
    assert mine.shape == (1, 48, 64, 3) and difference < TOLERANCE and mine.std() > 0.01


def test_one_encoder_prompt_embeddings_match_diffusers(pipelines):
    reference, ours = pipelines["refiner"]
    theirs = reference.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=2, negative_prompt="blurry")
    mine = ours.encode_prompt(PROMPTS, negative_prompt="blurry", num_images_per_prompt=2)
    for name, a, b in zip(("context", "negative context", "pooled", "negative pooled"), theirs, mine):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-4, name
    assert mine[0].shape == (4, 77, 32)  # text_encoder_2's features alone
    with pytest.warns(UserWarning, match="prompt_2 and negative_prompt_2 are unused"):
        ours.encode_prompt(PROMPTS[0], prompt_2="ignored")


def test_aesthetic_conditioning():
    time_ids = aesthetic_conditioning((1024, 768), (0, 16), 6.0, batch=2)
    assert time_ids.tolist() == [[1024, 768, 0, 16, 6.0]] * 2
    with pytest.raises(ValueError, match=r"crops_coords_top_left=\(0,\) must be two numbers each"):
        aesthetic_conditioning((1024, 1024), (0,), 6.0)


def test_loader_refuses_incomplete_or_unknown_sdxl_folders(folders, tmp_path):
    base, refiner = folders
    broken = shutil.copytree(refiner, tmp_path / "refiner")
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match=r"not a complete StableDiffusionXLImg2ImgPipeline folder: the "
                                                r"text_encoder_2/ folder is missing"):
        pretrained.load_pipeline(broken)
    no_first = shutil.copytree(base, tmp_path / "base")
    index = json.loads((no_first / "model_index.json").read_text())
    (no_first / "model_index.json").write_text(json.dumps({**index, "text_encoder": [None, None]}))
    with pytest.raises(FileNotFoundError, match=r"StableDiffusionXLPipeline folder: model_index.json names no "
                                                r"text_encoder"):
        pretrained.load_pipeline(no_first)
    (no_first / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLInpaintPipeline"}))
    with pytest.raises(ValueError, match=r"names a StableDiffusionXLInpaintPipeline; of the SDXL pipelines"):
        pretrained.load_pipeline(no_first)


def test_bad_inputs_raise_clear_errors(pipelines):
    refiner = pipelines["refiner"][1]
    call = dict(image=picture(), num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match=r"denoising_start=1.2 must lie strictly between 0 and 1"):
        refiner("a", denoising_start=1.2, **call)
    with pytest.raises(ValueError, match=r"denoising_start=0.0 must lie strictly between 0 and 1"):
        refiner("a", denoising_start=0, **call)
    for strength in (0, 1.5):
        with pytest.raises(ValueError, match=rf"strength={float(strength)} must lie in \(0, 1\]"):
            refiner("a", strength=strength, **call)
    with pytest.raises(ValueError, match=r"denoising_start=0.999 with num_inference_steps=2 leaves no timestep"):
        refiner("a", denoising_start=0.999, **call)
    with pytest.raises(ValueError, match=r"image is 60x48 \(height x width\)"):
        refiner("a", image=picture(60, 48), num_inference_steps=2, progress=False)
    base_parts = pipelines["base"][1].components
    with pytest.raises(ValueError, match=r"requires_aesthetics_score=True gives 5 time_ids per image, but the "
                                         r"U-Net's added embedding takes 80 = 32 \(pooled\) \+ 6 x 8.*pass "
                                         r"requires_aesthetics_score=False"):
        StableDiffusionXLImg2Img(**base_parts, requires_aesthetics_score=True)
    with pytest.raises(ValueError, match=r"requires_aesthetics_score=False gives 6 time_ids.*pass "
                                         r"requires_aesthetics_score=True"):
        StableDiffusionXLImg2Img(**refiner.components)
    refiner.requires_aesthetics_score = False  # switched after construction: refused at the call
    try:
        with pytest.raises(ValueError, match=r"requires_aesthetics_score=False gives 6 time_ids"):
            refiner("a", **call)
    finally:
        refiner.requires_aesthetics_score = True
    with pytest.raises(ValueError, match=r"text_encoder and tokenizer go together"):
        StableDiffusionXLImg2Img(**{**base_parts, "tokenizer": None})
    with pytest.raises(ValueError, match=r"cross-attends to 64-wide features, but the text encoders write 32 = 32"):
        StableDiffusionXL(**{**base_parts, "text_encoder": None, "tokenizer": None})


def test_float16_encode_is_upcast_when_the_vae_asks(pipelines):
    refiner = pipelines["refiner"][1]
    images = torch.rand(1, 3, 48, 48, generator=seeded(4)) * 2 - 1
    reference = refiner.encode_images(images, seeded(5))
    seen = []  # the dtype the encoder's first convolution computes in
    hook = refiner.vae.encoder.conv_in.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    refiner.vae.half()
    try:
        upcast = refiner.encode_images(images, seeded(5))
        assert seen == [torch.float32] and refiner.vae.encoder.conv_in.weight.dtype == torch.float16  # half again
        assert upcast.dtype == torch.float32 and (upcast - reference).abs().max() < 5e-3  # float16 weights only
        refiner.vae.config.force_upcast = False
        refiner.encode_images(images, seeded(5))
        assert seen[-1] == torch.float16
    finally:
        hook.remove()
        refiner.vae.config.force_upcast = True
        refiner.vae.float()
