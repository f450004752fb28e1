"""ldm_teach.perceptual: LPIPS's structure, its bundled weights, its loader and its use in the VAE loss.

Its numbers against the lpips package (which needs torchvision, so it runs in a venv of its own)
are checked by benchmarks/check_lpips.py: a difference of 0.0 on the same weights.
"""
import urllib.error

import pytest
import torch

from ldm_teach import perceptual, train, vae
from ldm_teach.perceptual import LPIPS, VGG16Features, load_lpips, lpips_state_dict
from ldm_teach.pretrained import load_state_dict_strict


def random_vgg_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """VGG16 weights as torchvision names them (features.N.*, plus a classifier that LPIPS drops)."""
    torch.manual_seed(seed)
    weights = {f"features.{k}": v for k, v in VGG16Features().features.state_dict().items()}
    weights["classifier.0.weight"] = torch.randn(4, 4)
    return weights


@pytest.fixture(scope="module")
def model() -> LPIPS:
    return load_state_dict_strict(LPIPS(), lpips_state_dict(random_vgg_state_dict()), "LPIPS")


def test_vgg16_has_torchvisions_layout_and_taps():
    vgg = VGG16Features()
    convs = [name for name, m in vgg.features.named_children() if isinstance(m, torch.nn.Conv2d)]
    assert convs == ["0", "2", "5", "7", "10", "12", "14", "17", "19", "21", "24", "26", "28"]
    assert vgg.taps == (3, 8, 15, 22, 29)
    assert sum(p.numel() for p in vgg.parameters()) == 14_714_688  # VGG16's convolutional part
    shapes = [tuple(f.shape) for f in vgg(torch.zeros(1, 3, 32, 48))]
    assert shapes == [(1, 64, 32, 48), (1, 128, 16, 24), (1, 256, 8, 12), (1, 512, 4, 6), (1, 512, 2, 3)]


def test_bundled_linear_weights_are_lpips_v01():
    from safetensors.torch import load_file

    linear = load_file(perceptual.LPIPS_LINEAR_WEIGHTS)
    assert {k: tuple(v.shape) for k, v in linear.items()} == {
        f"lin{i}.model.1.weight": (1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    assert all((v >= 0).all() for v in linear.values())  # fit as non-negative channel weights
    assert all(v.abs().sum() > 0 for v in linear.values())


def test_distance_is_zero_for_equal_images_symmetric_and_grows_with_distortion(model):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=generator) * 2 - 1
    noise = torch.randn(x.shape, generator=generator)
    with torch.no_grad():
        assert model(x, x).abs().max() < 1e-6
        small, large = model(x, x + 0.05 * noise), model(x, x + 0.5 * noise)
        assert torch.allclose(model(x + 0.05 * noise, x), small, atol=1e-6)
    assert small.shape == (3,) and (small > 0).all() and (large > small).all()


def test_gradients_reach_the_image_and_not_the_weights(model):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = x.clone().add_(0.1).requires_grad_(True)
    model(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in model.parameters())


def test_mismatched_inputs_are_refused(model):
    with pytest.raises(ValueError, match="two RGB batches of one shape"):
        model(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 16))


def test_load_lpips_reads_a_local_vgg_file(tmp_path, model):
    path = tmp_path / "vgg16.pth"
    torch.save(random_vgg_state_dict(), path)
    loaded = load_lpips(vgg_weights=path)
    x, y = torch.rand(2, 1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x, y), model(x, y))


def test_load_lpips_offline_says_how_to_get_the_weights(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty torch hub cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(OSError, match="vgg_weights="):
        load_lpips()


def test_load_lpips_reads_the_torch_hub_cache_and_names_a_damaged_file(monkeypatch, tmp_path, model):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *args, **kwargs: pytest.fail("downloaded"))
    cached = tmp_path / "checkpoints" / "vgg16-397923af.pth"
    cached.parent.mkdir()
    torch.save(random_vgg_state_dict(), cached)
    x, y = torch.rand(2, 1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(load_lpips()(x, y), model(x, y))
    cached.write_bytes(cached.read_bytes()[:1000])  # an interrupted download
    with pytest.raises(ValueError, match=rf"{cached} is not a PyTorch checkpoint.*download it again"):
        load_lpips()


def test_a_pickled_payload_in_place_of_vgg_never_runs(tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    path = tmp_path / "vgg16.pth"
    torch.save({**random_vgg_state_dict(), "payload": Payload()}, path)
    with pytest.raises(ValueError, match=r"torch.load\(weights_only=True\) refuses"):
        load_lpips(vgg_weights=path)
    assert not marker.exists()


def test_a_checkpoint_of_another_network_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3)}, path)
    with pytest.raises(KeyError, match="missing keys"):
        load_lpips(vgg_weights=path)


def test_vae_loss_adds_lpips_to_every_value_as_ldm_does(model):
    torch.manual_seed(0)
    autoencoder = vae.AutoencoderKL(vae.VAEConfig.tiny(2))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    reconstruction, posterior = autoencoder(x)
    plain, _ = vae.vae_loss(x, reconstruction, posterior)
    with_lpips, parts = vae.vae_loss(x, reconstruction, posterior, perceptual=model, perceptual_weight=0.5)
    expected = 0.5 * 3 * 16 * 16 * model(x, reconstruction).mean()
    assert torch.allclose(with_lpips - plain, expected, rtol=1e-5)
    assert parts["perceptual"] > 0


def test_train_vae_with_perceptual_records_it(model):
    torch.manual_seed(0)
    autoencoder = vae.AutoencoderKL(vae.VAEConfig.tiny(2))
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    history = train.train_vae(autoencoder, images, steps=3, batch_size=4, perceptual=model, progress=False)
    assert len(history["perceptual"]) == 3 and all(v > 0 for v in history["perceptual"])
