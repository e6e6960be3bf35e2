"""``python -m minillm export``: a run folder as an ONNX model or as a Hugging Face ``transformers`` folder.

::

    python -m minillm export --run runs/gpt --format onnx        # runs/gpt/onnx/model.onnx + tokenizer.json
    python -m minillm export --run runs/sst2 --format hf --out sst2-hf

A thin command: the ONNX export and its onnxruntime check are :mod:`minillm.onnx_export`'s, the Hugging Face
layouts :mod:`minillm.hf`'s, the run folders :mod:`minillm.runs`' and :mod:`minillm.inference_runs`'. What each
run becomes:

=================== ========================================= ==================================================
run (model type)    ``--format onnx``                         ``--format hf``
=================== ========================================= ==================================================
``gpt``             input_ids -> logits (B, T, vocab)         ``GPT2LMHeadModel``
``bert-classifier`` input_ids, attention_mask -> logits       ``BertForSequenceClassification`` (``cls`` pooling)
                                                              or the encoder as ``BertModel`` (``mean`` pooling)
``bert``            (refused: fine-tune it first)             ``BertForPreTraining``
``bert-encoder``    (refused)                                 ``BertModel``
=================== ========================================= ==================================================

The run's ``tokenizer.json`` is copied beside the model. A LoRA classifier is exported with its update merged
into the weights (the same function); adapters and soft prompts have no place in transformers' classes, so
such a classifier exports to ONNX only.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import Literal

from minillm import MinillmError, hf, runs
from minillm.bert import Bert, BertForPreTraining, BertForSequenceClassification, save_bert
from minillm.config import QuickConfig
from minillm.files import atomic_write_bytes
from minillm.gpt import GPT, save_gpt2
from minillm.inference_runs import load_for_inference
from minillm.onnx_export import CHECK_SHAPES, RELATIVE_TOLERANCE, export_onnx
from minillm.peft import PromptTuning, WithAdapter, lora_layers, merge_lora

ONNX_MODEL = "model.onnx"

FORMATS = {"onnx": ("gpt", "bert-classifier"), "hf": ("gpt", "bert-classifier", "bert", "bert-encoder")}
"""format -> the run types (config.json's model type) it exports."""

FILES = {"onnx": (ONNX_MODEL, runs.TOKENIZER), "hf": (hf.CONFIG_NAME, hf.WEIGHTS_NAME, runs.TOKENIZER)}
"""format -> the files it writes in --out."""


@dataclass
class ExportConfig(QuickConfig):
    """Export a run folder as an ONNX model (checked against onnxruntime) or a Hugging Face transformers folder."""

    run: str = field(default="runs/gpt", metadata={"help": "the run folder to export: a 'pretrain gpt', 'finetune' "
                                                          "(classifier) or 'pretrain bert' run"})
    format: Literal["onnx", "hf"] = field(default="onnx", metadata={
        "help": "onnx: model.onnx with dynamic batch and sequence axes; hf: config.json + model.safetensors that "
                "transformers' from_pretrained loads"})
    out: str = field(default="", metadata={"help": "the folder to write the files in (default: <run>/onnx or <run>/hf)"})
    overwrite: bool = field(default=False, metadata={"help": "replace the files an earlier export wrote in --out"})
    check: bool = field(default=True, metadata={"help": "with --format onnx: before writing, compare onnxruntime's "
                                                        "logits with PyTorch's at several batch sizes and lengths"})


def output_folder(config: ExportConfig) -> pathlib.Path:
    return pathlib.Path(config.out) if config.out else pathlib.Path(config.run) / config.format


def check_output_folder(out: pathlib.Path, run: pathlib.Path, export_format: str, overwrite: bool) -> None:
    """Refuse an ``out`` that is the run itself (or another run), a file, or holds the files this export
    writes (unless ``overwrite``): one sentence each."""
    if out.resolve() == run.resolve():
        raise MinillmError(f"--out {out} is the run folder itself; the export would replace the run's own files: "
                           "choose another --out")
    if out.exists() and not out.is_dir():
        raise MinillmError(f"--out {out} is a file, not a folder")
    try:
        holds_run = runs.model_type(out) is not None
    except MinillmError:  # no config.json there, or not a minillm one (an earlier Hugging Face export)
        holds_run = False
    if holds_run:
        raise MinillmError(f"--out {out} holds a minillm run; choose another --out")
    existing = [name for name in FILES[export_format] if (out / name).exists()]
    if existing and not overwrite:
        raise MinillmError(f"--out {out} already holds {', '.join(existing)}: pass --overwrite to replace "
                           f"{'it' if len(existing) == 1 else 'them'}, or choose another --out")


def _classifier_parts(model) -> tuple[BertForSequenceClassification | None, str | None]:
    """The BERT classifier inside ``model`` and, when transformers has no place for part of it, what part."""
    if isinstance(model, PromptTuning):
        return None, "a soft prompt"
    if any(isinstance(module, WithAdapter) for module in model.modules()):
        return None, "adapters"
    return model, None


def write_hf(model, out: pathlib.Path) -> str:
    """Write ``model`` as a Hugging Face folder in ``out``; returns the transformers class that loads it."""
    if isinstance(model, GPT):
        save_gpt2(model, out)
        return "GPT2LMHeadModel"
    if isinstance(model, BertForPreTraining):
        save_bert(model, out)
        return "BertForPreTraining"
    if isinstance(model, Bert):
        hf.write_bert_encoder_folder(out, model.state_dict(), model.config)
        return "BertModel"
    classifier, extra = _classifier_parts(model)
    if classifier is None:
        raise MinillmError(f"the classifier has {extra}, which transformers' BertForSequenceClassification has no "
                           "place for: export it with --format onnx")
    if classifier.pooling == "mean":
        hf.write_bert_encoder_folder(out, classifier.bert.state_dict(), classifier.config)
        print("note: the classifier mean-pools the tokens' states and transformers' BertForSequenceClassification "
              "pools [CLS], so the encoder was written as a BertModel (the classifier layer is in the ONNX export)")
        return "BertModel"
    labels = [f"LABEL_{i}" for i in range(classifier.num_labels)]
    hf.write_bert_classifier_folder(out, classifier.state_dict(), classifier.config, labels)
    return "BertForSequenceClassification"


def file_size(size: int) -> str:
    return f"{size / 1e6:,.1f} MB" if size >= 1e6 else f"{size / 1e3:,.1f} kB"


def run_export(config: ExportConfig) -> dict:
    """The command: load the run, export it, copy its tokenizer, print what was written (and the check)."""
    run, out = pathlib.Path(config.run), output_folder(config)
    info = runs.read_config(run)  # one sentence if run is not a run folder
    kind = runs.run_kind(info)
    if kind is None:
        raise MinillmError(f"{run / runs.CONFIG} names no model type, so there is no telling what to export "
                           "(runs that 'pretrain gpt', 'pretrain bert' and 'finetune' write name theirs)")
    if kind not in FORMATS[config.format]:
        hint = " (fine-tune a BERT into a classifier with 'python -m minillm finetune', or use --format hf)" \
            if kind in FORMATS["hf"] else ""
        raise MinillmError(f"{run} holds a {kind!r} model; --format {config.format} exports "
                           f"{', '.join(FORMATS[config.format][:-1])} and {FORMATS[config.format][-1]} runs{hint}")
    check_output_folder(out, run, config.format, config.overwrite)
    model, _, _ = load_for_inference(run, "cpu")
    if lora_layers(model):
        merge_lora(model)
        print("LoRA: the low-rank updates are merged into the weights (W0 + (alpha/r) B A, the same function)")
    result: dict = {"run": str(run), "format": config.format, "out": str(out), "checks": []}
    if config.format == "onnx":
        export = export_onnx(model, out / ONNX_MODEL, check_shapes=CHECK_SHAPES if config.check else ())
        result["checks"] = [check._asdict() for check in export.checks]
        loads_with = "onnxruntime.InferenceSession"
    else:
        loads_with = f"transformers.{write_hf(model, out)}.from_pretrained"
    tokenizer = run / info.get("tokenizer", runs.TOKENIZER)
    atomic_write_bytes(out / runs.TOKENIZER, tokenizer.read_bytes())
    result["files"] = [str(out / name) for name in FILES[config.format]]
    for path in map(pathlib.Path, result["files"]):
        print(f"wrote {path} ({file_size(path.stat().st_size)})")
    print(f"load it with {loads_with}")
    if result["checks"]:
        print(f"onnxruntime vs PyTorch logits (tolerance {RELATIVE_TOLERANCE:g} x max(1, max |logit|)):")
        for check in export.checks:
            print(f"  {check}")
    return result
