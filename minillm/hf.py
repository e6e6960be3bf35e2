"""Hugging Face interop: read and write transformers checkpoints without transformers installed.

Two models are covered: GPT-2 (``GPT2LMHeadModel`` <-> :class:`~minillm.gpt.GPT`) and BERT with
its pretraining heads (``BertForPreTraining`` <-> :class:`~minillm.bert.BertForPreTraining`).
A Hugging Face checkpoint is a folder with two files that matter, as ``save_pretrained`` writes it:

- ``config.json``: the sizes and choices of the model (``model_type`` says which model it is);
- ``model.safetensors``: the tensors, by name (or ``model.safetensors.index.json`` and shards of
  it, for big models). Nothing here reads ``pytorch_model.bin``: it is a pickle, and unpickling a
  downloaded file can run any code the file asks for.

:func:`read_gpt2_folder` / :func:`read_bert_folder` turn such a folder into a minillm config and
state dict, and :func:`write_gpt2_folder` / :func:`write_bert_folder` write a minillm state dict as a
folder that transformers' ``from_pretrained`` loads with the same logits. This module converts names,
layouts and configs only and imports no model, so the models can import it: ``GPT.from_hf`` /
``GPT.save_hf`` (:func:`minillm.gpt.load_gpt2`, :func:`minillm.gpt.save_gpt2`) and BERT's
(:func:`minillm.bert.load_bert`, :func:`minillm.bert.save_bert`) build on it. Only torch, safetensors
and the standard library are used: transformers is needed only by the tests, which check both
directions against it.
Both readers are strict: a config minillm cannot build, or a missing, extra or mis-shaped tensor,
is a :class:`~minillm.MinillmError` that names the key or the tensor, never a model that quietly
computes something else.

GPT-2
-----

``config.json`` keys read: ``vocab_size``, ``n_positions``, ``n_embd``, ``n_layer``, ``n_head``,
``n_inner``, ``layer_norm_epsilon``, ``activation_function``, ``tie_word_embeddings``, ...
The name mapping (C = n_embd, V = vocab_size, P = n_positions = block_size)::

    Hugging Face GPT-2                      shape      minillm GPT                              shape
    transformer.wte.weight                  (V, C)     wte.weight                               (V, C)
    transformer.wpe.weight                  (P, C)     wpe.weight                               (P, C)
    transformer.h.{i}.ln_1.{weight,bias}    (C,)       blocks.{i}.ln_1.{weight,bias}            (C,)
    transformer.h.{i}.attn.c_attn.weight    (C, 3C)    blocks.{i}.attn.c_attn.weight            (3C, C)
    transformer.h.{i}.attn.c_attn.bias      (3C,)      blocks.{i}.attn.c_attn.bias              (3C,)
    transformer.h.{i}.attn.c_proj.weight    (C, C)     blocks.{i}.attn.c_proj.weight            (C, C)
    transformer.h.{i}.attn.c_proj.bias      (C,)       blocks.{i}.attn.c_proj.bias              (C,)
    transformer.h.{i}.ln_2.{weight,bias}    (C,)       blocks.{i}.ln_2.{weight,bias}            (C,)
    transformer.h.{i}.mlp.c_fc.weight       (C, 4C)    blocks.{i}.mlp.c_fc.weight               (4C, C)
    transformer.h.{i}.mlp.c_fc.bias         (4C,)      blocks.{i}.mlp.c_fc.bias                 (4C,)
    transformer.h.{i}.mlp.c_proj.weight     (4C, C)    blocks.{i}.mlp.c_proj.weight             (C, 4C)
    transformer.h.{i}.mlp.c_proj.bias       (C,)       blocks.{i}.mlp.c_proj.bias               (C,)
    transformer.ln_f.{weight,bias}          (C,)       ln_f.{weight,bias}                       (C,)
    lm_head.weight (only when untied)       (V, C)     lm_head.weight                           (V, C)

**The Conv1D transpose.** GPT-2's projections are not ``nn.Linear`` but transformers' ``Conv1D``
(a name from OpenAI's TensorFlow code), which computes ``y = x @ W + b`` with ``W`` stored as
(in_features, out_features). ``nn.Linear`` computes ``y = x @ W.T + b`` with ``W`` stored as
(out_features, in_features). So every Conv1D weight is the *transpose* of the ``nn.Linear``
weight that computes the same function: GPT-2's ``c_fc.weight`` (C, 4C) is minillm's ``c_fc.weight.T``. The
embeddings, the LayerNorms and ``lm_head`` (an ``nn.Linear`` in transformers too) need no transpose.

**The fused attention projection.** ``c_attn`` computes queries, keys and values in one matrix
product: its (C, 3C) weight holds the query columns, then the key columns, then the value columns,
and minillm's (3C, C) ``nn.Linear`` weight the same as rows. Within each block, head h owns features
h·head_dim .. (h+1)·head_dim - 1, in transformers and in :class:`~minillm.gpt.CausalSelfAttention`
alike, so the heads line up.

**Prefixes and leftovers.** ``GPT2LMHeadModel`` saves its tensors under ``transformer.``;
``GPT2Model`` (and OpenAI's original upload on the Hub) saves them without: both are read.
Old checkpoints also hold the causal-mask buffers ``h.{i}.attn.bias`` and ``h.{i}.attn.masked_bias``,
which are not weights and are skipped. With tied embeddings (GPT-2's default) ``lm_head.weight``
is the token embedding and is neither needed nor written. A stored copy is accepted when it equals
``wte.weight`` and refused otherwise: transformers 4 ignored such a copy, but transformers 5 loads
it as a separate output matrix, so a differing copy means different logits in different versions,
and a tied GPT can hold only one matrix.

BERT
----

``config.json`` keys read (``transformers.BertConfig``'s; a missing key takes its default):
``vocab_size``, ``hidden_size`` (-> ``n_embd``), ``num_hidden_layers`` (-> ``n_layer``),
``num_attention_heads`` (-> ``n_head``), ``intermediate_size`` (-> ``d_ff``; 4·hidden_size is
written as minillm's ``d_ff=0``, "four times n_embd"), ``hidden_act`` (``"gelu"`` -> ``"gelu"``,
the exact GELU; ``"gelu_new"`` and ``"gelu_pytorch_tanh"`` -> ``"gelu_tanh"``; ``"relu"`` ->
``"relu"``), ``max_position_embeddings`` (-> ``max_len``), ``type_vocab_size``, ``layer_norm_eps``,
``pad_token_id`` (-> ``pad_id``). Refused, because minillm's BERT would compute something else:
any other ``hidden_act``, a ``position_embedding_type`` other than ``"absolute"`` (relative
positions), ``is_decoder`` or ``add_cross_attention`` (a causal or cross-attending BERT),
``tie_word_embeddings: false`` (minillm's masked-LM decoder *is* the word embedding matrix) and a
null ``pad_token_id``. The two dropout rates ``hidden_dropout_prob`` and
``attention_probs_dropout_prob`` are a training choice: :func:`read_bert_folder` uses its ``dropout``
argument, and :func:`write_bert_folder` writes the model's one ``dropout`` as both.

The name mapping (H = hidden_size = n_embd, I = intermediate_size, V = vocab_size,
P = max_position_embeddings = max_len, S = type_vocab_size). Every matrix is an ``nn.Linear`` or
an ``nn.Embedding`` on both sides, so tensors move unchanged, only renamed: no transpose, no split::

    Hugging Face BertForPreTraining                              minillm BertForPreTraining                 shape
    bert.embeddings.word_embeddings.weight                       bert.embeddings.word_embeddings.weight     (V, H)
    bert.embeddings.position_embeddings.weight                   bert.embeddings.position_embeddings.weight (P, H)
    bert.embeddings.token_type_embeddings.weight                 bert.embeddings.token_type_embeddings.weight (S, H)
    bert.embeddings.LayerNorm.{weight,bias}                      bert.embeddings.norm.{weight,bias}         (H,)
    bert.encoder.layer.{i}.attention.self.query.{weight,bias}    bert.layers.{i}.self_attn.q_proj.*         (H, H), (H,)
    bert.encoder.layer.{i}.attention.self.key.{weight,bias}      bert.layers.{i}.self_attn.k_proj.*         (H, H), (H,)
    bert.encoder.layer.{i}.attention.self.value.{weight,bias}    bert.layers.{i}.self_attn.v_proj.*         (H, H), (H,)
    bert.encoder.layer.{i}.attention.output.dense.{weight,bias}  bert.layers.{i}.self_attn.out_proj.*       (H, H), (H,)
    bert.encoder.layer.{i}.attention.output.LayerNorm.*          bert.layers.{i}.norm1.*  (after attention) (H,)
    bert.encoder.layer.{i}.intermediate.dense.{weight,bias}      bert.layers.{i}.feed_forward.linear1.*     (I, H), (I,)
    bert.encoder.layer.{i}.output.dense.{weight,bias}            bert.layers.{i}.feed_forward.linear2.*     (H, I), (H,)
    bert.encoder.layer.{i}.output.LayerNorm.*                    bert.layers.{i}.norm2.*  (after the FFN)   (H,)
    bert.pooler.dense.{weight,bias}                              bert.pooler.{weight,bias}                  (H, H), (H,)
    cls.predictions.transform.dense.{weight,bias}                mlm_dense.{weight,bias}                    (H, H), (H,)
    cls.predictions.transform.LayerNorm.{weight,bias}            mlm_norm.{weight,bias}                     (H,)
    cls.predictions.bias                                         mlm_bias                                   (V,)
    cls.predictions.decoder.weight (tied: not written)           = bert.embeddings.word_embeddings.weight   (V, H)
    cls.predictions.decoder.bias   (tied: not written)           = mlm_bias                                 (V,)
    cls.seq_relationship.{weight,bias}                           nsp_head.{weight,bias}                     (2, H), (2,)

**Tied tensors and leftovers.** ``save_pretrained`` leaves out the two tied tensors
``cls.predictions.decoder.weight`` (the word embeddings) and ``cls.predictions.decoder.bias``
(``cls.predictions.bias``), and so does :func:`write_bert_folder`. When a folder stores them anyway they
must equal what they are tied to: transformers 5 then loads them as separate parameters, and a
copy that differs would make its model compute other logits than minillm's tied one, so such a
folder is refused; a folder with only ``cls.predictions.decoder.bias`` has it read as
``mlm_bias``. Checkpoints converted from Google's TensorFlow releases name LayerNorm parameters
``gamma`` and ``beta`` (read as ``weight`` and ``bias``, as transformers does), and older
transformers versions saved the buffer ``bert.embeddings.position_ids`` (0, 1, 2, ..., not a
weight: skipped).

**Encoder-only folders are refused.** ``BertModel`` (names without ``bert.``) and fine-tuned
models (``BertForSequenceClassification``, ...) have no ``cls.`` pretraining heads; :func:`read_bert_folder`
returns a ``BertForPreTraining`` and will not invent a masked-LM and a next-sentence head for
them, so it refuses such a folder with a message that says so.

**Writing a fine-tuned classifier or an encoder.** :func:`write_bert_classifier_folder` writes a minillm
``BertForSequenceClassification`` with ``pooling="cls"`` as transformers' ``BertForSequenceClassification``
(the ``bert.`` rows of the table without the ``cls.`` heads, plus ``classifier.{weight,bias}`` (L, H), (L,)
for L labels): both classify the pooled [CLS] vector, so ``from_pretrained`` gives the same logits.
:func:`write_bert_encoder_folder` writes a minillm :class:`~minillm.bert.Bert` encoder as ``BertModel`` (the
``bert.`` rows, both sides without the prefix): the form for a mean-pooling classifier, which transformers'
sequence-classification class (it pools [CLS]) cannot express.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import TYPE_CHECKING, Callable

import safetensors
import safetensors.torch
import torch

from minillm import MinillmError
from minillm.files import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:  # for annotations only: this module converts checkpoints and never builds a model
    from minillm.bert import BertConfig
    from minillm.gpt import GPTConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_WEIGHTS_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

# Which reader takes which config.json "model_type", for the message when a folder reaches the wrong one.
READERS = {"gpt2": "load_gpt2 (GPT.from_hf)", "bert": "load_bert (BertForPreTraining.from_hf)"}  # minillm.gpt, minillm.bert

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

# GPT-2's projections, stored as Conv1D weights (in_features, out_features): the transposes of nn.Linear's.
GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# The causal-mask buffers older transformers versions saved with the weights; not parameters.
LEGACY_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")

# What transformers.BertConfig assumes for a key config.json leaves out (BERT-base's sizes).
BERT_CONFIG_DEFAULTS = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "is_decoder": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}
# transformers' hidden_act -> minillm's BertConfig.activation. On save the tanh GELU is written as
# "gelu_pytorch_tanh", the name of the very kernel minillm runs (F.gelu(approximate="tanh")).
BERT_ACTIVATIONS_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
BERT_ACTIVATIONS_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
# The tied tensors of BertForPreTraining (name -> the tensor it is tied to), which save_pretrained leaves out.
BERT_TIED = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
             "cls.predictions.decoder.bias": "cls.predictions.bias"}
# A buffer (0, 1, ..., P-1) that transformers versions before 4.31 saved with the weights; not a parameter.
BERT_LEGACY_BUFFER = "bert.embeddings.position_ids"
# TensorFlow-era LayerNorm names: gamma is the gain (weight), beta the shift (bias).
BERT_LEGACY_NORM = re.compile(r"(.*LayerNorm)\.(gamma|beta)")


# ---------------------------------------------------------------------------------------------
# Reading: what both models share
# ---------------------------------------------------------------------------------------------


def checkpoint_folder(directory: str | os.PathLike, model_name: str) -> pathlib.Path:
    """``directory`` as a path, after checking it is a folder (the first thing each reader checks)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise MinillmError(f"{directory} is not a directory: a Hugging Face {model_name} checkpoint is a folder "
                           f"with {CONFIG_NAME} and {WEIGHTS_NAME}")
    return directory


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


def check_model_type(hf_config: dict, expected: str, model_name: str, source: object) -> None:
    """Refuse a ``config.json`` whose ``model_type`` is not ``expected`` (a missing one is taken as ``expected``),
    pointing to the reader that takes it when minillm has one."""
    model_type = hf_config.get("model_type", expected)
    if model_type != expected:
        other = f"; use {READERS[model_type]} for it" if model_type in READERS else ""
        raise MinillmError(f"{source} describes a {model_type!r} model, but {READERS[expected]} reads only "
                           f"{model_name} (model_type {expected!r}){other}")


def read_safetensors_weights(directory: pathlib.Path, hf_class: str = "GPT2LMHeadModel") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, from ``model.safetensors`` or the shards its index lists.

    ``hf_class`` is the transformers class named in the advice given for a pickle-only folder.
    """
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
                           f"transformers: {hf_class}.from_pretrained(folder).save_pretrained(new_folder) "
                           "writes model.safetensors")
    raise MinillmError(f"{directory} has no {WEIGHTS_NAME} (nor a sharded {WEIGHTS_INDEX_NAME})")


def _load_safetensors_file(path: pathlib.Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise MinillmError(f"{path} is missing")
    try:
        return safetensors.torch.load_file(path)  # tensors and a JSON header only: nothing is unpickled
    except (OSError, safetensors.SafetensorError) as error:
        raise MinillmError(f"cannot read {path} as safetensors: {error}") from error


def index_tensors(tensors: dict[str, torch.Tensor], canonical_name: Callable[[str], str], source: object
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors under their canonical names (prefix dropped, legacy names renamed), and for each
    canonical name the key it had in the file (for error messages); two keys with one name are refused."""
    by_name: dict[str, torch.Tensor] = {}
    stored_as: dict[str, str] = {}
    for key, tensor in tensors.items():
        name = canonical_name(key)
        if name in by_name:
            raise MinillmError(f"{source} holds both {stored_as[name]!r} and {key!r}, the same tensor twice")
        by_name[name], stored_as[name] = tensor, key
    return by_name, stored_as


def _and_more(names: list) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def check_names_and_shapes(by_name: dict[str, torch.Tensor], stored_as: dict[str, str],
                           expected: dict[str, tuple[int, ...]], skipped: Callable[[str], bool], source: object,
                           described: str, layout: str) -> None:
    """One :class:`MinillmError` naming the first missing, extra or mis-shaped tensor, if any.

    ``expected`` maps canonical names to shapes; ``skipped(name)`` says which stored names are not
    needed and not wrong either (buffers, tied copies); ``described`` is the model ("a GPT-2 with
    n_layer=2 ...") and ``layout`` the storage convention quoted when a shape is wrong.
    """
    missing = [name for name in expected if name not in by_name]
    if missing:
        raise MinillmError(f"{source} has no tensor {missing[0]!r}{_and_more(missing)}, which {described} needs")
    extra = [stored_as[name] for name in by_name if name not in expected and not skipped(name)]
    if extra:
        raise MinillmError(f"{source} holds a tensor {extra[0]!r}{_and_more(extra)} that {described} does not have: "
                           "does config.json match the weights?")
    for name, shape in expected.items():
        if tuple(by_name[name].shape) != shape:
            raise MinillmError(f"tensor {stored_as[name]!r} in {source} has shape {tuple(by_name[name].shape)}, "
                               f"expected {shape} from config.json ({layout})")


def check_tied_copy(by_name: dict[str, torch.Tensor], stored_as: dict[str, str], copy: str, original: str,
                    source: object) -> None:
    """A stored copy of a tied tensor must equal the tensor it is tied to (see the module docstring)."""
    if copy in by_name and not torch.equal(by_name[copy], by_name[original]):
        raise MinillmError(f"{source} holds {stored_as[copy]!r}, which differs from {stored_as[original]!r} although "
                           "config.json ties them, and minillm's model can hold only one of the two")


# ---------------------------------------------------------------------------------------------
# Writing: what both models share
# ---------------------------------------------------------------------------------------------


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """A fresh, contiguous CPU copy: safetensors refuses tensors that share memory (as tied weights
    would) and writes only row-major ones (as a transpose is not)."""
    return tensor.detach().cpu().clone(memory_format=torch.contiguous_format)


def write_hf_folder(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], hf_config: dict) -> pathlib.Path:
    """Write ``model.safetensors`` then ``config.json`` into ``directory`` (created if needed), each atomically."""
    directory = pathlib.Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise MinillmError(f"cannot create the folder {directory}: {error}") from error
    atomic_write_bytes(directory / WEIGHTS_NAME, safetensors.torch.save(tensors, metadata={"format": "pt"}))
    atomic_write_text(directory / CONFIG_NAME, json.dumps(hf_config, indent=2) + "\n")
    return directory


# ---------------------------------------------------------------------------------------------
# GPT-2: reading
# ---------------------------------------------------------------------------------------------


def read_gpt2_folder(directory: str | os.PathLike, config_class: type, dropout: float = 0.0) -> tuple[GPTConfig, dict]:
    """``(config, state_dict)`` of a Hugging Face GPT-2 folder, in minillm's names and layout:
    :func:`minillm.gpt.load_gpt2` builds the model from them.

    ``directory`` holds ``config.json`` and ``model.safetensors`` (or a sharded
    ``model.safetensors.index.json``), e.g. what ``GPT2LMHeadModel.save_pretrained`` writes or
    a download of ``openai-community/gpt2``. ``config_class`` is :class:`~minillm.gpt.GPTConfig` (passed in,
    so that this module needs no model). ``dropout`` is the new model's dropout (the checkpoint's
    ``*_pdrop`` values are a training choice, not part of the weights). The tensors are float32 whatever the
    file stores (half-precision tensors are upcast). Every problem with the folder (missing files, a GPT-2
    variant minillm does not build, a missing, extra or mis-shaped tensor) is a :class:`MinillmError`.
    """
    directory = checkpoint_folder(directory, "GPT-2")
    config = gpt2_config_from_hf(read_hf_config(directory), config_class, dropout=dropout, source=directory / CONFIG_NAME)
    tensors = read_safetensors_weights(directory, hf_class="GPT2LMHeadModel")
    return config, gpt2_state_from_hf(tensors, config, source=directory)


def gpt2_config_from_hf(hf_config: dict, config_class: type, dropout: float = 0.0, source: object = CONFIG_NAME
                        ) -> GPTConfig:
    """The :class:`~minillm.gpt.GPTConfig` of a GPT-2 ``config.json``; refuses what minillm's GPT cannot build.

    Missing keys take ``transformers.GPT2Config``'s defaults. minillm's GPT has a 4·n_embd MLP,
    the tanh-approximated GELU and 1/sqrt(head_dim) attention scaling, so configs that ask for
    anything else are refused rather than loaded into a model that would compute something different.
    """
    check_model_type(hf_config, "gpt2", "GPT-2", source)
    values = {**GPT2_CONFIG_DEFAULTS, **hf_config}
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
        return config_class(vocab_size=values["vocab_size"], block_size=values["n_positions"], n_layer=values["n_layer"],
                         n_head=values["n_head"], n_embd=n_embd, dropout=dropout, bias=True, positions="learned",
                         tie_weights=bool(values["tie_word_embeddings"]),
                         layer_norm_eps=float(values["layer_norm_epsilon"]), activation=ACTIVATIONS_FROM_HF[activation])
    except (TypeError, ValueError) as error:
        raise MinillmError(f"{source} does not describe a valid GPT: {error}") from error


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
    by_name, stored_as = index_tensors(tensors, lambda key: key.removeprefix("transformer."), source)
    tied_copy = "lm_head.weight" if config.tie_weights else None  # tied: a stored copy must equal wte.weight

    def skipped(name: str) -> bool:
        return name == tied_copy or LEGACY_BUFFER.fullmatch(name) is not None

    check_names_and_shapes(by_name, stored_as, gpt2_hf_shapes(config), skipped, source,
                           f"a GPT-2 with n_layer={config.n_layer} and tie_word_embeddings={config.tie_weights}",
                           "GPT-2 stores projections as Conv1D weights, (in_features, out_features)")
    if tied_copy is not None:
        check_tied_copy(by_name, stored_as, tied_copy, "wte.weight", source)

    state = {"wte.weight": by_name["wte.weight"], "wpe.weight": by_name["wpe.weight"]}
    for i in range(config.n_layer):
        hf, ours = f"h.{i}.", f"blocks.{i}."
        for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_attn.bias", "attn.c_proj.bias",
                     "mlp.c_fc.bias", "mlp.c_proj.bias"):
            state[ours + name] = by_name[hf + name]
        for name in GPT2_CONV1D:  # (in, out) Conv1D -> (out, in) nn.Linear
            state[ours + name] = by_name[hf + name].t()
    state["ln_f.weight"], state["ln_f.bias"] = by_name["ln_f.weight"], by_name["ln_f.bias"]
    # Tied, lm_head.weight is wte.weight (the state dict lists the shared matrix under both names).
    state["lm_head.weight"] = by_name["wte.weight"] if config.tie_weights else by_name["lm_head.weight"]
    return state


# ---------------------------------------------------------------------------------------------
# GPT-2: writing
# ---------------------------------------------------------------------------------------------


def write_gpt2_folder(directory: str | os.PathLike, state: dict[str, torch.Tensor], config: GPTConfig) -> pathlib.Path:
    """Write a GPT's ``state_dict()`` and config as a Hugging Face GPT-2 folder; returns the folder.

    ``config.json`` and ``model.safetensors`` come out as ``GPT2LMHeadModel.save_pretrained``
    writes them (``transformer.``-prefixed names, Conv1D layout, no ``lm_head.weight`` when the
    embeddings are tied), so ``transformers.GPT2LMHeadModel.from_pretrained(directory)`` gives the
    same logits, and :func:`read_gpt2_folder` gives back the same weights. A model without biases
    (``bias=False``) is written with zero biases, which computes exactly the same function.
    A model GPT-2 cannot express (rotary positions) is refused before anything is written.
    Each file is written atomically (a temporary name, then a rename), the weights first.
    """
    tensors = gpt2_state_to_hf(state, config)  # raises before the folder is touched
    hf_config = gpt2_config_to_hf(config, dtype=state["wte.weight"].dtype)
    return write_hf_folder(directory, tensors, hf_config)


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


def gpt2_state_to_hf(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """A ``GPT.state_dict()`` under GPT-2's names and layout (the inverse of :func:`gpt2_state_from_hf`).

    Every tensor is a fresh, contiguous CPU copy (see :func:`_owned`). Missing biases
    (``bias=False``) are written as zeros.
    """
    if config.positions != "learned" or "wpe.weight" not in state:
        raise MinillmError(f"GPT-2 has learned position embeddings only: a model with positions={config.positions!r} "
                           "cannot be written as a GPT-2 checkpoint")
    if config.tie_weights and state["lm_head.weight"].data_ptr() != state["wte.weight"].data_ptr():
        raise MinillmError("the model's config says tie_weights=True but lm_head.weight is not wte.weight: "
                           "set config.tie_weights=False to write both matrices")
    dtype = state["wte.weight"].dtype

    def bias(name: str, size: int) -> torch.Tensor:
        return _owned(state[name]) if name in state else torch.zeros(size, dtype=dtype)  # no bias is a zero bias

    c = config.n_embd
    tensors = {"transformer.wte.weight": _owned(state["wte.weight"]), "transformer.wpe.weight": _owned(state["wpe.weight"])}
    for i in range(config.n_layer):
        layer, ours = f"transformer.h.{i}.", f"blocks.{i}."
        for name in ("ln_1.weight", "ln_2.weight"):
            tensors[layer + name] = _owned(state[ours + name])
        for name, size in (("ln_1.bias", c), ("ln_2.bias", c), ("attn.c_attn.bias", 3 * c), ("attn.c_proj.bias", c),
                           ("mlp.c_fc.bias", 4 * c), ("mlp.c_proj.bias", c)):
            tensors[layer + name] = bias(ours + name, size)
        for name in GPT2_CONV1D:  # (out, in) nn.Linear -> (in, out) Conv1D
            tensors[layer + name] = _owned(state[ours + name].t())
    tensors["transformer.ln_f.weight"] = _owned(state["ln_f.weight"])
    tensors["transformer.ln_f.bias"] = bias("ln_f.bias", c)
    if not config.tie_weights:
        tensors["lm_head.weight"] = _owned(state["lm_head.weight"])
    return tensors


# ---------------------------------------------------------------------------------------------
# BERT: the name table, then reading and writing
# ---------------------------------------------------------------------------------------------


def bert_hf_names(config: BertConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The module docstring's BERT table: every tensor a ``BertForPreTraining`` checkpoint of these sizes
    holds (tied copies left out) -> (the minillm ``state_dict`` name, the shape, the same on both sides)."""
    h, width = config.n_embd, config.ff_width
    names: dict[str, tuple[str, tuple[int, ...]]] = {}

    def linear(hf: str, ours: str, out_features: int, in_features: int) -> None:  # nn.Linear on both sides
        names[hf + ".weight"] = (ours + ".weight", (out_features, in_features))
        names[hf + ".bias"] = (ours + ".bias", (out_features,))

    def layer_norm(hf: str, ours: str) -> None:
        names[hf + ".weight"] = (ours + ".weight", (h,))
        names[hf + ".bias"] = (ours + ".bias", (h,))

    for table, rows in (("word_embeddings", config.vocab_size), ("position_embeddings", config.max_len),
                        ("token_type_embeddings", config.type_vocab_size)):
        names[f"bert.embeddings.{table}.weight"] = (f"bert.embeddings.{table}.weight", (rows, h))
    layer_norm("bert.embeddings.LayerNorm", "bert.embeddings.norm")
    for i in range(config.n_layer):
        hf, ours = f"bert.encoder.layer.{i}.", f"bert.layers.{i}."
        for hf_projection, projection in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            linear(f"{hf}attention.self.{hf_projection}", f"{ours}self_attn.{projection}", h, h)
        linear(hf + "attention.output.dense", ours + "self_attn.out_proj", h, h)
        layer_norm(hf + "attention.output.LayerNorm", ours + "norm1")  # post-norm: after the attention residual
        linear(hf + "intermediate.dense", ours + "feed_forward.linear1", width, h)
        linear(hf + "output.dense", ours + "feed_forward.linear2", h, width)
        layer_norm(hf + "output.LayerNorm", ours + "norm2")  # after the feed-forward residual
    linear("bert.pooler.dense", "bert.pooler", h, h)
    linear("cls.predictions.transform.dense", "mlm_dense", h, h)
    layer_norm("cls.predictions.transform.LayerNorm", "mlm_norm")
    names["cls.predictions.bias"] = ("mlm_bias", (config.vocab_size,))
    linear("cls.seq_relationship", "nsp_head", 2, h)
    return names


def read_bert_folder(directory: str | os.PathLike, config_class: type, dropout: float = 0.0) -> tuple[BertConfig, dict]:
    """``(config, state_dict)`` of a Hugging Face BERT folder in minillm's names: :func:`minillm.bert.load_bert`
    builds the ``BertForPreTraining`` from them.

    ``directory`` holds ``config.json`` and ``model.safetensors`` (or a sharded index), as
    ``transformers.BertForPreTraining.save_pretrained`` writes them or as ``google-bert/bert-base-uncased``
    is downloaded: the encoder *and* both pretraining heads (``cls.``); an encoder-only folder is
    refused (see the module docstring). ``config_class`` is :class:`~minillm.bert.BertConfig`. ``dropout`` is
    the new model's dropout, whatever the checkpoint's ``hidden_dropout_prob`` says. The tensors are float32
    whatever the file stores. Every problem with the folder is a :class:`MinillmError`.
    """
    directory = checkpoint_folder(directory, "BERT")
    config = bert_config_from_hf(read_hf_config(directory), config_class, dropout=dropout, source=directory / CONFIG_NAME)
    tensors = read_safetensors_weights(directory, hf_class="BertForPreTraining")
    return config, bert_state_from_hf(tensors, config, source=directory)


def bert_config_from_hf(hf_config: dict, config_class: type, dropout: float = 0.0, source: object = CONFIG_NAME
                        ) -> BertConfig:
    """The :class:`~minillm.bert.BertConfig` of a BERT ``config.json``; refuses what minillm's BERT cannot build.

    Missing keys take ``transformers.BertConfig``'s defaults; the mapping and what is refused are
    in the module docstring.
    """
    check_model_type(hf_config, "bert", "BERT", source)
    values = {**BERT_CONFIG_DEFAULTS, **hf_config}
    activation = values["hidden_act"]
    if not isinstance(activation, str) or activation not in BERT_ACTIVATIONS_FROM_HF:
        raise MinillmError(f"{source} asks for hidden_act {activation!r}, which minillm's BERT does not have "
                           f"(it reads {', '.join(map(repr, BERT_ACTIVATIONS_FROM_HF))})")
    if values["position_embedding_type"] != "absolute":
        raise MinillmError(f"{source} asks for position_embedding_type {values['position_embedding_type']!r}, but "
                           "minillm's BERT has learned absolute position embeddings only ('absolute')")
    if values["is_decoder"] or values["add_cross_attention"]:
        raise MinillmError(f"{source} sets is_decoder or add_cross_attention, which make BERT a causal or "
                           "cross-attending decoder, and minillm's BERT is a bidirectional encoder only")
    if not values["tie_word_embeddings"]:
        raise MinillmError(f"{source} sets tie_word_embeddings to false, but minillm's BERT always uses the word "
                           "embeddings as its masked-LM decoder")
    if values["pad_token_id"] is None:
        raise MinillmError(f"{source} has pad_token_id null, but minillm's BERT needs a padding id (the token its "
                           "default attention mask leaves out)")
    hidden, intermediate = values["hidden_size"], values["intermediate_size"]
    if not isinstance(intermediate, int) or intermediate < 1:
        raise MinillmError(f"{source} has intermediate_size {intermediate!r}; it must be a positive integer")
    try:
        return config_class(vocab_size=values["vocab_size"], max_len=values["max_position_embeddings"],
                          n_layer=values["num_hidden_layers"], n_head=values["num_attention_heads"], n_embd=hidden,
                          d_ff=0 if intermediate == 4 * hidden else intermediate, dropout=dropout,
                          type_vocab_size=values["type_vocab_size"], layer_norm_eps=float(values["layer_norm_eps"]),
                          pad_id=values["pad_token_id"], activation=BERT_ACTIVATIONS_FROM_HF[activation])
    except (TypeError, ValueError) as error:
        raise MinillmError(f"{source} does not describe a valid BERT: {error}") from error


def _bert_canonical_name(key: str) -> str:
    legacy = BERT_LEGACY_NORM.fullmatch(key)  # ...LayerNorm.gamma -> ...LayerNorm.weight, beta -> bias
    return f"{legacy[1]}.{'weight' if legacy[2] == 'gamma' else 'bias'}" if legacy else key


def bert_state_from_hf(tensors: dict[str, torch.Tensor], config: BertConfig, source: object = WEIGHTS_NAME
                       ) -> dict[str, torch.Tensor]:
    """A ``BertForPreTraining`` checkpoint's tensors (HF names) -> a minillm ``BertForPreTraining.state_dict()``.

    Checks first that the folder has the pretraining heads, that the names and shapes are exactly
    those of :func:`bert_hf_names` (after the legacy renames; tied copies and the old
    ``position_ids`` buffer aside), and that stored tied copies equal what they are tied to;
    raises one :class:`MinillmError` naming the offending tensor otherwise.
    """
    by_name, stored_as = index_tensors(tensors, _bert_canonical_name, source)
    if not any(name.startswith("cls.") for name in by_name):
        raise MinillmError(f"{source} has no pretraining heads (no 'cls.' tensors), as a BertModel or a fine-tuned "
                           "BERT folder has, and load_bert builds a BertForPreTraining whose masked-LM and "
                           "next-sentence heads it will not invent")
    output_bias, decoder_bias = BERT_TIED["cls.predictions.decoder.bias"], "cls.predictions.decoder.bias"
    if output_bias not in by_name and decoder_bias in by_name:  # only the tied copy was stored: it is the bias
        by_name[output_bias], stored_as[output_bias] = by_name.pop(decoder_bias), stored_as.pop(decoder_bias)
    names = bert_hf_names(config)
    check_names_and_shapes(by_name, stored_as, {hf: shape for hf, (_, shape) in names.items()},
                           lambda name: name in BERT_TIED or name == BERT_LEGACY_BUFFER, source,
                           f"a BertForPreTraining with num_hidden_layers={config.n_layer}",
                           "BERT stores nn.Linear weights, (out_features, in_features)")
    for copy, original in BERT_TIED.items():
        check_tied_copy(by_name, stored_as, copy, original, source)
    return {ours: by_name[hf] for hf, (ours, _) in names.items()}


def write_bert_folder(directory: str | os.PathLike, state: dict[str, torch.Tensor], config: BertConfig) -> pathlib.Path:
    """Write a ``BertForPreTraining.state_dict()`` and its config as a Hugging Face BERT folder; returns the folder.

    ``config.json`` and ``model.safetensors`` come out as ``BertForPreTraining.save_pretrained``
    writes them (the names of the module docstring's table, the tied decoder weight and bias left
    out), so ``transformers.BertForPreTraining.from_pretrained(directory)`` gives the same MLM and
    NSP logits, and :func:`read_bert_folder` gives back the same weights. Each file is written atomically,
    the weights first; a state that is not a ``BertForPreTraining``'s is refused before anything is written.
    """
    tensors = bert_state_to_hf(state, config)  # raises before the folder is touched
    hf_config = bert_config_to_hf(config, dtype=state["bert.embeddings.word_embeddings.weight"].dtype)
    return write_hf_folder(directory, tensors, hf_config)


def bert_config_to_hf(config: BertConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The ``config.json`` of a BERT with these sizes (the keys ``transformers.BertConfig`` reads)."""
    return {
        "model_type": "bert",
        "architectures": ["BertForPreTraining"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "intermediate_size": config.ff_width,
        "hidden_act": BERT_ACTIVATIONS_TO_HF[config.activation],
        "hidden_dropout_prob": config.dropout,  # minillm has one dropout rate for both
        "attention_probs_dropout_prob": config.dropout,
        "max_position_embeddings": config.max_len,
        "type_vocab_size": config.type_vocab_size,
        "initializer_range": 0.02,
        "layer_norm_eps": config.layer_norm_eps,
        "pad_token_id": config.pad_id,
        "position_embedding_type": "absolute",  # read by transformers 4; transformers 5 knows no other
        "is_decoder": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "classifier_dropout": None,
        "dtype": str(dtype).removeprefix("torch."),
    }


def bert_state_to_hf(state: dict[str, torch.Tensor], config: BertConfig) -> dict[str, torch.Tensor]:
    """A ``BertForPreTraining.state_dict()`` under transformers' names (the inverse of :func:`bert_state_from_hf`),
    each a fresh contiguous CPU copy; the tied decoder weight and bias are not written, as ``save_pretrained`` does."""
    names = bert_hf_names(config)
    mapped = {ours for ours, _ in names.values()}
    if set(state) != mapped:  # the model's layout is not the one the table describes
        odd = sorted(set(state) ^ mapped)
        raise MinillmError(f"the model's tensor {odd[0]!r}{_and_more(odd)} does not match the Hugging Face "
                           "BertForPreTraining layout save_bert writes (see minillm.hf)")
    return {hf: _owned(state[ours]) for hf, (ours, _) in names.items()}


def _renamed_for_hf(state: dict[str, torch.Tensor], names: dict[str, str], layout: str) -> dict[str, torch.Tensor]:
    """``state`` under the Hugging Face names of ``names`` (hf name -> minillm name), each an owned copy;
    a state whose tensors are not exactly those of the table is refused, naming one that differs."""
    mapped = set(names.values())
    if set(state) != mapped:
        odd = sorted(set(state) ^ mapped)
        raise MinillmError(f"the model's tensor {odd[0]!r}{_and_more(odd)} does not match the Hugging Face {layout} "
                           "layout (see minillm.hf)")
    return {hf: _owned(state[ours]) for hf, ours in names.items()}


def bert_encoder_hf_names(config: BertConfig) -> dict[str, str]:
    """``BertModel``'s tensor names -> a minillm :class:`~minillm.bert.Bert`'s: the ``bert.`` rows of
    :func:`bert_hf_names`, without the prefix on both sides."""
    return {hf.removeprefix("bert."): ours.removeprefix("bert.") for hf, (ours, _) in bert_hf_names(config).items()
            if hf.startswith("bert.")}


def write_bert_encoder_folder(directory: str | os.PathLike, state: dict[str, torch.Tensor], config: BertConfig
                              ) -> pathlib.Path:
    """Write a minillm ``Bert.state_dict()`` as a Hugging Face ``BertModel`` folder (what ``BertModel.save_pretrained``
    writes), so that ``transformers.BertModel.from_pretrained(directory)`` gives the same hidden states and
    pooled vector. Refused before anything is written if the state is not a plain encoder's."""
    tensors = _renamed_for_hf(state, bert_encoder_hf_names(config), "BertModel")
    hf_config = {**bert_config_to_hf(config, dtype=state["embeddings.word_embeddings.weight"].dtype),
                 "architectures": ["BertModel"]}
    return write_hf_folder(directory, tensors, hf_config)


def write_bert_classifier_folder(directory: str | os.PathLike, state: dict[str, torch.Tensor], config: BertConfig,
                                 labels: list[str]) -> pathlib.Path:
    """Write a minillm ``BertForSequenceClassification.state_dict()`` (``pooling="cls"``) as a Hugging Face
    ``BertForSequenceClassification`` folder with ``labels`` as its ``id2label`` (label i's name), so that
    ``transformers.BertForSequenceClassification.from_pretrained(directory)`` gives the same logits. Refused
    before anything is written if the state has anything else (adapters, a soft prompt, unmerged LoRA)."""
    names = {hf: ours for hf, (ours, _) in bert_hf_names(config).items() if hf.startswith("bert.")}
    names.update({"classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"})
    tensors = _renamed_for_hf(state, names, "BertForSequenceClassification")
    if tensors["classifier.weight"].shape[0] != len(labels):
        raise MinillmError(f"the classifier has {tensors['classifier.weight'].shape[0]} labels, but "
                           f"{len(labels)} label names were given")
    hf_config = {**bert_config_to_hf(config, dtype=state["bert.embeddings.word_embeddings.weight"].dtype),
                 "architectures": ["BertForSequenceClassification"],
                 "id2label": {str(i): name for i, name in enumerate(labels)},
                 "label2id": {name: i for i, name in enumerate(labels)}}
    return write_hf_folder(directory, tensors, hf_config)
