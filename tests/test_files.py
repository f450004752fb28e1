"""ldm_teach.files: damaged configs, weights and checkpoints name the file and the fix; pickles never run code."""
import builtins
import os
import pickle
import random

import pytest
import torch
from safetensors.torch import save_file

from ldm_teach import files


def test_read_json_names_a_damaged_or_missing_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"in_channels": 4, "block_out_')  # cut off mid-download
    with pytest.raises(ValueError, match=rf"{path} is not valid JSON.*damaged or incomplete.*download it again"):
        files.read_json(path)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=rf"{path} is not valid JSON"):
        files.read_json(path)
    path.write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match=rf"{path} holds a JSON list, not the object of settings"):
        files.read_json(path)
    with pytest.raises(FileNotFoundError, match="missing.json is missing"):
        files.read_json(tmp_path / "missing.json")
    path.write_text('{"in_channels": 4}')
    assert files.read_json(path) == {"in_channels": 4}


def test_read_safetensors_names_an_empty_or_truncated_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"weight": torch.arange(1000.0)}, path)
    assert torch.equal(files.read_safetensors(path)["weight"], torch.arange(1000.0))
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=rf"{path} is not a readable safetensors file.*download it again"):
        files.read_safetensors(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{path} is empty \(0 bytes\)"):
        files.read_safetensors(path)


def random_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.mark.parametrize("content, message", [
    (b"", r"is empty \(0 bytes\)"),
    *[(random_bytes(seed, size), r"is not a PyTorch checkpoint: torch.load cannot read it")
      for seed in range(40) for size in (1, 7, 4096)],  # random bytes fail the unpickler in many ways
    (b"PK\x03\x04" + random_bytes(0, 200), r"is not a PyTorch checkpoint"),  # a zip header, then noise
])
def test_read_checkpoint_says_a_damaged_file_is_no_checkpoint(tmp_path, content, message):
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as caught:
        files.read_checkpoint(path)
    assert str(path) in str(caught.value) and "arbitrary code" not in str(caught.value)


def test_a_truncated_torch_save_file_is_no_checkpoint(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match=rf"{path} is not a PyTorch checkpoint.*download it again"):
        files.read_checkpoint(path)


@pytest.mark.parametrize("content, kind", [(torch.zeros(3), "a Tensor"), ([torch.zeros(3)], "a list"),
                                           ({"global_step": 5}, "a dict of other things"), ({}, "an empty dict")])
def test_read_checkpoint_refuses_files_that_hold_no_state_dict(tmp_path, content, kind):
    path = tmp_path / "model.ckpt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=rf"{path} holds {kind}, not a state dict"):
        files.read_checkpoint(path)


def test_read_checkpoint_reads_plain_and_nested_state_dicts(tmp_path):
    weights = {"a.weight": torch.ones(2, 2)}
    torch.save(weights, tmp_path / "plain.pt")
    torch.save({"state_dict": weights, "global_step": 470000, "epoch": 3}, tmp_path / "nested.ckpt")
    for name in ("plain.pt", "nested.ckpt"):
        assert torch.equal(files.read_checkpoint(tmp_path / name)["a.weight"], torch.ones(2, 2))


class WritesAFile:
    """A pickle payload: unpickling it calls ``open(marker, "w")``, which creates the marker file."""

    def __init__(self, marker, how="open"):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "exec":
            return builtins.exec, (f"open({self.marker!r}, 'w').close()",)
        if self.how == "system":
            return os.system, (f"touch {self.marker}",)
        return builtins.open, (self.marker, "w")


PAYLOADS = {
    "torch.save zip, beside weights": lambda p, m: torch.save({"state_dict": {"w": torch.ones(1)},
                                                              "x": WritesAFile(m)}, p),
    "torch.save legacy format": lambda p, m: torch.save(WritesAFile(m), p, _use_new_zipfile_serialization=False),
    "pickle protocol 0": lambda p, m: p.write_bytes(pickle.dumps(WritesAFile(m), protocol=0)),
    "pickle protocol 2, exec": lambda p, m: p.write_bytes(pickle.dumps(WritesAFile(m, "exec"), protocol=2)),
    "pickle protocol 5, os.system": lambda p, m: p.write_bytes(pickle.dumps(WritesAFile(m, "system"), protocol=5)),
    "torch.save zip, exec": lambda p, m: torch.save({"x": WritesAFile(m, "exec")}, p),
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", PAYLOADS)
@pytest.mark.parametrize("suffix", [".ckpt", ".bin"])
def test_pickle_payloads_never_run(tmp_path, kind, suffix):
    marker = tmp_path / "code-ran"
    path = tmp_path / f"payload{suffix}"
    PAYLOADS[kind](path, marker)
    assert not marker.exists()  # writing the payload ran nothing
    with pytest.raises(ValueError, match=str(path)):
        files.read_checkpoint(path)
    assert not marker.exists(), "unpickling the checkpoint ran the payload's code"
    with open(path, "rb") as handle:  # the payload is live: plain pickle would run it (proof the test can fail)
        if kind.startswith("pickle"):
            pickle.load(handle)
            assert marker.exists()
