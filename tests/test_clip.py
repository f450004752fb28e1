"""ldm_teach.clip against transformers: token ids identical, text features within 1e-4."""
import gzip
import json
import os
import random
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5

from ldm_teach import pretrained  # noqa: E402
from ldm_teach.clip import (  # noqa: E402
    BUNDLED_VOCABULARY, CLIP, ImageEncoderConfig, TextEncoder, TextEncoderConfig, Tokenizer, contrastive_loss,
)

# --- the reference tokenizer, built from the bundled file the way OpenAI's CLIP reads it -----


def write_reference_files(folder):
    """vocab.json and merges.txt from the bundled merges, written independently of ldm_teach."""
    byte_values = [*range(33, 127), *range(161, 173), *range(174, 256)]
    characters = [chr(b) for b in byte_values] + [chr(256 + n) for n in range(256 - len(byte_values))]
    merges = gzip.open(BUNDLED_VOCABULARY).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    tokens = characters + [c + "</w>" for c in characters] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    write_reference_files(folder)
    return folder


def reference_tokenizer(folder, **options):
    """transformers' Rust-backed CLIP tokenizer, the one SD pipelines use in transformers 5.

    In transformers 5 ``CLIPTokenizerFast`` is another name for ``CLIPTokenizer``; in transformers 4
    ``CLIPTokenizer`` is a slower Python tokenizer that treats CJK, control characters and Greek
    sigma differently, and ``CLIPTokenizerFast`` is the Rust one. The paths go positionally: the
    parameters are ``vocab``/``merges`` in 5 and ``vocab_file``/``merges_file`` in 4.
    """
    return transformers.CLIPTokenizerFast(str(folder / "vocab.json"), str(folder / "merges.txt"), **options)


@pytest.fixture(scope="module")
def reference(reference_folder):
    tokenizer = reference_tokenizer(reference_folder)
    assert len(tokenizer) == 49408
    return tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


EDGE_CASES = [
    "", " ", "   \t\n ", "a photo of a cat", "A PHOTO OF A CAT", "a Photo Of A cAt",
    "an astronaut riding a horse on mars, trending on artstation, 8k, highly detailed",
    "café crème brûlée", "cafe\u0301 cre\u0300me", "naïve façade jalapeño smörgåsbord", "Straße ß ẞ",
    "ΟΔΟΣ σοφία", "İstanbul ıi", "東京タワーの夜景", "一只可爱的猫", "고양이 사진", "مرحبا بالعالم", "שלום עולם",
    "नमस्ते दुनिया", "สวัสดีครับ", "Привет, мир!", "🐱 cat 🐶 dog", "👩‍🚀 astronaut 🏳️‍🌈 flag 👍🏽",
    "2024 was 1,000,000 times 3.14159", "0123456789", "Ⅻ ½ ² ³ ①",
    "don't won't can't I'm you're we've they'll he'd it's",
    "DON'T I'M YOU'RE", "don’t (curly apostrophe)", "'s 't 're 've 'm 'll 'd", "''s ''hello'' '", "!!!???...",
    "--- *** ((( ))) [[[ ]]] {{{", "hello!!!world???yes", "a,b;c:d.e", "<html><body>hi</body></html>",
    "https://example.com/path?q=1&r=2#frag", "#hashtag @mention $100 50% a&b", "x^2 + y^2 = z^2",
    "tab\tseparated\twords", "line\nbreaks\r\nand\rreturns", "no\u00a0break\u2003em\u3000ideographic",
    "zero\u200bwidth\u200djoiner\ufeff", "ctrl\x00\x07\x1b\x1c\x1f\x7fchars", "ＦＵＬＬＷＩＤＴＨ ａｂｃ １２３",
    "ﬁﬂ ligatures", "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "<|startoftext|>a cat<|endoftext|>", "a <|ENDOFTEXT|> b <|StartOfText|>", "x<|endoftext|>y<|endoftext|>",
    "<|endoftext", "|>", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "   leading and trailing   ",
    "masterpiece, best quality, (detailed:1.2), [blurry], <lora:style:0.8>",
    " ".join(["word"] * 75), " ".join(["word"] * 76), " ".join(["photo"] * 200),
    "a " * 100 + "end of a very long prompt that CLIP cannot read",
]


def random_prompt(rng: random.Random) -> str:
    """A prompt mixing words, case, scripts, digits, symbols and odd whitespace."""
    words = ["a", "photo", "of", "cat", "dog", "astronaut", "horse", "painting", "oil", "by", "greg", "rutkowski",
             "cinematic", "lighting", "4k", "ultra-realistic", "don't", "it's", "they're", "über", "niño", "œuvre",
             "東京", "猫", "사진", "город", "λόγος", "😀", "🎨🖌️", "#art", "3d", "1990s", "x", "and", "the", "!!"]
    pieces = []
    for _ in range(rng.randint(1, 30)):
        kind = rng.random()
        if kind < 0.6:
            word = rng.choice(words)
        elif kind < 0.75:
            word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyzéèàçñø") for _ in range(rng.randint(1, 12)))
        elif kind < 0.85:
            word = str(rng.randint(0, 10**rng.randint(1, 8)))
        else:
            word = "".join(rng.choice(".,;:!?-_()[]{}'\"/\\|@#$%^&*+=<>~`") for _ in range(rng.randint(1, 5)))
        if rng.random() < 0.2:
            word = word.upper() if rng.random() < 0.5 else word.capitalize()
        pieces.append(word)
        pieces.append(rng.choice([" ", " ", " ", "  ", "\t", "\n", ", ", "", "\u00a0"]))
    return "".join(pieces)


CORPUS = EDGE_CASES + [random_prompt(random.Random(seed)) for seed in range(240)]


# --- the tokenizer -----------------------------------------------------------------------------


def test_corpus_is_large_and_varied():
    assert len(CORPUS) >= 200 and len(set(CORPUS)) == len(CORPUS)


def test_known_ids(tok):
    assert tok.vocab_size == 49408
    assert tok.encode("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]


SPECIAL_TOKENS_ANY_CASE = re.compile(r"<\|(startoftext|endoftext)\|>", re.IGNORECASE)


def special_tokens_lower_cased(prompt: str) -> str:
    return SPECIAL_TOKENS_ANY_CASE.sub(lambda match: match[0].lower(), prompt)


# The prompts that write a special token in another case, e.g. "<|ENDOFTEXT|>".
OTHER_CASE = [p for p in CORPUS if special_tokens_lower_cased(p) != p]


def test_encode_and_decode_match_transformers(tok, reference):
    assert OTHER_CASE == ["a <|ENDOFTEXT|> b <|StartOfText|>"]
    for prompt in CORPUS:
        ids = tok.encode(prompt)
        if TRANSFORMERS_4 and prompt in OTHER_CASE:
            # transformers 4 matches the special tokens after lower-casing, so "<|ENDOFTEXT|>" is the
            # end token there; transformers 5, and ldm_teach, match them only as written, the rest is text.
            assert reference(prompt).input_ids == tok.encode(special_tokens_lower_cased(prompt)) != ids, prompt
            continue
        assert ids == reference(prompt).input_ids, prompt
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True), prompt


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_padded_batch_matches_transformers(reference_folder, pad_token):
    ours = Tokenizer(pad_token=pad_token)
    theirs = reference_tokenizer(reference_folder, pad_token=pad_token)
    # With pad_token="!", transformers also cuts every "!" out of the prompt as a pad token;
    # that case has its own test below. transformers 4 reads "<|ENDOFTEXT|>" as the end token (see above).
    prompts = [p for p in CORPUS if (pad_token != "!" or "!" not in p)
               and not (TRANSFORMERS_4 and p in OTHER_CASE)]
    assert len(prompts) >= 150
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the over-long prompts warn; test_truncation_warning checks that
        ids = ours(prompts)
    expected = theirs(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ids.dtype == torch.long and ids.shape == (len(prompts), 77)
    assert torch.equal(ids, expected)
    assert ours("").tolist() == [[49406, 49407] + [ours.pad_id] * 75]
    assert ours.pad_id == (0 if pad_token == "!" else 49407)


def test_exclamation_marks_with_sd2_padding(reference_folder, tok):
    """SD 2 pads with "!" (id 0), as OpenCLIP, its training tokenizer, does; a "!" in the prompt stays text.

    transformers registers the pad token as special and turns each "!" of the prompt into a lone
    pad id (diffusers issue #4153); we follow OpenCLIP, whose ids for "! !! !!!" that issue quotes.
    """
    sd2 = Tokenizer(pad_token="!")
    assert sd2("! !! !!!")[0, :6].tolist() == [49406, 256, 748, 995, 49407, 0]
    theirs = reference_tokenizer(reference_folder, pad_token="!")
    assert theirs("! !! !!!").input_ids == [49406, 0, 0, 0, 0, 0, 0, 49407]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for prompt in (p for p in CORPUS if "!" in p):  # the text part does not depend on the pad token
            padded_sd2, padded_sd1 = sd2(prompt)[0], tok(prompt)[0]
            text_length = int((padded_sd1 == 49407).nonzero()[0]) + 1
            assert torch.equal(padded_sd2[:text_length], padded_sd1[:text_length])
            assert (padded_sd2[text_length:] == 0).all()


def test_truncation_warning_names_the_dropped_words(tok):
    prompt = " ".join(["cat"] * 74) + " then a dog and a bird"  # 74 + 6 words, one token each
    with pytest.warns(UserWarning, match="'a dog and a bird'"):
        ids = tok(prompt)
    assert ids[0, -1] == 49407 and ids[0, 75] == tok.encoder["then</w>"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok(" ".join(["cat"] * 75))  # exactly 77 with the start and end tokens: no warning


def test_from_folder(tmp_path, reference_folder, tok):
    sd2 = tmp_path / "sd2_tokenizer"
    sd2.mkdir()
    write_reference_files(sd2)
    (sd2 / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!"}}))
    assert Tokenizer.from_folder(reference_folder).pad_id == 49407
    assert Tokenizer.from_folder(sd2).pad_id == 0
    saved = tmp_path / "tokenizer_json"  # what transformers 5 writes; transformers 4 writes it with legacy_format=False
    transformers.CLIPTokenizerFast.from_pretrained(str(sd2)).save_pretrained(saved, legacy_format=False)
    assert (saved / "tokenizer.json").exists() and not (saved / "vocab.json").exists()
    for folder in (reference_folder, sd2, saved):
        loaded = Tokenizer.from_folder(folder)
        assert loaded.pad_token == ("<|endoftext|>" if folder == reference_folder else "!")
        assert all(loaded.encode(p) == tok.encode(p) for p in CORPUS[:80])


def test_bad_inputs_raise(tmp_path, tok):
    with pytest.raises(TypeError, match="int"):
        tok(123)
    with pytest.raises(TypeError, match="prompt 1 must be a str, got NoneType"):
        tok(["a cat", None])
    with pytest.raises(TypeError, match="bytes"):
        tok.encode(b"a cat")
    with pytest.raises(ValueError, match="empty list"):
        tok([])
    with pytest.raises(ValueError, match="no '<pad>' token"):
        Tokenizer(pad_token="<pad>")
    with pytest.raises(FileNotFoundError, match="missing.txt.gz"):
        Tokenizer(tmp_path / "missing.txt.gz")
    (tmp_path / "plain.txt.gz").write_text("not gzip")
    with pytest.raises(ValueError, match="corrupt"):
        Tokenizer(tmp_path / "plain.txt.gz")
    (tmp_path / "short.txt.gz").write_bytes(gzip.compress(b"#version: 0.2\ni n\nt h\n"))
    with pytest.raises(ValueError, match="48,894"):
        Tokenizer(tmp_path / "short.txt.gz")
    with pytest.raises(FileNotFoundError, match="vocab.json and merges.txt"):
        Tokenizer.from_folder(tmp_path)


# --- the text encoder --------------------------------------------------------------------------

TINY_CONFIGS = [
    dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
         hidden_act="quick_gelu"),
    dict(vocab_size=500, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3,
         hidden_act="gelu", layer_norm_eps=1e-6),
    dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=8,
         max_position_embeddings=40, hidden_act="gelu"),
]


def reference_text_model(**config):
    torch.manual_seed(0)
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)).eval()


@pytest.mark.parametrize("config", TINY_CONFIGS)
def test_tiny_text_encoders_match_transformers(config):
    theirs = reference_text_model(**config)
    ours = pretrained.text_encoder_from_transformers(theirs)
    generator = torch.Generator().manual_seed(1)
    for length in (theirs.config.max_position_embeddings, 9):
        ids = torch.randint(0, config["vocab_size"], (3, length), generator=generator)
        with torch.no_grad():
            expected = theirs(ids).last_hidden_state
            got = ours(ids)
        assert got.shape == (3, length, config["hidden_size"])
        assert (got - expected).abs().max() < 1e-4


def test_full_size_text_encoder_matches_transformers(tok):
    theirs = reference_text_model(**vars(TextEncoderConfig.sd15()))
    ours = pretrained.text_encoder_from_transformers(theirs)
    ids = tok("a photograph of an astronaut riding a horse")
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).last_hidden_state).abs().max() < 1e-4


def test_parameter_counts_on_meta():
    with torch.device("meta"):
        sd15 = TextEncoder(TextEncoderConfig.sd15())
        sd2 = TextEncoder(TextEncoderConfig.sd2())
        sd2_reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(**vars(TextEncoderConfig.sd2())))
    assert sum(p.numel() for p in sd15.parameters()) == 123_060_480
    assert sum(p.numel() for p in sd2.parameters()) == sum(p.numel() for p in sd2_reference.parameters())


# Tiny configs with a projection, as SDXL's second encoder (CLIPTextModelWithProjection): both ways of
# finding the end token (eos_token_id 2, as SD's and SDXL's configs say: the largest id; else the first
# occurrence of the id), both activations.
PROJECTION_CONFIGS = [
    dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
         hidden_act="gelu", projection_dim=24, eos_token_id=2),
    dict(vocab_size=1000, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
         hidden_act="quick_gelu", projection_dim=48, eos_token_id=999),
]


def ids_with_end_tokens(vocab_size: int, end_id: int, lengths: list[int], seed: int = 3) -> torch.Tensor:
    """(B, 77) ids: each row ``length`` random words, then the end token repeated as padding (SD 1.x's way)."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.full((len(lengths), 77), end_id)
    for row, length in zip(rows, lengths):
        row[:length] = torch.randint(3, vocab_size - 2, (length,), generator=generator)
    return rows


@pytest.mark.parametrize("config", PROJECTION_CONFIGS)
def test_hidden_states_and_pooled_projection_match_transformers(config):
    torch.manual_seed(0)
    theirs = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**config)).eval()
    ours = pretrained.text_encoder_from_transformers(theirs)
    assert ours.config.projection_dim == config["projection_dim"] and ours.config.eos_token_id == config["eos_token_id"]
    ids = ids_with_end_tokens(config["vocab_size"], 999, [5, 40, 76])
    with torch.no_grad():
        expected = theirs(ids, output_hidden_states=True)
        got = ours.encode(ids)
        plain = ours(ids)
    assert torch.equal(plain, got.last_hidden_state)
    assert (got.last_hidden_state - expected.last_hidden_state).abs().max() < 1e-4
    assert len(got.hidden_states) == len(expected.hidden_states) == config["num_hidden_layers"] + 1
    for mine, reference in zip(got.hidden_states, expected.hidden_states):
        assert (mine - reference).abs().max() < 1e-4
    assert (got.hidden_states[-2] - expected.hidden_states[-2]).abs().max() < 1e-4  # SDXL's penultimate layer
    assert got.text_embeds.shape == (3, config["projection_dim"])
    assert (got.text_embeds - expected.text_embeds).abs().max() < 1e-4
    # The pooled row is the end token's: the first of the padding when the id is the end token's.
    assert torch.equal(got.pooler_output, got.last_hidden_state[torch.arange(3), torch.tensor([5, 40, 76])])


def test_pooled_output_of_a_plain_text_model_matches_transformers():
    theirs = reference_text_model(**TINY_CONFIGS[0], eos_token_id=999)
    ours = pretrained.text_encoder_from_transformers(theirs)
    assert ours.text_projection is None and ours.config.projection_dim is None
    ids = ids_with_end_tokens(1000, 999, [1, 30])
    with torch.no_grad():
        expected, got = theirs(ids), ours.encode(ids)
    assert got.text_embeds is None
    assert (got.pooler_output - expected.pooler_output).abs().max() < 1e-4


def test_load_text_encoder_with_projection_from_a_saved_folder(tmp_path):
    torch.manual_seed(0)
    theirs = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**PROJECTION_CONFIGS[0])).eval()
    theirs.save_pretrained(tmp_path / "pipeline" / "text_encoder_2")
    loaded = pretrained.load_text_encoder(tmp_path / "pipeline", subfolder="text_encoder_2")
    ids = ids_with_end_tokens(1000, 999, [7, 12])
    with torch.no_grad():
        direct = pretrained.text_encoder_from_transformers(theirs)
        assert torch.equal(loaded.encode(ids).text_embeds, direct.encode(ids).text_embeds)
        assert (loaded.encode(ids).text_embeds - theirs(ids).text_embeds).abs().max() < 1e-4


def test_sdxl_bigg_text_encoder_has_the_parameter_count_of_transformers():
    config = TextEncoderConfig.sdxl_bigg()
    with torch.device("meta"):
        ours = TextEncoder(config)
        theirs = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**vars(config)))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 694_659_840


def test_load_text_encoder_from_saved_folders(tmp_path):
    theirs = reference_text_model(**TINY_CONFIGS[0])
    theirs.save_pretrained(tmp_path / "pipeline" / "text_encoder")
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = pretrained.text_encoder_from_transformers(theirs)(ids)
        from_pipeline = pretrained.load_text_encoder(tmp_path / "pipeline")
        from_component = pretrained.load_text_encoder(tmp_path / "pipeline" / "text_encoder")
        assert torch.equal(from_pipeline(ids), expected) and torch.equal(from_component(ids), expected)
        assert (expected - theirs(ids).last_hidden_state).abs().max() < 1e-4
        # transformers from 5.6 on saves the weights without the "text_model." prefix; SD checkpoints and
        # older transformers keep it, and the oldest also the position_ids buffer. Both layouts load.
        weights = load_file(tmp_path / "pipeline" / "text_encoder" / "model.safetensors")
        without_prefix = {k.removeprefix("text_model."): v for k, v in weights.items()}
        with_prefix = {f"text_model.{k}": v for k, v in without_prefix.items()}
        with_prefix["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        for layout, layout_weights in (("without_prefix", without_prefix), ("with_prefix", with_prefix)):
            (tmp_path / layout).mkdir()
            save_file(layout_weights, tmp_path / layout / "model.safetensors")
            (tmp_path / layout / "config.json").write_text(
                (tmp_path / "pipeline" / "text_encoder" / "config.json").read_text())
            assert torch.equal(pretrained.load_text_encoder(tmp_path / layout)(ids), expected), layout
    half = pretrained.load_text_encoder(tmp_path / "pipeline", dtype=torch.float16)
    assert half.token_embedding.weight.dtype == torch.float16


def test_mismatched_keys_raise_listing_them(tmp_path):
    reference_text_model(**TINY_CONFIGS[0]).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    prefix = "text_model." if "text_model.final_layer_norm.weight" in weights else ""  # transformers < 5.6 has it
    weights["text_projection.weight"] = weights.pop(f"{prefix}final_layer_norm.weight")
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=r"missing keys \(1\):\n    final_layer_norm.weight") as error:
        pretrained.load_text_encoder(tmp_path)
    assert "unexpected keys (1):\n    text_projection.weight" in str(error.value)


def test_text_encoder_bad_inputs_raise():
    encoder = TextEncoder(TextEncoderConfig(**TINY_CONFIGS[0]))
    with pytest.raises(ValueError, match="integer tensor"):
        encoder(torch.zeros(1, 77))
    with pytest.raises(ValueError, match="78 tokens"):
        encoder(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        encoder(torch.full((1, 77), 49407))
    with pytest.raises(ValueError, match="hidden_act"):
        TextEncoderConfig(hidden_act="relu")


# --- the tiny CLIP -----------------------------------------------------------------------------

VISION_RENAMES = (("vision_model.embeddings.", "image_encoder."), ("vision_model.encoder.", "image_encoder."),
                  ("vision_model.pre_layrnorm.", "image_encoder.pre_layernorm."), ("vision_model.", "image_encoder."))


def clip_key(transformers_key: str) -> str:
    """The name of a transformers CLIPModel weight in ldm_teach.clip.CLIP."""
    if transformers_key.startswith("text_model."):
        return "text_encoder." + pretrained.text_encoder_key(transformers_key)
    for old, new in VISION_RENAMES:
        if transformers_key.startswith(old):
            return new + transformers_key.removeprefix(old)
    return transformers_key


def test_tiny_clip_matches_transformers(tok):
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu")
    image = dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4)
    torch.manual_seed(0)
    theirs = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(text, eos_token_id=49407), vision_config=image, projection_dim=16)).eval()
    ours = CLIP(TextEncoderConfig(**text), ImageEncoderConfig(**image), projection_dim=16)
    ours.load_state_dict({clip_key(k): v for k, v in theirs.state_dict().items()}, strict=True)
    ids = tok(["a red square", "a blue circle on a white background", ""])
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = theirs(input_ids=ids, pixel_values=images, return_loss=True)
        logits = ours(ids, images)
    assert logits.shape == (3, 3)
    assert (logits - expected.logits_per_text).abs().max() < 1e-4
    assert abs(contrastive_loss(logits) - expected.loss) < 1e-4
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        ours.encode_image(torch.zeros(1, 3, 28, 28))


def test_tiny_clip_learns_to_pair_a_batch(tok):
    torch.manual_seed(0)
    model = CLIP(TextEncoderConfig.tiny(), ImageEncoderConfig(), projection_dim=32)
    ids = tok(["a red square", "a green circle", "a blue triangle", "a yellow star"])
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = contrastive_loss(model(ids, images))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert (model(ids, images).argmax(dim=1) == torch.arange(4)).all()


def test_numpy_token_ids_are_named():
    import numpy as np

    encoder = TextEncoder(TextEncoderConfig.tiny())
    with pytest.raises(TypeError, match=r"input_ids is a NumPy array of shape \(1, 77\).*torch.from_numpy"):
        encoder(np.zeros((1, 77), np.int64))
