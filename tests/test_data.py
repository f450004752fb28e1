import pytest
import torch

from ldm_teach import data


def test_shapes_are_deterministic_and_in_range():
    a, b = data.ShapesDataset(20, seed=1), data.ShapesDataset(20, seed=1)
    assert a.captions() == b.captions()
    assert torch.equal(a.tensors(), b.tensors())
    images = a.tensors()
    assert images.shape == (20, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert data.ShapesDataset(20, seed=2).captions() != a.captions()


def test_caption_names_every_attribute():
    spec = data.Shape("red", "circle", "small", "at the top left")
    assert spec.caption == "a small red circle at the top left"


def test_color_can_be_read_back_from_pixels():
    dataset = data.ShapesDataset(300, image_size=32, seed=0)
    wrong = [dataset.specs[i] for i in range(len(dataset)) if data.dominant_color(dataset[i][0]) != dataset.specs[i].color]
    assert wrong == []


def test_shape_fills_its_named_region():
    # a large shape in the top-left quadrant puts its pixels there, not in the bottom right
    image = data.render(data.Shape("blue", "square", "large", "at the top left"), 32)
    foreground = (abs(image.astype(int) - data.BACKGROUND).sum(axis=2) > 60)
    assert foreground[:16, :16].sum() > 100 and foreground[16:, 16:].sum() < 30


def test_exclude_removes_pairs():
    dataset = data.ShapesDataset(200, exclude=(("red", "circle"),))
    assert all((s.color, s.shape) != ("red", "circle") for s in dataset.specs)


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="'pink'"):
        data.render(data.Shape("pink", "circle", "small", "in the center"))
    with pytest.raises(ValueError, match="'star'"):
        data.render(data.Shape("red", "star", "small", "in the center"))
    with pytest.raises(ValueError, match="image_size=4"):
        data.ShapesDataset(3, image_size=4)


def test_photo_is_available_offline():
    photo = data.load_photo("grace_hopper", size=64)
    assert photo.shape == (3, 64, 64) and -1 <= photo.min() < photo.max() <= 1


@pytest.mark.parametrize("options, error, message", [
    (dict(num_samples=-1), ValueError, "num_samples=-1 must be at least 0"),
    (dict(num_samples="10"), TypeError, "num_samples='10' is a string"),
    (dict(num_samples=2.5), TypeError, "num_samples=2.5 is not an int"),
    (dict(image_size="32"), TypeError, "image_size='32' is a string"),
])
def test_bad_dataset_sizes_name_the_value(options, error, message):
    with pytest.raises(error, match=message):
        data.ShapesDataset(**options)


def test_numpy_integers_size_a_dataset():
    import numpy as np

    assert data.ShapesDataset(np.int64(5), image_size=np.int32(32)).captions() == data.ShapesDataset(5).captions()
