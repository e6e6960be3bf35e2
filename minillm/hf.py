"""Hugging Face interop: read and write transformers checkpoints without transformers installed.

A Hugging Face GPT-2 checkpoint is a folder with two files that matter, as
``GPT2LMHeadModel.save_pretrained`` writes it:

- ``config.json``: the sizes (``vocab_size``, ``n_positions``, ``n_embd``, ``n_layer``, ``n_head``,
  ``n_inner``, ``layer_norm_epsilon``, ``activation_function``, ``tie_word_embeddings``, ...);
- ``model.safetensors``: the tensors, by name (or ``model.safetensors.index.json`` and shards of
  it, for big models). Nothing here reads ``pytorch_model.bin``: it is a pickle, and unpickling a
  downloaded file can run any code the file asks for.

:func:`load_gpt2` turns such a folder into a :class:`~minillm.gpt.GPT`, and :func:`save_gpt2`
writes a ``GPT`` as a folder that ``transformers.GPT2LMHeadModel.from_pretrained`` loads with
the same logits. Only torch, safetensors and the standard library are used: transformers is
needed only by the tests, which check both directions against it.

The name mapping (C = n_embd, V = vocab_size, P = n_positions = block_size)::

    Hugging Face GPT-2                      shape      minillm GPT                                  shape
    transformer.wte.weight                  (V, C)     wte.weight                                   (V, C)
    transformer.wpe.weight                  (P, C)     wpe.weight                                   (P, C)
    transformer.h.{i}.ln_1.{weight,bias}    (C,)       blocks.{i}.norm1.{weight,bias}               (C,)
    transformer.h.{i}.attn.c_attn.weight    (C, 3C)    blocks.{i}.self_attn.{q,k,v}_proj.weight     (C, C) each
    transformer.h.{i}.attn.c_attn.bias      (3C,)      blocks.{i}.self_attn.{q,k,v}_proj.bias       (C,) each
    transformer.h.{i}.attn.c_proj.weight    (C, C)     blocks.{i}.self_attn.out_proj.weight         (C, C)
    transformer.h.{i}.attn.c_proj.bias      (C,)       blocks.{i}.self_attn.out_proj.bias           (C,)
    transformer.h.{i}.ln_2.{weight,bias}    (C,)       blocks.{i}.norm3.{weight,bias}               (C,)
    transformer.h.{i}.mlp.c_fc.weight       (C, 4C)    blocks.{i}.feed_forward.linear1.weight       (4C, C)
    transformer.h.{i}.mlp.c_fc.bias         (4C,)      blocks.{i}.feed_forward.linear1.bias         (4C,)
    transformer.h.{i}.mlp.c_proj.weight     (4C, C)    blocks.{i}.feed_forward.linear2.weight       (C, 4C)
    transformer.h.{i}.mlp.c_proj.bias       (C,)       blocks.{i}.feed_forward.linear2.bias         (C,)
    transformer.ln_f.{weight,bias}          (C,)       ln_f.{weight,bias}                           (C,)
    lm_head.weight (only when untied)       (V, C)     lm_head.weight                               (V, C)

**The Conv1D transpose.** GPT-2's projections are not ``nn.Linear`` but transformers' ``Conv1D``
(a name from OpenAI's TensorFlow code), which computes ``y = x @ W + b`` with ``W`` stored as
(in_features, out_features). ``nn.Linear`` computes ``y = x @ W.T + b`` with ``W`` stored as
(out_features, in_features). So every Conv1D weight is the *transpose* of the ``nn.Linear``
weight that computes the same function: ``c_fc.weight`` (C, 4C) is ``linear1.weight.T``. The
embeddings, the LayerNorms and ``lm_head`` (an ``nn.Linear`` in transformers too) need no transpose.

**The fused attention projection.** ``c_attn`` computes queries, keys and values in one matrix
product: its (C, 3C) weight holds the query columns, then the key columns, then the value columns.
Transposed to (3C, C) and cut into three (C, C) blocks of rows, it gives ``q_proj``, ``k_proj``
and ``v_proj``. Within each block, head h owns features h·head_dim .. (h+1)·head_dim - 1, in
transformers and in :class:`~minillm.attention.MultiHeadAttention` alike, so the heads line up.

**Prefixes and leftovers.** ``GPT2LMHeadModel`` saves its tensors under ``transformer.``;
``GPT2Model`` (and OpenAI's original upload on the Hub) saves them without: both are read.
Old checkpoints also hold the causal-mask buffers ``h.{i}.attn.bias`` and ``h.{i}.attn.masked_bias``,
which are not weights and are skipped. With tied embeddings (GPT-2's default) ``lm_head.weight``
is the token embedding and is neither needed nor written; transformers ignores a stored copy
when the config says the weights are tied, and so does :func:`load_gpt2`.
"""

from __future__ import annotations

import json
import os
import pathlib
import re

import safetensors
import safetensors.torch
import torch

from minillm import MinillmError
from minillm.checkpoint import atomic_write_bytes, atomic_write_text
from minillm.gpt import GPT, GPTConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_WEIGHTS_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

# What transformers.GPT2Config assumes for a key config.json leaves out (OpenAI's own upload
# has no n_inner or tie_word_embeddings, for instance): a missing key means the same here.
GPT2_CONFIG_DEFAULTS = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "tie_word_embeddings": True,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
}
# transformers' activation names -> minillm's GPTConfig.activation. "gelu_new" (GPT-2's) and
# "gelu_pytorch_tanh" are both GELU's tanh approximation; "gelu" is the exact form.
ACTIVATIONS_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
ACTIVATIONS_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
GPT2_VOCAB_SIZE, GPT2_END_OF_TEXT = 50257, 50256  # OpenAI's tokenizer and its <|endoftext|> id

# The causal-mask buffers older transformers versions saved with the weights; not parameters.
LEGACY_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def load_gpt2(directory: str | os.PathLike, dropout: float = 0.0) -> GPT:
    """A :class:`~minillm.gpt.GPT` with the weights of a Hugging Face GPT-2 folder.

    ``directory`` holds ``config.json`` and ``model.safetensors`` (or a sharded
    ``model.safetensors.index.json``), e.g. what ``GPT2LMHeadModel.save_pretrained`` writes or
    a download of ``openai-community/gpt2``. ``dropout`` is the new model's dropout (the
    checkpoint's ``*_pdrop`` values are a training choice, not part of the weights). The
    parameters are float32 whatever the file stores (half-precision tensors are upcast). The model
    comes back in training mode, like any new ``nn.Module``; call ``.eval()`` before inference
    when ``dropout`` > 0. Every problem with the folder (missing files, an architecture GPT-2
    variant minillm does not build, a missing, extra or mis-shaped tensor) is a :class:`MinillmError`.
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise MinillmError(f"{directory} is not a directory: a Hugging Face GPT-2 checkpoint is a folder "
                           f"with {CONFIG_NAME} and {WEIGHTS_NAME}")
    config = gpt2_config_from_hf(read_hf_config(directory), dropout=dropout, source=directory / CONFIG_NAME)
    tensors = read_safetensors_weights(directory)
    state = gpt2_state_from_hf(tensors, config, source=directory)
    model = GPT(config)
    model.load_state_dict(state)  # strict: every parameter is set (the shapes were checked above)
    return model


def read_hf_config(directory: pathlib.Path) -> dict:
    """The parsed ``config.json`` of a checkpoint folder."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise MinillmError(f"{directory} has no {CONFIG_NAME}: it is not a Hugging Face checkpoint folder")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MinillmError(f"cannot read {path}: {error}") from error
    if not isinstance(values, dict):
        raise MinillmError(f"{path} must hold a JSON object, got {type(values).__name__}")
    return values


def gpt2_config_from_hf(hf_config: dict, dropout: float = 0.0, source: object = CONFIG_NAME) -> GPTConfig:
    """The :class:`~minillm.gpt.GPTConfig` of a GPT-2 ``config.json``; refuses what minillm's GPT cannot build.

    Missing keys take ``transformers.GPT2Config``'s defaults. minillm's GPT has a 4·n_embd MLP,
    the tanh-approximated GELU and 1/sqrt(head_dim) attention scaling, so configs that ask for
    anything else are refused rather than loaded into a model that would compute something different.
    """
    values = {**GPT2_CONFIG_DEFAULTS, **hf_config}
    model_type = hf_config.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise MinillmError(f"{source} describes a {model_type!r} model; load_gpt2 reads only GPT-2 (model_type 'gpt2')")
    activation = values["activation_function"]
    if activation not in ACTIVATIONS_FROM_HF:
        raise MinillmError(f"{source} asks for activation_function {activation!r}, but minillm's GPT has GELU only "
                           f"({', '.join(map(repr, ACTIVATIONS_FROM_HF))})")
    n_embd = values["n_embd"]
    if values["n_inner"] is not None and values["n_inner"] != 4 * n_embd:
        raise MinillmError(f"{source} asks for an MLP width n_inner={values['n_inner']}, but minillm's GPT always "
                           f"uses 4 * n_embd = {4 * n_embd}")
    if not values["scale_attn_weights"] or values["scale_attn_by_inverse_layer_idx"]:
        raise MinillmError(f"{source} changes the attention scaling (scale_attn_weights / "
                           "scale_attn_by_inverse_layer_idx), which minillm's GPT does not support")
    if values["add_cross_attention"]:
        raise MinillmError(f"{source} adds cross-attention, which a decoder-only GPT does not have")
    try:
        return GPTConfig(vocab_size=values["vocab_size"], block_size=values["n_positions"], n_layer=values["n_layer"],
                         n_head=values["n_head"], n_embd=n_embd, dropout=dropout, bias=True, positions="learned",
                         tie_weights=bool(values["tie_word_embeddings"]),
                         layer_norm_eps=float(values["layer_norm_epsilon"]), activation=ACTIVATIONS_FROM_HF[activation])
    except (TypeError, ValueError) as error:
        raise MinillmError(f"{source} does not describe a valid GPT: {error}") from error


def read_safetensors_weights(directory: pathlib.Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, from ``model.safetensors`` or the shards its index lists."""
    single, index = directory / WEIGHTS_NAME, directory / WEIGHTS_INDEX_NAME
    if single.is_file():
        return _load_safetensors_file(single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]  # tensor name -> shard file
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise MinillmError(f"cannot read the shard index {index}: {error}") from error
        if not isinstance(weight_map, dict):
            raise MinillmError(f"the shard index {index} has no weight_map object (tensor name -> file)")
        tensors: dict[str, torch.Tensor] = {}
        for shard_name in sorted(set(weight_map.values())):
            for name, tensor in _load_safetensors_file(directory / shard_name).items():
                if name in tensors:
                    raise MinillmError(f"tensor {name!r} appears in more than one shard of {directory}")
                tensors[name] = tensor
        return tensors
    pickles = [name for name in PICKLE_WEIGHTS_NAMES if (directory / name).is_file()]
    if pickles:
        raise MinillmError(f"{directory} has only {pickles[0]}, a pickle file, and minillm reads only safetensors "
                           "because unpickling a downloaded file can run arbitrary code; convert it once with "
                           "transformers: GPT2LMHeadModel.from_pretrained(folder).save_pretrained(new_folder) "
                           "writes model.safetensors")
    raise MinillmError(f"{directory} has no {WEIGHTS_NAME} (nor a sharded {WEIGHTS_INDEX_NAME})")


def _load_safetensors_file(path: pathlib.Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise MinillmError(f"{path} is missing")
    try:
        return safetensors.torch.load_file(path)  # tensors and a JSON header only: nothing is unpickled
    except (OSError, safetensors.SafetensorError) as error:
        raise MinillmError(f"cannot read {path} as safetensors: {error}") from error


def gpt2_hf_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a GPT-2 checkpoint of these sizes holds, by its name without the ``transformer.``
    prefix, with its shape in the checkpoint's (Conv1D) layout."""
    c, vocab, positions = config.n_embd, config.vocab_size, config.block_size
    shapes = {"wte.weight": (vocab, c), "wpe.weight": (positions, c)}
    for i in range(config.n_layer):
        layer = f"h.{i}."
        shapes.update({
            layer + "ln_1.weight": (c,), layer + "ln_1.bias": (c,),
            layer + "attn.c_attn.weight": (c, 3 * c), layer + "attn.c_attn.bias": (3 * c,),
            layer + "attn.c_proj.weight": (c, c), layer + "attn.c_proj.bias": (c,),
            layer + "ln_2.weight": (c,), layer + "ln_2.bias": (c,),
            layer + "mlp.c_fc.weight": (c, 4 * c), layer + "mlp.c_fc.bias": (4 * c,),
            layer + "mlp.c_proj.weight": (4 * c, c), layer + "mlp.c_proj.bias": (c,),
        })
    shapes.update({"ln_f.weight": (c,), "ln_f.bias": (c,)})
    if not config.tie_weights:
        shapes["lm_head.weight"] = (vocab, c)
    return shapes


def gpt2_state_from_hf(tensors: dict[str, torch.Tensor], config: GPTConfig, source: object = WEIGHTS_NAME
                       ) -> dict[str, torch.Tensor]:
    """A GPT-2 checkpoint's tensors (HF names) -> a ``GPT.state_dict()`` (minillm names); see the module docstring.

    Checks first that the names and shapes are exactly those :func:`gpt2_hf_shapes` expects
    (after dropping the ``transformer.`` prefix and the legacy mask buffers), and raises one
    :class:`MinillmError` naming the offending tensor otherwise.
    """
    by_name: dict[str, torch.Tensor] = {}
    stored_as: dict[str, str] = {}  # name without prefix -> the key in the file, for error messages
    for key, tensor in tensors.items():
        name = key.removeprefix("transformer.")
        if name in by_name:
            raise MinillmError(f"{source} holds both {stored_as[name]!r} and {key!r}, the same tensor twice")
        by_name[name], stored_as[name] = tensor, key

    expected = gpt2_hf_shapes(config)
    missing = [name for name in expected if name not in by_name]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MinillmError(f"{source} has no tensor {missing[0]!r}{more}, which a GPT-2 with n_layer={config.n_layer} "
                           f"and tie_word_embeddings={config.tie_weights} needs")
    ignorable = {"lm_head.weight"} if config.tie_weights else set()  # tied: transformers ignores a stored copy
    extra = [stored_as[name] for name in by_name
             if name not in expected and name not in ignorable and not LEGACY_BUFFER.fullmatch(name)]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise MinillmError(f"{source} holds a tensor {extra[0]!r}{more} that a GPT-2 with n_layer={config.n_layer} "
                           "does not have: does config.json match the weights?")
    for name, shape in expected.items():
        if tuple(by_name[name].shape) != shape:
            raise MinillmError(f"tensor {stored_as[name]!r} in {source} has shape {tuple(by_name[name].shape)}, "
                               f"expected {shape} from config.json (GPT-2 stores projections as Conv1D weights, "
                               "(in_features, out_features))")

    c = config.n_embd
    state = {"wte.weight": by_name["wte.weight"], "wpe.weight": by_name["wpe.weight"]}
    for i in range(config.n_layer):
        hf, ours = f"h.{i}.", f"blocks.{i}."
        for hf_norm, our_norm in (("ln_1", "norm1"), ("ln_2", "norm3")):
            for kind in ("weight", "bias"):
                state[f"{ours}{our_norm}.{kind}"] = by_name[f"{hf}{hf_norm}.{kind}"]
        qkv_weight = by_name[hf + "attn.c_attn.weight"].t()  # (C, 3C) Conv1D -> (3C, C) nn.Linear: rows q | k | v
        qkv_bias = by_name[hf + "attn.c_attn.bias"]  # (3C,)
        for projection, weight, bias in zip(("q_proj", "k_proj", "v_proj"), qkv_weight.split(c, dim=0),
                                            qkv_bias.split(c)):
            state[f"{ours}self_attn.{projection}.weight"] = weight  # (C, C)
            state[f"{ours}self_attn.{projection}.bias"] = bias  # (C,)
        state[ours + "self_attn.out_proj.weight"] = by_name[hf + "attn.c_proj.weight"].t()  # (C, C)
        state[ours + "self_attn.out_proj.bias"] = by_name[hf + "attn.c_proj.bias"]
        state[ours + "feed_forward.linear1.weight"] = by_name[hf + "mlp.c_fc.weight"].t()  # (C, 4C) -> (4C, C)
        state[ours + "feed_forward.linear1.bias"] = by_name[hf + "mlp.c_fc.bias"]
        state[ours + "feed_forward.linear2.weight"] = by_name[hf + "mlp.c_proj.weight"].t()  # (4C, C) -> (C, 4C)
        state[ours + "feed_forward.linear2.bias"] = by_name[hf + "mlp.c_proj.bias"]
    state["ln_f.weight"], state["ln_f.bias"] = by_name["ln_f.weight"], by_name["ln_f.bias"]
    # Tied, lm_head.weight is wte.weight (the state dict lists the shared matrix under both names).
    state["lm_head.weight"] = by_name["wte.weight"] if config.tie_weights else by_name["lm_head.weight"]
    return state


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def save_gpt2(model: GPT, directory: str | os.PathLike) -> pathlib.Path:
    """Write ``model`` as a Hugging Face GPT-2 folder; returns the folder.

    ``config.json`` and ``model.safetensors`` come out as ``GPT2LMHeadModel.save_pretrained``
    writes them (``transformer.``-prefixed names, Conv1D layout, no ``lm_head.weight`` when the
    embeddings are tied), so ``transformers.GPT2LMHeadModel.from_pretrained(directory)`` gives the
    same logits, and :func:`load_gpt2` gives back the same model. A model without biases
    (``bias=False``) is written with zero biases, which computes exactly the same function.
    A model GPT-2 cannot express (rotary positions) is refused before anything is written.
    Each file is written atomically (a temporary name, then a rename), the weights first.
    """
    tensors = gpt2_state_to_hf(model)  # raises before the folder is touched
    hf_config = gpt2_config_to_hf(model.config, dtype=model.wte.weight.dtype)
    directory = pathlib.Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise MinillmError(f"cannot create the folder {directory}: {error}") from error
    atomic_write_bytes(directory / WEIGHTS_NAME, safetensors.torch.save(tensors, metadata={"format": "pt"}))
    atomic_write_text(directory / CONFIG_NAME, json.dumps(hf_config, indent=2) + "\n")
    return directory


def gpt2_config_to_hf(config: GPTConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The ``config.json`` of a GPT-2 with these sizes (the keys ``transformers.GPT2Config`` reads).

    GPT-2's special token <|endoftext|> (id 50256) is both ``bos_token_id`` and ``eos_token_id``
    when the vocabulary is OpenAI's (50257 ids); for any other vocabulary minillm does not know
    which id, if any, ends a text, so both are null.
    """
    end_of_text = GPT2_END_OF_TEXT if config.vocab_size == GPT2_VOCAB_SIZE else None
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": ACTIVATIONS_TO_HF[config.activation],
        "layer_norm_epsilon": config.layer_norm_eps,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": config.tie_weights,
        "bos_token_id": end_of_text,
        "eos_token_id": end_of_text,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }


def gpt2_state_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """A ``GPT``'s parameters under GPT-2's names and layout (the inverse of :func:`gpt2_state_from_hf`).

    Every tensor is a fresh, contiguous CPU copy: safetensors refuses tensors that share memory
    (as tied weights would) and writes only row-major ones (as a transpose is not). Missing biases
    (``bias=False``) are written as zeros.
    """
    if not isinstance(model, GPT):
        raise MinillmError(f"save_gpt2 writes a minillm GPT, got {type(model).__name__}")
    config = model.config
    if config.positions != "learned" or model.wpe is None:
        raise MinillmError(f"GPT-2 has learned position embeddings only: a model with positions={config.positions!r} "
                           "cannot be written as a GPT-2 checkpoint")
    if config.tie_weights and model.lm_head.weight is not model.wte.weight:
        raise MinillmError("the model's config says tie_weights=True but lm_head.weight is not wte.weight: "
                           "set config.tie_weights=False to write both matrices")

    def owned(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().cpu().clone(memory_format=torch.contiguous_format)

    def bias_of(layer: torch.nn.Module, size: int) -> torch.Tensor:
        if layer.bias is not None:
            return owned(layer.bias)
        return torch.zeros(size, dtype=layer.weight.dtype)  # no bias is a zero bias

    c = config.n_embd
    tensors = {"transformer.wte.weight": owned(model.wte.weight), "transformer.wpe.weight": owned(model.wpe.weight)}
    for i, block in enumerate(model.blocks):
        layer = f"transformer.h.{i}."
        attention, feed_forward = block.self_attn, block.feed_forward
        for hf_norm, norm in (("ln_1", block.norm1), ("ln_2", block.norm3)):
            tensors[f"{layer}{hf_norm}.weight"] = owned(norm.weight)
            tensors[f"{layer}{hf_norm}.bias"] = bias_of(norm, c)
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        qkv_weight = torch.cat([projection.weight for projection in projections], dim=0)  # (3C, C), rows q | k | v
        tensors[layer + "attn.c_attn.weight"] = owned(qkv_weight.t())  # (C, 3C), Conv1D layout
        tensors[layer + "attn.c_attn.bias"] = torch.cat([bias_of(projection, c) for projection in projections])  # (3C,)
        tensors[layer + "attn.c_proj.weight"] = owned(attention.out_proj.weight.t())  # (C, C)
        tensors[layer + "attn.c_proj.bias"] = bias_of(attention.out_proj, c)
        tensors[layer + "mlp.c_fc.weight"] = owned(feed_forward.linear1.weight.t())  # (4C, C) -> (C, 4C)
        tensors[layer + "mlp.c_fc.bias"] = bias_of(feed_forward.linear1, 4 * c)
        tensors[layer + "mlp.c_proj.weight"] = owned(feed_forward.linear2.weight.t())  # (C, 4C) -> (4C, C)
        tensors[layer + "mlp.c_proj.bias"] = bias_of(feed_forward.linear2, c)
    tensors["transformer.ln_f.weight"] = owned(model.ln_f.weight)
    tensors["transformer.ln_f.bias"] = bias_of(model.ln_f, c)
    if not config.tie_weights:
        tensors["lm_head.weight"] = owned(model.lm_head.weight)
    return tensors
