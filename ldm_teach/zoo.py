"""Tiny trained models, ready to use: trained on first use within the profile's budget, then cached.

Chapter 05, section "The model zoo: trained once, loaded after". A chapter that needs a trained tiny model calls, say,
``zoo.tiny_text_to_image()``. The first call trains what is missing (the VAE of chapter 02, the
text encoder of chapter 03's tiny CLIP, the U-Net of chapter 05, all on the captioned shapes)
with progress bars, and saves each to the cache; later calls load them in a moment.

The cache is the folder named by ``LDM_TEACH_CACHE`` (default ``~/.cache/ldm_teach``), one
subfolder per model and budget set with ``model.safetensors`` and ``manifest.json`` (the
``profile`` arguments name the budget set, by default ``runtime.pick_budgets()``: the profile's own,
or ``LDM_TEACH_BUDGETS``'s, so a rehearsal of the full profile never writes the ``-full`` entries).
The manifest records what the weights are: the settings that produced them (config, budget, data,
seed, the package version, and for the U-Net the weight hashes and configs of the VAE and text
encoder it was trained with), the config the model is built from (for the VAE with its estimated
scaling factor; a copy of the one saved inside the weights file), the SHA-256 of the weights file
and the training record (losses, seconds). Before loading, the weights are hashed, the settings
compared with what this version of the package would train and the manifest's config with the
weights file's. A truncated or altered file, an edited or damaged manifest, or weights for other
settings is never used: it is retrained with a warning, or with ``retrain=False`` reported as a
``CacheError`` that names the field. Files are written whole or not at all.

The zoo's models never see the (color, shape) pairs in ``HELD_OUT_PAIRS``, so chapter 05 can
ask whether the text-to-image model composes combinations it was not shown.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__, clip, data, evaluate, runtime, train
from .pretrained import load_state_dict_strict
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig

CACHE_VARIABLE = "LDM_TEACH_CACHE"
HELD_OUT_PAIRS = (("green", "triangle"), ("purple", "circle"))

# What each profile spends on each model. quick: 2 CPU cores, chapter 05 within 10 minutes, all
# included; full: a Colab GPU. The quick VAE trains three times as long as chapter 02's: after 500 steps its
# reconstructions keep about three shapes in four and lose colours; after 1000 steps all colours and 89-96% of
# the shapes (96.2% trained with one CPU thread, 89.0% with two: the same code and seed, but another summation
# order sends training along another path); after 1500 steps 100% of the colours and 99.8% (two threads) or
# 100% (one thread) of the shapes on chapter 02's 500 judged images (2026-12-04). On the CPU the zoo trains the
# VAE with a fixed number of threads (VAE_CPU_THREADS, two: one thread took half as long again, beyond chapter
# 02's five minutes), so that every machine gets the same VAE whatever its core count.
BUDGETS = {
    "quick": {
        "vae": dict(images=2000, steps=1500, batch_size=16, learning_rate=2e-3, kl_weight=1e-6),
        "text_encoder": dict(pairs=3000, steps=400, batch_size=128, learning_rate=1e-3),
        "unet": dict(images=3000, steps=2000, batch_size=64, learning_rate=2e-3),
        "shape_classifier": dict(images=1000, steps=200, batch_size=64),
    },
    "full": {
        "vae": dict(images=10000, steps=3000, batch_size=32, learning_rate=2e-3, kl_weight=1e-6),
        "text_encoder": dict(pairs=20000, steps=4000, batch_size=128, learning_rate=1e-3),
        "unet": dict(images=20000, steps=12000, batch_size=128, learning_rate=2e-3),
        "shape_classifier": dict(images=4000, steps=600, batch_size=64),
    },
}
SEED = 0
VAE_CPU_THREADS = 2  # torch threads for training the VAE on the CPU: its result must not depend on the machine
CHECKPOINT_EVERY = 250  # steps between the U-Net's checkpoints, from which an interrupted run continues


class CacheError(RuntimeError):
    """A cached model that cannot be used: missing, corrupt, or trained with other settings."""


def cache_dir() -> Path:
    """The zoo's folder: ``$LDM_TEACH_CACHE``, else ``~/.cache/ldm_teach``."""
    return Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "ldm_teach").expanduser()


def entry_dir(name: str, profile: str) -> Path:
    return cache_dir() / f"{name}-{profile}"


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def remove(path: Path) -> None:
    """Delete whatever is at ``path``, a file or a whole folder, if anything is."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


MANIFEST_FIELDS = {"sha256": str, "settings": dict, "config": dict}  # what loading reads from a manifest


def parse_manifest(path: Path) -> dict:
    """A manifest file's content, with the fields loading needs; a CacheError naming what is wrong."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:  # ValueError: not JSON, or not UTF-8
        raise CacheError(f"{path} is missing or unreadable ({error})") from error
    if not isinstance(manifest, dict):
        raise CacheError(f"{path} holds a {type(manifest).__name__}, not a JSON object")
    for field, kind in MANIFEST_FIELDS.items():
        if not isinstance(manifest.get(field), kind):
            raise CacheError(f"{path}: the field {field!r} is missing or not a {kind.__name__} "
                             f"({manifest.get(field)!r:.60})")
    return manifest


def read_manifest(name: str, profile: str | None = None) -> dict:
    """The manifest of a cached model (settings, config, hash, training record); a CacheError if there is none."""
    path = entry_dir(name, profile or runtime.pick_budgets()) / "manifest.json"
    try:
        return parse_manifest(path)
    except CacheError as error:
        raise CacheError(f"{error}; load or train the model first.") from None


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a cached weights file and the config saved inside it."""
    try:
        with safe_open(os.fspath(path), framework="pt") as file:
            config = json.loads((file.metadata() or {})["config"])
            return {key: file.get_tensor(key) for key in file.keys()}, config
    except (SafetensorError, KeyError, ValueError) as error:
        raise CacheError(f"{path} is not a zoo weights file with its config inside ({error!r})") from error


def read_entry(name: str, profile: str, settings: dict) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The weights and manifest cached for ``name``, checked; None if nothing is cached.

    Raises CacheError, naming the problem: a manifest that does not parse or lacks a field,
    weights whose hash differs from the manifest's (a truncated or altered file), settings other
    than ``settings`` (field by field, e.g. ``budget.steps``), or a manifest whose config differs
    from the config saved inside the weights file, which the hash covers.
    """
    folder = entry_dir(name, profile)
    manifest_path, weights_path = folder / "manifest.json", folder / "model.safetensors"
    if not manifest_path.exists() and not weights_path.exists():
        return None
    manifest = parse_manifest(manifest_path)
    if not weights_path.is_file() or file_hash(weights_path) != manifest["sha256"]:
        raise CacheError(f"{weights_path} is missing or does not match the hash in its manifest (corrupt or altered)")
    differences = train.compare_records(manifest["settings"], settings)
    if differences:
        raise CacheError(f"{folder} was trained with other settings: {train.describe_differences(differences)}")
    state_dict, saved_config = read_weights(weights_path)
    differences = train.compare_records(manifest["config"], saved_config)
    if differences:
        raise CacheError(f"{manifest_path} was edited: its config differs from the one saved with the weights: "
                         f"{train.describe_differences(differences, ('manifest', 'weights file'))}")
    return state_dict, manifest


def load_entry(name: str, profile: str, settings: dict,
               build: Callable[[dict], torch.nn.Module]) -> tuple[torch.nn.Module, dict] | None:
    """The cached model, ``read_entry``'s weights in ``build(config)``; None if nothing is cached.
    A CacheError also for weights that no longer fit the model this version of the package builds."""
    entry = read_entry(name, profile, settings)
    if entry is None:
        return None
    state_dict, manifest = entry
    try:
        model = load_state_dict_strict(build(manifest["config"]), state_dict, f"cached {name}")
    except (TypeError, ValueError, KeyError, RuntimeError) as error:
        raise CacheError(f"the cached {name} does not fit the model this version builds: {error}") from error
    return model.eval(), manifest


def make_entry_dir(name: str, profile: str) -> Path:
    """The folder of an entry, created; a file in its place (a damaged cache) is removed first."""
    folder = entry_dir(name, profile)
    if not folder.is_dir():
        remove(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_entry(name: str, profile: str, state_dict: dict[str, torch.Tensor], settings: dict, config: dict,
                record: dict) -> dict:
    """Save the weights with ``config`` inside (so that their hash covers it), then the manifest.

    Each file is written whole or not at all (``train.write_atomically``): until the new manifest
    is in place, the old one describes other weights, and its hash says so. A folder standing
    where a file belongs (a damaged cache) is removed first.
    """
    folder = make_entry_dir(name, profile)
    weights_path, manifest_path = folder / "model.safetensors", folder / "manifest.json"
    for path in (weights_path, manifest_path):
        if path.is_dir():
            remove(path)
    config = json.loads(json.dumps(config))  # as the manifest will hold it: tuples become lists
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    train.write_atomically(weights_path, lambda temporary: save_file(tensors, temporary,
                                                                     metadata={"config": json.dumps(config)}))
    manifest = {"name": name, "profile": profile, "settings": settings, "config": config,
                "sha256": file_hash(weights_path), **record}
    train.write_atomically(manifest_path, lambda temporary: Path(temporary).write_text(json.dumps(manifest, indent=1)))
    return manifest


def cached(name: str, profile: str, settings: dict, build: Callable[[dict], torch.nn.Module],
           fit: Callable[[], tuple[torch.nn.Module, dict, dict]], retrain: bool) -> tuple[torch.nn.Module, dict]:
    """Load ``name`` from the cache, or train it with ``fit()`` and cache it; returns (model, manifest).

    ``build(config)`` makes the empty model for cached weights from their saved config; ``fit()``
    returns the trained model, the config it was built with and the training record for the manifest.
    With ``retrain`` anything unusable in the cache, whatever state it is in, is replaced.
    """
    settings = json.loads(json.dumps(settings))  # as the manifest will hold them: tuples become lists
    try:
        entry = load_entry(name, profile, settings, build)
    except CacheError as problem:
        if not retrain:
            raise CacheError(f"{problem}. Delete {entry_dir(name, profile)} or call again with retrain=True "
                             "to train it anew.") from None
        warnings.warn(f"the cached {name} is not usable: {problem}; training it again.", stacklevel=3)
        entry = None
    if entry is not None:
        return entry
    if not retrain:
        raise CacheError(f"no {name} is cached in {entry_dir(name, profile)}; call with retrain=True to train it.")
    print(f"training the tiny {name} ({profile} profile); it will be cached in {entry_dir(name, profile)}")
    start = time.perf_counter()
    model, config, record = fit()
    seconds = time.perf_counter() - start
    manifest = write_entry(name, profile, model.state_dict(), settings, config, {**record, "seconds": seconds})
    print(f"trained the tiny {name} in {seconds:.0f} s")
    return model.eval(), manifest


def base_settings(name: str, profile: str) -> dict:
    return {"version": __version__, "budget": BUDGETS[profile][name], "seed": SEED,
            "held_out_pairs": [list(pair) for pair in HELD_OUT_PAIRS]}


def pick(profile: str | None, device) -> tuple[str, torch.device]:
    profile = profile or runtime.pick_budgets()
    if profile not in runtime.PROFILES:
        raise ValueError(f"profile={profile!r} is not a profile; use one of {runtime.PROFILES} or None.")
    return profile, runtime.pick_device(device) if not isinstance(device, torch.device) else device


# --- the models ------------------------------------------------------------------------------


def tiny_vae(profile: str | None = None, retrain: bool = True, device=None, progress: bool = True) -> AutoencoderKL:
    """Chapter 02's tiny VAE (f = 4: 32×32×3 images, 8×8×4 latents), frozen, with its scaling factor
    estimated from the data as 1 / std of the latents (chapter 02, "The scaling factor")."""
    profile, device = pick(profile, device)
    budget = BUDGETS[profile]["vae"]
    settings = {**base_settings("vae", profile), "config": asdict(VAEConfig.tiny(4)),
                "cpu_threads": VAE_CPU_THREADS if device.type == "cpu" else None}

    def fit():
        images = data.ShapesDataset(budget["images"], seed=SEED, exclude=HELD_OUT_PAIRS).tensors()
        torch.manual_seed(SEED)
        model = AutoencoderKL(VAEConfig.tiny(4)).to(device)
        threads = torch.get_num_threads()
        if device.type == "cpu":  # one summation order on every machine, so one VAE
            torch.set_num_threads(VAE_CPU_THREADS)
        try:
            history = train.train_vae(model, images, steps=budget["steps"], batch_size=budget["batch_size"],
                                      learning_rate=budget["learning_rate"], kl_weight=budget["kl_weight"],
                                      seed=SEED, progress=progress, description="training the tiny VAE")
        finally:
            torch.set_num_threads(threads)
        with torch.no_grad():
            latents = model.encode(images[:512].to(device)).sample(torch.Generator().manual_seed(SEED))
        model.config.scaling_factor = 1 / latents.float().std().item()
        return model, asdict(model.config), {"pixel_error": history["pixel_error"]}

    model, _ = cached("vae", profile, settings, lambda config: AutoencoderKL(VAEConfig(**config)), fit, retrain)
    return model.to(device).requires_grad_(False)


def tiny_text_encoder(profile: str | None = None, retrain: bool = True, device=None,
                      progress: bool = True) -> clip.TextEncoder:
    """The text half of a tiny CLIP (chapter 03) trained on the captioned shapes: ids (B, 77) -> (B, 77, 64), frozen."""
    profile, device = pick(profile, device)
    budget = BUDGETS[profile]["text_encoder"]
    settings = {**base_settings("text_encoder", profile), "config": asdict(clip.TextEncoderConfig.tiny())}

    def fit():
        dataset = data.ShapesDataset(budget["pairs"], seed=SEED, exclude=HELD_OUT_PAIRS)
        torch.manual_seed(SEED)
        model = clip.CLIP(clip.TextEncoderConfig.tiny(), clip.ImageEncoderConfig(patch_size=8), projection_dim=64)
        losses = train.train_clip(model.to(device), dataset.tensors(), dataset.captions(), clip.Tokenizer(),
                                  steps=budget["steps"], batch_size=budget["batch_size"],
                                  learning_rate=budget["learning_rate"], seed=SEED, progress=progress)
        return model.text_encoder, asdict(model.text_encoder.config), {"losses": losses}

    model, _ = cached("text_encoder", profile, settings,
                      lambda config: clip.TextEncoder(clip.TextEncoderConfig(**config)), fit, retrain)
    return model.to(device).requires_grad_(False)


def shape_classifier(profile: str | None = None, retrain: bool = True, progress: bool = True) -> evaluate.ShapeClassifier:
    """The judge of ``evaluate.prompt_adherence``, trained on every (color, shape) pair, on the CPU."""
    profile, _ = pick(profile, "cpu")
    budget = BUDGETS[profile]["shape_classifier"]

    def fit():
        model = evaluate.train_shape_classifier(budget["images"], steps=budget["steps"],
                                                batch_size=budget["batch_size"], seed=SEED, progress=progress)
        return model, {}, {}  # the default ShapeClassifier: no config to record

    model, _ = cached("shape_classifier", profile, base_settings("shape_classifier", profile),
                      lambda config: evaluate.ShapeClassifier(**config), fit, retrain)
    return model


def unet_config() -> UNetConfig:
    """The tiny text-to-image U-Net: chapter 04's tiny config, on 8×8×4 latents and 64-wide text features."""
    return UNetConfig.tiny()


def fingerprint(model: torch.nn.Module) -> dict:
    """What identifies a frozen model another was trained against: the SHA-256 of its weights and its
    config (the VAE's holds the scaling factor, which changes the latents without changing a weight)."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode() + value.detach().float().cpu().numpy().tobytes())
    return {"sha256": digest.hexdigest(), "config": asdict(model.config)}


def unet_settings(profile: str, vae: AutoencoderKL, text_encoder: clip.TextEncoder) -> dict:
    """What the cached U-Net must have been trained with: among others, exactly this VAE and text encoder."""
    return {**base_settings("unet", profile), "config": asdict(unet_config()),
            "training": asdict(training_config(profile)), "vae": fingerprint(vae),
            "text_encoder": fingerprint(text_encoder)}


def training_config(profile: str) -> train.DiffusionTrainingConfig:
    budget = BUDGETS[profile]["unet"]
    return train.DiffusionTrainingConfig(steps=budget["steps"], batch_size=budget["batch_size"],
                                         learning_rate=budget["learning_rate"], seed=SEED)


def train_tiny_unet(vae: AutoencoderKL, text_encoder: clip.TextEncoder, profile: str, device,
                    callback: Callable | None = None, callback_every: int = 250, checkpoint_path: Path | None = None,
                    progress: bool = True) -> train.LatentDiffusionTrainer:
    """Train the zoo's U-Net on latents of the shapes (held-out pairs excluded); returns the trainer.

    With ``checkpoint_path`` the run is saved along the way and, if a checkpoint of the same run
    is there already, continued from it. The trainer's provenance is ``unet_settings``, so a
    checkpoint of a run against another VAE or text encoder (other weights, config or scaling
    factor) is not continued: it is removed, with a warning, and the run starts afresh.
    """
    dataset = data.ShapesDataset(BUDGETS[profile]["unet"]["images"], seed=SEED, exclude=HELD_OUT_PAIRS)
    diffusion_data = train.prepare_diffusion_data(dataset.tensors(), dataset.captions(), text_encoder,
                                                  clip.Tokenizer(), vae=vae)
    torch.manual_seed(SEED)
    trainer = train.LatentDiffusionTrainer(UNet(unet_config()).to(device), diffusion_data, training_config(profile),
                                           provenance=unet_settings(profile, vae, text_encoder))
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        try:
            trainer.load(checkpoint_path)  # a refused checkpoint leaves the trainer as it was
            print(f"continuing the interrupted run from step {trainer.step} ({checkpoint_path})")
        except (ValueError, KeyError) as error:
            warnings.warn(f"the checkpoint {checkpoint_path} is not usable ({error}); starting afresh.", stacklevel=2)
            remove(Path(checkpoint_path))
    trainer.train(callback=callback, callback_every=callback_every, checkpoint_path=checkpoint_path,
                  checkpoint_every=CHECKPOINT_EVERY, progress=progress, description="training the tiny U-Net")
    return trainer


def tiny_unet(profile: str | None = None, retrain: bool = True, device=None, callback: Callable | None = None,
              callback_every: int = 250, progress: bool = True) -> UNet:
    """The zoo's U-Net (its EMA weights), trained against ``tiny_vae`` and ``tiny_text_encoder`` of the same profile."""
    profile, device = pick(profile, device)
    vae = tiny_vae(profile, retrain, device, progress)
    text_encoder = tiny_text_encoder(profile, retrain, device, progress)
    checkpoint = entry_dir("unet", profile) / "checkpoint.safetensors"

    def fit():
        make_entry_dir("unet", profile)
        trainer = train_tiny_unet(vae, text_encoder, profile, device, callback, callback_every, checkpoint, progress)
        return trainer.ema, asdict(trainer.ema.config), training_record(trainer)

    model, manifest = cached("unet", profile, unet_settings(profile, vae, text_encoder),
                             lambda config: UNet(UNetConfig(**config)), fit, retrain)
    remove(checkpoint)
    return model.to(device).requires_grad_(False)


def training_record(trainer: train.LatentDiffusionTrainer) -> dict:
    return {"losses": trainer.losses, "steps": trainer.step, "training_seconds": trainer.seconds[-1]}


def save_tiny_unet(trainer: train.LatentDiffusionTrainer, vae: AutoencoderKL, text_encoder: clip.TextEncoder,
                   profile: str | None = None) -> dict:
    """Cache a U-Net that ``train_tiny_unet`` trained (its EMA weights) where ``tiny_unet`` and
    ``tiny_text_to_image`` look; returns the manifest. Chapter 05 trains the model in view and stores it here."""
    profile, _ = pick(profile, "cpu")
    settings = json.loads(json.dumps(unet_settings(profile, vae, text_encoder)))
    differences = {**train.compare_records(trainer.provenance, settings),
                   **train.compare_records(asdict(trainer.config), settings["training"], "training.")}
    if differences or trainer.step != trainer.config.steps:
        raise ValueError(f"this trainer ran {trainer.step} of {trainer.config.steps} steps"
                         + (f", not the zoo's run for these models in the {profile} profile: "
                            f"{train.describe_differences(differences)}" if differences else "")
                         + "; cache only a finished train_tiny_unet run, with the VAE and text encoder it "
                           "was trained with.")
    return write_entry("unet", profile, trainer.ema.state_dict(), settings, asdict(trainer.ema.config),
                       {**training_record(trainer), "seconds": trainer.seconds[-1]})


def scheduler_for(config: train.DiffusionTrainingConfig):
    """The sampler for a model trained with ``config``: DDIM with SD's settings, on the training's
    noise schedule and prediction type."""
    from .schedulers import DDIMScheduler

    return DDIMScheduler(**config.scheduler_config(), clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def tiny_text_to_image(profile: str | None = None, retrain: bool = True, device=None,
                       callback: Callable | None = None, callback_every: int = 250, progress: bool = True):
    """A ready ``pipeline.StableDiffusion`` of the tiny trained models, called like any pipeline:
    ``pipe("a large red circle in the center", guidance_scale=7.5).images``.

    The first call in a profile trains what the cache lacks (quick profile: a few minutes on a
    laptop CPU); later calls load. ``callback(trainer)`` sees the U-Net's training, if it happens.
    """
    from .pipeline import StableDiffusion

    profile, device = pick(profile, device)
    unet = tiny_unet(profile, retrain, device, callback, callback_every, progress)
    vae = tiny_vae(profile, retrain, device, progress)
    text_encoder = tiny_text_encoder(profile, retrain, device, progress)
    return StableDiffusion(unet, vae, text_encoder, clip.Tokenizer(), scheduler_for(training_config(profile)))
