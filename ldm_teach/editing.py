"""Editing images with a text-to-image model: image to image (SDEdit) and inpainting, both ways.

Chapter 07 builds this file top to bottom:

1. ``image_tensor`` and ``mask_tensor``: the inputs a learner passes (PIL images or tensors in
   [0, 1]) as the pipelines use them, with the mask binarised at 0.5 as diffusers does;
2. ``start_step``: how ``strength`` picks the step the denoising starts from (section "Image to
   image");
3. ``EditingPipeline``: the text-to-image pipeline of Chapter 06 plus what every editing pipeline
   shares: encoding images with the VAE's *encoder* (which text to image never needs) and one
   denoising loop with two hooks, the noise prediction and what happens after each step;
4. ``StableDiffusionImg2Img``: encode, noise to the start step, denoise from there;
5. ``blend_known_region`` and ``inpainting_input``: the two ways to inpaint (section "Inpainting"):
   with the text-to-image U-Net by putting the known region back after every step, or with a
   U-Net of 4 + 1 + 4 = 9 input channels that sees the mask and the masked image;
6. ``StableDiffusionInpaint``: either way, picked by the U-Net's input channels.

The pipelines are called like diffusers' ``StableDiffusionImg2ImgPipeline`` and
``StableDiffusionInpaintPipeline`` and draw their noise in the same order (the posterior samples of
the encoder first, then the starting noise), so that on the same weights and seeded generator they
give the same images (``tests/test_editing.py``). ControlNet lives in ``controlnet.py``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .checks import as_float, as_int, check_callable, check_generator, check_tensor
from .pipeline import OUTPUT_TYPES, PipelineOutput, StableDiffusion, classifier_free_guidance, draw_latents, to_output

# --- the inputs ------------------------------------------------------------------------------


def image_tensor(image, name: str = "image") -> torch.Tensor:
    """A PIL image, a list of them, or a (B, 3, H, W) / (3, H, W) tensor in [0, 1] -> (B, 3, H, W) float32 in [0, 1].

    Values outside [0, 1] are refused rather than guessed at: a [-1, 1] tensor or 0..255 pixels
    would otherwise be encoded as a different picture.
    """
    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)) and image and all(isinstance(one, Image.Image) for one in image):
        sizes = {one.size for one in image}
        if len(sizes) > 1:
            raise ValueError(f"the {name} images have different sizes {sorted(sizes)}; resize them to one size.")
        arrays = np.stack([np.asarray(one.convert("RGB"), dtype=np.float32) / 255 for one in image])  # (B, H, W, 3)
        return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)
    if not isinstance(image, (torch.Tensor, np.ndarray)):
        raise TypeError(f"{name} is a {type(image).__name__}; pass a PIL image or a (B, 3, H, W) tensor in [0, 1].")
    image = check_tensor(image, name)
    if image.ndim == 3:
        image = image[None]  # (1, 3, H, W)
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"{name} has shape {tuple(image.shape)}; pass RGB images (B, 3, H, W) or (3, H, W) in [0, 1].")
    image = image.float()
    low, high = image.min().item(), image.max().item()
    if low < 0 or high > 1:
        fix = "x / 255 for 8-bit pixels" if high > 1 else "x * 0.5 + 0.5 for images in [-1, 1]"
        raise ValueError(f"{name} holds values in [{low:.3g}, {high:.3g}], outside [0, 1]; pass images in [0, 1] "
                         f"({fix}).")
    return image


def mask_tensor(mask, name: str = "mask_image") -> torch.Tensor:
    """A PIL mask (white = repaint), a list of them, or a tensor (B, 1, H, W), (B, H, W) or (H, W) in [0, 1]
    -> (B, 1, H, W) of 0s and 1s: values of 0.5 and more become 1 (repaint), as diffusers binarises."""
    if isinstance(mask, Image.Image):
        mask = [mask]
    if isinstance(mask, (list, tuple)) and mask and all(isinstance(one, Image.Image) for one in mask):
        sizes = {one.size for one in mask}
        if len(sizes) > 1:
            raise ValueError(f"the {name} masks have different sizes {sorted(sizes)}; resize them to one size.")
        arrays = np.stack([np.asarray(one.convert("L"), dtype=np.float32) / 255 for one in mask])  # (B, H, W)
        mask = torch.from_numpy(arrays)[:, None]  # (B, 1, H, W)
    elif isinstance(mask, (torch.Tensor, np.ndarray)):
        mask = check_tensor(mask, name).float()
        if mask.ndim == 2:
            mask = mask[None, None]  # (1, 1, H, W)
        elif mask.ndim == 3:
            mask = mask[:, None]  # (B, 1, H, W)
        if mask.ndim != 4 or mask.shape[1] != 1:
            raise ValueError(f"{name} has shape {tuple(mask.shape)}; pass one channel: (B, 1, H, W), (B, H, W) "
                             "or (H, W), white (1) where the image is to be repainted.")
        if mask.min() < 0 or mask.max() > 1:
            raise ValueError(f"{name} holds values in [{mask.min().item():.3g}, {mask.max().item():.3g}]; pass a mask "
                             "in [0, 1] (1 = repaint).")
    else:
        raise TypeError(f"{name} is a {type(mask).__name__}; pass a PIL image or a tensor in [0, 1] (1 = repaint).")
    return (mask >= 0.5).float()  # (B, 1, H, W), binarised


def check_strength(strength) -> float:
    """``strength`` in (0, 1]: the share of the schedule that is re-run (1 = start from pure noise)."""
    strength = as_float(strength, "strength")
    if not 0 < strength <= 1:
        raise ValueError(f"strength={strength} must lie in (0, 1]: 0 would keep the image as it is (no denoising "
                         "step), 1 starts from pure noise. Use e.g. strength=0.6.")
    return strength


def start_step(num_inference_steps: int, strength: float) -> int:
    """Where the denoising starts in the schedule of ``num_inference_steps`` steps (Chapter 07, "Image to image").

    ``int(num_inference_steps * strength)`` steps are run, the last ones of the schedule, so the
    first ``num_inference_steps - int(num_inference_steps * strength)`` are skipped; this returns
    that count, as diffusers' ``get_timesteps`` computes it. strength 1 runs them all.
    """
    steps_run = min(int(num_inference_steps * strength), num_inference_steps)
    return max(num_inference_steps - steps_run, 0)


# --- what the editing pipelines share --------------------------------------------------------


class EditingPipeline(StableDiffusion):
    """Chapter 06's pipeline plus the pieces every editing pipeline needs (Chapter 07).

    Not called itself: ``StableDiffusionImg2Img``, ``StableDiffusionInpaint`` and
    ``controlnet.StableDiffusionControlNet`` are.
    """

    def check_prompts(self, prompt, negative_prompt, guidance_scale) -> tuple[list[str], list[str], float]:
        """The prompts and negative prompts as lists, and the guidance scale as a float, or a clear error."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a str or a non-empty list of str, got {prompt!r:.100}.")
        guidance_scale = as_float(guidance_scale, "guidance_scale")
        negatives = self.check_negative_prompt(negative_prompt, len(prompts), guidance_scale > 1)
        return list(prompts), negatives, guidance_scale

    def check_common(self, num_inference_steps, num_images_per_prompt, eta, generator, callback,
                     output_type) -> tuple[int, int, float]:
        """The arguments every pipeline call shares, checked before any work is done."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not one of {OUTPUT_TYPES}.")
        num_inference_steps = as_int(num_inference_steps, "num_inference_steps", minimum=1)
        num_images_per_prompt = as_int(num_images_per_prompt, "num_images_per_prompt", minimum=1)
        eta = as_float(eta, "eta")
        if not 0 <= eta <= 1:
            raise ValueError(f"eta={eta} must lie in [0, 1] (0: deterministic DDIM, 1: DDPM's noise at every step).")
        check_generator(generator)
        check_callable(callback, "callback")
        self.check_devices()
        return num_inference_steps, num_images_per_prompt, eta

    def check_image_size(self, image: torch.Tensor, name: str, height, width) -> tuple[int, int]:
        """The image's own height and width, refused unless multiples of 8 (and of f), or when ``height``
        or ``width`` ask for another size (resize the image first: the pipeline never resizes silently)."""
        size = tuple(image.shape[-2:])
        for asked, own, what in ((height, size[0], "height"), (width, size[1], "width")):
            if asked is not None and as_int(asked, what) != own:
                raise ValueError(f"{what}={asked} was asked for, but {name} is {size[0]}x{size[1]} (height x width); "
                                 f"resize {name} to the size you want, or leave {what} out.")
        try:
            return self.check_size(*size)
        except ValueError as error:
            raise ValueError(f"{name} is {size[0]}x{size[1]} (height x width): {error}") from None

    @staticmethod
    def check_count(count: int, batch_size: int, name: str) -> None:
        """One image (used for every output) or one per output image."""
        if count not in (1, batch_size):
            raise ValueError(f"{count} {name}s were passed for {batch_size} images (prompts x num_images_per_prompt); "
                             f"pass one {name} for all of them, or {batch_size}.")

    def start_timesteps(self, num_inference_steps: int, strength: float) -> torch.Tensor:
        """The scheduler's timesteps from ``start_step`` on (call after ``scheduler.set_timesteps``).

        A scheduler that counts its steps (the σ-schedulers) is told where the loop starts, as
        diffusers' editing pipelines tell it, since with Karras σ a timestep can come twice.
        """
        first = start_step(num_inference_steps, strength)
        timesteps = self.scheduler.timesteps[first:]
        if first >= num_inference_steps:
            raise ValueError(
                f"strength={strength} with num_inference_steps={num_inference_steps} runs int({num_inference_steps} x "
                f"{strength}) = 0 denoising steps, which leaves the image unchanged; raise strength or "
                f"num_inference_steps so that their product is at least 1."
            )
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(first)
        return timesteps

    def encode_context(self, prompts: list[str], negatives: list[str], guided: bool,
                       num_images_per_prompt: int) -> torch.Tensor:
        """The U-Net's context for each output image, the negative prompts' rows first when guided: (B or 2B, 77, D)."""
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        context = self.encode_prompts(prompts)  # (B, 77, D)
        if guided:
            negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
            context = torch.cat([self.encode_prompts(negatives, "negative prompt"), context])  # (2B, 77, D)
        return context

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] -> scaled latents (N, 4, H/f, W/f): a *sample* of the encoder's posterior.

        Editing is where SD needs its encoder: generation from text only ever decodes. The sample
        draws its noise from ``generator`` (one per image when it is a list), as diffusers does.
        """
        images = images.to(self.device, self.vae.encoder.conv_in.weight.dtype)
        if isinstance(generator, (list, tuple)):
            latents = torch.cat([self.vae.encode(images[i:i + 1]).sample(generator[i]) for i in range(len(images))])
        else:
            latents = self.vae.encode(images).sample(generator)  # (N, 4, h, w)
        return (latents * self.vae.scaling_factor).to(self.dtype)

    def denoise(self, latents: torch.Tensor, context: torch.Tensor, timesteps: torch.Tensor, guidance_scale: float,
                step_options: dict, callback=None, progress: bool = True,
                predict_noise: Callable | None = None, after_step: Callable | None = None) -> torch.Tensor:
        """The sampling loop of Chapter 06 over ``timesteps``, with two hooks.

        ``predict_noise(model_input, t, context, step)`` replaces the plain ``unet(model_input, t,
        context)`` (inpainting adds input channels, ControlNet adds residuals);
        ``after_step(latents, step)`` changes the latents after each scheduler step (inpainting
        by blending puts the known region back).
        """
        guided = guidance_scale > 1
        for step, t in enumerate(tqdm(timesteps, desc="denoising", disable=not progress)):
            model_input = torch.cat([latents] * 2) if guided else latents  # (2B, 4, h, w) when guided
            model_input = self.scheduler.scale_model_input(model_input, t)
            if predict_noise is None:
                noise_pred = self.unet(model_input, t, context)
            else:
                noise_pred = predict_noise(model_input, t, context, step)
            if guided:
                noise_uncond, noise_text = noise_pred.chunk(2)  # (B, 4, h, w) each
                noise_pred = classifier_free_guidance(noise_uncond, noise_text, guidance_scale)
            latents = self.scheduler.step(noise_pred, t, latents, **step_options)
            if after_step is not None:
                latents = after_step(latents, step)
            if callback is not None:
                callback(step, t, latents)
        return latents

    def finish(self, latents: torch.Tensor, output_type: str) -> PipelineOutput:
        if output_type == "latent":
            return PipelineOutput(latents)
        return PipelineOutput(to_output(self.decode_latents(latents), output_type))


# --- image to image (SDEdit) -----------------------------------------------------------------


class StableDiffusionImg2Img(EditingPipeline):
    """Image to image, SDEdit (Meng et al., 2022): noise an image part of the way, then denoise it
    towards the prompt (Chapter 07, section "Image to image").

    ``pipe(prompt, image, strength=0.8, negative_prompt=None, num_inference_steps=50,
    guidance_scale=7.5, generator=None, output_type="pil")``, as diffusers'
    ``StableDiffusionImg2ImgPipeline``: ``image`` is a PIL image or a (B, 3, H, W) tensor in
    [0, 1] (one for all outputs, or one per output image), its sides multiples of 8. Only
    ``int(num_inference_steps * strength)`` steps run: low strength keeps the picture, high
    strength keeps little more than its colours and layout.
    """

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], image, strength: float = 0.8, negative_prompt=None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, generator=None, output_type: str = "pil",
                 eta: float = 0.0, num_images_per_prompt: int = 1, callback=None,
                 progress: bool = True) -> PipelineOutput:
        prompts, negatives, guidance_scale = self.check_prompts(prompt, negative_prompt, guidance_scale)
        strength = check_strength(strength)
        num_inference_steps, num_images_per_prompt, eta = self.check_common(
            num_inference_steps, num_images_per_prompt, eta, generator, callback, output_type)
        images = image_tensor(image)  # (N, 3, H, W) in [0, 1]
        self.check_image_size(images, "image", None, None)
        batch_size = len(prompts) * num_images_per_prompt
        self.check_count(len(images), batch_size, "image")
        if isinstance(generator, (list, tuple)) and len(generator) != batch_size:
            raise ValueError(f"{len(generator)} generators were passed for {batch_size} images; pass one generator, "
                             "or one per image (prompts x num_images_per_prompt).")
        step_options = self.step_options(generator, eta)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = self.start_timesteps(num_inference_steps, strength)

        guided = guidance_scale > 1
        context = self.encode_context(prompts, negatives, guided, num_images_per_prompt)  # (B or 2B, 77, D)
        if isinstance(generator, (list, tuple)):  # one image per generator, as diffusers pairs them
            images = images.expand(batch_size, -1, -1, -1)
        image_latents = self.encode_images(images * 2 - 1, generator)  # (N, 4, h, w)
        image_latents = image_latents.repeat(batch_size // len(image_latents), 1, 1, 1)  # (B, 4, h, w)
        noise = draw_latents(tuple(image_latents.shape), generator, self.device, image_latents.dtype)
        latents = self.scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(batch_size))  # at the start step
        latents = self.denoise(latents, context, timesteps, guidance_scale, step_options, callback, progress)
        return self.finish(latents, output_type)


# --- inpainting -------------------------------------------------------------------------------


def blend_known_region(latents: torch.Tensor, known_latents: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Inpainting with a text-to-image U-Net: keep the new latents where ``mask`` is 1 (repaint) and the
    known image's latents, noised to the current step, where it is 0 (Chapter 07, section "Inpainting").

    latents, known_latents (B, 4, h, w); mask (B, 1, h, w) of 0s and 1s at the latents' resolution.
    """
    return (1 - mask) * known_latents + mask * latents


def inpainting_input(model_input: torch.Tensor, mask: torch.Tensor, masked_image_latents: torch.Tensor) -> torch.Tensor:
    """The 9-channel U-Net's input: the noisy latents, the mask and the masked image's latents, stacked
    along the channels: (B, 4, h, w), (B, 1, h, w), (B, 4, h, w) -> (B, 9, h, w) (Chapter 07, section "Inpainting")."""
    return torch.cat([model_input, mask, masked_image_latents], dim=1)


class StableDiffusionInpaint(EditingPipeline):
    """Repaint the white part of a mask, keep the rest (Chapter 07, section "Inpainting").

    ``pipe(prompt, image, mask_image, strength=1.0, negative_prompt=None, num_inference_steps=50,
    guidance_scale=7.5, generator=None, output_type="pil")``, as diffusers'
    ``StableDiffusionInpaintPipeline``. With a 9-channel U-Net (SD's inpainting model) the U-Net
    sees the mask and the masked image at every step; with the 4-channel text-to-image U-Net the
    known region's latents, noised to each step, are blended back after it. The mask is
    binarised at 0.5 and reduced to the latents' size by nearest neighbour.
    """

    @staticmethod
    def check_unet_channels(unet, vae) -> None:
        """Inpainting: the text-to-image U-Net (latent channels) or one that also takes the mask and the
        masked image's latents (2 x latent channels + 1: SD's 9)."""
        latent = vae.config.latent_channels
        if unet.config.in_channels not in (latent, 2 * latent + 1):
            raise ValueError(
                f"the U-Net takes {unet.config.in_channels} input channels; inpainting needs a text-to-image U-Net "
                f"({latent}) or an inpainting one ({2 * latent + 1}: latents, mask, masked image latents)."
            )

    @property
    def blends(self) -> bool:
        """True with a text-to-image U-Net (inpainting by blending), False with a 9-channel inpainting U-Net."""
        return self.unet.config.in_channels == self.vae.config.latent_channels

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], image, mask_image, strength: float = 1.0, negative_prompt=None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, height: int | None = None,
                 width: int | None = None, generator=None, output_type: str = "pil", eta: float = 0.0,
                 num_images_per_prompt: int = 1, callback=None, progress: bool = True) -> PipelineOutput:
        prompts, negatives, guidance_scale = self.check_prompts(prompt, negative_prompt, guidance_scale)
        strength = check_strength(strength)
        num_inference_steps, num_images_per_prompt, eta = self.check_common(
            num_inference_steps, num_images_per_prompt, eta, generator, callback, output_type)
        images = image_tensor(image)  # (N, 3, H, W) in [0, 1]
        masks = mask_tensor(mask_image)  # (M, 1, H, W) of 0s and 1s
        height, width = self.check_image_size(images, "image", height, width)
        if masks.shape[-2:] != images.shape[-2:]:
            raise ValueError(f"mask_image is {masks.shape[-2]}x{masks.shape[-1]} but image is {height}x{width} "
                             "(height x width); pass a mask of the image's size.")
        batch_size = len(prompts) * num_images_per_prompt
        self.check_count(len(images), batch_size, "image")
        self.check_count(len(masks), batch_size, "mask")
        if isinstance(generator, (list, tuple)) and len(generator) != batch_size:
            raise ValueError(f"{len(generator)} generators were passed for {batch_size} images; pass one generator, "
                             "or one per image (prompts x num_images_per_prompt).")
        step_options = self.step_options(generator, eta)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = self.start_timesteps(num_inference_steps, strength)

        guided = guidance_scale > 1
        context = self.encode_context(prompts, negatives, guided, num_images_per_prompt)  # (B or 2B, 77, D)
        init_image = images * 2 - 1  # (N, 3, H, W) in [-1, 1]
        # The draws in diffusers' order: the image's posterior sample (needed for blending, or to start
        # part-way), the starting noise, then the masked image's posterior sample.
        image_latents = None
        if self.blends or strength < 1:
            image_latents = self.encode_images(init_image, generator)  # (N, 4, h, w)
            image_latents = image_latents.repeat(batch_size // len(image_latents), 1, 1, 1)  # (B, 4, h, w)
        shape = (batch_size, self.vae.config.latent_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)  # (B, 4, h, w)
        noise = draw_latents(shape, generator, self.device, context.dtype)
        if strength == 1:
            latents = noise * self.scheduler.init_noise_sigma
        else:
            latents = self.scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(batch_size))

        masked_image = init_image * (masks < 0.5)  # (B or 1, 3, H, W): the repainted region set to 0 (grey)
        mask = F.interpolate(masks, size=shape[-2:]).to(self.device, context.dtype)  # (M, 1, h, w), nearest
        mask = mask.repeat(batch_size // len(mask), 1, 1, 1)  # (B, 1, h, w)
        masked_image_latents = self.encode_images(masked_image, generator)  # (N, 4, h, w)
        masked_image_latents = masked_image_latents.repeat(batch_size // len(masked_image_latents), 1, 1, 1)

        if self.blends:
            def after_step(latents, step):
                known = image_latents
                if step < len(timesteps) - 1:  # noised to the level of the next step's input
                    known = self.scheduler.add_noise(image_latents, noise, timesteps[step + 1:step + 2])
                return blend_known_region(latents, known, mask)

            latents = self.denoise(latents, context, timesteps, guidance_scale, step_options, callback, progress,
                                   after_step=after_step)
        else:
            rows = 2 if guided else 1
            mask_input, masked_input = torch.cat([mask] * rows), torch.cat([masked_image_latents] * rows)

            def predict_noise(model_input, t, context, step):
                return self.unet(inpainting_input(model_input, mask_input, masked_input), t, context)  # 9 channels in

            latents = self.denoise(latents, context, timesteps, guidance_scale, step_options, callback, progress,
                                   predict_noise=predict_noise)
        return self.finish(latents, output_type)
