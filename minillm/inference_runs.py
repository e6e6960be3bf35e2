"""Any finished run folder, loaded for inference: the one loader that evaluation, export and serving share.

:func:`minillm.runs.load_run` reads the models a run folder describes by shape alone (a GPT, a BERT); a
fine-tuned classifier (``python -m minillm finetune``) is a BERT under a classification head, possibly rebuilt
by a parameter-efficient method (LoRA layers, adapters, a soft prompt) whose weights have names of their own.
:func:`load_for_inference` rebuilds that structure from the run's ``config.json`` before the weights go in::

    "model": {"type": "bert-classifier", "bert": {<BertConfig>}, "pooling": "mean", "num_labels": 2,
              "method": "lora", "peft": {"lora_r": 8, ...}, "init": "<the BERT run it started from>"}

Runs written before the classifier recorded its shape name only ``init`` and ``method``: their shape is then
read from the ``init`` run and the head's settings from ``train_config``.
"""

from __future__ import annotations

import pathlib
from dataclasses import asdict
from typing import Any

from torch import nn

from minillm import MinillmError, runs
from minillm.bert import BertConfig, BertForSequenceClassification
from minillm.checkpoint import load_model_state, read_safetensors
from minillm.peft import METHODS, PEFT_OPTIONS, apply_method

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


def load_for_inference(path: str | pathlib.Path, device: Any = "cpu", expect: str | None = None) -> runs.LoadedRun:
    """``(model, tokenizer, config)`` of a finished run folder, in eval mode on ``device``: a GPT, a BERT
    (pretraining heads), a BERT encoder, or a fine-tuned BERT classifier (``expect``: the model type wanted)."""
    folder = pathlib.Path(path)
    config = runs.read_config(folder)
    kind = config.get("model", {}).get("type")
    if expect is not None and kind != expect:
        raise MinillmError(f"{folder} holds a {kind!r} model, not a {expect!r} one")
    if kind != CLASSIFIER:
        return runs.load_run(folder, device, expect=expect)
    weights = runs.weights_file(folder)
    if not weights.is_file():
        raise MinillmError(f"{folder} has no weights ({runs.BEST_MODEL} or {runs.CHECKPOINT})")
    model = build_classifier(folder, config)
    tensors, _ = read_safetensors(weights)
    if any(name.startswith("model/") for name in tensors):  # a training checkpoint: the model's part
        tensors = {name[len("model/"):]: t for name, t in tensors.items() if name.startswith("model/")}
    load_model_state(model, tensors, str(weights))
    tokenizer = runs.load_tokenizer(folder, config)
    return runs.LoadedRun(model.to(device).eval(), tokenizer, config)
