"""Where the book's code runs: the device, the profile, and seeding.

Every chapter starts with `runtime.setup()`, which picks the best device at hand
(CUDA, then Apple's MPS, then the CPU), picks the profile, seeds every random
number generator and prints one line such as ``cuda (Tesla T4), profile full``.

The profile sets budgets, never the code path:

* ``quick`` keeps every chapter within a few minutes on a laptop CPU (the default
  without a GPU, and what CI runs);
* ``full`` trains longer and draws more samples (the default on a GPU, e.g. Colab).

The environment variable ``LDM_TEACH_PROFILE`` overrides the choice.

``LDM_TEACH_BUDGETS=quick`` (or ``full``) overrides only the budgets: ``rt.budget(...)`` and
the zoo's training budgets follow it, while ``rt.profile`` and every branch that tests it keep
the profile's code path. ``LDM_TEACH_PROFILE=full LDM_TEACH_BUDGETS=quick`` is a *rehearsal* of
the full profile (``tools/rehearse_full_profile.py``): the full profile's code runs with the
quick profile's budgets, on the CPU, where the sections that the full profile runs only on a
GPU (``rt.gpu_or_rehearsal``) run on the CPU too.
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
BUDGETS_VARIABLE = "LDM_TEACH_BUDGETS"
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


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA and MPS run asynchronously), before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def reset_peak_memory(device: torch.device) -> None:
    """Start counting ``peak_memory_gib`` afresh (CUDA only; elsewhere nothing is counted)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """The most memory torch's tensors held on a CUDA device since ``reset_peak_memory``, in GiB; None elsewhere."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


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


def pick_budgets(profile: str | None = None) -> str:
    """Whose budgets apply, ``quick`` or ``full``: ``LDM_TEACH_BUDGETS`` if set, else the profile's own.

    ``profile`` is the profile in force (default: ``pick_profile()``).
    """
    budgets = os.environ.get(BUDGETS_VARIABLE, "").strip().lower()
    if budgets:
        if budgets not in PROFILES:
            raise ValueError(
                f"{BUDGETS_VARIABLE}={budgets!r} names no profile's budgets; set it to one of {PROFILES} or unset it."
            )
        return budgets
    return profile or pick_profile()


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
    """What `setup` picked: the device, the profile, the seed, and whose budgets apply.

    ``profile`` chooses code paths (``rt.quick``, ``rt.profile == "full"``); ``budgets`` chooses
    sizes and step counts (``rt.budget``). They differ only in a rehearsal (``LDM_TEACH_BUDGETS``).
    """

    device: torch.device
    profile: str
    seed: int
    budgets: str | None = None  # None: the profile's own

    def __post_init__(self):
        object.__setattr__(self, "budgets", self.budgets or self.profile)
        for name in ("profile", "budgets"):
            if getattr(self, name) not in PROFILES:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {PROFILES}.")

    @property
    def quick(self) -> bool:
        """The quick profile's code path (not its budgets: those are ``budget``'s)."""
        return self.profile == "quick"

    @property
    def rehearsal(self) -> bool:
        """The full profile's code with the quick budgets (``LDM_TEACH_BUDGETS=quick``)."""
        return self.profile == "full" and self.budgets == "quick"

    @property
    def gpu_or_rehearsal(self) -> bool:
        """Whether a section the full profile runs only on a GPU runs here: on CUDA, or in a rehearsal
        (where small stand-in weights make it cheap enough for the CPU)."""
        return self.profile == "full" and (self.device.type == "cuda" or self.rehearsal)

    def budget(self, quick, full):
        """The quick or the full value of a budget, by ``budgets``: ``rt.budget(200, 3000)``."""
        return quick if self.budgets == "quick" else full

    def __str__(self) -> str:
        text = f"{describe_device(self.device)}, profile {self.profile}"
        if self.budgets != self.profile:
            text += f" with the {self.budgets} budgets ({BUDGETS_VARIABLE}={self.budgets}" + (
                ": a rehearsal)" if self.rehearsal else ")")
        return text


def setup(seed: int = 0, device: str | None = None, verbose: bool = True) -> Runtime:
    """Pick the device and the profile, seed everything, and say what was picked."""
    picked = pick_device(device)
    profile = pick_profile(picked)
    runtime = Runtime(device=picked, profile=profile, seed=seed, budgets=pick_budgets(profile))
    seed_everything(seed)
    if verbose:
        print(runtime)
    return runtime
