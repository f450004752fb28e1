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


def read_weights(folder: Path, names=SAFETENSORS_NAMES, variant: str | None = None) -> dict[str, torch.Tensor]:
    """The safetensors state dict of a component folder (``variant="fp16"`` reads ``*.fp16.safetensors``)."""
    folder = Path(folder)
    candidates = [n.replace(".safetensors", f".{variant}.safetensors") if variant else n for n in names]
    for name in candidates:
        if (folder / name).is_file():
            return load_file(folder / name)
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    hint = " Only pickle weights (.bin/.ckpt) are there; convert them to safetensors." if any(
        n.endswith((".bin", ".ckpt", ".pt")) for n in found) else ""
    raise FileNotFoundError(
        f"no weights in {folder}: expected one of {candidates}, found {found or 'nothing'}.{hint}"
    )


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
