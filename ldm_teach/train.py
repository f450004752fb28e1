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


def train_vae(vae: torch.nn.Module, images: torch.Tensor, steps: int = 1000, batch_size: int = 16,
              learning_rate: float = 2e-3, kl_weight: float = 1e-6, kind: str = "l1",
              discriminator: torch.nn.Module | None = None, adversarial_start: int = 0,
              perceptual: torch.nn.Module | None = None, perceptual_weight: float = 1.0,
              seed: int = 0, progress: bool = True, description: str = "training the VAE") -> dict[str, list[float]]:
    """Fit an ``AutoencoderKL`` to ``images`` (N, 3, H, W) in [-1, 1]; return the loss history.

    Each step draws a random batch (seeded), encodes it, samples z from the posterior, decodes
    it and takes an AdamW step on ``vae_loss``: the reconstruction (``kind``: "l1" as in LDM,
    or "l2") plus ``kl_weight`` times the KL; with ``perceptual`` (``perceptual.load_lpips()``)
    the LPIPS term joins the reconstruction. With a ``PatchDiscriminator`` the adaptively
    weighted adversarial term joins from step ``adversarial_start`` on, and the discriminator
    trains on the hinge loss in alternation (Chapter 02, section "Training the VAE").

    The history holds one value per step for each loss part: ``reconstruction`` (per image
    summed, as in the loss), ``kl``, ``pixel_error`` (mean |x - x̂| per value, which is
    comparable across image sizes), with ``perceptual`` the mean LPIPS distance, and with a
    discriminator ``adversarial`` and ``discriminator`` (NaN before the adversarial phase).
    """
    from .vae import discriminator_hinge_loss, vae_loss

    device = next(vae.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    if discriminator is not None:
        discriminator_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=learning_rate, betas=(0.5, 0.9))
    history: dict[str, list[float]] = {"reconstruction": [], "kl": [], "pixel_error": []}
    if perceptual is not None:
        history["perceptual"] = []
    if discriminator is not None:
        history.update(adversarial=[], discriminator=[])
    vae.train()
    bar = tqdm(range(steps), desc=description, disable=not progress)
    for step in bar:
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        x = images[index].to(device)  # (B, 3, H, W)
        reconstruction, posterior = vae(x, generator=generator)
        adversarial_phase = discriminator is not None and step >= adversarial_start
        logits_fake = discriminator(reconstruction) if adversarial_phase else None
        last_layer = vae.decoder.conv_out.weight if adversarial_phase else None
        loss, parts = vae_loss(x, reconstruction, posterior, logits_fake, last_layer, kl_weight=kl_weight, kind=kind,
                               perceptual=perceptual, perceptual_weight=perceptual_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        history["reconstruction"].append(parts["reconstruction"].item())
        history["kl"].append(parts["kl"].item())
        history["pixel_error"].append((x - reconstruction.detach()).abs().mean().item())
        if perceptual is not None:
            history["perceptual"].append(parts["perceptual"].item())
        if discriminator is not None:
            if adversarial_phase:
                logits_real, logits_fake = discriminator(x), discriminator(reconstruction.detach())
                discriminator_loss = discriminator_hinge_loss(logits_real, logits_fake)
                discriminator_optimizer.zero_grad(set_to_none=True)
                discriminator_loss.backward()
                discriminator_optimizer.step()
                history["adversarial"].append(parts["adversarial"].item())
                history["discriminator"].append(discriminator_loss.item())
            else:
                history["adversarial"].append(float("nan"))
                history["discriminator"].append(float("nan"))
        if step % 20 == 0 or step == steps - 1:
            recent = history["pixel_error"][-20:]
            bar.set_postfix(pixel_error=f"{sum(recent) / len(recent):.4f}", kl=f"{history['kl'][-1]:.0f}")
    vae.eval()
    return history


# --- chapter 03: CLIP ------------------------------------------------------------------------


def train_clip(model: torch.nn.Module, images: torch.Tensor, captions: list[str], tokenizer,
               steps: int = 600, batch_size: int = 64, learning_rate: float = 1e-3, seed: int = 0,
               progress: bool = True) -> list[float]:
    """Train a ``clip.CLIP`` with the symmetric contrastive loss on (image, caption) pairs; return each step's loss.

    images (N, 3, H, W) and their N captions; each step draws a batch of pairs (a fresh random
    order every epoch) and asks every caption to pick its own image out of the batch, and every
    image its caption. The captions are tokenized once and cut after the longest one's end token:
    the text encoder's mask is causal, so the padding after an end token never changes the
    feature CLIP pools there, and 77 columns would only cost time. As in CLIP, the learnt
    inverse temperature (the logit scale) is capped at 100, and the learning rate warms up, then decays on a cosine.
    """
    import math

    from .clip import contrastive_loss

    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions; pass one caption per image.")
    if not 2 <= batch_size <= len(images):
        raise ValueError(f"batch_size={batch_size} must lie between 2 and the number of pairs, {len(images)}.")
    device = next(model.parameters()).device
    ids = tokenizer(list(captions))  # (N, 77)
    length = int((ids == tokenizer.end_id).int().argmax(dim=1).max()) + 1
    ids, images = ids[:, :length].to(device), images.to(device)  # (N, length), (N, 3, H, W)
    generator = torch.Generator().manual_seed(seed)
    # The fused AdamW is several times faster on CPU; most of the tiny model's weights are its
    # token embeddings (49,408 rows), and the optimiser touches them all at each step.
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0,
                                  fused=device.type in ("cpu", "cuda"))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # a linear warm-up over 5% of the steps, then a cosine decay
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps)))
    losses, order = [], torch.empty(0, dtype=torch.long)
    model.train()
    bar = tqdm(range(steps), desc="training CLIP", disable=not progress)
    for step in bar:
        if len(order) < batch_size:  # a new epoch: a new random order of the pairs
            order = torch.randperm(len(images), generator=generator)
        batch, order = order[:batch_size].to(device), order[batch_size:]
        loss = contrastive_loss(model(ids[batch], images[batch]))  # logits (B, B)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(max=math.log(100))
        losses.append(loss.item())
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}",
                            temperature=f"{1 / model.logit_scale.exp().item():.3f}")
    model.eval()
    return losses
