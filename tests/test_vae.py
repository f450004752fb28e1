"""ldm_teach.vae against diffusers' AutoencoderKL on identical weights, its loaders, its losses and its errors."""
import math
import warnings

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from safetensors.torch import load_file, save_file

from ldm_teach import pretrained
from ldm_teach.vae import (
    AutoencoderKL,
    DiagonalGaussian,
    PatchDiscriminator,
    VAEConfig,
    adaptive_weight,
    discriminator_hinge_loss,
    generator_adversarial_loss,
    kl_loss,
    reconstruction_loss,
    vae_loss,
)

TOLERANCE = 1e-4


def diffusers_vae(perturb_all: bool = True, **config) -> DiffusersAutoencoderKL:
    """A diffusers AutoencoderKL with seeded random weights; GroupNorm's 1s and 0s are perturbed too."""
    levels = len(config["block_out_channels"])
    torch.manual_seed(0)
    model = DiffusersAutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels, **config
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if perturb_all or "norm" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model


TINY_CONFIGS = {
    "two-levels": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4),
    "three-levels": dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8, latent_channels=3),
    "one-channel-8-latents-no-attention": dict(
        in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
        latent_channels=8, mid_block_add_attention=False,
    ),
}
INPUT_SHAPES = {"two-levels": (2, 3, 16, 24), "three-levels": (1, 3, 24, 16), "one-channel-8-latents-no-attention": (3, 1, 8, 12)}


def max_differences(reference: DiffusersAutoencoderKL, ours: AutoencoderKL, x: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        theirs, mine = reference.encode(x).latent_dist, ours.encode(x)
        z = torch.randn(mine.mean.shape, generator=torch.Generator().manual_seed(1))
        decoded = reference.decode(z).sample
        assert decoded.abs().max() > 0.1  # a real signal, not a vanishing one
        return {
            "mean": (theirs.mean - mine.mean).abs().max().item(),
            "std": (theirs.std - mine.std).abs().max().item(),
            "decode": (decoded - ours.decode(z)).abs().max().item(),
        }


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_tiny_configs_match_diffusers(name):
    reference = diffusers_vae(**TINY_CONFIGS[name])
    ours = pretrained.vae_from_diffusers(reference)
    x = torch.rand(INPUT_SHAPES[name], generator=torch.Generator().manual_seed(0)) * 2 - 1
    differences = max_differences(reference, ours, x)
    assert max(differences.values()) < TOLERANCE, differences


def test_full_size_sd_config_matches_diffusers_at_64_pixels():
    sd = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4,
              sample_size=512)
    reference = diffusers_vae(perturb_all=False, **sd)
    assert VAEConfig.from_diffusers_config(reference.config) == VAEConfig.sd()
    ours = pretrained.vae_from_diffusers(reference)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    differences = max_differences(reference, ours, x)
    assert max(differences.values()) < TOLERANCE, differences


@pytest.fixture(scope="module")
def tiny_pair():
    reference = diffusers_vae(**TINY_CONFIGS["two-levels"])
    return reference, pretrained.vae_from_diffusers(reference)


def test_seeded_sample_matches_diffusers(tiny_pair):
    reference, ours = tiny_pair
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        theirs = reference.encode(x).latent_dist.sample(torch.Generator().manual_seed(7))
        posterior = ours.encode(x)
        mine = posterior.sample(torch.Generator().manual_seed(7))
        other_seed = posterior.sample(torch.Generator().manual_seed(8))
    assert (theirs - mine).abs().max() < TOLERANCE
    assert (mine - other_seed).abs().max() > 0.01
    assert torch.equal(posterior.mode(), posterior.mean)


def test_vae_from_diffusers_copies_weights(tiny_pair):
    reference, ours = tiny_pair
    assert all(p.requires_grad for p in ours.parameters())
    weight = ours.decoder.conv_out.weight
    assert torch.equal(weight, reference.decoder.conv_out.weight)
    assert weight.data_ptr() != reference.decoder.conv_out.weight.data_ptr()


def test_load_vae_from_save_pretrained_folder(tiny_pair, tmp_path):
    reference, ours = tiny_pair
    reference.save_pretrained(tmp_path / "vae", safe_serialization=True)
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        expected = ours.decode(ours.encode(x).mean)
        for loaded in (pretrained.load_vae(tmp_path),  # a pipeline folder: reads vae/
                       pretrained.load_vae(tmp_path / "vae"),  # the VAE folder itself
                       pretrained.load_vae(tmp_path / "vae", subfolder=None)):
            assert loaded.config == ours.config
            assert torch.equal(loaded.decode(loaded.encode(x).mean), expected)
    half = pretrained.load_vae(tmp_path, dtype=torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}


def test_load_vae_maps_old_attention_names(tiny_pair, tmp_path):
    reference, ours = tiny_pair
    reference.save_pretrained(tmp_path, safe_serialization=True)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    weights = load_file(path)
    for key in list(weights):
        for new, old in old_names.items():
            if f"attentions.0.{new}." in key:
                weights[key.replace(f".{new}.", f".{old}.")] = weights.pop(key)
    assert any(".query." in k for k in weights)
    save_file(weights, path)
    loaded = pretrained.load_vae(tmp_path, subfolder=None)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_mismatched_key_lists_the_keys(tiny_pair, tmp_path):
    reference, _ = tiny_pair
    reference.save_pretrained(tmp_path, safe_serialization=True)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    weights = load_file(path)
    weights["decoder.conv_out.bias_renamed"] = weights.pop("decoder.conv_out.bias")
    save_file(weights, path)
    with pytest.raises(KeyError, match=r"missing keys \(1\):\n    decoder.conv_out.bias(.|\n)*unexpected keys \(1\):\n    "
                                       r"decoder.conv_out.bias_renamed"):
        pretrained.load_vae(tmp_path)


def test_folder_without_weights_is_a_clear_error(tiny_pair, tmp_path):
    reference, _ = tiny_pair
    reference.save_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights in"):
        pretrained.load_vae(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        pretrained.load_vae(tmp_path / "empty", subfolder=None)


def test_fp16_decode_that_overflows_is_redone_in_fp32(tiny_pair):
    _, ours = tiny_pair
    vae = AutoencoderKL(ours.config)
    vae.load_state_dict(ours.state_dict())
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(3e4)  # still finite in fp16, but its outputs pass 65,504
    vae = vae.half()
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)).half()
    with torch.no_grad():
        assert not torch.isfinite(vae.decoder(vae.post_quant_conv(z))).all()  # the overflow really happens
        with pytest.warns(UserWarning, match="overflowed"):
            image = vae.decode(z)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = vae.decode(z)  # warns only once
        reference = AutoencoderKL(vae.config)
        reference.load_state_dict({k: v.float() for k, v in vae.state_dict().items()})
        expected = reference.decode(z.float())
    assert image.dtype == torch.float16 and torch.isfinite(image).all()
    assert torch.equal(image, again)
    assert torch.equal(image, expected.half())  # exactly the float32 decode, rounded to float16
    assert {p.dtype for p in vae.parameters()} == {torch.float16}  # the model itself stays fp16


def test_sd_vae_parameter_count_on_meta_device():
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig.sd())
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert VAEConfig.sd().downsample_factor == 8 and VAEConfig.tiny().downsample_factor == 4


@pytest.mark.parametrize("f", [1, 2, 8, 16])
def test_tiny_config_for_each_downsampling_factor(f):
    config = VAEConfig.tiny(f)
    assert config.downsample_factor == f and config.latent_channels == 4
    posterior = AutoencoderKL(config).encode(torch.randn(1, 3, 32, 32))
    assert posterior.mean.shape == (1, 4, 32 // f, 32 // f)


def test_tiny_config_rejects_a_factor_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        VAEConfig.tiny(6)


# --- losses --------------------------------------------------------------------------------


def test_kl_matches_closed_form_by_hand():
    # mean (1, -2), variance (4, 1): KL = 0.5 * [(1 + 4 - 1 - ln 4) + (4 + 1 - 1 - 0)] = 4 - ln 2
    moments = torch.tensor([1.0, -2.0, math.log(4.0), 0.0]).view(1, 4, 1, 1)
    posterior = DiagonalGaussian(moments)
    assert posterior.kl().shape == (1,)
    assert posterior.kl().item() == pytest.approx(4 - math.log(2), abs=1e-6)
    assert torch.allclose(posterior.std.flatten(), torch.tensor([2.0, 1.0]))
    normal = torch.distributions.Normal(posterior.mean, posterior.std)
    standard = torch.distributions.Normal(torch.zeros(1), torch.ones(1))
    assert posterior.kl().item() == pytest.approx(torch.distributions.kl_divergence(normal, standard).sum().item())
    batch = DiagonalGaussian(torch.cat([moments, torch.zeros_like(moments)]))  # second sample: N(0, 1), KL 0
    assert kl_loss(batch).item() == pytest.approx((4 - math.log(2)) / 2, abs=1e-6)


def test_logvar_is_clamped():
    posterior = DiagonalGaussian(torch.tensor([0.0, -40.0]).view(1, 2, 1, 1))
    assert posterior.logvar.item() == -30.0 and posterior.std.item() == pytest.approx(math.exp(-15))


def test_reconstruction_and_hinge_losses_by_hand():
    x, y = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    assert reconstruction_loss(x, y, "l1").item() == 48.0  # summed per image, averaged over the batch
    assert reconstruction_loss(x, 2 * y, "l2").item() == 192.0
    with pytest.raises(ValueError, match="'l1' or 'l2'"):
        reconstruction_loss(x, y, "lpips")
    assert discriminator_hinge_loss(torch.full((2,), 2.0), torch.full((2,), -2.0)).item() == 0.0
    assert discriminator_hinge_loss(torch.zeros(2), torch.zeros(2)).item() == 1.0
    assert generator_adversarial_loss(torch.tensor([1.0, 3.0])).item() == -2.0


def test_discriminator_output_shape():
    assert PatchDiscriminator()(torch.randn(2, 3, 32, 48)).shape == (2, 1, 2, 4)
    assert PatchDiscriminator(in_channels=1, channels=8, num_layers=2)(torch.randn(2, 1, 32, 32)).shape == (2, 1, 6, 6)


def test_adaptive_weight_and_full_loss():
    torch.manual_seed(0)
    vae, discriminator = AutoencoderKL(VAEConfig.tiny()), PatchDiscriminator(channels=8, num_layers=2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    reconstruction, posterior = vae(x, generator=torch.Generator().manual_seed(0))
    rec = reconstruction_loss(x, reconstruction)
    adversarial = generator_adversarial_loss(discriminator(reconstruction))
    last_layer = vae.decoder.conv_out.weight
    weight = adaptive_weight(rec, adversarial, last_layer)
    assert torch.isfinite(weight) and weight > 0 and not weight.requires_grad
    # The weight balances gradient norms, so doubling the adversarial loss halves it.
    assert adaptive_weight(rec, 2 * adversarial, last_layer).item() == pytest.approx(weight.item() / 2, rel=1e-3)

    total, parts = vae_loss(x, reconstruction, posterior, discriminator(reconstruction), last_layer, kl_weight=1e-6)
    expected = parts["reconstruction"] + 1e-6 * parts["kl"] + parts["adaptive_weight"] * parts["adversarial"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts["adaptive_weight"].item() == pytest.approx(0.5 * weight.item(), rel=1e-5)
    total.backward()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="last_layer"):
        vae_loss(x, reconstruction, posterior, discriminator(reconstruction))


# --- bad input -----------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(tiny_pair):
    _, vae = tiny_pair
    with pytest.raises(ValueError, match=r"15x16 is not a multiple of 2.*14x16"):
        vae.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"shape \(1, 1, 16, 16\).*\(B, 3, H, W\)"):
        vae.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"batch dimension"):
        vae.encode(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match=r"shape \(1, 3, 8, 8\).*\(B, 4, H, W\)"):
        vae.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"torch.float16.*weights are torch.float32"):
        vae.decode(torch.zeros(1, 4, 8, 8, dtype=torch.float16))


@pytest.mark.parametrize("key, value", [
    ("down_block_types", ["AttnDownEncoderBlock2D"] * 4),
    ("up_block_types", ["UpDecoderBlock2D"] * 3),
    ("act_fn", "gelu"),
    ("use_quant_conv", False),
    ("shift_factor", 0.1159),
    ("latents_mean", [0.0] * 4),
    ("some_new_option", 1),
])
def test_unsupported_diffusers_configs_are_refused(key, value):
    config = {"block_out_channels": [128, 256, 512, 512], key: value}
    with pytest.raises(ValueError, match=key):
        VAEConfig.from_diffusers_config(config)


def test_config_conversion_details():
    config = VAEConfig.from_diffusers_config({"block_out_channels": [32, 64], "norm_num_groups": 8,
                                              "force_upcast": False, "sample_size": [64, 48], "_class_name": "x"})
    assert config.block_out_channels == (32, 64) and config.sample_size == (64, 48)
    assert config.layers_per_block == 1  # a missing key takes diffusers' default
    assert config.force_upcast is False and VAEConfig.from_diffusers_config({}).force_upcast is True
    with pytest.raises(ValueError, match="norm_num_groups=32"):
        VAEConfig(block_out_channels=(48, 64))


def test_numpy_inputs_and_8_bit_ranges_are_named():
    import numpy as np

    model = AutoencoderKL(VAEConfig.tiny(4)).eval()
    with pytest.raises(TypeError, match=r"x is a NumPy array of shape \(1, 3, 16, 16\).*torch.from_numpy"):
        model.encode(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(TypeError, match=r"z is a NumPy array of shape \(1, 4, 4, 4\)"):
        model.decode(np.zeros((1, 4, 4, 4), np.float32))
    with pytest.warns(UserWarning, match=r"x spans 0 to 255, but the VAE takes images in \[-1, 1\].*x / 127.5 - 1"):
        model.encode(torch.linspace(0, 255, 768).reshape(1, 3, 16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # images in [-1, 1] pass without a warning
        model.encode(torch.linspace(-1, 1, 768).reshape(1, 3, 16, 16))
