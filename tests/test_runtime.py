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


def test_budgets_follow_the_profile_unless_overridden(monkeypatch):
    monkeypatch.delenv("LDM_TEACH_BUDGETS", raising=False)
    assert runtime.pick_budgets("full") == "full" and runtime.pick_budgets("quick") == "quick"
    monkeypatch.setenv("LDM_TEACH_BUDGETS", " Quick")
    assert runtime.pick_budgets("full") == "quick"
    monkeypatch.setenv("LDM_TEACH_BUDGETS", "tiny")
    with pytest.raises(ValueError, match="LDM_TEACH_BUDGETS='tiny'.*quick"):
        runtime.pick_budgets("full")


def test_a_rehearsal_runs_the_full_code_path_with_the_quick_budgets(capsys, monkeypatch):
    monkeypatch.setenv("LDM_TEACH_PROFILE", "full")
    monkeypatch.setenv("LDM_TEACH_BUDGETS", "quick")
    rt = runtime.setup(device="cpu")
    assert (rt.profile, rt.budgets) == ("full", "quick")
    assert not rt.quick  # the code path is the full profile's ...
    assert rt.budget(200, 3000) == 200  # ... the budgets are the quick one's
    assert rt.rehearsal and rt.gpu_or_rehearsal
    assert "profile full with the quick budgets" in capsys.readouterr().out


def test_gpu_only_sections_run_on_cuda_in_the_full_profile_or_in_a_rehearsal():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert runtime.Runtime(cuda, "full", 0).gpu_or_rehearsal
    assert not runtime.Runtime(cpu, "full", 0).gpu_or_rehearsal  # the full profile on a CPU: too slow for real SD
    assert runtime.Runtime(cpu, "full", 0, budgets="quick").gpu_or_rehearsal
    assert not runtime.Runtime(cuda, "quick", 0).gpu_or_rehearsal
    assert not runtime.Runtime(cpu, "quick", 0, budgets="full").rehearsal  # quick code, full budgets: no rehearsal
    assert runtime.Runtime(cpu, "quick", 0, budgets="full").budget(1, 2) == 2
    assert runtime.Runtime(cpu, "full", 0).budgets == "full" and runtime.Runtime(cpu, "full", 0).budget(1, 2) == 2
    with pytest.raises(ValueError, match="budgets='fast'"):
        runtime.Runtime(cpu, "full", 0, budgets="fast")


def test_the_zoo_follows_the_budgets_so_a_rehearsal_never_writes_full_entries(monkeypatch, tmp_path):
    from ldm_teach import zoo

    monkeypatch.setenv("LDM_TEACH_CACHE", str(tmp_path))
    monkeypatch.setenv("LDM_TEACH_PROFILE", "full")
    monkeypatch.setenv("LDM_TEACH_BUDGETS", "quick")
    profile, _ = zoo.pick(None, "cpu")
    assert profile == "quick" and zoo.entry_dir("vae", profile) == tmp_path / "vae-quick"
    assert zoo.base_settings("vae", profile)["budget"] == zoo.BUDGETS["quick"]["vae"]
    monkeypatch.delenv("LDM_TEACH_BUDGETS")
    assert zoo.pick(None, "cpu")[0] == "full"


def test_timing_helpers_off_cuda():
    runtime.synchronize(torch.device("cpu"))  # nothing queued: returns at once
    runtime.reset_peak_memory(torch.device("cpu"))
    assert runtime.peak_memory_gib(torch.device("cpu")) is None
