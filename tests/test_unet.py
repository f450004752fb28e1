"""ldm_teach.unet against diffusers' UNet2DConditionModel on identical weights; loaders, attention capture, errors."""
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from ldm_teach import pretrained
from ldm_teach.unet import UNet, UNetConfig, capture_cross_attention, timestep_embedding

TOLERANCE = 1e-4


def diffusers_unet(**config) -> UNet2DConditionModel:
    """A diffusers U-Net with seeded random weights; the norms' 1s and 0s are perturbed too, so a swapped
    or skipped norm shows."""
    torch.manual_seed(0)
    model = UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


TINY_CONFIGS = {
    "sd1-style": dict(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=48,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
    ),
    "sd2-style": dict(
        block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8, cross_attention_dim=40,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 4), use_linear_projection=True, upcast_attention=True,
    ),
    "three-levels-all-attention": dict(
        in_channels=3, out_channels=5, block_out_channels=(16, 32, 48), layers_per_block=1, norm_num_groups=4,
        cross_attention_dim=24, down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=4, transformer_layers_per_block=(1, 2, 1), flip_sin_to_cos=False, freq_shift=1,
    ),
}
# (batch, height, width, context length) per config: non-square, odd sides, short and 77-token contexts.
INPUTS = {"sd1-style": (3, 8, 12, 77), "sd2-style": (2, 7, 10, 5), "three-levels-all-attention": (1, 12, 9, 3)}


def random_inputs(config: dict, batch: int, height: int, width: int, length: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.get("in_channels", 4), height, width, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    context = torch.randn(batch, length, config["cross_attention_dim"], generator=generator)
    return x, t, context


def max_difference(reference: UNet2DConditionModel, ours: UNet, x, t, context) -> float:
    with torch.no_grad():
        theirs = reference(x, t, encoder_hidden_states=context).sample
        mine = ours(x, t, context)
    assert mine.shape == theirs.shape
    assert theirs.abs().max() > 0.1  # a real signal, not a vanishing one
    return (theirs - mine).abs().max().item()


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_matches_diffusers_on_tiny_configs(name):
    reference = diffusers_unet(**TINY_CONFIGS[name])
    ours = pretrained.unet_from_diffusers(reference)
    inputs = random_inputs(TINY_CONFIGS[name], *INPUTS[name])
    assert max_difference(reference, ours, *inputs) < TOLERANCE
    x, _, context = inputs
    assert max_difference(reference, ours, x, 999, context) < TOLERANCE  # an int timestep, broadcast


def test_matches_diffusers_on_the_full_sd15_config():
    reference = diffusers_unet(sample_size=64, cross_attention_dim=768)  # diffusers' defaults, SD 1.5's context
    assert UNetConfig.from_diffusers_config(dict(reference.config)) == UNetConfig.sd15()
    ours = pretrained.unet_from_diffusers(reference)
    x, t, context = random_inputs({"cross_attention_dim": 768}, 1, 16, 16, 77)
    assert max_difference(reference, ours, x, t, context) < TOLERANCE


def test_sd15_has_859_520_964_parameters_and_sd2_865_910_724():
    with torch.device("meta"):
        sd15, sd2 = UNet(UNetConfig.sd15()), UNet(UNetConfig.sd2())
        # SD 2.1's config as its unet/config.json has it.
        reference_sd2 = UNet2DConditionModel(sample_size=96, attention_head_dim=[5, 10, 20, 20],
                                             cross_attention_dim=1024, use_linear_projection=True,
                                             upcast_attention=True)
    assert sum(p.numel() for p in sd15.parameters()) == 859_520_964
    assert sum(p.numel() for p in sd2.parameters()) == 865_910_724
    assert UNetConfig.from_diffusers_config(dict(reference_sd2.config)) == UNetConfig.sd2()
    assert sum(p.numel() for p in reference_sd2.parameters()) == 865_910_724


def test_timestep_embedding_is_sin_and_cos_of_geometric_frequencies():
    embedding = timestep_embedding(torch.tensor([0, 10]), 8, flip_sin_to_cos=True)
    assert torch.equal(embedding[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # cos 0, then sin 0
    frequencies = 10000 ** -(torch.arange(4) / 4)
    assert torch.allclose(embedding[1], torch.cat([torch.cos(10 * frequencies), torch.sin(10 * frequencies)]))


@pytest.fixture(scope="module")
def saved_unet(tmp_path_factory):
    """A tiny diffusers U-Net written by its own save_pretrained (safetensors), with a test input."""
    config = TINY_CONFIGS["sd2-style"]
    reference = diffusers_unet(**config)
    folder = tmp_path_factory.mktemp("pipeline") / "unet"
    reference.save_pretrained(folder, safe_serialization=True)
    return reference, folder, random_inputs(config, *INPUTS["sd2-style"])


def test_load_unet_from_a_saved_folder_matches(saved_unet):
    reference, folder, inputs = saved_unet
    for path, subfolder in ((folder.parent, "unet"), (folder, "unet"), (folder, None)):
        assert max_difference(reference, pretrained.load_unet(path, subfolder=subfolder), *inputs) == 0.0


def test_load_unet_lists_missing_and_unexpected_keys(saved_unet, tmp_path):
    _, folder, _ = saved_unet
    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    renamed = "down_blocks.0.resnets.0.conv1.weight"
    weights["down_blocks.0.resnets.0.conv_one.weight"] = weights.pop(renamed)
    save_file(weights, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(KeyError, match=r"missing keys \(1\):\n    down_blocks.0.resnets.0.conv1.weight") as error:
        pretrained.load_unet(tmp_path, subfolder=None)
    assert "unexpected keys (1):\n    down_blocks.0.resnets.0.conv_one.weight" in str(error.value)


def test_load_unet_without_weights_says_what_is_missing(saved_unet, tmp_path):
    _, folder, _ = saved_unet
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights in .*diffusion_pytorch_model.safetensors"):
        pretrained.load_unet(tmp_path, subfolder=None)


def test_capturing_cross_attention_gives_distributions_over_tokens_and_same_output():
    config = TINY_CONFIGS["sd2-style"]
    unet = pretrained.unet_from_diffusers(diffusers_unet(**config))
    x, t, context = random_inputs(config, 2, 8, 6, 5)
    with torch.no_grad():
        plain = unet(x, t, context)
        with capture_cross_attention(unet) as store:
            captured = unet(x, t, context)
    assert torch.allclose(plain, captured, atol=1e-5)
    # Two levels with cross-attention, 2 transformers down and 3 up each, plus the middle.
    assert len(store) == 11
    first = store["down_blocks.0.attentions.0.transformer_blocks.0.attn2"]
    assert first.shape == (2, 2, 8 * 6, 5)  # (B, heads, HW, L)
    assert store["mid_block.attentions.0.transformer_blocks.0.attn2"].shape == (2, 4, 2 * 2, 5)
    for probs in store.values():
        assert (probs >= 0).all() and torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
    assert all(module.record_probs is None for module in unet.modules() if hasattr(module, "record_probs"))


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return UNet(UNetConfig.tiny()).eval()


@pytest.mark.parametrize(
    "shape, context_shape, t, message",
    [
        ((1, 3, 8, 8), (1, 77, 64), 10, r"\(1, 3, 8, 8\).*\(B, 4, H, W\).*latents, not images"),
        ((1, 4, 8), (1, 77, 64), 10, r"\(1, 4, 8\).*\(B, 4, H, W\)"),
        ((1, 4, 8, 1), (1, 77, 64), 10, r"8x1.*at least 2"),
        ((1, 4, 8, 8), (1, 77, 768), 10, r"\(1, 77, 768\).*\(1, L, 64\).*matches this U-Net"),
        ((2, 4, 8, 8), (1, 77, 64), 10, r"\(1, 77, 64\).*\(2, L, 64\)"),
        ((2, 4, 8, 8), (2, 77, 64), torch.tensor([1, 2, 3]), r"t has shape \(3,\).*\(2,\)"),
    ],
)
def test_bad_inputs_raise_clear_errors(tiny_unet, shape, context_shape, t, message):
    with pytest.raises(ValueError, match=message):
        tiny_unet(torch.randn(shape), t, torch.randn(context_shape))


def test_inputs_in_another_dtype_raise(tiny_unet):
    with pytest.raises(ValueError, match=r"torch.float16.*torch.float32.*\.to\(device, dtype\)"):
        tiny_unet(torch.randn(1, 4, 8, 8, dtype=torch.float16), 1, torch.randn(1, 77, 64, dtype=torch.float16))


def test_inputs_of_the_wrong_kind_raise_type_errors_naming_them(tiny_unet):
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 64)
    with pytest.raises(TypeError, match=r"unet\(x, t, context\) needs context.*\(B, 77, 64\).*tokenizer\(\[''\]"):
        tiny_unet(x, 10)
    with pytest.raises(TypeError, match=r"t='10' is a string"):
        tiny_unet(x, "10", context)
    with pytest.raises(TypeError, match=r"x is a NumPy array of shape \(1, 4, 8, 8\).*torch.from_numpy"):
        tiny_unet(x.numpy(), 10, context)
    with pytest.raises(TypeError, match=r"context is a NumPy array"):
        tiny_unet(x, 10, context.numpy())
    assert torch.equal(tiny_unet(x, np.int64(10), context), tiny_unet(x, 10, context))  # NumPy ints are ints


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(addition_embed_type="text"), r"addition_embed_type='text' is not implemented.*'text_time' \(SDXL"),
        (dict(class_embed_type="timestep"), r"class_embed_type='timestep'"),
        (dict(down_block_types=["AttnDownBlock2D", "DownBlock2D"]), r"down_block_types=\('AttnDownBlock2D'"),
        (dict(cross_attention_dim=[48, 48]), r"cross_attention_dim=\[48, 48\] must be one int"),
        (dict(some_new_option=True), r"some_new_option=True \(unknown option\)"),
    ],
)
def test_unsupported_diffusers_configs_are_refused(change, message):
    with torch.device("meta"):
        config = {**dict(UNet2DConditionModel(**TINY_CONFIGS["sd1-style"]).config), **change}
    with pytest.raises(ValueError, match=message):
        UNetConfig.from_diffusers_config(config)


def test_block_widths_must_be_ints():
    with pytest.raises(ValueError, match=r"block_out_channels='32,64' must be a tuple of positive ints"):
        UNetConfig.tiny(block_out_channels="32,64")
    assert UNetConfig.tiny(block_out_channels=[np.int64(32), np.int64(64)]).block_out_channels == (32, 64)
