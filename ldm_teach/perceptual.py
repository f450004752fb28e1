"""LPIPS, the perceptual loss LDM trains its autoencoder with (chapter 02, "Training the VAE").

Two images can be far apart pixel by pixel and look the same (a one-pixel shift), or close
pixel by pixel and look different (a blur). LPIPS (Zhang et al., 2018, "The Unreasonable
Effectiveness of Deep Features as a Perceptual Metric") measures the distance in the feature
maps of an image classifier instead, which respond to edges and texture the way people do:

1. shift and scale the images (in [-1, 1]) to the statistics the classifier was trained on;
2. run both through VGG16's convolutional layers and keep five feature maps, after the last
   ReLU of each resolution (``relu1_2`` ... ``relu5_3``);
3. scale each pixel's feature vector to unit length, take the squared difference, weight its
   channels by a learned non-negative vector (fit to human judgements of which of two
   distortions looks closer to the original), and average over the pixels;
4. add the five layers' values: one number per image pair, 0 for identical images.

Two sets of weights make it work, and ldm_teach ships only the small one: the five channel
weight vectors (1,472 numbers, from the ``lpips`` package, BSD licence, in ``assets/``). VGG16's
ImageNet weights (528 MB) are downloaded from PyTorch's model store on first use, which works in
Colab; where there is no network, ``load_lpips`` says how to get them. The module names follow
torchvision's ``vgg16().features`` so its weights load unchanged, and the result matches the
``lpips`` package's ``LPIPS(net="vgg")`` (``benchmarks/check_lpips.py``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_LINEAR_WEIGHTS = Path(__file__).parent / "assets" / "lpips_vgg_v0.1.safetensors"
# VGG16's convolutional part: 3x3 conv widths, "M" for a 2x2 max-pool halving the resolution.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# The ImageNet statistics of the inputs VGG was trained on, as LPIPS writes them for images in [-1, 1].
INPUT_SHIFT = (-0.030, -0.088, -0.188)
INPUT_SCALE = (0.458, 0.448, 0.450)


class VGG16Features(nn.Module):
    """VGG16's 13 convolutions (torchvision's ``vgg16().features``, module for module) and five taps.

    ``forward`` returns the feature maps after the last ReLU at each of the five resolutions:
    (B, 64, H, W), (B, 128, H/2, W/2), (B, 256, H/4, W/4), (B, 512, H/8, W/8), (B, 512, H/16, W/16).
    """

    def __init__(self):
        super().__init__()
        layers, taps, channels = [], [], 3
        for item in VGG16_LAYOUT:
            if item == "M":
                taps.append(len(layers) - 1)  # the ReLU just before each pool
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers)
        self.taps = (*taps, len(layers) - 1)  # (3, 8, 15, 22, 29): relu1_2 ... relu5_3

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for index, layer in enumerate(self.features[:self.taps[-1] + 1]):
            x = layer(x)
            if index in self.taps:
                outputs.append(x)
        return outputs


def unit_length(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Each pixel's feature vector divided by its length: (B, C, H, W) -> (B, C, H, W)."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """The LPIPS distance d(x, y) >= 0 between images in [-1, 1], one value per pair: (B,).

    Frozen: its weights never train, but gradients flow through it to the images, which is
    what a loss needs.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor(INPUT_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(INPUT_SCALE).view(1, 3, 1, 1))
        self.vgg = VGG16Features()
        widths = [item for i, item in enumerate(VGG16_LAYOUT) if item != "M" and
                  (i + 1 == len(VGG16_LAYOUT) or VGG16_LAYOUT[i + 1] == "M")]  # (64, 128, 256, 512, 512)
        self.linear = nn.ModuleList(nn.Conv2d(width, 1, 1, bias=False) for width in widths)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.shape[1] != 3:
            raise ValueError(f"LPIPS compares two RGB batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}.")
        features_x = self.vgg((x - self.shift) / self.scale)
        features_y = self.vgg((y - self.shift) / self.scale)
        distance = 0
        for linear, fx, fy in zip(self.linear, features_x, features_y):
            squared = (unit_length(fx) - unit_length(fy)) ** 2  # (B, C, h, w)
            distance = distance + linear(squared).mean(dim=(1, 2, 3))  # weighted over C, averaged over pixels: (B,)
        return distance


def lpips_state_dict(vgg_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LPIPS's weights: torchvision's VGG16 ``features.*`` (its classifier is dropped) and the bundled linear layers."""
    linear = load_file(LPIPS_LINEAR_WEIGHTS)  # lin0.model.1.weight ... lin4.model.1.weight, (1, C, 1, 1) each
    state = {f"vgg.{k}": v for k, v in vgg_weights.items() if k.startswith("features.")}
    state.update({f"linear.{i}.weight": linear[f"lin{i}.model.1.weight"] for i in range(5)})
    state.update(shift=torch.tensor(INPUT_SHIFT).view(1, 3, 1, 1), scale=torch.tensor(INPUT_SCALE).view(1, 3, 1, 1))
    return state


def load_lpips(vgg_weights: str | os.PathLike | None = None, device: str | torch.device | None = None) -> LPIPS:
    """LPIPS with VGG16's ImageNet weights: from ``vgg_weights`` (a local ``vgg16-397923af.pth``) or downloaded.

    The download (528 MB, once, into torch's hub cache) needs the network. The file is a plain
    state dict, read with ``torch.load(weights_only=True)``.
    """
    from .files import read_checkpoint
    from .pretrained import load_state_dict_strict

    if vgg_weights is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(VGG16_URL).name
        if not cached.is_file():
            cached.parent.mkdir(parents=True, exist_ok=True)
            try:  # torch writes to a temporary file and renames it: an interrupted download leaves nothing
                torch.hub.download_url_to_file(VGG16_URL, str(cached), progress=True)
            except OSError as error:  # urllib's URLError is an OSError: offline, or the store unreachable
                raise OSError(
                    f"could not download VGG16's weights from {VGG16_URL} ({error}). LPIPS needs them; on a machine "
                    "with network access download that file and pass its path: "
                    "load_lpips(vgg_weights='vgg16-397923af.pth')."
                ) from error
        vgg_weights = cached
    weights = read_checkpoint(vgg_weights)  # a damaged file: an error naming it; a pickle of objects: refused
    with torch.device("meta"):
        model = LPIPS()
    model = load_state_dict_strict(model, lpips_state_dict(weights), "VGG16 / LPIPS")
    return model.requires_grad_(False).eval().to(device)
