"""Reading the LoRA and textual-inversion files people share (chapter 09, section "Files from the model sites").

A LoRA file is a bag of tensors: for each adapted layer a down matrix A (r, in), an up matrix
B (out, r) and sometimes alpha. Two naming schemes are common:

* diffusers / PEFT (what ``save_lora_weights`` writes): ``unet.<module>.lora_A.weight`` and
  ``.lora_B.weight``, ``text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight``;
  older diffusers files say ``lora.down``/``lora.up`` or ``processor.to_q_lora.down``. alpha is in
  the adapter config that diffusers keeps in the file's metadata, or equals r when absent.
* kohya's sd-scripts (most files on model sites): the module path with its dots turned into
  underscores, ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight``,
  ``.lora_up.weight`` and a scalar ``.alpha``; ``lora_te_`` (SDXL: ``lora_te1_``, ``lora_te2_``) for the
  text encoders.

Underscores cannot be turned back into dots without knowing the model (``to_q`` or ``to.q``?), so
diffusers repairs kohya names with a list of string replacements (``_convert_non_diffusers_lora_to_diffusers``).
We go the other way: every linear or convolution layer of *our* model gets its diffusers path,
flattened with underscores, and both schemes are looked up in that table. A name that matches no
layer is an error that lists it.

What loading does: each adapted ``nn.Linear`` becomes a ``LoRALinear`` (lora.py) holding the
file's A, B and alpha and the caller's ``scale``, so ``merge_lora`` can bake it in and
``remove_lora`` takes it out again. Convolutions (kohya's ``proj_in``/``proj_out`` of SD 1.x,
LoCon's ResBlock convolutions) are merged into the weight at once: W += scale · (alpha / r) · B A.

Textual inversion files hold new token embeddings: diffusers' ``learned_embeds`` ``{token: (D,) or
(n, D)}``, A1111's ``.pt`` (``string_to_param['*']`` and a ``name``) or ``.safetensors``
(``emb_params``), and SDXL's ``{"clip_l": ..., "clip_g": ...}``, one for each text encoder. An
n-vector embedding becomes the tokens ``token, token_1, ..., token_{n-1}``, and the pipeline writes
each ``token`` in a prompt out as all n of them, as diffusers' ``maybe_convert_prompt`` does.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .checks import as_float
from .files import read_checkpoint, read_safetensors
from .lora import LoRALinear

LORA_FILE_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
EMBEDDING_FILE_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# the end of a key -> which tensor it is: A (down, r x in), B (up, out x r) or alpha; the longest match first
PARTS = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_down.weight": "A", ".lora_up.weight": "B",
         ".lora.down.weight": "A", ".lora.up.weight": "B", ".lora_linear_layer.down.weight": "A",
         ".lora_linear_layer.up.weight": "B", ".down.weight": "A", ".up.weight": "B", ".alpha": "alpha"}
# diffusers' old attention-processor LoRAs: ``attn1.processor.to_q_lora.down.weight`` adapts ``attn1.to_q``
OLD_PROCESSOR_NAMES = {"unet": {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"},
                       "text": {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj",
                                "to_out_lora": "out_proj"}}


# --- reading a LoRA file -------------------------------------------------------------------


def find_file(path: str | os.PathLike, names: tuple[str, ...], what: str) -> Path:
    """``path`` itself, or the first of ``names`` inside it when it is a folder (as diffusers saves them)."""
    path = Path(path)
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path} is a folder without {' or '.join(names)}; pass the {what} file itself.")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a {what} file (.safetensors) or the folder holding it.")
    return path


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a LoRA file and the adapter configs diffusers stores in its metadata, by component.

    diffusers writes ``{"unet.lora_alpha": 8, "unet.r": 4, "text_encoder.lora_alpha": ...}`` as JSON
    under the metadata key ``lora_adapter_metadata``; files without it give ``{}``.
    """
    path = find_file(path, LORA_FILE_NAMES, "LoRA")
    state_dict = read_checkpoint(path)
    configs: dict[str, dict] = {}
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as file:
            raw = (file.metadata() or {}).get("lora_adapter_metadata")
        for key, value in (json.loads(raw) if raw else {}).items():
            component, _, field = key.partition(".")
            configs.setdefault(component, {})[field] = value
    return state_dict, configs


def split_key(key: str) -> tuple[str, str, str]:
    """A LoRA key -> (component, the adapted layer's diffusers path with dots flattened to underscores, part).

    >>> split_key("lora_unet_mid_block_attentions_0_proj_in.lora_down.weight")
    ('unet', 'mid_block_attentions_0_proj_in', 'A')
    >>> split_key("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight")
    ('text_encoder', 'text_model_encoder_layers_0_self_attn_q_proj', 'B')
    """
    ending = next((end for end in PARTS if key.endswith(end)), None)
    if ending is None:
        raise KeyError(key)
    module = key[:-len(ending)]
    for prefix, component in KOHYA_PREFIXES.items():
        if module.startswith(prefix):
            return component, module[len(prefix):], PARTS[ending]
    component, _, module = module.partition(".")
    if component not in COMPONENTS:  # the oldest diffusers files adapt the U-Net and carry no prefix
        component, module = "unet", f"{component}.{module}"
    old_names = OLD_PROCESSOR_NAMES["unet" if component == "unet" else "text"]
    parent, _, last = module.replace(".processor.", ".").rpartition(".")
    module = f"{parent}.{old_names.get(last, last)}"
    return component, module.replace(".", "_"), PARTS[ending]


def diffusers_path(component: str, name: str) -> str:
    """Our layer's name -> its path in diffusers' U-Net or transformers' text encoder, flattened with underscores.

    The U-Net names differ in a few places (``pretrained.UNET_KEY_RENAMES``: our ``to_out`` is
    diffusers' ``to_out.0``); the text encoder's sit under ``text_model.encoder.``, which the
    lookup strips from the file's names instead.
    """
    from .pretrained import UNET_KEY_RENAMES, rename  # here: pretrained imports the pipelines, which import us

    if component == "unet":
        name = rename(f".{name}.", tuple((ours, theirs) for theirs, ours in UNET_KEY_RENAMES))[1:-1]
    return name.replace(".", "_")


def text_encoder_path(path: str) -> str:
    """A text encoder path without transformers' ``text_model_`` and ``encoder_`` wrappers, as our names lack them."""
    for prefix in ("text_model_", "encoder_"):
        path = path.removeprefix(prefix)
    return path


def layer_table(component: str, model: nn.Module) -> dict[str, tuple[nn.Module, str, nn.Module]]:
    """Flattened diffusers path -> (parent, attribute, layer) for every linear and convolution layer of ``model``."""
    table = {}
    for parent_name, parent in model.named_modules():
        for attribute, child in parent.named_children():
            if isinstance(child, (nn.Linear, nn.Conv2d)):
                name = f"{parent_name}.{attribute}" if parent_name else attribute
                table[diffusers_path(component, name)] = (parent, attribute, child)
    return table


def group_adapters(state_dict: dict[str, torch.Tensor], what: str) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """{(component, flattened path): {"A": ..., "B": ..., "alpha": ...}}, refusing keys that are no LoRA tensor."""
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state_dict.items():
        try:
            component, module, part = split_key(key)
        except KeyError:
            unknown.append(key)
            continue
        if component != "unet":
            module = text_encoder_path(module)
        groups.setdefault((component, module), {})[part] = tensor
    if unknown:
        raise ValueError(f"{what}: {len(unknown)} keys are no LoRA weight (neither diffusers' .lora_A/.lora_B nor "
                         f"kohya's .lora_down/.lora_up/.alpha): {', '.join(sorted(unknown)[:10])}. Is it a LoRA file?")
    return groups


def config_alpha(config: dict, module: str, rank: int) -> float:
    """PEFT's alpha for one layer: its ``alpha_pattern`` entry, else ``lora_alpha``, else (no config) r."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if module.endswith(pattern.replace(".", "_")):
            return float(alpha)
    return float(config.get("lora_alpha", rank))


def check_adapter(name: str, tensors: dict[str, torch.Tensor], layer: nn.Module, what: str) -> tuple[torch.Tensor, ...]:
    """A (r, in, ...) and B (out, r, ...) for ``layer``, refused when missing, rank 0, mis-shaped or not finite."""
    if "A" not in tensors or "B" not in tensors:
        have = ", ".join(sorted(tensors))
        raise ValueError(f"{what}: layer {name} has only {have}; a LoRA layer needs both its down (A) and up (B) "
                         "matrix. The file is incomplete.")
    A, B = tensors["A"], tensors["B"]
    for part, tensor in (("A", A), ("B", B), ("alpha", tensors.get("alpha"))):
        if tensor is not None and not torch.isfinite(tensor).all():
            raise ValueError(f"{what}: {part} of layer {name} holds NaN or inf values; the file is damaged or the "
                             "training diverged. Use another file.")
    rank = A.shape[0] if A.ndim else 0
    if rank == 0 or A.ndim < 2 or B.ndim != A.ndim or B.shape[1] != rank:
        raise ValueError(f"{what}: layer {name} has A {tuple(A.shape)} and B {tuple(B.shape)}; a rank-r LoRA needs "
                         "A (r, in) and B (out, r) with r >= 1.")
    expected_in, expected_out = layer.weight.shape[1], layer.weight.shape[0]
    if A.shape[1] != expected_in or B.shape[0] != expected_out:
        raise ValueError(f"{what}: layer {name} is {expected_out} x {expected_in} in this model, but the file's "
                         f"LoRA gives {B.shape[0]} x {A.shape[1]} (A {tuple(A.shape)}, B {tuple(B.shape)}): it was "
                         "made for another model (SD 1.x, 2.x and SDXL LoRAs do not mix). Use one for this model.")
    return A, B


def load_lora_into(models: dict[str, nn.Module], state_dict: dict[str, torch.Tensor], configs: dict,
                   scale: float = 1.0, what: str = "LoRA file") -> int:
    """Put the adapters of ``state_dict`` on ``models`` ({"unet": ..., "text_encoder": ...}); returns how many.

    Everything is checked before anything is changed, so a refused file leaves the models as they were.
    """
    scale = as_float(scale, "scale")
    groups = group_adapters(state_dict, what)
    tables = {component: layer_table(component, model) for component, model in models.items() if model is not None}
    unmatched = sorted(f"{component}: {module}" for component, module in groups
                       if module not in tables.get(component, {}))
    if unmatched:
        raise ValueError(
            f"{what}: {len(unmatched)} adapted layers match no layer of this pipeline: {', '.join(unmatched[:10])}"
            f"{' ...' if len(unmatched) > 10 else ''}. Is the LoRA for another model (SD 1.x, 2.x, SDXL)? SDXL files "
            "in kohya's original block names (input_blocks_4_1_...) are not read; convert them with diffusers first.")
    plan = []
    for (component, module), tensors in groups.items():
        parent, attribute, layer = tables[component][module]
        name = f"{component}.{module}"
        if isinstance(layer, LoRALinear):
            raise ValueError(f"{what}: {name} already has a LoRA adapter; bake the loaded one in first with "
                             f"ldm_teach.lora.merge_lora(pipe.{component}), or remove it with remove_lora.")
        A, B = check_adapter(name, tensors, layer, what)
        rank = A.shape[0]
        alpha = float(tensors["alpha"]) if "alpha" in tensors else config_alpha(configs.get(component, {}), module, rank)
        plan.append((parent, attribute, layer, A, B, alpha))
    for parent, attribute, layer, A, B, alpha in plan:
        factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
        rank = A.shape[0]
        if isinstance(layer, nn.Linear):
            adapter = LoRALinear(layer, rank, alpha, scale)
            with torch.no_grad():
                adapter.lora_A.weight.copy_(A.reshape(rank, -1).to(**factory))
                adapter.lora_B.weight.copy_(B.reshape(B.shape[0], rank).to(**factory))
            setattr(parent, attribute, adapter)
        else:  # a convolution: merged now; A may be a k x k convolution (LoCon), B is 1 x 1
            delta = B.flatten(1).double() @ A.flatten(1).double()  # (out, r) @ (r, in·k·k) -> (out, in·k·k)
            with torch.no_grad():
                layer.weight += (scale * alpha / rank * delta).reshape(layer.weight.shape).to(**factory)
    return len(plan)


# --- textual inversion ---------------------------------------------------------------------


def read_embedding_file(path: str | os.PathLike) -> dict[str, tuple[str | None, torch.Tensor]]:
    """A textual-inversion file -> {encoder: (its token or None, embedding (n, D))}.

    The encoder is ``"text_encoder"``, or ``"text_encoder"`` and ``"text_encoder_2"`` for SDXL's
    ``clip_l``/``clip_g`` files. The token is the file's own name for it (diffusers' key, A1111's
    ``name``); A1111's safetensors and SDXL's files carry none.
    """
    path = find_file(path, EMBEDDING_FILE_NAMES, "textual-inversion embedding")
    if path.suffix == ".safetensors":
        data = read_safetensors(path)
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - an untrusted pickle fails in many ways
            raise ValueError(f"{path} is not an embedding file torch.load(weights_only=True) can read "
                             f"({type(error).__name__}: {error}); save it as .safetensors or download it again.") from None
    if isinstance(data, dict) and "string_to_param" in data:  # A1111 .pt
        found = {"text_encoder": (data.get("name"), data["string_to_param"]["*"])}
    elif isinstance(data, dict) and "emb_params" in data:  # A1111 .safetensors
        found = {"text_encoder": (None, data["emb_params"])}
    elif isinstance(data, dict) and {"clip_l", "clip_g"} <= set(data):  # SDXL: one embedding per text encoder
        found = {"text_encoder": (None, data["clip_l"]), "text_encoder_2": (None, data["clip_g"])}
    elif isinstance(data, dict) and len(data) == 1:  # diffusers: {token: embedding}
        found = {"text_encoder": next(iter(data.items()))}
    elif isinstance(data, torch.Tensor):
        found = {"text_encoder": (None, data)}
    else:
        keys = list(data)[:5] if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} is no textual-inversion file: expected {{token: embedding}} (diffusers), "
                         f"string_to_param or emb_params (A1111), or clip_l/clip_g (SDXL); it holds {keys}.")
    for encoder, (token, embedding) in found.items():
        if not isinstance(embedding, torch.Tensor) or embedding.ndim not in (1, 2) or embedding.numel() == 0:
            raise ValueError(f"{path}: the embedding is {getattr(embedding, 'shape', type(embedding).__name__)}; "
                             "expected (D,) or (n, D) vectors.")
        if not torch.isfinite(embedding).all():
            raise ValueError(f"{path}: the embedding holds NaN or inf values; the file is damaged. Use another one.")
        found[encoder] = (token, embedding.detach().reshape(-1, embedding.shape[-1]))  # (n, D)
    return found


def add_embedding(tokenizer, text_encoder, token: str, embedding: torch.Tensor) -> list[int]:
    """Add ``token`` (and ``token_1`` ... for an n-vector embedding (n, D)) to the tokenizer and their rows
    to the text encoder, as diffusers' ``load_textual_inversion`` does; returns the new ids."""
    width = text_encoder.token_embedding.weight.shape[1]
    if embedding.shape[-1] != width:
        raise ValueError(f"the embedding for {token!r} is {embedding.shape[-1]} wide, but this text encoder's tokens "
                         f"are {width} wide: it was trained for another model (SD 1.x: 768, 2.x: 1024). Use one for "
                         "this model.")
    tokens = [token] + [f"{token}_{i}" for i in range(1, len(embedding))]
    taken = [t for t in tokens if t in tokenizer.encoder]
    if taken:
        raise ValueError(f"token {taken[0]!r} is already in the vocabulary; pass another one, "
                         f"e.g. load_textual_inversion(path, token='<{token.strip('<>')}-2>').")
    ids = tokenizer.add_tokens(tokens)
    text_encoder.resize_token_embeddings(tokenizer.vocab_size)
    with torch.no_grad():
        weight = text_encoder.token_embedding.weight
        weight[ids] = embedding.to(device=weight.device, dtype=weight.dtype)  # (n, D)
    return ids


def expand_multi_vector(prompt: str, tokenizer) -> str:
    """Write each multi-vector token of ``prompt`` out as all its tokens: "a <cat>" -> "a <cat> <cat>_1 <cat>_2".

    diffusers' ``maybe_convert_prompt``, step for step, so that the token ids match it.
    """
    for token in set(tokenizer.tokenize(prompt)):
        if token in tokenizer.added_tokens:
            replacement, i = token, 1
            while f"{token}_{i}" in tokenizer.added_tokens:
                replacement += f" {token}_{i}"
                i += 1
            prompt = prompt.replace(token, replacement)
    return prompt


# --- the pipeline methods ------------------------------------------------------------------


class AdapterLoading:
    """``load_lora_weights`` and ``load_textual_inversion`` for every pipeline, as diffusers' pipelines have them.

    A pipeline has ``unet``, ``text_encoder`` and ``tokenizer``; SDXL's add ``text_encoder_2`` and
    ``tokenizer_2`` (the refiner has only those). Prompts pass ``expand_prompts`` before the tokenizer.
    """

    def encoders(self) -> dict[str, tuple]:
        """{name: (tokenizer, text encoder)} for the text encoders this pipeline has."""
        pairs = {"text_encoder": (getattr(self, "tokenizer", None), getattr(self, "text_encoder", None)),
                 "text_encoder_2": (getattr(self, "tokenizer_2", None), getattr(self, "text_encoder_2", None))}
        return {name: pair for name, pair in pairs.items() if pair[1] is not None}

    def load_lora_weights(self, path: str | os.PathLike, scale: float = 1.0) -> int:
        """Adapters from a LoRA file (diffusers/PEFT or kohya naming) on the U-Net and text encoders.

        ``scale`` multiplies every ΔW (diffusers' ``cross_attention_kwargs={"scale": s}``); the
        linear layers become ``LoRALinear`` (change ``.scale``, or ``lora.merge_lora(pipe.unet)``),
        convolutions are merged at once. Returns the number of adapted layers.
        """
        state_dict, configs = read_lora_file(path)
        models = {"unet": self.unet, **{name: encoder for name, (_, encoder) in self.encoders().items()}}
        return load_lora_into(models, state_dict, configs, scale, what=str(path))

    def load_textual_inversion(self, path: str | os.PathLike, token: str | None = None) -> list[str]:
        """New tokens from a textual-inversion file (diffusers, A1111 or SDXL's clip_l/clip_g); returns them.

        ``token`` names the concept in prompts; without it the file's own name is used (A1111's
        safetensors and SDXL files have none, so pass one).
        """
        found = read_embedding_file(path)
        encoders = self.encoders()
        if "text_encoder" in found and "text_encoder" not in encoders and "text_encoder_2" in found:
            del found["text_encoder"]  # an SDXL file on the refiner, which has only the second (bigG) encoder
        missing = sorted(set(found) - set(encoders))
        if missing:
            raise ValueError(f"{path} holds embeddings for {', '.join(sorted(found))}, but this pipeline has "
                             f"{', '.join(encoders)}: it was made for another model.")
        added = []
        for name, (own_token, embedding) in found.items():
            chosen = token if token is not None else own_token
            if not isinstance(chosen, str) or not chosen:
                raise ValueError(f"{path} does not name its token; pass one: load_textual_inversion(path, token='<concept>').")
            tokenizer, encoder = encoders[name]
            add_embedding(tokenizer, encoder, chosen, embedding)
            added = [chosen] + [f"{chosen}_{i}" for i in range(1, len(embedding))]
        return added

    def expand_prompts(self, prompts: list[str], tokenizer) -> list[str]:
        """The prompts with every multi-vector token written out (``expand_multi_vector``)."""
        if not getattr(tokenizer, "added_tokens", None):
            return prompts
        return [expand_multi_vector(prompt, tokenizer) for prompt in prompts]


__all__ = ["AdapterLoading", "add_embedding", "expand_multi_vector", "load_lora_into", "read_embedding_file",
           "read_lora_file", "split_key"]
