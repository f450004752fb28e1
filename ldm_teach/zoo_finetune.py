"""Chapter 09's measurements: the three ways of teaching the zoo's model a cross, on the same footing.

``compare_methods(profile)`` trains, from the zoo's text-to-image model (``zoo.tiny_text_to_image``),
textual inversion, DreamBooth without and with prior preservation, and LoRA, each on the same dozen
images of bars (``concept_dataset``) and for several training seeds, and judges every run with a
shape classifier that knows the bar (``concept_classifier``):

* **learnt**: the share of images drawn for the new prompts ("a small red <bar> ...", or
  "a small red sks square ...") that the classifier calls a bar;
* **kept**: prompt adherence on the old prompts, all four shapes, before and after, and the share of
  images drawn for the class noun's plain prompts ("a small red square ...") that still show a square;
* **cost**: the number of trained weights and the training seconds.

Nothing here is cached: the chapter trains it all in view (quick profile: about 3.5 minutes on 2 CPU cores).
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
from tqdm.auto import tqdm

from . import data, evaluate, finetune, lora, runtime, zoo

BUDGETS = {  # quick: 2 CPU cores, chapter 09 within 6 minutes; full: a Colab GPU
    "quick": dict(concept_images=12, class_images=48, seeds=3, eval_prompts=24,
                  classifier=dict(images=1000, steps=200, batch_size=64),
                  textual_inversion=dict(steps=60, learning_rate=1e-2),
                  dreambooth=dict(steps=100, learning_rate=5e-4),
                  lora=dict(steps=100, learning_rate=5e-3, rank=4)),
    "full": dict(concept_images=12, class_images=200, seeds=5, eval_prompts=128,
                 classifier=dict(images=4000, steps=600, batch_size=64),
                 textual_inversion=dict(steps=600, learning_rate=5e-3),
                 dreambooth=dict(steps=400, learning_rate=2e-4),
                 lora=dict(steps=500, learning_rate=2e-3, rank=4)),
}
CONCEPT = "bar"  # the zoo's VAE cannot draw a cross (data.NEW_SHAPES), so the concept is a bar
TOKEN = "<bar>"  # textual inversion's new word
CLASS_WORD = "square"  # DreamBooth's class noun, and textual inversion's starting point
CONCEPT_SEED = 9  # the concept's images: other draws than any the zoo trained on
EVAL_SEED = 11  # the evaluation prompts
BATCH_SIZE = 16
SAMPLING = dict(num_inference_steps=20, guidance_scale=7.5)
METHODS = ("textual inversion", "DreamBooth", "DreamBooth + prior", "LoRA")


def concept_dataset(count: int = 12, seed: int = CONCEPT_SEED) -> data.ShapesDataset:
    """The handful of images of the new concept: bars of every colour, both sizes, anywhere."""
    return data.ShapesDataset(count, seed=seed, shapes=(CONCEPT,))


def concept_classifier(profile: str | None = None, progress: bool = True) -> evaluate.ShapeClassifier:
    """A shape classifier over the four old shapes and the bar, trained in a few seconds on drawn shapes."""
    budget = BUDGETS[profile or runtime.pick_budgets()]["classifier"]
    return evaluate.train_shape_classifier(budget["images"], steps=budget["steps"], batch_size=budget["batch_size"],
                                           seed=zoo.SEED, progress=progress, shapes=data.SHAPES + (CONCEPT,))


def sample(pipe, captions: list[str], seed: int = 0) -> torch.Tensor:
    """One image per caption, seeded: (N, 3, H, W) in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    images = pipe(captions, generator=generator, output_type="pt", progress=False, **SAMPLING).images
    return images.float().cpu() * 2 - 1


def judge(pipe, new_captions: list[str], old_captions: list[str], class_captions: list[str],
          classifier: evaluate.ShapeClassifier) -> dict:
    """What a pipeline learnt and kept: the share of bars for ``new_captions``, adherence on ``old_captions``
    (every shape) and the share of the class noun's shape for ``class_captions``."""
    row = {}
    if new_captions:
        row["learnt"] = sum(s == CONCEPT for s in classifier.predict(sample(pipe, new_captions))) / len(new_captions)
    old = evaluate.prompt_adherence(sample(pipe, old_captions, seed=1), old_captions, classifier)
    row["old_shape"], row["old_both"] = old.shape, old.both
    predicted = classifier.predict(sample(pipe, class_captions, seed=2))
    row["class_kept"] = sum(s == CLASS_WORD for s in predicted) / len(class_captions)
    row["class_to_concept"] = sum(s == CONCEPT for s in predicted) / len(class_captions)
    return row


def summarise(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def compare_methods(profile: str | None = None, progress: bool = True, device=None) -> dict:
    """Train every method for ``seeds`` training seeds and measure each run (``judge``); returns a dict with
    ``base`` (the zoo's model before), ``methods`` (per method: the measures' mean, min and max over seeds,
    ``trained_weights``, ``seconds``), ``runs`` (every run's row), ``lora_merge_difference`` (the largest pixel
    difference between a LoRA pipeline's images before and after ``merge_lora``), ``pipelines`` (the first seed's
    tuned pipelines, the LoRA one unmerged), ``prompts`` (the evaluation prompts) and ``seconds`` in all."""
    start = time.perf_counter()
    profile, device = zoo.pick(profile, device)
    budget = BUDGETS[profile]
    pipe = zoo.tiny_text_to_image(profile, device=device, progress=progress)
    classifier = concept_classifier(profile, progress)
    concept = concept_dataset(budget["concept_images"])
    images = concept.tensors()  # (N, 3, 32, 32) in [-1, 1]
    ti_captions = [finetune.concept_caption(spec, TOKEN) for spec in concept.specs]
    db_captions = [finetune.concept_caption(spec, f"{finetune.IDENTIFIER} {CLASS_WORD}") for spec in concept.specs]
    class_specs = data.ShapesDataset(budget["class_images"], seed=CONCEPT_SEED, shapes=(CLASS_WORD,)).specs
    class_captions = [spec.caption for spec in class_specs]
    class_images = finetune.class_images_from(pipe, class_captions, seed=CONCEPT_SEED, **SAMPLING)
    eval_specs = data.ShapesDataset(budget["eval_prompts"], seed=EVAL_SEED, shapes=(CONCEPT,)).specs
    new_prompts = {"ti": [finetune.concept_caption(s, TOKEN) for s in eval_specs],
                   "db": [finetune.concept_caption(s, f"{finetune.IDENTIFIER} {CLASS_WORD}") for s in eval_specs]}
    old_prompts = data.ShapesDataset(budget["eval_prompts"], seed=EVAL_SEED, exclude=zoo.HELD_OUT_PAIRS).captions()
    class_prompts = [finetune.concept_caption(s, CLASS_WORD) for s in eval_specs]
    base = judge(pipe, new_prompts["db"], old_prompts, class_prompts, classifier)

    runs = {method: [] for method in METHODS}
    records = {method: [] for method in METHODS}
    merge_difference, examples = 0.0, {}
    for seed in tqdm(range(budget["seeds"]), desc="training seeds", disable=not progress):
        common = dict(batch_size=BATCH_SIZE, seed=seed, progress=progress)
        tuned = {
            "textual inversion": finetune.textual_inversion(
                pipe, images, ti_captions, TOKEN, CLASS_WORD, **budget["textual_inversion"], **common),
            "DreamBooth": finetune.dreambooth(pipe, images, db_captions, **budget["dreambooth"], **common),
            "DreamBooth + prior": finetune.dreambooth(pipe, images, db_captions, class_images, class_captions,
                                                      1.0, **budget["dreambooth"], **common),
            "LoRA": finetune.lora_dreambooth(pipe, images, db_captions, **budget["lora"], **common),
        }
        for method, (tuned_pipe, record) in tuned.items():
            prompts = new_prompts["ti" if method == "textual inversion" else "db"]
            runs[method].append(judge(tuned_pipe, prompts, old_prompts, class_prompts, classifier))
            records[method].append(record)
        if seed == 0:  # the first seed's pipelines, for the chapter's pictures and files
            examples = {method: copy.deepcopy(tuned_pipe) for method, (tuned_pipe, _) in tuned.items()}
        lora_pipe = tuned["LoRA"][0]
        before = sample(lora_pipe, new_prompts["db"][:8])
        lora.merge_lora(lora_pipe.unet)
        merge_difference = max(merge_difference, (sample(lora_pipe, new_prompts["db"][:8]) - before).abs().max().item())

    methods = {}
    for method in METHODS:
        methods[method] = {measure: summarise([run[measure] for run in runs[method]]) for measure in runs[method][0]}
        methods[method]["trained_weights"] = records[method][0].trained_weights
        methods[method]["seconds"] = summarise([record.seconds for record in records[method]])
    return {"profile": profile, "seeds": budget["seeds"], "n_new": len(eval_specs), "n_old": len(old_prompts),
            "base": base, "methods": methods, "runs": runs, "lora_merge_difference": merge_difference,
            "unet_weights": sum(p.numel() for p in pipe.unet.parameters()), "pipelines": examples,
            "prompts": {**new_prompts, "old": old_prompts, "class": class_prompts},
            "seconds": time.perf_counter() - start}
