"""Does a generated image show what its prompt asked for? A measure of prompt adherence.

Chapter 05, section "Measuring prompt adherence". The shapes dataset's captions name a color
and a shape, and both can be read back from the pixels of a generated image:

* the **color** with ``data.dominant_color``, the named color nearest to the pixels that differ
  most from the background;
* the **shape** with ``ShapeClassifier``, a small CNN trained in seconds on the dataset itself
  (every color, so it learns the outline and not the paint).

``prompt_adherence`` reports the share of images whose color, shape, and both, match the caption,
with the number of images, since a percentage of 20 samples and one of 2,000 deserve different trust.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import data


def named_color_and_shape(caption: str) -> tuple[str, str]:
    """The color and shape words of a shapes caption: "a small red circle at the top" -> ("red", "circle")."""
    words = caption.split()
    colors = [w for w in words if w in data.COLORS]
    shapes = [w for w in words if w in data.SHAPES]
    if len(colors) != 1 or len(shapes) != 1:
        raise ValueError(f"caption {caption!r} must name exactly one color of {list(data.COLORS)} "
                         f"and one shape of {list(data.SHAPES)}.")
    return colors[0], shapes[0]


class ShapeClassifier(nn.Module):
    """Which of ``shapes`` (the four of the dataset by default) an image (B, 3, H, W) in [-1, 1] shows:
    three conv layers, logits (B, len(shapes)). Chapter 09 adds a new shape: ``shapes=SHAPES + ("bar",)``."""

    def __init__(self, width: int = 16, shapes: tuple[str, ...] = data.SHAPES):
        super().__init__()
        self.shapes = tuple(shapes)
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.SiLU(),
        )
        self.head = nn.Linear(4 * width, len(self.shapes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).amax(dim=(2, 3)))  # (B, 4 width) -> (B, len(shapes))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[str]:
        """The shape name of each image."""
        device = next(self.parameters()).device
        return [self.shapes[i] for i in self(images.float().to(device)).argmax(dim=1).tolist()]


def train_shape_classifier(num_images: int = 2000, image_size: int = 32, steps: int = 300, batch_size: int = 64,
                           seed: int = 0, progress: bool = True,
                           shapes: tuple[str, ...] = data.SHAPES) -> ShapeClassifier:
    """Train a ``ShapeClassifier`` on freshly drawn shapes, all colors and positions, for a few seconds.

    Each batch gets Gaussian noise of a random strength (std up to 0.2), so that the imperfect
    pixels of generated images do not throw it off. Returns the model in eval mode. ``shapes`` are
    the classes (default: the dataset's four, exactly as the zoo's classifier is trained); chapter 09
    adds one of ``data.NEW_SHAPES`` for a judge that knows the new concept.
    """
    dataset = data.ShapesDataset(num_images, image_size=image_size, seed=seed + 1000, shapes=shapes)
    images = dataset.tensors()  # (N, 3, H, W)
    labels = torch.tensor([shapes.index(spec.shape) for spec in dataset.specs])  # (N,)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    classifier = ShapeClassifier(shapes=shapes)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=3e-3)
    for _ in tqdm(range(steps), desc="training the shape classifier", disable=not progress):
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        strength = 0.2 * torch.rand(batch_size, 1, 1, 1, generator=generator)
        noisy = images[index] + strength * torch.randn(images[index].shape, generator=generator)
        loss = F.cross_entropy(classifier(noisy), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return classifier.eval()


@dataclass
class Adherence:
    """Shares (0 to 1) of images whose color, shape, and both, match their caption, out of ``n``."""

    color: float
    shape: float
    both: float
    n: int

    def __str__(self) -> str:
        return f"color {100 * self.color:.0f}%, shape {100 * self.shape:.0f}%, both {100 * self.both:.0f}% (n = {self.n})"


def prompt_adherence(images: torch.Tensor, captions: list[str], classifier: ShapeClassifier) -> Adherence:
    """How many of ``images`` (B, 3, H, W) in [-1, 1] show the color and the shape their caption names."""
    if len(images) != len(captions) or len(images) == 0:
        raise ValueError(f"{len(images)} images and {len(captions)} captions; pass one caption per image, at least one.")
    named = [named_color_and_shape(caption) for caption in captions]
    colors = [data.dominant_color(image) for image in images]
    shapes = classifier.predict(images)
    color_ok = [seen == wanted for seen, (wanted, _) in zip(colors, named)]
    shape_ok = [seen == wanted for seen, (_, wanted) in zip(shapes, named)]
    n = len(images)
    return Adherence(sum(color_ok) / n, sum(shape_ok) / n, sum(c and s for c, s in zip(color_ok, shape_ok)) / n, n)


def generate_and_measure(pipe, captions: list[str], classifier: ShapeClassifier, guidance_scale: float = 7.5,
                         num_inference_steps: int = 50, seed: int = 0, batch_size: int = 64,
                         progress: bool = True) -> tuple[Adherence, torch.Tensor]:
    """Draw one image per caption with ``pipe`` (seeded) and measure its adherence; returns it and the images.

    The images come back as (N, 3, H, W) in [-1, 1], the range the rest of the book uses.
    """
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for start in tqdm(range(0, len(captions), batch_size), desc=f"sampling at guidance {guidance_scale}",
                      disable=not progress):
        output = pipe(captions[start:start + batch_size], num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, generator=generator, output_type="pt", progress=False)
        batches.append(output.images.float().cpu() * 2 - 1)  # [0, 1] -> [-1, 1]
    images = torch.cat(batches)  # (N, 3, H, W)
    return prompt_adherence(images, captions, classifier), images
