"""Teaching a trained text-to-image model a new concept from a handful of images (chapter 09).

Three ways, each trained on the same few images of something the model has never seen (the zoo's
model knows circles, squares, triangles and diamonds; chapter 09 shows it a dozen flat bars):

* **Textual inversion** (Gal et al., 2022): a new word ``"<bar>"`` joins the tokenizer, its
  embedding row joins the text encoder's table, and only that one row (64 numbers for the tiny
  encoder, 768 for SD 1.5's) trains. The U-Net and every other weight stay exactly as they were:
  the concept must be expressible as a point in the text encoder's input space.
* **DreamBooth** (Ruiz et al., 2022): the whole U-Net trains on captions with a rare identifier
  and the concept's class noun, "a small red sks square at the top left". Alone this teaches the
  model that *squares* look like bars ("language drift"); the **prior-preservation loss** adds,
  on every step, the ordinary denoising loss on class images that the frozen model drew for the
  class prompts ("a small red square at the top left"), so the class keeps its old meaning.
* **LoRA** (Hu et al., 2021): DreamBooth's captions, but the U-Net is frozen and only low-rank
  adapters on its attention projections train (``lora.add_lora``), a few percent of the weights.

Each method returns a new pipeline (the given one is left untouched) and a ``FinetuneRecord``:
the losses, how many numbers trained, and the seconds.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data, diffusion, lora
from .checks import as_float, as_int
from .pipeline import StableDiffusion

IDENTIFIER = "sks"  # DreamBooth's rare token: a word the text encoder never saw in a caption


@dataclass
class FinetuneRecord:
    """What one fine-tuning run did: its losses (one per step), the number of trained weights, the seconds."""

    method: str
    trained_weights: int
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)


# --- the captions ------------------------------------------------------------------------------


def concept_caption(spec: data.Shape, word: str) -> str:
    """The caption of ``spec`` with ``word`` in the shape's place: "a small red <bar> at the top left"."""
    return f"a {spec.size} {spec.color} {word} {spec.position}"


def check_concept(images: torch.Tensor, captions: list[str]) -> None:
    """Refuse an empty or mismatched set of concept images, saying what was passed."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or len(images) == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images={shape}: pass the concept's images as a (N, 3, H, W) tensor with N >= 1, "
                         f"e.g. data.ShapesDataset(12, shapes=('bar',)).tensors().")
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions; pass one caption per image.")


# --- the two small ideas (exercises ex-ti-update and ex-prior-loss) ------------------------------


def textual_inversion_update(table: torch.Tensor, frozen_table: torch.Tensor, new_ids: list[int]) -> torch.Tensor:
    """Textual inversion's rule, applied after each optimizer step: every row of the embedding table (V, D)
    goes back to its frozen value except the new tokens' rows, which keep what the optimizer made of them.

    The gradient of a row the batch does not use is zero, but AdamW's weight decay still shrinks it, so
    the old rows are put back rather than trusted to stay (diffusers' ``textual_inversion.py`` does the same).
    """
    keep = torch.ones(len(table), dtype=torch.bool, device=table.device)
    keep[list(new_ids)] = False  # (V,): True for the rows that must not change
    return torch.where(keep[:, None], frozen_table, table)  # (V, D)


def prior_preservation_loss(concept_prediction: torch.Tensor, concept_target: torch.Tensor,
                            class_prediction: torch.Tensor, class_target: torch.Tensor,
                            prior_weight: float) -> torch.Tensor:
    """DreamBooth's loss: the denoising loss on the concept images plus ``prior_weight`` (λ) times the same
    loss on the class images the frozen model drew, each a mean squared error over its own batch."""
    return F.mse_loss(concept_prediction, concept_target) + prior_weight * F.mse_loss(class_prediction, class_target)


# --- the shared training loop ------------------------------------------------------------------


def encode_latents(vae, images: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std for images (N, 3, H, W), times the scaling factor: (N, C, h, w) each."""
    device = next(vae.parameters()).device
    with torch.no_grad():
        posteriors = [vae.encode(images[i:i + batch_size].to(device)) for i in range(0, len(images), batch_size)]
    means = torch.cat([p.mean.float() for p in posteriors]) * vae.scaling_factor
    return means, torch.cat([p.std.float() for p in posteriors]) * vae.scaling_factor


def noised_prediction(unet, latents: torch.Tensor, context: torch.Tensor, alphas_cumprod: torch.Tensor,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise ``latents`` (B, C, h, w) to random timesteps and return the U-Net's ε prediction and the true ε."""
    t = torch.randint(0, len(alphas_cumprod), (len(latents),), generator=generator).to(latents.device)
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    return unet(diffusion.q_sample(latents, t, noise, alphas_cumprod), t, context), noise


def train_loop(pipe: StableDiffusion, unet, text_encoder, images: torch.Tensor, captions: list[str],
               parameters: list[torch.nn.Parameter], steps: int, batch_size: int, learning_rate: float, seed: int,
               description: str, progress: bool, after_step=None, class_images: torch.Tensor | None = None,
               class_captions: list[str] | None = None, prior_weight: float = 0.0,
               weight_decay: float = 0.0) -> list[float]:
    """AdamW on ``parameters`` for ``steps`` batches of the concept images; the losses.

    Each batch draws ``batch_size`` concept images (with repeats: there are only a few) and a fresh
    sample of their latents. With ``class_images`` a batch of class images joins it and the loss is
    ``prior_preservation_loss``. The text encoder runs on every batch, so that a trainable embedding
    row (textual inversion) gets its gradient. ``after_step()`` runs after each optimizer step.
    """
    device = next(unet.parameters()).device
    alphas_cumprod = pipe.scheduler.alphas_cumprod.to(device)  # the noise schedule the model was trained on
    means, stds = encode_latents(pipe.vae, images)
    ids = pipe.tokenizer(captions).to(device)  # (N, 77)
    if class_images is not None:
        class_means, class_stds = encode_latents(pipe.vae, class_images)
        class_ids = pipe.tokenizer(class_captions).to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    losses = []
    for _ in tqdm(range(steps), desc=description, disable=not progress):
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        latents = means[index] + stds[index] * torch.randn(means[index].shape, generator=generator).to(device)
        batch_ids = ids[index]  # (B, 77)
        if class_images is not None:
            class_index = torch.randint(0, len(class_images), (batch_size,), generator=generator)
            class_latents = class_means[class_index] + class_stds[class_index] * torch.randn(
                class_means[class_index].shape, generator=generator).to(device)
            latents = torch.cat([latents, class_latents])  # (2B, C, h, w): concept first, then class
            batch_ids = torch.cat([batch_ids, class_ids[class_index]])
        prediction, target = noised_prediction(unet, latents, text_encoder(batch_ids), alphas_cumprod, generator)
        if class_images is not None:
            loss = prior_preservation_loss(prediction[:batch_size], target[:batch_size],
                                           prediction[batch_size:], target[batch_size:], prior_weight)
        else:
            loss = F.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        losses.append(loss.item())
    return losses


def with_parts(pipe: StableDiffusion, **parts) -> StableDiffusion:
    """A new pipeline with some of ``pipe``'s parts replaced (the others shared)."""
    return StableDiffusion(**{**pipe.components, **parts})


# --- the three methods -------------------------------------------------------------------------


def textual_inversion(pipe: StableDiffusion, images: torch.Tensor, captions: list[str], token: str = "<bar>",
                      initializer: str = "square", steps: int = 300, batch_size: int = 16,
                      learning_rate: float = 5e-3, seed: int = 0,
                      progress: bool = True) -> tuple[StableDiffusion, FinetuneRecord]:
    """Learn one new word for the concept: ``captions`` name it as ``token`` ("a small red <bar> ...").

    The new row starts as the embedding of ``initializer`` (a word whose meaning is near the concept's);
    only it trains, every other weight of the returned pipeline is bit-identical to ``pipe``'s.
    """
    check_concept(images, captions)
    if not isinstance(initializer, str) or len(pipe.tokenizer.tokenize(initializer)) != 1:
        raise ValueError(f"initializer={initializer!r} must be one token of the vocabulary, e.g. 'square'.")
    if not any(token in caption.split() for caption in captions):
        raise ValueError(f"no caption names token={token!r}; write it where the shape's word goes, "
                         f"e.g. {concept_caption(data.Shape('red', 'bar', 'small', 'at the top'), token)!r}.")
    tokenizer, text_encoder = copy.deepcopy(pipe.tokenizer), copy.deepcopy(pipe.text_encoder)
    new_ids = tokenizer.add_tokens([token])  # refuses a token already in the vocabulary
    text_encoder.resize_token_embeddings(tokenizer.vocab_size)
    table = text_encoder.token_embedding.weight  # (V + 1, D)
    with torch.no_grad():
        table[new_ids] = table[tokenizer.encode(initializer)[1]].clone()
    frozen_table = table.detach().clone()
    text_encoder.requires_grad_(False)
    table.requires_grad_(True)
    tuned = with_parts(pipe, tokenizer=tokenizer, text_encoder=text_encoder)

    def restore():
        with torch.no_grad():
            table.copy_(textual_inversion_update(table, frozen_table, new_ids))

    record = FinetuneRecord("textual inversion", trained_weights=len(new_ids) * table.shape[1])
    start = time.perf_counter()
    record.losses = train_loop(tuned, pipe.unet, text_encoder, images, captions, [table], steps, batch_size,
                               learning_rate, seed, f"textual inversion of {token}", progress, after_step=restore,
                               weight_decay=1e-2)
    record.seconds = time.perf_counter() - start
    table.requires_grad_(False)
    return tuned, record


def class_images_from(pipe: StableDiffusion, class_captions: list[str], num_inference_steps: int = 20,
                      guidance_scale: float = 7.5, seed: int = 0, batch_size: int = 64) -> torch.Tensor:
    """DreamBooth's class images: what the frozen model draws for the class prompts, (N, 3, H, W) in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    batches = [pipe(class_captions[i:i + batch_size], num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale, generator=generator, output_type="pt", progress=False).images
               for i in range(0, len(class_captions), batch_size)]
    return torch.cat(batches).float().cpu() * 2 - 1  # [0, 1] -> [-1, 1]


def dreambooth(pipe: StableDiffusion, images: torch.Tensor, captions: list[str],
               class_images: torch.Tensor | None = None, class_captions: list[str] | None = None,
               prior_weight: float = 1.0, steps: int = 200, batch_size: int = 16, learning_rate: float = 2e-4,
               seed: int = 0, progress: bool = True) -> tuple[StableDiffusion, FinetuneRecord]:
    """Fine-tune a copy of the whole U-Net on the concept's ``captions`` ("a small red sks square ...").

    With ``class_images`` (and their ``class_captions``) every step adds ``prior_weight`` times the loss on
    them (``prior_preservation_loss``); without, the class noun is free to drift to the concept.
    """
    check_concept(images, captions)
    if class_images is not None:
        check_concept(class_images, class_captions or [])
    prior_weight = as_float(prior_weight, "prior_weight")
    if prior_weight < 0:
        raise ValueError(f"prior_weight={prior_weight} is negative; use λ >= 0 (1.0 in the paper).")
    unet = copy.deepcopy(pipe.unet).requires_grad_(True).train()
    parameters = list(unet.parameters())
    method = "DreamBooth" + (" with prior preservation" if class_images is not None else "")
    record = FinetuneRecord(method, trained_weights=sum(p.numel() for p in parameters))
    start = time.perf_counter()
    record.losses = train_loop(pipe, unet, pipe.text_encoder, images, captions, parameters, steps, batch_size,
                               learning_rate, seed, f"training {method}", progress, class_images=class_images,
                               class_captions=class_captions, prior_weight=prior_weight)
    record.seconds = time.perf_counter() - start
    return with_parts(pipe, unet=unet.eval().requires_grad_(False)), record


def lora_dreambooth(pipe: StableDiffusion, images: torch.Tensor, captions: list[str], rank: int = 4,
                    alpha: float | None = None, targets: tuple[str, ...] = lora.UNET_TARGETS, steps: int = 200,
                    batch_size: int = 16, learning_rate: float = 1e-3, seed: int = 0,
                    progress: bool = True) -> tuple[StableDiffusion, FinetuneRecord]:
    """DreamBooth's captions, but only rank-``rank`` LoRA adapters on a copy of the U-Net's attention
    projections train; ``lora.merge_lora(tuned.unet)`` bakes them in afterwards."""
    check_concept(images, captions)
    rank = as_int(rank, "rank", minimum=1)
    unet = copy.deepcopy(pipe.unet)
    torch.manual_seed(seed)  # A's random start
    lora.add_lora(unet, rank, alpha, targets)
    parameters = lora.lora_parameters(unet)
    record = FinetuneRecord(f"LoRA (rank {rank})", trained_weights=sum(p.numel() for p in parameters))
    start = time.perf_counter()
    record.losses = train_loop(pipe, unet, pipe.text_encoder, images, captions, parameters, steps, batch_size,
                               learning_rate, seed, f"training LoRA rank {rank}", progress)
    record.seconds = time.perf_counter() - start
    for p in parameters:
        p.requires_grad_(False)
    return with_parts(pipe, unet=unet.eval()), record
