"""LoRA and textual-inversion files on SDXL's pipeline (two text encoders) against diffusers' loaders, tiny random weights."""
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from tiny_sdxl import saved_sdxl_pipeline, sdxl_unet

from ldm_teach import lora, pretrained

TOLERANCE = 3e-3  # DESIGN.md's bar for seeded images
# alpha = r: no metadata needed (diffusers 0.39 reads SDXL's metadata only with every LoraConfig field; the SD
# tests, tests/test_lora_files.py, cover an alpha other than r)
UNET_LORA = dict(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(diffusers' pipeline, its folder, a folder with a U-Net LoRA saved by diffusers, the same LoRA in kohya's names)."""
    root = tmp_path_factory.mktemp("tiny_sdxl_lora")
    pipe, folder = saved_sdxl_pipeline(root)
    adapted = sdxl_unet()
    adapted.load_state_dict(pipe.unet.state_dict())
    torch.manual_seed(1)
    adapted.add_adapter(LoraConfig(init_lora_weights=False, **UNET_LORA))
    layers = {key: value * 3 for key, value in get_peft_model_state_dict(adapted).items()}  # a change big enough to see
    StableDiffusionXLPipeline.save_lora_weights(root / "lora", unet_lora_layers=layers)
    kohya = {}
    for key, value in layers.items():
        module, _, part = key.rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[name + {"A.weight": ".lora_down.weight", "B.weight": ".lora_up.weight"}[part]] = value.contiguous()
        kohya[name + ".alpha"] = torch.tensor(float(UNET_LORA["lora_alpha"]))
    save_file(kohya, root / "kohya.safetensors")
    return pipe, folder, root / "lora", root / "kohya.safetensors"


def images(pipe, prompt, ours, **options):
    generator = torch.Generator().manual_seed(0)
    extra = {"progress": False} if ours else {}
    return pipe(prompt, num_inference_steps=3, guidance_scale=5.0, generator=generator, output_type="pt",
                **extra, **options).images


@pytest.mark.parametrize("naming", ["diffusers", "kohya"])
@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_sdxl_unet_lora_matches_diffusers(sdxl, naming, scale):
    reference, folder, diffusers_file, kohya_file = sdxl
    path = diffusers_file if naming == "diffusers" else kohya_file
    folder_or_file = (path, "pytorch_lora_weights.safetensors") if path.is_dir() else (path.parent, path.name)
    # offline, diffusers 0.39 needs the file's name
    reference.load_lora_weights(folder_or_file[0], weight_name=folder_or_file[1], adapter_name="tested")
    try:
        theirs = images(reference, "a red circle", False, cross_attention_kwargs={"scale": scale})
    finally:
        reference.delete_adapters("tested")
    ours = pretrained.load_pipeline(folder)
    plain = images(ours, "a red circle", True)
    adapted = ours.load_lora_weights(diffusers_file if naming == "diffusers" else kohya_file, scale=scale)
    assert adapted == sum(isinstance(m, lora.LoRALinear) for m in ours.unet.modules()) > 0
    mine = images(ours, "a red circle", True)
    assert (mine - theirs).abs().max() < TOLERANCE
    assert (mine - plain).abs().max() > 10 * TOLERANCE  # the adapter did change the images


def test_sdxl_embedding_for_both_encoders_matches_diffusers(sdxl, tmp_path):
    reference, folder, _, _ = sdxl
    generator = torch.Generator().manual_seed(4)
    embedding = {"clip_l": torch.randn(1, 32, generator=generator), "clip_g": torch.randn(1, 32, generator=generator)}
    save_file(embedding, tmp_path / "concept.safetensors")
    ours = pretrained.load_pipeline(folder)
    assert ours.load_textual_inversion(tmp_path / "concept.safetensors", token="<concept>") == ["<concept>"]
    reference = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    reference.set_progress_bar_config(disable=True)
    reference.load_textual_inversion(embedding["clip_l"], token="<concept>", text_encoder=reference.text_encoder,
                                     tokenizer=reference.tokenizer)
    reference.load_textual_inversion(embedding["clip_g"], token="<concept>", text_encoder=reference.text_encoder_2,
                                     tokenizer=reference.tokenizer_2)
    prompt = "a <concept> circle at the top"
    for tokenizer, theirs_tokenizer in ((ours.tokenizer, reference.tokenizer), (ours.tokenizer_2, reference.tokenizer_2)):
        assert tokenizer.encode(prompt) == theirs_tokenizer(prompt)["input_ids"]
    assert (images(ours, prompt, True) - images(reference, prompt, False)).abs().max() < TOLERANCE
    with pytest.raises(ValueError, match="does not name its token"):
        pretrained.load_pipeline(folder).load_textual_inversion(tmp_path / "concept.safetensors")
