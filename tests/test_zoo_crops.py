"""Chapter 08's micro-conditioning: crops that are what they say, numbers that reach the U-Net, a cached model."""
import pytest
import torch

from ldm_teach import clip, data, evaluate, train, zoo, zoo_crops
from ldm_teach.unet import UNet
from ldm_teach.vae import AutoencoderKL, VAEConfig

TINY_BUDGET = {
    "vae": dict(images=16, steps=3, batch_size=4, learning_rate=2e-3, kl_weight=1e-6),
    "text_encoder": dict(pairs=16, steps=2, batch_size=8, learning_rate=1e-3),
    "unet": dict(images=16, steps=6, batch_size=4, learning_rate=1e-3),
    "shape_classifier": dict(images=32, steps=3, batch_size=8),
}
TINY_CROP_BUDGET = {"crop_unet": dict(images=24, steps=4, batch_size=4, learning_rate=1e-3)}


@pytest.fixture
def tiny_zoo(tmp_path, monkeypatch):
    monkeypatch.setenv(zoo.CACHE_VARIABLE, str(tmp_path / "cache"))
    monkeypatch.setitem(zoo.BUDGETS, "quick", TINY_BUDGET)
    monkeypatch.setitem(zoo_crops.BUDGETS, "quick", TINY_CROP_BUDGET)
    return tmp_path / "cache"


def random_models():
    torch.manual_seed(0)
    return AutoencoderKL(VAEConfig.tiny(4)), clip.TextEncoder(clip.TextEncoderConfig.tiny())


# --- the data ---


def test_each_crop_is_the_window_of_the_large_picture_its_numbers_name():
    dataset = zoo_crops.CroppedShapesDataset(60, seed=3)
    plain = data.ShapesDataset(60, seed=3, exclude=zoo.HELD_OUT_PAIRS)
    assert dataset.captions() == plain.captions()
    cropped = dataset.is_cropped()
    assert 15 <= int(cropped.sum()) <= 45  # about half of 60
    time_ids = dataset.time_ids()
    assert time_ids.shape == (60, 6)
    for i in range(60):
        image, caption = dataset[i]
        side, top, left = dataset.crops[i]
        assert image.shape == (3, 32, 32) and caption == plain.specs[i].caption
        assert time_ids[i].tolist() == [side, side, top, left, 32, 32]
        if cropped[i]:
            assert side == 48 and 0 <= top <= 16 and 0 <= left <= 16
            large = torch.from_numpy(data.render(dataset.specs[i], 48, dataset.jitters[i])).permute(2, 0, 1)
            assert torch.equal(image, large[:, top:top + 32, left:left + 32].float() / 127.5 - 1)
        else:
            assert (side, top, left) == (32, 0, 0) and torch.equal(image, plain[i][0])
    assert len({crop[1:] for crop, c in zip(dataset.crops, cropped) if c}) > 10  # the corners vary


def test_the_crops_are_deterministic_per_seed_and_the_share_is_honoured():
    first, again = zoo_crops.CroppedShapesDataset(40, seed=5), zoo_crops.CroppedShapesDataset(40, seed=5)
    assert first.crops == again.crops and torch.equal(first.tensors(), again.tensors())
    assert zoo_crops.CroppedShapesDataset(40, seed=6).crops != first.crops
    assert not zoo_crops.CroppedShapesDataset(20, cropped_share=0.0).is_cropped().any()
    assert zoo_crops.CroppedShapesDataset(20, cropped_share=1.0).is_cropped().all()
    assert zoo_crops.CroppedShapesDataset(20, seed=5).crops == first.crops[:20]  # image i does not depend on N


def test_cropped_training_pictures_are_cut_by_the_border_far_more_often():
    shares = zoo_crops.training_cut_shares(zoo_crops.CroppedShapesDataset(200, seed=0))
    assert shares["cropped"] > 0.6 and shares["uncropped"] < 0.2
    centred = torch.from_numpy(data.render(data.Shape("red", "circle", "small", "in the center"))).permute(2, 0, 1)
    centred = centred[None].float() / 127.5 - 1  # (1, 3, 32, 32)
    shifted = torch.cat([centred[..., 12:], centred[..., :12]], dim=-1)  # the circle moved onto the left border
    assert zoo_crops.touches_border(torch.cat([centred, shifted])).tolist() == [False, True]


def test_bad_crops_and_sizes_are_refused_with_the_value():
    image = torch.zeros(3, 48, 48)
    assert zoo_crops.crop(image, 16, 0, 32).shape == (3, 32, 32)
    with pytest.raises(ValueError, match=r"\(17, 0\).*48x48.*top <= 16"):
        zoo_crops.crop(image, 17, 0, 32)
    with pytest.raises(ValueError, match="64x64 crop"):
        zoo_crops.crop(image, 0, 0, 64)
    with pytest.raises(ValueError, match=r"crops_coords_top_left=\(20, 0\).*original_size=\(48, 48\)"):
        zoo_crops.crop_time_ids((48, 48), (20, 0), (32, 32))
    with pytest.raises(ValueError, match=r"target_size=\(32, 32, 1\) must be two numbers"):
        zoo_crops.crop_time_ids((48, 48), (0, 0), (32, 32, 1))
    with pytest.raises(ValueError, match="original_size=24 is smaller than image_size=32"):
        zoo_crops.CroppedShapesDataset(4, original_size=24)
    with pytest.raises(ValueError, match="cropped_share=1.5"):
        zoo_crops.CroppedShapesDataset(4, cropped_share=1.5)
    assert zoo_crops.crop_time_ids((48, 48), (16, 16), (32, 32), batch=2).tolist() == [[48, 48, 16, 16, 32, 32]] * 2


# --- the model ---


def test_the_unet_reads_the_six_numbers_and_refuses_a_wrong_count():
    torch.manual_seed(0)
    unet = UNet(zoo_crops.unet_config()).eval()
    x, context, pooled = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 64), torch.randn(2, 64)
    uncropped = zoo_crops.crop_time_ids(*zoo_crops.CONDITIONS["uncropped"], batch=2)
    cropped = zoo_crops.crop_time_ids(*zoo_crops.CONDITIONS["cropped"], batch=2)
    with torch.no_grad():
        a = unet(x, 500, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": uncropped})
        b = unet(x, 500, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": cropped})
        again = unet(x, 500, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": uncropped.clone()})
    assert torch.equal(a, again) and (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"time_ids have shapes \(2, 64\) and \(2, 5\)"):
        unet(x, 500, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": uncropped[:, :5]})


def test_the_trainer_passes_the_pooled_prompt_and_each_images_numbers():
    vae, text_encoder = random_models()
    dataset = zoo_crops.CroppedShapesDataset(12, seed=2)
    diffusion_data = train.prepare_diffusion_data(dataset.tensors(), dataset.captions(), text_encoder,
                                                  clip.Tokenizer(), vae=vae, time_ids=dataset.time_ids())
    distinct = sorted(set(dataset.captions()))
    with torch.no_grad():
        assert torch.allclose(diffusion_data.pooled, train.pooled_prompt(text_encoder, clip.Tokenizer()(distinct)))
        assert torch.allclose(diffusion_data.empty_pooled, train.pooled_prompt(text_encoder, clip.Tokenizer()([""]))[0])
    for dropout in (0.0, 1.0):
        torch.manual_seed(0)
        config = train.DiffusionTrainingConfig(steps=2, batch_size=5, caption_dropout=dropout, seed=4)
        trainer = train.LatentDiffusionTrainer(UNet(zoo_crops.unet_config()), diffusion_data, config)
        seen = []
        trainer.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]),
                                               with_kwargs=True)
        trainer.training_step()
        index = torch.randint(0, 12, (5,), generator=torch.Generator().manual_seed(4))  # the step's first draw
        assert torch.equal(seen[0]["time_ids"], dataset.time_ids()[index])
        wanted = (diffusion_data.empty_pooled.expand(5, -1) if dropout else
                  diffusion_data.pooled[diffusion_data.caption_index[index]])
        assert torch.equal(seen[0]["text_embeds"], wanted)


def test_the_trainer_refuses_numbers_for_a_plain_unet_and_a_crop_unet_without_them():
    vae, text_encoder = random_models()
    dataset = zoo_crops.CroppedShapesDataset(6, seed=2)
    with_numbers = train.prepare_diffusion_data(dataset.tensors(), dataset.captions(), text_encoder, clip.Tokenizer(),
                                                vae=vae, time_ids=dataset.time_ids())
    plain = train.prepare_diffusion_data(dataset.tensors(), dataset.captions(), text_encoder, clip.Tokenizer(), vae=vae)
    with pytest.raises(ValueError, match="'text_time' but the data's time_ids are missing"):
        train.LatentDiffusionTrainer(UNet(zoo_crops.unet_config()), plain)
    with pytest.raises(ValueError, match="None but the data's time_ids are given"):
        train.LatentDiffusionTrainer(UNet(zoo.unet_config()), with_numbers)
    with pytest.raises(ValueError, match=r"time_ids has shape \(5, 6\).*N = 6"):
        train.prepare_diffusion_data(dataset.tensors(), dataset.captions(), text_encoder, clip.Tokenizer(),
                                     vae=vae, time_ids=dataset.time_ids()[:5])


def test_the_pipeline_draws_differently_for_other_crop_numbers_and_the_measure_counts():
    vae, text_encoder = random_models()
    config = train.DiffusionTrainingConfig(steps=3, batch_size=4)
    trainer = zoo_crops.train_crop_unet(vae, text_encoder, zoo_crops.CroppedShapesDataset(16, seed=1), config,
                                        progress=False)
    assert trainer.step == 3 and len(trainer.seconds) == 3
    pipe = zoo_crops.CropConditionedPipeline(trainer.ema, vae, text_encoder, clip.Tokenizer(),
                                             zoo.scheduler_for(config))
    prompts = ["a large red circle at the top left", "a small blue square on the right"]

    def draw(**sizes):
        return pipe(prompts, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt",
                    progress=False, **sizes).images

    uncropped, cropped = draw(), draw(original_size=(48, 48), crops_coords_top_left=(12, 12))
    assert uncropped.shape == (2, 3, 32, 32) and torch.equal(uncropped, draw(original_size=(32, 32)))
    assert (uncropped - cropped).abs().max() > 1e-4
    with pytest.raises(ValueError, match="reaches past original_size"):
        draw(crops_coords_top_left=(4, 0))
    results = zoo_crops.measure_cut_shares(pipe, evaluate.ShapeClassifier(), num_images=3, seeds=(0, 1),
                                           num_inference_steps=2, progress=False)
    assert set(results) == {"uncropped", "cropped"}
    for result in results.values():
        assert len(result.cut_shares) == 2 and len(result.adherence) == 2 and result.images.shape == (6, 3, 32, 32)
        assert torch.equal(zoo_crops.touches_border(result.images[:3]).float().mean(),
                           torch.tensor(result.cut_shares[0]))
        assert len(result.exact_shares) == 2
    shapes = data.ShapesDataset(3, seed=zoo_crops.MEASURE_SEED, exclude=zoo.HELD_OUT_PAIRS)
    for name, condition in zoo_crops.CONDITIONS.items():
        exact = zoo_crops.touches_border(zoo_crops.exactly_cropped(shapes, *condition)).float().mean()
        assert exact.item() == results[name].exact_shares[0]
    assert torch.equal(zoo_crops.exactly_cropped(shapes, *zoo_crops.CONDITIONS["uncropped"]), shapes.tensors())
    with pytest.raises(ValueError, match="must be square"):
        zoo_crops.exactly_cropped(shapes, (48, 40), (0, 0), (32, 32))
    with pytest.raises(ValueError, match=r"crops_coords_top_left=\(30, 30\)"):
        zoo_crops.measure_cut_shares(pipe, evaluate.ShapeClassifier(), {"bad": ((48, 48), (30, 30), (32, 32))})


def test_trained_on_first_use_then_loaded_from_the_cache(tiny_zoo, capsys):
    first = zoo_crops.tiny_crop_conditioned("quick", device="cpu", progress=False)
    out = capsys.readouterr().out
    assert "training the tiny crop_unet" in out and "crop-conditioned U-Net: 4 steps" in out
    record = zoo_crops.training_record("quick")
    assert record["steps"] == 4 and record["training_seconds"] > 0 and len(record["losses"]) == 4
    assert record["settings"]["budget"] == TINY_CROP_BUDGET["crop_unet"]
    second = zoo_crops.tiny_crop_conditioned("quick", device="cpu", progress=False)
    assert "training" not in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(first.unet.state_dict().values(), second.unet.state_dict().values()))
    assert second.unet.config.addition_embed_type == "text_time"


def test_the_crop_unet_starts_as_the_text_to_image_unet_whatever_the_numbers():
    torch.manual_seed(0)
    base = UNet(zoo.unet_config()).eval()
    crop_unet = zoo_crops.crop_unet_from(base).eval()
    x, context, pooled = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 64), torch.randn(2, 64)
    with torch.no_grad():
        for condition in zoo_crops.CONDITIONS.values():
            added = {"text_embeds": pooled, "time_ids": zoo_crops.crop_time_ids(*condition, batch=2)}
            assert torch.equal(crop_unet(x, 300, context, added_cond_kwargs=added), base(x, 300, context))
    assert crop_unet.add_embedding.linear_1.weight.abs().sum() > 0  # only the last layer starts at zero
    with pytest.raises(ValueError, match="not the zoo's tiny one"):
        zoo_crops.crop_unet_from(UNet(zoo.unet_config().__class__.tiny(block_out_channels=(16, 32))))
