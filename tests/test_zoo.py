"""The model zoo: trained on first use, loaded from the cache after, and never a bad cache entry used."""
import copy
import json
import re
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

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
    with pytest.raises(zoo.CacheError, match=r"other settings: version \(saved '0.0.1', now '\d"):
        zoo.tiny_vae("quick", retrain=False, device="cpu")
    monkeypatch.setitem(TINY_BUDGET, "vae", {**TINY_BUDGET["vae"], "steps": 4})  # a changed budget
    with pytest.raises(zoo.CacheError, match=r"budget.steps \(saved 3, now 4\); version \(saved '0.0.1'"):
        zoo.tiny_vae("quick", retrain=False, device="cpu")
    with pytest.raises(zoo.CacheError, match="no shape_classifier is cached"):
        zoo.shape_classifier("quick", retrain=False)


def test_the_unet_is_retrained_when_its_vae_changes(tiny_zoo, monkeypatch):
    unet = weights(zoo.tiny_unet("quick", device="cpu", progress=False))
    assert not (tiny_zoo / "unet-quick" / "checkpoint.safetensors").exists()
    assert same(unet, weights(zoo.tiny_unet("quick", retrain=False, device="cpu")))
    monkeypatch.setitem(TINY_BUDGET, "vae", {**TINY_BUDGET["vae"], "steps": 4})
    with pytest.warns(UserWarning, match=r"budget.steps \(saved 3, now 4\)"):
        zoo.tiny_vae("quick", device="cpu", progress=False)
    with pytest.raises(zoo.CacheError, match=r"other settings: vae.config.scaling_factor \(saved [\d.]+, now [\d.]+\); "
                                             r"vae.sha256 \(saved '[0-9a-f]{64}', now '[0-9a-f]{64}'\)"):
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
    for finished in ("manifest.json", "model.safetensors"):
        (tmp_path / "second_cache" / "unet-quick" / finished).unlink()
    (checkpoint / "inside").mkdir(parents=True)  # a folder where the checkpoint belongs: removed, the run afresh
    with pytest.warns(UserWarning, match="checkpoint .* is not usable"):
        assert same(straight, weights(zoo.tiny_unet("quick", device="cpu", progress=False)))
    assert not checkpoint.exists()


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
    other_vae = copy.deepcopy(vae)
    other_vae.config.scaling_factor = 1.0
    with pytest.raises(ValueError, match=r"vae.config.scaling_factor \(saved [\d.]+, now 1.0\)"):
        zoo.save_tiny_unet(trainer, other_vae, text_encoder, "quick")  # not the VAE it was trained with
    trainer.step -= 1  # as if unfinished
    with pytest.raises(ValueError, match="ran 5 of 6 steps.*cache only a finished train_tiny_unet run"):
        zoo.save_tiny_unet(trainer, vae, text_encoder, "quick")


def test_an_interrupted_unet_is_restarted_when_its_vae_or_text_encoder_changed(tiny_zoo, tmp_path, monkeypatch):
    vae = zoo.tiny_vae("quick", device="cpu", progress=False)
    text_encoder = zoo.tiny_text_encoder("quick", device="cpu", progress=False)
    monkeypatch.setattr(zoo, "CHECKPOINT_EVERY", 3)
    checkpoint = tmp_path / "checkpoint.safetensors"
    with pytest.raises(Interrupted):
        zoo.train_tiny_unet(vae, text_encoder, "quick", "cpu", callback=interrupt_at_step_3, callback_every=3,
                            checkpoint_path=checkpoint, progress=False)
    rescaled = copy.deepcopy(vae)  # the same weights, another scaling factor: other latents
    rescaled.config.scaling_factor = 2 * vae.scaling_factor
    with pytest.warns(UserWarning, match=rf"checkpoint .* is not usable(.|\n)*vae.config.scaling_factor "
                                         rf"\(saved {vae.scaling_factor}, now {rescaled.scaling_factor}\)"):
        restarted = zoo.train_tiny_unet(rescaled, text_encoder, "quick", "cpu", checkpoint_path=checkpoint,
                                        progress=False)
    straight = zoo.train_tiny_unet(rescaled, text_encoder, "quick", "cpu", progress=False)
    assert restarted.losses == straight.losses and same(weights(restarted.ema), weights(straight.ema))

    with pytest.raises(Interrupted):  # the whole zoo: a new text encoder while the U-Net's run was cut short
        zoo.tiny_unet("quick", device="cpu", callback=interrupt_at_step_3, callback_every=3, progress=False)
    monkeypatch.setitem(TINY_BUDGET, "text_encoder", {**TINY_BUDGET["text_encoder"], "steps": 3})
    with pytest.warns(UserWarning) as caught:
        unet = zoo.tiny_unet("quick", device="cpu", progress=False)
    assert any(re.search(r"checkpoint .* is not usable(.|\n)*text_encoder.sha256", str(w.message)) for w in caught)
    new_encoder = zoo.tiny_text_encoder("quick", retrain=False, device="cpu")
    assert zoo.read_manifest("unet", "quick")["settings"]["text_encoder"] == zoo.fingerprint(new_encoder)
    fresh = zoo.train_tiny_unet(vae, new_encoder, "quick", "cpu", progress=False)
    assert same(weights(unet), weights(fresh.ema))


class Interrupted(Exception):
    pass


def interrupt_at_step_3(trainer):
    if trainer.step == 3:
        raise Interrupted


def edit(path, change):
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


EDITS = {  # model: (fields to a value, what the CacheError must say)
    "vae scaling factor": ("vae", ("config", "scaling_factor"), 5.0,
                           r"config differs from the one saved with the weights: scaling_factor \(manifest 5.0, "
                           r"weights file [\d.]+\)"),
    "vae latent channels": ("vae", ("config", "latent_channels"), 8, r"latent_channels \(manifest 8, weights file 4\)"),
    "vae budget": ("vae", ("settings", "budget", "images"), 99, r"budget.images \(saved 99, now 16\)"),
    "held-out pairs": ("text_encoder", ("settings", "held_out_pairs"), [],
                       r"held_out_pairs \(saved \[\], now \[\['green', 'triangle'\]"),
    "text encoder seed": ("text_encoder", ("settings", "seed"), 7, r"seed \(saved 7, now 0\)"),
    "the U-Net's VAE": ("unet", ("settings", "vae", "config", "scaling_factor"), 5.0,
                        r"vae.config.scaling_factor \(saved 5.0, now [\d.]+\)"),
    "the U-Net's caption dropout": ("unet", ("settings", "training", "caption_dropout"), 0.5,
                                    r"training.caption_dropout \(saved 0.5, now 0.1\)"),
    "the U-Net's config": ("unet", ("config", "block_out_channels"), [8, 8],
                           r"block_out_channels \(manifest \[8, 8\], weights file \[32, 64\]\)"),
}
GETTERS = {"vae": zoo.tiny_vae, "text_encoder": zoo.tiny_text_encoder, "unet": zoo.tiny_unet}


@pytest.mark.parametrize("field", list(EDITS))
def test_an_edited_manifest_field_is_never_used(tiny_zoo, field):
    name, keys, value, message = EDITS[field]
    get = GETTERS[name]
    trained = weights(get("quick", device="cpu", progress=False))

    def change(manifest):
        record = manifest
        for key in keys[:-1]:
            record = record[key]
        record[keys[-1]] = value

    edit(tiny_zoo / f"{name}-quick" / "manifest.json", change)
    with pytest.raises(zoo.CacheError, match=message):
        get("quick", retrain=False, device="cpu")
    with pytest.warns(UserWarning, match=message):
        retrained = get("quick", device="cpu", progress=False)
    assert same(trained, weights(retrained))  # seeded: the same model again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert same(trained, weights(get("quick", retrain=False, device="cpu")))


def remove_weights_metadata(folder):
    tensors = load_file(folder / "model.safetensors")
    save_file(tensors, folder / "model.safetensors")  # no config inside
    edit(folder / "manifest.json", lambda manifest: manifest.update(sha256=zoo.file_hash(folder / "model.safetensors")))


def replace_by_folder(path):
    path.unlink()
    (path / "inside").mkdir(parents=True)


DAMAGES = {  # what is done to the cached VAE's folder: (damage, what the CacheError with retrain=False says)
    "manifest not JSON": (lambda f: (f / "manifest.json").write_text("{not json"), "unreadable"),
    "manifest not UTF-8": (lambda f: (f / "manifest.json").write_bytes(b"\xff\xfe{"), "unreadable"),
    "manifest a list": (lambda f: (f / "manifest.json").write_text("[]"), "holds a list, not a JSON object"),
    "no hash": (lambda f: edit(f / "manifest.json", lambda m: m.pop("sha256")), "'sha256' is missing"),
    "settings a string": (lambda f: edit(f / "manifest.json", lambda m: m.update(settings="quick")),
                          "'settings' is missing or not a dict \\('quick'\\)"),
    "config null": (lambda f: edit(f / "manifest.json", lambda m: m.update(config=None)),
                    "'config' is missing or not a dict \\(None\\)"),
    "manifest a folder": (lambda f: replace_by_folder(f / "manifest.json"), "unreadable"),
    "weights a folder": (lambda f: replace_by_folder(f / "model.safetensors"), "does not match the hash"),
    "weights without their config": (remove_weights_metadata, "not a zoo weights file with its config inside"),
    "entry a file": (lambda f: (shutil.rmtree(f), f.write_text("not a folder")), "no vae is cached"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_retrain_recovers_from_any_damaged_entry(tiny_zoo, damage):
    do, message = DAMAGES[damage]
    trained = weights(zoo.tiny_vae("quick", device="cpu", progress=False))
    do(tiny_zoo / "vae-quick")
    with pytest.raises(zoo.CacheError, match=message):
        zoo.tiny_vae("quick", retrain=False, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # warned, unless nothing usable was there at all
        assert same(trained, weights(zoo.tiny_vae("quick", device="cpu", progress=False)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert same(trained, weights(zoo.tiny_vae("quick", retrain=False, device="cpu")))


def test_an_interrupted_write_leaves_the_cached_entry_as_it_was(tiny_zoo, monkeypatch):
    trained = weights(zoo.tiny_vae("quick", device="cpu", progress=False))
    folder = tiny_zoo / "vae-quick"
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    real_save_file = zoo.save_file

    def failing_save_file(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as file:
            file.truncate(1000)  # half written ...
        raise OSError(28, "No space left on device")  # ... when the disk filled up

    monkeypatch.setattr(zoo, "save_file", failing_save_file)
    budget = TINY_BUDGET["vae"]
    monkeypatch.setitem(TINY_BUDGET, "vae", {**budget, "steps": 4})  # so that the zoo trains and writes again
    with pytest.warns(UserWarning, match="budget.steps"), pytest.raises(OSError, match="No space left"):
        zoo.tiny_vae("quick", device="cpu", progress=False)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before  # no partial file left
    monkeypatch.setitem(TINY_BUDGET, "vae", budget)
    assert same(trained, weights(zoo.tiny_vae("quick", retrain=False, device="cpu")))


def test_the_vae_trains_with_a_fixed_thread_count_on_the_cpu_whatever_the_machine(tiny_zoo, monkeypatch):
    """Another thread count sums in another order and trains another VAE (chapter 02 measured 96% of shapes
    kept with one thread, 89% with two after 1000 steps): the zoo fixes the count, and restores the caller's."""
    from ldm_teach import train

    seen = []
    real_train_vae = train.train_vae
    monkeypatch.setattr(train, "train_vae", lambda *a, **k: (seen.append(torch.get_num_threads()),
                                                             real_train_vae(*a, **k))[1])
    before = torch.get_num_threads()
    callers = 3 if zoo.VAE_CPU_THREADS != 3 else 1  # a caller's count other than the zoo's
    torch.set_num_threads(callers)
    try:
        zoo.tiny_vae("quick", device="cpu", progress=False)
        assert seen == [zoo.VAE_CPU_THREADS] and torch.get_num_threads() == callers
    finally:
        torch.set_num_threads(before)
    assert zoo.read_manifest("vae", "quick")["settings"]["cpu_threads"] == zoo.VAE_CPU_THREADS
