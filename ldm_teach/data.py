"""Data the book trains on and looks at, all available offline.

* The **captioned shapes** dataset: small RGB images of one shape each, whose color, kind,
  size and position vary, with a caption that names them ("a small red circle at the top
  left"). Images are drawn procedurally from a seed, so nothing is downloaded, every run
  sees the same data, and a caption can be checked against the pixels (red is red). The
  VAE, CLIP and training chapters use it as a miniature of a web-scale captioned dataset.
* **Sample photos** that ship inside installed packages (matplotlib's portrait of Grace
  Hopper), for the chapters that noise or encode a real photograph.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .checks import as_int

# Saturated colors, far apart in RGB, so a color can be read back from pixels.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
# Shapes the zoo's models never see: ``render`` can draw them, but no dataset holds them unless asked
# (``ShapesDataset(shapes=("bar",))``), so chapter 09 has a concept to teach a trained model. The zoo's
# VAE keeps a bar (a square stretched sideways) but turns a cross into a diamond-like blob: its decoder
# learnt only the four shapes' outlines, so no fine-tune of the U-Net or the text can draw a cross.
NEW_SHAPES = ("bar", "cross")
SIZES = {"small": 0.28, "large": 0.48}  # side of the shape's box, as a fraction of the image side
POSITIONS = {  # centre of the shape as (x, y) fractions of the image side
    "at the top left": (0.28, 0.28), "at the top": (0.5, 0.28), "at the top right": (0.72, 0.28),
    "on the left": (0.28, 0.5), "in the center": (0.5, 0.5), "on the right": (0.72, 0.5),
    "at the bottom left": (0.28, 0.72), "at the bottom": (0.5, 0.72), "at the bottom right": (0.72, 0.72),
}
BACKGROUND = (235, 235, 235)
SUPERSAMPLE = 4  # draw at 4x and average, for smooth (anti-aliased) edges


@dataclass(frozen=True)
class Shape:
    """One image's content; its caption names every attribute."""

    color: str
    shape: str
    size: str
    position: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {self.position}"


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Which points (u, v), in the shape's own box coordinates [-1, 1]², lie inside it."""
    if shape == "circle":
        return u**2 + v**2 <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if shape == "triangle":  # apex up (image rows grow downwards), base along the bottom
        return (v <= 0.85) & (np.abs(u) <= (v + 0.85) / 1.7)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "bar":  # a flat rectangle, as wide as the box and not half as tall
        return (np.abs(u) <= 0.95) & (np.abs(v) <= 0.4)
    if shape == "cross":  # a plus sign: two bars a third of the box wide
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.9)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.9))
    raise ValueError(f"shape={shape!r} is not known; use one of {SHAPES + NEW_SHAPES}.")


def render(spec: Shape, image_size: int = 32, jitter: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Draw one image: uint8 array (H, W, 3) with the shape on a plain light background."""
    for name, table in (("color", COLORS), ("size", SIZES), ("position", POSITIONS)):
        if getattr(spec, name) not in table:
            raise ValueError(f"{name}={getattr(spec, name)!r} is not known; use one of {list(table)}.")
    n = image_size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / n  # pixel centres in [0, 1]
    x, y = np.meshgrid(coords, coords)  # (n, n) each
    centre_x, centre_y = POSITIONS[spec.position]
    half = SIZES[spec.size] / 2
    u = (x - centre_x - jitter[0]) / half
    v = (y - centre_y - jitter[1]) / half
    mask = _inside(spec.shape, u, v).astype(np.float32)
    mask = mask.reshape(image_size, SUPERSAMPLE, image_size, SUPERSAMPLE).mean(axis=(1, 3))  # (H, W)
    color = np.array(COLORS[spec.color], dtype=np.float32)
    background = np.array(BACKGROUND, dtype=np.float32)
    image = mask[..., None] * color + (1 - mask[..., None]) * background  # (H, W, 3)
    return np.round(image).astype(np.uint8)


class ShapesDataset(torch.utils.data.Dataset):
    """``num_samples`` captioned shape images, the i-th drawn from the seed ``(seed, i)``.

    Items are ``(image, caption)`` with image a float tensor (3, H, W) in [-1, 1], the range
    the VAE and the diffusion models expect. ``exclude`` removes (color, shape) pairs, to test
    whether a model composes pairs it never saw. ``shapes`` may name the ``NEW_SHAPES`` too:
    ``ShapesDataset(12, shapes=("bar",))`` is chapter 09's handful of images of a new concept.
    """

    def __init__(self, num_samples: int = 1000, image_size: int = 32, seed: int = 0,
                 colors=tuple(COLORS), shapes=SHAPES, exclude: tuple[tuple[str, str], ...] = ()):
        num_samples = as_int(num_samples, "num_samples", minimum=0)
        image_size = as_int(image_size, "image_size")
        unknown = [shape for shape in shapes if shape not in SHAPES + NEW_SHAPES]
        if unknown or not shapes:
            raise ValueError(f"shapes={tuple(shapes)!r}: use one or more of {SHAPES + NEW_SHAPES}.")
        if image_size < 8:
            raise ValueError(f"image_size={image_size} is too small to draw a shape; use 8 or more (32 is the default).")
        allowed = [(c, s) for c in colors for s in shapes if (c, s) not in set(exclude)]
        if not allowed:
            raise ValueError("every (color, shape) pair is excluded; nothing is left to draw.")
        self.image_size = image_size
        self.specs: list[Shape] = []
        self.jitters: list[tuple[float, float]] = []
        for i in range(num_samples):
            rng = np.random.default_rng([seed, i])
            color, shape = allowed[rng.integers(len(allowed))]
            size = list(SIZES)[rng.integers(len(SIZES))]
            position = list(POSITIONS)[rng.integers(len(POSITIONS))]
            self.specs.append(Shape(color, shape, size, position))
            self.jitters.append(tuple(rng.uniform(-0.04, 0.04, size=2)))

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        pixels = render(self.specs[index], self.image_size, self.jitters[index])  # (H, W, 3) uint8
        image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W) in [-1, 1]
        return image, self.specs[index].caption

    def captions(self) -> list[str]:
        return [spec.caption for spec in self.specs]

    def tensors(self) -> torch.Tensor:
        """All images at once, (N, 3, H, W) in [-1, 1]."""
        return torch.stack([self[i][0] for i in range(len(self))])


def dominant_color(image: torch.Tensor) -> str:
    """The named color closest to the pixels that differ most from the background.

    image: (3, H, W) in [-1, 1]. Used to check whether a generated image has the color its
    caption asked for.
    """
    pixels = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).reshape(3, -1).T  # (H*W, 3)
    distance_to_background = (pixels - torch.tensor(BACKGROUND, dtype=torch.float32)).norm(dim=1)
    foreground = pixels[distance_to_background >= 0.7 * distance_to_background.max()]  # the shape's core
    mean = foreground.mean(dim=0)
    names = list(COLORS)
    palette = torch.tensor([COLORS[n] for n in names], dtype=torch.float32)
    return names[int((palette - mean).norm(dim=1).argmin())]


def load_photo(name: str = "grace_hopper", size: int | None = 256) -> torch.Tensor:
    """A sample photo that ships with an installed package, as (3, H, W) in [-1, 1].

    ``grace_hopper`` is matplotlib's 512x600 portrait (centre-cropped to a square); ``size``
    resizes it (None keeps the crop's full resolution).
    """
    from PIL import Image

    if name != "grace_hopper":
        raise ValueError(f"photo {name!r} is not bundled; use 'grace_hopper'.")
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as file:
        photo = Image.open(file).convert("RGB")
    side = min(photo.size)
    left, top = (photo.width - side) // 2, (photo.height - side) // 2
    photo = photo.crop((left, top, left + side, top + side))
    if size is not None:
        photo = photo.resize((size, size), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(photo).copy())  # (H, W, 3) uint8
    return pixels.permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W)


# --- 2-D toy distributions (chapter 01) -----------------------------------------------------

TOY_DISTRIBUTIONS = ("spiral", "ring")


def toy_2d(num_samples: int, name: str = "spiral", generator: torch.Generator | None = None) -> torch.Tensor:
    """Samples (N, 2) of a 2-D distribution with structure a model must learn, scaled to about [-2, 2].

    * ``spiral``: points along a spiral arm of one and a half turns, with a little noise;
    * ``ring``: a mixture of 8 Gaussians on a circle (the classic test of mode coverage).
    """
    if name == "spiral":
        radius_fraction = torch.rand(num_samples, generator=generator).sqrt()  # denser arm towards the rim
        angle = radius_fraction * 3 * torch.pi
        radius = 0.4 + 1.6 * radius_fraction
        points = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)  # (N, 2)
        return points + 0.06 * torch.randn(num_samples, 2, generator=generator)
    if name == "ring":
        mode = torch.randint(0, 8, (num_samples,), generator=generator)
        angle = mode * (2 * torch.pi / 8)
        centres = 1.8 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)  # (N, 2)
        return centres + 0.1 * torch.randn(num_samples, 2, generator=generator)
    raise ValueError(f"toy distribution {name!r} is not known; use one of {TOY_DISTRIBUTIONS}.")


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, num_projections: int = 256, seed: int = 0) -> float:
    """A distance between two equal-size sample clouds (N, D): the 1-Wasserstein distance averaged
    over random 1-D projections, where it is just the mean gap between sorted values.

    Zero for identical clouds; about the noise floor of N samples for two draws of one distribution.
    """
    if a.shape != b.shape:
        raise ValueError(f"the two sample sets must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(a.shape[1], num_projections, generator=generator)
    directions = directions / directions.norm(dim=0, keepdim=True)  # (D, P) unit vectors
    projected_a = (a.float().cpu() @ directions).sort(dim=0).values  # (N, P)
    projected_b = (b.float().cpu() @ directions).sort(dim=0).values
    return float((projected_a - projected_b).abs().mean())
