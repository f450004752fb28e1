"""Argument checks shared by the public entry points: clear errors instead of silent or raw failures.

A learner who passes ``num_inference_steps=2.5``, a seed where a generator belongs, or NumPy
latents should get an error at the call they wrote, naming the value and the fix, not a NaN
image or an ``IndexError`` from deep inside torch. The schedulers, the U-Net and the pipelines
call these helpers on their arguments; each returns the value in the form the code uses (a
Python int, a float, a tensor), so NumPy scalars work wherever Python numbers do.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch


def as_int(value, name: str, minimum: int | None = None) -> int:
    """``value`` as a Python int: ints and NumPy integers pass; floats, strings and bools are refused."""
    if isinstance(value, str):
        raise TypeError(f"{name}={value!r} is a string; pass a number: {name}={value.strip()}.")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        if isinstance(value, numbers.Real) and float(value).is_integer():
            hint = f"{name}={int(value)}"
        elif isinstance(value, numbers.Real) and math.isfinite(value):
            hint = f"a whole number, e.g. {name}={math.floor(value)} or {name}={math.ceil(value)}"
        else:
            hint = "a whole number"
        raise TypeError(f"{name}={value!r} is not an int; pass {hint}.")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} must be at least {minimum}.")
    return value


def as_float(value, name: str) -> float:
    """``value`` as a finite Python float: ints, floats and NumPy numbers pass; strings, NaN and inf are refused."""
    if isinstance(value, str):
        raise TypeError(f"{name}={value!r} is a string; pass a number: {name}={value.strip()}.")
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} is not a number; pass a float.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} is not a finite number, and it would turn every pixel into NaN; "
                         "pass a finite one.")
    return value


def as_bool(value, name: str) -> bool:
    """``value`` as a Python bool: True, False and NumPy bools pass; None (diffusers' "unset") is False;
    numbers and strings are refused, so ``"false"`` cannot switch a feature on."""
    if value is None:
        return False
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}={value!r} ({type(value).__name__}) is not a bool; pass {name}=True or {name}=False.")
    return bool(value)


def check_generator(generator, name: str = "generator"):
    """None, a ``torch.Generator`` or a list of them; a seed (an int) gets the line that makes a generator."""
    generators = generator if isinstance(generator, (list, tuple)) else [generator]
    for one in generators:
        if one is None and not isinstance(generator, (list, tuple)):
            continue
        if not isinstance(one, torch.Generator):
            if isinstance(one, numbers.Integral) and not isinstance(one, bool):
                fix = f"{name}=torch.Generator().manual_seed({int(one)})"
            else:
                fix = f"{name}=torch.Generator().manual_seed(0)"
            raise TypeError(f"{name}={one!r} ({type(one).__name__}) is not a torch.Generator; pass a seeded "
                            f"generator: {fix} (on the CPU, so the seed gives the same image on any machine).")
    return generator


def check_tensor(value, name: str, finite: bool = True) -> torch.Tensor:
    """A torch tensor, refused when it is a NumPy array (say how to convert) or, with ``finite``, holds NaN or inf."""
    if isinstance(value, np.ndarray):
        raise TypeError(f"{name} is a NumPy array of shape {value.shape}; pass a torch tensor: "
                        f"{name}=torch.from_numpy(array).")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} is a {type(value).__name__}; pass a torch tensor.")
    if finite and value.is_floating_point() and not torch.isfinite(value).all():
        bad = (~torch.isfinite(value)).sum().item()
        raise ValueError(f"{name} holds {bad} NaN or infinite values out of {value.numel()}; every step would "
                         "carry them into the image. Pass finite values (e.g. torch.randn with a generator).")
    return value


def check_callable(value, name: str) -> None:
    """None or something callable, else an error that shows the expected signature."""
    if value is not None and not callable(value):
        raise TypeError(f"{name}={value!r} is not callable; pass a function such as "
                        f"`def {name}(step, t, latents): ...`, or None.")


def check_finite_weights(state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Refuse weights holding NaN or inf, naming the tensors (one per line): such a file gives black or NaN images."""
    bad = [key for key, value in state_dict.items()
           if isinstance(value, torch.Tensor) and value.is_floating_point() and not value.is_meta
           and not torch.isfinite(value).all()]  # meta tensors (shapes only) hold no values to check
    if bad:
        listed = "\n".join(f"  {key}" for key in bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise ValueError(f"the {what} weights hold NaN or infinite values in {len(bad)} tensors:\n{listed}\n"
                         "The file is damaged, or was saved after training diverged; download or export it again.")


def as_device(device) -> torch.device | None:
    """``device`` as a torch.device (None stays None), refused when torch cannot see it, saying what to pick."""
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r} is not a device torch knows ({error}); use 'cpu', 'cuda' or 'mps'.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device={str(device)!r} was asked for, but torch sees no CUDA GPU here; pass device='cpu' "
            "(or leave it out), or in Colab pick Runtime > Change runtime type > T4 GPU and run again."
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(f"device={str(device)!r} was asked for, but torch sees {torch.cuda.device_count()} GPU(s); "
                           "use 'cuda' or 'cuda:0'.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device={str(device)!r} was asked for, but MPS is not available here; pass device='cpu'.")
    return device
