"""Training loops, with progress bars.

Chapter 01 trains the toy denoiser here; the training chapter (05) adds the latent diffusion loop.
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from . import diffusion


def train_toy_denoiser(model: torch.nn.Module, sample_data: Callable[[int, torch.Generator], torch.Tensor],
                       alphas_cumprod: torch.Tensor, steps: int = 3000, batch_size: int = 512,
                       learning_rate: float = 2e-3, seed: int = 0, progress: bool = True) -> list[float]:
    """Fit ε_θ with the DDPM objective on fresh samples each step; return the loss of every step.

    ``sample_data(n, generator)`` draws n training points. The learning rate decays to zero on a
    cosine, which settles the loss for the figures.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    losses = []
    bar = tqdm(range(steps), desc="training", disable=not progress)
    for step in bar:
        x0 = sample_data(batch_size, generator)
        loss = diffusion.diffusion_loss(model, x0, alphas_cumprod, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 100 == 0:
            bar.set_postfix(loss=f"{sum(losses[-100:]) / len(losses[-100:]):.4f}")
    return losses


# --- chapter 02: the VAE ---------------------------------------------------------------------


# --- chapter 03: CLIP ------------------------------------------------------------------------
