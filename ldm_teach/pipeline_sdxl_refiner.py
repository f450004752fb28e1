"""SDXL image to image and the refiner: the second expert that finishes what the base began (Chapter 08).

SDXL ships a second model, the *refiner*, trained on the low-noise end of the schedule only. It
runs as image to image (Chapter 07's SDEdit) on SDXL's machinery (``pipeline_sdxl.py``). What
changes from the base pipeline, in the order a call meets it:

1. **one text encoder**: the refiner's folder has no ``text_encoder`` or ``tokenizer``, only
   OpenCLIP ViT-bigG (``text_encoder_2``). Built with ``text_encoder=None``, the prompt goes to
   bigG alone, so the context is 1280 wide (the refiner U-Net's ``cross_attention_dim``), and
   ``prompt_2`` has nothing to go to. Its folder also says ``force_zeros_for_empty_prompt: false``:
   no negative prompt means the encoded "", not zeros;
2. **an image in, not noise**: a picture (PIL, or (B, 3, H, W) in [0, 1]) is encoded by the VAE
   (a posterior sample, in float32 for a float16 VAE that ``force_upcast``s); latents with 4
   channels, what the base returns with ``output_type="latent"``, are taken as they are;
3. **where the denoising starts**: either ``strength``, as in Chapter 07 (the last
   ``int(num_inference_steps * strength)`` steps run, from the image noised to the first of them),
   or ``denoising_start``, the *ensemble of experts*: the base ran the timesteps from the cutoff
   T - denoising_end x T up and stopped there (``denoising_end``); the refiner runs those below it,
   with ``denoising_start`` equal to the base's ``denoising_end``. The base's latents already hold
   the noise that is left, so none is added, and ``strength`` is ignored (as in diffusers);
4. **the aesthetic score** (``requires_aesthetics_score``, true in the refiner's folder): the
   refiner was conditioned on the rating of each training picture, so its ``time_ids`` are the
   original size, the crop corner and that score, 5 numbers instead of base's 6 (no target size):
   its added embedding takes 1280 + 5 x 256 = 2560 numbers. The prompt's rows ask for
   ``aesthetic_score=6.0``, the unconditional rows for ``negative_aesthetic_score=2.5``, so that
   guidance also steers away from what low-rated pictures look like. The unconditional rows' crop
   is ``negative_crops_coords_top_left`` (0, 0);
5. the denoising loop and the decode are the base's.

``StableDiffusionXLImg2Img`` is called like diffusers' ``StableDiffusionXLImg2ImgPipeline`` and, on
the same weights, scheduler and seeded generator, gives the same images, alone and after the base
(``tests/test_pipeline_sdxl_refiner.py``). With base's U-Net and both encoders (and
``requires_aesthetics_score=False``) it is SDXL base's image to image.
"""
from __future__ import annotations

import torch

from .checks import as_float, check_tensor
from .editing import check_strength, image_tensor
from .pipeline import PipelineOutput, draw_latents
from .pipeline_sdxl import StableDiffusionXL
from .unet_sdxl import micro_conditioning


def aesthetic_conditioning(original_size: tuple[int, int], crops_coords_top_left: tuple[int, int],
                           aesthetic_score: float, batch: int = 1, dtype: torch.dtype = torch.float32,
                           device: torch.device | str | None = None) -> torch.Tensor:
    """The refiner's ``time_ids`` (batch, 5): original (height, width), crop (top, left), aesthetic score.

    The score is the rating the refiner's training pictures were given (about 1 to 10); 6 asks
    for a well-liked picture.
    """
    sizes = [*original_size, *crops_coords_top_left]
    if len(sizes) != 4:
        raise ValueError(f"original_size={original_size} and crops_coords_top_left={crops_coords_top_left} must be "
                         "two numbers each, e.g. (1024, 1024) and (0, 0).")
    numbers = [*sizes, as_float(aesthetic_score, "aesthetic_score")]
    return torch.tensor([numbers] * batch, dtype=dtype, device=device)  # (batch, 5)


class StableDiffusionXLImg2Img(StableDiffusionXL):
    """SDXL image to image, and the refiner (Chapter 08). ``pipe(prompt, image, strength=0.3,
    num_inference_steps=50, denoising_start=None, guidance_scale=5.0, negative_prompt=None,
    prompt_2=None, negative_prompt_2=None, generator=None, output_type="pil", original_size=None,
    crops_coords_top_left=(0, 0), target_size=None, negative_crops_coords_top_left=(0, 0),
    aesthetic_score=6.0, negative_aesthetic_score=2.5)`` returns a ``PipelineOutput``, as diffusers'
    ``StableDiffusionXLImg2ImgPipeline`` does.

    ``text_encoder`` and ``tokenizer`` may be None (the refiner has neither);
    ``requires_aesthetics_score`` says which ``time_ids`` the U-Net takes: True for the refiner
    (size, crop, aesthetic score), False for base's U-Net (size, crop, target size).
    """

    def __init__(self, unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler,
                 requires_aesthetics_score: bool = False, force_zeros_for_empty_prompt: bool = True):
        self.requires_aesthetics_score = requires_aesthetics_score  # read by the checks in __init__
        super().__init__(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler,
                         force_zeros_for_empty_prompt)

    @property
    def time_id_count(self) -> int:
        """5 with the aesthetic score (original size, crop, score), else base's 6."""
        return 5 if self.requires_aesthetics_score else 6

    def check_added_embedding(self, config, text_encoder_2) -> None:
        """Base's check, first telling apart the one mistake that is easy to make: a U-Net that takes
        5 numbers with ``requires_aesthetics_score=False``, or 6 with True."""
        projection, per_number = text_encoder_2.config.projection_dim, config.addition_time_embed_dim
        width = config.projection_class_embeddings_input_dim
        takes = None if projection is None else (width - projection) / per_number
        if takes in (5, 6) and takes != self.time_id_count:
            raise ValueError(
                f"requires_aesthetics_score={self.requires_aesthetics_score} gives {self.time_id_count} time_ids per "
                f"image, but the U-Net's added embedding takes {width} = {projection} (pooled) + {int(takes)} x "
                f"{per_number}, {int(takes)} numbers; pass requires_aesthetics_score={takes == 5} (True for the SDXL "
                "refiner's U-Net: size, crop, aesthetic score; False for base's: size, crop, target size).")
        super().check_added_embedding(config, text_encoder_2)

    def timesteps_after(self, denoising_start: float, num_inference_steps: int) -> torch.Tensor:
        """The scheduler's timesteps below the cutoff where the base stopped (its ``denoising_end`` is our
        ``denoising_start``), the scheduler told where the loop begins. Call after ``set_timesteps``."""
        timesteps = self.scheduler.timesteps
        cutoff = self.timestep_cutoff(denoising_start)
        count = int((timesteps < cutoff).sum())
        if count == 0:
            raise ValueError(f"denoising_start={denoising_start} with num_inference_steps={num_inference_steps} "
                             f"leaves no timestep below {cutoff} for the refiner; lower denoising_start or raise "
                             "num_inference_steps.")
        first = len(timesteps) - count
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(first)
        return timesteps[first:]

    def image_or_latents(self, image) -> tuple[torch.Tensor, bool]:
        """(B, 4, h, w) latents as they are (True), or images as (N, 3, H, W) in [0, 1] (False)."""
        channels = self.vae.config.latent_channels
        if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] == channels:
            return check_tensor(image, "image"), True
        images = image_tensor(image)  # (N, 3, H, W) in [0, 1]
        self.check_image_size(images, "image", None, None)
        return images, False

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], image, strength: float = 0.3, num_inference_steps: int = 50,
                 denoising_start: float | None = None, guidance_scale: float = 5.0,
                 negative_prompt: str | list[str] | None = None, prompt_2: str | list[str] | None = None,
                 negative_prompt_2: str | list[str] | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] = (0, 0),
                 target_size: tuple[int, int] | None = None,
                 negative_crops_coords_top_left: tuple[int, int] = (0, 0), aesthetic_score: float = 6.0,
                 negative_aesthetic_score: float = 2.5, eta: float = 0.0, num_images_per_prompt: int = 1,
                 callback=None, progress: bool = True) -> PipelineOutput:
        """``image`` moved towards ``prompt``: from ``strength``, or, after the base, from ``denoising_start``.

        ``original_size`` and ``target_size`` default to the image's (height, width).
        """
        prompts, _, guidance_scale = self.check_prompts(prompt, negative_prompt, guidance_scale)
        strength = check_strength(strength)
        denoising_start = self.check_fraction(denoising_start, "denoising_start", "the share of the noise the base "
                                              "removed, its denoising_end; None starts where strength says")
        num_inference_steps, num_images_per_prompt, eta = self.check_common(
            num_inference_steps, num_images_per_prompt, eta, generator, callback, output_type)
        self.check_added_embedding(self.unet.config, self.text_encoder_2)  # requires_aesthetics_score may have changed
        start, given_latents = self.image_or_latents(image)
        batch_size = len(prompts) * num_images_per_prompt
        self.check_count(len(start), batch_size, "image")
        if isinstance(generator, (list, tuple)) and len(generator) != batch_size:
            raise ValueError(f"{len(generator)} generators were passed for {batch_size} images; pass one generator, "
                             "or one per image (prompts x num_images_per_prompt).")
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        if denoising_start is None:
            timesteps = self.start_timesteps(num_inference_steps, strength)
        else:
            timesteps = self.timesteps_after(denoising_start, num_inference_steps)

        context, negative_context, pooled, negative_pooled = self.encode_prompt(
            prompt, prompt_2, negative_prompt, negative_prompt_2, guidance_scale, num_images_per_prompt)
        # The draws in diffusers' order: the image's posterior sample, then (unless denoising_start) the noise.
        if given_latents:
            latents = start.to(self.device, self.dtype)  # (N, 4, h, w)
        else:
            if isinstance(generator, (list, tuple)):  # one image per generator, as diffusers pairs them
                start = start.expand(batch_size, -1, -1, -1)
            latents = self.encode_images(start * 2 - 1, generator)  # (N, 4, h, w)
        latents = latents.repeat(batch_size // len(latents), 1, 1, 1)  # (B, 4, h, w)
        if denoising_start is None:
            noise = draw_latents(tuple(latents.shape), generator, self.device, latents.dtype)
            latents = self.scheduler.add_noise(latents, noise, timesteps[:1].repeat(batch_size))  # at the start step

        guided = negative_context is not None
        if guided:  # the unconditional rows first, then the prompts', as diffusers orders the batch
            context = torch.cat([negative_context, context])  # (2B, 77, D)
            pooled = torch.cat([negative_pooled, pooled])  # (2B, P)
        size = (latents.shape[-2] * self.vae_scale_factor, latents.shape[-1] * self.vae_scale_factor)  # (H, W)
        original_size, target_size = tuple(original_size or size), tuple(target_size or size)
        options = dict(batch=batch_size, dtype=context.dtype, device=self.device)
        if self.requires_aesthetics_score:
            time_ids = aesthetic_conditioning(original_size, crops_coords_top_left, aesthetic_score, **options)
            negative_time_ids = aesthetic_conditioning(original_size, negative_crops_coords_top_left,
                                                       negative_aesthetic_score, **options)  # (B, 5) each
        else:
            time_ids = negative_time_ids = micro_conditioning(original_size, crops_coords_top_left, target_size,
                                                              **options)  # (B, 6)
        if guided:
            time_ids = torch.cat([negative_time_ids, time_ids])  # (2B, 5 or 6)
        added_cond_kwargs = {"text_embeds": pooled, "time_ids": time_ids}

        latents = self.denoise(latents, context, timesteps, guidance_scale, self.step_options(generator, eta),
                               callback, progress, predict_noise=lambda model_input, t, context, step: self.unet(
                                   model_input, t, context, added_cond_kwargs=added_cond_kwargs))
        return self.finish(latents, output_type)
