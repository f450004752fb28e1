"""Checkers for chapter 00's exercises: the latent's shape, the attention weights' memory, trainable parameters."""
from __future__ import annotations

from typing import Callable

import torch

from .base import CheckResult, compare_values


def reference_latent_shape(batch: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The SD latent of a batch of images: (B, 4, H / 8, W / 8)."""
    if height % 8 or width % 8:
        raise ValueError(f"height and width must be multiples of 8, got {height}x{width}")
    return (batch, 4, height // 8, width // 8)


def check_latent_shape(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 00): ``latent_shape(batch, height, width)`` -> the tuple (B, 4, H/8, W/8) of the
    latents Stable Diffusion's U-Net sees for B images of H x W pixels."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [(1, 512, 512), (2, 768, 512), (4, 512, 1024)]
    sizes += [(int(torch.randint(1, 9, (), generator=generator)), 8 * int(torch.randint(8, 160, (), generator=generator)),
               8 * int(torch.randint(8, 160, (), generator=generator)))]
    cases = [dict(batch=b, height=h, width=w) for b, h, w in sizes]
    mistakes = {
        "height and width swapped: PyTorch images are (B, C, H, W), height before width":
            lambda batch, height, width: (batch, 4, width // 8, height // 8),
        "3 channels: the image has 3, SD's latent has 4": lambda batch, height, width: (batch, 3, height // 8, width // 8),
        "channels last (B, H/8, W/8, 4): PyTorch puts the channels second":
            lambda batch, height, width: (batch, height // 8, width // 8, 4),
        "the sides divided by 64 (the area's factor) instead of 8 (the side's factor f)":
            lambda batch, height, width: (batch, 4, height // 64, width // 64),
    }
    return compare_values("latent_shape", learner, reference_latent_shape, cases, mistakes, seed=seed)


def reference_attention_bytes(height: int, width: int, heads: int, bytes_per_value: int) -> int:
    """Bytes of the attention weights of one self-attention layer at the U-Net's finest level, for one image:
    heads · N² with N = (H/8)·(W/8) latent positions."""
    tokens = (height // 8) * (width // 8)
    return heads * tokens**2 * bytes_per_value


def check_attention_bytes(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 00): ``attention_bytes(height, width, heads, bytes_per_value)``, the memory of the
    attention weights (every query against every key, for every head) of one self-attention layer at the
    finest latent level, for one H x W image."""
    generator = torch.Generator().manual_seed(seed)
    cases = [dict(height=512, width=512, heads=8, bytes_per_value=2), dict(height=768, width=512, heads=5, bytes_per_value=4),
             dict(height=8 * int(torch.randint(8, 128, (), generator=generator)),
                  width=8 * int(torch.randint(8, 128, (), generator=generator)),
                  heads=int(torch.randint(1, 17, (), generator=generator)), bytes_per_value=2)]
    mistakes = {
        "N not squared: every one of the N queries has a weight for each of the N keys":
            lambda height, width, heads, bytes_per_value: heads * (height // 8) * (width // 8) * bytes_per_value,
        "pixels used as tokens: the U-Net attends over latent positions, (H/8)·(W/8)":
            lambda height, width, heads, bytes_per_value: heads * (height * width) ** 2 * bytes_per_value,
        "the heads left out: each head has its own N x N weights":
            lambda height, width, heads, bytes_per_value: reference_attention_bytes(height, width, 1, bytes_per_value),
        "the number of values, not bytes: multiply by bytes_per_value":
            lambda height, width, heads, bytes_per_value: reference_attention_bytes(height, width, heads, 1),
    }
    return compare_values("attention_bytes", learner, reference_attention_bytes, cases, mistakes, seed=seed)


def reference_trainable_parameters(model: torch.nn.Module) -> int:
    """The number of parameters an optimiser would update: those with requires_grad, a shared one once."""
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def _models(generator: torch.Generator) -> list[torch.nn.Module]:
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=generator)))
    width = int(torch.randint(3, 12, (), generator=generator))
    frozen_encoder = torch.nn.Sequential(torch.nn.Conv2d(3, width, 3), torch.nn.BatchNorm2d(width), torch.nn.SiLU())
    frozen_encoder.requires_grad_(False)  # as the VAE and the text encoder are while the U-Net trains
    head = torch.nn.Linear(width, 10)
    with_frozen = torch.nn.Sequential(frozen_encoder, head)  # counted, never run
    embedding = torch.nn.Embedding(50, width)
    output = torch.nn.Linear(width, 50, bias=False)
    output.weight = embedding.weight  # tied weights, as GPT-2's and many text models' are
    tied = torch.nn.ModuleDict(dict(embedding=embedding, norm=torch.nn.LayerNorm(width), output=output))
    tied.norm.requires_grad_(False)
    return [with_frozen, tied, torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.GroupNorm(1, width))]


def check_trainable_parameters(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 00): ``trainable_parameters(model)`` -> the number (an int) of parameters that
    training would update: those with ``requires_grad``, a parameter shared by two layers counted once."""
    cases = [dict(model=model) for model in _models(torch.Generator().manual_seed(seed))]
    mistakes = {
        "the frozen parameters counted too: keep only those with requires_grad":
            lambda model: sum(p.numel() for p in model.parameters()),
        "the tied weight counted twice (named_parameters(remove_duplicate=False) or state_dict())":
            lambda model: sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False) if p.requires_grad),
        "buffers counted as parameters (BatchNorm's running statistics are not trained)":
            lambda model: reference_trainable_parameters(model) + sum(
                b.numel() for b in model.buffers() if b.is_floating_point()),
    }
    return compare_values("trainable_parameters", learner, reference_trainable_parameters, cases, mistakes, seed=seed)
