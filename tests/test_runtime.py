import pytest
import torch

from ldm_teach import runtime


def test_profile_from_environment(monkeypatch):
    monkeypatch.setenv("LDM_TEACH_PROFILE", "full")
    assert runtime.pick_profile(torch.device("cpu")) == "full"
    monkeypatch.setenv("LDM_TEACH_PROFILE", "Quick ")
    assert runtime.pick_profile(torch.device("cuda")) == "quick"


def test_profile_default_follows_the_device(monkeypatch):
    monkeypatch.delenv("LDM_TEACH_PROFILE", raising=False)
    assert runtime.pick_profile(torch.device("cpu")) == "quick"
    assert runtime.pick_profile(torch.device("cuda")) == "full"


def test_unknown_profile_names_the_value(monkeypatch):
    monkeypatch.setenv("LDM_TEACH_PROFILE", "fast")
    with pytest.raises(ValueError, match="'fast'.*quick"):
        runtime.pick_profile(torch.device("cpu"))


def test_setup_prints_device_and_profile(capsys, monkeypatch):
    monkeypatch.setenv("LDM_TEACH_PROFILE", "quick")
    rt = runtime.setup(seed=3, device="cpu")
    assert capsys.readouterr().out.strip().startswith("cpu (") and "profile quick" in str(rt)
    assert rt.budget(1, 2) == 1 and rt.quick


def test_seeding_repeats():
    runtime.seed_everything(7)
    a = torch.randn(3)
    generator = runtime.seed_everything(7)
    assert torch.equal(a, torch.randn(3))
    assert torch.equal(generator.initial_seed() * torch.ones(1), 7 * torch.ones(1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without CUDA")
def test_asking_for_missing_cuda_says_what_to_do():
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        runtime.pick_device("cuda")
