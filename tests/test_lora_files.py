"""Shared LoRA and textual-inversion files (ldm_teach/lora_files.py) against diffusers' loaders on the tiny pipeline.

The LoRA file is made by PEFT and saved by diffusers' ``save_lora_weights``; the kohya file holds the
same tensors under kohya's names. diffusers' ``load_lora_weights`` loads the text encoder's part through
transformers' PEFT integration, which asks for a newer peft than the registry serves, so the reference
text encoder gets the same PEFT layers from peft itself (``inject_adapter_in_model``), the call that
integration wraps; everything else (key conversion, alphas, scales) is diffusers' own.
"""
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import CLIPTextModel

from ldm_teach import lora, pretrained
from ldm_teach.lora_files import split_key

TOLERANCE = 3e-3  # DESIGN.md's bar for seeded images
PROMPT = "a red circle at the top left"
UNET_LORA = dict(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
TEXT_LORA = dict(r=2, lora_alpha=3, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])


def peft_direct_load_adapter(text_encoder):
    """transformers' ``load_adapter`` done by peft itself: inject the layers, then load their weights."""
    def load_adapter(adapter_name, adapter_state_dict, peft_config, **_):
        inject_adapter_in_model(peft_config, text_encoder, adapter_name)
        set_peft_model_state_dict(text_encoder, adapter_state_dict, adapter_name)
    return load_adapter


def reference_pipeline(folder):
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.text_encoder.load_adapter = peft_direct_load_adapter(pipe.text_encoder)
    return pipe


def metadata(config):
    """An adapter's config as diffusers stores it; diffusers 0.39 reads rank_pattern and alpha_pattern from it."""
    return {**config, "rank_pattern": {}, "alpha_pattern": {}}


def folder_and_name(path):
    """diffusers' (folder, weight_name=...) for a LoRA folder or file: offline, diffusers 0.39 needs the name."""
    if path.is_dir():
        return path, {"weight_name": "pytorch_lora_weights.safetensors"}
    return path.parent, {"weight_name": path.name}


def kohya_name(component: str, key: str) -> str:
    """A diffusers/PEFT key in kohya's naming: the module path with underscores, lora_down/lora_up."""
    module, _, part = key.rpartition(".lora_")
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[component]
    return prefix + module.replace(".", "_") + {"A.weight": ".lora_down.weight", "B.weight": ".lora_up.weight"}[part]


@pytest.fixture(scope="module")
def lora_files(tiny_diffusers_pipeline, tmp_path_factory):
    """{"diffusers": folder with pytorch_lora_weights.safetensors, "kohya": a .safetensors file}: the same weights."""
    _, folder = tiny_diffusers_pipeline
    out = tmp_path_factory.mktemp("lora")
    torch.manual_seed(3)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    unet.add_adapter(LoraConfig(init_lora_weights=False, **UNET_LORA))
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    inject_adapter_in_model(LoraConfig(init_lora_weights=False, **TEXT_LORA), text_encoder)
    layers = {"unet": get_peft_model_state_dict(unet), "text_encoder": get_peft_model_state_dict(text_encoder)}
    layers = {c: {k: v * 4 for k, v in sd.items()} for c, sd in layers.items()}  # a change big enough to see
    StableDiffusionPipeline.save_lora_weights(
        out / "diffusers", unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        unet_lora_adapter_metadata=metadata(UNET_LORA), text_encoder_lora_adapter_metadata=metadata(TEXT_LORA))
    kohya = {}
    for component, state_dict in layers.items():
        config = UNET_LORA if component == "unet" else TEXT_LORA
        for key, value in state_dict.items():
            kohya[kohya_name(component, key)] = value.contiguous()
            kohya[kohya_name(component, key).split(".")[0] + ".alpha"] = torch.tensor(float(config["lora_alpha"]))
    save_file(kohya, out / "kohya.safetensors")
    return {"diffusers": out / "diffusers", "kohya": out / "kohya.safetensors"}


def images(pipe, ours: bool, scale: float, prompt: str = PROMPT):
    options = dict(num_inference_steps=3, guidance_scale=7.5, output_type="np",
                   generator=torch.Generator().manual_seed(0))
    if ours:
        return pipe(prompt, progress=False, **options).images
    return pipe(prompt, cross_attention_kwargs={"scale": scale}, **options).images


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("naming", ["diffusers", "kohya"])
def test_lora_images_match_diffusers(tiny_diffusers_pipeline, lora_files, naming, scale):
    _, folder = tiny_diffusers_pipeline
    reference = reference_pipeline(folder)
    lora_folder, name = folder_and_name(lora_files[naming])
    reference.load_lora_weights(lora_folder, **name)
    ours = pretrained.load_pipeline(folder)
    plain = images(ours, True, scale)
    assert ours.load_lora_weights(lora_files[naming], scale=scale) == 6 * 2 * 4 + 2 * 4  # 6 transformer blocks x 2 attentions, 2 text layers; 4 projections each
    assert sum(isinstance(m, lora.LoRALinear) for m in ours.text_encoder.modules()) == 8
    mine, theirs = images(ours, True, scale), images(reference, False, scale)
    difference = np.abs(mine - theirs).max()
    print(f"{naming} LoRA at scale {scale}: max |ours - diffusers| = {difference:.2e}")
    assert difference < TOLERANCE
    assert np.abs(mine - plain).max() > 10 * TOLERANCE  # the LoRA did change the image


def test_merged_lora_gives_the_same_models(tiny_diffusers_pipeline, lora_files):
    """In float64: this strong random LoRA amplifies float32 rounding (about 5e-3 on the U-Net's output)."""
    ours = pretrained.load_pipeline(tiny_diffusers_pipeline[1], dtype=torch.float64)
    ours.load_lora_weights(lora_files["kohya"], scale=0.5)
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(1, 77, 32, generator=g, dtype=torch.float64)
    ids = ours.tokenizer([PROMPT])
    with torch.no_grad():
        adapted = ours.unet(x, 10, context), ours.text_encoder(ids)
        assert lora.merge_lora(ours.unet) == 48 and lora.merge_lora(ours.text_encoder) == 8
        merged = ours.unet(x, 10, context), ours.text_encoder(ids)
    assert all((a - m).abs().max() < 1e-9 for a, m in zip(adapted, merged))
    assert (adapted[0] - pretrained.load_pipeline(tiny_diffusers_pipeline[1], dtype=torch.float64).unet(
        x, 10, context)).abs().max() > 1e-2  # the LoRA does change the U-Net


def test_key_names():
    assert split_key("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight") == (
        "unet", "up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0", "B")
    assert split_key("lora_te2_text_model_encoder_layers_3_mlp_fc1.alpha") == (
        "text_encoder_2", "text_model_encoder_layers_3_mlp_fc1", "alpha")
    old = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight"
    assert split_key(old) == ("unet", "mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0", "A")


def edited_kohya_file(lora_files, tmp_path, edit):
    from safetensors.torch import load_file

    state_dict = load_file(lora_files["kohya"])  # the edits below must not share memory: safetensors refuses that
    edit(state_dict)
    save_file(state_dict, tmp_path / "edited.safetensors")
    return tmp_path / "edited.safetensors"


FIRST = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.update({"lora_unet_nowhere_to_q.lora_down.weight": sd[f"{FIRST}.lora_down.weight"].clone(),
                           "lora_unet_nowhere_to_q.lora_up.weight": sd[f"{FIRST}.lora_up.weight"].clone()}),
     "match no layer of this pipeline: unet: nowhere_to_q"),
    (lambda sd: sd.update({f"{FIRST}.lora_down.weight": torch.zeros(4, 48)}), "made for another model"),
    (lambda sd: sd.update({f"{FIRST}.lora_down.weight": torch.zeros(0, 32),
                           f"{FIRST}.lora_up.weight": torch.zeros(32, 0)}), "r >= 1"),
    (lambda sd: sd[f"{FIRST}.lora_up.weight"].__setitem__((0, 0), float("nan")), "NaN or inf"),
    (lambda sd: sd.pop(f"{FIRST}.lora_up.weight"), "needs both its down"),
    (lambda sd: sd.update({"model.diffusion_model.out.0.weight": torch.zeros(4)}), "no LoRA weight"),
], ids=["unknown-layer", "other-width", "rank-0", "nan", "missing-up", "not-lora"])
def test_bad_lora_files_are_refused_and_change_nothing(tiny_diffusers_pipeline, lora_files, tmp_path, edit, message):
    _, folder = tiny_diffusers_pipeline
    ours = pretrained.load_pipeline(folder)
    with pytest.raises(ValueError, match=message):
        ours.load_lora_weights(edited_kohya_file(lora_files, tmp_path, edit))
    assert not any(isinstance(m, lora.LoRALinear) for m in ours.unet.modules())


def test_a_second_lora_on_the_same_layers_is_refused(tiny_diffusers_pipeline, lora_files):
    ours = pretrained.load_pipeline(tiny_diffusers_pipeline[1])
    ours.load_lora_weights(lora_files["diffusers"])
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        ours.load_lora_weights(lora_files["kohya"])


# --- textual inversion ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedding_files(tmp_path_factory):
    """A 3-vector diffusers embedding (a folder with learned_embeds.safetensors) and a 2-vector A1111 .pt."""
    out = tmp_path_factory.mktemp("embeddings")
    g = torch.Generator().manual_seed(5)
    (out / "diffusers").mkdir()
    save_file({"<cat-toy>": torch.randn(3, 32, generator=g)}, out / "diffusers" / "learned_embeds.safetensors")
    a1111 = {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(torch.randn(2, 32, generator=g))},
             "name": "shapey", "step": 500, "sd_checkpoint": None, "sd_checkpoint_name": None}
    torch.save(a1111, out / "shapey.pt")
    save_file({"<one>": torch.randn(32, generator=g)}, out / "one.safetensors")
    save_file({"emb_params": torch.randn(2, 32, generator=g)}, out / "a1111.safetensors")
    return {"diffusers": out / "diffusers", "a1111": out / "shapey.pt", "single": out / "one.safetensors",
            "a1111-safetensors": out / "a1111.safetensors"}


@pytest.mark.parametrize("kind, token, prompt", [("diffusers", None, "a photo of <cat-toy> on a <cat-toy>"),
                                                 ("a1111", None, "a shapey circle"),
                                                 ("single", "<one>", "<one> at the top"),
                                                 ("a1111-safetensors", "<emb>", "a <emb> square")])
def test_textual_inversion_matches_diffusers(tiny_diffusers_pipeline, embedding_files, kind, token, prompt):
    _, folder = tiny_diffusers_pipeline
    reference = reference_pipeline(folder)
    reference.load_textual_inversion(str(embedding_files[kind]), token=token)
    ours = pretrained.load_pipeline(folder)
    added = ours.load_textual_inversion(embedding_files[kind], token=token)
    assert added[0] == {"diffusers": "<cat-toy>", "a1111": "shapey", "single": "<one>",
                        "a1111-safetensors": "<emb>"}[kind]
    theirs_ids = reference.tokenizer(reference.maybe_convert_prompt(prompt, reference.tokenizer), padding="max_length",
                                     max_length=77, return_tensors="pt").input_ids
    mine_ids = ours.tokenizer(ours.expand_prompts([prompt], ours.tokenizer))
    assert torch.equal(mine_ids, theirs_ids)
    assert (mine_ids >= 49408).sum() == {"diffusers": 6, "a1111": 2, "single": 1, "a1111-safetensors": 2}[kind]
    options = dict(num_inference_steps=3, guidance_scale=7.5, output_type="np")
    theirs = reference(prompt, generator=torch.Generator().manual_seed(0), **options).images
    mine = ours(prompt, generator=torch.Generator().manual_seed(0), progress=False, **options).images
    difference = np.abs(mine - theirs).max()
    print(f"{kind} textual inversion: max |ours - diffusers| = {difference:.2e}")
    assert difference < TOLERANCE


def test_bad_embeddings_are_refused(tiny_diffusers_pipeline, embedding_files, tmp_path):
    ours = pretrained.load_pipeline(tiny_diffusers_pipeline[1])
    ours.load_textual_inversion(embedding_files["diffusers"])
    with pytest.raises(ValueError, match="'<cat-toy>' is already in the vocabulary"):
        ours.load_textual_inversion(embedding_files["diffusers"])
    with pytest.raises(ValueError, match="does not name its token"):
        ours.load_textual_inversion(embedding_files["a1111-safetensors"])
    save_file({"<wide>": torch.zeros(2, 768)}, tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match="768 wide, but this text encoder's tokens are 32 wide"):
        ours.load_textual_inversion(tmp_path / "wide.safetensors")
    save_file({"<bad>": torch.full((32,), float("inf"))}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="NaN or inf"):
        ours.load_textual_inversion(tmp_path / "bad.safetensors")
    save_file({"a": torch.zeros(32), "b": torch.zeros(32)}, tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match="no textual-inversion file"):
        ours.load_textual_inversion(tmp_path / "two.safetensors")
