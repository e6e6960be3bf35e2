"""Run folders: the one place that knows what a run folder holds and how to read one back.

Every command and chapter that trains writes a run folder, and everything that reads one goes through
here::

    <out>/config.json              the run's metadata: {"model": {"type": ..., <model config>}, "tokenizer": ...,
                                   "train_config": {...}, ...} (see :func:`run_info`)
    <out>/checkpoint.safetensors   the latest full training state (weights, optimizer, RNG): resume from it
    <out>/model.safetensors        the weights of the best evaluation: sample, fine-tune or evaluate from it
    <out>/log.jsonl                one JSON line per evaluation
    <out>/loss.png                 the loss curves
    <out>/results.json             written when the run finishes (its presence means "finished")
    <out>/tokenizer.json           the tokenizer the model's ids mean
    <out>/samples.txt              a GPT's samples

:func:`load_run` turns a folder back into ``(model, tokenizer, config)``; :func:`bert_run` is "use this
pretrained BERT, the shipped one, or pretrain one now".
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import asdict, is_dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from minillm import MinillmError, datasets
from minillm.bert import Bert, BertConfig, BertForPreTraining
from minillm.checkpoint import load_model_state, read_safetensors, tensor_sizes
from minillm.files import read_json, temp_files_of
from minillm.gpt import GPT, GPTConfig
from minillm.tokenization import load_library_tokenizer, tokenizer_size
from minillm.tokenization import load_tokenizer as load_minillm_tokenizer

RUNS_ENV = "MINILLM_RUNS_DIR"


def runs_dir() -> pathlib.Path:
    """Where the notebooks keep their runs, and look for earlier chapters' ones: ``$MINILLM_RUNS_DIR`` or the
    repository's ``runs/`` (beside ``data/``), whatever folder Jupyter or Python started in. (The chapter
    scripts' ``--out runs/chNN`` is relative to where they are run: from the repository's root, the same place.)"""
    override = os.environ.get(RUNS_ENV)
    return pathlib.Path(override) if override else pathlib.Path(__file__).resolve().parent.parent / "runs"


CONFIG = "config.json"
CHECKPOINT = "checkpoint.safetensors"  # the latest full training state: resume from it
BEST_MODEL = "model.safetensors"  # the weights with the best validation score: sample or fine-tune from it
LOG = "log.jsonl"
LOSS_PLOT = "loss.png"
RESULTS = "results.json"
TOKENIZER = "tokenizer.json"
SAMPLES = "samples.txt"
RUN_FILES = (CONFIG, CHECKPOINT, BEST_MODEL, LOG, LOSS_PLOT, RESULTS, TOKENIZER, SAMPLES)


def run_kind(info: dict) -> str | None:
    """The model type in a :func:`run_info` dict (None if it names none)."""
    model = info.get("model") if isinstance(info, dict) else None
    return model.get("type") if isinstance(model, dict) else None


def run_info(model_type: str, model_config: Any = None, **extra: Any) -> dict:
    """The metadata a run saves as ``config.json`` (and in every checkpoint): ``{"model": {"type": model_type,
    **model_config}, "tokenizer": "tokenizer.json", **extra}``. ``model_config`` is a dataclass (GPTConfig,
    BertConfig) or a dict; :func:`load_run` rebuilds the model from it. A resumed run must match it."""
    fields = asdict(model_config) if is_dataclass(model_config) else dict(model_config or {})
    return {"model": {"type": model_type, **fields}, "tokenizer": TOKENIZER, **extra}


# ---------------------------------------------------------------------------------------------
# Writing: refuse to replace another run by accident
# ---------------------------------------------------------------------------------------------


TRAINED_FILES = (CHECKPOINT, BEST_MODEL, LOG, RESULTS)
"""What makes a folder hold a run: something trained. A folder with only config.json and tokenizer.json is
the stub of a run that failed before its first step: the same command may start afresh there."""


def check_run_folder(out: str | os.PathLike, resume: bool, overwrite: bool, kind: str | None = None) -> None:
    """Refuse to write a run into ``out`` when that would lose or mix up another run: a folder holding a run is
    continued only with ``resume``, replaced only with ``overwrite`` and only by a run of the same ``kind``
    (``"gpt"``, ``"bert"``, ...: config.json's model type); ``out`` must be a folder minillm can write in."""
    out = pathlib.Path(out)
    _check_writable(out)
    held = _held_kind(out)
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise MinillmError(f"nothing to resume: {out / CHECKPOINT} does not exist")
        if kind is not None and held not in (None, kind):
            raise MinillmError(f"{out} holds a {held} run, not a {kind} run: it cannot be resumed as one")
        return
    trained = [name for name in TRAINED_FILES if (out / name).exists()]
    if trained and not overwrite:
        raise MinillmError(f"{out} already holds a run ({', '.join(trained)}): pass --resume to continue it, "
                           "--overwrite to replace it, or choose another --out")
    if trained and kind is not None and held not in (None, kind):
        raise MinillmError(f"{out} holds a {held} run; --overwrite replaces a run only with one of its kind "
                           f"({kind}): choose another --out, or delete {out} yourself")


def check_results_folder(out: str | os.PathLike) -> None:
    """For a chapter that writes a folder of several runs and its own results.json (chapters 03, 08, 09): ``out``
    must not be a run folder itself, or its results.json would land on that run's."""
    out = pathlib.Path(out)
    _check_writable(out)
    if (out / CONFIG).is_file():
        raise MinillmError(f"{out} holds a {_held_kind(out) or 'minillm'} run; this chapter writes a folder of runs "
                           "and results beside it: choose another --out")


def _held_kind(out: pathlib.Path) -> str | None:
    """The model type of the run in ``out``, or None when there is none (or its config.json is unreadable)."""
    try:
        return read_config(out).get("model", {}).get("type")
    except MinillmError:
        return None


def _check_writable(out: pathlib.Path) -> None:
    """``out`` is a folder, or can become one, that this process may write in: one sentence if not."""
    if out.exists() and not out.is_dir():
        raise MinillmError(f"--out {out} is a file, not a folder")
    existing = next(parent for parent in (out, *out.parents) if parent.exists())
    if not existing.is_dir():
        raise MinillmError(f"--out {out} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MinillmError(f"--out {out}: no permission to write in {existing}; choose another --out")


def clear_run_folder(out: str | os.PathLike) -> None:
    """Delete a run's files, and the temp files a killed write left beside them (and nothing else in the folder)."""
    for name in RUN_FILES:
        path = pathlib.Path(out) / name
        for leftover in [path, *temp_files_of(path)]:
            leftover.unlink(missing_ok=True)


def is_finished(out: str | os.PathLike) -> bool:
    """A run is finished once it wrote ``results.json`` (the last file a run writes)."""
    return (pathlib.Path(out) / RESULTS).is_file()


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_log(out: str | os.PathLike) -> list[dict]:
    """The eval lines of ``<out>/log.jsonl``."""
    path = pathlib.Path(out) / LOG
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.exists() else []


def read_config(folder: str | os.PathLike) -> dict:
    """``<folder>/config.json`` as a dict, or one clear sentence saying why it is not a run folder."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise MinillmError(f"{folder} is not a run folder (expected {CONFIG}, {TOKENIZER} and {BEST_MODEL})")
    if not (folder / CONFIG).is_file():
        raise MinillmError(f"{folder} has no {CONFIG}: is it a minillm run folder?")
    try:
        config = read_json(folder / CONFIG)
    except ValueError as error:
        raise MinillmError(f"{folder / CONFIG} is not valid JSON ({error})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model", {}), dict):
        raise MinillmError(f"{folder / CONFIG} is not a minillm run's config (expected an object with a 'model' object)")
    return config


def model_type(folder: str | os.PathLike) -> str | None:
    """The ``"type"`` of the model a run folder holds (``"gpt"``, ``"bert"``, ``"bert-encoder"``, ...)."""
    return read_config(folder).get("model", {}).get("type")


def weights_file(path: str | os.PathLike) -> pathlib.Path:
    """The weights to load from a run folder: the best (``model.safetensors``), or the latest checkpoint's
    when there is no best yet; a ``.safetensors`` path is taken as it is."""
    path = pathlib.Path(path)
    if path.suffix == ".safetensors":
        return path
    return next((path / name for name in (BEST_MODEL, CHECKPOINT) if (path / name).exists()), path / BEST_MODEL)


def _model_classes() -> dict[str, tuple[Callable, Callable]]:
    """model type -> (config from dict, model class)."""
    return {"gpt": (GPTConfig.from_dict, GPT), "bert": (BertConfig.from_dict, BertForPreTraining),
            "bert-encoder": (BertConfig.from_dict, Bert)}


def load_model(path: str | os.PathLike, expect: str | None = None, config: dict | None = None) -> nn.Module:
    """The model of a run folder (or of a ``.safetensors`` file in one), built from its config.json and
    loaded with :func:`weights_file`: a :class:`~minillm.gpt.GPT`, a :class:`~minillm.bert.BertForPreTraining`
    or a :class:`~minillm.bert.Bert` encoder. ``expect`` (a model type) refuses any other kind."""
    path = pathlib.Path(path)
    folder = path.parent if path.suffix == ".safetensors" else path
    model_info = dict((config if config is not None else read_config(folder)).get("model", {}))
    kind = model_info.pop("type", None)
    classes = _model_classes()
    if expect is not None and kind != expect:
        raise MinillmError(f"{folder} holds a {kind!r} model, not a {expect!r} one")
    if kind not in classes:
        raise MinillmError(f"{folder} holds a {kind!r} model; minillm can load {', '.join(classes)} runs")
    config_from_dict, model_class = classes[kind]
    try:
        model_config = config_from_dict(model_info, "it")
    except (TypeError, ValueError) as error:
        raise MinillmError(f"{folder / CONFIG} does not describe a {kind} model: {error}") from None
    weights = weights_file(path)
    if not weights.is_file():
        raise MinillmError(f"{folder} has no weights ({BEST_MODEL} or {CHECKPOINT})")
    _check_size(model_class, model_config, weights, folder)
    model = model_class(model_config)
    tensors, _ = read_safetensors(weights)
    if any(name.startswith("model/") for name in tensors):  # a training checkpoint: the model's part
        tensors = {name[len("model/"):]: t for name, t in tensors.items() if name.startswith("model/")}
    if kind == "gpt":
        tensors = gpt_state_from_before_0_2(tensors)
    load_model_state(model, tensors, str(weights))
    return model


def _check_size(model_class, model_config, weights: pathlib.Path, folder: pathlib.Path) -> None:
    """Before a model is built (and its memory asked for): does config.json describe a model the weights can
    fill? The model is laid out on the ``meta`` device (shapes, no memory) and its parameters counted against
    the numbers the weights file holds, read from the file's header. A damaged config.json that asks for a
    model a million times larger is then one sentence, not an out-of-memory crash."""
    try:
        with torch.device("meta"):
            skeleton = model_class(model_config)
    except (RuntimeError, OverflowError, MemoryError):  # sizes whose bytes overflow 64 bits
        raise MinillmError(f"{folder / CONFIG} describes a model too large to exist: it does not belong to "
                           f"{weights.name}") from None
    wanted = sum(parameter.numel() for parameter in skeleton.parameters())  # a tied weight counts once
    sizes = tensor_sizes(weights)
    held = sum(n for name, n in sizes.items() if name.startswith("model/")) or sum(sizes.values())
    if wanted > held:
        raise MinillmError(f"{folder / CONFIG} describes a model of {wanted:,} parameters, but {weights.name} holds "
                           f"{held:,} numbers: config.json does not belong to these weights")


def load_tokenizer(folder: str | os.PathLike, config: dict | None = None):
    """The tokenizer a run folder names in its config.json: minillm's own (``CharTokenizer``,
    ``BPETokenizer``) or a ``tokenizers`` library one (WordPiece, BPE), told apart by the file."""
    folder = pathlib.Path(folder)
    path = folder / (config if config is not None else read_config(folder)).get("tokenizer", TOKENIZER)
    if not path.is_file():
        raise MinillmError(f"{folder} has no tokenizer ({path.name})")
    try:
        saved = read_json(path)
    except ValueError as error:
        raise MinillmError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(saved, dict):
        raise MinillmError(f"{path} is not a tokenizer file (it holds a JSON {type(saved).__name__}, not an object)")
    if isinstance(saved, dict) and saved.get("type") in ("CharTokenizer", "BPETokenizer"):
        return load_minillm_tokenizer(path)
    return load_library_tokenizer(path)


class LoadedRun(NamedTuple):
    model: nn.Module
    tokenizer: Any
    config: dict  # config.json: the run's metadata and training configuration


def load_run(path: str | os.PathLike, device="cpu", expect: str | None = None) -> LoadedRun:
    """``(model, tokenizer, config)`` of a run folder (or a ``.safetensors`` file in one); the model on
    ``device`` in eval mode. ``expect``: the model type wanted (``"gpt"``, ``"bert"``), any other refused."""
    path = pathlib.Path(path)
    folder = path.parent if path.suffix == ".safetensors" else path
    config = read_config(folder)  # read once, for the model, the tokenizer and the caller
    model = load_model(path, expect=expect, config=config)
    tokenizer = load_tokenizer(folder, config)
    model_vocab = getattr(model.config, "vocab_size", None)
    if model_vocab is not None and tokenizer_size(tokenizer) > model_vocab:
        raise MinillmError(f"{folder / config.get('tokenizer', TOKENIZER)} has {tokenizer_size(tokenizer):,} tokens but "
                           f"the model knows {model_vocab:,}: the tokenizer is not the one this model was trained with")
    return LoadedRun(model.to(device).eval(), tokenizer, config)


# ---------------------------------------------------------------------------------------------
# "Use this pretrained BERT, the shipped one, or pretrain one now"
# ---------------------------------------------------------------------------------------------

SHIPPED = "shipped"
PRETRAIN = "pretrain"


def bert_run(choice: str, pretrain_into: pathlib.Path, pretrain: Callable[[pathlib.Path], Any]) -> pathlib.Path:
    """The BERT run folder a chapter starts from, as ``--bert`` says: ``"shipped"`` (the BERT minillm ships in
    data/pretrained, pretrained for hours on IMDB's reviews), ``"pretrain"`` (``pretrain(pretrain_into)``
    makes one, unless a finished run is already there: it is reused), or the path of a run folder."""
    if choice == SHIPPED:
        return datasets.shipped_bert_path()
    if choice == PRETRAIN:
        if not is_finished(pretrain_into):
            pretrain(pretrain_into)
        return pretrain_into
    folder = pathlib.Path(choice)
    if model_type(folder) != "bert":
        raise MinillmError(f"--bert {folder} is not a BERT run (its model is {model_type(folder)!r}): give a "
                           "'pretrain bert' / chapter 07 run folder, 'shipped' or 'pretrain'")
    return folder


# GPT runs written before the GPT block took GPT-2's names (minillm 0.1: DecoderBlock's names)
_OLD_GPT_NAMES = {"norm1.": "ln_1.", "norm3.": "ln_2.", "self_attn.out_proj.": "attn.c_proj.",
                  "feed_forward.linear1.": "mlp.c_fc.", "feed_forward.linear2.": "mlp.c_proj."}


def gpt_state_from_before_0_2(tensors: dict) -> dict:
    """A GPT state dict with minillm 0.1's block names (``norm1``, ``self_attn.{q,k,v}_proj``, ...) under today's
    (``ln_1``, ``attn.c_attn``, ...): the separate q, k, v projections stacked into ``c_attn``. Other states pass."""
    if not any(".self_attn.q_proj." in name for name in tensors):
        return tensors
    renamed = {}
    for name, tensor in tensors.items():
        for old, new in _OLD_GPT_NAMES.items():
            name = name.replace(f".{old}", f".{new}")
        renamed[name] = tensor
    for name in [n for n in renamed if ".self_attn.q_proj." in n]:  # blocks.{i}.self_attn.q_proj.{weight,bias}
        prefix, kind = name.split(".self_attn.q_proj.")
        parts = [renamed.pop(f"{prefix}.self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
        renamed[f"{prefix}.attn.c_attn.{kind}"] = torch.cat(parts)  # (3C, C) or (3C,): q | k | v
    return renamed
