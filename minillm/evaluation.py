"""Evaluating a finished run folder on its held-out data: the numbers ``python -m minillm evaluate`` writes.

Every kind of run the other commands write is scored on data it never trained on, rebuilt from the run's own
``config.json`` (the corpus, the split fraction, the seed), with the run's own tokenizer:

- a **GPT** (``pretrain gpt``, chapter 06): the mean next-token cross-entropy over *every* block of the held-out
  split, :math:`\\bar\\ell = -\\frac1N\\sum_t \\ln p(x_{t+1} \\mid x_{\\le t})` in nats/token, its perplexity
  :math:`e^{\\bar\\ell}`, and bits per character :math:`\\frac{N \\bar\\ell}{C \\ln 2}` (C: characters the N predicted
  tokens spell; for a character-level model bits/char = bits/token), the unit compression papers compare in;
- a **BERT** (``pretrain bert``, chapter 07): masked-LM loss and accuracy, next-sentence accuracy (the held-out
  pairs, masked with the run's seed);
- a **classifier** (``finetune``): accuracy, precision, recall, F1 of the positive class and macro-F1 on the split
  it reports on (SST-2 dev, or IMDB's test reviews), with the confusion matrix saved as a plot;
- the chapter 05 **Transformer** (number words -> digits): exact match and corpus BLEU-4 (Papineni et al., 2002)
  of greedy and beam-search decoding on the held-out test numbers.

:func:`evaluate_run` returns the scores and writes them to ``<run>/eval.json`` (atomically: an interrupted
evaluation leaves the previous one).
"""

from __future__ import annotations

import math
import os
import pathlib
import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from minillm import MinillmError, data, datasets, metrics, plots, runs
from minillm.files import shown_path, write_json
from minillm.finetune import ClassificationTask, encode_for_bert, predict
from minillm.inference_runs import CLASSIFIER, TRANSFORMER, classifier_shape, load_for_inference
from minillm.number_words import evaluate, number_dataset
from minillm.tokenization import special_token_ids

EVAL = "eval.json"
CONFUSION_PLOT = "confusion_matrix.png"


# ---------------------------------------------------------------------------------------------
# A GPT: held-out cross-entropy, perplexity, bits per character
# ---------------------------------------------------------------------------------------------


def gpt_held_out_text(folder: pathlib.Path, config: dict) -> str:
    """The validation text of a GPT run: the last ``val_fraction`` of the corpus its config names
    (:func:`minillm.datasets.text_splits`, the same cut the run trained with; no name: Tiny Shakespeare, the
    default of ``pretrain gpt``)."""
    train_config = config.get("train_config") or {}
    corpus = config.get("data") or train_config.get("data") or str(datasets.tiny_shakespeare_path())
    if corpus == "imdb":
        raise MinillmError(f"{folder} is a GPT trained on IMDB's reviews (chapter 08); evaluate scores GPT runs "
                           "trained on a text file (pretrain gpt, chapter 06)")
    path = pathlib.Path(corpus)
    if not path.is_file():
        raise MinillmError(f"{folder}'s corpus {path} is not there any more: evaluate needs it for the held-out split")
    return datasets.text_splits(path, float(train_config.get("val_fraction", 0.1)))[1]


@torch.no_grad()
def language_model_scores(model, tokenizer, text: str, batch_size: int = 32, device="cpu", limit: int = 0,
                          progress: bool = False) -> dict[str, float]:
    """Mean next-token cross-entropy of ``model`` over every non-overlapping block of ``text``
    (:func:`minillm.data.iter_lm_blocks`), with perplexity, bits/token and bits/character. ``limit`` keeps
    the first N blocks (0: all)."""
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    block = model.config.block_size
    if len(ids) < block + 1:
        raise MinillmError(f"the held-out split has {len(ids):,} tokens, fewer than one block of {block + 1}")
    if limit:
        ids = ids[: limit * block + 1]
    total_nats, tokens, characters = 0.0, 0, 0
    n_blocks = (len(ids) - 1) // block
    batches = data.iter_lm_blocks(ids, block, batch_size, device)
    for x, y in tqdm(batches, total=math.ceil(n_blocks / batch_size), desc="held-out blocks", disable=not progress):
        _, loss = model(x, y)  # the mean over the batch's B*T predictions
        total_nats += loss.item() * y.numel()
        tokens += y.numel()
        characters += sum(len(tokenizer.decode(row)) for row in y.tolist())
    mean = total_nats / tokens
    return {"loss": mean, "perplexity": metrics.perplexity(mean), "bits_per_token": mean / math.log(2),
            "bits_per_char": total_nats / characters / math.log(2), "tokens": tokens, "characters": characters}


# ---------------------------------------------------------------------------------------------
# A classifier: accuracy, precision, recall, F1, confusion matrix
# ---------------------------------------------------------------------------------------------


def classifier_report_split(config: dict, data_name: str = "auto", limit: int = 0) -> tuple[str, list[tuple[str, int]]]:
    """The (name, examples) a fine-tuned classifier reports on: SST-2 dev (872 sentences) or IMDB's test reviews,
    as its ``--data`` was, unless ``data_name`` says otherwise; ``limit`` keeps the first N."""
    train_config = config.get("train_config") or {}
    name = train_config.get("data", "sst2") if data_name == "auto" else data_name
    if name == "imdb":
        splits = datasets.imdb_splits(0.1, seed=0, test_limit=limit, folder=train_config.get("imdb_folder") or None)
        return splits.name, splits.test
    if name != "sst2":
        raise MinillmError(f"a classifier is scored on sst2 or imdb, not {name!r}")
    test = list(zip(*datasets.read_sst2("dev")))
    return "SST-2 dev", test[:limit] if limit else test


def classifier_scores(model, tokenizer, examples: list[tuple[str, int]], max_length: int = 128, batch_size: int = 64,
                      device="cpu") -> dict[str, Any]:
    """Accuracy, precision, recall, F1 (positive class 1), macro-F1 and the confusion matrix of ``model``'s argmax
    over ``examples`` (text, label); texts are cut to ``max_length`` tokens (:func:`minillm.finetune.head_and_tail`)."""
    _, max_len, prompt_tokens = classifier_shape(model)
    length = min(max_length, max_len - prompt_tokens)
    encoded = encode_for_bert(tokenizer, examples, length)
    task = ClassificationTask(encoded[:2], encoded[:2], special_token_ids(tokenizer).pad)  # only its batching is used
    predicted, true = predict(model, task, encoded, device, batch_size=batch_size, precision="fp32")
    scores = metrics.classification_metrics(true, predicted)
    return {**scores, "confusion_matrix": metrics.confusion_matrix(true, predicted, num_classes=2).tolist(),
            "examples": len(true)}


# ---------------------------------------------------------------------------------------------
# Any run folder
# ---------------------------------------------------------------------------------------------


def evaluate_run(folder: str | pathlib.Path, data_name: str = "auto", limit: int = 0, batch_size: int = 64,
                 device="cpu", progress: bool = False, log=print, out: str | pathlib.Path | None = None) -> dict[str, Any]:
    """Score the run in ``folder`` on its held-out data (see the module's docstring) and write ``eval.json``
    (and, for a classifier, ``confusion_matrix.png``) into ``out`` (default: the run folder itself)."""
    folder = pathlib.Path(folder)
    out = pathlib.Path(out) if out else folder
    if out != folder:
        runs.check_results_folder(out)  # a folder of results, not another run's folder
    elif folder.is_dir() and not os.access(folder, os.W_OK):
        raise MinillmError(f"no permission to write {EVAL} into {folder}: pass --out")
    kind = runs.model_type(folder)
    if kind not in ("gpt", "bert", CLASSIFIER, TRANSFORMER):
        raise MinillmError(f"evaluate scores gpt, bert, {CLASSIFIER} and {TRANSFORMER} runs; {folder} holds a "
                           f"{kind!r} model (chapter 10 probes a bert-encoder's sentence embeddings instead)")
    start = time.perf_counter()
    if kind == TRANSFORMER:
        scores = transformer_scores(folder, limit=limit, batch_size=batch_size, device=device)
        log(f"{folder.name}: test exact match {scores['greedy']['exact_match']:.1%} greedy, "
            f"{scores['beam']['exact_match']:.1%} beam; BLEU {scores['greedy']['bleu']:.2f} / {scores['beam']['bleu']:.2f}")
    else:
        model, tokenizer, config = load_for_inference(folder, device)
        if kind == "gpt":
            scores = {"split": "held-out text", **language_model_scores(
                model, tokenizer, gpt_held_out_text(folder, config), batch_size, device, limit, progress)}
            log(f"{folder.name}: held-out loss {scores['loss']:.4f} nats/token, perplexity {scores['perplexity']:.2f}, "
                f"{scores['bits_per_char']:.3f} bits/char over {scores['tokens']:,} tokens")
        elif kind == CLASSIFIER:
            split, examples = classifier_report_split(config, data_name, limit)
            max_length = int((config.get("train_config") or {}).get("max_length", 128))
            scores = {"split": split, **classifier_scores(model, tokenizer, examples, max_length, batch_size, device)}
            plots.plot_confusion_matrix(scores["confusion_matrix"], ["negative", "positive"], out / CONFUSION_PLOT,
                                        title=f"{folder.name} on {split}")
            log(f"{folder.name} on {split} ({scores['examples']:,}): accuracy {scores['accuracy']:.1%}, precision "
                f"{scores['precision']:.1%}, recall {scores['recall']:.1%}, F1 {scores['f1']:.3f}; "
                f"confusion matrix in {shown_path(out / CONFUSION_PLOT)}")
        else:  # a pretrained BERT
            scores = {"split": "held-out sentence pairs", **bert_scores(folder, model, tokenizer, config, batch_size, device,
                                                                        limit)}
            log(f"{folder.name}: masked-LM accuracy {scores['mlm_accuracy']:.1%} (loss {scores['mlm_loss']:.3f}), "
                f"next-sentence accuracy {scores['nsp_accuracy']:.1%}")
    result = {"run": folder.name, "type": kind, **scores, "seconds": time.perf_counter() - start}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / EVAL, result)
    return result


def bert_scores(folder: pathlib.Path, model, tokenizer, config: dict, batch_size: int, device, limit: int = 0
                ) -> dict[str, float]:
    """Masked-LM and next-sentence scores of a pretrained BERT on its held-out documents (the first ``limit``),
    rebuilt as its run built them (:func:`minillm.bert_pretraining.bert_documents`) and masked with its seed."""
    from minillm.bert_pretraining import BertPretrainConfig, bert_documents, bert_task, evaluate_bert

    fields = {k: v for k, v in (config.get("train_config") or {}).items() if k in BertPretrainConfig.__dataclass_fields__}
    try:
        pretrain_config = BertPretrainConfig(**{**fields, "out": str(folder)})
    except (TypeError, ValueError) as error:
        raise MinillmError(f"{folder / runs.CONFIG} does not describe a BERT pretraining run: {error}") from None
    _, val_docs, _, _ = bert_documents(pretrain_config)
    val_docs = val_docs[: max(limit, 2)] if limit else val_docs
    task = bert_task(pretrain_config, tokenizer, val_docs[:2], val_docs)  # the training pairs are not needed
    return evaluate_bert(model, task, device, batch_size)


def transformer_scores(folder: pathlib.Path, beam_size: int = 4, limit: int = 0, batch_size: int = 64,
                       device="cpu") -> dict[str, Any]:
    """Exact match and corpus BLEU of chapter 05's Transformer on its held-out test numbers, greedy and with
    beam search (:func:`minillm.number_words.evaluate`); the numbers are drawn again from the run's seed."""
    model, (src_vocab, tgt_vocab), config = load_for_inference(folder, device)
    number_data = {k: v for k, v in config.get("data", {}).items() if k != "task"}
    try:
        test = number_dataset(**number_data).test
    except (TypeError, ValueError) as error:
        raise MinillmError(f"{folder / runs.CONFIG} does not say which numbers the Transformer was tested on: {error}") from None
    test = test[:limit] if limit else test
    greedy = evaluate(model, test, src_vocab, tgt_vocab, batch_size=batch_size, device=device)
    beam = evaluate(model, test, src_vocab, tgt_vocab, beam_size=beam_size, batch_size=batch_size, device=device)
    return {"split": "held-out test numbers", "examples": len(test),
            "greedy": {"exact_match": greedy.exact_match, "bleu": greedy.bleu},
            "beam": {"exact_match": beam.exact_match, "bleu": beam.bleu, "beam_size": beam_size}}
