"""Chapter 09's three ways to teach a new concept, on tiny random models: what trains and what stays."""
import pytest
import torch
import torch.nn.functional as F

from ldm_teach import clip, data, evaluate, finetune, lora, zoo, zoo_finetune
from ldm_teach.pipeline import StableDiffusion
from ldm_teach.unet import UNet, UNetConfig
from ldm_teach.vae import AutoencoderKL, VAEConfig


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return StableDiffusion(UNet(UNetConfig.tiny()).eval().requires_grad_(False),
                           AutoencoderKL(VAEConfig.tiny(4)).eval().requires_grad_(False),
                           clip.TextEncoder(clip.TextEncoderConfig.tiny()).eval().requires_grad_(False),
                           clip.Tokenizer(), zoo.scheduler_for(zoo.training_config("quick")))


@pytest.fixture(scope="module")
def concept():
    dataset = zoo_finetune.concept_dataset(4)
    return dataset.tensors(), dataset.specs


def snapshot(module):
    return {name: value.clone() for name, value in module.state_dict().items()}


def test_the_new_shapes_are_drawn_but_in_no_default_dataset():
    assert "bar" in data.NEW_SHAPES and not set(data.NEW_SHAPES) & set(data.SHAPES)
    spec = data.Shape("red", "bar", "large", "in the center")
    mask = (data.render(spec).astype(int) != data.BACKGROUND).any(axis=2)  # (32, 32): the shape's pixels
    rows, columns = mask.any(axis=1).sum(), mask.any(axis=0).sum()
    assert columns > 2 * rows  # flat: wider than twice its height
    cross = (data.render(data.Shape("red", "cross", "large", "in the center")).astype(int) != data.BACKGROUND).any(2)
    assert cross[16, 16] and not cross[10, 10]  # the centre is painted, the box's corner is not
    assert {spec.shape for spec in data.ShapesDataset(200, seed=0).specs} == set(data.SHAPES)
    assert {spec.shape for spec in zoo_finetune.concept_dataset(12).specs} == {"bar"}
    with pytest.raises(ValueError, match="'star'"):
        data.ShapesDataset(4, shapes=("star",))


def test_the_default_classifier_is_unchanged_and_the_extended_one_knows_the_bar():
    default = evaluate.train_shape_classifier(64, steps=3, batch_size=8, progress=False)
    assert default.shapes == data.SHAPES and default.head.out_features == 4
    # the default call trains exactly as before: same data, same initial weights, same batches
    again = evaluate.train_shape_classifier(64, steps=3, batch_size=8, progress=False, shapes=data.SHAPES)
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), again.state_dict().values()))
    assert zoo.base_settings("shape_classifier", "quick")["budget"] == zoo.BUDGETS["quick"]["shape_classifier"]
    extended = evaluate.train_shape_classifier(64, steps=3, batch_size=8, progress=False,
                                               shapes=data.SHAPES + ("bar",))
    assert extended.head.out_features == 5 and set(extended.predict(torch.zeros(3, 3, 32, 32))) <= set(extended.shapes)


def test_textual_inversion_trains_only_the_new_row(pipe, concept):
    images, specs = concept
    captions = [finetune.concept_caption(spec, "<bar>") for spec in specs]
    before_encoder, before_unet = snapshot(pipe.text_encoder), snapshot(pipe.unet)
    tuned, record = finetune.textual_inversion(pipe, images, captions, "<bar>", "square", steps=3, batch_size=2,
                                               learning_rate=1e-2, progress=False)
    new_id = tuned.tokenizer.encoder["<bar>"]
    table = tuned.text_encoder.token_embedding.weight
    old = before_encoder["token_embedding.weight"]
    assert new_id == len(old) and table.shape == (len(old) + 1, old.shape[1])
    assert torch.equal(table[:-1], old)  # bit-identical although AdamW's weight decay touched every row
    square = old[pipe.tokenizer.encode("square")[1]]
    assert not torch.equal(table[-1], square) and (table[-1] - square).abs().max() < 0.1  # moved from its start
    for name, value in tuned.text_encoder.state_dict().items():
        if name != "token_embedding.weight":
            assert torch.equal(value, before_encoder[name]), name
    assert all(torch.equal(value, before_unet[name]) for name, value in tuned.unet.state_dict().items())
    assert "<bar>" not in pipe.tokenizer.encoder and pipe.text_encoder.token_embedding.weight.shape == old.shape
    assert record.trained_weights == old.shape[1] and len(record.losses) == 3
    with pytest.raises(ValueError, match="'square'.*already in the vocabulary"):
        finetune.textual_inversion(pipe, images, [finetune.concept_caption(s, "square") for s in specs], "square")
    with pytest.raises(ValueError, match="no caption names token='<cross>'"):
        finetune.textual_inversion(pipe, images, captions, "<cross>")


def test_the_update_restores_all_but_the_new_rows():
    frozen, moved = torch.zeros(5, 2), torch.ones(5, 2)
    assert finetune.textual_inversion_update(moved, frozen, [1, 3]).tolist() == [[0, 0], [1, 1], [0, 0], [1, 1], [0, 0]]


def test_prior_preservation_loss_is_the_formula(pipe, concept):
    generator = torch.Generator().manual_seed(0)
    a, b, c, d = (torch.randn(3, 4, 8, 8, generator=generator) for _ in range(4))
    expected = ((a - b) ** 2).mean() + 0.7 * ((c - d) ** 2).mean()
    assert torch.allclose(finetune.prior_preservation_loss(a, b, c, d, 0.7), expected, atol=1e-7)
    # and the training loop uses it: the first step's loss equals the formula on the same draws
    images, specs = concept
    captions = [finetune.concept_caption(spec, "sks square") for spec in specs]
    class_captions = [finetune.concept_caption(spec, "square") for spec in specs]
    class_images = torch.flip(images, dims=[3])
    _, record = finetune.dreambooth(pipe, images, captions, class_images, class_captions, 0.5, steps=1,
                                    batch_size=2, learning_rate=0.0, seed=3, progress=False)
    generator = torch.Generator().manual_seed(3)  # replay train_loop's draws
    means, stds = finetune.encode_latents(pipe.vae, images)
    class_means, class_stds = finetune.encode_latents(pipe.vae, class_images)
    index = torch.randint(0, 4, (2,), generator=generator)
    latents = means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)
    class_index = torch.randint(0, 4, (2,), generator=generator)
    class_latents = class_means[class_index] + class_stds[class_index] * torch.randn((2, 4, 8, 8), generator=generator)
    ids = torch.cat([pipe.tokenizer(captions)[index], pipe.tokenizer(class_captions)[class_index]])
    with torch.no_grad():
        prediction, target = finetune.noised_prediction(pipe.unet, torch.cat([latents, class_latents]),
                                                        pipe.text_encoder(ids), pipe.scheduler.alphas_cumprod,
                                                        generator)
    expected = F.mse_loss(prediction[:2], target[:2]) + 0.5 * F.mse_loss(prediction[2:], target[2:])
    assert abs(record.losses[0] - expected.item()) < 1e-6
    with pytest.raises(ValueError, match="prior_weight=-1.0"):
        finetune.dreambooth(pipe, images, captions, class_images, class_captions, -1.0)


def test_dreambooth_trains_a_copy_of_the_whole_unet(pipe, concept):
    images, specs = concept
    before = snapshot(pipe.unet)
    tuned, record = finetune.dreambooth(pipe, images, [finetune.concept_caption(s, "sks square") for s in specs],
                                        steps=2, batch_size=2, progress=False)
    assert all(torch.equal(value, before[name]) for name, value in pipe.unet.state_dict().items())  # untouched
    changed = [name for name, value in tuned.unet.state_dict().items() if not torch.equal(value, before[name])]
    assert len(changed) > 0.9 * len(before) and record.trained_weights == sum(v.numel() for v in before.values())
    assert tuned.text_encoder is pipe.text_encoder


def test_lora_trains_only_a_and_b_and_merges_exactly(pipe, concept):
    images, specs = concept
    captions = [finetune.concept_caption(s, "sks square") for s in specs]
    before = snapshot(pipe.unet)
    tuned, record = finetune.lora_dreambooth(pipe, images, captions, rank=2, alpha=4.0, steps=3, batch_size=2,
                                             learning_rate=1e-2, progress=False)
    state = tuned.unet.state_dict()
    adapters = {name for name in state if ".lora_A." in name or ".lora_B." in name}
    assert adapters and all(torch.equal(state[name], before[name]) for name in state if name not in adapters)
    assert any(state[name].abs().max() > 0 for name in adapters if ".lora_B." in name)  # B left zero
    assert record.trained_weights == sum(state[name].numel() for name in adapters)
    generator = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 64, generator=generator)
    with torch.no_grad():
        unmerged = tuned.unet(x, 500, context)
        assert lora.merge_lora(tuned.unet) == len(adapters) // 2
        assert (tuned.unet(x, 500, context) - unmerged).abs().max() < 1e-5
        assert not torch.equal(unmerged, pipe.unet(x, 500, context))
    with pytest.raises(ValueError, match="rank=0"):
        finetune.lora_dreambooth(pipe, images, captions, rank=0)


def test_bad_concept_images_are_refused(pipe):
    with pytest.raises(ValueError, match=r"images=\(0, 3, 32, 32\)"):
        finetune.dreambooth(pipe, torch.zeros(0, 3, 32, 32), [])
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        finetune.lora_dreambooth(pipe, torch.zeros(2, 3, 32, 32), ["a red sks square"])
    with pytest.raises(ValueError, match="initializer='big square'"):
        finetune.textual_inversion(pipe, torch.zeros(1, 3, 32, 32), ["a red <bar>"], "<bar>", "big square")
