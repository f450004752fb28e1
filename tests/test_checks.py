"""ldm_teach.checks: the argument checks behind the public entry points."""
import numpy as np
import pytest
import torch

from ldm_teach import checks


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3), np.uint8(3)])
def test_as_int_accepts_python_and_numpy_integers(value):
    assert checks.as_int(value, "n") == 3 and type(checks.as_int(value, "n")) is int


@pytest.mark.parametrize("value, error, message", [
    (2.5, TypeError, r"n=2.5 is not an int; pass a whole number, e.g. n=2 or n=3"),
    (4.0, TypeError, r"n=4.0 is not an int; pass n=4"),
    ("10", TypeError, r"n='10' is a string; pass a number: n=10"),
    (True, TypeError, r"n=True is not an int"),
    (float("nan"), TypeError, r"n=nan is not an int; pass a whole number"),
    (None, TypeError, r"n=None is not an int"),
    (0, ValueError, r"n=0 must be at least 1"),
])
def test_as_int_refuses_everything_else_naming_the_value(value, error, message):
    with pytest.raises(error, match=message):
        checks.as_int(value, "n", minimum=1)


@pytest.mark.parametrize("value", [7.5, 7, np.float32(7.5), np.float64(7.5), torch.tensor(7.5)])
def test_as_float_accepts_numbers(value):
    assert checks.as_float(value, "s") == float(value) and type(checks.as_float(value, "s")) is float


@pytest.mark.parametrize("value, error, message", [
    ("7.5", TypeError, r"s='7.5' is a string; pass a number: s=7.5"),
    (float("nan"), ValueError, r"s=nan is not a finite number"),
    (float("-inf"), ValueError, r"s=-inf is not a finite number"),
    (None, TypeError, r"s=None is not a number"),
    ([1.0], TypeError, r"s=\[1.0\] is not a number"),
])
def test_as_float_refuses_strings_and_non_finite_values(value, error, message):
    with pytest.raises(error, match=message):
        checks.as_float(value, "s")


def test_check_generator_explains_how_to_turn_a_seed_into_a_generator():
    generator = torch.Generator().manual_seed(1)
    assert checks.check_generator(None) is None and checks.check_generator(generator) is generator
    assert checks.check_generator([generator, generator]) == [generator, generator]
    with pytest.raises(TypeError, match=r"generator=7 \(int\) is not a torch.Generator.*manual_seed\(7\)"):
        checks.check_generator(7)
    with pytest.raises(TypeError, match=r"generator=np.int64\(7\) \(int64\).*manual_seed\(7\)"):
        checks.check_generator(np.int64(7))
    with pytest.raises(TypeError, match=r"generator=None \(NoneType\)"):
        checks.check_generator([generator, None])


def test_check_tensor_refuses_numpy_and_non_finite_values():
    assert checks.check_tensor(torch.ones(2), "x") is not None
    with pytest.raises(TypeError, match=r"x is a NumPy array of shape \(2,\); pass a torch tensor"):
        checks.check_tensor(np.ones(2), "x")
    with pytest.raises(ValueError, match=r"x holds 1 NaN or infinite values out of 2"):
        checks.check_tensor(torch.tensor([1.0, float("inf")]), "x")
    assert checks.check_tensor(torch.tensor([float("nan")]), "x", finite=False) is not None


def test_check_finite_weights_lists_the_bad_tensors_one_per_line():
    weights = {"a": torch.ones(2), "b": torch.tensor([float("nan")]), "c": torch.tensor([1, 2]),
               "d": torch.tensor([float("inf")])}
    with pytest.raises(ValueError, match=r"the test weights hold NaN or infinite values in 2 tensors:\n  b\n  d\n"):
        checks.check_finite_weights(weights, "test")
    checks.check_finite_weights({"a": torch.ones(2)}, "test")


def test_as_device(monkeypatch):
    assert checks.as_device(None) is None and checks.as_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device='gpu' is not a device torch knows"):
        checks.as_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"device='cuda:1' was asked for, but torch sees no CUDA GPU"):
        checks.as_device("cuda:1")
