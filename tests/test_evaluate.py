"""Prompt adherence: the color from the pixels, the shape from a small classifier, as shares of n."""
from types import SimpleNamespace

import pytest
import torch

from ldm_teach import data, evaluate


@pytest.fixture(scope="module")
def classifier():
    return evaluate.train_shape_classifier(num_images=600, steps=120, progress=False)


def test_named_color_and_shape_reads_captions():
    assert evaluate.named_color_and_shape("a small red circle at the top left") == ("red", "circle")
    assert evaluate.named_color_and_shape("a large purple diamond on the right") == ("purple", "diamond")
    with pytest.raises(ValueError, match="exactly one color"):
        evaluate.named_color_and_shape("a cat")


def test_the_shape_classifier_recognises_unseen_shapes(classifier):
    test = data.ShapesDataset(200, seed=99)
    predicted = classifier.predict(test.tensors())
    accuracy = sum(p == spec.shape for p, spec in zip(predicted, test.specs)) / len(test)
    assert accuracy >= 0.95


def test_adherence_counts_color_shape_and_both(classifier):
    test = data.ShapesDataset(40, seed=98)
    images, captions = test.tensors(), test.captions()
    assert evaluate.prompt_adherence(images, captions, classifier) == evaluate.Adherence(1.0, 1.0, 1.0, 40)

    def recolor(spec):  # the same shape in another color
        other = [c for c in data.COLORS if c != spec.color][0]
        return data.Shape(other, spec.shape, spec.size, spec.position).caption

    wrong_color = [recolor(spec) if i % 2 else spec.caption for i, spec in enumerate(test.specs)]
    result = evaluate.prompt_adherence(images, wrong_color, classifier)
    assert (result.color, result.shape, result.both, result.n) == (0.5, 1.0, 0.5, 40)
    assert str(result) == "color 50%, shape 100%, both 50% (n = 40)"
    with pytest.raises(ValueError, match="one caption per image"):
        evaluate.prompt_adherence(images, captions[:-1], classifier)


def test_generate_and_measure_batches_the_prompts_and_seeds_the_pipeline(classifier):
    test = data.ShapesDataset(10, seed=97)
    lookup = dict(zip(test.captions(), test.tensors()))
    calls = []

    def pipe(prompts, num_inference_steps, guidance_scale, generator, output_type, progress):
        calls.append((len(prompts), guidance_scale, output_type, generator.initial_seed()))
        return SimpleNamespace(images=torch.stack([(lookup[p] + 1) / 2 for p in prompts]))  # in [0, 1]

    result, images = evaluate.generate_and_measure(pipe, test.captions(), classifier, guidance_scale=3.0, seed=5,
                                                   batch_size=4, progress=False)
    assert [c[0] for c in calls] == [4, 4, 2] and {c[1:] for c in calls} == {(3.0, "pt", 5)}
    assert result == evaluate.Adherence(1.0, 1.0, 1.0, 10)
    assert torch.allclose(images, test.tensors(), atol=1e-6)
