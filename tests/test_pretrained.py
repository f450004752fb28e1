"""Loading whole pipelines (diffusers folders, fp16 variants, the hub offline) and original single-file
checkpoints: round trips, diffusers' own converter, and the errors for bad folders and files."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm_teach import pretrained
from ldm_teach.clip import TextEncoder, TextEncoderConfig
from ldm_teach.unet import UNet, UNetConfig
from ldm_teach.vae import AutoencoderKL, VAEConfig

TOLERANCE = 3e-3
PROMPTS = ["a red circle", "two green squares"]
CALL = dict(negative_prompt=["blurry", ""], num_inference_steps=4, guidance_scale=6.0, height=48, width=32,
            output_type="np")


def images(pipe, seed=0):
    if isinstance(pipe, pretrained.StableDiffusion):
        return pipe(PROMPTS, generator=torch.Generator().manual_seed(seed), progress=False, **CALL).images
    return pipe(PROMPTS, generator=torch.Generator().manual_seed(seed), **CALL).images


def tiny_configs(reference):
    """Our configs of the tiny diffusers pipeline's three models (what load_single_file needs besides the file)."""
    return dict(unet_config=UNetConfig.from_diffusers_config(dict(reference.unet.config)),
                vae_config=VAEConfig.from_diffusers_config(dict(reference.vae.config)),
                text_encoder_config=TextEncoderConfig.from_transformers_config(reference.text_encoder.config.to_dict()),
                scheduler_config={**reference.scheduler.config, "_class_name": type(reference.scheduler).__name__})


@pytest.fixture(scope="module")
def loaded(tiny_diffusers_pipeline):
    reference, folder = tiny_diffusers_pipeline
    return pretrained.load_pipeline(folder)


@pytest.fixture()
def folder_copy(tiny_diffusers_pipeline, tmp_path):
    """A copy of the saved pipeline folder that a test may damage."""
    return shutil.copytree(tiny_diffusers_pipeline[1], tmp_path / "pipeline")


# --- load_pipeline --------------------------------------------------------------------------


def test_load_pipeline_reads_what_save_pretrained_writes(tiny_diffusers_pipeline, loaded):
    reference, folder = tiny_diffusers_pipeline
    assert type(loaded.scheduler).__name__ == "PNDMScheduler" and loaded.scheduler.config.steps_offset == 1
    assert loaded.tokenizer("a red circle").tolist() == reference.tokenizer(
        "a red circle", padding="max_length", max_length=77, return_tensors="pt").input_ids.tolist()
    difference = np.abs(images(loaded) - images(reference)).max()
    assert difference < TOLERANCE


def test_fp16_variant_files(tiny_diffusers_pipeline, folder_copy):
    """A folder laid out like the hub's fp16 variant: *.fp16.safetensors holding half floats, and nothing else."""
    reference, _ = tiny_diffusers_pipeline
    for path in list(folder_copy.glob("*/*.safetensors")):
        save_file({k: v.half() for k, v in load_file(path).items()}, path.with_suffix(".fp16.safetensors"))
        path.unlink()
    half = pretrained.load_pipeline(folder_copy, variant="fp16", dtype=torch.float32)
    assert half.unet.conv_in.weight.dtype == torch.float32  # dtype= says what the models compute in
    assert torch.equal(half.unet.conv_in.weight, reference.unet.conv_in.weight.detach().half().float())
    reference_weights = {k.removeprefix("text_model."): v for k, v in reference.text_encoder.state_dict().items()}
    assert torch.equal(half.text_encoder.final_layer_norm.weight,  # the prefix: transformers < 5.6
                       reference_weights["final_layer_norm.weight"].half().float())
    assert np.abs(images(half) - images(reference)).max() < 0.05  # only the weights' rounding differs
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.safetensors"):
        pretrained.load_pipeline(folder_copy)  # without variant="fp16" the full-precision files are looked for


def test_hub_downloads_only_the_needed_files_and_offline_says_how_to_get_them():
    patterns = pretrained.pipeline_file_patterns("fp16")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in patterns
    assert "text_encoder/model.fp16.safetensors" in patterns
    assert not any(p.endswith((".bin", ".ckpt")) or p.startswith("safety_checker") for p in patterns)
    with pytest.raises(OSError, match="not in the local Hugging Face cache.*huggingface-cli download"):
        pretrained.load_pipeline("nobody-here/not-a-cached-model", revision="main")  # HF_HUB_OFFLINE=1 in conftest


def test_missing_component_folders_are_named(folder_copy):
    shutil.rmtree(folder_copy / "vae")
    shutil.rmtree(folder_copy / "tokenizer")
    with pytest.raises(FileNotFoundError, match=r"the vae/ folder is missing; the tokenizer/ folder is missing"):
        pretrained.load_pipeline(folder_copy)
    (folder_copy / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match="model_index.json is missing"):
        pretrained.load_pipeline(folder_copy)


def test_a_folder_without_weights_or_with_other_classes(folder_copy):
    index = json.loads((folder_copy / "model_index.json").read_text())
    (folder_copy / "model_index.json").write_text(json.dumps({**index, "unet": ["diffusers", "UNet2DModel"]}))
    with pytest.raises(FileNotFoundError, match="its unet is a UNet2DModel; ldm_teach builds only UNet2DConditionModel"):
        pretrained.load_pipeline(folder_copy)
    (folder_copy / "model_index.json").write_text(json.dumps(index))
    (folder_copy / "unet" / "diffusion_pytorch_model.safetensors").rename(folder_copy / "unet" / "weights.bin")
    with pytest.raises(FileNotFoundError, match="no weights in .*unet.*convert them to safetensors"):
        pretrained.load_pipeline(folder_copy)


def test_an_unknown_scheduler_class_is_refused(folder_copy):
    path = folder_copy / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "_class_name": "LMSDiscreteScheduler"}))
    with pytest.raises(ValueError, match="'LMSDiscreteScheduler' is not implemented in ldm_teach; supported:"):
        pretrained.load_pipeline(folder_copy)


# --- single-file checkpoints ------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_file(loaded, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "tiny-sd.safetensors"
    pretrained.save_single_file(loaded, path)
    return path


def test_single_file_round_trip_is_exact(tiny_diffusers_pipeline, loaded, single_file):
    reference, _ = tiny_diffusers_pipeline
    back = pretrained.load_single_file(single_file, **tiny_configs(reference))
    assert np.array_equal(images(back), images(loaded))
    keys = load_file(single_file)
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."))
               for k in keys)
    assert keys["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)  # LDM's 1x1 convs


def test_diffusers_own_converter_agrees(tiny_diffusers_pipeline, loaded, single_file):
    """Our file, read by diffusers' from_single_file (configs from the saved folder, offline): the same images."""
    from diffusers import StableDiffusionPipeline

    reference, folder = tiny_diffusers_pipeline
    theirs = StableDiffusionPipeline.from_single_file(str(single_file), config=str(folder), safety_checker=None,
                                                      local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    assert np.abs(images(theirs) - images(loaded)).max() < TOLERANCE


def test_sd15_key_names_match_diffusers_converter():
    """The full-size SD 1.5 models, on the meta device: our rules' names, converted by diffusers' own
    converter, are exactly diffusers' model keys, and the counts are those of v1-5-pruned-emaonly."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    with torch.device("meta"):
        ours = {"unet": UNet(UNetConfig.sd15()), "vae": AutoencoderKL(VAEConfig.sd())}
        theirs = {"unet": UNet2DConditionModel(cross_attention_dim=768), "vae": DiffusersVAE(
            block_out_channels=(128, 256, 512, 512), down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4)}
    rules = {"unet": pretrained.unet_original_key, "vae": pretrained.vae_original_key}
    prefixes = {"unet": "model.diffusion_model.", "vae": "first_stage_model."}
    original = {}
    for name, model in ours.items():
        for key, value in model.state_dict().items():
            full = prefixes[name] + rules[name](key, model.config)
            original[full] = pretrained.original_shape(full, value)
    assert len([k for k in original if k.startswith("model.diffusion_model.")]) == 686
    assert len([k for k in original if k.startswith("first_stage_model.")]) == 248
    for name in ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                 "model.diffusion_model.input_blocks.3.0.op.weight",
                 "model.diffusion_model.output_blocks.2.1.conv.weight",
                 "model.diffusion_model.output_blocks.5.2.conv.weight",
                 "model.diffusion_model.middle_block.2.emb_layers.1.bias",
                 "first_stage_model.decoder.up.3.block.2.conv2.weight",
                 "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight"):
        assert name in original, name
    converted = convert_ldm_unet_checkpoint(original, dict(theirs["unet"].config))
    assert set(converted) == set(theirs["unet"].state_dict())
    converted = convert_ldm_vae_checkpoint({k: v for k, v in original.items() if k.startswith("first_stage_model.")},
                                           dict(theirs["vae"].config))
    assert set(converted) == set(theirs["vae"].state_dict())
    with torch.device("meta"):
        text_encoder = TextEncoder(TextEncoderConfig.sd15())
    names = {pretrained.text_encoder_original_key(k, text_encoder.config) for k in text_encoder.state_dict()}
    assert len(names) == 196 and "text_model.encoder.layers.11.mlp.fc2.weight" in names


def test_extra_keys_of_original_files_are_ignored_and_missing_ones_listed(tiny_diffusers_pipeline, loaded, single_file,
                                                                           tmp_path):
    reference, _ = tiny_diffusers_pipeline
    tensors = load_file(single_file)
    extras = {"alphas_cumprod": torch.ones(1000), "model_ema.decay": torch.tensor(0.9999),
              "first_stage_model.loss.logvar": torch.zeros(()),
              "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    save_file({**tensors, **extras}, tmp_path / "with-extras.safetensors")
    back = pretrained.load_single_file(tmp_path / "with-extras.safetensors", **tiny_configs(reference))
    assert np.array_equal(images(back), images(loaded))

    del tensors["model.diffusion_model.out.2.weight"]
    tensors["model.diffusion_model.out.9.weight"] = torch.zeros(1)
    save_file(tensors, tmp_path / "broken.safetensors")
    with pytest.raises(KeyError, match=r"missing keys \(1\):\n    conv_out.weight\n(.|\n)*unexpected keys \(1\):\n"
                                       r"    model.diffusion_model.out.9.weight\n"):
        pretrained.load_single_file(tmp_path / "broken.safetensors", **tiny_configs(reference))


def test_sd2_and_unknown_files_are_refused(tmp_path):
    save_file({"cond_stage_model.model.token_embedding.weight": torch.zeros(2, 2)}, tmp_path / "sd2.safetensors")
    with pytest.raises(ValueError, match="OpenCLIP text encoder .* SD 2.x"):
        pretrained.load_single_file(tmp_path / "sd2.safetensors")
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match="neither a .safetensors file nor a PyTorch pickle"):
        pretrained.load_single_file(tmp_path / "model.onnx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pretrained.load_single_file(tmp_path / "nothing.safetensors")


class TrainingState:
    """An arbitrary Python object, as old training checkpoints pickle them beside the weights."""

    def __init__(self):
        self.step = 470000


def test_pickle_checkpoints_only_through_weights_only(tiny_diffusers_pipeline, loaded, single_file, tmp_path):
    reference, _ = tiny_diffusers_pipeline
    state_dict = load_file(single_file)
    torch.save({"state_dict": state_dict, "global_step": 470000}, tmp_path / "plain.ckpt")
    back = pretrained.load_single_file(tmp_path / "plain.ckpt", **tiny_configs(reference))
    assert np.array_equal(images(back), images(loaded))

    torch.save({"state_dict": state_dict, "trainer": TrainingState()}, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match=r"torch.load\(weights_only=True\) refuses(.|\n)*save_file"):
        pretrained.load_single_file(tmp_path / "pickled.ckpt", **tiny_configs(reference))


def test_a_model_index_naming_an_unknown_scheduler_is_refused(folder_copy):
    index = json.loads((folder_copy / "model_index.json").read_text())
    (folder_copy / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "LCMScheduler"]}))
    with pytest.raises(FileNotFoundError, match="its scheduler is a LCMScheduler; ldm_teach builds only DDPMScheduler"):
        pretrained.load_pipeline(folder_copy)


# --- damaged folders and files name the file and the fix (issue 15) --------------------------


def test_a_truncated_or_empty_weights_file_names_the_file(folder_copy):
    weights = folder_copy / "unet" / "diffusion_pytorch_model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 3])
    with pytest.raises(ValueError, match=rf"{weights} is not a readable safetensors file.*download it again"):
        pretrained.load_pipeline(folder_copy)
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{weights} is empty \(0 bytes\).*download it again"):
        pretrained.load_pipeline(folder_copy)


@pytest.mark.parametrize("name", ["unet/config.json", "vae/config.json", "text_encoder/config.json",
                                  "scheduler/scheduler_config.json", "model_index.json"])
def test_a_config_that_is_not_json_names_the_file(folder_copy, name):
    path = folder_copy / name
    path.write_text(path.read_text()[:25])  # an interrupted download
    with pytest.raises(ValueError, match=rf"{path} is not valid JSON.*damaged or incomplete"):
        pretrained.load_pipeline(folder_copy)


def test_weights_holding_nan_are_refused_naming_the_tensors(folder_copy):
    path = folder_copy / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    tensors["decoder.conv_out.bias"][0] = float("nan")
    tensors["encoder.conv_in.weight"][0, 0, 0, 0] = float("inf")
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"VAE in .* NaN or infinite values in 2 tensors:\n  decoder.conv_out.bias\n"
                                         r"  encoder.conv_in.weight\n.*download or export it again"):
        pretrained.load_pipeline(folder_copy)


@pytest.mark.parametrize("loader", ["load_pipeline", "load_unet", "load_vae", "load_text_encoder"])
def test_asking_for_a_missing_gpu_is_said_before_loading(tiny_diffusers_pipeline, loader, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    _, folder = tiny_diffusers_pipeline
    with pytest.raises(RuntimeError, match=r"device='cuda' was asked for, but torch sees no CUDA GPU.*device='cpu'"):
        getattr(pretrained, loader)(folder, device="cuda")


@pytest.mark.parametrize("content, message", [
    (lambda path: path.write_bytes(b""), r"is empty \(0 bytes\)"),
    (lambda path: torch.save(torch.zeros(3), path), r"holds a Tensor, not a state dict"),
    (lambda path: torch.save([torch.zeros(3)], path), r"holds a list, not a state dict"),
    (lambda path: path.write_bytes(bytes(range(256)) * 8), r"is not a PyTorch checkpoint"),
])
def test_load_single_file_names_a_file_that_is_no_checkpoint(tmp_path, content, message):
    path = tmp_path / "model.ckpt"
    content(path)
    with pytest.raises(ValueError, match=rf"{path} {message}"):
        pretrained.load_single_file(path)


def test_a_file_given_for_a_folder_points_to_load_single_file(single_file):
    with pytest.raises(FileNotFoundError, match=rf"{single_file} is a file; pass the folder.*load_single_file"):
        pretrained.load_pipeline(single_file)


def test_a_key_mismatch_lists_one_key_per_line_and_loads_nothing():
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(7)])  # keys 0.weight, 0.bias, ..., 6.bias
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_dict = {k: torch.zeros_like(v) for k, v in before.items() if not k.startswith("0.")}  # 2 missing
    state_dict.update({f"extra.{i}": torch.zeros(1) for i in range(12)})  # 12 unexpected
    state_dict["1.weight"] = torch.zeros(3, 2)  # mis-shaped
    with pytest.raises(KeyError) as error:
        pretrained.load_state_dict_strict(model, state_dict, "test")
    lines = str(error.value).splitlines()
    assert lines[1:4] == ["  missing keys (2):", "    0.bias", "    0.weight"]
    unexpected = lines.index("  unexpected keys (12):")
    assert lines[unexpected + 1:unexpected + 3] == ["    extra.0", "    extra.1"]
    assert lines[unexpected + 11] == "    ... and 2 more"
    assert "    1.weight: checkpoint (3, 2) vs model (2, 2)" in lines
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    matching = {k: torch.zeros_like(v) for k, v in before.items()}
    pretrained.load_state_dict_strict(model, matching, "test", check_only=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # checked, not copied
