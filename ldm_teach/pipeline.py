"""Text to image: the sampling loop that joins the tokenizer, text encoder, U-Net, scheduler and VAE.

Chapter 06 builds this file top to bottom:

1. ``classifier_free_guidance``: one noise prediction with the prompt and one without, pushed apart
   by the guidance scale (section "Classifier-free guidance");
2. ``draw_latents``: the starting noise, drawn exactly as diffusers draws it, so that a seed
   names the same image in both libraries (section "Seeds and reproducibility");
3. ``to_output``: images in [-1, 1] to PIL images, a NumPy array or a tensor in [0, 1];
4. ``StableDiffusion``: prompts to context, noise to latents through the scheduler's loop, latents
   to pixels through the VAE (sections "The sampling loop, by hand" and "The pipeline").

It is called like diffusers' ``StableDiffusionPipeline`` and, on the same weights, scheduler,
prompts and seeded generator, gives the same images (``tests/test_pipeline.py``). The loaders
that build one from a diffusers folder, the hub or a single checkpoint file live in
``pretrained.py`` (``load_pipeline``, ``load_single_file``).
"""
from __future__ import annotations

import inspect
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .checks import as_device, as_float, as_int, check_callable, check_generator, check_tensor
from .lora_files import AdapterLoading

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class PipelineOutput:
    """What a pipeline call returns, as diffusers does: ``images`` is a list of PIL images
    (``output_type="pil"``), a (B, H, W, 3) array (``"np"``), a (B, 3, H, W) tensor (``"pt"``),
    all in [0, 1], or the final latents (B, 4, H/8, W/8) (``"latent"``)."""

    images: list | np.ndarray | torch.Tensor


# --- the pieces ----------------------------------------------------------------------------


def warn(message: str) -> None:
    """A UserWarning shown at the caller's line: the first frame outside ldm_teach and torch's no_grad wrapper."""
    frame, stacklevel = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("ldm_teach", "torch")):
        frame, stacklevel = frame.f_back, stacklevel + 1
    warnings.warn(message, UserWarning, stacklevel=stacklevel)


def classifier_free_guidance(noise_uncond: torch.Tensor, noise_text: torch.Tensor,
                             guidance_scale: float) -> torch.Tensor:
    """ε̂ = ε_uncond + s · (ε_text − ε_uncond) (Chapter 06, section "Classifier-free guidance").

    The same U-Net predicts the noise twice, once given the prompt and once given the empty
    prompt. s = 0 is the unconditional prediction, s = 1 the conditional one, and s > 1 goes past
    it, further in the direction the prompt pulls: images that follow the prompt more closely, at
    the cost of variety (SD's default is 7.5).
    """
    return noise_uncond + guidance_scale * (noise_text - noise_uncond)


def draw_latents(shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator] | None,
                 device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal starting latents, drawn as diffusers' ``randn_tensor`` draws them
    (Chapter 06, section "Seeds and reproducibility").

    The numbers come from the generator's own device: a CPU generator draws on the CPU and the
    result is moved, so a CPU seed gives the same image on any machine, while a CUDA generator
    draws different numbers from the same seed. A list of generators draws one image each, so
    that image i of a batch is the image a single run with generator i gives.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(
                f"{len(generator)} generators were passed for a batch of {shape[0]} images; pass one generator, "
                "or one per image (prompts x num_images_per_prompt)."
            )
        if len(generator) > 1:
            return torch.cat([draw_latents((1, *shape[1:]), one, device, dtype) for one in generator])  # (B, C, h, w)
        generator = generator[0]
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


def to_output(images: torch.Tensor, output_type: str = "pil"):
    """Decoded images (B, 3, H, W), about [-1, 1], as diffusers' post-processing returns them.

    Mapped to [0, 1] and clipped (in the VAE's dtype, as diffusers does), then kept as a tensor
    (``"pt"``), moved to a (B, H, W, 3) float32 array (``"np"``), or rounded to 8-bit PIL images.
    """
    images = (images * 0.5 + 0.5).clamp(0, 1)  # (B, 3, H, W) in [0, 1]
    if output_type == "pt":
        return images
    array = images.cpu().permute(0, 2, 3, 1).float().numpy()  # (B, H, W, 3)
    if output_type == "np":
        return array
    return [Image.fromarray(image) for image in (array * 255).round().astype("uint8")]


# --- the pipeline --------------------------------------------------------------------------


class StableDiffusion(AdapterLoading):
    """Text-to-image with a U-Net, a VAE, a CLIP text encoder and tokenizer, and a scheduler
    (Chapter 06, section "The pipeline").

    ``pipe(prompt, negative_prompt=None, num_inference_steps=50, guidance_scale=7.5, height=None,
    width=None, generator=None, output_type="pil")`` returns a ``PipelineOutput``, as diffusers'
    ``StableDiffusionPipeline`` does. ``pipe.to(device, dtype)`` moves the three models together;
    ``pipe.load_lora_weights(path)`` and ``pipe.load_textual_inversion(path)`` read shared files (Chapter 09).
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler):
        if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
            raise ValueError(
                f"the U-Net cross-attends to {unet.config.cross_attention_dim}-wide text features, but the text "
                f"encoder writes {text_encoder.config.hidden_size}-wide ones; use the text encoder it was trained with."
            )
        self.check_unet_channels(unet, vae)
        self.unet, self.vae, self.text_encoder = unet.eval(), vae.eval(), text_encoder.eval()
        self.tokenizer, self.scheduler = tokenizer, scheduler

    @staticmethod
    def check_unet_channels(unet, vae) -> None:
        """Text to image: the U-Net takes exactly the VAE's latents (inpainting accepts more, Chapter 07)."""
        if unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(
                f"the U-Net takes {unet.config.in_channels}-channel latents, but the VAE makes "
                f"{vae.config.latent_channels}-channel ones; use the VAE it was trained with."
            )

    @property
    def components(self) -> dict:
        """The models, tokenizer and scheduler by name, so ``OtherPipeline(**pipe.components)`` reuses them
        (e.g. ``StableDiffusionImg2Img(**pipe.components)``, Chapter 07), as in diffusers."""
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder,
                "tokenizer": self.tokenizer, "scheduler": self.scheduler}

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @property
    def vae_scale_factor(self) -> int:
        """f: image pixels per latent cell along each side (8 for SD's VAE)."""
        return self.vae.config.downsample_factor

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "StableDiffusion":
        """Move the U-Net, VAE and text encoder to ``device`` and/or ``dtype`` (float16 and bfloat16 are for GPUs)."""
        device = as_device(device)
        for model in (self.unet, self.vae, self.text_encoder):
            model.to(device=device, dtype=dtype)
        return self

    # --- the steps of a call ---------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], what: str = "prompt") -> torch.Tensor:
        """Token ids, then the text encoder's per-token features: the U-Net's context (B, 77, D).

        A prompt over 77 tokens is cut, with a warning that names the dropped words.
        """
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ids = self.tokenizer(self.expand_prompts(prompts, self.tokenizer)).to(self.text_encoder.token_embedding.weight.device)  # (B, 77)
        for warning in caught:
            warn(str(warning.message).replace("prompt", what, 1))
        return self.text_encoder(ids).to(self.dtype)  # (B, 77, D)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, h, w) -> images (B, 3, h·f, w·f) in about [-1, 1]: undo the scaling, then decode."""
        return self.vae.decode(latents / self.vae.scaling_factor)

    def default_size(self) -> int:
        """The image side the U-Net was trained at: its latent ``sample_size`` times f (SD 1.5: 64 x 8 = 512)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, height: int | None = None,
                 width: int | None = None, generator: torch.Generator | list[torch.Generator] | None = None,
                 output_type: str = "pil", eta: float = 0.0, latents: torch.Tensor | None = None,
                 num_images_per_prompt: int = 1, callback=None, progress: bool = True) -> PipelineOutput:
        """Images for ``prompt`` (a string or a list of strings), as diffusers' pipeline makes them.

        With ``guidance_scale > 1`` each step runs the U-Net once on a batch of two latents per
        image, the negative prompt's (the empty prompt when none is given) and the prompt's, and
        combines the two predictions by ``classifier_free_guidance``; at ``guidance_scale <= 1``
        only the prompt's is computed. ``eta`` is DDIM's noise level (other schedulers ignore it);
        ``latents`` replaces the starting noise; ``callback(step, t, latents)`` is called after
        every step, e.g. to keep the intermediate latents.
        """
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a str or a non-empty list of str, got {prompt!r:.100}.")
        guidance_scale = as_float(guidance_scale, "guidance_scale")
        guided = guidance_scale > 1
        negatives = self.check_negative_prompt(negative_prompt, len(prompts), guided)
        height, width = self.check_size(height, width)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not one of {OUTPUT_TYPES}.")
        num_inference_steps = as_int(num_inference_steps, "num_inference_steps", minimum=1)
        num_images_per_prompt = as_int(num_images_per_prompt, "num_images_per_prompt", minimum=1)
        eta = as_float(eta, "eta")
        if not 0 <= eta <= 1:
            raise ValueError(f"eta={eta} must lie in [0, 1] (0: deterministic DDIM, 1: DDPM's noise at every step).")
        check_generator(generator)
        check_callable(callback, "callback")
        if latents is not None:
            check_tensor(latents, "latents")
        self.check_devices()
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]  # each prompt's images side by side
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]

        context = self.encode_prompts(prompts)  # (B, 77, D)
        if guided:  # the unconditional rows first, then the prompts', as diffusers orders the batch
            context = torch.cat([self.encode_prompts(negatives, "negative prompt"), context])  # (2B, 77, D)

        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        shape = (len(prompts), self.unet.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)  # (B, 4, H/f, W/f)
        if latents is None:
            latents = draw_latents(shape, generator, self.device, context.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents has shape {tuple(latents.shape)}, but {height}x{width} images of this "
                             f"batch need {shape}.")
        latents = latents.to(self.device) * self.scheduler.init_noise_sigma
        step_options = self.step_options(generator, eta)

        for step, t in enumerate(tqdm(self.scheduler.timesteps, desc="denoising", disable=not progress)):
            model_input = torch.cat([latents] * 2) if guided else latents  # (2B, 4, h, w) when guided
            model_input = self.scheduler.scale_model_input(model_input, t)
            noise_pred = self.unet(model_input, t, context)
            if guided:
                noise_uncond, noise_text = noise_pred.chunk(2)  # (B, 4, h, w) each
                noise_pred = classifier_free_guidance(noise_uncond, noise_text, guidance_scale)
            latents = self.scheduler.step(noise_pred, t, latents, **step_options)
            if callback is not None:
                callback(step, t, latents)

        if output_type == "latent":
            return PipelineOutput(latents)
        return PipelineOutput(to_output(self.decode_latents(latents), output_type))

    # --- checks ------------------------------------------------------------------------------

    def check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """Height and width (default: the trained size), refused unless positive multiples of 8 and of f."""
        multiple = max(8, self.vae_scale_factor)
        sizes = {name: self.default_size() if size is None else as_int(size, name)
                 for name, size in (("height", height), ("width", width))}
        for name, size in sizes.items():
            if size <= 0 or size % multiple:
                below = max(multiple, size // multiple * multiple)
                raise ValueError(
                    f"{name}={size!r} is not a positive multiple of {multiple}: the VAE maps each "
                    f"{self.vae_scale_factor}x{self.vae_scale_factor} pixels to one latent cell, and diffusers "
                    "asks for multiples of 8. "
                    f"Use e.g. {name}={below} or {name}={below + multiple}."
                )
        return sizes["height"], sizes["width"]

    @staticmethod
    def check_negative_prompt(negative_prompt, batch_size: int, guided: bool) -> list[str]:
        """One negative prompt per prompt: "" (the unconditional) when none is given; one string serves all."""
        if negative_prompt is not None and not guided:
            warn("negative_prompt has no effect at guidance_scale <= 1: without guidance there is no "
                 "unconditional prediction for it to replace. Use guidance_scale > 1.")
        if negative_prompt is None:
            return [""] * batch_size
        if isinstance(negative_prompt, str):
            return [negative_prompt] * batch_size
        if not isinstance(negative_prompt, (list, tuple)) or not all(isinstance(n, str) for n in negative_prompt):
            raise TypeError(f"negative_prompt must be a str or a list of str, got {negative_prompt!r:.100}.")
        if len(negative_prompt) != batch_size:
            raise ValueError(
                f"{len(negative_prompt)} negative prompts were given for {batch_size} prompts; pass one per prompt, "
                "or a single string for all of them."
            )
        return list(negative_prompt)

    def check_devices(self) -> None:
        """The three models on one device in one dtype, or an error that says how to move them."""
        placed = {name: (next(model.parameters()).device, next(model.parameters()).dtype)
                  for name, model in (("unet", self.unet), ("vae", self.vae), ("text_encoder", self.text_encoder))}
        if len(set(placed.values())) > 1:
            where = ", ".join(f"{name} {dtype} on {device}" for name, (device, dtype) in placed.items())
            raise ValueError(f"the models are spread over devices or dtypes ({where}); "
                             "move them together with pipe.to(device, dtype).")

    def step_options(self, generator, eta: float) -> dict:
        """The scheduler's extra ``step`` arguments, picked as diffusers' pipelines pick them: DDIM's ``eta``,
        and the generator (one, or one per image) for the steps that draw noise (DDPM, DDIM with eta > 0,
        Euler ancestral), so that a seeded run draws diffusers' numbers."""
        parameters = inspect.signature(self.scheduler.step).parameters
        options = {"eta": eta} if "eta" in parameters else {}
        if "generator" in parameters:
            options["generator"] = generator
        return options


# --- the editing pipelines of Chapter 07 and SDXL (Chapter 08) ---------------------------------

EDITING_PIPELINES = {"StableDiffusionImg2Img": "editing", "StableDiffusionInpaint": "editing",
                     "StableDiffusionControlNet": "controlnet", "StableDiffusionXL": "pipeline_sdxl",
                     "StableDiffusionXLImg2Img": "pipeline_sdxl_refiner"}


def __getattr__(name: str):
    """``pipeline.StableDiffusionImg2Img`` and the other Chapter 07 pipelines, which live in ``editing.py``
    and ``controlnet.py``, and Chapter 08's ``StableDiffusionXL`` (``pipeline_sdxl.py``) and
    ``StableDiffusionXLImg2Img`` (``pipeline_sdxl_refiner.py``); they import this module, so they are
    imported on first use."""
    if name in EDITING_PIPELINES:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{EDITING_PIPELINES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
