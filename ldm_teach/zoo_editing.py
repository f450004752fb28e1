"""Chapter 07's tiny models, trained on first use and cached as the zoo's are (``zoo.cached``).

Both start from the zoo's text-to-image model (``zoo.tiny_text_to_image``), frozen VAE and text
encoder included, and train for a few hundred steps on the captioned shapes:

* ``tiny_inpainting``: a 9-channel inpainting U-Net made from the text-to-image U-Net as SD's
  inpainting model was made from SD 1.2: the same weights, ``conv_in`` widened by 5 input
  channels (the mask and the masked image's latents) whose weights start at zero, so that at
  step 0 it predicts exactly what the text-to-image U-Net predicts; then fine-tuned on random
  box masks (``inpainting_unet_from``, ``random_box_masks``).
* ``tiny_controlnet``: a ControlNet copied from the U-Net (``ControlNet.from_unet``), trained with
  the U-Net frozen, on captions that name only the colour and the shape ("a red circle") and a
  control image that is the shape's silhouette (``silhouette``): the control has to carry where
  the shape goes and how big it is.

A cached model is keyed by its settings and by the hashes of the text-to-image model it was
trained from, so a retrained base retrains these too.
"""
from __future__ import annotations

from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from . import __version__, clip, data, diffusion, runtime, train, zoo
from .controlnet import ControlNet, ControlNetConfig, StableDiffusionControlNet
from .editing import StableDiffusionInpaint, inpainting_input
from .schedulers import DDPMScheduler
from .unet import UNet

BUDGETS = {  # quick: 2 CPU cores, both models with chapter 07 within 6 minutes; full: a Colab GPU
    "quick": {"inpainting": dict(images=2000, steps=300, batch_size=32, learning_rate=1e-3),
              "controlnet": dict(images=2000, steps=300, batch_size=32, learning_rate=1e-3)},
    "full": {"inpainting": dict(images=10000, steps=3000, batch_size=64, learning_rate=1e-3),
             "controlnet": dict(images=10000, steps=3000, batch_size=64, learning_rate=1e-3)},
}
CAPTION_DROPOUT = 0.1
CONTROL_WIDTHS = (8, 16, 32)  # the control image's embedding: 32 px -> 8 latent cells (f = 4)
DATA_SEED = 7  # other images than the text-to-image model's (zoo.SEED)


# --- the data ----------------------------------------------------------------------------------


def silhouette(images: torch.Tensor, threshold: float = 0.25) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> control images (B, 3, H, W) in [0, 1]: white where a pixel differs
    from the shapes' light background by more than ``threshold`` (in [0, 1] units), black elsewhere."""
    background = torch.tensor(data.BACKGROUND, dtype=torch.float32, device=images.device) / 255  # (3,)
    pixels = (images.float() + 1) / 2  # (B, 3, H, W) in [0, 1]
    distance = (pixels - background[:, None, None]).abs().amax(dim=1, keepdim=True)  # (B, 1, H, W)
    return (distance > threshold).float().expand(-1, 3, -1, -1)


def random_box_masks(count: int, image_size: int = 32, cell: int = 4, seed: int = 0) -> torch.Tensor:
    """``count`` masks (N, 1, H, W) of 0s and 1s, each one box (1: repaint) with sides of 2 to 6 cells of
    ``cell`` pixels, aligned to the cells, so that it maps exactly onto the latents of an f = ``cell`` VAE."""
    generator = torch.Generator().manual_seed(seed)
    cells = image_size // cell
    masks = torch.zeros(count, 1, image_size, image_size)
    sides = torch.randint(2, min(6, cells) + 1, (count, 2), generator=generator)
    for index, (height, width) in enumerate(sides.tolist()):
        top = torch.randint(0, cells - height + 1, (1,), generator=generator).item()
        left = torch.randint(0, cells - width + 1, (1,), generator=generator).item()
        masks[index, :, top * cell:(top + height) * cell, left * cell:(left + width) * cell] = 1
    return masks


def short_caption(spec: data.Shape) -> str:
    """The caption without size and position, "a red circle": what the ControlNet's control must supply."""
    return f"a {spec.color} {spec.shape}"


# --- the models --------------------------------------------------------------------------------


def inpainting_unet_from(unet: UNet, extra_channels: int = 5) -> UNet:
    """A U-Net with ``extra_channels`` more inputs (SD: 4 + 1 + 4 = 9) and ``unet``'s weights; the new input
    channels' weights in ``conv_in`` are zero, so it starts out predicting exactly what ``unet`` predicts."""
    config = type(unet.config)(**{**vars(unet.config), "in_channels": unet.config.in_channels + extra_channels})
    wide = UNet(config).to(unet.conv_in.weight.device, unet.conv_in.weight.dtype)
    state = dict(unet.state_dict())
    weight = state["conv_in.weight"]  # (C0, 4, 3, 3)
    extra = torch.zeros(weight.shape[0], extra_channels, *weight.shape[2:], dtype=weight.dtype, device=weight.device)
    state["conv_in.weight"] = torch.cat([weight, extra], dim=1)  # (C0, 9, 3, 3)
    wide.load_state_dict(state)
    return wide


def fit(model_loss, parameters: list[torch.nn.Parameter], data_size: int, steps: int, batch_size: int,
        learning_rate: float, seed: int, progress: bool, description: str) -> list[float]:
    """AdamW with a cosine-decayed learning rate on ``model_loss(index, generator)`` for random batches; the losses."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    losses = []
    for _ in tqdm(range(steps), desc=description, disable=not progress):
        index = torch.randint(0, data_size, (batch_size,), generator=generator)
        loss = model_loss(index, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


def latent_batch(diffusion_data: train.DiffusionData, index: torch.Tensor, generator: torch.Generator, device):
    """A fresh posterior sample of the batch's latents and its contexts, some captions dropped to ""."""
    latents = diffusion_data.latents_mean[index]
    latents = latents + diffusion_data.latents_std[index] * torch.randn(latents.shape, generator=generator)
    context = train.caption_dropout(diffusion_data.contexts[diffusion_data.caption_index[index]],
                                    diffusion_data.empty_context, CAPTION_DROPOUT, generator)
    return latents.to(device), context.to(device)


def base_hashes(profile: str) -> dict:
    """The weights hashes of the cached text-to-image model these models are trained from."""
    return {name: zoo.read_manifest(name, profile)["sha256"] for name in ("vae", "text_encoder", "unet")}


def tiny_inpainting(profile: str | None = None, retrain: bool = True, device=None,
                    progress: bool = True) -> StableDiffusionInpaint:
    """A ready ``StableDiffusionInpaint`` with the tiny 9-channel U-Net, fine-tuned from the zoo's U-Net on
    random box masks (trained on first use, then cached)."""
    profile, device = zoo.pick(profile, device)
    base = zoo.tiny_text_to_image(profile, retrain, device, progress=progress)
    budget = BUDGETS[profile]["inpainting"]
    settings = {"version": __version__, "budget": budget, "seed": zoo.SEED, "data_seed": DATA_SEED,
                "caption_dropout": CAPTION_DROPOUT, "base": base_hashes(profile)}

    def train_it():
        dataset = data.ShapesDataset(budget["images"], seed=DATA_SEED, exclude=zoo.HELD_OUT_PAIRS)
        images = dataset.tensors()  # (N, 3, 32, 32) in [-1, 1]
        masks = random_box_masks(len(images), images.shape[-1], base.vae_scale_factor, seed=DATA_SEED)
        diffusion_data = train.prepare_diffusion_data(images, dataset.captions(), base.text_encoder,
                                                      clip.Tokenizer(), vae=base.vae)
        with torch.no_grad():  # the masked images' latents, once (the posterior's mean, as the pipeline's input)
            masked = torch.cat([base.vae.encode((images[i:i + 256] * (masks[i:i + 256] < 0.5)).to(device)).mean
                                for i in range(0, len(images), 256)]).cpu() * base.vae.scaling_factor
        latent_masks = torch.nn.functional.interpolate(masks, size=masked.shape[-2:])  # (N, 1, h, w)
        torch.manual_seed(zoo.SEED)
        unet = inpainting_unet_from(base.unet).requires_grad_(True).train()
        alphas_cumprod = DDPMScheduler(**zoo.training_config(profile).scheduler_config()).alphas_cumprod

        def loss(index, generator):
            latents, context = latent_batch(diffusion_data, index, generator, device)
            mask, masked_latents = latent_masks[index].to(device), masked[index].to(device)
            model = lambda x_t, t, context: unet(inpainting_input(x_t, mask, masked_latents), t, context)  # noqa: E731
            return diffusion.diffusion_loss(model, latents, alphas_cumprod, context, generator=generator)

        losses = fit(loss, list(unet.parameters()), len(images), budget["steps"], budget["batch_size"],
                     budget["learning_rate"], zoo.SEED, progress, "fine-tuning the tiny inpainting U-Net")
        return unet.eval(), asdict(unet.config), {"losses": losses}

    unet, _ = zoo.cached("inpainting_unet", profile, settings,
                         lambda saved: UNet(type(base.unet.config)(**saved)), train_it, retrain)
    return StableDiffusionInpaint(**{**base.components, "unet": unet.to(device).requires_grad_(False)})


def tiny_controlnet(profile: str | None = None, retrain: bool = True, device=None,
                    progress: bool = True) -> StableDiffusionControlNet:
    """A ready ``StableDiffusionControlNet``: the zoo's text-to-image model steered by a tiny ControlNet that
    reads a shape's silhouette (trained on first use, then cached)."""
    profile, device = zoo.pick(profile, device)
    base = zoo.tiny_text_to_image(profile, retrain, device, progress=progress)
    budget = BUDGETS[profile]["controlnet"]
    settings = {"version": __version__, "budget": budget, "seed": zoo.SEED, "data_seed": DATA_SEED,
                "caption_dropout": CAPTION_DROPOUT, "widths": list(CONTROL_WIDTHS), "base": base_hashes(profile)}
    config = ControlNetConfig.from_unet_config(base.unet.config, conditioning_embedding_out_channels=CONTROL_WIDTHS)

    def train_it():
        dataset = data.ShapesDataset(budget["images"], seed=DATA_SEED, exclude=zoo.HELD_OUT_PAIRS)
        images = dataset.tensors()  # (N, 3, 32, 32) in [-1, 1]
        controls = silhouette(images)  # (N, 3, 32, 32) in [0, 1]
        captions = [short_caption(spec) for spec in dataset.specs]
        diffusion_data = train.prepare_diffusion_data(images, captions, base.text_encoder, clip.Tokenizer(),
                                                      vae=base.vae)
        torch.manual_seed(zoo.SEED)
        controlnet = ControlNet.from_unet(base.unet, CONTROL_WIDTHS).requires_grad_(True).train()
        unet = base.unet.requires_grad_(False)
        alphas_cumprod = DDPMScheduler(**zoo.training_config(profile).scheduler_config()).alphas_cumprod

        def loss(index, generator):
            latents, context = latent_batch(diffusion_data, index, generator, device)
            control = controls[index].to(device)

            def model(x_t, t, context):
                down_residuals, mid_residual = controlnet(x_t, t, context, control)
                return unet(x_t, t, context, down_residuals=down_residuals, mid_residual=mid_residual)

            return diffusion.diffusion_loss(model, latents, alphas_cumprod, context, generator=generator)

        losses = fit(loss, list(controlnet.parameters()), len(images), budget["steps"], budget["batch_size"],
                     budget["learning_rate"], zoo.SEED, progress, "training the tiny ControlNet")
        return controlnet.eval(), asdict(controlnet.config), {"losses": losses}

    controlnet, _ = zoo.cached("controlnet", profile, settings,
                               lambda saved: ControlNet(ControlNetConfig(**saved)), train_it, retrain)
    return StableDiffusionControlNet(**base.components, controlnet=controlnet.to(device).requires_grad_(False))


def training_record(name: str, profile: str | None = None) -> dict:
    """The manifest of a cached Chapter 07 model (``"inpainting_unet"`` or ``"controlnet"``): losses, seconds."""
    return zoo.read_manifest(name, profile or runtime.pick_budgets())

