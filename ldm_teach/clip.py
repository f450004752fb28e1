"""CLIP: the tokenizer and text encoder Stable Diffusion conditions on, and a tiny CLIP to train.

Chapter 03 builds this file top to bottom:

1. the **tokenizer** (section 03.2): clean the text, split it into words, spell each word in
   byte-level characters, merge character pairs by rank (byte-pair encoding), add the start and
   end tokens and pad to 77 ids. It reproduces transformers' ``CLIPTokenizer`` id for id, using
   the vocabulary bundled in ``ldm_teach/assets`` (transformers 4's ``CLIPTokenizerFast`` too, except
   that it reads a special token written in capitals, ``<|ENDOFTEXT|>``, as the special token);
2. the **text encoder** (chapter 03): token plus position embeddings, a stack of pre-LayerNorm
   transformer blocks with a causal mask, a final LayerNorm. Stable Diffusion feeds the U-Net all
   77 of its output vectors, not a single pooled one (section 03.4); SDXL (chapter 08) takes a
   layer's output before the last and, from its second encoder, the pooled and projected vector
   too (``TextEncoder.encode``);
3. a **tiny CLIP** (section 03.1): a small ViT image encoder, projections into a shared space and
   the symmetric contrastive loss, small enough to train in the chapter.
"""
from __future__ import annotations

import gzip
import json
import math
import unicodedata
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import regex
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import as_int, check_tensor

BUNDLED_VOCABULARY = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
# CLIP uses the first 49,152 - 256 - 2 = 48,894 merges of the file, so that its vocabulary is
# 256 byte characters + 256 end-of-word versions + 48,894 merged tokens + 2 special tokens = 49,408.
NUM_MERGES = 49152 - 256 - 2

# Runs of whitespace, Unicode-wide (the same set as the Rust regex transformers uses).
WHITESPACE = regex.compile(r"\s+")
# The pre-split: the English contractions, runs of letters, single digits, runs of other symbols.
# Python's ``re`` has no \p{L} (any letter) or \p{N} (any number); the ``regex`` module does.
PRE_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+""")
# The special tokens, written literally in a prompt, are cut out before any clean-up (case-sensitive).
SPECIAL_TOKENS = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")


# --- the tokenizer (section 03.2) ----------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """A printable character for each of the 256 byte values (section 03.2, "byte-level BPE").

    BPE works on strings, and a merges file must be plain text, so each byte is spelled as a
    visible character: the printable Latin-1 bytes stand for themselves and the other 68 (control
    characters, space, ...) are moved to code points 256 and up. Any UTF-8 text then becomes a
    string over this 256-character alphabet, so no word is ever out of vocabulary.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    moved = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + moved)
            moved += 1
    return table  # printable bytes first, then the moved ones: this order numbers the first 256 tokens


def read_bpe_merges(path: str | Path) -> list[tuple[str, str]]:
    """The 48,894 merges CLIP uses from a ``bpe_simple_vocab_16e6.txt.gz`` file, best first."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"the CLIP vocabulary file {path} does not exist; leave vocab_path=None for the bundled one."
        )
    try:
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is not a gzipped UTF-8 BPE merges file ({error}); it may be truncated or corrupt."
        ) from error
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]  # line 0 is a "#version" header
    if len(merges) < NUM_MERGES or any(len(merge) != 2 for merge in merges):
        raise ValueError(
            f"{path} does not hold CLIP's merges: expected {NUM_MERGES:,} lines of two space-separated "
            f"symbols after the header, found {sum(len(merge) == 2 for merge in merges):,}."
        )
    return merges


def clip_vocabulary(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token -> id, built the way OpenAI's CLIP builds it from the merges (49,408 entries).

    The 256 byte characters, the same with ``</w>`` (end of word) appended, one token per merge,
    then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).
    """
    characters = list(bytes_to_unicode().values())
    tokens = characters + [character + "</w>" for character in characters]
    tokens += ["".join(merge) for merge in merges] + [START_TOKEN, END_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def clean_text(text: str) -> str:
    """Canonical Unicode (NFC), each whitespace run as one space, lower case (section 03.2).

    The same three steps, in the same order, as transformers' CLIPTokenizer. OpenAI's CLIP also
    repairs mojibake with ``ftfy``; transformers does not, and neither do we. Lower-casing goes
    character by character as transformers does, so a Greek capital sigma always becomes σ
    (Python's ``str.lower`` would write a word-final one as ς).
    """
    text = unicodedata.normalize("NFC", text)
    text = WHITESPACE.sub(" ", text)
    return "".join(character.lower() for character in text)


def merge_best_pair(parts: list[str], bpe_ranks: dict[tuple[str, str], int]) -> list[str] | None:
    """One BPE step (section 03.2): merge every occurrence of the best-ranked adjacent pair.

    ``bpe_ranks`` maps a pair of symbols to its rank, 0 for the merge learnt first. Returns the
    new list of symbols, or None when no adjacent pair is a known merge (the word is finished).
    """
    best = min(zip(parts, parts[1:]), key=lambda pair: bpe_ranks.get(pair, math.inf), default=None)
    if best not in bpe_ranks:
        return None
    merged, i = [], 0
    while i < len(parts):
        if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
            merged.append(parts[i] + parts[i + 1])
            i += 2
        else:
            merged.append(parts[i])
            i += 1
    return merged


class Tokenizer:
    """CLIP's byte-level BPE tokenizer: prompts in, (B, 77) token ids out (section 03.2).

    ``vocab_path`` is a ``bpe_simple_vocab_16e6.txt.gz`` merges file (default: the bundled one);
    ``pad_token`` fills the rows after the end token: SD 1.x pads with ``<|endoftext|>``, SD 2.x
    with ``"!"`` (id 0). ``Tokenizer.from_folder`` reads a transformers-format tokenizer folder.
    """

    def __init__(self, vocab_path: str | Path | None = None, max_length: int = 77, pad_token: str = END_TOKEN):
        merges = read_bpe_merges(BUNDLED_VOCABULARY if vocab_path is None else vocab_path)
        self._setup(clip_vocabulary(merges), merges, max_length, pad_token)

    @classmethod
    def from_folder(cls, path: str | Path, max_length: int = 77, pad_token: str | None = None) -> "Tokenizer":
        """A tokenizer from a transformers-format folder, such as a diffusers pipeline's ``tokenizer/``.

        It reads ``vocab.json`` and ``merges.txt`` or, where only that is present, the
        ``tokenizer.json`` that transformers 5 writes. Without ``pad_token`` the folder's
        ``special_tokens_map.json`` or ``tokenizer_config.json`` names it.
        """
        folder = Path(path)
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocabulary = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        elif (folder / "tokenizer.json").is_file():
            model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
            vocabulary = model["vocab"]
            lines = [line if isinstance(line, str) else " ".join(line) for line in model["merges"]]
        else:
            raise FileNotFoundError(
                f"{folder} holds no CLIP tokenizer: expected vocab.json and merges.txt, or tokenizer.json."
            )
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        bad = [merge for merge in merges if len(merge) != 2]
        if bad:
            raise ValueError(f"the merges in {folder} have {len(bad)} entries that are not two symbols, e.g. {bad[0]}.")
        if pad_token is None:
            pad_token = END_TOKEN
            for name in ("tokenizer_config.json", "special_tokens_map.json"):  # where both name one, the second wins
                if (folder / name).is_file():
                    named = json.loads((folder / name).read_text(encoding="utf-8")).get("pad_token")
                    if named is not None:
                        pad_token = named["content"] if isinstance(named, dict) else named
        tokenizer = cls.__new__(cls)
        tokenizer._setup(vocabulary, merges, max_length, pad_token)
        return tokenizer

    def _setup(self, vocabulary: dict[str, int], merges: list[tuple[str, str]], max_length: int, pad_token: str):
        for token in (START_TOKEN, END_TOKEN, pad_token):
            if token not in vocabulary:
                raise ValueError(
                    f"the vocabulary has no {token!r} token; pass a pad_token it has, e.g. {END_TOKEN!r} or '!'."
                )
        if max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for the start and end tokens; use 77.")
        self.encoder = vocabulary  # token -> id
        self.decoder = {index: token for token, index in vocabulary.items()}
        self.bpe_ranks = {merge: rank for rank, merge in enumerate(merges)}  # lower rank merges first
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {character: byte for byte, character in self.byte_encoder.items()}
        self.max_length = max_length
        self.pad_token = pad_token
        self.start_id, self.end_id, self.pad_id = vocabulary[START_TOKEN], vocabulary[END_TOKEN], vocabulary[pad_token]
        self.cache: dict[str, list[str]] = {}
        self.added_tokens: list[str] = []  # tokens add_tokens appended; tokenize keeps them whole
        self.special = SPECIAL_TOKENS

    def add_tokens(self, tokens: list[str]) -> list[int]:
        """Give each new token the next free id and keep it whole wherever it appears in a prompt.

        This is how a learnt concept joins the vocabulary (textual inversion, chapter 09): ``"<cross>"``
        becomes one id instead of the BPE pieces ``<``, ``cross``, ``>``. The text encoder then needs
        an embedding row for each new id (``TextEncoder.resize_token_embeddings``)."""
        if isinstance(tokens, str):
            tokens = [tokens]
        ids = []
        for token in tokens:
            if not isinstance(token, str) or not token or any(character.isspace() for character in token):
                raise ValueError(f"token={token!r} must be a non-empty str without spaces, e.g. '<cross>'.")
            if token in self.encoder:
                raise ValueError(f"token={token!r} is already in the vocabulary (id {self.encoder[token]}); "
                                 f"pick a new string such as '<{token.strip('<>')}-1>'.")
            ids.append(len(self.encoder))
            self.encoder[token], self.decoder[ids[-1]] = ids[-1], token + "</w>"  # decodes as a whole word
            self.added_tokens.append(token)
        whole = sorted([START_TOKEN, END_TOKEN, *self.added_tokens], key=len, reverse=True)  # longest first
        self.special = regex.compile("(" + "|".join(regex.escape(token) for token in whole) + ")")
        return ids

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def bpe(self, word: str) -> list[str]:
        """Split one byte-level word into vocabulary tokens by merging pairs in rank order.

        Start from single characters, the last one marked ``</w>``; repeatedly find the adjacent
        pair whose merge ranks best (appeared most often when the vocabulary was learnt) and merge
        every occurrence of it; stop when no adjacent pair is in the merges. Prompts repeat words,
        so results are cached.
        """
        if word in self.cache:
            return self.cache[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merged = merge_best_pair(parts, self.bpe_ranks)
            if merged is None:
                break
            parts = merged
        self.cache[word] = parts
        return parts

    def tokenize(self, text: str) -> list[str]:
        """The tokens of ``text``, without start and end tokens: clean, pre-split, bytes, BPE."""
        if not isinstance(text, str):
            raise TypeError(f"a prompt must be a str, got {type(text).__name__}: {text!r:.80}.")
        tokens = []
        for piece in self.special.split(text):
            if piece in (START_TOKEN, END_TOKEN) or piece in self.added_tokens:
                tokens.append(piece)
                continue
            for word in PRE_SPLIT.findall(clean_text(piece)):
                tokens += self.bpe("".join(self.byte_encoder[byte] for byte in word.encode("utf-8")))
        return tokens

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` between the start and end tokens; no truncation, no padding."""
        return [self.start_id, *(self.encoder[token] for token in self.tokenize(text)), self.end_id]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text back from ids (a list or a 1-D tensor); ``</w>`` becomes a space."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        special = (self.start_id, self.end_id) if skip_special_tokens else ()
        text = "".join(self.decoder[index] for index in ids if index not in special)
        text = bytearray(self.byte_decoder[character] for character in text).decode("utf-8", errors="replace")
        return text.replace("</w>", " ").strip()

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        """Token ids (B, max_length) for a prompt or a list of prompts, truncated and padded.

        A prompt longer than ``max_length`` tokens keeps its first ``max_length - 1`` and the end
        token; a warning names the words that were dropped.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a str or a list of str, got {type(prompts).__name__}.")
        if len(prompts) == 0:
            raise ValueError("prompts is an empty list; pass at least one prompt (\"\" is the empty prompt).")
        rows = []
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt {index} must be a str, got {type(prompt).__name__}: {prompt!r:.80}.")
            ids = self.encode(prompt)
            if len(ids) > self.max_length:
                dropped = self.decode(ids[self.max_length - 1:-1])
                warnings.warn(
                    f"prompt {index} is {len(ids)} tokens long and CLIP reads at most {self.max_length}; "
                    f"these words were dropped: {dropped!r}. Shorten the prompt to keep them.",
                    stacklevel=2,
                )
                ids = ids[:self.max_length - 1] + [self.end_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)  # (B, 77)


# --- the text encoder (chapter 03) ----------------------------------------------------------

# transformers' CLIPTextConfig defaults, for keys a config.json leaves out.
TRANSFORMERS_TEXT_DEFAULTS = dict(
    vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407,
)
TRANSFORMERS_PROJECTION_DIM = 512  # CLIPTextConfig's default projection_dim
ACTIVATIONS = ("quick_gelu", "gelu")


def check_transformer_shape(config) -> None:
    """The checks every transformer config needs: a known activation, heads that split the width."""
    if config.hidden_act not in ACTIVATIONS:
        raise ValueError(f"hidden_act={config.hidden_act!r} is not supported; use one of {ACTIVATIONS}.")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"hidden_size={config.hidden_size} must divide evenly into "
            f"num_attention_heads={config.num_attention_heads}."
        )


@dataclass
class TextEncoderConfig:
    """The shape of a CLIP text transformer; the defaults are SD 1.x's (OpenAI ViT-L/14's text half).

    ``projection_dim`` set adds ``text_projection``, as in transformers' CLIPTextModelWithProjection
    (SDXL's second encoder: 1280). ``eos_token_id`` says where the pooled vector is read: the first
    end token, except for configs that say 2 (written before transformers fixed the id; SD's and
    SDXL's say 2), where it is the largest id in the row, which is the end token in CLIP's vocabulary.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None
    eos_token_id: int = 49407

    def __post_init__(self):
        check_transformer_shape(self)

    @classmethod
    def sd15(cls) -> "TextEncoderConfig":
        """SD 1.x: OpenAI CLIP ViT-L/14's text transformer, 12 layers, 768 wide, quick GELU."""
        return cls()

    @classmethod
    def sd2(cls) -> "TextEncoderConfig":
        """SD 2.x: OpenCLIP ViT-H/14's text transformer, 1024 wide, exact GELU. OpenCLIP has 24 layers;
        SD 2 conditions on the penultimate one's output, so its checkpoints keep only 23."""
        return cls(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                   hidden_act="gelu")

    @classmethod
    def sdxl_bigg(cls) -> "TextEncoderConfig":
        """SDXL's second text encoder (the refiner's only one): OpenCLIP ViT-bigG/14's text transformer,
        32 layers, 1280 wide, exact GELU, projected to 1280. SDXL's first encoder is SD 1.x's."""
        return cls(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   hidden_act="gelu", projection_dim=1280, eos_token_id=2)

    @classmethod
    def tiny(cls) -> "TextEncoderConfig":
        """A 2-layer, 64-wide encoder over the full vocabulary, for training in a chapter and for tests."""
        return cls(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)

    @classmethod
    def from_transformers_config(cls, config: dict, with_projection: bool | None = None) -> "TextEncoderConfig":
        """From a CLIPTextConfig as a dict (``config.json``, or ``model.config.to_dict()``).

        ``with_projection`` says whether the model is a CLIPTextModelWithProjection; None reads it
        from the config's ``architectures``, which ``save_pretrained`` writes.
        """
        if with_projection is None:
            with_projection = "CLIPTextModelWithProjection" in (config.get("architectures") or ())
        config = config.get("text_config", config)  # a whole CLIPConfig holds the text part under "text_config"
        projection_dim = config.get("projection_dim", TRANSFORMERS_PROJECTION_DIM) if with_projection else None
        return cls(**{key: config.get(key, default) for key, default in TRANSFORMERS_TEXT_DEFAULTS.items()},
                   projection_dim=projection_dim)


class SelfAttention(nn.Module):
    """Multi-head self-attention; ``causal=True`` lets each position see only itself and earlier ones."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = (proj(x).view(B, L, self.num_heads, D // self.num_heads).transpose(1, 2)  # (B, heads, L, D/heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        x = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # softmax(q kᵀ / √d) v
        return self.out_proj(x.transpose(1, 2).reshape(B, L, D))  # (B, L, D)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's cheap GELU approximation, x · σ(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


class MLP(nn.Module):
    """The feed-forward half of a block: widen, activate, narrow back."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.activation = quick_gelu if hidden_act == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class TransformerBlock(nn.Module):
    """A pre-LayerNorm block: x + attention(LN(x)), then x + MLP(LN(x)); the same for text and images."""

    def __init__(self, config: TextEncoderConfig | ImageEncoderConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SelfAttention(config.hidden_size, config.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


@dataclass
class TextEncoderOutput:
    """Everything ``TextEncoder.encode`` computes, under transformers' names.

    ``hidden_states`` holds the embeddings and each layer's output (num_hidden_layers + 1 tensors
    (B, L, D), before the final LayerNorm): SDXL conditions on ``hidden_states[-2]``.
    ``pooler_output`` (B, D) is the end token's row of ``last_hidden_state``; ``text_embeds``
    (B, projection_dim) its projection, None without ``text_projection``.
    """

    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]
    pooler_output: torch.Tensor
    text_embeds: torch.Tensor | None


class TextEncoder(nn.Module):
    """CLIP's text transformer: ids (B, L) -> per-token features (B, L, D) after the final LayerNorm.

    The mask is causal, as in a language model: the feature at position i depends only on tokens
    0..i. So everything before the end token is unaffected by the padding after it, and the end
    token's feature has seen the whole prompt (it is the one CLIP pools; chapter 03, section "The text encoder").
    ``encode`` returns also every layer's output and the pooled vector (chapter 08, SDXL).
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.text_projection = None
        if config.projection_dim is not None:  # CLIPTextModelWithProjection (SDXL's second encoder)
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) -> the last layer's features after the final LayerNorm (B, L, D)."""
        self.check_ids(input_ids)
        return self.final_layer_norm(self.run_layers(input_ids)[-1])  # (B, L, D)

    def encode(self, input_ids: torch.Tensor) -> TextEncoderOutput:
        """ids (B, L) -> every layer's output, the final features, the pooled vector and its projection."""
        self.check_ids(input_ids)
        hidden_states = self.run_layers(input_ids)
        last_hidden_state = self.final_layer_norm(hidden_states[-1])  # (B, L, D)
        ids = input_ids.int()
        end = ids.argmax(dim=1) if self.config.eos_token_id == 2 else (ids == self.config.eos_token_id).int().argmax(1)
        pooled = last_hidden_state[torch.arange(len(ids), device=ids.device), end]  # (B, D)
        text_embeds = None if self.text_projection is None else self.text_projection(pooled)  # (B, projection_dim)
        return TextEncoderOutput(last_hidden_state, hidden_states, pooled, text_embeds)

    def resize_token_embeddings(self, vocab_size: int) -> nn.Embedding:
        """Grow the token embedding table to ``vocab_size`` rows for tokens a tokenizer added; the old rows
        are kept as they are, each new row starts as the mean of the old ones (chapter 09)."""
        vocab_size = as_int(vocab_size, "vocab_size", minimum=self.config.vocab_size)
        old = self.token_embedding.weight
        table = nn.Embedding(vocab_size, old.shape[1], device=old.device, dtype=old.dtype)
        with torch.no_grad():
            table.weight[:len(old)] = old
            table.weight[len(old):] = old.mean(dim=0)
        self.token_embedding = table.requires_grad_(old.requires_grad)
        self.config = replace(self.config, vocab_size=vocab_size)
        return table

    def run_layers(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The embeddings and each layer's output, (num_hidden_layers + 1) x (B, L, D)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, L, D)
        hidden_states = [x]
        for layer in self.layers:
            hidden_states.append(layer(hidden_states[-1], causal=True))
        return tuple(hidden_states)

    def check_ids(self, input_ids: torch.Tensor) -> None:
        """Refuse ids the encoder cannot read, saying why."""
        check_tensor(input_ids, "input_ids", finite=False)
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"input_ids must be a (B, L) integer tensor from the tokenizer, got {input_ids.dtype} of shape "
                f"{tuple(input_ids.shape)}."
            )
        L = input_ids.shape[1]
        if L > self.config.max_position_embeddings:
            raise ValueError(
                f"{L} tokens is more than the {self.config.max_position_embeddings} positions this encoder has."
            )
        if input_ids.numel() and not input_ids.is_meta and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < self.config.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}); is the tokenizer's vocabulary this model's?"
            )


# --- a tiny CLIP (section 03.1) ------------------------------------------------------------


@dataclass
class ImageEncoderConfig:
    """A small vision transformer: ``image_size`` pictures cut into ``patch_size`` squares."""

    image_size: int = 32
    patch_size: int = 4
    num_channels: int = 3
    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        check_transformer_shape(self)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}.")


class ImageEncoder(nn.Module):
    """A ViT: each patch becomes a token, a learnt class token joins them, and after the blocks the
    class token's feature (B, D) describes the whole image. No causal mask: every patch sees every other."""

    def __init__(self, config: ImageEncoderConfig):
        super().__init__()
        self.config = config
        D, num_patches = config.hidden_size, (config.image_size // config.patch_size) ** 2
        self.patch_embedding = nn.Conv2d(config.num_channels, D, config.patch_size, stride=config.patch_size,
                                         bias=False)
        self.class_embedding = nn.Parameter(torch.randn(D) * D**-0.5)
        self.position_embedding = nn.Embedding(num_patches + 1, D)
        self.pre_layernorm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(D, eps=config.layer_norm_eps)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size, channels = self.config.image_size, self.config.num_channels
        if images.ndim != 4 or tuple(images.shape[1:]) != (channels, size, size):
            raise ValueError(f"images must be (B, {channels}, {size}, {size}), got {tuple(images.shape)}.")
        patches = self.patch_embedding(images).flatten(2).transpose(1, 2)  # (B, N, D), N = (size / patch)²
        class_token = self.class_embedding.expand(len(images), 1, -1)  # (B, 1, D)
        x = torch.cat([class_token, patches], dim=1) + self.position_embedding.weight  # (B, N + 1, D)
        x = self.pre_layernorm(x)
        for layer in self.layers:
            x = layer(x, causal=False)
        return self.post_layernorm(x[:, 0])  # (B, D)


class CLIP(nn.Module):
    """Text and images projected into one space and compared by cosine similarity.

    A text is summarised by its end token's feature (the causal mask lets it see the whole
    prompt), an image by its class token's; each is projected to ``projection_dim`` and scaled to
    unit length. ``forward`` returns the (texts, images) similarity matrix times a learnt
    temperature, the logits of ``contrastive_loss``.
    """

    def __init__(self, text_config: TextEncoderConfig, image_config: ImageEncoderConfig, projection_dim: int = 64,
                 end_token_id: int = 49407):
        super().__init__()
        self.text_encoder = TextEncoder(text_config)
        self.image_encoder = ImageEncoder(image_config)
        self.text_projection = nn.Linear(text_config.hidden_size, projection_dim, bias=False)
        self.visual_projection = nn.Linear(image_config.hidden_size, projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # the temperature, as a log
        self.end_token_id = end_token_id
        # CLIP's small initial embeddings (std 0.02 for tokens, 0.01 for positions): with nn.Embedding's
        # default std of 1 the raw end-token embedding swamps every caption's pooled feature, and
        # training sits on a plateau where all captions look alike.
        for embedding, std in ((self.text_encoder.token_embedding, 0.02), (self.text_encoder.position_embedding, 0.01),
                               (self.image_encoder.position_embedding, 0.01)):
            nn.init.normal_(embedding.weight, std=std)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        features = self.text_encoder(input_ids)  # (B, L, D)
        end = (input_ids == self.end_token_id).int().argmax(dim=1)  # the first end token of each row
        pooled = features[torch.arange(len(input_ids), device=features.device), end]  # (B, D)
        return F.normalize(self.text_projection(pooled), dim=-1)  # (B, projection_dim)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual_projection(self.image_encoder(images)), dim=-1)  # (B, projection_dim)

    def forward(self, input_ids: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return self.logit_scale.exp() * self.encode_text(input_ids) @ self.encode_image(images).T  # (B_text, B_image)


def contrastive_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric loss: text i must pick image i out of the batch, and image i text i."""
    targets = torch.arange(len(logits_per_text), device=logits_per_text.device)
    return (F.cross_entropy(logits_per_text, targets) + F.cross_entropy(logits_per_text.T, targets)) / 2


def zero_shot_weights(text_features: torch.Tensor) -> torch.Tensor:
    """One unit vector per class from the embeddings of its prompts (section 03.1, zero-shot).

    ``text_features`` (C, T, D) embeds each of C classes with T prompt templates ("a photo of a
    {}", ...). Each embedding is scaled to unit length, the T are averaged, and the mean is scaled
    to unit length again, as in the CLIP paper's prompt ensembling. An image's class is then the
    row with the largest cosine similarity: ``(image_features @ weights.T).argmax(dim=1)``.
    """
    return F.normalize(F.normalize(text_features, dim=-1).mean(dim=1), dim=-1)  # (C, D)
