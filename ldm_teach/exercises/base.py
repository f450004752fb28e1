"""What every checker shares: ``compare`` and ``CheckResult``.

A checker runs the learner's function and the package's own on the same random inputs and says
what is off: an exception, a wrong type, shape or dtype, the worst value and where it is, a
gradient that does not reach an input, an input changed in place. Where a wrong answer matches a
common mistake it names it, in one hint at most. The package's reference runs in float64 on
float64 copies of the inputs, and the learner's result (float32 or float64) must lie within
``atol + rtol * |reference|`` of it, so an answer computed more accurately than float32 passes.
The learner's function is called with positional arguments, in the order of the exercise's
statement, so renamed parameters work.
"""
from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class CheckResult:
    """A checker's verdict: truthy when the function passes; ``name`` is the function checked,
    ``case`` the number of the first case that failed (None when it passed), ``seed`` the inputs' seed."""
    passed: bool
    message: str
    name: str = ""
    case: int | None = None
    seed: int | None = None

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        return self.message


class Rejected(Exception):
    """Raised by a checker's wrapper around the learner's function for a fault it found itself
    (a wrong number of model calls, a changed model); ``compare`` reports its message as it is."""


class GeneratorSeed(int):
    """The seed of the generator a checker hands the learner; messages show it as the generator it makes."""

    def __repr__(self) -> str:
        return f"torch.Generator().manual_seed({int(self)})"

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(int(self))


def describe(value) -> str:
    """A value as the messages show it: tensors by shape and dtype (0-d ones by value), numbers by value."""
    if isinstance(value, torch.Tensor):
        if value.ndim == 0:
            return f"tensor({float(value):.6g}, dtype {value.dtype})"
        return f"tensor of shape {tuple(value.shape)}, dtype {value.dtype}"
    if isinstance(value, (bool, numbers.Number)):
        return f"{value!r}"
    if isinstance(value, torch.nn.Module):
        return type(value).__name__
    return type(value).__name__


def verdict(passed: bool, message: str, name: str = "", case: int | None = None, seed: int | None = None) -> CheckResult:
    print(("✅ " if passed else "❌ ") + message)
    return CheckResult(passed, message, name, case, seed)


def clone(value):
    """An independent copy: tensors cloned, modules and containers deep-copied, the rest as it is."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (bool, numbers.Number, str, torch.Generator)) or callable(value) and not isinstance(
            value, torch.nn.Module):
        return value
    return copy.deepcopy(value)  # modules, containers, schedulers


def in_float64(value):
    """A float64 copy of floating tensors and of modules; other values unchanged."""
    if isinstance(value, torch.Tensor):
        return value.detach().double() if value.is_floating_point() else value.clone()
    if isinstance(value, torch.nn.Module):
        return copy.deepcopy(value).double()
    return clone(value)


def same(a, b) -> bool:
    """Whether ``a`` still equals the checker's copy ``b`` (tensors and modules compared exactly)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a.detach(), b)
    if isinstance(a, torch.nn.Module):
        sa, sb = a.state_dict(), b.state_dict()
        return sa.keys() == sb.keys() and all(torch.equal(sa[k].detach(), sb[k]) for k in sa)
    if isinstance(a, (list, tuple, dict, str, numbers.Number)):
        return a == b
    return True  # other objects (a scheduler) may keep state; only their results are checked


def _requires_gradient(value):
    if isinstance(value, torch.Tensor):
        return value.requires_grad_(True)
    value.requires_grad_(True).zero_grad(set_to_none=True)
    return value


def _gradients(value) -> dict[str, torch.Tensor | None]:
    if isinstance(value, torch.Tensor):
        return {"": value.grad}
    return {name: parameter.grad for name, parameter in value.named_parameters()}


def _changed_message(name: str, key: str) -> str:
    return (f"{name}: your function changed its input `{key}` in place. Leave the inputs as they are: "
            f"compute a new tensor (x = x * a, not x *= a or x.mul_(a)).")


def compare(name: str, learner: Callable, reference: Callable, cases: list[dict],
            mistakes: dict[str, Callable] | None = None, *, rtol: float = 1e-5, atol: float = 1e-6,
            float64: bool = True, gradients: tuple[str, ...] = (), shape_hint: str | None = None,
            seed: int | None = None) -> CheckResult:
    """Run ``learner`` (positional arguments, in the order of each case's keys) and ``reference``
    (keyword arguments, on float64 copies when ``float64``) on each case and report the first difference.

    ``gradients`` names the inputs (tensors, or modules for all their parameters) through which the
    result must be differentiable: both results are back-propagated with the same random weights and
    the gradients compared. ``mistakes`` maps a description to a function computing that mistake; the
    first one the learner's result matches is named.
    """
    for number, case in enumerate(cases, start=1):
        inputs = ", ".join(f"{key}: {describe(value)}" for key, value in case.items())
        where_case = f"case {number} ({inputs})"
        reference_inputs = {key: (in_float64 if float64 else clone)(value) for key, value in case.items()}
        for key in gradients:
            _requires_gradient(reference_inputs[key])
        expected = reference(**reference_inputs)
        learner_inputs = {key: clone(value) for key, value in case.items()}
        for key in gradients:
            _requires_gradient(learner_inputs[key])
        try:
            got = learner(*learner_inputs.values())
        except Rejected as error:
            return verdict(False, f"{name}: {error}\n  On {where_case}.", name, number, seed)
        except Exception as error:  # the learner's code may fail in any way; report it, don't crash
            message = f"{name}: your function raised {type(error).__name__}: {error}\n  on {where_case}."
            if "in-place" in str(error) or "inplace" in str(error):
                message += "\n  Hint: an input was changed in place; compute a new tensor instead."
            return verdict(False, message, name, number, seed)
        changed = [key for key in case if not same(learner_inputs[key], case[key])]
        if changed:
            return verdict(False, _changed_message(name, changed[0]) + f"\n  On {where_case}.", name, number, seed)
        if not isinstance(got, torch.Tensor):
            kind = "tuple" if isinstance(got, tuple) else describe(got)
            return verdict(False, f"{name}: expected a torch.Tensor, your function returned {kind}.", name, number, seed)
        if got.shape != expected.shape:
            message = f"{name}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)} on {where_case}."
            if shape_hint:
                message += f"\n  Hint: {shape_hint}"
            return verdict(False, message, name, number, seed)
        if expected.is_floating_point():
            if got.dtype not in (torch.float32, torch.float64):
                return verdict(False, f"{name}: expected a float32 result (float64 is fine too), got {got.dtype}.",
                               name, number, seed)
        elif got.dtype != expected.dtype:
            return verdict(False, f"{name}: expected dtype {expected.dtype}, got {got.dtype}.", name, number, seed)
        if got.is_floating_point() and not torch.isfinite(got).all():
            return verdict(False, f"{name}: your result has NaN or inf values on {where_case}.", name, number, seed)
        difference = (got.detach().double() - expected.detach().double()).abs()
        excess = difference - (atol + rtol * expected.detach().double().abs())
        if (excess > 0).any():
            where = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
            message = (f"{name}: values differ on case {number}: worst |difference| {float(difference[where]):.3g} "
                       f"at index {where}: got {float(got.detach()[where]):.6g}, "
                       f"expected {float(expected.detach()[where]):.6g} (tolerance {atol:g} + {rtol:g}·|expected|).\n"
                       f"  Inputs: {inputs}.")
            hint = _hint(got.detach(), case, mistakes)
            if hint:
                message += f"\n  Hint: {hint}"
            return verdict(False, message, name, number, seed)
        if gradients:
            problem = _compare_gradients(got, expected, learner_inputs, reference_inputs, gradients, number)
            if problem:
                message = f"{name}: the values are right, but {problem} on {where_case}."
                hint = _hint(got.detach(), case, mistakes, tolerance=1e-6)  # only a mistake this close explains it
                if hint:
                    message += f"\n  Hint: {hint}"
                return verdict(False, message, name, number, seed)
    checked = f", gradients through {', '.join(gradients)}" if gradients else ""
    return verdict(True, f"{name}: correct on {len(cases)} random cases{checked} "
                         f"(tolerance {atol:g} + {rtol:g}·|expected|).", name, None, seed)


def _hint(got: torch.Tensor, case: dict, mistakes: dict[str, Callable] | None, tolerance: float = 1e-4) -> str | None:
    """The one hint a wrong result earns: an input returned as it is, or the first common mistake it matches."""
    for mistake, wrong in (mistakes or {}).items():
        try:
            value = wrong(**{key: clone(value) for key, value in case.items()})
        except Exception:  # a mistake that does not apply to this case
            continue
        if isinstance(value, torch.Tensor) and value.shape == got.shape and torch.allclose(
                got.double(), value.detach().double(), rtol=tolerance, atol=tolerance):
            return f"your result matches a common mistake: {mistake}."
    unchanged = [key for key, value in case.items()
                 if isinstance(value, torch.Tensor) and value.shape == got.shape and torch.equal(value, got)]
    if unchanged:
        return f"you returned the input `{unchanged[0]}` unchanged; is the function written yet?"
    return None


def _compare_gradients(got, expected, learner_inputs, reference_inputs, gradients, number) -> str | None:
    """None when the learner's gradients on ``gradients`` match the reference's; otherwise what is wrong."""
    if not got.requires_grad:
        return (f"no gradient reaches `{gradients[0]}`: build the result from the inputs with torch operations "
                f"(no .detach(), .item(), NumPy, torch.no_grad() or a fresh torch.tensor)")
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1000 + number), dtype=torch.float64)
    (got * weights.to(got.dtype)).sum().backward()
    (expected * weights).sum().backward()
    for key in gradients:
        ours, theirs = _gradients(reference_inputs[key]), _gradients(learner_inputs[key])
        for parameter, wanted in ours.items():
            label = f"`{key}`" + (f" (parameter {parameter})" if parameter else "")
            received = theirs.get(parameter)
            if wanted is None or received is None and not wanted.any():  # no gradient is due here
                continue
            if received is None:
                return f"no gradient reaches {label}: is it detached, or used under torch.no_grad()?"
            scale = float(wanted.abs().max()) + 1e-12
            if not torch.allclose(received.double(), wanted, rtol=1e-3, atol=1e-4 * scale):
                worst = float((received.double() - wanted).abs().max())
                return f"the gradient on {label} differs from the reference's by up to {worst:.3g} (largest {scale:.3g})"
    return None


def compare_values(name: str, learner: Callable, reference: Callable, cases: list[dict],
                   mistakes: dict[str, Callable] | None = None, seed: int | None = None) -> CheckResult:
    """``compare`` for exact Python results (ints, tuples of ints): the learner's must equal the reference's."""
    for number, case in enumerate(cases, start=1):
        inputs = ", ".join(f"{key}: {describe(value)}" for key, value in case.items())
        expected = reference(**{key: clone(value) for key, value in case.items()})
        learner_inputs = {key: clone(value) for key, value in case.items()}
        try:
            got = learner(*learner_inputs.values())
        except Exception as error:  # the learner's code may fail in any way; report it, don't crash
            return verdict(False, f"{name}: your function raised {type(error).__name__}: {error}\n"
                                  f"  on case {number} ({inputs}).", name, number, seed)
        changed = [key for key in case if not same(learner_inputs[key], case[key])]
        if changed:
            return verdict(False, _changed_message(name, changed[0]) + f"\n  On case {number} ({inputs}).",
                           name, number, seed)
        if isinstance(got, torch.Tensor) and got.numel() == 1 and not isinstance(expected, tuple):
            got = got.item()
        if isinstance(expected, tuple) and isinstance(got, (list, torch.Size)):
            got = tuple(got)
        if got != expected:
            message = f"{name}: expected {expected!r}, got {got!r} on case {number} ({inputs})."
            if type(got) is not type(expected) and not (isinstance(got, numbers.Integral) and isinstance(expected, int)):
                message += f" (a {type(got).__name__} where a {type(expected).__name__} belongs)"
            for mistake, wrong in (mistakes or {}).items():
                try:
                    matches = wrong(**{key: clone(value) for key, value in case.items()}) == got
                except Exception:  # a mistake that does not apply to this case
                    matches = False
                if matches:
                    message += f"\n  Hint: your result matches a common mistake: {mistake}."
                    break
            return verdict(False, message, name, number, seed)
    return verdict(True, f"{name}: correct on {len(cases)} cases.", name, None, seed)
