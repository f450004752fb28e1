"""Real weights into our own classes: from diffusers/transformers objects, folders and the hub.

ldm_teach never imports diffusers or transformers. The ``*_from_diffusers`` and
``*_from_transformers`` functions take an object the caller already has, read its config
and its ``state_dict()``, and build our model; the ``load_*`` functions read a
diffusers-format folder (``config.json`` plus safetensors) directly, or download one
from the Hugging Face hub. ``load_pipeline`` reads a whole pipeline folder into a
``pipeline.StableDiffusion``, and ``load_single_file`` an original one-file checkpoint by
rule-based renaming (Chapter 06, section "Loading real weights").

Every load is strict: a key that is missing or unexpected is an error that lists them,
never a silently half-loaded model.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checks import as_device, check_finite_weights
from .clip import TextEncoder, TextEncoderConfig, Tokenizer
from .files import read_checkpoint, read_json, read_safetensors
from .pipeline import StableDiffusion
from .samplers import ALL_SCHEDULERS
from .schedulers import Scheduler
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
    if local.is_file():
        raise FileNotFoundError(
            f"{local} is a file; pass the folder that holds it (a diffusers-format folder with model_index.json or "
            "config.json). For a single .safetensors or .ckpt checkpoint use pretrained.load_single_file."
        )
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
    return read_json(Path(folder) / name)


def weights_file_name(name: str, variant: str | None) -> str:
    """``diffusion_pytorch_model.safetensors``, or with ``variant="fp16"`` ``diffusion_pytorch_model.fp16.safetensors``."""
    return name.replace(".safetensors", f".{variant}.safetensors") if variant else name


def read_weights(folder: Path, names=SAFETENSORS_NAMES, variant: str | None = None) -> dict[str, torch.Tensor]:
    """The safetensors state dict of a component folder (``variant="fp16"`` reads ``*.fp16.safetensors``)."""
    folder = Path(folder)
    candidates = [weights_file_name(n, variant) for n in names]
    for name in candidates:
        if (folder / name).is_file():
            return read_safetensors(folder / name)
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


class KeyMismatchError(KeyError):
    """Keys of a checkpoint that do not match its model. A KeyError that prints its message as written:
    a plain KeyError shows the repr, with every line break as ``\\n`` on one long line."""

    def __str__(self) -> str:
        return str(self.args[0])


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str,
                           check_only: bool = False) -> torch.nn.Module:
    """Copy ``state_dict`` into ``model``, refusing any missing, unexpected or mis-shaped key, and NaN or inf.

    The error lists the keys one per line, up to 10 of each kind and then how many more. With
    ``check_only`` nothing is copied: a caller that loads several parts checks them all first.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict) if state_dict[k].shape != own[k].shape
    )
    if missing or unexpected or mis_shaped:
        def show(kind, keys):
            listed = "".join(f"\n    {key}" for key in keys[:10]) or " none"
            more = f"\n    ... and {len(keys) - 10} more" if len(keys) > 10 else ""
            return f"  {kind} ({len(keys)}):{listed}{more}\n"

        raise KeyMismatchError(
            f"the {what} checkpoint does not match the model built from its config.\n"
            + show("missing keys", missing) + show("unexpected keys", unexpected) + show("mis-shaped", mis_shaped)
            + "Check that the config and the weights come from the same model."
        )
    check_finite_weights(state_dict, what)
    if not check_only:
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
    device = as_device(device)  # checked before any weights are read or downloaded
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
    device = as_device(device)  # checked before any weights are read or downloaded
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
    if class_name is None:
        raise ValueError(f"the scheduler config has no '_class_name' (its keys: {sorted(config)}); a diffusers "
                         "scheduler_config.json names its class, e.g. {'_class_name': 'PNDMScheduler', ...}.")
    if class_name not in ALL_SCHEDULERS:
        raise ValueError(
            f"scheduler class {class_name!r} is not implemented in ldm_teach; supported: {sorted(ALL_SCHEDULERS)}. "
            "Swap in one of them, e.g. config['_class_name'] = 'DDIMScheduler' (their configs share keys)."
        )
    return ALL_SCHEDULERS[class_name](**config)


def scheduler_from_diffusers(scheduler) -> Scheduler:
    """Our scheduler with the same class name and configuration as a diffusers scheduler object."""
    return scheduler_from_config({**dict(scheduler.config), "_class_name": type(scheduler).__name__})


# --- CLIP text encoder ---------------------------------------------------------------------

# transformers' CLIPTextModel nests its weights as text_model.embeddings.*, text_model.encoder.layers.*
# and text_model.final_layer_norm.*; ours sit one level up (token_embedding, layers.0..., final_layer_norm).
# Folders written by transformers 5.6 and later drop the "text_model." prefix; SD checkpoints and older
# transformers keep it, and so does CLIPTextModelWithProjection (SDXL's second encoder), whose
# text_projection.weight sits outside text_model in every version and keeps its name.
TEXT_ENCODER_PREFIXES = ("text_model.", "embeddings.", "encoder.")
# Older transformers saved the position ids 0..76 as a buffer; they are recomputed, not weights.
TEXT_ENCODER_IGNORED_KEYS = ("text_model.embeddings.position_ids", "embeddings.position_ids")


def text_encoder_key(transformers_key: str) -> str:
    """The name of a transformers ``CLIPTextModel`` weight in ``ldm_teach.clip.TextEncoder``."""
    for prefix in TEXT_ENCODER_PREFIXES:
        transformers_key = transformers_key.removeprefix(prefix)
    return transformers_key


def _text_encoder_from_state_dict(config: dict, state_dict: dict[str, torch.Tensor], what: str,
                                  with_projection: bool | None = None) -> TextEncoder:
    with torch.device("meta"):  # no random initialisation: every weight comes from the checkpoint
        text_encoder = TextEncoder(TextEncoderConfig.from_transformers_config(config, with_projection))
    weights = {text_encoder_key(k): v for k, v in state_dict.items() if k not in TEXT_ENCODER_IGNORED_KEYS}
    return load_state_dict_strict(text_encoder, weights, what)


def text_encoder_from_transformers(model) -> TextEncoder:
    """Our ``TextEncoder`` with the config and (copied) weights of a transformers ``CLIPTextModel`` or
    ``CLIPTextModelWithProjection`` (then with its ``text_projection``), on its device and dtype."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with_projection = hasattr(model, "text_projection")
    return _text_encoder_from_state_dict(model.config.to_dict(), weights, f"transformers {type(model).__name__}",
                                         with_projection).eval()


def load_text_encoder(path_or_repo_id: str | os.PathLike, subfolder: str | None = "text_encoder",
                      revision: str | None = None, dtype: torch.dtype = torch.float32,
                      device: str | torch.device | None = None, variant: str | None = None) -> TextEncoder:
    """Our ``TextEncoder`` from a transformers-format folder or hub id (``config.json`` plus ``model.safetensors``).

    ``subfolder="text_encoder"`` reads the text encoder of a whole pipeline (``"text_encoder_2"``
    SDXL's second); a local folder with its own ``config.json`` and no ``text_encoder/`` inside (what
    ``CLIPTextModel.save_pretrained`` writes) is read as a text encoder folder. A config whose
    ``architectures`` is ``CLIPTextModelWithProjection`` gives an encoder with its ``text_projection``.
    ``variant="fp16"`` reads ``model.fp16.safetensors``.
    """
    device = as_device(device)  # checked before any weights are read or downloaded
    folder = component_folder(path_or_repo_id, subfolder, revision, weights_file_name(SAFETENSORS_NAMES[1], variant))
    weights = read_weights(folder, names=SAFETENSORS_NAMES[1:], variant=variant)
    text_encoder = _text_encoder_from_state_dict(read_config(folder), weights, f"text encoder in {folder}")
    return text_encoder.to(device=device, dtype=dtype).eval()


# --- whole pipelines (Chapter 06, section "Loading real weights") --------------------------

# The components ldm_teach's StableDiffusion is built from, with the classes model_index.json may
# name for each (any scheduler ldm_teach implements; either CLIP tokenizer class).
PIPELINE_COMPONENTS = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "scheduler": tuple(ALL_SCHEDULERS),
}


def pipeline_file_patterns(variant: str | None = None) -> list[str]:
    """The files of a diffusers repository that ``load_pipeline`` reads: configs, the tokenizer, and one
    safetensors file per model (``variant="fp16"``: the half-size ones). Nothing else is downloaded."""
    diffusers_weights = weights_file_name(SAFETENSORS_NAMES[0], variant)  # the U-Net's and the VAE's file name
    return ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/*",
            "unet/config.json", f"unet/{diffusers_weights}", "vae/config.json", f"vae/{diffusers_weights}",
            "text_encoder/config.json", f"text_encoder/{weights_file_name(SAFETENSORS_NAMES[1], variant)}",
            "controlnet/config.json", f"controlnet/{diffusers_weights}",  # ControlNet pipelines only (Chapter 07)
            "text_encoder_2/config.json", f"text_encoder_2/{weights_file_name(SAFETENSORS_NAMES[1], variant)}",
            "tokenizer_2/*"]  # SDXL only (Chapter 08)


def named_class(index: dict, name: str) -> str | None:
    """The class ``model_index.json`` names for component ``name``: None when absent or ``[null, null]``."""
    entry = index.get(name)
    return entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None


def check_model_index(root: Path, components: dict[str, tuple[str, ...]] = PIPELINE_COMPONENTS,
                      optional: tuple[str, ...] = (), what: str = "Stable Diffusion pipeline") -> None:
    """Refuse a pipeline folder whose ``model_index.json`` or component folders ldm_teach cannot build from.

    ``components`` maps each folder to the classes we build it from; those in ``optional`` may be absent."""
    index = read_config(root, "model_index.json")
    problems = []
    for name, classes in components.items():
        class_name = named_class(index, name)
        if class_name is None:
            if name not in optional:
                problems.append(f"model_index.json names no {name}")
        elif class_name not in classes:
            problems.append(f"its {name} is a {class_name}; ldm_teach builds only {' or '.join(classes)}")
        elif not (root / name).is_dir():
            problems.append(f"the {name}/ folder is missing")
    if problems:
        needed = ", ".join(f"{name}/" for name in components if name not in optional)
        raise FileNotFoundError(
            f"{root} is not a complete {what} folder: " + "; ".join(problems) + ". A folder that diffusers' "
            f"save_pretrained writes (or a full download of the repository) has model_index.json and {needed}."
        )


def load_pipeline(path_or_repo_id: str | os.PathLike, revision: str | None = None, dtype: torch.dtype = torch.float32,
                  device: str | torch.device | None = None, variant: str | None = None) -> StableDiffusion:
    """Our ``StableDiffusion`` from a diffusers-format pipeline folder or hub id, without diffusers.

    ``path_or_repo_id`` is a local folder (what ``StableDiffusionPipeline.save_pretrained``
    writes) or a hub id such as ``"stable-diffusion-v1-5/stable-diffusion-v1-5"``, of which only
    the files ``pipeline_file_patterns`` lists are downloaded, at ``revision`` (a branch, tag or
    commit hash: pin one for reproducible results). ``variant="fp16"`` reads the half-size weights
    files; ``dtype`` and ``device`` say where the models then live. The class returned is the one
    ``model_index.json`` names: an inpainting folder gives a ``StableDiffusionInpaint``, a ControlNet
    one (with its ``controlnet/``) a ``StableDiffusionControlNet``, an SDXL one a ``StableDiffusionXL``
    and SDXL's refiner a ``StableDiffusionXLImg2Img`` (``pretrained_sdxl``).
    """
    device = as_device(device)  # checked before any weights are read or downloaded
    root = resolve_folder(path_or_repo_id, None, revision, allow_patterns=pipeline_file_patterns(variant))
    weights = dict(dtype=dtype, device=device, variant=variant)
    if read_config(root, "model_index.json").get("_class_name", "").startswith("StableDiffusionXL"):
        from .pretrained_sdxl import load_sdxl_pipeline  # two text encoders, maybe no first one (Chapter 08)

        return load_sdxl_pipeline(root, **weights)
    check_model_index(root)
    components = dict(
        unet=load_unet(root, "unet", **weights),
        vae=load_vae(root, "vae", **weights),
        text_encoder=load_text_encoder(root, "text_encoder", **weights),
        tokenizer=Tokenizer.from_folder(root / "tokenizer"),
        scheduler=scheduler_from_config(read_config(root / "scheduler", "scheduler_config.json")),
    )
    from .pretrained_editing import pipeline_from_components  # the class model_index.json names (Chapter 07)

    return pipeline_from_components(root, components, **weights)


# --- single-file checkpoints (Chapter 06, section "Loading real weights") ------------------------
# The original Stable Diffusion releases (CompVis, RunwayML: v1-5-pruned-emaonly.safetensors) keep all
# three models in one file, under the names of the LDM code base. The rules below give, for each of
# our weights, its name there; loading reads the table backwards, saving forwards.

SD15_SCHEDULER_CONFIG = {  # stable-diffusion-v1-5's scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
}
# Our ResBlock's layers and their places in LDM's ResBlock (in_layers = norm, SiLU, conv; emb_layers = SiLU,
# linear; out_layers = norm, SiLU, dropout, conv), for the U-Net and (only the shortcut differs) the VAE.
RESBLOCK_ORIGINAL_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
TRANSFORMER_ORIGINAL_RENAMES = ((".to_out.", ".to_out.0."), (".ff.proj_in.", ".ff.net.0.proj."),
                                (".ff.proj_out.", ".ff.net.2."))
UNET_ORIGINAL_NAMES = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                       "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_ATTENTION_ORIGINAL_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def unet_original_key(key: str, config: UNetConfig) -> str:
    """The name of our U-Net weight ``key`` in an original SD checkpoint (after ``model.diffusion_model.``).

    LDM numbers the down path's blocks in one list, ``input_blocks`` (block 0 is ``conv_in``; then
    per level ``layers_per_block`` ResBlocks, each followed by its transformer at ``.1``, and one
    downsampler), and the up path's in another, ``output_blocks`` (per level ``layers_per_block + 1``
    ResBlocks and transformers, the upsampler after the last of them).
    """
    per_level = config.layers_per_block + 1
    match = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if match:
        path, level, kind, index, rest = match[1], int(match[2]), match[3], int(match[4]), match[5]
        number = level * per_level + index + (path == "down")  # input block 0 is conv_in
        if kind == "resnets":
            layer, name = rest.split(".", 1)
            rest = f"0.{RESBLOCK_ORIGINAL_NAMES[layer]}.{name}"
        else:
            rest = "1." + rename("." + rest, TRANSFORMER_ORIGINAL_RENAMES)[1:]
        return f"{'input' if path == 'down' else 'output'}_blocks.{number}.{rest}"
    match = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", key)
    if match:
        if match[1] == "resnets":
            layer, name = match[3].split(".", 1)
            return f"middle_block.{2 * int(match[2])}.{RESBLOCK_ORIGINAL_NAMES[layer]}.{name}"
        return "middle_block.1." + rename("." + match[3], TRANSFORMER_ORIGINAL_RENAMES)[1:]
    match = re.fullmatch(r"down_blocks\.(\d+)\.downsample\.conv\.(.+)", key)
    if match:
        return f"input_blocks.{(int(match[1]) + 1) * per_level}.0.op.{match[2]}"
    match = re.fullmatch(r"up_blocks\.(\d+)\.upsample\.conv\.(.+)", key)
    if match:
        level = int(match[1])
        after = 2 if config.up_block_types[level].startswith("CrossAttn") else 1  # after the transformer, if any
        return f"output_blocks.{level * per_level + per_level - 1}.{after}.conv.{match[2]}"
    module, name = key.rsplit(".", 1)
    return f"{UNET_ORIGINAL_NAMES[module]}.{name}"


def vae_original_key(key: str, config: VAEConfig) -> str:
    """The name of our VAE weight ``key`` in an original SD checkpoint (after ``first_stage_model.``).

    LDM's decoder numbers its levels from the *lowest* resolution's last, so our up block l is its
    ``up.{levels - 1 - l}``; the middle block's two ResBlocks are ``block_1`` and ``block_2``, its
    attention ``attn_1`` with 1x1 convolutions where ours has linear layers (``original_shape``).
    """
    levels = len(config.block_out_channels)
    match = re.fullmatch(r"(encoder\.down|decoder\.up)_blocks\.(\d+)\.(resnets\.\d+|downsample|upsample)\.(.+)", key)
    if match:
        side, level, part, rest = match[1], int(match[2]), match[3], match[4]
        if side == "decoder.up":
            level = levels - 1 - level
        part = part.replace("resnets", "block")
        return f"{side}.{level}.{part}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
    match = re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets\.(\d)|attention)\.(\w+)\.(\w+)", key)
    if match:
        if match[3] is not None:
            layer = match[4].replace("conv_shortcut", "nin_shortcut")
            return f"{match[1]}.mid.block_{int(match[3]) + 1}.{layer}.{match[5]}"
        return f"{match[1]}.mid.attn_1.{VAE_ATTENTION_ORIGINAL_NAMES[match[4]]}.{match[5]}"
    return key.replace("conv_norm_out", "norm_out")


def text_encoder_original_key(key: str, config: TextEncoderConfig) -> str:
    """The name of our text encoder weight ``key`` in an original SD 1.x checkpoint (after
    ``cond_stage_model.transformer.``): transformers' ``CLIPTextModel`` names, ``text_model.`` first."""
    if key.startswith(("token_embedding.", "position_embedding.")):
        return "text_model.embeddings." + key
    if key.startswith("layers."):
        return "text_model.encoder." + key
    return "text_model." + key


# (our component, its prefix in the file, the naming rule)
SINGLE_FILE_PARTS = (("unet", "model.diffusion_model.", unet_original_key),
                     ("vae", "first_stage_model.", vae_original_key),
                     ("text_encoder", "cond_stage_model.transformer.", text_encoder_original_key))
# Keys of original checkpoints that are not weights of the three models: the training schedule's buffers
# (betas, alphas_cumprod, ...), EMA copies, the VAE's training loss, CLIP's position ids.
SINGLE_FILE_IGNORED = re.compile(r"^(?!model\.diffusion_model\.|first_stage_model\.|cond_stage_model\.)"
                                 r"|^first_stage_model\.loss\.|position_ids$")


def original_shape(key: str, value: torch.Tensor) -> torch.Tensor:
    """The tensor as the original file stores it: the VAE attention's linear weights as 1x1 convs (C, C, 1, 1)."""
    if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", key) and value.ndim == 2:
        return value[:, :, None, None]  # (C, C, 1, 1)
    return value


def load_single_file(path: str | os.PathLike, unet_config: UNetConfig | None = None,
                     vae_config: VAEConfig | None = None, text_encoder_config: TextEncoderConfig | None = None,
                     scheduler_config: dict | None = None, tokenizer: Tokenizer | None = None,
                     dtype: torch.dtype = torch.float32, device: str | torch.device | None = None) -> StableDiffusion:
    """Our ``StableDiffusion`` from one original-layout checkpoint (e.g. ``v1-5-pruned-emaonly.safetensors``);
    a ``StableDiffusionInpaint`` from an inpainting one (a U-Net of 9 input channels, ``sd-v1-5-inpainting``).

    The file holds weights only, so the architecture comes from the configs: SD 1.5's by default
    (``UNetConfig.sd15()``, ``VAEConfig.sd()``, ``TextEncoderConfig.sd15()``, SD 1.5's PNDM scheduler
    and the bundled CLIP tokenizer); pass others for other models. Names are mapped by the rules
    ``unet_original_key``, ``vae_original_key`` and ``text_encoder_original_key``; each model loads
    strictly, and the error lists any weight the file lacks or has in excess.
    """
    device = as_device(device)  # checked before any weights are read or downloaded
    state_dict = read_checkpoint(path)
    if any(k.startswith("cond_stage_model.model.") for k in state_dict):
        raise ValueError(f"{path} has an OpenCLIP text encoder (cond_stage_model.model.*), as SD 2.x does; "
                         "load_single_file reads SD 1.x files. Use the diffusers-format repository with load_pipeline.")
    if unet_config is None:  # SD 1.5's, with the file's input channels: 9 in an inpainting checkpoint (Chapter 07)
        conv_in = state_dict.get("model.diffusion_model.input_blocks.0.0.weight")
        unet_config = UNetConfig(in_channels=conv_in.shape[1] if conv_in is not None and conv_in.ndim == 4 else 4)
    configs = {"unet": unet_config, "vae": vae_config or VAEConfig.sd(),
               "text_encoder": text_encoder_config or TextEncoderConfig.sd15()}
    classes = {"unet": UNet, "vae": AutoencoderKL, "text_encoder": TextEncoder}
    models = {}
    for name, prefix, original_key in SINGLE_FILE_PARTS:
        with torch.device("meta"):  # no random initialisation: every weight comes from the file
            model = classes[name](configs[name])
        ours = {prefix + original_key(key, configs[name]): (key, shape) for key, shape in
                ((k, v.shape) for k, v in model.state_dict().items())}
        weights = {}
        for key, value in state_dict.items():
            if not key.startswith(prefix) or SINGLE_FILE_IGNORED.search(key):
                continue
            if key in ours:  # our name; the VAE's 1x1-conv attention weights back to linear ones
                our_key, shape = ours[key]
                weights[our_key] = value.reshape(shape) if value.shape == (*shape, 1, 1) else value
            else:
                weights[key] = value  # listed as unexpected by the strict load
        models[name] = load_state_dict_strict(model, weights, f"{name} in {path}").to(device=device, dtype=dtype).eval()
    pipeline_class = StableDiffusion
    if configs["unet"].in_channels != configs["vae"].latent_channels:  # an inpainting U-Net (Chapter 07)
        from .editing import StableDiffusionInpaint as pipeline_class
    return pipeline_class(unet=models["unet"], vae=models["vae"], text_encoder=models["text_encoder"],
                          tokenizer=tokenizer or Tokenizer(),
                          scheduler=scheduler_from_config(scheduler_config or SD15_SCHEDULER_CONFIG))


def save_single_file(pipe: StableDiffusion, path: str | os.PathLike) -> None:
    """Write a pipeline's three models to one safetensors file in the original layout, as ``load_single_file``
    reads it (Chapter 06, section "Checking against diffusers")."""
    tensors = {}
    for name, prefix, original_key in SINGLE_FILE_PARTS:
        model = getattr(pipe, name)
        for key, value in model.state_dict().items():
            original = prefix + original_key(key, model.config)
            tensors[original] = original_shape(original, value).detach().cpu().contiguous()
    save_file(tensors, Path(path))


# --- Chapter 07's loaders, in pretrained_editing.py ---------------------------------------------


def __getattr__(name: str):
    """``pretrained.controlnet_from_diffusers`` and ``pretrained.load_controlnet`` (imported on first use:
    ``pretrained_editing`` imports this module)."""
    if name in ("controlnet_from_diffusers", "load_controlnet"):
        from . import pretrained_editing

        return getattr(pretrained_editing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
