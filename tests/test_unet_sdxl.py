"""SDXL's U-Net options (ldm_teach.unet_sdxl) against diffusers' UNet2DConditionModel on identical weights."""
import pytest
import torch
from diffusers import UNet2DConditionModel

from ldm_teach import pretrained
from ldm_teach.unet import UNet, UNetConfig
from ldm_teach.unet_sdxl import micro_conditioning, sdxl_base, sdxl_refiner

TOLERANCE = 1e-4

# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json, as a dict.
SDXL_BASE_CONFIG = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
# stabilityai/stable-diffusion-xl-refiner-1.0's unet/config.json differs from the base's in these keys.
SDXL_REFINER_CONFIG = {
    **SDXL_BASE_CONFIG, "attention_head_dim": [6, 12, 24, 24], "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280, "projection_class_embeddings_input_dim": 2560, "transformer_layers_per_block": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}

TINY_CONFIGS = {
    # SDXL base's layout: no attention at the first level, deeper transformers lower down, 6 size numbers.
    "sdxl-style": dict(
        block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8, cross_attention_dim=40,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 2, 3), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=24 + 6 * 8,
    ),
    # The refiner's: four levels, attention only in the middle two (and the middle block), 5 numbers.
    "refiner-style": dict(
        block_out_channels=(16, 32, 48, 48), layers_per_block=1, norm_num_groups=8, cross_attention_dim=24,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 6, 6), transformer_layers_per_block=2, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=16 + 5 * 4,
    ),
    # Both conv projections and attention upcast, odd sine order and shift, other channel counts.
    "conv-projection": dict(
        in_channels=3, out_channels=5, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
        cross_attention_dim=12, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, transformer_layers_per_block=(1, 3),
        upcast_attention=True, flip_sin_to_cos=False, freq_shift=1,
        addition_embed_type="text_time", addition_time_embed_dim=6, projection_class_embeddings_input_dim=10 + 3 * 6,
    ),
}
# (batch, height, width, context length, pooled width, number of time ids) per config.
INPUTS = {"sdxl-style": (2, 8, 12, 7, 24, 6), "refiner-style": (3, 9, 16, 77, 16, 5),
          "conv-projection": (1, 7, 5, 3, 10, 3)}


def diffusers_unet(**config) -> UNet2DConditionModel:
    """A diffusers U-Net with seeded random weights, none of them zero: the norms' 1s and 0s are perturbed,
    and so is any tensor that starts at zero, so a swapped, skipped or unloaded weight shows."""
    torch.manual_seed(0)
    model = UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or (p == 0).any():
                p.add_(0.1 * torch.randn_like(p))
    assert all((p != 0).all() for p in model.parameters())
    return model


def random_inputs(batch, height, width, length, pooled, numbers, config, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.get("in_channels", 4), height, width, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    context = torch.randn(batch, length, config["cross_attention_dim"], generator=generator)
    text_embeds = torch.randn(batch, pooled, generator=generator)
    time_ids = torch.randint(0, 1025, (batch, numbers), generator=generator).float()  # sizes in pixels
    return x, t, context, {"text_embeds": text_embeds, "time_ids": time_ids}


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_matches_diffusers_with_added_conditioning(name):
    config = TINY_CONFIGS[name]
    reference = diffusers_unet(**config)
    ours = pretrained.unet_from_diffusers(reference)
    assert ours.config.addition_embed_type == "text_time"
    x, t, context, added = random_inputs(*INPUTS[name], config)
    with torch.no_grad():
        theirs = reference(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
        mine = ours(x, t, context, added_cond_kwargs=added)
        other_sizes = ours(x, t, context, added_cond_kwargs={**added, "time_ids": added["time_ids"] + 64})
    assert mine.shape == theirs.shape and theirs.abs().max() > 0.1
    assert (mine - theirs).abs().max() < TOLERANCE
    assert (other_sizes - mine).abs().max() > 1e-3  # the size numbers change the prediction


@pytest.mark.parametrize("name, config", [("sdxl-base", SDXL_BASE_CONFIG), ("sdxl-refiner", SDXL_REFINER_CONFIG)])
def test_full_size_configs_match_diffusers_on_meta(name, config):
    expected = {"sdxl-base": 2_567_463_684, "sdxl-refiner": 2_259_526_660}[name]
    ours_config = UNetConfig.from_diffusers_config(config)
    assert ours_config == {"sdxl-base": sdxl_base, "sdxl-refiner": sdxl_refiner}[name]()
    with torch.device("meta"):
        reference = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
        ours = UNet(ours_config)
    assert sum(p.numel() for p in reference.parameters()) == expected
    assert sum(p.numel() for p in ours.parameters()) == expected
    # The strict key mapping at full size: every diffusers weight has its place, with its shape.
    mapped = {pretrained.unet_key(k): tuple(v.shape) for k, v in reference.state_dict().items()}
    assert mapped == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_sdxl():
    reference = diffusers_unet(**TINY_CONFIGS["sdxl-style"])
    return reference, pretrained.unet_from_diffusers(reference), random_inputs(*INPUTS["sdxl-style"],
                                                                                TINY_CONFIGS["sdxl-style"])


def test_load_unet_reads_a_saved_sdxl_folder(tiny_sdxl, tmp_path):
    reference, ours, (x, t, context, added) = tiny_sdxl
    reference.save_pretrained(tmp_path / "unet", safe_serialization=True)
    loaded = pretrained.load_unet(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, context, added_cond_kwargs=added), ours(x, t, context, added_cond_kwargs=added))


def test_missing_or_misshaped_added_conditioning_raises(tiny_sdxl):
    _, ours, (x, t, context, added) = tiny_sdxl
    with pytest.raises(TypeError, match=r"addition_embed_type='text_time'.*'text_embeds': \(B, P\).*P \+ K \* 8 = 72"):
        ours(x, t, context)
    with pytest.raises(TypeError, match=r"got \['text_embeds'\]"):
        ours(x, t, context, added_cond_kwargs={"text_embeds": added["text_embeds"]})
    with pytest.raises(ValueError, match=r"shapes \(2, 24\) and \(2, 5\), for 2 latents"):
        ours(x, t, context, added_cond_kwargs={**added, "time_ids": added["time_ids"][:, :5]})
    with pytest.raises(ValueError, match=r"shapes \(1, 24\) and \(2, 6\)"):
        ours(x, t, context, added_cond_kwargs={**added, "text_embeds": added["text_embeds"][:1]})
    with pytest.raises(TypeError, match=r"time_ids is a NumPy array"):
        ours(x, t, context, added_cond_kwargs={**added, "time_ids": added["time_ids"].numpy()})


def test_sd_unets_refuse_added_conditioning():
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny())
    added = {"text_embeds": torch.zeros(1, 8), "time_ids": torch.zeros(1, 6)}
    with pytest.raises(ValueError, match=r"no added conditioning.*leave it out"):
        unet(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 77, 64), added_cond_kwargs=added)


def test_text_time_config_needs_its_widths():
    with pytest.raises(ValueError, match=r"addition_time_embed_dim and projection_class_embeddings_input_dim, "
                                         r"got \(256, None\)"):
        UNetConfig.tiny(addition_embed_type="text_time", addition_time_embed_dim=256)


def test_micro_conditioning_lists_the_six_sizes():
    time_ids = micro_conditioning((768, 1024), (16, 32), (1024, 1024), batch=2)
    assert torch.equal(time_ids, torch.tensor([[768.0, 1024, 16, 32, 1024, 1024]] * 2))
    with pytest.raises(ValueError, match=r"two numbers each"):
        micro_conditioning((1024,), (0, 0), (1024, 1024))
