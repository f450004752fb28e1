"""Tokenize 10,000 prompts with ldm_teach's CLIP tokenizer and with transformers' (Rust-backed) one.

Both read the same vocabulary (the bundled merges, written out as vocab.json and merges.txt for
transformers) and return (10000, 77) ids, which must be identical. Ours runs twice: with an empty
BPE cache, then with the cache a pipeline has after its first prompts. The Rust core of the
transformers tokenizer is also timed alone, without its Python wrapper's truncation and padding.

    python benchmarks/bench_tokenizer.py
"""
from __future__ import annotations

import json
import random
import tempfile
import time
import warnings
from pathlib import Path

import torch

from ldm_teach.clip import BUNDLED_VOCABULARY, Tokenizer, clip_vocabulary, read_bpe_merges

WORDS = """a an the of in on with by and at photo photograph painting portrait landscape cat dog horse astronaut
castle city forest mountain river ocean sunset sunrise night rain snow fog dragon robot knight wizard girl boy woman
man old young red green blue yellow purple golden silver dark bright glowing neon cinematic lighting dramatic soft
volumetric studio detailed highly intricate sharp focus bokeh 4k 8k hdr octane render unreal engine trending
artstation concept art digital oil watercolor sketch illustration anime manga style by greg rutkowski alphonse mucha
don't it's they're über café 東京 猫 🌅 🐉 masterpiece best quality (detailed:1.2) [blurry] 1990s 35mm f/1.8""".split()


def make_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        words = []
        for _ in range(rng.randint(3, 40)):
            if rng.random() < 0.1:  # a made-up word now and then, so the cache does not see everything
                words.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 10))))
            else:
                words.append(rng.choice(WORDS))
        prompts.append(rng.choice([" ", ", ", " "]).join(words).capitalize())
    return prompts


def main():
    from transformers import CLIPTokenizerFast  # in transformers 5 another name for CLIPTokenizer; in 4 the Rust one

    prompts = make_prompts(10_000)
    folder = Path(tempfile.mkdtemp())
    merges = read_bpe_merges(BUNDLED_VOCABULARY)
    (folder / "vocab.json").write_text(json.dumps(clip_vocabulary(merges)), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    # the paths positionally: transformers 5 names them vocab= and merges=, transformers 4 vocab_file= and merges_file=
    theirs = CLIPTokenizerFast(str(folder / "vocab.json"), str(folder / "merges.txt"))
    ours = Tokenizer()
    warnings.simplefilter("ignore")  # some prompts run past 77 tokens

    start = time.perf_counter()
    ours_cold = ours(prompts)
    ours_cold_s = time.perf_counter() - start
    start = time.perf_counter()
    ours_warm = ours(prompts)
    ours_warm_s = time.perf_counter() - start
    start = time.perf_counter()
    expected = theirs(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    theirs_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs.backend_tokenizer.encode_batch(prompts)  # the Rust core alone: no truncation, padding or tensor
    rust_s = time.perf_counter() - start

    assert torch.equal(ours_cold, expected) and torch.equal(ours_warm, expected), "token ids differ"
    print(f"{len(prompts):,} prompts, ids identical: {tuple(expected.shape)}, torch threads {torch.get_num_threads()}")
    print(f"transformers CLIPTokenizer (Rust, {type(theirs).__name__}): {theirs_s:.3f} s")
    print(f"  of which the Rust core's encode_batch alone: {rust_s:.3f} s")
    print(f"ldm_teach Tokenizer, empty cache:  {ours_cold_s:.3f} s  ({ours_cold_s / theirs_s:.1f}x transformers)")
    print(f"ldm_teach Tokenizer, warm cache:   {ours_warm_s:.3f} s  ({ours_warm_s / theirs_s:.1f}x transformers)")


if __name__ == "__main__":
    main()
