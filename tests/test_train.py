"""Training loops: seeded, with a loss that falls."""
import pytest
import torch

from ldm_teach import clip, data, train

# --- chapter 02: the VAE ---


def test_train_toy_denoiser_is_seeded_and_learns():
    from ldm_teach import diffusion

    alphas_cumprod = diffusion.NoiseSchedule.make("linear").alphas_cumprod
    histories = []
    for _ in range(2):
        torch.manual_seed(0)
        model = diffusion.ToyDenoiser(hidden=32)
        histories.append(train.train_toy_denoiser(model, lambda n, g: data.toy_2d(n, "ring", g), alphas_cumprod,
                                                  steps=150, batch_size=128, progress=False))
    assert histories[0] == histories[1]
    assert sum(histories[0][-20:]) / 20 < 0.8 * sum(histories[0][:5]) / 5


def test_train_vae_is_seeded_and_reconstruction_falls():
    from ldm_teach import vae

    images = data.ShapesDataset(32, image_size=16, seed=0).tensors()
    histories = []
    for _ in range(2):
        torch.manual_seed(0)
        model = vae.AutoencoderKL(vae.VAEConfig.tiny(downsample_factor=2))
        histories.append(train.train_vae(model, images, steps=30, batch_size=8, progress=False))
    assert histories[0] == histories[1]
    errors = histories[0]["pixel_error"]
    assert sum(errors[-5:]) / 5 < 0.7 * sum(errors[:3]) / 3
    assert not model.training


def test_train_vae_with_a_discriminator_records_both_losses():
    from ldm_teach import vae

    images = data.ShapesDataset(16, image_size=32, seed=1).tensors()
    torch.manual_seed(0)
    model = vae.AutoencoderKL(vae.VAEConfig.tiny(downsample_factor=2))
    history = train.train_vae(model, images, steps=6, batch_size=4, discriminator=vae.PatchDiscriminator(channels=16, num_layers=2),
                              adversarial_start=3, progress=False)
    assert all(x != x for x in history["adversarial"][:3])  # NaN before the adversarial phase
    assert all(x == x for x in history["discriminator"][3:])


# --- chapter 03: CLIP ---


def test_train_clip_is_seeded_and_learns_to_pair():
    dataset = data.ShapesDataset(48, seed=0)
    images, captions = dataset.tensors(), dataset.captions()
    tokenizer = clip.Tokenizer()
    histories = []
    for _ in range(2):
        torch.manual_seed(0)
        model = clip.CLIP(clip.TextEncoderConfig.tiny(), clip.ImageEncoderConfig(patch_size=8), projection_dim=32)
        histories.append(train.train_clip(model, images, captions, tokenizer, steps=60, batch_size=16,
                                          learning_rate=1e-3, progress=False))
    assert histories[0] == histories[1] and len(histories[0]) == 60
    assert sum(histories[0][-5:]) / 5 < 0.6 * histories[0][0]
    assert not model.training and model.logit_scale.exp() <= 100 + 1e-4
    with pytest.raises(ValueError, match="one caption per image"):
        train.train_clip(model, images, captions[:-1], tokenizer, steps=1)
    with pytest.raises(ValueError, match="batch_size=100"):
        train.train_clip(model, images, captions, tokenizer, steps=1, batch_size=100)
