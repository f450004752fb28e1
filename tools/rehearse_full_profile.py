"""Rehearse the full profile on the CPU, offline, before a change to a full-profile branch lands.

    python tools/rehearse_full_profile.py            # every chapter; or name some: 02 06
    make rehearse

The full profile runs on a GPU with network access: it downloads SD 1.5 from the Hugging Face hub and
VGG16's weights (for LPIPS) from PyTorch's model store. Neither is possible here, so its branches would
otherwise first run on a learner's Colab. This script runs them anyway, on the CPU:

1. it makes a temporary Hugging Face cache (``HF_HOME``, ``HF_HUB_CACHE``), torch hub cache
   (``TORCH_HOME``) and model zoo cache (``LDM_TEACH_CACHE``);
2. it writes *stand-in* weights there, in the exact layout those downloads leave:
   ``stable-diffusion-v1-5/stable-diffusion-v1-5`` as the hub's cache holds a repository (``refs/main``,
   ``blobs/`` named by hash, ``snapshots/<commit>/`` linking to them) with SD 1.5's folders and file names,
   the fp16 variant files among them; and ``hub/checkpoints/vgg16-397923af.pth``, a torchvision state dict
   with VGG16's names and shapes. All weights are random. The SD 1.5 models are *tiny* configurations
   of SD 1.5's architecture (same block types, four levels, f = 8, 77 tokens, CLIP's real 49,408-token
   vocabulary), written by diffusers' and transformers' own ``save_pretrained``: full-size random models
   would be 4 GB and far too slow on a CPU. Where SD 1.5's 2022 upload names weights otherwise than today's
   libraries write them, the stand-in uses the upload's names (the VAE's middle attention as ``query``,
   ``key``, ``value``, ``proj_attn``; the text encoder's under ``text_model.``, with ``position_ids``), and
   its scheduler config keeps the stray ``clip_sample`` key. Not written: the root folder's single-file
   checkpoints (``v1-5-pruned*.safetensors``, ``.ckpt``) and ``v1-inference.yaml``, which no chapter reads
   from the hub. VGG16 keeps its real shapes (528 MB), because LPIPS needs them;
3. it executes every chapter from a fresh kernel with ``LDM_TEACH_PROFILE=full`` (the full profile's code
   paths), ``LDM_TEACH_BUDGETS=quick`` (the quick profile's step counts and sizes) and ``HF_HUB_OFFLINE=1``,
   checks that each chapter's full-profile sections actually ran (by the lines they print), and prints
   each chapter's result and seconds, and the total.

Random weights make meaningless images and numbers: the rehearsal shows that the full profile's code runs
(downloads resolved from the cache, shapes, dtypes, devices, plots), not what it shows. It cannot reach
what only a GPU has: CUDA's float16 kernels, the peak-memory measurement, Colab's installed packages.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CONTROLNET_REPO_ID = "lllyasviel/sd-controlnet-canny"  # chapter 07's ControlNet for Canny edges
# A made-up commit hash: the stand-in is no revision of the real repository.
STANDIN_COMMIT = hashlib.sha1(b"ldm_teach stand-in for stable-diffusion-v1-5").hexdigest()
VGG16_FILE = "vgg16-397923af.pth"  # the name torch.hub gives perceptual.VGG16_URL's download
CHAPTERS = sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))
# Lines that only the full profile's sections print: their absence means a branch was not reached.
FULL_PROFILE_MARKS = {
    "02_vae": ["Perceptual (LPIPS) loss: VGG16 loaded", "latent shape (1, 4, 64, 64); round trip"],
    "03_clip": ["nearest:", "pooled similarity"],
    "06_inference": ["largest pixel difference", "peak GPU memory"],
    "07_editing": ["ControlNet (Canny)", "steered by an edge map"],
}
SETUP_MARK = "profile full with the quick budgets"

# --- the stand-in SD 1.5 repository ----------------------------------------------------------

# SD 1.5's model_index.json (the hub's, with its safety checker and feature extractor).
SD15_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SD15_PREPROCESSOR_CONFIG = {  # feature_extractor/preprocessor_config.json
    "crop_size": 224, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224,
}
_SPECIAL = dict(lstrip=False, normalized=True, rstrip=False, single_word=False)
SD15_SPECIAL_TOKENS_MAP = {
    "bos_token": {"content": "<|startoftext|>", **_SPECIAL}, "eos_token": {"content": "<|endoftext|>", **_SPECIAL},
    "pad_token": "<|endoftext|>", "unk_token": {"content": "<|endoftext|>", **_SPECIAL},
}
SD15_TOKENIZER_CONFIG = {
    "add_prefix_space": False, "bos_token": {"__type": "AddedToken", **SD15_SPECIAL_TOKENS_MAP["bos_token"]},
    "do_lower_case": True, "eos_token": {"__type": "AddedToken", **SD15_SPECIAL_TOKENS_MAP["eos_token"]},
    "errors": "replace", "model_max_length": 77, "name_or_path": "openai/clip-vit-large-patch14",
    "pad_token": "<|endoftext|>", "special_tokens_map_file": "./special_tokens_map.json",
    "tokenizer_class": "CLIPTokenizer", "unk_token": {"__type": "AddedToken", **SD15_SPECIAL_TOKENS_MAP["unk_token"]},
}
# SD 1.5's configurations, shrunk: the same keys, block types and levels, far fewer channels. The U-Net's
# sample_size is 8 (64x64 images by default) instead of 64: chapter 06 runs it in float16, which is slow on a
# CPU (a U-Net call on 16x16 latents took 5 s, on 8x8 0.6 s). The VAE keeps f = 8 (a 512x512 photo becomes a
# 64x64x4 latent, as in chapter 02) and the text encoder 77 positions and CLIP's 49,408-token vocabulary.
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8, cross_attention_dim=32, norm_num_groups=8, flip_sin_to_cos=True, freq_shift=0,
    downsample_padding=1, mid_block_scale_factor=1, norm_eps=1e-5, act_fn="silu", center_input_sample=False,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(16, 16, 32, 32),
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=8,
    act_fn="silu", sample_size=512,
)
TINY_TEXT_ENCODER = dict(
    vocab_size=49408, max_position_embeddings=77, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, projection_dim=32, hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=0,
    eos_token_id=2, pad_token_id=1,  # SD 1.5's text_encoder/config.json has these ids, whatever the vocabulary says
)
SD15_SCHEDULER_CONFIG = {  # scheduler/scheduler_config.json, clip_sample included (PNDM has no such option)
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}


def hub_vae_key(key: str) -> str:
    """The VAE's weight names as SD 1.5's 2022 upload has them: the middle attention under the names of
    diffusers < 0.14 (``query``, ``key``, ``value``, ``proj_attn``), which diffusers still converts on loading."""
    if ".mid_block.attentions.0." not in key:
        return key
    for new, old in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn.")):
        key = key.replace(new, old)
    return key


def hub_text_encoder_weights(state: dict) -> dict:
    """The text encoder's weights as SD 1.5's upload (transformers 4.22) has them: under ``text_model.``, with
    the position ids stored as a buffer. transformers 5's ``save_pretrained`` writes neither."""
    import torch

    state = {key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in state.items()}
    positions = state["text_model.embeddings.position_embedding.weight"].shape[0]
    state["text_model.embeddings.position_ids"] = torch.arange(positions)[None]  # (1, 77), int64
    return state


def save_weights_in_every_format(model, folder: Path, weights_name: str, pickle_name: str, to_hub=None) -> None:
    """What the hub holds for each model: ``config.json``, the fp32 safetensors and the fp16 variant
    (``*.fp16.safetensors``, float16 as SD 1.5's are), all from ``save_pretrained``, and the same two as pickles
    (``.bin``), which no loader should pick. ``to_hub(state_dict)`` renames the weights to the hub's names."""
    import torch
    from safetensors.torch import load_file, save_file

    model.to(torch.float16).save_pretrained(folder, variant="fp16")
    model.to(torch.float32).save_pretrained(folder)  # last, so that config.json is the float32 model's
    for name in (weights_name, weights_name.replace(".safetensors", ".fp16.safetensors")):
        assert (folder / name).is_file(), f"save_pretrained wrote {sorted(p.name for p in folder.iterdir())}"
        state = load_file(folder / name)
        if to_hub is not None:
            state = to_hub(state)
            save_file(state, folder / name, metadata={"format": "pt"})
        torch.save(state, folder / (pickle_name if ".fp16." not in name else pickle_name.replace(".bin", ".fp16.bin")))


def write_sd15_files(folder: Path, seed: int = 0) -> None:
    """The files of SD 1.5's diffusers repository that a pipeline reads, with tiny random models, into ``folder``."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel

    from ldm_teach.clip import BUNDLED_VOCABULARY, clip_vocabulary, read_bpe_merges

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(SD15_MODEL_INDEX, indent=2) + "\n")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    save_weights_in_every_format(unet, folder / "unet", "diffusion_pytorch_model.safetensors",
                                 "diffusion_pytorch_model.bin")
    for suffix in ("safetensors", "bin"):  # SD 1.5 also ships the U-Net's weights before EMA averaging
        shutil.copy(folder / "unet" / f"diffusion_pytorch_model.{suffix}",
                    folder / "unet" / f"diffusion_pytorch_model.non_ema.{suffix}")
    save_weights_in_every_format(AutoencoderKL(**TINY_VAE), folder / "vae", "diffusion_pytorch_model.safetensors",
                                 "diffusion_pytorch_model.bin",
                                 lambda state: {hub_vae_key(key): value for key, value in state.items()})
    text_config = CLIPTextConfig(**TINY_TEXT_ENCODER)
    save_weights_in_every_format(CLIPTextModel(text_config), folder / "text_encoder", "model.safetensors",
                                 "pytorch_model.bin", hub_text_encoder_weights)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=224,
                  patch_size=32, projection_dim=32)
    safety_config = CLIPConfig(text_config={**TINY_TEXT_ENCODER}, vision_config=vision, projection_dim=32)
    save_weights_in_every_format(StableDiffusionSafetyChecker(safety_config), folder / "safety_checker",
                                 "model.safetensors", "pytorch_model.bin")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER_CONFIG, indent=2) + "\n")
    tokenizer = folder / "tokenizer"  # CLIP's real vocabulary and merges, as SD 1.5's tokenizer/ has them
    tokenizer.mkdir(exist_ok=True)
    merges = read_bpe_merges(BUNDLED_VOCABULARY)
    (tokenizer / "vocab.json").write_text(json.dumps(clip_vocabulary(merges)), encoding="utf-8")
    (tokenizer / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                          encoding="utf-8")
    (tokenizer / "special_tokens_map.json").write_text(json.dumps(SD15_SPECIAL_TOKENS_MAP, indent=2) + "\n")
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(SD15_TOKENIZER_CONFIG, indent=2) + "\n")
    (folder / "feature_extractor").mkdir(exist_ok=True)
    (folder / "feature_extractor" / "preprocessor_config.json").write_text(
        json.dumps(SD15_PREPROCESSOR_CONFIG, indent=2) + "\n")


def git_blob_hash(data: bytes) -> str:
    """The id git (and so the hub) gives a small file: SHA-1 of ``blob <size>\\0`` and the bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_hub_cache_repo(files: Path, hub_cache: Path, repo_id: str = REPO_ID, commit: str = STANDIN_COMMIT) -> Path:
    """Put the tree ``files`` into ``hub_cache`` as huggingface_hub's downloads leave a model repository:
    ``models--owner--name/refs/main`` holding the commit, each file once in ``blobs/`` (named by its SHA-256
    if git LFS stores it, weights; by its git blob id otherwise), and ``snapshots/<commit>/<path>`` as
    relative links to the blobs. Returns the snapshot folder."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in files.rglob("*") if p.is_file()):
        data = path.read_bytes()
        lfs = path.suffix in (".safetensors", ".bin", ".ckpt", ".pth")
        blob = repo / "blobs" / (hashlib.sha256(data).hexdigest() if lfs else git_blob_hash(data))
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def write_sd15_standin(hub_cache: Path, seed: int = 0) -> Path:
    """The stand-in SD 1.5 repository in ``hub_cache``; returns its snapshot folder."""
    with tempfile.TemporaryDirectory() as staging:
        write_sd15_files(Path(staging) / "repo", seed)
        return write_hub_cache_repo(Path(staging) / "repo", hub_cache)


def write_controlnet_standin(hub_cache: Path, seed: int = 1) -> Path:
    """The stand-in ``lllyasviel/sd-controlnet-canny``: as that repository, the ControlNet at its top
    (``config.json``, ``diffusion_pytorch_model.safetensors`` and ``.bin``, float32, no fp16 variant), here a
    random ControlNet for the stand-in SD 1.5 U-Net (its blocks and widths, the conditioning embedding's
    default widths, so a 512x512 control image meets 64x64 latents). Returns its snapshot folder."""
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    unet_keys = ("in_channels", "layers_per_block", "block_out_channels", "attention_head_dim", "cross_attention_dim",
                 "norm_num_groups", "flip_sin_to_cos", "freq_shift", "downsample_padding", "act_fn", "norm_eps")
    down_blocks = TINY_UNET["down_block_types"]
    controlnet = ControlNetModel(**{key: TINY_UNET[key] for key in unet_keys}, down_block_types=down_blocks)
    with tempfile.TemporaryDirectory() as staging:
        folder = Path(staging) / "repo"
        controlnet.save_pretrained(folder)
        torch.save(controlnet.state_dict(), folder / "diffusion_pytorch_model.bin")
        return write_hub_cache_repo(folder, hub_cache, CONTROLNET_REPO_ID)


def vgg16_state_dict(seed: int = 0, device: str = "cpu") -> dict:
    """torchvision's ``vgg16()`` state dict, names and shapes (138,357,544 numbers), random values: the
    convolutions as ``perceptual.VGG16Features`` (torchvision's module names) initialises them, the
    classifier (25088 -> 4096 -> 4096 -> 1000) small and normal. ``device="meta"``: the shapes alone."""
    import torch

    from ldm_teach.perceptual import VGG16Features

    torch.manual_seed(seed)
    with torch.device(device):
        state = {f"features.{k}": v for k, v in VGG16Features().features.state_dict().items()}
        for index, (width_in, width_out) in zip((0, 3, 6), ((512 * 7 * 7, 4096), (4096, 4096), (4096, 1000))):
            state[f"classifier.{index}.weight"] = torch.randn(width_out, width_in) * 0.01
            state[f"classifier.{index}.bias"] = torch.zeros(width_out)
    return state


def write_vgg16_standin(torch_home: Path, seed: int = 0) -> Path:
    """``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``, where ``torch.hub.load_state_dict_from_url`` looks first."""
    import torch

    path = torch_home / "hub" / "checkpoints" / VGG16_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(vgg16_state_dict(seed), path)
    return path


def rehearsal_environment(folder: Path) -> dict[str, str]:
    """The variables a rehearsal runs under: the full profile's code, the quick budgets, the caches in ``folder``."""
    return {
        "LDM_TEACH_PROFILE": "full", "LDM_TEACH_BUDGETS": "quick", "LDM_TEACH_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1", "HF_HOME": str(folder / "hf"), "HF_HUB_CACHE": str(folder / "hf" / "hub"),
        "TORCH_HOME": str(folder / "torch"), "LDM_TEACH_CACHE": str(folder / "ldm_teach"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


def write_standins(folder: Path) -> None:
    env = rehearsal_environment(folder)
    start = time.perf_counter()
    snapshot = write_sd15_standin(Path(env["HF_HUB_CACHE"]))
    controlnet = write_controlnet_standin(Path(env["HF_HUB_CACHE"]))
    vgg = write_vgg16_standin(Path(env["TORCH_HOME"]))
    files = sum(1 for p in snapshot.rglob("*") if p.is_symlink())
    print(f"stand-in weights written in {time.perf_counter() - start:.0f} s: {snapshot} ({files} files), "
          f"{controlnet}, {vgg} ({vgg.stat().st_size / 2**20:.0f} MiB)")


def outputs_text(notebook) -> str:
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            for value in output.get("data", {}).values():
                if isinstance(value, str):
                    parts.append(value)
    return "\n".join(parts)


def setup_line(notebook) -> str:
    """What the chapter's setup cell printed, e.g. ``cpu (2 threads), profile full with the quick budgets ...``."""
    for output in notebook.cells[0].get("outputs", []):
        if output.get("name") == "stdout":
            return output["text"].strip().splitlines()[-1]
    return "(the setup cell printed nothing)"


def run_chapter(path: Path, timeout: int, output_folder: Path) -> tuple[bool, float, str]:
    """Execute one chapter in a fresh kernel; (passed, seconds, what went wrong)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    problem = ""
    try:
        client.execute()
    except CellExecutionError as error:
        problem = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
        problem = f"a cell failed: {problem}"
    except Exception as error:  # a timeout, a dead kernel
        problem = f"{type(error).__name__}: {error}"
    seconds = time.perf_counter() - start
    nbformat.write(notebook, output_folder / path.name)
    print(f"  {setup_line(notebook)}")
    if not problem:
        text = outputs_text(notebook)
        missing = [mark for mark in [SETUP_MARK] + FULL_PROFILE_MARKS.get(path.stem, []) if mark not in text]
        if missing:
            problem = f"ran, but a full-profile section did not print {missing}"
    return not problem, seconds, problem


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("chapters", nargs="*", help="chapter numbers (02 06); default: all")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    parser.add_argument("--keep", type=Path, help="a folder to keep the caches and executed notebooks in")
    parser.add_argument("--zoo-cache", type=Path,
                        help="a model cache of quick-budget models (LDM_TEACH_CACHE of a quick run) to start from, "
                             "copied in, so that chapters after 05 need not train the tiny model again")
    args = parser.parse_args(argv)
    chapters = [p for p in CHAPTERS if not args.chapters or p.name[:2] in args.chapters]
    if not chapters:
        parser.error(f"no chapter matches {args.chapters}")
    folder = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="ldm-rehearsal-"))
    folder.mkdir(parents=True, exist_ok=True)
    if any((folder / name).exists() for name in ("hf", "torch", "ldm_teach")):
        parser.error(f"{folder} holds caches already; give an empty or new folder")
    (folder / "executed").mkdir(exist_ok=True)
    print(f"rehearsing the full profile in {folder}")
    os.environ.update(rehearsal_environment(folder))  # the kernels inherit these
    sys.path.insert(0, str(ROOT))
    total_start = time.perf_counter()
    write_standins(folder)
    if args.zoo_cache:  # the quick budgets' models are the same in a rehearsal: its budgets are the quick ones
        shutil.copytree(args.zoo_cache, folder / "ldm_teach")
        print(f"model cache copied from {args.zoo_cache}: {sorted(p.name for p in (folder / 'ldm_teach').iterdir())}")
    results = []
    for path in chapters:
        print(f"{path.stem} ...", flush=True)
        passed, seconds, problem = run_chapter(path, args.timeout, folder / "executed")
        results.append((path.stem, passed, seconds, problem))
        print(f"{path.stem}: {'passed' if passed else 'FAILED'} in {seconds:.0f} s"
              + (f" ({problem})" if problem else ""), flush=True)
    total = time.perf_counter() - total_start
    import torch

    print(f"\nfull-profile rehearsal (LDM_TEACH_PROFILE=full LDM_TEACH_BUDGETS=quick, CPU, "
          f"{torch.get_num_threads()} torch threads, stand-in weights):")
    for name, passed, seconds, problem in results:
        print(f"  {name:14s} {'passed' if passed else 'FAILED':7s} {seconds:6.0f} s")
    failed = [name for name, passed, _, _ in results if not passed]
    print(f"  {'total':14s} {'passed' if not failed else 'FAILED':7s} {total:6.0f} s (with writing the stand-ins)")
    print(f"executed notebooks in {folder / 'executed'}")
    if not args.keep and not failed:
        shutil.rmtree(folder)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
