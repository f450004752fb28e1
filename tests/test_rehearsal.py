"""The stand-in weights of tools/rehearse_full_profile.py: the layout the full profile's downloads leave,
readable offline."""
import json
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import rehearse_full_profile as rehearsal  # noqa: E402

from ldm_teach import perceptual, pretrained  # noqa: E402


@pytest.fixture(scope="module")
def standin_hub_cache(tmp_path_factory):
    hub_cache = tmp_path_factory.mktemp("hf") / "hub"
    return hub_cache, rehearsal.write_sd15_standin(hub_cache)


def test_the_standin_is_laid_out_as_the_hub_cache_holds_sd15(standin_hub_cache):
    hub_cache, snapshot = standin_hub_cache
    repo = hub_cache / "models--stable-diffusion-v1-5--stable-diffusion-v1-5"
    assert (repo / "refs" / "main").read_text() == snapshot.name == rehearsal.STANDIN_COMMIT
    files = {str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if not p.is_dir()}
    for component, weights in [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                               ("text_encoder", "model")]:
        assert {f"{component}/config.json", f"{component}/{weights}.safetensors",
                f"{component}/{weights}.fp16.safetensors"} <= files
    sdxl_only = ("text_encoder_2/", "tokenizer_2/")  # SDXL repositories' second encoder; SD 1.5's has none
    fetched = {p for p in pretrained.pipeline_file_patterns("fp16")
               if not p.startswith(("tokenizer/", "controlnet/") + sdxl_only)}
    assert fetched <= files  # what load_pipeline fetches (only ControlNet repositories have a controlnet/ folder)
    assert {"tokenizer/vocab.json", "tokenizer/merges.txt", "feature_extractor/preprocessor_config.json"} <= files
    for name in files:  # every file a relative link into blobs/, weights named by their SHA-256 as git LFS does
        link = snapshot / name
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert link.resolve().parent == (repo / "blobs").resolve()
        if name.endswith(".safetensors"):
            assert len(link.resolve().name) == 64
    assert json.loads((snapshot / "model_index.json").read_text())["scheduler"] == ["diffusers", "PNDMScheduler"]


def test_the_loaders_read_the_standin_offline_by_its_hub_id(standin_hub_cache, monkeypatch):
    from huggingface_hub import constants

    hub_cache, snapshot = standin_hub_cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    vae = pretrained.load_vae(rehearsal.REPO_ID)
    text_encoder = pretrained.load_text_encoder(rehearsal.REPO_ID)
    with torch.no_grad():
        assert vae.encode(torch.zeros(1, 3, 64, 64)).mode().shape == (1, 4, 8, 8)  # f = 8, as SD's
        assert text_encoder(torch.tensor([[49406, 320, 49407] + [49407] * 74])).shape == (1, 77, 32)
    pipe = pretrained.load_pipeline(rehearsal.REPO_ID, dtype=torch.float16, variant="fp16")
    assert next(pipe.unet.parameters()).dtype == torch.float16
    # the fp16 files hold the fp32 weights rounded: the variant is the same model
    torch.testing.assert_close(pipe.vae.state_dict()["decoder.mid_block.attention.to_q.weight"],
                               vae.state_dict()["decoder.mid_block.attention.to_q.weight"].half())
    with pytest.raises(OSError, match="not in the local Hugging Face cache"):
        pretrained.load_vae("stable-diffusion-v1-5/stable-diffusion-v1-5-missing")


def test_the_vgg16_standin_has_torchvisions_names_and_shapes():
    assert rehearsal.VGG16_FILE == Path(urlparse(perceptual.VGG16_URL).path).name
    state = rehearsal.vgg16_state_dict(device="meta")  # shapes without the 528 MB
    convolutions = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # torchvision's vgg16().features indices
    assert set(state) == {f"features.{i}.{p}" for i in convolutions for p in ("weight", "bias")} | {
        f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")}
    assert state["features.28.weight"].shape == (512, 512, 3, 3) and state["classifier.0.weight"].shape == (4096, 25088)
    assert sum(v.numel() for v in state.values()) == 138_357_544  # torchvision's count for VGG16
    with torch.device("meta"):
        model = perceptual.LPIPS()
    lpips_state = {k: v.to("meta") for k, v in perceptual.lpips_state_dict(state).items()}
    pretrained.load_state_dict_strict(model, lpips_state, "stand-in VGG16")  # strict: every name and shape fits


def test_the_vgg16_standin_goes_where_torch_hub_looks(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = Path(torch.hub.get_dir()) / "checkpoints" / rehearsal.VGG16_FILE
    small = {"features.0.weight": torch.zeros(1)}  # the file's place is the point here, not its 528 MB
    monkeypatch.setattr(rehearsal, "vgg16_state_dict", lambda seed=0, device="cpu": small)
    assert rehearsal.write_vgg16_standin(tmp_path) == expected and expected.is_file()


def test_the_controlnet_standin_loads_by_its_hub_id_and_fits_the_standin_unet(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from ldm_teach import pretrained_editing

    hub_cache = tmp_path / "hub"
    snapshot = rehearsal.write_controlnet_standin(hub_cache)
    assert {p.name for p in snapshot.iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors",
                                                    "diffusion_pytorch_model.bin"}  # as lllyasviel's repository
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    controlnet = pretrained_editing.load_controlnet(rehearsal.CONTROLNET_REPO_ID, dtype=torch.float32)
    latents, control = torch.randn(1, 4, 8, 8), torch.rand(1, 3, 64, 64)  # a 64x64 control image for 8x8 latents
    with torch.no_grad():
        down, middle = controlnet(latents, torch.tensor([10]), torch.randn(1, 77, 32), control)
    assert len(down) == 12 and middle.shape == (1, 64, 1, 1)  # one residual per skip of the stand-in U-Net
