"""Chapter 09's measurements: every method on the same footing, on a zoo trained with tiny budgets."""
import pytest

from ldm_teach import lora, zoo, zoo_finetune

TINY_BUDGET = {
    "vae": dict(images=16, steps=3, batch_size=4, learning_rate=2e-3, kl_weight=1e-6),
    "text_encoder": dict(pairs=16, steps=2, batch_size=8, learning_rate=1e-3),
    "unet": dict(images=16, steps=6, batch_size=4, learning_rate=1e-3),
    "shape_classifier": dict(images=32, steps=3, batch_size=8),
}
TINY_FINETUNE_BUDGET = dict(concept_images=3, class_images=2, seeds=2, eval_prompts=2,
                            classifier=dict(images=20, steps=2, batch_size=4),
                            textual_inversion=dict(steps=2, learning_rate=1e-2),
                            dreambooth=dict(steps=2, learning_rate=1e-4),
                            lora=dict(steps=2, learning_rate=1e-3, rank=2))


@pytest.fixture
def tiny_zoo(tmp_path, monkeypatch):
    monkeypatch.setenv(zoo.CACHE_VARIABLE, str(tmp_path / "cache"))
    monkeypatch.setitem(zoo.BUDGETS, "quick", TINY_BUDGET)
    monkeypatch.setitem(zoo_finetune.BUDGETS, "quick", TINY_FINETUNE_BUDGET)
    monkeypatch.setitem(zoo_finetune.SAMPLING, "num_inference_steps", 2)


def test_compare_methods_reports_every_method_over_the_seeds(tiny_zoo):
    result = zoo_finetune.compare_methods("quick", progress=False)
    assert list(result["methods"]) == list(zoo_finetune.METHODS) and result["seeds"] == 2
    for method, row in result["methods"].items():
        assert len(result["runs"][method]) == 2
        for measure in ("learnt", "old_shape", "old_both", "class_kept", "class_to_concept"):
            values = [run[measure] for run in result["runs"][method]]
            assert row[measure]["min"] == min(values) and row[measure]["max"] == max(values)
            assert 0 <= row[measure]["min"] <= row[measure]["mean"] <= row[measure]["max"] <= 1
        assert row["seconds"]["min"] > 0
    weights = {method: row["trained_weights"] for method, row in result["methods"].items()}
    assert weights["textual inversion"] == 64 and weights["DreamBooth"] == weights["DreamBooth + prior"]
    assert weights["DreamBooth"] == result["unet_weights"] > weights["LoRA"] > weights["textual inversion"]
    assert result["lora_merge_difference"] < 1e-4
    assert result["base"]["class_kept"] >= 0 and result["n_new"] == result["n_old"] == 2
    examples = result["pipelines"]
    assert list(examples) == list(zoo_finetune.METHODS)
    assert any(isinstance(m, lora.LoRALinear) for m in examples["LoRA"].unet.modules())  # kept unmerged
    assert examples["textual inversion"].tokenizer.added_tokens == [zoo_finetune.TOKEN]
    assert len(result["prompts"]["ti"]) == len(result["prompts"]["db"]) == result["n_new"]
