"""Loaders for Chapter 07: ControlNets from diffusers objects and folders, and the pipeline class a folder names.

``controlnet_from_diffusers(m)`` copies a diffusers ``ControlNetModel``; ``load_controlnet`` reads a
diffusers-format ControlNet folder or hub id (``config.json`` plus safetensors, the layout of
``lllyasviel/sd-controlnet-canny``), strictly, as every loader in ``pretrained`` does.
``pipeline_from_components`` is how ``pretrained.load_pipeline`` returns the class that a folder's
``model_index.json`` names: an inpainting folder such as
``stable-diffusion-v1-5/stable-diffusion-inpainting`` gives a ``StableDiffusionInpaint``.
Both names are re-exported by ``pretrained``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .checks import as_device
from .controlnet import ControlNet, ControlNetConfig, StableDiffusionControlNet
from .editing import StableDiffusionImg2Img, StableDiffusionInpaint
from .pipeline import StableDiffusion
from .pretrained import (SAFETENSORS_NAMES, component_folder, load_state_dict_strict, read_config, read_weights,
                         unet_key, weights_file_name)

# model_index.json's _class_name -> the class load_pipeline builds
PIPELINE_CLASSES = {
    "StableDiffusionPipeline": StableDiffusion,
    "StableDiffusionImg2ImgPipeline": StableDiffusionImg2Img,
    "StableDiffusionInpaintPipeline": StableDiffusionInpaint,
    "StableDiffusionControlNetPipeline": StableDiffusionControlNet,
}


def controlnet_key(diffusers_key: str) -> str:
    """The name of a diffusers ``ControlNetModel`` weight in ``ldm_teach.controlnet.ControlNet``: the U-Net's
    renames for the copied blocks; the embedding and zero convolutions keep their names."""
    return unet_key(diffusers_key)


def _controlnet_from_state_dict(config: dict, state_dict: dict[str, torch.Tensor], what: str) -> ControlNet:
    with torch.device("meta"):  # no random initialisation: every weight comes from the checkpoint
        controlnet = ControlNet(ControlNetConfig.from_diffusers_config(config))
    return load_state_dict_strict(controlnet, {controlnet_key(k): v for k, v in state_dict.items()}, what)


def controlnet_from_diffusers(model) -> ControlNet:
    """Our ``ControlNet`` with the config and (copied) weights of a diffusers ``ControlNetModel``, on its device
    and dtype."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return _controlnet_from_state_dict(dict(model.config), weights, "diffusers ControlNetModel").eval()


def load_controlnet(path_or_repo_id: str | os.PathLike, subfolder: str | None = None, revision: str | None = None,
                    dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
                    variant: str | None = None) -> ControlNet:
    """Our ``ControlNet`` from a diffusers-format folder or hub id (``config.json`` plus safetensors).

    ``lllyasviel/sd-controlnet-canny`` and its siblings keep the ControlNet at the top of the
    repository; ``subfolder="controlnet"`` reads the one inside a saved ControlNet pipeline folder.
    From the hub only the config and the one weights file are downloaded.
    """
    device = as_device(device)  # checked before any weights are read or downloaded
    folder = component_folder(path_or_repo_id, subfolder, revision, weights_file_name(SAFETENSORS_NAMES[0], variant))
    controlnet = _controlnet_from_state_dict(read_config(folder), read_weights(folder, variant=variant),
                                             f"ControlNet in {folder}")
    return controlnet.to(device=device, dtype=dtype).eval()


def pipeline_from_components(root: Path, components: dict, dtype: torch.dtype, device, variant: str | None):
    """The pipeline class ``model_index.json`` names, built from ``components`` (and the folder's ``controlnet/``)."""
    class_name = read_config(root, "model_index.json").get("_class_name", "StableDiffusionPipeline")
    if class_name not in PIPELINE_CLASSES:
        raise ValueError(f"{root}/model_index.json names a {class_name}; ldm_teach builds {sorted(PIPELINE_CLASSES)}.")
    pipeline_class = PIPELINE_CLASSES[class_name]
    if pipeline_class is StableDiffusionControlNet:
        if not (root / "controlnet").is_dir():
            raise FileNotFoundError(f"{root} is a ControlNet pipeline folder without its controlnet/ folder.")
        components["controlnet"] = load_controlnet(root, "controlnet", dtype=dtype, device=device, variant=variant)
    return pipeline_class(**components)
