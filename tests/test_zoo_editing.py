"""Chapter 07's tiny models: made from the zoo's text-to-image model, trained on first use, cached after."""
import pytest
import torch

from ldm_teach import data, zoo, zoo_editing
from ldm_teach.controlnet import StableDiffusionControlNet
from ldm_teach.editing import StableDiffusionInpaint

TINY_BUDGET = {
    "vae": dict(images=16, steps=3, batch_size=4, learning_rate=2e-3, kl_weight=1e-6),
    "text_encoder": dict(pairs=16, steps=2, batch_size=8, learning_rate=1e-3),
    "unet": dict(images=16, steps=6, batch_size=4, learning_rate=1e-3),
    "shape_classifier": dict(images=32, steps=3, batch_size=8),
}
TINY_EDITING_BUDGET = {"inpainting": dict(images=16, steps=4, batch_size=4, learning_rate=1e-3),
                       "controlnet": dict(images=16, steps=4, batch_size=4, learning_rate=1e-3)}


@pytest.fixture
def tiny_zoo(tmp_path, monkeypatch):
    monkeypatch.setenv(zoo.CACHE_VARIABLE, str(tmp_path / "cache"))
    monkeypatch.setitem(zoo.BUDGETS, "quick", TINY_BUDGET)
    monkeypatch.setitem(zoo_editing.BUDGETS, "quick", TINY_EDITING_BUDGET)
    return tmp_path / "cache"


def test_the_widened_unet_starts_as_the_text_to_image_unet():
    from ldm_teach.unet import UNet, UNetConfig

    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny()).eval()
    wide = zoo_editing.inpainting_unet_from(unet).eval()
    x, mask_and_masked, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 8, 8), torch.randn(2, 77, 64)
    with torch.no_grad():
        assert wide.config.in_channels == 9 and unet.config.in_channels == 4
        assert torch.equal(wide(torch.cat([x, mask_and_masked], 1), 10, context), unet(x, 10, context))


def test_masks_and_silhouettes():
    masks = zoo_editing.random_box_masks(50, 32, cell=4, seed=1)
    assert masks.shape == (50, 1, 32, 32) and set(masks.unique().tolist()) == {0.0, 1.0}
    cells = masks[:, 0, ::4, ::4]  # one value per 4 x 4 cell: every cell all in or all out
    assert torch.equal(torch.nn.functional.interpolate(cells[:, None], scale_factor=4.0), masks)
    area = masks.mean(dim=(1, 2, 3))
    assert area.min() >= 4 / 64 and area.max() <= 36 / 64
    dataset = data.ShapesDataset(4, seed=3)
    control = zoo_editing.silhouette(dataset.tensors())
    assert control.shape == (4, 3, 32, 32) and set(control.unique().tolist()) == {0.0, 1.0}
    for spec, one in zip(dataset.specs, control):  # a large shape covers more pixels than a small one
        share = one[0].mean().item()
        assert (0.12 < share < 0.3) if spec.size == "large" else (0.03 < share < 0.1), (spec, share)
    assert zoo_editing.short_caption(dataset.specs[0]) == f"a {dataset.specs[0].color} {dataset.specs[0].shape}"


def test_trained_on_first_use_then_loaded(tiny_zoo, capsys):
    inpaint = zoo_editing.tiny_inpainting("quick", device="cpu", progress=False)
    assert isinstance(inpaint, StableDiffusionInpaint) and inpaint.unet.config.in_channels == 9
    assert "training the tiny inpainting_unet" in capsys.readouterr().out
    again = zoo_editing.tiny_inpainting("quick", device="cpu", progress=False)
    assert "training" not in capsys.readouterr().out
    assert torch.equal(again.unet.conv_in.weight, inpaint.unet.conv_in.weight)
    assert inpaint.unet.conv_in.weight[:, 4:].abs().max() > 0  # the new channels were trained
    assert len(zoo_editing.training_record("inpainting_unet", "quick")["losses"]) == 4

    control = zoo_editing.tiny_controlnet("quick", device="cpu", progress=False)
    assert isinstance(control, StableDiffusionControlNet)
    assert control.controlnet.controlnet_mid_block.weight.abs().max() > 0  # moved off zero
    assert control.unet is not inpaint.unet
    images = control("a red circle", image=torch.ones(1, 3, 32, 32), num_inference_steps=2, output_type="pt",
                     progress=False).images
    assert images.shape == (1, 3, 32, 32)
    capsys.readouterr()
    zoo_editing.tiny_controlnet("quick", device="cpu", progress=False)
    assert "training" not in capsys.readouterr().out


def test_a_retrained_base_is_noticed(tiny_zoo, monkeypatch):
    zoo_editing.tiny_inpainting("quick", device="cpu", progress=False)
    before = zoo.read_manifest("unet", "quick")["sha256"]
    monkeypatch.setitem(zoo.BUDGETS, "quick", {**TINY_BUDGET, "unet": {**TINY_BUDGET["unet"], "steps": 7}})
    with pytest.warns(UserWarning, match="other settings"):
        zoo.tiny_unet("quick", device="cpu", progress=False)  # the base, retrained with other settings
    assert zoo.read_manifest("unet", "quick")["sha256"] != before
    with pytest.raises(zoo.CacheError, match=r"other settings: base.unet \(saved "):
        zoo_editing.tiny_inpainting("quick", retrain=False, device="cpu", progress=False)
