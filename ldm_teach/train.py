"""Training loops, with progress bars.

Chapter 01 trains the toy denoiser here, chapter 02 the VAE, chapter 03 CLIP, and chapter 05 the
latent diffusion model: caption dropout, the EMA of the weights, the frozen encoders' outputs
computed once, and ``LatentDiffusionTrainer`` with checkpoints that resume a run exactly. A
checkpoint is written whole or not at all, and one of another run, or a damaged one, is refused
before it changes anything.
"""
from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
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


# --- chapter 05: latent diffusion ------------------------------------------------------------


def caption_dropout(context: torch.Tensor, empty_context: torch.Tensor, probability: float,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each caption's context by the empty prompt's with the given probability.

    context (B, L, D), empty_context (L, D): the text encoder's output for ``""``. One uniform
    draw per caption, on the generator's device (the CPU for a CPU generator); a caption is dropped
    where the draw falls below ``probability``. Training on some empty prompts teaches the same
    network the unconditional prediction that classifier-free guidance subtracts (Chapter 05,
    section "Caption dropout"). The empty prompt's features, not zeros: at sampling time the
    pipeline feeds exactly those features as the unconditional input.
    """
    if not 0 <= probability <= 1:
        raise ValueError(f"probability={probability} must lie in [0, 1]; SD used 0.1.")
    if context.ndim != 3 or tuple(empty_context.shape) != tuple(context.shape[1:]):
        raise ValueError(f"context {tuple(context.shape)} must be (B, L, D) and empty_context (L, D), "
                         f"got {tuple(empty_context.shape)}; encode the empty prompt with the same text encoder.")
    drop = torch.rand(context.shape[0], generator=generator) < probability  # (B,)
    return torch.where(drop.to(context.device)[:, None, None], empty_context.to(context.dtype), context)  # (B, L, D)


@torch.no_grad()
def ema_update(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """Move every weight of ``ema_model`` a step towards ``model``'s: ema ← decay·ema + (1 - decay)·weight.

    The exponential moving average smooths out the noise of single optimiser steps; diffusion
    models are sampled from it rather than from the last weights (Chapter 05, section "An average
    of the weights").
    Buffers, which the optimiser does not train, are copied.
    """
    for ema_parameter, parameter in zip(ema_model.parameters(), model.parameters(), strict=True):
        ema_parameter.lerp_(parameter.detach(), 1 - decay)
    for ema_buffer, buffer in zip(ema_model.buffers(), model.buffers(), strict=True):
        ema_buffer.copy_(buffer)


@dataclass
class DiffusionData:
    """What the diffusion loop trains on, computed once because the VAE and text encoder are frozen.

    ``latents_mean`` and ``latents_std`` (N, C, h, w) are the VAE posterior's moments times the
    scaling factor; each step draws a fresh sample mean + std·ε, as training on
    ``vae.encode(x).sample()`` would, without running the encoder again. In pixel space
    ``latents_mean`` holds the images and ``latents_std`` is None. ``contexts`` (U, L, D) holds
    the text encoder's output for each of the U distinct captions, ``caption_index`` (N,) the row
    of each image's caption, and ``empty_context`` (L, D) the output for ``""``.

    For an SDXL-style U-Net (``addition_embed_type="text_time"``, Chapter 08) ``time_ids`` (N, K)
    holds each image's size numbers (original size, crop corner, target size), and ``pooled``
    (U, P) and ``empty_pooled`` (P,) the pooled prompt vectors that go with ``contexts`` and
    ``empty_context``; all three are None for SD 1.x / 2.x U-Nets.
    """

    latents_mean: torch.Tensor
    latents_std: torch.Tensor | None
    contexts: torch.Tensor
    caption_index: torch.Tensor
    empty_context: torch.Tensor
    time_ids: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    empty_pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.latents_mean)


@torch.no_grad()
def prepare_diffusion_data(images: torch.Tensor, captions: list[str], text_encoder: torch.nn.Module, tokenizer,
                           vae: torch.nn.Module | None = None, batch_size: int = 256,
                           time_ids: torch.Tensor | None = None) -> DiffusionData:
    """Encode images (N, 3, H, W) in [-1, 1] with the frozen VAE (None: stay in pixel space) and the
    distinct captions with the frozen text encoder, once, for ``LatentDiffusionTrainer`` (Chapter 05,
    section "The frozen parts").

    With ``time_ids`` (N, K), the size numbers of each image, the data is for an SDXL-style U-Net
    (Chapter 08, "Micro-conditioning"): the captions' pooled vectors are kept too (``pooled_prompt``).
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions; pass one caption per image.")
    if time_ids is not None and (time_ids.ndim != 2 or len(time_ids) != len(images)):
        raise ValueError(f"time_ids has shape {tuple(time_ids.shape)}; pass (N, K) with one row per image "
                         f"(N = {len(images)}), e.g. K = 6 numbers from unet_sdxl.micro_conditioning.")
    distinct = sorted(set(captions))
    row = {caption: i for i, caption in enumerate(distinct)}
    encoder_device = next(text_encoder.parameters()).device
    chunks = [tokenizer(distinct[i:i + batch_size]).to(encoder_device) for i in range(0, len(distinct), batch_size)]
    empty_ids = tokenizer([""]).to(encoder_device)  # (1, 77)
    contexts = torch.cat([text_encoder(ids).float().cpu() for ids in chunks])  # (U, 77, D)
    empty_context = text_encoder(empty_ids)[0].float().cpu()  # (77, D)
    pooled = empty_pooled = None
    if time_ids is not None:
        pooled = torch.cat([pooled_prompt(text_encoder, ids).float().cpu() for ids in chunks])  # (U, P)
        empty_pooled = pooled_prompt(text_encoder, empty_ids)[0].float().cpu()  # (P,)
        time_ids = time_ids.float().cpu()
    if vae is None:
        means, stds = images.float(), None
    else:
        vae_device = next(vae.parameters()).device
        posteriors = [vae.encode(images[i:i + batch_size].to(vae_device)) for i in range(0, len(images), batch_size)]
        means = torch.cat([p.mean.float().cpu() for p in posteriors]) * vae.scaling_factor  # (N, C, h, w)
        stds = torch.cat([p.std.float().cpu() for p in posteriors]) * vae.scaling_factor
    return DiffusionData(means, stds, contexts, torch.tensor([row[c] for c in captions]), empty_context,
                         time_ids, pooled, empty_pooled)


def pooled_prompt(text_encoder: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """ids (B, 77) -> the prompt as one vector (B, P), SDXL's ``text_embeds``: the end token's feature,
    projected where the encoder has a projection (SDXL's second encoder), as it is (the tiny encoder)."""
    output = text_encoder.encode(ids)
    return output.pooler_output if output.text_embeds is None else output.text_embeds


class PixelSpace(torch.nn.Module):
    """The identity in the VAE's place, so that a diffusion model on pixels runs through the same
    trainer and pipeline as one on latents (Chapter 05, section "Pixel space against latent space").

    ``decode`` returns its input; the config says 3 "latent" channels, f = 1 and a scaling factor
    of 1. It has no weights; one empty parameter carries the device and dtype, as a pipeline
    expects of its models.
    """

    def __init__(self, channels: int = 3):
        from types import SimpleNamespace

        super().__init__()
        self.config = SimpleNamespace(latent_channels=channels, downsample_factor=1, scaling_factor=1.0)
        self.placement = torch.nn.Parameter(torch.empty(0), requires_grad=False)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


@dataclass
class DiffusionTrainingConfig:
    """The settings of one latent diffusion training run (Chapter 05, section "The loop").

    The noise schedule keys are diffusers' (SD's ``scaled_linear`` from 0.00085 to 0.012 by
    default). The learning rate warms up linearly over ``warmup_steps``, then decays on a cosine
    to zero at ``steps``. ``ema_decay`` is the EMA's decay, warmed up as diffusers' ``EMAModel``
    warms it up (``ema_decay_at``), so that the early average is not stuck at the random
    initialisation. ``mixed_precision``
    None means on for CUDA (bfloat16 where the GPU has it, float16 with loss scaling otherwise).
    """

    steps: int = 3000
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    caption_dropout: float = 0.1
    prediction_type: str = "epsilon"
    ema_decay: float = 0.999
    max_grad_norm: float = 1.0
    mixed_precision: bool | None = None
    seed: int = 0
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012

    def __post_init__(self):
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type={self.prediction_type!r} is not known; use 'epsilon' or 'v_prediction'.")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1.")

    def scheduler_config(self) -> dict:
        """The keys a scheduler needs to sample from the trained model, in diffusers' names."""
        return dict(num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule,
                    beta_start=self.beta_start, beta_end=self.beta_end, prediction_type=self.prediction_type)

    def ema_decay_at(self, step: int) -> float:
        """The EMA's decay at the update after step ``step`` (counted from 0), as diffusers' ``EMAModel``
        computes it: 0 at the first update (the average starts as a copy), then
        min(ema_decay, (1 + step) / (10 + step))."""
        return 0.0 if step == 0 else min(self.ema_decay, (1 + step) / (10 + step))

    def learning_rate_at(self, step: int) -> float:
        warmup = min(1.0, (step + 1) / max(1, self.warmup_steps))
        return self.learning_rate * warmup * 0.5 * (1 + math.cos(math.pi * min(step, self.steps) / self.steps))


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Have ``write(temporary)`` write a temporary file beside ``path``, then move it onto ``path`` in one
    step (``os.replace``). An error or an interruption on the way (a full disk, a stopped kernel) leaves
    whatever was at ``path`` as it was and no half-written file behind."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(descriptor)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class MissingField:
    """Stands for a field that one of two compared records lacks."""

    def __repr__(self) -> str:
        return "missing"


def compare_records(saved, current, prefix: str = "") -> dict[str, tuple]:
    """Where two JSON records (nested dicts) differ: ``{dotted field: (saved value, current value)}``,
    e.g. ``{"vae.config.scaling_factor": (0.93, 1.12)}``; a field one side lacks is a ``MissingField`` there.
    Values are compared as JSON text, so that 1, 1.0 and true differ."""
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        same = json.dumps(saved, sort_keys=True) == json.dumps(current, sort_keys=True)
        return {} if same else {prefix.rstrip(".") or "the whole record": (saved, current)}
    differences = {}
    for key in sorted(set(saved) | set(current)):
        if key in saved and key in current:
            differences.update(compare_records(saved[key], current[key], f"{prefix}{key}."))
        else:
            differences[prefix + key] = (saved.get(key, MissingField()), current.get(key, MissingField()))
    return differences


def describe_differences(differences: dict[str, tuple], sides: tuple[str, str] = ("saved", "now"),
                         limit: int = 8) -> str:
    """``compare_records``'s result in words: "budget.steps (saved 3, now 4); seed (saved 0, now 1)"."""
    def short(value):
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."

    described = [f"{field} ({sides[0]} {short(saved)}, {sides[1]} {short(current)})"
                 for field, (saved, current) in list(differences.items())[:limit]]
    more = f"; and {len(differences) - limit} more" if len(differences) > limit else ""
    return "; ".join(described) + more


class LatentDiffusionTrainer:
    """The LDM training loop, one step at a time, with checkpoints that resume the same run.

    Each step (Chapter 05, section "The loop"): draw a batch of latents and their
    captions, drop some captions to the empty prompt, add noise at uniformly drawn timesteps
    (``diffusion.diffusion_loss``), regress the U-Net's output on the noise (or on v) with an MSE,
    take a clipped AdamW step and update the EMA. All randomness comes from one CPU generator
    seeded with ``config.seed``, so on the CPU a seed fixes the loss curve, and a checkpoint
    (weights, EMA, optimiser state, step, generator state, losses) continues it bit for bit.

    ``provenance`` (a JSON record) names what else the run depends on, which the config does not
    hold: for the zoo's U-Net, the frozen VAE and text encoder that made ``data``. Every checkpoint
    keeps it, and ``load`` refuses a checkpoint whose provenance differs, so a run is never
    continued on latents of another VAE.
    """

    FORMAT = "ldm_teach.LatentDiffusionTrainer/1"
    ADAMW_STATE = ("exp_avg", "exp_avg_sq", "step")  # what AdamW keeps per parameter

    def __init__(self, unet: torch.nn.Module, data: DiffusionData, config: DiffusionTrainingConfig | None = None,
                 provenance: dict | None = None):
        from .schedulers import DDPMScheduler

        self.config = config = config or DiffusionTrainingConfig()
        self.provenance = json.loads(json.dumps(provenance or {}))  # as a checkpoint holds it: tuples become lists
        self.unet, self.data = unet, data
        if data.latents_mean.shape[1] != unet.config.in_channels:
            raise ValueError(f"the data has {data.latents_mean.shape[1]} channels but the U-Net takes "
                             f"{unet.config.in_channels} (unet.config.in_channels); build the U-Net for this data.")
        sdxl = unet.config.addition_embed_type == "text_time"
        if sdxl != (data.time_ids is not None):
            raise ValueError(f"the U-Net's addition_embed_type is {unet.config.addition_embed_type!r} "
                             f"but the data's time_ids are {'missing' if sdxl else 'given'}; an SDXL-style U-Net "
                             "('text_time') needs prepare_diffusion_data(..., time_ids=...), any other none.")
        self.device = device = next(unet.parameters()).device
        self.ema = copy.deepcopy(unet).requires_grad_(False)
        self.alphas_cumprod = DDPMScheduler(**config.scheduler_config()).alphas_cumprod  # ᾱ_t, (T,)
        self.optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
                                           fused=device.type in ("cpu", "cuda"))
        mixed = config.mixed_precision if config.mixed_precision is not None else device.type == "cuda"
        if mixed and device.type != "cuda":
            raise ValueError(f"mixed_precision=True needs a CUDA GPU, but the U-Net is on {device}; "
                             "leave mixed_precision=None (on for CUDA only).")
        bfloat16 = mixed and torch.cuda.get_device_capability(device)[0] >= 8
        self.autocast_dtype = (torch.bfloat16 if bfloat16 else torch.float16) if mixed else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast_dtype == torch.float16)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step, self.losses, self.seconds = 0, [], []

    def training_step(self) -> float:
        """One optimiser step on a fresh batch; returns its loss."""
        config, data, generator = self.config, self.data, self.generator
        index = torch.randint(0, len(data), (config.batch_size,), generator=generator)
        latents = data.latents_mean[index]  # (B, C, h, w)
        if data.latents_std is not None:  # a fresh draw from the VAE posterior
            latents = latents + data.latents_std[index] * torch.randn(latents.shape, generator=generator)
        context = caption_dropout(data.contexts[data.caption_index[index]], data.empty_context,
                                  config.caption_dropout, generator)  # (B, 77, D)
        added_cond_kwargs = None if data.time_ids is None else self.added_conditioning(index, context)
        for group in self.optimizer.param_groups:
            group["lr"] = config.learning_rate_at(self.step)
        self.unet.train()
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            loss = diffusion.diffusion_loss(self.unet, latents.to(self.device), self.alphas_cumprod,
                                            context.to(self.device), prediction_type=config.prediction_type,
                                            generator=generator, added_cond_kwargs=added_cond_kwargs)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), config.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        ema_update(self.ema, self.unet, config.ema_decay_at(self.step))
        self.step += 1
        return loss.item()

    def added_conditioning(self, index: torch.Tensor, context: torch.Tensor) -> dict[str, torch.Tensor]:
        """An SDXL-style U-Net's ``added_cond_kwargs`` for the batch ``index`` (Chapter 08): the size numbers,
        and the pooled prompt, the empty prompt's where ``caption_dropout`` dropped the caption (its context
        is then the empty prompt's, row for row), so that guidance later has a true unconditional prediction."""
        data = self.data
        dropped = (context == data.empty_context).flatten(1).all(dim=1)  # (B,)
        pooled = torch.where(dropped[:, None], data.empty_pooled, data.pooled[data.caption_index[index]])  # (B, P)
        return {"text_embeds": pooled.to(self.device), "time_ids": data.time_ids[index].to(self.device)}

    def train(self, until: int | None = None, max_seconds: float | None = None,
              callback: Callable[["LatentDiffusionTrainer"], None] | None = None, callback_every: int = 500,
              checkpoint_path: str | os.PathLike | None = None, checkpoint_every: int = 500,
              progress: bool = True, description: str = "training the U-Net") -> list[float]:
        """Step until step ``until`` (default ``config.steps``) or for ``max_seconds``; return all losses.

        ``trainer.seconds`` records the time spent in training steps up to each step, so that
        runs can be compared at equal compute time; ``max_seconds`` counts the same time.

        ``callback(trainer)`` runs every ``callback_every`` steps and at the end (for a live loss
        curve or a grid of samples from ``trainer.ema``). With ``checkpoint_path`` the run is saved
        there every ``checkpoint_every`` steps, so an interrupted run can ``load`` it and go on.
        """
        until = self.config.steps if until is None else until
        if not self.step <= until <= self.config.steps:
            raise ValueError(f"until={until} must lie between the current step {self.step} and config.steps={self.config.steps}.")
        elapsed = self.seconds[-1] if self.seconds else 0.0  # seconds spent in steps, not in callbacks or saving
        budget_end = elapsed + max_seconds if max_seconds is not None else math.inf
        bar = tqdm(total=until, initial=self.step, desc=description, disable=not progress)
        while self.step < until and elapsed < budget_end:
            start = time.perf_counter()
            self.losses.append(self.training_step())
            elapsed += time.perf_counter() - start
            self.seconds.append(elapsed)
            bar.update(1)
            if self.step % 20 == 0 or self.step == until:
                recent = self.losses[-50:]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
            if checkpoint_path is not None and self.step % checkpoint_every == 0:
                self.save(checkpoint_path)
            if callback is not None and self.step % callback_every == 0 and self.step < until:
                callback(self)
        bar.close()
        self.unet.eval()
        if callback is not None:
            callback(self)
        return self.losses

    # --- checkpoints ---

    def save(self, path: str | os.PathLike) -> None:
        """Write everything the run needs to continue to one safetensors file, whole or not at all
        (``write_atomically``): an interrupted save leaves the previous checkpoint intact."""
        tensors = {f"unet.{k}": v for k, v in self.unet.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        optimizer_state = self.optimizer.state_dict()
        for index, state in optimizer_state["state"].items():
            tensors.update({f"optimizer.{index}.{key}": torch.as_tensor(value) for key, value in state.items()})
        tensors["generator_state"] = self.generator.get_state()
        tensors["losses"] = torch.tensor(self.losses, dtype=torch.float64)
        tensors["seconds"] = torch.tensor(self.seconds, dtype=torch.float64)
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        metadata = {"format": self.FORMAT, "step": str(self.step), "config": json.dumps(asdict(self.config)),
                    "provenance": json.dumps(self.provenance), "unet_config": json.dumps(asdict(self.unet.config)),
                    "optimizer_param_groups": json.dumps(optimizer_state["param_groups"]),
                    "grad_scaler": json.dumps(self.scaler.state_dict())}
        write_atomically(path, lambda temporary: save_file(tensors, temporary, metadata=metadata))

    def load(self, path: str | os.PathLike) -> "LatentDiffusionTrainer":
        """Continue the run saved in ``path``; refuse a checkpoint of another run or another model.

        Everything is checked before anything is changed: the config and provenance, the keys and
        shapes of the weights and the EMA, the optimiser's and the generator's state, the step and
        the record. A refused checkpoint (ValueError, or KeyError for the weights' keys) leaves the
        trainer as it was.
        """
        from .pretrained import load_state_dict_strict

        try:
            with safe_open(os.fspath(path), framework="pt") as file:
                metadata = file.metadata() or {}
                tensors = {key: file.get_tensor(key) for key in file.keys()}
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path} is not a readable safetensors file ({error}); it may be truncated. "
                             "Start a new run, or resume from an intact checkpoint.") from error
        if metadata.get("format") != self.FORMAT:
            raise ValueError(f"{path} is not a LatentDiffusionTrainer checkpoint (format {metadata.get('format')!r}).")
        for field, current in (("config", asdict(self.config)), ("provenance", self.provenance)):
            differences = compare_records(self.checkpoint_field(metadata, field, path), current)
            if differences:
                raise ValueError(f"{path} is a checkpoint of another run; its {field} differs: "
                                 f"{describe_differences(differences)}. Resume with the saved settings, or start "
                                 "a new run.")
        unet_state = {k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")}
        ema_state = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
        load_state_dict_strict(self.unet, unet_state, "U-Net", check_only=True)
        load_state_dict_strict(self.ema, ema_state, "EMA U-Net", check_only=True)
        optimizer_state = self.checked_optimizer_state(metadata, tensors, path)
        scaler_state = self.checkpoint_field(metadata, "grad_scaler", path)
        if not isinstance(scaler_state, dict) or set(scaler_state) != set(self.scaler.state_dict()):
            raise ValueError(f"{path}: the loss scaler's state {scaler_state!r:.80} is not this trainer's; resume "
                             "on the same kind of device and precision as the saved run.")
        step = self.checked_progress(metadata, tensors, path)

        # Nothing has changed so far; from here on nothing can fail.
        load_state_dict_strict(self.unet, unet_state, "U-Net")
        load_state_dict_strict(self.ema, ema_state, "EMA U-Net")
        self.optimizer.load_state_dict(optimizer_state)
        self.scaler.load_state_dict(scaler_state)
        self.generator.set_state(tensors["generator_state"])
        self.step = step
        self.losses, self.seconds = tensors["losses"].tolist(), tensors["seconds"].tolist()
        return self

    @staticmethod
    def checkpoint_field(metadata: dict[str, str], field: str, path) -> object:
        """A JSON field of a checkpoint's metadata, or a ValueError naming it."""
        if field not in metadata:
            raise ValueError(f"{path}: the checkpoint's {field!r} is missing; it was not written by this trainer.")
        try:
            return json.loads(metadata[field])
        except ValueError as error:
            raise ValueError(f"{path}: the checkpoint's {field!r} is not JSON ({metadata[field]!r:.80}).") from error

    def checked_optimizer_state(self, metadata: dict[str, str], tensors: dict[str, torch.Tensor], path) -> dict:
        """The saved AdamW state, checked against this trainer's optimiser: the same parameter groups,
        and for each parameter at most its step and two moments of its own shape."""
        groups = self.checkpoint_field(metadata, "optimizer_param_groups", path)
        own_groups = self.optimizer.state_dict()["param_groups"]
        if not (isinstance(groups, list) and all(isinstance(group, dict) for group in groups)
                and [sorted(group) for group in groups] == [sorted(group) for group in own_groups]
                and [group["params"] for group in groups] == [group["params"] for group in own_groups]):
            raise ValueError(f"{path}: the optimiser's parameter groups {groups!r:.80} are not those of this "
                             f"U-Net's AdamW ({len(own_groups)} group of {len(own_groups[0]['params'])} parameters).")
        parameters = [parameter for group in self.optimizer.param_groups for parameter in group["params"]]
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if not key.startswith("optimizer."):
                continue
            _, index, name = (key.split(".", 2) + ["", ""])[:3]
            if not index.isdigit() or int(index) >= len(parameters) or name not in self.ADAMW_STATE:
                raise ValueError(f"{path}: {key} is not AdamW state of one of this U-Net's {len(parameters)} "
                                 f"parameters ({', '.join(self.ADAMW_STATE)} of optimizer.0 to "
                                 f"optimizer.{len(parameters) - 1}).")
            shape = () if name == "step" else parameters[int(index)].shape
            if value.shape != shape:
                raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, but its parameter needs "
                                 f"{tuple(shape)}.")
            state.setdefault(int(index), {})[name] = value
        incomplete = sorted(index for index, entry in state.items() if len(entry) != len(self.ADAMW_STATE))
        if incomplete:
            raise ValueError(f"{path}: the AdamW state of parameters {incomplete[:10]} lacks some of "
                             f"{', '.join(self.ADAMW_STATE)}.")
        return {"state": state, "param_groups": groups}

    def checked_progress(self, metadata: dict[str, str], tensors: dict[str, torch.Tensor], path) -> int:
        """The saved step, checked against this run's length, with one loss and one time per step and
        a generator state of this generator's size."""
        step = self.checkpoint_field(metadata, "step", path)
        if not isinstance(step, int) or not 0 <= step <= self.config.steps:
            raise ValueError(f"{path}: step={step!r} is not a step of this run (0 to {self.config.steps}).")
        expected = {"losses": (step,), "seconds": (step,), "generator_state": tuple(self.generator.get_state().shape)}
        for name, shape in expected.items():
            if name not in tensors:
                raise ValueError(f"{path}: {name} is missing from the checkpoint.")
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, but a checkpoint at step "
                                 f"{step} needs {shape}.")
        if tensors["generator_state"].dtype != torch.uint8:
            raise ValueError(f"{path}: generator_state is {tensors['generator_state'].dtype}, not a generator's "
                             "state (torch.uint8).")
        return step
