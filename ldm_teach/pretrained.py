"""Real weights into our own classes: from diffusers/transformers objects, folders and the hub.

ldm_teach never imports diffusers or transformers. The ``*_from_diffusers`` and
``*_from_transformers`` functions take an object the caller already has, read its config
and its ``state_dict()``, and build our model; the ``load_*`` functions read a
diffusers-format folder (``config.json`` plus safetensors) directly, or download one
from the Hugging Face hub.

Every load is strict: a key that is missing or unexpected is an error that lists them,
never a silently half-loaded model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from .clip import TextEncoder, TextEncoderConfig
from .schedulers import SCHEDULERS, Scheduler
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig

SAFETENSORS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


# --- reading folders -----------------------------------------------------------------------


def resolve_folder(path_or_repo_id: str | os.PathLike, subfolder: str | None = None, revision: str | None = None,
                   allow_patterns: list[str] | None = None) -> Path:
    """A local folder for ``path_or_repo_id`` (joined with ``subfolder``), downloading from the hub if needed.

    Only the files named by ``allow_patterns`` are downloaded (default: configs and
    safetensors under ``subfolder``), so a whole repository's other formats never arrive.
    """
    local = Path(path_or_repo_id)
    if local.exists():
        folder = local / subfolder if subfolder else local
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist: the folder {local} has no {subfolder!r} component.")
        return folder
    name = str(path_or_repo_id)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{name} is neither a local folder nor a hub id like 'owner/name'.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    prefix = f"{subfolder}/" if subfolder else ""
    patterns = allow_patterns or [f"{prefix}*.json", f"{prefix}*.safetensors", f"{prefix}*.txt"]
    try:
        root = snapshot_download(str(path_or_repo_id), revision=revision, allow_patterns=patterns)
    except LocalEntryNotFoundError as error:
        raise OSError(
            f"{path_or_repo_id!r} is not in the local Hugging Face cache and the hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE=1). Download it once with network access, e.g. "
            f"`huggingface-cli download {path_or_repo_id}`, or pass the path of a local copy."
        ) from error
    return Path(root) / subfolder if subfolder else Path(root)


def read_config(folder: Path, name: str = "config.json") -> dict:
    """The JSON config of a component folder, with a clear error when it is missing."""
    path = Path(folder) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a diffusers-format component folder holds {name} beside its weights.")
    return json.loads(path.read_text())


def weights_file_name(name: str, variant: str | None) -> str:
    """``diffusion_pytorch_model.safetensors``, or with ``variant="fp16"`` ``diffusion_pytorch_model.fp16.safetensors``."""
    return name.replace(".safetensors", f".{variant}.safetensors") if variant else name


def read_weights(folder: Path, names=SAFETENSORS_NAMES, variant: str | None = None) -> dict[str, torch.Tensor]:
    """The safetensors state dict of a component folder (``variant="fp16"`` reads ``*.fp16.safetensors``)."""
    folder = Path(folder)
    candidates = [weights_file_name(n, variant) for n in names]
    for name in candidates:
        if (folder / name).is_file():
            return load_file(folder / name)
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    hint = " Only pickle weights (.bin/.ckpt) are there; convert them to safetensors." if any(
        n.endswith((".bin", ".ckpt", ".pt")) for n in found) else ""
    raise FileNotFoundError(
        f"no weights in {folder}: expected one of {candidates}, found {found or 'nothing'}.{hint}"
    )


def component_folder(path_or_repo_id: str | os.PathLike, subfolder: str | None, revision: str | None,
                     weights_name: str) -> Path:
    """The local folder of one pipeline component (``unet/``, ``vae/``, ...), downloading only its files.

    A local folder with its own ``config.json`` and no ``subfolder`` inside (what a model's
    ``save_pretrained`` writes) is taken as the component folder itself. From the hub only the
    config and the one weights file asked for are downloaded.
    """
    local = Path(path_or_repo_id)
    if subfolder and local.is_dir() and not (local / subfolder).exists() and (local / "config.json").is_file():
        subfolder = None
    prefix = f"{subfolder}/" if subfolder else ""
    return resolve_folder(path_or_repo_id, subfolder, revision,
                          allow_patterns=[f"{prefix}config.json", f"{prefix}{weights_name}"])


def rename(key: str, renames: tuple[tuple[str, str], ...]) -> str:
    """Apply plain substring renames, in order: the rule-based mapping between two naming schemes."""
    for old, new in renames:
        key = key.replace(old, new)
    return key


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    """Copy ``state_dict`` into ``model``, refusing any missing, unexpected or mis-shaped key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict) if state_dict[k].shape != own[k].shape
    )
    if missing or unexpected or mis_shaped:
        def show(keys):
            return ", ".join(keys[:10]) + (f" ... and {len(keys) - 10} more" if len(keys) > 10 else "") or "none"

        raise KeyError(
            f"the {what} checkpoint does not match the model built from its config.\n"
            f"  missing keys ({len(missing)}): {show(missing)}\n"
            f"  unexpected keys ({len(unexpected)}): {show(unexpected)}\n"
            f"  mis-shaped ({len(mis_shaped)}): {show(mis_shaped)}\n"
            "Check that the config and the weights come from the same model."
        )
    model.load_state_dict(state_dict, strict=True, assign=any(p.is_meta for p in model.parameters()))
    return model


# --- VAE -----------------------------------------------------------------------------------

# Our VAE keeps diffusers' module names except in these places (applied in order, as plain
# substring replacements). The last three cover the attention names of diffusers < 0.14
# (query/key/value/proj_attn), still found in some saved folders.
VAE_KEY_RENAMES = (
    (".downsamplers.0.", ".downsample."),
    (".upsamplers.0.", ".upsample."),
    (".attentions.0.", ".attention."),
    (".attention.to_out.0.", ".attention.to_out."),
    (".attention.proj_attn.", ".attention.to_out."),
    (".attention.query.", ".attention.to_q."),
    (".attention.key.", ".attention.to_k."),
    (".attention.value.", ".attention.to_v."),
)


def vae_key(diffusers_key: str) -> str:
    """The name of a diffusers ``AutoencoderKL`` weight in ``ldm_teach.vae.AutoencoderKL``."""
    return rename(diffusers_key, VAE_KEY_RENAMES)


def _vae_from_state_dict(config: dict, state_dict: dict[str, torch.Tensor], what: str) -> AutoencoderKL:
    with torch.device("meta"):  # no random initialisation: every weight comes from the checkpoint
        vae = AutoencoderKL(VAEConfig.from_diffusers_config(config))
    return load_state_dict_strict(vae, {vae_key(k): v for k, v in state_dict.items()}, what)


def vae_from_diffusers(model) -> AutoencoderKL:
    """Our ``AutoencoderKL`` with the config and (copied) weights of a diffusers ``AutoencoderKL``, on its device and dtype."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return _vae_from_state_dict(dict(model.config), weights, "diffusers AutoencoderKL").eval()


def load_vae(path_or_repo_id: str | os.PathLike, subfolder: str | None = "vae", revision: str | None = None,
             dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
             variant: str | None = None) -> AutoencoderKL:
    """Our ``AutoencoderKL`` from a diffusers-format folder or hub id (``config.json`` plus safetensors).

    ``subfolder="vae"`` reads the VAE of a whole pipeline (``runwayml/stable-diffusion-v1-5``).
    For a folder or repository that *is* a VAE (``stabilityai/sd-vae-ft-mse``, or what
    ``AutoencoderKL.save_pretrained`` writes) pass ``subfolder=None``; a local folder with its own
    ``config.json`` and no ``vae/`` inside is read as a VAE folder either way.
    """
    folder = component_folder(path_or_repo_id, subfolder, revision, weights_file_name(SAFETENSORS_NAMES[0], variant))
    vae = _vae_from_state_dict(read_config(folder), read_weights(folder, variant=variant), f"VAE in {folder}")
    return vae.to(device=device, dtype=dtype).eval()


# --- U-Net ---------------------------------------------------------------------------------

# Our U-Net keeps diffusers' module names except in these places (plain substring replacements):
# diffusers wraps single layers in lists (a Dropout after the attention output, the GEGLU
# projection inside a Sequential, one down/upsampler per level in a ModuleList).
UNET_KEY_RENAMES = (
    (".to_out.0.", ".to_out."),
    (".ff.net.0.proj.", ".ff.proj_in."),
    (".ff.net.2.", ".ff.proj_out."),
    (".downsamplers.0.", ".downsample."),
    (".upsamplers.0.", ".upsample."),
)


def unet_key(diffusers_key: str) -> str:
    """The name of a diffusers ``UNet2DConditionModel`` weight in ``ldm_teach.unet.UNet``."""
    return rename(diffusers_key, UNET_KEY_RENAMES)


def _unet_from_state_dict(config: dict, state_dict: dict[str, torch.Tensor], what: str) -> UNet:
    with torch.device("meta"):  # no random initialisation: every weight comes from the checkpoint
        unet = UNet(UNetConfig.from_diffusers_config(config))
    return load_state_dict_strict(unet, {unet_key(k): v for k, v in state_dict.items()}, what)


def unet_from_diffusers(model) -> UNet:
    """Our ``UNet`` with the config and (copied) weights of a diffusers ``UNet2DConditionModel``, on its device
    and dtype."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return _unet_from_state_dict(dict(model.config), weights, "diffusers UNet2DConditionModel").eval()


def load_unet(path_or_repo_id: str | os.PathLike, subfolder: str | None = "unet", revision: str | None = None,
              dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
              variant: str | None = None) -> UNet:
    """Our ``UNet`` from a diffusers-format folder or hub id (``config.json`` plus safetensors).

    ``subfolder="unet"`` reads the U-Net of a whole pipeline (``runwayml/stable-diffusion-v1-5``);
    a local folder with its own ``config.json`` and no ``unet/`` inside (what
    ``UNet2DConditionModel.save_pretrained`` writes) is read as a U-Net folder. From the hub only
    the config and the one weights file asked for are downloaded (``variant="fp16"``: the
    half-size ``diffusion_pytorch_model.fp16.safetensors``).
    """
    folder = component_folder(path_or_repo_id, subfolder, revision, weights_file_name(SAFETENSORS_NAMES[0], variant))
    unet = _unet_from_state_dict(read_config(folder), read_weights(folder, variant=variant), f"U-Net in {folder}")
    return unet.to(device=device, dtype=dtype).eval()


# --- schedulers ----------------------------------------------------------------------------


def scheduler_from_config(config: dict) -> Scheduler:
    """Our scheduler from a diffusers ``scheduler_config.json`` dict, picked by its ``_class_name``.

    The other keys are the scheduler's configuration (see ``ldm_teach.schedulers``); features
    we do not implement are refused unless they are switched off.
    """
    class_name = config.get("_class_name")
    if class_name not in SCHEDULERS:
        raise ValueError(
            f"scheduler class {class_name!r} is not implemented in ldm_teach; supported: {sorted(SCHEDULERS)}. "
            "Swap in one of them, e.g. config['_class_name'] = 'DDIMScheduler' (their configs share keys)."
        )
    return SCHEDULERS[class_name](**config)


def scheduler_from_diffusers(scheduler) -> Scheduler:
    """Our scheduler with the same class name and configuration as a diffusers scheduler object."""
    return scheduler_from_config({**dict(scheduler.config), "_class_name": type(scheduler).__name__})


# --- CLIP text encoder ---------------------------------------------------------------------

# transformers' CLIPTextModel nests its weights as text_model.embeddings.*, text_model.encoder.layers.*
# and text_model.final_layer_norm.*; ours sit one level up (token_embedding, layers.0..., final_layer_norm).
# Folders written by transformers 5 drop the "text_model." prefix; SD checkpoints keep it.
TEXT_ENCODER_PREFIXES = ("text_model.", "embeddings.", "encoder.")
# Older transformers saved the position ids 0..76 as a buffer; they are recomputed, not weights.
TEXT_ENCODER_IGNORED_KEYS = ("text_model.embeddings.position_ids", "embeddings.position_ids")


def text_encoder_key(transformers_key: str) -> str:
    """The name of a transformers ``CLIPTextModel`` weight in ``ldm_teach.clip.TextEncoder``."""
    for prefix in TEXT_ENCODER_PREFIXES:
        transformers_key = transformers_key.removeprefix(prefix)
    return transformers_key


def _text_encoder_from_state_dict(config: dict, state_dict: dict[str, torch.Tensor], what: str) -> TextEncoder:
    with torch.device("meta"):  # no random initialisation: every weight comes from the checkpoint
        text_encoder = TextEncoder(TextEncoderConfig.from_transformers_config(config))
    weights = {text_encoder_key(k): v for k, v in state_dict.items() if k not in TEXT_ENCODER_IGNORED_KEYS}
    return load_state_dict_strict(text_encoder, weights, what)


def text_encoder_from_transformers(model) -> TextEncoder:
    """Our ``TextEncoder`` with the config and (copied) weights of a transformers ``CLIPTextModel``,
    on its device and dtype."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return _text_encoder_from_state_dict(model.config.to_dict(), weights, "transformers CLIPTextModel").eval()


def load_text_encoder(path_or_repo_id: str | os.PathLike, subfolder: str | None = "text_encoder",
                      revision: str | None = None, dtype: torch.dtype = torch.float32,
                      device: str | torch.device | None = None) -> TextEncoder:
    """Our ``TextEncoder`` from a transformers-format folder or hub id (``config.json`` plus ``model.safetensors``).

    ``subfolder="text_encoder"`` reads the text encoder of a whole pipeline; a local folder with
    its own ``config.json`` and no ``text_encoder/`` inside (what ``CLIPTextModel.save_pretrained``
    writes) is read as a text encoder folder.
    """
    folder = component_folder(path_or_repo_id, subfolder, revision, SAFETENSORS_NAMES[1])
    text_encoder = _text_encoder_from_state_dict(read_config(folder), read_weights(folder), f"text encoder in {folder}")
    return text_encoder.to(device=device, dtype=dtype).eval()
