"""Chapter 08's micro-conditioning on the tiny model: why SDXL tells its U-Net how each picture was cropped.

Training pictures come in every size, and a text-to-image model trains at one: SDXL resizes each
picture and cuts a random square out of it. Many training pictures then show their subject cut
by the border, and a model trained on them draws cut-off subjects too. SDXL's answer (Podell et
al., 2023, section 2.2) is to keep the pictures and tell the U-Net what was done to each: its
original size, the crop's top-left corner and the target size, six numbers per image
(``unet_sdxl.micro_conditioning``) that join the pooled prompt in the added embedding
(``addition_embed_type="text_time"``). At sampling one asks for crop (0, 0) and original size =
target size: a picture that nobody cropped.

This module repeats the experiment on the captioned shapes, in three parts:

* **the data** (``CroppedShapesDataset``): about half the images are the usual 32×32 pictures
  (original (32, 32), crop (0, 0)); the other half are the same shapes drawn at 48×48 and cut to a
  random 32×32 window, so the shape is often cut by the border and the caption ("at the top left")
  describes the picture before the crop, as a web caption does;
* **the model** (``tiny_crop_conditioned``): the zoo's tiny U-Net plus the "text_time" embedding
  (``crop_unet_from``: the zoo's trained weights, the new embedding's last layer at zero, so it
  starts as the text-to-image model), fine-tuned on those images' latents with the zoo's frozen
  VAE and text encoder, its ``text_embeds`` the tiny encoder's pooled prompt (64 wide) and its
  ``time_ids`` the six numbers; cached as the zoo's models are. SDXL trained from scratch; here
  the quick budget (about 100 s on one CPU thread) is a fifth of what the zoo's U-Net took,
  and 600 steps from scratch (``train_crop_unet`` without ``base``) drew blurred blobs that
  matched 9% of their prompts in colour and shape;
* **the measurement** (``measure_cut_shares``): the share of generated shapes that touch the
  border (``touches_border``) when asked for an uncropped picture and when asked for a crop like
  the training data's, with the prompt adherence of each (``evaluate.prompt_adherence``); and
  the same share in the training data itself (``training_cut_shares``), as the reference.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import __version__, clip, data, evaluate, train, zoo
from .checks import as_float, as_int
from .editing import EditingPipeline
from .pipeline import PipelineOutput, draw_latents
from .unet import UNet, UNetConfig
from .unet_sdxl import micro_conditioning
from .zoo_editing import silhouette

BUDGETS = {  # quick: 600 steps of 32 took 92 s on one (shared) CPU thread; full: a Colab GPU
    "quick": {"crop_unet": dict(images=3000, steps=600, batch_size=32, learning_rate=1e-3)},
    "full": {"crop_unet": dict(images=10000, steps=3000, batch_size=64, learning_rate=1e-3)},
}
CROPPED_SHARE = 0.5  # of the training images, cut out of a larger picture
ORIGINAL_SIZE = 48  # the side of the larger pictures the crops are cut from
DATA_SEED = 11  # other images than the text-to-image model's (zoo.SEED)
CROP_STREAM = 1  # the random stream of the crops, apart from ShapesDataset's (seed, index) one
TIME_EMBED_DIM = 32  # sinusoidal features per size number (SDXL: 256)
CONDITIONS = {  # (original size, crop corner (top, left), target size), in pixels
    "uncropped": ((32, 32), (0, 0), (32, 32)),  # what SDXL asks for at sampling
    "cropped": ((48, 48), (12, 12), (32, 32)),  # a crop as the training data's are
}
MEASURE_SEED = 500  # the captions of the measurement: other draws than the training data's


# --- the data ----------------------------------------------------------------------------------


def crop(image: torch.Tensor, top: int, left: int, size: int) -> torch.Tensor:
    """The ``size``×``size`` window of ``image`` (..., H, W) whose top-left pixel is (``top``, ``left``)."""
    top, left, size = as_int(top, "top", minimum=0), as_int(left, "left", minimum=0), as_int(size, "size")
    height, width = image.shape[-2:]
    if top + size > height or left + size > width:
        raise ValueError(f"a {size}x{size} crop at (top, left) = ({top}, {left}) reaches past the {height}x{width} "
                         f"picture (to row {top + size}, column {left + size}); keep top <= {height - size} and "
                         f"left <= {width - size}.")
    return image[..., top:top + size, left:left + size]


class CroppedShapesDataset(data.ShapesDataset):
    """Captioned shapes, a share of them cut out of a larger picture, with the numbers that say how.

    Image i is ShapesDataset's image i (the same shape, caption and jitter): with probability
    ``cropped_share`` (one draw from the seed ``(seed, i, CROP_STREAM)``) drawn at
    ``original_size``² and cut to a random ``image_size``² window, otherwise drawn at
    ``image_size``² as it is. ``crops[i]`` is (original side, top, left); ``time_ids()`` gives
    SDXL's six numbers per image. Items are ``(image, caption)`` as ShapesDataset's.
    """

    def __init__(self, num_samples: int = 1000, image_size: int = 32, seed: int = 0,
                 cropped_share: float = CROPPED_SHARE, original_size: int = ORIGINAL_SIZE,
                 exclude: tuple[tuple[str, str], ...] = zoo.HELD_OUT_PAIRS):
        super().__init__(num_samples, image_size, seed, exclude=exclude)
        cropped_share = as_float(cropped_share, "cropped_share")
        if not 0 <= cropped_share <= 1:
            raise ValueError(f"cropped_share={cropped_share} must lie in [0, 1] (the share of images cut out of "
                             "a larger picture; 0.5 by default).")
        original_size = as_int(original_size, "original_size")
        if original_size < image_size:
            raise ValueError(f"original_size={original_size} is smaller than image_size={image_size}; a crop is cut "
                             f"out of a larger picture, so use {image_size} or more (48 by default).")
        self.crops: list[tuple[int, int, int]] = []
        for i in range(len(self)):
            rng = np.random.default_rng([seed, i, CROP_STREAM])
            if rng.random() < cropped_share:
                top, left = rng.integers(0, original_size - image_size + 1, size=2)
                self.crops.append((original_size, int(top), int(left)))
            else:
                self.crops.append((image_size, 0, 0))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        side, top, left = self.crops[index]
        pixels = data.render(self.specs[index], side, self.jitters[index])  # (side, side, 3) uint8
        image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1  # (3, side, side) in [-1, 1]
        return crop(image, top, left, self.image_size), self.specs[index].caption  # (3, H, W)

    def is_cropped(self) -> torch.Tensor:
        """Which images were cut out of a larger picture: (N,) bool."""
        return torch.tensor([side != self.image_size for side, _, _ in self.crops], dtype=torch.bool)

    def time_ids(self) -> torch.Tensor:
        """SDXL's numbers for every image, (N, 6): original (height, width), crop (top, left), target size."""
        size = self.image_size
        return torch.tensor([[side, side, top, left, size, size] for side, top, left in self.crops],
                            dtype=torch.float32)


def crop_time_ids(original_size: tuple[int, int], crops_coords_top_left: tuple[int, int],
                  target_size: tuple[int, int], batch: int = 1, device=None) -> torch.Tensor:
    """``micro_conditioning``'s (batch, 6), refused for a crop that does not fit in its original picture."""
    for name, pair in (("original_size", original_size), ("crops_coords_top_left", crops_coords_top_left),
                       ("target_size", target_size)):
        if len(pair) != 2:
            raise ValueError(f"{name}={tuple(pair)} must be two numbers, (height, width) or (top, left); "
                             "SDXL's size conditioning is 6 numbers in all.")
    time_ids = micro_conditioning(original_size, crops_coords_top_left, target_size, batch, device=device)
    (height, width), (top, left), (target_height, target_width) = original_size, crops_coords_top_left, target_size
    if min(top, left) < 0 or top + target_height > height or left + target_width > width:
        raise ValueError(f"crops_coords_top_left={tuple(crops_coords_top_left)} with target_size={tuple(target_size)} "
                         f"reaches past original_size={tuple(original_size)}; the crop must lie inside the original "
                         f"picture (uncropped: crops_coords_top_left=(0, 0), original_size=target_size).")
    return time_ids  # (batch, 6)


def touches_border(images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> (B,) bool: does the shape's silhouette (``zoo_editing.silhouette``)
    reach the outer row or column of pixels on any side, i.e. is it cut by the border?"""
    mask = silhouette(images)[:, 0]  # (B, H, W) of 0s and 1s
    ring = torch.cat([mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1]], dim=1)  # (B, 2H + 2W)
    return ring.amax(dim=1) > 0


def training_cut_shares(dataset: CroppedShapesDataset) -> dict[str, float]:
    """The reference: the share of training images whose shape touches the border, uncropped and cropped."""
    cut, cropped = touches_border(dataset.tensors()), dataset.is_cropped()
    return {"uncropped": cut[~cropped].float().mean().item(), "cropped": cut[cropped].float().mean().item()}


# --- the model ---------------------------------------------------------------------------------


def unet_config(pooled_width: int = 64) -> UNetConfig:
    """The zoo's tiny U-Net plus SDXL's added embedding: the pooled prompt and 6 numbers × TIME_EMBED_DIM features."""
    return UNetConfig.tiny(addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
                           projection_class_embeddings_input_dim=pooled_width + 6 * TIME_EMBED_DIM)


def crop_unet_from(unet: UNet, pooled_width: int = 64) -> UNet:
    """``unet`` (the zoo's text-to-image U-Net) with SDXL's added embedding: the same weights, and the new
    embedding's last layer zero, so that it starts out predicting exactly what ``unet`` predicts, whatever
    the numbers, and learns from there what they mean (as chapter 07's inpainting U-Net starts)."""
    config = unet_config(pooled_width)
    if {**vars(unet.config), **{k: getattr(config, k) for k in ADDED_FIELDS}} != vars(config):
        raise ValueError(f"the U-Net's config {unet.config} is not the zoo's tiny one (zoo.unet_config()); "
                         "pass the zoo's text-to-image U-Net.")
    model = UNet(config).to(unet.conv_in.weight.device, unet.conv_in.weight.dtype)
    state = model.state_dict()  # the new embedding's weights, then the base's for everything the two share
    state.update(unet.state_dict())
    model.load_state_dict(state)
    with torch.no_grad():
        model.add_embedding.linear_2.weight.zero_()
        model.add_embedding.linear_2.bias.zero_()
    return model


ADDED_FIELDS = ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim")


class CropConditionedPipeline(EditingPipeline):
    """Text to image with the size numbers: ``pipe(prompt, original_size=None, crops_coords_top_left=(0, 0),
    target_size=None, ...)``, the crop arguments as in ``StableDiffusionXL``, with one text encoder.

    The pooled prompt is the text encoder's (``train.pooled_prompt``); the unconditional rows of
    guidance are the empty prompt's context and pooled vector, as caption dropout trained them.
    """

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] = (0, 0),
                 target_size: tuple[int, int] | None = None, eta: float = 0.0, progress: bool = True) -> PipelineOutput:
        prompts, negatives, guidance_scale = self.check_prompts(prompt, negative_prompt, guidance_scale)
        num_inference_steps, _, eta = self.check_common(num_inference_steps, 1, eta, generator, None, output_type)
        height, width = self.check_size(None, None)
        guided = guidance_scale > 1
        texts = negatives + prompts if guided else prompts  # the unconditional rows first, as diffusers orders them
        ids = self.tokenizer(texts).to(self.device)  # (B or 2B, 77)
        context = self.text_encoder(ids).to(self.dtype)  # (B or 2B, 77, D)
        time_ids = crop_time_ids(tuple(original_size or (height, width)), tuple(crops_coords_top_left),
                                 tuple(target_size or (height, width)), len(texts), self.device)  # (B or 2B, 6)
        added_cond_kwargs = {"text_embeds": train.pooled_prompt(self.text_encoder, ids).to(self.dtype),
                             "time_ids": time_ids.to(self.dtype)}
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        shape = (len(prompts), self.unet.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)  # (B, 4, h, w)
        latents = draw_latents(shape, generator, self.device, self.dtype) * self.scheduler.init_noise_sigma
        latents = self.denoise(latents, context, self.scheduler.timesteps, guidance_scale,
                               self.step_options(generator, eta), progress=progress,
                               predict_noise=lambda model_input, t, context, step: self.unet(
                                   model_input, t, context, added_cond_kwargs=added_cond_kwargs))
        return self.finish(latents, output_type)


def training_config(profile: str) -> train.DiffusionTrainingConfig:
    budget = BUDGETS[profile]["crop_unet"]
    return train.DiffusionTrainingConfig(steps=budget["steps"], batch_size=budget["batch_size"],
                                         learning_rate=budget["learning_rate"], seed=zoo.SEED)


def train_crop_unet(vae, text_encoder: clip.TextEncoder, dataset: CroppedShapesDataset,
                    config: train.DiffusionTrainingConfig, base: UNet | None = None, device=None,
                    progress: bool = True) -> train.LatentDiffusionTrainer:
    """Train a crop-conditioned U-Net on ``dataset``'s latents (frozen ``vae`` and ``text_encoder``), each
    image with its six numbers, from ``base`` (``crop_unet_from``) or, without one, from scratch;
    returns the trainer (``.ema``, ``.seconds``)."""
    device = device or next(vae.parameters()).device
    diffusion_data = train.prepare_diffusion_data(dataset.tensors(), dataset.captions(), text_encoder,
                                                  clip.Tokenizer(), vae=vae, time_ids=dataset.time_ids())
    torch.manual_seed(config.seed)
    pooled_width = diffusion_data.pooled.shape[1]
    unet = UNet(unet_config(pooled_width)) if base is None else crop_unet_from(base, pooled_width)
    unet = unet.to(device).requires_grad_(True)
    trainer = train.LatentDiffusionTrainer(unet, diffusion_data, config)
    trainer.train(progress=progress, description="training the crop-conditioned U-Net")
    return trainer


def tiny_crop_conditioned(profile: str | None = None, retrain: bool = True, device=None,
                          progress: bool = True) -> CropConditionedPipeline:
    """A ready ``CropConditionedPipeline`` with the zoo's VAE and text encoder and a U-Net trained on
    ``CroppedShapesDataset`` (trained on first use, then cached; the training seconds are in
    ``training_record()``)."""
    profile, device = zoo.pick(profile, device)
    base = zoo.tiny_unet(profile, retrain, device, progress=progress)
    vae = zoo.tiny_vae(profile, retrain, device, progress)
    text_encoder = zoo.tiny_text_encoder(profile, retrain, device, progress)
    budget = BUDGETS[profile]["crop_unet"]
    config = training_config(profile)
    settings = {"version": __version__, "budget": budget, "seed": zoo.SEED, "data_seed": DATA_SEED,
                "cropped_share": CROPPED_SHARE, "original_size": ORIGINAL_SIZE,
                "held_out_pairs": [list(pair) for pair in zoo.HELD_OUT_PAIRS],
                "config": asdict(unet_config(text_encoder.config.projection_dim or text_encoder.config.hidden_size)),
                "training": asdict(config),
                "base": zoo.fingerprint(base), "vae": zoo.fingerprint(vae),
                "text_encoder": zoo.fingerprint(text_encoder)}

    def fit():
        dataset = CroppedShapesDataset(budget["images"], seed=DATA_SEED)
        trainer = train_crop_unet(vae, text_encoder, dataset, config, base, device, progress)
        print(f"trained the crop-conditioned U-Net: {trainer.step} steps in {trainer.seconds[-1]:.0f} s")
        return trainer.ema, asdict(trainer.ema.config), {"losses": trainer.losses, "steps": trainer.step,
                                                         "training_seconds": trainer.seconds[-1]}

    unet, _ = zoo.cached("crop_unet", profile, settings, lambda saved: UNet(UNetConfig(**saved)), fit, retrain)
    return CropConditionedPipeline(unet.to(device).requires_grad_(False), vae, text_encoder, clip.Tokenizer(),
                                   zoo.scheduler_for(config))


def training_record(profile: str | None = None) -> dict:
    """The manifest of the cached crop-conditioned U-Net: its losses and ``training_seconds``."""
    return zoo.read_manifest("crop_unet", profile)


# --- the measurement ---------------------------------------------------------------------------


@dataclass
class ConditionResult:
    """What one crop condition gave over several seeds: per seed the share of shapes cut by the border
    and the prompt adherence, and the images (seeds one after another, (S·N, 3, H, W) in [-1, 1]).
    ``exact_shares`` are the shares of the same captions' shapes drawn by ``data.render`` and cropped
    exactly as the condition says: what a model that had learnt the numbers perfectly would show."""

    condition: tuple
    cut_shares: list[float] = field(default_factory=list)
    exact_shares: list[float] = field(default_factory=list)
    adherence: list[evaluate.Adherence] = field(default_factory=list)
    images: torch.Tensor | None = None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.cut_shares)

    @property
    def spread(self) -> float:
        """The standard deviation over seeds (0 for one seed)."""
        return statistics.stdev(self.cut_shares) if len(self.cut_shares) > 1 else 0.0

    def __str__(self) -> str:
        both = statistics.fmean(a.both for a in self.adherence)
        return (f"cut by the border {100 * self.mean:.0f}% ± {100 * self.spread:.0f}% "
                f"(seeds: {', '.join(f'{100 * s:.0f}%' for s in self.cut_shares)}; drawn exactly: "
                f"{100 * statistics.fmean(self.exact_shares):.0f}%); adherence (both) {100 * both:.0f}%")


def exactly_cropped(dataset: data.ShapesDataset, original_size: tuple[int, int], crops_coords_top_left: tuple[int, int],
                    target_size: tuple[int, int]) -> torch.Tensor:
    """``dataset``'s shapes drawn at ``original_size`` and cut at ``crops_coords_top_left`` to ``target_size``:
    (N, 3, H, W) in [-1, 1]. Square sizes only, as the shapes are drawn."""
    crop_time_ids(original_size, crops_coords_top_left, target_size)
    if original_size[0] != original_size[1] or target_size[0] != target_size[1]:
        raise ValueError(f"original_size={tuple(original_size)} and target_size={tuple(target_size)} must be square "
                         "(the shapes are drawn on square pictures).")
    top, left = crops_coords_top_left
    pictures = [torch.from_numpy(data.render(spec, original_size[0], jitter)).permute(2, 0, 1)
                for spec, jitter in zip(dataset.specs, dataset.jitters)]  # N x (3, side, side) uint8
    return torch.stack([crop(picture.float() / 127.5 - 1, top, left, target_size[0]) for picture in pictures])


def measure_cut_shares(pipe: CropConditionedPipeline, classifier: evaluate.ShapeClassifier,
                       conditions: dict[str, tuple] = CONDITIONS, num_images: int = 48, seeds=(0, 1, 2),
                       guidance_scale: float = 7.5, num_inference_steps: int = 50,
                       progress: bool = True) -> dict[str, ConditionResult]:
    """For each crop condition, sample ``num_images`` shapes per seed and measure how many are cut.

    Seed s draws its captions from ``ShapesDataset(num_images, seed=MEASURE_SEED + s)`` (held-out pairs
    excluded) and its starting noise from a generator seeded with s; every condition gets the same
    captions and noise, so the conditions differ in the six numbers only. Each result also holds
    the share for the same shapes drawn and cropped exactly as asked (``exactly_cropped``).
    """
    num_images = as_int(num_images, "num_images")
    results = {name: ConditionResult(tuple(condition)) for name, condition in conditions.items()}
    for name, (original_size, crops_coords_top_left, target_size) in conditions.items():
        crop_time_ids(original_size, crops_coords_top_left, target_size)  # refuse a bad condition before sampling
    for seed in seeds:
        shapes = data.ShapesDataset(num_images, seed=MEASURE_SEED + seed, exclude=zoo.HELD_OUT_PAIRS)
        captions = shapes.captions()
        for name, (original_size, crops_coords_top_left, target_size) in conditions.items():
            exact = exactly_cropped(shapes, original_size, crops_coords_top_left, target_size)
            results[name].exact_shares.append(touches_border(exact).float().mean().item())
            output = pipe(captions, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          generator=torch.Generator().manual_seed(seed), output_type="pt",
                          original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                          target_size=target_size, progress=progress)
            images = output.images.float().cpu() * 2 - 1  # (N, 3, H, W), [0, 1] -> [-1, 1]
            result = results[name]
            result.cut_shares.append(touches_border(images).float().mean().item())
            result.adherence.append(evaluate.prompt_adherence(images, captions, classifier))
            result.images = images if result.images is None else torch.cat([result.images, images])
    return results
