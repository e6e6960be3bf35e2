"""Any finished run folder, loaded for inference: the one loader that evaluation, export and serving share.

:func:`minillm.runs.load_run` reads the models a run folder describes by shape alone (a GPT, a BERT); a
fine-tuned classifier (``python -m minillm finetune``) is a BERT under a classification head, possibly rebuilt
by a parameter-efficient method (LoRA layers, adapters, a soft prompt) whose weights have names of their own.
:func:`load_for_inference` rebuilds that structure from the run's ``config.json`` before the weights go in::

    "model": {"type": "bert-classifier", "bert": {<BertConfig>}, "pooling": "mean", "num_labels": 2,
              "method": "lora", "peft": {"lora_r": 8, ...}, "init": "<the BERT run it started from>"}

Runs written before the classifier recorded its shape name only ``init`` and ``method``: their shape is then
read from the ``init`` run and the head's settings from ``train_config``.

Chapter 05's encoder-decoder :class:`~minillm.transformer.Transformer` is saved as a run folder too
(:func:`save_transformer_run`): its two vocabularies in ``vocab.json`` and the arguments of the number-words data
set in ``config.json``, so its held-out test numbers can be rebuilt and scored later.
"""

from __future__ import annotations

import pathlib
from dataclasses import asdict
from typing import Any

from torch import nn

from minillm import MinillmError, runs
from minillm.bert import BertConfig, BertForSequenceClassification
from minillm.checkpoint import load_model_state, read_safetensors, save_weights
from minillm.files import read_json, write_json
from minillm.number_words import Vocabulary
from minillm.peft import METHODS, PEFT_OPTIONS, apply_method
from minillm.transformer import Transformer, TransformerConfig

CLASSIFIER = "bert-classifier"


def classifier_run_info(bert_config: BertConfig, pooling: str, method: str, peft_options: dict, init: str,
                        num_labels: int = 2) -> dict:
    """The ``"model"`` entry of a fine-tuned classifier's config.json: everything needed to rebuild it."""
    return {"bert": asdict(bert_config), "pooling": pooling, "num_labels": num_labels, "method": method,
            "peft": dict(peft_options), "init": init}


def build_classifier(folder: pathlib.Path, config: dict) -> nn.Module:
    """An untrained classifier with the structure a ``bert-classifier`` run's weights were saved from."""
    info = config.get("model", {})
    train = config.get("train_config", {}) if isinstance(config.get("train_config"), dict) else {}
    bert_fields = info.get("bert")
    if bert_fields is None:  # an older run: the shape is its init run's
        init = pathlib.Path(info.get("init", ""))
        if not (init / runs.CONFIG).is_file():
            raise MinillmError(f"{folder / runs.CONFIG} does not record the classifier's shape and its init run "
                               f"{str(init)!r} is gone: fine-tune it again with this version of minillm")
        bert_fields = {k: v for k, v in runs.read_config(init).get("model", {}).items() if k != "type"}
    method = info.get("method", "full")
    if method not in METHODS:
        raise MinillmError(f"{folder / runs.CONFIG} names an unknown fine-tuning method {method!r}")
    options = info.get("peft") or {name: train[name] for name in PEFT_OPTIONS if name in train}
    try:
        bert_config = BertConfig.from_dict(dict(bert_fields), "it")
        model = BertForSequenceClassification(bert_config, num_labels=int(info.get("num_labels", 2)),
                                              pooling=info.get("pooling", train.get("pooling", "mean")))
        return apply_method(model, method, **options)
    except (TypeError, ValueError) as error:
        raise MinillmError(f"{folder / runs.CONFIG} does not describe a classifier minillm can build: {error}") from None


def classifier_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(num_labels, max_len, prompt_tokens)`` of a BERT classifier, or of its soft-prompt wrapper."""
    inner = getattr(model, "model", model)  # minillm.peft.PromptTuning wraps the classifier
    if not hasattr(inner, "num_labels") or not hasattr(getattr(inner, "config", None), "max_len"):
        raise MinillmError(f"minillm serves a GPT or a BERT classifier, not a {type(model).__name__}")
    prompt = model.prompt.shape[0] if inner is not model and hasattr(model, "prompt") else 0
    return inner.num_labels, inner.config.max_len, prompt


def load_for_inference(path: str | pathlib.Path, device: Any = "cpu", expect: str | None = None) -> runs.LoadedRun:
    """``(model, tokenizer, config)`` of a finished run folder, in eval mode on ``device``: a GPT, a BERT
    (pretraining heads), a BERT encoder, or a fine-tuned BERT classifier (``expect``: the model type wanted)."""
    folder = pathlib.Path(path)
    config = runs.read_config(folder)
    kind = config.get("model", {}).get("type")
    if expect is not None and kind != expect:
        raise MinillmError(f"{folder} holds a {kind!r} model, not a {expect!r} one")
    if kind not in (CLASSIFIER, TRANSFORMER):
        return runs.load_run(folder, device, expect=expect)
    weights = runs.weights_file(folder)
    if not weights.is_file():
        raise MinillmError(f"{folder} has no weights ({runs.BEST_MODEL} or {runs.CHECKPOINT})")
    model = build_classifier(folder, config) if kind == CLASSIFIER else build_transformer(folder, config)
    tensors, _ = read_safetensors(weights)
    if any(name.startswith("model/") for name in tensors):  # a training checkpoint: the model's part
        tensors = {name[len("model/"):]: t for name, t in tensors.items() if name.startswith("model/")}
    load_model_state(model, tensors, str(weights))
    tokenizer = runs.load_tokenizer(folder, config) if kind == CLASSIFIER else load_vocabularies(folder)
    return runs.LoadedRun(model.to(device).eval(), tokenizer, config)


# ---------------------------------------------------------------------------------------------
# Chapter 05's Transformer
# ---------------------------------------------------------------------------------------------

TRANSFORMER = "transformer"
VOCABULARIES = "vocab.json"


def save_transformer_run(folder: str | pathlib.Path, model: Transformer, src_vocab: Vocabulary, tgt_vocab: Vocabulary,
                         number_data: dict) -> pathlib.Path:
    """Write chapter 05's trained Transformer as a run folder: ``config.json`` (its shape and ``number_data``, the
    arguments of :func:`minillm.number_words.number_dataset`), ``vocab.json`` and ``model.safetensors``."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / VOCABULARIES, {"src": src_vocab.tokens, "tgt": tgt_vocab.tokens})
    write_json(folder / runs.CONFIG, {"model": {"type": TRANSFORMER, **model.config_dict()}, "tokenizer": VOCABULARIES,
                                      "data": {"task": "number_words", **number_data}})
    save_weights(folder / runs.BEST_MODEL, model)
    return folder


def build_transformer(folder: pathlib.Path, config: dict) -> Transformer:
    fields = {k: v for k, v in config.get("model", {}).items() if k != "type"}
    try:
        return Transformer(TransformerConfig(**fields))
    except (TypeError, ValueError) as error:
        raise MinillmError(f"{folder / runs.CONFIG} does not describe a Transformer: {error}") from None


def load_vocabularies(folder: pathlib.Path) -> tuple[Vocabulary, Vocabulary]:
    """The (source, target) vocabularies of a Transformer run."""
    path = folder / VOCABULARIES
    if not path.is_file():
        raise MinillmError(f"{folder} has no {VOCABULARIES}")
    saved = read_json(path)
    source, target = Vocabulary(saved["src"]), Vocabulary(saved["tgt"])
    if source.tokens != saved["src"] or target.tokens != saved["tgt"]:
        raise MinillmError(f"{path} is not a pair of vocabularies minillm wrote")
    return source, target
