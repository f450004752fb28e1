"""Reading the files a learner downloads: JSON configs, safetensors weights and pickle checkpoints.

Downloads get cut short, disks fill up, and model sites host files in formats that can run code
when opened. Every loader in ``pretrained`` reads through these three functions, so that a damaged
file is an error naming the file and saying what to do (usually: download it again), and a pickle
is only ever read by ``torch.load(weights_only=True)``, which builds tensors and plain containers
and nothing else (Chapter 06, section "Loading real weights").
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DOWNLOAD_AGAIN = "it is damaged or incomplete (an interrupted download?): delete it and download it again"


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from ``path``, with an error naming the file when it is missing, empty or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a diffusers-format component folder holds {path.name} "
                                "beside its weights.")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); {DOWNLOAD_AGAIN}.") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not the object of settings a config is; "
                         f"{DOWNLOAD_AGAIN}.")
    return value


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, with an error naming the file when it is empty or truncated."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes); {DOWNLOAD_AGAIN}.")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}); {DOWNLOAD_AGAIN}.") from None


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a single checkpoint file: safetensors, or a pickle that ``torch.load(weights_only=True)`` reads.

    A pickle file can hold any Python object, and unpickling one can run any code; PyTorch's
    ``weights_only=True`` reads tensors and plain containers only. A file it refuses is not loaded.
    What it reads must be a dict of tensors (or one under ``"state_dict"``, as training checkpoints keep it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass the path of a .safetensors (or .ckpt) checkpoint.")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix not in PICKLE_SUFFIXES:
        raise ValueError(f"{path} is neither a .safetensors file nor a PyTorch pickle ({', '.join(PICKLE_SUFFIXES)}).")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes); {DOWNLOAD_AGAIN}.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if "Unsupported" in line]
        reason = (lines or str(error).strip().splitlines())[0].replace("WeightsUnpickler error: ", "")
        if "Unsupported global" not in str(error):
            raise ValueError(f"{path} is not a PyTorch checkpoint: torch.load cannot read it ({reason}); "
                             f"{DOWNLOAD_AGAIN}, or check that it is the file you meant.") from None
        raise ValueError(
            f"{path} is a pickle checkpoint that torch.load(weights_only=True) refuses ({reason}): besides tensors "
            "it holds Python objects, and unpickling those can run arbitrary code, so ldm_teach does not load it. "
            "If you trust its source, convert it once in a separate environment: "
            "`sd = torch.load(path, weights_only=False)`, take sd['state_dict'] (or sd itself), and "
            "`safetensors.torch.save_file(state_dict, 'model.safetensors')`; then load the .safetensors file."
        ) from error
    except Exception as error:  # noqa: BLE001 - parsing untrusted bytes fails in many ways (EOF, index, struct)
        raise ValueError(f"{path} is not a PyTorch checkpoint: torch.load cannot read it "
                         f"({type(error).__name__}: {error}); {DOWNLOAD_AGAIN}.") from None
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state_dict, dict) or not state_dict or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        kind = (("an empty dict" if not state_dict else "a dict of other things") if isinstance(state_dict, dict)
                else f"a {type(state_dict).__name__}")
        raise ValueError(f"{path} holds {kind}, not a state dict (a dict of names to tensors, or one under 'state_dict'), so it is no model "
                         "checkpoint; pass the checkpoint file itself.")
    return state_dict
