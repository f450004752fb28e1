"""Loaders for Chapter 08: an SDXL pipeline folder into ``StableDiffusionXL`` or ``StableDiffusionXLImg2Img``.

An SDXL folder (``stabilityai/stable-diffusion-xl-base-1.0``, or what diffusers'
``StableDiffusionXLPipeline.save_pretrained`` writes) holds two text encoders and two tokenizers
next to the U-Net, VAE and scheduler. The refiner's (``stabilityai/stable-diffusion-xl-refiner-1.0``,
``StableDiffusionXLImg2ImgPipeline``) names ``text_encoder`` and ``tokenizer`` as ``[null, null]``:
it has only the second encoder. Its ``model_index.json`` also carries the two switches the
pipelines take, ``requires_aesthetics_score`` and ``force_zeros_for_empty_prompt``.
``pretrained.load_pipeline`` hands such folders to ``load_sdxl_pipeline``; every part loads
strictly, as everywhere in ``pretrained``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .clip import Tokenizer
from .pipeline_sdxl import StableDiffusionXL
from .pipeline_sdxl_refiner import StableDiffusionXLImg2Img
from .pretrained import (PIPELINE_COMPONENTS, check_model_index, load_text_encoder, load_unet, load_vae,
                         named_class, read_config, scheduler_from_config)

# model_index.json's _class_name -> the class load_sdxl_pipeline builds
SDXL_PIPELINE_CLASSES = {
    "StableDiffusionXLPipeline": StableDiffusionXL,
    "StableDiffusionXLImg2ImgPipeline": StableDiffusionXLImg2Img,
}
# The components of an SDXL folder, with the classes model_index.json may name for each.
SDXL_COMPONENTS = {**PIPELINE_COMPONENTS, "text_encoder_2": ("CLIPTextModelWithProjection",),
                   "tokenizer_2": PIPELINE_COMPONENTS["tokenizer"]}
# The components a pipeline class runs without (the refiner's folder has no first text encoder).
OPTIONAL_COMPONENTS = {"StableDiffusionXLImg2ImgPipeline": ("text_encoder", "tokenizer")}


def load_sdxl_pipeline(root: Path, dtype: torch.dtype = torch.float32, device: torch.device | None = None,
                       variant: str | None = None) -> StableDiffusionXL:
    """The SDXL pipeline class the folder's ``model_index.json`` names, its parts loaded strictly.

    Called by ``pretrained.load_pipeline``, which resolves hub ids and checks ``device``.
    """
    index = read_config(root, "model_index.json")
    class_name = index.get("_class_name")
    if class_name not in SDXL_PIPELINE_CLASSES:
        raise ValueError(f"{root}/model_index.json names a {class_name}; of the SDXL pipelines ldm_teach builds "
                         f"{sorted(SDXL_PIPELINE_CLASSES)}.")
    check_model_index(root, SDXL_COMPONENTS, OPTIONAL_COMPONENTS.get(class_name, ()), class_name)
    weights = dict(dtype=dtype, device=device, variant=variant)
    has_first = {name: named_class(index, name) is not None for name in ("text_encoder", "tokenizer")}
    components = dict(
        unet=load_unet(root, "unet", **weights),
        vae=load_vae(root, "vae", **weights),
        text_encoder=load_text_encoder(root, "text_encoder", **weights) if has_first["text_encoder"] else None,
        text_encoder_2=load_text_encoder(root, "text_encoder_2", **weights),
        tokenizer=Tokenizer.from_folder(root / "tokenizer") if has_first["tokenizer"] else None,
        tokenizer_2=Tokenizer.from_folder(root / "tokenizer_2"),
        scheduler=scheduler_from_config(read_config(root / "scheduler", "scheduler_config.json")),
    )
    options = {"force_zeros_for_empty_prompt": index.get("force_zeros_for_empty_prompt", True)}
    if class_name == "StableDiffusionXLImg2ImgPipeline":
        options["requires_aesthetics_score"] = index.get("requires_aesthetics_score", False)
    return SDXL_PIPELINE_CLASSES[class_name](**components, **options)
