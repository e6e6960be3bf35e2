"""Fine-tuning a pretrained model for classification: the classifier heads, the task, and the recipe.

- :class:`GPTForSequenceClassification`: a GPT body and a linear classifier on the hidden state of
  each row's last real token (the only position that has seen the whole sentence, under the causal
  mask). BERT's classifier is :class:`minillm.bert.BertForSequenceClassification` (mean of the last
  hidden states, or the pooled [CLS] vector).
- :class:`ClassificationTask` turns labelled token sequences into batches for the shared loop
  (:class:`minillm.train.Trainer`); :func:`encode_for_bert` / :func:`encode_for_gpt` make those token
  sequences (:func:`head_and_tail` truncation), :func:`encoded_splits` for a whole run's tokenizer.
- :class:`FinetuneConfig` is the recipe (enough steps for any label budget, a small learning rate with
  warmup, ten evaluations, the most accurate model kept), :func:`finetune` runs it and scores the result
  on a test split, with the collapse guard (:func:`predicts_one_class`).
- :func:`classifier_candidates`: a pretrained run's classifier and its random-init twin, the comparison
  chapter 08 makes.

Training fewer weights (freezing, adapters, LoRA, prompt tuning) is :mod:`minillm.peft`; the data sets and
their splits are :mod:`minillm.datasets`; ``python -m minillm finetune`` is :mod:`minillm.commands.finetune`.
"""

from __future__ import annotations

import math
import typing
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from minillm import MinillmError, data, datasets, metrics, runs
from minillm.bert import BertForSequenceClassification, ClassificationOutput, at_least_fp32
from minillm.device import autocast
from minillm.gpt import GPT, GPTConfig
from minillm.tokenization import special_token_ids
from minillm.train import ExampleDraws, Task, TrainConfig, Trainer

# ---------------------------------------------------------------------------------------------
# A GPT classifier
# ---------------------------------------------------------------------------------------------


class GPTForSequenceClassification(nn.Module):
    """:class:`~minillm.gpt.GPT`, dropout, and a linear classifier on the last real token's hidden state.

    A GPT position sees only itself and the tokens before it, so the one position that has read the
    whole sentence is the last one (Radford et al., 2018, section 3.3, classify from the final token;
    Hugging Face's ``GPT2ForSequenceClassification`` does the same)::

        ids (B, T) -> GPT.hidden_states -> h (B, T, C) -> h[b, last_b] (B, C) -> dropout -> linear -> (B, num_labels)

    ``last_b`` is the index of row b's last real token. Rows must be padded **on the right**: then,
    under the causal mask, no real token ever attends to padding, and a row's logits are the same
    padded or not (the tests check it), with no padding mask needed. Padding is given by
    ``attention_mask`` (B, T; 1 = real token), or else by ``pad_id`` (tokens equal to it are padding),
    or else there is none. ``lm_head`` stays in ``self.gpt`` (it is tied to the token embedding)
    but is not used.
    """

    def __init__(self, config: GPTConfig, num_labels: int = 2, pad_id: int | None = None):
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"num_labels must be at least 2, got {num_labels}")
        if pad_id is not None and not 0 <= pad_id < config.vocab_size:
            raise ValueError(f"pad_id must be a vocabulary id (0..{config.vocab_size - 1}), got {pad_id}")
        self.config, self.num_labels, self.pad_id = config, num_labels, pad_id
        self.gpt = GPT(config)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.n_embd, num_labels)
        nn.init.normal_(self.classifier.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    @classmethod
    def from_pretrained_gpt(cls, gpt: GPT, num_labels: int = 2, pad_id: int | None = None) -> "GPTForSequenceClassification":
        """A copy of a pretrained (language-model) ``gpt``'s weights under a new, freshly initialized classifier."""
        model = cls(gpt.config, num_labels, pad_id)
        model.gpt.load_state_dict(gpt.state_dict())
        weight = gpt.wte.weight
        return model.to(device=weight.device, dtype=weight.dtype)

    def last_token_index(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) the index of each row's last real token (see the class docstring for what is real).

        With an ``attention_mask`` it checks that the padding is on the right and that no row is
        empty; with ``pad_id`` only that no row is empty (a pad id may also occur as a real token,
        e.g. GPT-2's end-of-text used as padding, so holes are allowed there). The checks are
        skipped inside ``torch.compile`` (they need the values on the host)."""
        batch, length = input_ids.shape
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(attention_mask.shape)}")
            real = attention_mask != 0  # (B, T)
        elif self.pad_id is not None:
            real = input_ids != self.pad_id  # (B, T)
        else:
            return torch.full((batch,), length - 1, dtype=torch.long, device=input_ids.device)
        if not torch.compiler.is_compiling():  # the checks read the GPU's answer: a graph break under compile
            self._check_padding(real, right_padded=attention_mask is not None)
        positions = torch.arange(length, device=input_ids.device)  # (T,)
        return (positions * real).argmax(dim=1)  # (B,): the largest index of a real token

    @staticmethod
    def _check_padding(real: torch.Tensor, right_padded: bool) -> None:
        empty = ~real.any(dim=1)  # (B,)
        left_padded = (real[:, 1:] & ~real[:, :-1]).any(dim=1) if right_padded else empty  # a 0 then a 1
        if bool((empty | left_padded).any()):  # one host sync for both checks
            if bool(empty.any()):
                raise ValueError(f"rows {empty.nonzero().flatten().tolist()} have no real token")
            raise ValueError("GPTForSequenceClassification needs rows padded on the right (attention_mask 1...1 0...0); "
                             f"rows {left_padded.nonzero().flatten().tolist()} have a real token after padding")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *, prompt_embeddings: torch.Tensor | None = None) -> ClassificationOutput:
        """Logits (B, num_labels) and, with ``labels`` (B,), the mean cross-entropy.

        ``prompt_embeddings`` (P, C) or (B, P, C) are placed before the tokens (the soft prompt of
        :func:`apply_prompt_tuning`, see :meth:`GPT.hidden_states`); the last real token then sits
        P positions further on."""
        hidden = self.gpt.hidden_states(input_ids, prefix_embeddings=prompt_embeddings)  # (B, P + T, C)
        last = self.last_token_index(input_ids, attention_mask)  # (B,)
        if prompt_embeddings is not None:
            last = last + prompt_embeddings.shape[-2]  # the tokens sit after the P prompt vectors
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        summary = hidden[rows, last]  # (B, C): the hidden state of each row's last real token
        logits = self.classifier(self.dropout(summary))  # (B, num_labels)
        loss = F.cross_entropy(at_least_fp32(logits), labels) if labels is not None else None
        return ClassificationOutput(logits, loss)


# ---------------------------------------------------------------------------------------------
# Fine-tuning on a labelled data set with the shared loop
# ---------------------------------------------------------------------------------------------


@dataclass
class ClassificationBatch:
    input_ids: torch.Tensor  # (B, T), padded on the right
    attention_mask: torch.Tensor  # (B, T), 1 = real token
    labels: torch.Tensor  # (B,)

    def to(self, device) -> "ClassificationBatch":
        return ClassificationBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


class ClassificationTask(Task):
    """Labelled token sequences as batches for :class:`~minillm.train.Trainer`.

    ``train`` and ``val`` are lists of ``(token_ids, label)``. A training batch is a random draw
    (with replacement, as every minillm task draws) of examples of similar length
    (:class:`~minillm.train.LengthBuckets`; ``length_grouping=0``: uniform), padded on the right to its
    longest; under data parallelism every process draws the whole global batch and keeps its rows.
    Evaluation batches go in length order (a mean does not care, padding does). The loss is the mean
    cross-entropy over the batch's examples, -1/B Σ_b log softmax(logits_b)_{y_b}, and the
    validation loss is weighted by examples, not tokens (``eval_weight``).
    """

    loss_unit = "nats/example"
    counts_correct = True

    def __init__(self, train: Sequence[tuple[Sequence[int], int]], val: Sequence[tuple[Sequence[int], int]],
                 pad_id: int, length_grouping: int = 16, seed: int = 0):
        if not train or not val:
            raise MinillmError("fine-tuning needs at least one training and one validation example")
        empty = [i for i, (ids, _) in enumerate(list(train) + list(val)) if len(ids) == 0]
        if empty:
            raise MinillmError(f"{len(empty)} example(s) have no tokens: encode at least [CLS] for each")
        classes = sorted({label for _, label in train})
        if len(classes) < 2:  # it could only learn to answer that label: a majority-class model, silently
            raise MinillmError(f"all {len(train):,} training examples have label {classes[0]}: a classifier needs "
                               "examples of at least two classes; check the data file (or --labelled)")
        self.train, self.val, self.pad_id = list(train), list(val), pad_id
        self.draw = ExampleDraws([len(ids) for ids, _ in self.train], length_grouping, seed)

    def batch(self, examples: Sequence[tuple[Sequence[int], int]]) -> ClassificationBatch:
        padded = data.pad_batch([ids for ids, _ in examples], pad_id=self.pad_id)
        labels = torch.tensor([label for _, label in examples], dtype=torch.long)
        return ClassificationBatch(padded["input_ids"], padded["attention_mask"], labels)

    def sample_batch(self, batch_size: int, generator: torch.Generator, device, rank: int = 0, world_size: int = 1):
        indices = self.draw(batch_size * world_size, generator)
        mine = indices[rank * batch_size:(rank + 1) * batch_size]  # this process's share of the global batch
        return self.batch([self.train[i] for i in mine]).to(device)

    @staticmethod
    def loss(model, batch: ClassificationBatch) -> torch.Tensor:
        return model(batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss

    @staticmethod
    def evaluate_batch(model, batch: ClassificationBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean loss and the number of right predictions (argmax of the logits), from one forward pass."""
        out = model(batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
        return out.loss, (out.logits.argmax(-1) == batch.labels).sum()

    def eval_batches(self, batch_size: int, device, max_batches: int | None = None,
                     examples: Sequence[tuple[Sequence[int], int]] | None = None):
        examples = sorted(self.val if examples is None else examples, key=lambda example: len(example[0]))
        starts = range(0, len(examples), batch_size)
        for start in list(starts)[:max_batches]:
            yield self.batch(examples[start:start + batch_size]).to(device)

    @staticmethod
    def batch_tokens(batch: ClassificationBatch) -> int:
        return int(batch.attention_mask.sum())

    @staticmethod
    def eval_weight(batch: ClassificationBatch) -> int:
        return len(batch.labels)

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, math.ceil(len(self.train) / batch_size))


@torch.no_grad()
def predict(model, task: ClassificationTask, examples, device, batch_size: int = 256,
            precision: str = "auto") -> tuple[list[int], list[int]]:
    """(predicted labels, true labels) of ``examples`` (argmax of the logits), in eval mode, under
    :func:`~minillm.device.autocast` with ``precision``."""
    was_training = model.training
    model.eval()
    predicted, true = [], []
    for batch in task.eval_batches(batch_size, device, examples=examples):
        with autocast(torch.device(device) if isinstance(device, str) else device, precision=precision):
            logits = model(batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, num_labels)
        predicted += logits.argmax(-1).tolist()
        true += batch.labels.tolist()
    model.train(was_training)
    return predicted, true


def head_and_tail(ids: Sequence[int], max_tokens: int) -> list[int]:
    """At most ``max_tokens`` of ``ids``: all of them if they fit, else the first half and the last half of the
    budget (Sun et al., 2019, "How to Fine-Tune BERT for Text Classification?", section 5.3.1: a long review's
    verdict is as often at its end as at its start, and head + tail beat the head alone on IMDB)."""
    if len(ids) <= max_tokens:
        return list(ids)
    head = (max_tokens + 1) // 2
    return [*ids[:head], *ids[len(ids) - (max_tokens - head):]]


def encode_for_bert(tokenizer, texts_and_labels, max_length: int) -> list[tuple[list[int], int]]:
    """``[CLS] text [SEP]`` token ids with each label; a text too long for ``max_length`` keeps its head
    and its tail (:func:`head_and_tail`)."""
    special = special_token_ids(tokenizer)
    encodings = tokenizer.encode_batch([text for text, _ in texts_and_labels])
    return [([special.cls, *head_and_tail(encoding.ids, max_length - 2), special.sep], label)
            for encoding, (_, label) in zip(encodings, texts_and_labels)]


def encode_for_gpt(tokenizer, texts_and_labels, max_length: int, end_id: int) -> list[tuple[list[int], int]]:
    """``text [end]`` token ids (a text too long keeps its head and tail, :func:`head_and_tail`): a causal model's
    last position has read the whole text, and the end token makes that position the same kind of token in
    every example."""
    encodings = tokenizer.encode_batch([text for text, _ in texts_and_labels])
    return [([*head_and_tail(encoding.ids, max_length - 1), end_id], label)
            for encoding, (_, label) in zip(encodings, texts_and_labels)]


def classifier_candidates(family: str, run, pooling: Literal["mean", "cls"] = "mean") -> dict[str, "typing.Callable[[], nn.Module]"]:
    """The two classifiers pretraining's gain compares, as zero-argument builders (call them after seeding):
    ``"<family>, pretrained"`` (the run's weights under a fresh classifier) and ``"<family>, random init"``
    (the same shape and tokenizer, every weight fresh). ``pooling`` is a BERT's (a GPT reads its last token)."""
    pretrained, tokenizer, _ = runs.load_run(run)
    if isinstance(pretrained, GPT):
        pad = special_token_ids(tokenizer).pad
        return {f"{family}, pretrained": lambda: GPTForSequenceClassification.from_pretrained_gpt(pretrained, pad_id=pad),
                f"{family}, random init": lambda: GPTForSequenceClassification(pretrained.config, pad_id=pad)}
    return {f"{family}, pretrained": lambda: BertForSequenceClassification.from_pretraining(pretrained, pooling=pooling),
            f"{family}, random init": lambda: BertForSequenceClassification(pretrained.config, pooling=pooling)}


def encoded_splits(run, splits: datasets.LabelledSplits, max_length: int) -> tuple[datasets.LabelledSplits, int]:
    """``splits`` with every text turned into the token ids the run's model reads (BERT: ``[CLS] text [SEP]``,
    GPT: ``text [SEP]``), at most ``max_length`` or the model's positions, and the padding id. Sample a label
    budget from the result with :func:`minillm.datasets.with_labelled`."""
    model, tokenizer, _ = runs.load_run(run)
    special = special_token_ids(tokenizer)
    if isinstance(model, GPT):
        length = min(max_length, model.config.block_size)
        encode = lambda examples: encode_for_gpt(tokenizer, examples, length, special.sep)  # noqa: E731
    else:
        length = min(max_length, model.config.max_len)
        encode = lambda examples: encode_for_bert(tokenizer, examples, length)  # noqa: E731
    return replace(splits, train=encode(splits.train), val=encode(splits.val), test=encode(splits.test)), special.pad


@dataclass
class FinetuneConfig(TrainConfig):
    """Fine-tune a classifier with the shared loop: enough steps for any label budget, the held-out split
    evaluated ten times, the most accurate model kept, and a warning if it predicts one class only."""

    out: str = field(default="runs/finetune", metadata={"help": "run folder: checkpoints, log.jsonl, loss.png, results.json"})
    epochs: int = field(default=2, metadata={"help": "passes over the training examples (the step budget, with --min-steps)"})
    min_steps: int = field(default=600, metadata={"help": "at least this many optimizer steps, however few the labels: 250 "
                                                          "examples are 8 steps an epoch, too few to learn from"})
    evaluations: int = field(default=10, metadata={"help": "evaluations of the whole held-out split over the run (the best "
                                                           "one's weights are kept)"})
    batch_size: int = field(default=32, metadata={"help": "examples per micro-batch, per process"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate (small: the pretrained weights need only nudging)"})
    min_lr: float = field(default=3e-5, metadata={"help": "learning rate at the end of the cosine decay"})
    warmup_fraction: float = field(default=0.1, metadata={"help": "fraction of the steps spent warming the learning rate up"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW decoupled weight decay (BERT's)"})
    beta2: float = field(default=0.999, metadata={"help": "AdamW beta2 (BERT's)"})
    patience: int = field(default=0, metadata={"help": "stop after N evaluations without a better held-out score (0: never)"})
    select_by: Literal["loss", "accuracy"] = field(default="accuracy", metadata={
        "help": "what picks the best evaluation: held-out accuracy (ties broken by the loss), or the loss alone"})
    pooling: Literal["mean", "cls"] = field(default="mean", metadata={
        "help": "what a BERT classifier reads: the mean of the last hidden states, or BERT's pooled [CLS] (trained only "
                "for next-sentence prediction: with few labels it starts the pretrained model ~9 points lower)"})
    max_length: int = field(default=128, metadata={"help": "tokens per example, at most the model's positions; longer texts are "
                                                           "truncated (SST-2's sentences fit in 64, IMDB's reviews average ~300)"})
    val_fraction: float = field(default=0.1, metadata={"help": "training examples drawn for the held-out split (SST-2: "
                                                               "~1 in 9 survives the leak check, ~740 sentences)"})
    sst2_limit: int = field(default=0, metadata={"help": "use only the first N SST-2 training phrases (0: all)"})
    labelled: int = field(default=0, metadata={"help": "fine-tune on a seeded, stratified random N of the training examples "
                                                       "(0: all), the held-out split kept whole: the low-resource setting"})
    QUICK = {"epochs": 2, "min_steps": 20, "batch_size": 16, "sst2_limit": 1500, "progress": False, "max_length": 32}

    def validate(self):
        super().validate()
        if self.epochs < 1 or self.evaluations < 1 or self.min_steps < 0:
            raise ValueError(f"--epochs and --evaluations must be at least 1 and --min-steps at least 0, got "
                             f"{self.epochs}, {self.evaluations} and {self.min_steps}")
        if not 0.0 <= self.warmup_fraction < 1.0 or not 0.0 < self.val_fraction < 1.0:
            raise ValueError("--warmup-fraction must be in [0, 1) and --val-fraction in (0, 1)")
        if self.labelled < 0:
            raise ValueError(f"--labelled must be 0 (all) or a number of examples, got {self.labelled}")
        if self.max_length < 3:
            raise ValueError(f"--max-length must be at least 3, got {self.max_length}")

    def loop_config(self, steps_per_epoch: int, val_examples: int) -> "FinetuneConfig":
        """The loop's settings: ``max(epochs x steps_per_epoch, min_steps)`` steps, ``evaluations`` evenly
        spaced evaluations of the whole validation split, and warmup in steps."""
        max_iters = max(self.epochs * steps_per_epoch, self.min_steps)
        return replace(self, max_iters=max_iters, eval_interval=max(1, math.ceil(max_iters / self.evaluations)),
                       lr_decay_iters=0, eval_iters=math.ceil(val_examples / self.batch_size),
                       warmup_iters=int(self.warmup_fraction * max_iters))


def predicts_one_class(predicted: Sequence[int], true: Sequence[int], share: float = 0.95) -> bool:
    """The collapse guard: does a classifier give one label to at least ``share`` of the examples while
    the true labels are more mixed than that? Such a model has learned the label prior, not the task:
    a recipe that ends there (too few steps, a rate too high or too low) is broken, whatever its accuracy."""
    if not predicted:
        return False
    top = max(Counter(predicted).values()) / len(predicted)
    return top >= share and max(Counter(true).values()) / len(true) < share


def finetune(model, task: ClassificationTask, config: FinetuneConfig, test_examples, run_info: dict | None = None,
             log=print, prepare=None) -> dict:
    """Train ``model`` on ``task`` with the shared :class:`~minillm.train.Trainer` (the best evaluation's weights
    are restored at the end) and score it on ``test_examples``: accuracy, precision, recall, F1 (positive
    class 1), the confusion matrix, and ``collapsed`` (:func:`predicts_one_class`, with a warning)."""
    loop = config.loop_config(task.steps_per_epoch(config.batch_size), len(task.val))
    trainer = Trainer(model, task, loop, run_info, log=log)
    result = trainer.fit(prepare=prepare)
    predicted, true = predict(model, task, test_examples, trainer.device, precision=config.precision)
    scores = metrics.classification_metrics(true, predicted)
    matrix = metrics.confusion_matrix(true, predicted, num_classes=2)
    collapsed = predicts_one_class(predicted, true)
    if collapsed:
        log(f"warning: the classifier in {config.out} gives one label to {max(Counter(predicted).values()):,} of "
            f"{len(predicted):,} test examples: it learned the label prior, not the task (try more --min-steps or "
            "another --lr)")
    return {**scores, "confusion_matrix": matrix.tolist(), "steps": result.steps, "best_step": result.best_step,
            "val_loss": result.val_loss, "val_accuracy": result.val_accuracy, "train_seconds": result.seconds,
            "stopped_early": result.stopped_early, "collapsed": collapsed}
