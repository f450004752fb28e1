"""ldm_teach.diagrams: the figures label their arrows with the shapes the models really produce."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from ldm_teach import diagrams  # noqa: E402
from ldm_teach.clip import TextEncoder, TextEncoderConfig  # noqa: E402
from ldm_teach.unet import UNet, UNetConfig  # noqa: E402
from ldm_teach.vae import AutoencoderKL, VAEConfig  # noqa: E402


def texts(figure) -> str:
    return "\n".join(text.get_text() for ax in figure.axes for text in ax.texts) + "\n".join(
        text.get_text() for text in figure.texts)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_text_to_image_labels_come_from_running_the_tiny_models():
    unet_config, vae_config, text_config = UNetConfig.tiny(), VAEConfig.tiny(4), TextEncoderConfig.tiny()
    torch.manual_seed(0)
    unet, vae, text_encoder = UNet(unet_config), AutoencoderKL(vae_config), TextEncoder(text_config)
    context = text_encoder(torch.zeros(2, 77, dtype=torch.long))
    latents = torch.zeros(1, 4, 12, 8)
    image = vae.decode(latents)
    labels = texts(diagrams.text_to_image(unet_config, vae_config, text_config, height=48, width=32,
                                          num_inference_steps=7, guidance_scale=3.0))
    for expected in (str(tuple(context[:1].shape)), str(tuple(context.shape)), str(tuple(latents.shape)),
                     str(tuple(unet(torch.cat([latents] * 2), 10, context).shape)), str(tuple(image.shape)),
                     "each of the 7 timesteps", "s = 3", f"{vae_config.scaling_factor:g}"):
        assert expected in labels, expected


def test_sd15_diagrams_show_sd15_numbers():
    labels = texts(diagrams.text_to_image())
    assert "(1, 77, 768)" in labels and "(1, 3, 512, 512)" in labels and "0.18215" in labels
    labels = texts(diagrams.unet())
    assert "64×64, 320 ch" in labels and "8×8, 1280 ch: 2× ResBlock" in labels
    assert "3 skips at 64×64: 320, 320, 320 ch" in labels and "(1, 1280)" in labels
    labels = texts(diagrams.cross_attention(level=1))
    assert "8 heads of d = 80" in labels and "(1, 8, 1024, 77)" in labels and "(1, 640, 32, 32)" in labels
    labels = texts(diagrams.training_step(batch_size=2))
    assert "(2, 3, 512, 512)" in labels and "(2, 4, 64, 64)" in labels and "(2, 77, 768)" in labels


def test_unet_diagram_follows_the_config():
    config = UNetConfig.tiny(block_out_channels=(16, 32, 48), down_block_types=("DownBlock2D",) + (
        "CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",))
    labels = texts(diagrams.unet(config, latent_size=16, context_length=5))
    assert "16×16, 16 ch: 1× ResBlock → down" in labels and "4×4, 48 ch: 1× ResBlock + transformer" in labels
    assert "(1, 5, 64)" in labels and "(1, 48, 4, 4)" in labels


def test_clip_table_holds_the_similarities_given():
    similarities = torch.tensor([[0.9, 0.1], [-0.3, 0.7]])
    labels = texts(diagrams.clip_towers(["a", "b"], similarities))
    assert all(value in labels for value in ("0.90", "0.10", "-0.30", "0.70"))


def test_diffusion_chain_titles_the_timesteps():
    figure = diagrams.diffusion_chain([torch.zeros(3, 8, 8)] * 3, [0, 500, 999])
    assert [ax.get_title() for ax in figure.axes] == ["$x_{0}$", "$x_{500}$", "$x_{999}$"]


def test_sdxl_unet_diagram_shows_its_levels_and_transformer_depths():
    from ldm_teach.unet_sdxl import sdxl_base

    labels = texts(diagrams.unet(sdxl_base(), latent_size=128))
    assert "128×128, 320 ch: 2× ResBlock → down" in labels  # no attention at the highest resolution
    assert "32×32, 1280 ch: 2× ResBlock + 10× transformer" in labels
    assert "64×64, 640 ch: 2× ResBlock + 2× transformer → down" in labels
    assert "middle: ResBlock + 10× transformer + ResBlock, (1, 1280, 32, 32)" in labels
    assert "pooled prompt & sizes" in labels and "(1, 77, 2048)" in labels and "(1, 4, 128, 128)" in labels


def test_fine_tuning_diagram_counts_the_trained_weights():
    from ldm_teach import lora

    unet_config, text_config = UNetConfig.tiny(), TextEncoderConfig.tiny()
    torch.manual_seed(0)
    unet = UNet(unet_config)
    unet_weights = sum(p.numel() for p in unet.parameters())
    adapters = lora.add_lora(unet, rank=2)
    lora_weights = sum(a.rank * (a.in_features + a.out_features) for a in adapters)
    labels = texts(diagrams.fine_tuning(unet_config, text_config, rank=2, prompts=("a <star>", "a zwx circle")))
    for expected in (f"trained: {text_config.hidden_size} weights: 1 new row of {text_config.hidden_size}",
                     f"trained: {unet_weights:,} weights: the whole U-Net",
                     f"trained: {lora_weights:,} weights: A and B on {len(adapters)} attention projections, rank 2",
                     f"table ({text_config.vocab_size + 1:,} × 64)", '"a <star>"', '"a zwx circle"', "(1, 77, 64)"):
        assert expected in labels, expected
