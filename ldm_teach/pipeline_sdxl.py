"""SDXL text to image: two text encoders, the pooled prompt and the size numbers (Chapter 08).

What changes from Chapter 06's pipeline, in the order a call meets it:

1. **two prompts, two encoders** (``encode_prompt``): the prompt goes through CLIP ViT-L
   (``text_encoder``, 768 wide) and ``prompt_2`` (the prompt again unless given) through OpenCLIP
   ViT-bigG (``text_encoder_2``, 1280 wide). Each contributes its *penultimate* layer's features,
   and the two are put side by side into one context (B, 77, 768 + 1280 = 2048); bigG also gives
   the pooled, projected prompt vector (B, 1280);
2. **zeros for the empty negative prompt**: with no negative prompt SDXL base's config says
   ``force_zeros_for_empty_prompt``, so the unconditional rows are zeros instead of the
   encoding of "";
3. **micro-conditioning** (``unet_sdxl.micro_conditioning``): original size, crop corner and
   target size, six numbers per image, reach the U-Net with the pooled prompt as
   ``added_cond_kwargs``;
4. **denoising_end**: stop part-way (e.g. 0.8) and hand the latents to the refiner;
5. **the VAE upcast**: SDXL's VAE overflows in float16, so with ``vae.config.force_upcast`` a
   float16 pipeline decodes (and the refiner encodes) in float32.

It is called like diffusers' ``StableDiffusionXLPipeline`` and, on the same weights, scheduler and
seeded generator, gives the same images (``tests/test_pipeline_sdxl.py``).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch

from .checks import as_device, as_float
from .editing import EditingPipeline
from .pipeline import PipelineOutput, draw_latents, warn
from .unet_sdxl import micro_conditioning


class StableDiffusionXL(EditingPipeline):
    """SDXL text to image (Chapter 08). ``pipe(prompt, prompt_2=None, negative_prompt=None,
    negative_prompt_2=None, num_inference_steps=50, guidance_scale=5.0, height=None, width=None,
    generator=None, output_type="pil", original_size=None, crops_coords_top_left=(0, 0),
    target_size=None, denoising_end=None)`` returns a ``PipelineOutput``, as diffusers'
    ``StableDiffusionXLPipeline`` does.
    """

    def __init__(self, unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler,
                 force_zeros_for_empty_prompt: bool = True):
        config = unet.config
        if config.addition_embed_type != "text_time":
            raise ValueError(f"the U-Net has addition_embed_type={config.addition_embed_type!r}, not SDXL's "
                             "'text_time': StableDiffusionXL needs an SDXL U-Net; use pipeline.StableDiffusion.")
        if (text_encoder is None) != (tokenizer is None):
            raise ValueError("text_encoder and tokenizer go together: pass both, or neither (as the SDXL refiner's "
                             "folder has neither: its context is text_encoder_2's alone).")
        widths = [encoder.config.hidden_size for encoder in (text_encoder, text_encoder_2) if encoder is not None]
        if config.cross_attention_dim != sum(widths):
            raise ValueError(f"the U-Net cross-attends to {config.cross_attention_dim}-wide features, but the text "
                             f"encoders write {' + '.join(map(str, widths))} = {sum(widths)}; use the encoders it "
                             "was trained with.")
        self.check_added_embedding(config, text_encoder_2)
        self.check_unet_channels(unet, vae)
        self.unet, self.vae = unet.eval(), vae.eval()
        self.text_encoder = None if text_encoder is None else text_encoder.eval()
        self.text_encoder_2 = text_encoder_2.eval()
        self.tokenizer, self.tokenizer_2, self.scheduler = tokenizer, tokenizer_2, scheduler
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    @property
    def time_id_count(self) -> int:
        """The micro-conditioning numbers per image: 6, original size, crop and target size."""
        return 6

    def check_added_embedding(self, config, text_encoder_2) -> None:
        """The U-Net's added embedding takes the pooled prompt and ``time_id_count`` numbers, or an error."""
        projection, count = text_encoder_2.config.projection_dim, self.time_id_count
        if projection is None or projection + count * config.addition_time_embed_dim != (
                config.projection_class_embeddings_input_dim):
            raise ValueError(
                f"text_encoder_2 has projection_dim={projection}, but the U-Net's added embedding takes "
                f"{config.projection_class_embeddings_input_dim} = pooled width + {count} x "
                f"{config.addition_time_embed_dim}: text_encoder_2 must be the CLIPTextModelWithProjection the U-Net "
                "was trained with.")

    @property
    def components(self) -> dict:
        """The models, tokenizers and scheduler by name, as diffusers' ``pipe.components``."""
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder,
                "text_encoder_2": self.text_encoder_2, "tokenizer": self.tokenizer, "tokenizer_2": self.tokenizer_2,
                "scheduler": self.scheduler}

    def models(self) -> dict:
        """The models by name; without ``text_encoder`` when there is none (the refiner)."""
        models = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder,
                  "text_encoder_2": self.text_encoder_2}
        return {name: model for name, model in models.items() if model is not None}

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "StableDiffusionXL":
        """Move the models to ``device`` and/or ``dtype``."""
        device = as_device(device)
        for model in self.models().values():
            model.to(device=device, dtype=dtype)
        return self

    def check_devices(self) -> None:
        """The models on one device in one dtype, or an error that says how to move them."""
        placed = {name: (next(model.parameters()).device, next(model.parameters()).dtype)
                  for name, model in self.models().items()}
        if len(set(placed.values())) > 1:
            where = ", ".join(f"{name} {dtype} on {device}" for name, (device, dtype) in placed.items())
            raise ValueError(f"the models are spread over devices or dtypes ({where}); "
                             "move them together with pipe.to(device, dtype).")

    # --- the steps of a call ---------------------------------------------------------------

    @torch.no_grad()
    def encode_with_both(self, prompts: list[str], prompts_2: list[str],
                         what: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Both encoders' penultimate layers side by side (B, 77, D1 + D2), and bigG's pooled projection (B, P).

        Without ``text_encoder`` (the refiner) ``prompts`` go to ``text_encoder_2`` alone, (B, 77, D2),
        and ``prompts_2`` are unused, as in diffusers.
        """
        pairs = [(self.tokenizer, self.text_encoder, prompts), (self.tokenizer_2, self.text_encoder_2, prompts_2)]
        if self.text_encoder is None:
            pairs = [(self.tokenizer_2, self.text_encoder_2, prompts)]
        features = []
        for tokenizer, encoder, texts in pairs:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ids = tokenizer(self.expand_prompts(texts, tokenizer)).to(self.device)  # (B, 77)
            for warning in caught:
                warn(str(warning.message).replace("prompt", what, 1))
            output = encoder.encode(ids)
            features.append(output.hidden_states[-2])  # (B, 77, D_i), the layer before the last
        return torch.cat(features, dim=-1).to(self.dtype), output.text_embeds.to(self.dtype)  # (B, 77, D1 + D2), (B, P)

    def encode_prompt(self, prompt, prompt_2=None, negative_prompt=None, negative_prompt_2=None,
                      guidance_scale: float = 5.0, num_images_per_prompt: int = 1):
        """(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds), as
        diffusers' ``encode_prompt`` returns them; the negative ones are None without guidance."""
        prompts, negatives, guidance_scale = self.check_prompts(prompt, negative_prompt, guidance_scale)
        prompts_2 = self.second_prompts(prompt_2, prompts, "prompt_2")
        if self.text_encoder is None and (prompt_2 is not None or negative_prompt_2 is not None):
            warn("prompt_2 and negative_prompt_2 are unused: this pipeline has one text encoder (text_encoder_2), "
                 "which reads prompt and negative_prompt.")
        repeat = lambda texts: [text for text in texts for _ in range(num_images_per_prompt)]  # noqa: E731
        context, pooled = self.encode_with_both(repeat(prompts), repeat(prompts_2), "prompt")
        if guidance_scale <= 1:
            return context, None, pooled, None
        if negative_prompt is None and self.force_zeros_for_empty_prompt:  # SDXL base: zeros, not the encoded ""
            return context, torch.zeros_like(context), pooled, torch.zeros_like(pooled)
        negatives_2 = negatives if negative_prompt_2 is None else self.second_prompts(
            negative_prompt_2, prompts, "negative_prompt_2")
        negative_context, negative_pooled = self.encode_with_both(repeat(negatives), repeat(negatives_2),
                                                                  "negative prompt")
        return context, negative_context, pooled, negative_pooled

    @staticmethod
    def second_prompts(texts, prompts: list[str], name: str) -> list[str]:
        """The prompts for the second encoder: ``prompts`` when None, one string for all, or one per prompt."""
        if texts is None:
            return list(prompts)
        if isinstance(texts, str):
            return [texts] * len(prompts)
        if not isinstance(texts, (list, tuple)) or not all(isinstance(text, str) for text in texts):
            raise TypeError(f"{name} must be a str or a list of str, got {texts!r:.100}.")
        if len(texts) != len(prompts):
            raise ValueError(f"{len(texts)} {name}s were given for {len(prompts)} prompts; pass one per prompt, or a "
                             "single string for all of them.")
        return list(texts)

    def timesteps_until(self, denoising_end: float | None) -> torch.Tensor:
        """The scheduler's timesteps, cut where ``denoising_end`` of the noise has been removed (the refiner
        takes over from there); all of them for None. Call after ``scheduler.set_timesteps``."""
        timesteps = self.scheduler.timesteps
        if denoising_end is None:
            return timesteps
        return timesteps[:int((timesteps >= self.timestep_cutoff(denoising_end)).sum())]

    def timestep_cutoff(self, fraction: float) -> int:
        """The training timestep where ``fraction`` of the noise is removed: T - fraction x T, rounded
        (0.8 of T = 1000: 200). The base runs the timesteps from it up, the refiner those below it."""
        T = self.scheduler.config.num_train_timesteps
        return int(round(T - fraction * T))

    @staticmethod
    def check_fraction(value, name: str, meaning: str) -> float | None:
        """``denoising_end`` or ``denoising_start``: None, or a share strictly between 0 and 1."""
        if value is None:
            return None
        value = as_float(value, name)
        if not 0 < value < 1:
            raise ValueError(f"{name}={value} must lie strictly between 0 and 1 ({meaning}); e.g. 0.8.")
        return value

    @contextmanager
    def vae_in_float32(self):
        """SDXL's VAE overflows in float16: with ``vae.config.force_upcast`` a float16 VAE runs in float32
        inside this block (yields whether it does), and is float16 again after it."""
        upcast = self.vae.config.force_upcast and self.vae.post_quant_conv.weight.dtype == torch.float16
        if upcast:
            self.vae.float()
        try:
            yield upcast
        finally:
            if upcast:
                self.vae.half()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Chapter 06's decode, in float32 for a float16 VAE whose config asks for it (``force_upcast``)."""
        with self.vae_in_float32() as upcast:
            return super().decode_latents(latents.float() if upcast else latents)  # (B, 3, H, W)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator) -> torch.Tensor:
        """Chapter 07's encode (the refiner's image to image), in float32 when ``force_upcast`` asks for it."""
        with self.vae_in_float32():
            return super().encode_images(images, generator)  # (N, 4, H/f, W/f) in the pipeline's dtype

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], prompt_2: str | list[str] | None = None,
                 negative_prompt: str | list[str] | None = None, negative_prompt_2: str | list[str] | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 5.0, height: int | None = None,
                 width: int | None = None, generator: torch.Generator | list[torch.Generator] | None = None,
                 output_type: str = "pil", original_size: tuple[int, int] | None = None,
                 crops_coords_top_left: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
                 denoising_end: float | None = None, eta: float = 0.0, num_images_per_prompt: int = 1,
                 callback=None, progress: bool = True) -> PipelineOutput:
        """Images for ``prompt``, as diffusers' SDXL pipeline makes them.

        ``original_size`` and ``target_size`` default to (height, width): the picture asked for,
        uncropped. ``denoising_end`` in (0, 1) stops after that share of the noise is removed,
        usually with ``output_type="latent"`` for the refiner.
        """
        height, width = self.check_size(height, width)
        num_inference_steps, num_images_per_prompt, eta = self.check_common(
            num_inference_steps, num_images_per_prompt, eta, generator, callback, output_type)
        denoising_end = self.check_fraction(denoising_end, "denoising_end", "the share of the noise removed "
                                            "before stopping; None runs every step")
        context, negative_context, pooled, negative_pooled = self.encode_prompt(
            prompt, prompt_2, negative_prompt, negative_prompt_2, guidance_scale, num_images_per_prompt)
        guided = negative_context is not None
        if guided:  # the unconditional rows first, then the prompts', as diffusers orders the batch
            context = torch.cat([negative_context, context])  # (2B, 77, D1 + D2)
            pooled = torch.cat([negative_pooled, pooled])  # (2B, P)
        sizes = [tuple(original_size or (height, width)), tuple(crops_coords_top_left),
                 tuple(target_size or (height, width))]
        time_ids = micro_conditioning(*sizes, batch=len(context), dtype=context.dtype, device=self.device)  # (2B, 6)
        added_cond_kwargs = {"text_embeds": pooled, "time_ids": time_ids}

        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = self.timesteps_until(denoising_end)
        batch = len(context) // (2 if guided else 1)
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        latents = draw_latents(shape, generator, self.device, context.dtype) * self.scheduler.init_noise_sigma
        latents = self.denoise(latents, context, timesteps, as_float(guidance_scale, "guidance_scale"),
                               self.step_options(generator, eta), callback, progress,
                               predict_noise=lambda model_input, t, context, step: self.unet(
                                   model_input, t, context, added_cond_kwargs=added_cond_kwargs))
        return self.finish(latents, output_type)
