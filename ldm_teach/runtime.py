"""Where the book's code runs: the device, the profile, and seeding.

Every chapter starts with `runtime.setup()`, which picks the best device at hand
(CUDA, then Apple's MPS, then the CPU), picks the profile, seeds every random
number generator and prints one line such as ``cuda (Tesla T4), profile full``.

The profile sets budgets, never the code path:

* ``quick`` keeps every chapter within a few minutes on a laptop CPU (the default
  without a GPU, and what CI runs);
* ``full`` trains longer and draws more samples (the default on a GPU, e.g. Colab).

The environment variable ``LDM_TEACH_PROFILE`` overrides the choice.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from .checks import as_device

PROFILES = ("quick", "full")
PROFILE_VARIABLE = "LDM_TEACH_PROFILE"
DEVICE_VARIABLE = "LDM_TEACH_DEVICE"


def pick_device(preferred: str | None = None) -> torch.device:
    """The best device at hand: CUDA, then MPS, then the CPU.

    ``preferred`` (or the ``LDM_TEACH_DEVICE`` variable) forces one, e.g. ``"cpu"``
    to compare with a CPU run on a GPU machine.
    """
    preferred = preferred or os.environ.get(DEVICE_VARIABLE)
    if preferred:
        return as_device(preferred)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def describe_device(device: torch.device) -> str:
    """``cuda (Tesla T4)``, ``mps`` or ``cpu (2 threads)``."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return device.type


def pick_profile(device: torch.device | None = None) -> str:
    """``quick`` or ``full``: ``LDM_TEACH_PROFILE`` if set, else ``full`` on CUDA and ``quick`` elsewhere."""
    profile = os.environ.get(PROFILE_VARIABLE, "").strip().lower()
    if profile:
        if profile not in PROFILES:
            raise ValueError(
                f"{PROFILE_VARIABLE}={profile!r} is not a profile; set it to one of {PROFILES} or unset it."
            )
        return profile
    device = device if device is not None else pick_device()
    return "full" if device.type == "cuda" else "quick"


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy and torch (every device), and return a CPU generator seeded the same.

    A seeded run repeats on the same machine; CPU and GPU draw different numbers from
    the same seed, which is why the book draws its noise on the CPU where it matters.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA and MPS too
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class Runtime:
    """What `setup` picked: the device, the profile and the seed."""

    device: torch.device
    profile: str
    seed: int

    @property
    def quick(self) -> bool:
        return self.profile == "quick"

    def budget(self, quick, full):
        """The quick or the full value of a budget, by profile: ``rt.budget(200, 3000)``."""
        return quick if self.quick else full

    def __str__(self) -> str:
        return f"{describe_device(self.device)}, profile {self.profile}"


def setup(seed: int = 0, device: str | None = None, verbose: bool = True) -> Runtime:
    """Pick the device and the profile, seed everything, and say what was picked."""
    picked = pick_device(device)
    runtime = Runtime(device=picked, profile=pick_profile(picked), seed=seed)
    seed_everything(seed)
    if verbose:
        print(runtime)
    return runtime
