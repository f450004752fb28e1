"""Training loops: seeded, with a loss that falls."""
import copy

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


# --- chapter 05: latent diffusion ---


def test_caption_dropout_swaps_whole_captions_for_the_empty_prompt():
    context = torch.randn(1000, 7, 5)
    empty = torch.randn(7, 5)
    assert torch.equal(train.caption_dropout(context, empty, 0.0), context)
    assert torch.equal(train.caption_dropout(context, empty, 1.0), empty.expand(1000, 7, 5))
    dropped = train.caption_dropout(context, empty, 0.1, torch.Generator().manual_seed(0))
    is_empty = (dropped == empty).all(dim=(1, 2))
    is_kept = (dropped == context).all(dim=(1, 2))
    assert bool((is_empty | is_kept).all())  # a caption is dropped whole or kept whole
    assert 70 <= int(is_empty.sum()) <= 130  # about 10% of 1000
    again = train.caption_dropout(context, empty, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(dropped, again)
    with pytest.raises(ValueError, match="probability=1.5"):
        train.caption_dropout(context, empty, 1.5)
    with pytest.raises(ValueError, match="empty_context"):
        train.caption_dropout(context, empty[:3], 0.1)


def test_ema_update_moves_each_weight_towards_the_model():
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    before = [p.clone() for p in ema.parameters()]
    train.ema_update(ema, model, decay=0.9)
    for old, new, target in zip(before, ema.parameters(), model.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * target, atol=1e-7)
    train.ema_update(ema, model, decay=0.0)
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), model.parameters()))


def test_the_ema_schedule_matches_diffusers_ema_model():
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 2))
    ours = copy.deepcopy(model).requires_grad_(False)
    ours.apply(lambda m: [torch.nn.init.zeros_(p) for p in m.parameters(recurse=False)])  # the copy must not matter
    reference = EMAModel(model.parameters(), decay=0.99)
    config = train.DiffusionTrainingConfig(ema_decay=0.99)
    for step in range(30):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.1 * torch.randn(parameter.shape))
        train.ema_update(ours, model, config.ema_decay_at(step))
        reference.step(model.parameters())
        assert config.ema_decay_at(step) == reference.cur_decay_value
    for a, b in zip(ours.parameters(), reference.shadow_params):
        assert torch.allclose(a, b, atol=1e-6)


def tiny_diffusion_setup(pixel_space: bool = False):
    """A 16x16 shapes set, a small text encoder and (unless pixel_space) a small VAE with f = 2."""
    from ldm_teach import vae as vae_module

    dataset = data.ShapesDataset(24, image_size=16, seed=0)
    torch.manual_seed(0)
    text_encoder = clip.TextEncoder(clip.TextEncoderConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                           num_attention_heads=2))
    autoencoder = None if pixel_space else vae_module.AutoencoderKL(vae_module.VAEConfig.tiny(2))
    if autoencoder is not None:
        autoencoder.config.scaling_factor = 2.0
    return train.prepare_diffusion_data(dataset.tensors(), dataset.captions(), text_encoder, clip.Tokenizer(),
                                        vae=autoencoder, batch_size=10), dataset


def tiny_trainer(diffusion_data, **settings):
    from ldm_teach import unet

    torch.manual_seed(1)
    channels = diffusion_data.latents_mean.shape[1]
    model = unet.UNet(unet.UNetConfig.tiny(in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                                           norm_num_groups=4, attention_head_dim=2, cross_attention_dim=16))
    config = train.DiffusionTrainingConfig(**{"steps": 8, "batch_size": 4, "warmup_steps": 2, **settings})
    return train.LatentDiffusionTrainer(model, diffusion_data, config)


def test_prepare_diffusion_data_encodes_once_and_scales_the_latents():
    diffusion_data, dataset = tiny_diffusion_setup()
    assert diffusion_data.latents_mean.shape == (24, 4, 8, 8) and diffusion_data.latents_std.shape == (24, 4, 8, 8)
    distinct = sorted(set(dataset.captions()))
    assert diffusion_data.contexts.shape == (len(distinct), 77, 16) and diffusion_data.empty_context.shape == (77, 16)
    assert [distinct[i] for i in diffusion_data.caption_index] == dataset.captions()
    pixels, _ = tiny_diffusion_setup(pixel_space=True)
    assert pixels.latents_std is None and torch.equal(pixels.latents_mean, dataset.tensors())
    assert torch.equal(pixels.contexts, diffusion_data.contexts)


def test_latent_diffusion_training_is_seeded_and_a_resumed_run_continues_exactly(tmp_path):
    diffusion_data, _ = tiny_diffusion_setup()
    straight = tiny_trainer(diffusion_data)
    straight.train(progress=False)
    again = tiny_trainer(diffusion_data)
    again.train(progress=False)
    assert straight.losses == again.losses and len(straight.losses) == 8

    interrupted = tiny_trainer(diffusion_data)
    interrupted.train(until=3, progress=False)
    interrupted.save(tmp_path / "run.safetensors")
    resumed = tiny_trainer(diffusion_data).load(tmp_path / "run.safetensors")
    assert resumed.step == 3 and resumed.losses == straight.losses[:3]
    resumed.train(progress=False)
    assert resumed.losses == straight.losses
    for a, b in [(straight.unet, resumed.unet), (straight.ema, resumed.ema)]:
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(straight.unet.parameters(), straight.ema.parameters()))


def test_a_checkpoint_of_another_run_or_model_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    diffusion_data, _ = tiny_diffusion_setup()
    trainer = tiny_trainer(diffusion_data)
    trainer.train(until=2, progress=False)
    trainer.save(tmp_path / "run.safetensors")
    with pytest.raises(ValueError, match="learning_rate"):
        tiny_trainer(diffusion_data, learning_rate=5e-4).load(tmp_path / "run.safetensors")
    tensors = load_file(tmp_path / "run.safetensors")
    from safetensors import safe_open

    with safe_open(tmp_path / "run.safetensors", framework="pt") as file:
        metadata = file.metadata()
    del tensors["unet.conv_in.weight"]
    save_file(tensors, tmp_path / "broken.safetensors", metadata=metadata)
    with pytest.raises(KeyError, match="conv_in.weight"):
        tiny_trainer(diffusion_data).load(tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match="until=99"):
        trainer.train(until=99)
    (tmp_path / "truncated.safetensors").write_bytes((tmp_path / "run.safetensors").read_bytes()[:500])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        tiny_trainer(diffusion_data).load(tmp_path / "truncated.safetensors")


def test_training_in_pixel_space_with_v_prediction_and_a_time_limit():
    diffusion_data, _ = tiny_diffusion_setup(pixel_space=True)
    trainer = tiny_trainer(diffusion_data, prediction_type="v_prediction", steps=1000)
    trainer.train(max_seconds=0.5, progress=False)
    assert 1 <= trainer.step < 1000 and len(trainer.seconds) == trainer.step
    assert all(loss == loss for loss in trainer.losses)
    with pytest.raises(ValueError, match="prediction_type='x0'"):
        train.DiffusionTrainingConfig(prediction_type="x0")
    with pytest.raises(ValueError, match="mixed_precision=True needs a CUDA GPU"):
        tiny_trainer(diffusion_data, mixed_precision=True)


def trainer_state(trainer):
    """Everything a load may change, copied: weights, EMA, optimiser, loss scaler, generator, step and record."""
    return dict(unet=copy.deepcopy(trainer.unet.state_dict()), ema=copy.deepcopy(trainer.ema.state_dict()),
                optimizer=copy.deepcopy(trainer.optimizer.state_dict()), scaler=trainer.scaler.state_dict(),
                generator=trainer.generator.get_state(), step=trainer.step, losses=list(trainer.losses),
                seconds=list(trainer.seconds))


def same_state(a, b):
    def equal(x, y):
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(equal(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):  # betas come back from a checkpoint's JSON as a list
            return isinstance(y, (list, tuple)) and len(x) == len(y) and all(equal(i, j) for i, j in zip(x, y))
        return x == y

    return equal(a, b)


def edit_checkpoint(source, target, edit):
    """Copy a checkpoint with ``edit(tensors, metadata)`` applied."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(source, framework="pt") as file:
        metadata, tensors = file.metadata(), {key: file.get_tensor(key) for key in file.keys()}
    edit(tensors, metadata)
    save_file(tensors, target, metadata=metadata)


def drop_ema_keys(tensors, metadata):
    for key in [k for k in tensors if k.startswith("ema.")][:12]:
        del tensors[key]


BREAKAGES = {  # name: (edit, error type, what the message must name)
    "EMA keys missing": (drop_ema_keys, KeyError,
                         r"EMA U-Net checkpoint(.|\n)*missing keys \(12\):\n    \S+\n(.|\n)*    \.\.\. and 2 more\n"),
    "an unexpected U-Net key": (lambda t, m: t.update({"unet.extra.weight": torch.zeros(2)}), KeyError,
                                r"unexpected keys \(1\):\n    extra.weight\n"),
    "a moment of the wrong shape": (lambda t, m: t.update({"optimizer.0.exp_avg": torch.zeros(3)}), ValueError,
                                    r"optimizer.0.exp_avg has shape \(3,\)"),
    "state of a parameter that is not there": (lambda t, m: t.update({"optimizer.999.exp_avg": torch.zeros(1)}),
                                               ValueError, r"optimizer.999"),
    "a generator state cut short": (lambda t, m: t.update({"generator_state": t["generator_state"][:100]}), ValueError,
                                    r"generator_state has shape \(100,\)"),
    "losses for fewer steps": (lambda t, m: t.update({"losses": t["losses"][:2]}), ValueError,
                               r"losses has shape \(2,\), but a checkpoint at step 4 needs \(4,\)"),
    "no step": (lambda t, m: m.pop("step"), ValueError, r"the checkpoint's 'step' is missing"),
    "a step not a number": (lambda t, m: m.update(step="four"), ValueError, r"'step' is not JSON \('four'\)"),
    "a step past the end": (lambda t, m: m.update(step="80"), ValueError, r"step=80"),
    "param groups of another optimiser": (lambda t, m: m.update(optimizer_param_groups="[]"), ValueError,
                                          r"parameter groups"),
    "another run's provenance": (lambda t, m: m.update(provenance='{"vae": {"sha256": "abc"}}'), ValueError,
                                 r"provenance differs: vae \(saved \{'sha256': 'abc'\}, now missing\)"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_refused_checkpoint_leaves_the_trainer_as_it_was(tmp_path, breakage):
    edit, error_type, message = BREAKAGES[breakage]
    diffusion_data, _ = tiny_diffusion_setup()
    saved = tiny_trainer(diffusion_data)
    saved.train(until=4, progress=False)
    saved.save(tmp_path / "run.safetensors")
    edit_checkpoint(tmp_path / "run.safetensors", tmp_path / "broken.safetensors", edit)

    trainer = tiny_trainer(diffusion_data)
    trainer.train(until=2, progress=False)  # another point of the same run: any partial load would show
    before = trainer_state(trainer)
    with pytest.raises(error_type, match=message):
        trainer.load(tmp_path / "broken.safetensors")
    assert same_state(trainer_state(trainer), before)
    trainer.load(tmp_path / "run.safetensors")  # the intact checkpoint does change everything
    assert trainer.step == 4 and same_state(trainer_state(trainer), trainer_state(saved))


def test_a_checkpoint_is_resumed_only_with_the_same_provenance(tmp_path):
    diffusion_data, _ = tiny_diffusion_setup()
    vae = {"sha256": "0" * 64, "config": {"scaling_factor": 2.0}}
    trainer = train.LatentDiffusionTrainer(tiny_trainer(diffusion_data).unet, diffusion_data,
                                           tiny_trainer(diffusion_data).config, provenance={"vae": vae})
    trainer.train(until=2, progress=False)
    trainer.save(tmp_path / "run.safetensors")
    other = train.LatentDiffusionTrainer(tiny_trainer(diffusion_data).unet, diffusion_data,
                                         tiny_trainer(diffusion_data).config,
                                         provenance={"vae": {**vae, "config": {"scaling_factor": 0.5}}})
    with pytest.raises(ValueError, match=r"vae.config.scaling_factor \(saved 2.0, now 0.5\)"):
        other.load(tmp_path / "run.safetensors")
    assert other.step == 0
    same = train.LatentDiffusionTrainer(tiny_trainer(diffusion_data).unet, diffusion_data,
                                        tiny_trainer(diffusion_data).config, provenance={"vae": vae})
    assert same.load(tmp_path / "run.safetensors").step == 2


def test_an_interrupted_save_leaves_the_earlier_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    diffusion_data, _ = tiny_diffusion_setup()
    trainer = tiny_trainer(diffusion_data)
    trainer.train(until=2, progress=False)
    trainer.save(tmp_path / "run.safetensors")
    good = (tmp_path / "run.safetensors").read_bytes()
    trainer.train(until=4, progress=False)
    real_save_file = train.save_file

    def interrupted_save_file(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as file:
            file.truncate(len(good) // 2)  # half written ...
        raise KeyboardInterrupt  # ... when the user stops the kernel

    monkeypatch.setattr(train, "save_file", interrupted_save_file)
    with pytest.raises(KeyboardInterrupt):
        trainer.save(tmp_path / "run.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["run.safetensors"]
    assert (tmp_path / "run.safetensors").read_bytes() == good
    assert tiny_trainer(diffusion_data).load(tmp_path / "run.safetensors").step == 2
