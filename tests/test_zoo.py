"""The model zoo: trained on first use, loaded from the cache after, and never a bad cache entry used."""
import json
import warnings

import pytest
import torch

from ldm_teach import zoo

TINY_BUDGET = {
    "vae": dict(images=16, steps=3, batch_size=4, learning_rate=2e-3, kl_weight=1e-6),
    "text_encoder": dict(pairs=16, steps=2, batch_size=8, learning_rate=1e-3),
    "unet": dict(images=16, steps=6, batch_size=4, learning_rate=1e-3),
    "shape_classifier": dict(images=32, steps=3, batch_size=8),
}


@pytest.fixture
def tiny_zoo(tmp_path, monkeypatch):
    """An empty cache in a temporary folder and budgets of a few steps, for the quick profile."""
    monkeypatch.setenv(zoo.CACHE_VARIABLE, str(tmp_path / "cache"))
    monkeypatch.setitem(zoo.BUDGETS, "quick", TINY_BUDGET)
    return tmp_path / "cache"


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trained_on_first_use_then_loaded_from_the_cache(tiny_zoo, capsys):
    first = zoo.tiny_vae("quick", device="cpu", progress=False)
    assert "training the tiny vae" in capsys.readouterr().out
    manifest = zoo.read_manifest("vae", "quick")
    assert manifest["sha256"] == zoo.file_hash(tiny_zoo / "vae-quick" / "model.safetensors")
    assert manifest["settings"]["budget"] == TINY_BUDGET["vae"] and manifest["seconds"] > 0
    assert first.scaling_factor != 1.0 and manifest["config"]["scaling_factor"] == first.scaling_factor

    second = zoo.tiny_vae("quick", device="cpu", progress=False)
    assert "training" not in capsys.readouterr().out
    assert same(weights(first), weights(second)) and second.scaling_factor == first.scaling_factor
    assert not any(p.requires_grad for p in second.parameters())


def test_a_corrupt_file_is_retrained_with_a_warning_or_reported(tiny_zoo, capsys):
    trained = weights(zoo.tiny_text_encoder("quick", device="cpu", progress=False))
    path = tiny_zoo / "text_encoder-quick" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])  # truncated, as by an interrupted copy
    with pytest.raises(zoo.CacheError, match="does not match the hash"):
        zoo.tiny_text_encoder("quick", retrain=False, device="cpu")
    with pytest.warns(UserWarning, match="not usable.*hash"):
        retrained = zoo.tiny_text_encoder("quick", device="cpu", progress=False)
    assert "training the tiny text_encoder" in capsys.readouterr().out
    assert same(trained, weights(retrained))  # seeded: the same model again
    (tiny_zoo / "text_encoder-quick" / "manifest.json").write_text("{not json")
    with pytest.raises(zoo.CacheError, match="unreadable"):
        zoo.tiny_text_encoder("quick", retrain=False, device="cpu")


def test_weights_for_other_settings_are_never_used(tiny_zoo, monkeypatch):
    zoo.tiny_vae("quick", device="cpu", progress=False)
    manifest_path = tiny_zoo / "vae-quick" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["settings"]["version"] = "0.0.1"  # written by another version of the package
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(zoo.CacheError, match="other settings \\(version differ\\)"):
        zoo.tiny_vae("quick", retrain=False, device="cpu")
    monkeypatch.setitem(TINY_BUDGET, "vae", {**TINY_BUDGET["vae"], "steps": 4})  # a changed budget
    with pytest.raises(zoo.CacheError, match="budget, version differ"):
        zoo.tiny_vae("quick", retrain=False, device="cpu")
    with pytest.raises(zoo.CacheError, match="no shape_classifier is cached"):
        zoo.shape_classifier("quick", retrain=False)


def test_the_unet_is_retrained_when_its_vae_changes(tiny_zoo, monkeypatch):
    unet = weights(zoo.tiny_unet("quick", device="cpu", progress=False))
    assert not (tiny_zoo / "unet-quick" / "checkpoint.safetensors").exists()
    assert same(unet, weights(zoo.tiny_unet("quick", retrain=False, device="cpu")))
    monkeypatch.setitem(TINY_BUDGET, "vae", {**TINY_BUDGET["vae"], "steps": 4})
    with pytest.warns(UserWarning, match="budget differ"):
        zoo.tiny_vae("quick", device="cpu", progress=False)
    with pytest.raises(zoo.CacheError, match="vae differ"):
        zoo.tiny_unet("quick", retrain=False, device="cpu")


def test_an_interrupted_unet_training_resumes_the_same_run(tiny_zoo, monkeypatch, tmp_path, capsys):
    straight = weights(zoo.tiny_unet("quick", device="cpu", progress=False))
    straight_losses = zoo.read_manifest("unet", "quick")["losses"]

    monkeypatch.setenv(zoo.CACHE_VARIABLE, str(tmp_path / "second_cache"))
    monkeypatch.setattr(zoo, "CHECKPOINT_EVERY", 3)

    class Interrupted(Exception):
        pass

    def interrupt(trainer):
        if trainer.step == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        zoo.tiny_unet("quick", device="cpu", callback=interrupt, callback_every=3, progress=False)
    assert (tmp_path / "second_cache" / "unet-quick" / "checkpoint.safetensors").exists()
    capsys.readouterr()
    resumed = weights(zoo.tiny_unet("quick", device="cpu", progress=False))
    assert "continuing the interrupted run from step 3" in capsys.readouterr().out
    assert same(straight, resumed) and zoo.read_manifest("unet", "quick")["losses"] == straight_losses

    checkpoint = tmp_path / "second_cache" / "unet-quick" / "checkpoint.safetensors"
    checkpoint.write_bytes(b"half a file")  # a checkpoint cut short: not used, the run starts afresh
    for finished in ("manifest.json", "model.safetensors"):  # as if the run had never finished
        (tmp_path / "second_cache" / "unet-quick" / finished).unlink()
    with pytest.warns(UserWarning, match="checkpoint .* is not usable"):
        restarted = weights(zoo.tiny_unet("quick", device="cpu", progress=False))
    assert same(straight, restarted)


def test_tiny_text_to_image_is_a_pipeline(tiny_zoo):
    pipe = zoo.tiny_text_to_image("quick", device="cpu", progress=False)
    images = pipe(["a small red circle at the top left", "a large blue square in the center"], num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), output_type="pt", progress=False).images
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything cached now: loaded without a word
        zoo.tiny_text_to_image("quick", retrain=False, device="cpu")
    with pytest.raises(ValueError, match="profile='fast'"):
        zoo.tiny_vae("fast")


def test_a_unet_trained_in_view_is_cached_for_the_zoo(tiny_zoo):
    vae = zoo.tiny_vae("quick", device="cpu", progress=False)
    text_encoder = zoo.tiny_text_encoder("quick", device="cpu", progress=False)
    trainer = zoo.train_tiny_unet(vae, text_encoder, "quick", torch.device("cpu"), progress=False)
    manifest = zoo.save_tiny_unet(trainer, vae, text_encoder, "quick")
    assert manifest["losses"] == trainer.losses and manifest["steps"] == TINY_BUDGET["unet"]["steps"]
    assert same(weights(trainer.ema), weights(zoo.tiny_unet("quick", retrain=False, device="cpu")))
    trainer.step -= 1  # as if unfinished
    with pytest.raises(ValueError, match="cache only a finished train_tiny_unet run"):
        zoo.save_tiny_unet(trainer, vae, text_encoder, "quick")
