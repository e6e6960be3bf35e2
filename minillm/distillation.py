"""Knowledge distillation: a small student classifier trained on a large teacher's softened predictions.

Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network". A trained teacher's
probabilities say more than its labels: "this review is 70% positive" carries how sure it is, and which
wrong answers are nearly right. Softened by a temperature T > 1 (``softmax(logits / T)``) those
probabilities spread out, and a student trained to match them learns the teacher's function, not only
its argmax::

    loss = alpha * T² * KL(softmax(v / T) || softmax(z / T)) + (1 - alpha) * CE(z, y)

with z the student's logits, v the teacher's, y the true labels (:func:`distillation_loss`).

- :func:`soft_target_loss`, :func:`distillation_loss`: the two terms and their mix;
- :func:`student_from_teacher`: a shallower copy of a :class:`~minillm.bert.BertForSequenceClassification`,
  initialized from one teacher layer out of two (DistilBERT's recipe) or at random;
- :func:`teacher_logits`: the teacher's logits for every training example, computed once;
- :class:`DistillationTask`: those logits looked up per batch, for the shared :class:`~minillm.train.Trainer`;
  evaluation stays hard-label loss and accuracy, like :class:`~minillm.finetune.ClassificationTask`, so that
  model selection compares with fine-tuning on labels alone;
- :class:`DistillationConfig` and :func:`distil`: the recipe, scored as :func:`minillm.finetune.finetune` scores,
  plus the student's agreement with its teacher; :func:`footprint`: parameters, bytes and CPU latency.

The same student trained on the labels alone is :func:`minillm.finetune.finetune` with a
:class:`~minillm.finetune.ClassificationTask` (or ``alpha=0`` here: the same loss, tested).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from minillm import MinillmError, data
from minillm.bert import BertForSequenceClassification, at_least_fp32
from minillm.device import autocast
from minillm.finetune import ClassificationBatch, ClassificationTask, FinetuneConfig, finetune, predict
from minillm.peft import WithAdapter, count_parameters, lora_layers, merge_lora
from minillm.timing import time_callable

# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """The soft-target term, T² times the mean over the batch of KL(p || q)::

        p = softmax(v / T)   (the teacher's softened distribution)
        q = softmax(z / T)   (the student's)
        L_soft = T² · 1/B Σ_b Σ_i p_bi (log p_bi - log q_bi)                (B, C) logits -> scalar

    KL rather than Hinton's cross-entropy H(p, q): they differ by the teacher's entropy, a constant for the
    student (the same gradient), and KL is 0 when the student matches the teacher.

    Why T²: the gradient of one row's term is

        ∂L_soft / ∂z_i = T² · (q_i - p_i) / T = T · (q_i - p_i)

    and for large T, softmax(x / T)_i ≈ (1 + (x_i - mean(x)) / T) / C, so q_i - p_i shrinks like 1 / T and

        T · (q_i - p_i) → ((z_i - mean(z)) - (v_i - mean(v))) / C      (T → ∞)

    a limit that does not depend on T. Without the T² the soft gradient would shrink like 1 / T², and raising
    the temperature would silently turn the soft term down against the hard one (Hinton et al., section 2).
    The limit is matching centred logits with a squared error: Caruana's logit matching is distillation's
    high-temperature end (section 2.1).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"student and teacher logits must both be (batch, classes), got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")
    log_q = F.log_softmax(at_least_fp32(student_logits) / temperature, dim=-1)  # (B, C)
    log_p = F.log_softmax(at_least_fp32(teacher_logits).to(log_q.dtype) / temperature, dim=-1)  # (B, C)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # (B,): KL(p_b || q_b) per row
    return temperature ** 2 * kl.mean()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float = 2.0, alpha: float = 0.5) -> torch.Tensor:
    """Hinton et al.'s loss: the soft term weighted by ``alpha`` plus the hard-label cross-entropy by ``1 - alpha``::

        L = alpha · T² · KL(softmax(v / T) || softmax(z / T)) + (1 - alpha) · CE(z, y)

    averaged over the batch (:func:`soft_target_loss` for the first term; ``CE`` is the usual
    -log softmax(z)_y, at temperature 1). ``alpha=0`` is plain fine-tuning on the labels, ``alpha=1`` learns
    from the teacher alone. Thanks to the T² the two terms keep their relative weight whatever T is.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    soft = soft_target_loss(student_logits, teacher_logits, temperature)
    hard = F.cross_entropy(at_least_fp32(student_logits), labels)
    return alpha * soft + (1.0 - alpha) * hard


# ---------------------------------------------------------------------------------------------
# A smaller student
# ---------------------------------------------------------------------------------------------


def student_layer_indices(teacher_layers: int, n_layer: int,
                          layers: Literal["alternate", "first"] | Sequence[int] = "alternate") -> list[int]:
    """Which teacher layers a student of ``n_layer`` layers starts from: ``"alternate"`` takes one layer out of
    every ``teacher_layers // n_layer`` from the bottom (0, 2 of 4; 0, 2, 4, 6, 8, 10 of 12), ``"first"`` the
    bottom ``n_layer``, or an explicit increasing list."""
    if not 1 <= n_layer <= teacher_layers:
        raise ValueError(f"a student needs 1 to {teacher_layers} layers (the teacher's), got {n_layer}")
    if layers == "alternate":
        step = teacher_layers // n_layer
        return [i * step for i in range(n_layer)]
    if layers == "first":
        return list(range(n_layer))
    chosen = [int(i) for i in layers]
    if len(chosen) != n_layer or any(not 0 <= i < teacher_layers for i in chosen) or chosen != sorted(set(chosen)):
        raise ValueError(f"layers must be {n_layer} increasing teacher layer indices in 0..{teacher_layers - 1}, "
                         f"got {chosen}")
    return chosen


def student_from_teacher(teacher: BertForSequenceClassification, n_layer: int = 2,
                         layers: Literal["alternate", "first"] | Sequence[int] = "alternate",
                         init: Literal["teacher", "random"] = "teacher") -> BertForSequenceClassification:
    """A BERT classifier like ``teacher`` (width, heads, vocabulary, positions, pooling, labels) with ``n_layer``
    encoder layers.

    ``init="teacher"`` copies the teacher's embeddings, the chosen layers (:func:`student_layer_indices`), its
    pooler and its classifier: the student starts as the teacher with layers left out, which the remaining ones
    were never trained to expect, but from far closer than random. DistilBERT (Sanh et al., 2019, section 3)
    initializes its 6-layer student from BERT-base "by taking one layer out of two"; ``"alternate"`` is that rule.
    A LoRA teacher's layers are copied merged (:func:`~minillm.peft.merge_lora`, on a copy; the teacher is left as
    it is). ``init="random"`` is the same shape with BERT's fresh initialization (seed beforehand), the baseline that
    shows what the copied weights are worth. The student is on the teacher's device and dtype, in training mode.
    """
    if not isinstance(teacher, BertForSequenceClassification):
        raise MinillmError(f"a student is built from a BertForSequenceClassification, not a {type(teacher).__name__} (a "
                           "prompt-tuned teacher's classifier is its .model; its soft prompt has no place in a student)")
    indices = student_layer_indices(teacher.config.n_layer, n_layer, layers)
    if init not in ("teacher", "random"):
        raise ValueError(f"init must be 'teacher' or 'random', got {init!r}")
    student = BertForSequenceClassification(replace(teacher.config, n_layer=n_layer), teacher.num_labels, teacher.pooling)
    weight = teacher.classifier.weight
    student = student.to(device=weight.device, dtype=weight.dtype)  # BERT's fresh initialization, so far
    if init == "random":
        return student
    if lora_layers(teacher):  # LoRA folds into its layers: copy W0 + (alpha/r) B A, the function the teacher computes
        teacher = merge_lora(copy.deepcopy(teacher))
    if any(isinstance(module, WithAdapter) for module in teacher.modules()):
        raise MinillmError("the teacher has adapters, which do not fold into its layers: build the student with "
                           "init='random', or distil from a fully fine-tuned or LoRA teacher")
    with torch.no_grad():
        student.bert.embeddings.load_state_dict(teacher.bert.embeddings.state_dict())
        for student_layer, index in zip(student.bert.layers, indices):
            student_layer.load_state_dict(teacher.bert.layers[index].state_dict())
        student.bert.pooler.load_state_dict(teacher.bert.pooler.state_dict())
        student.classifier.load_state_dict(teacher.classifier.state_dict())
    return student


# ---------------------------------------------------------------------------------------------
# Training on the teacher's soft targets with the shared loop
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def teacher_logits(teacher, examples: Sequence[tuple[Sequence[int], int]], pad_id: int, batch_size: int = 256,
                   precision: str = "auto") -> torch.Tensor:
    """(N, num_labels) float32 on the CPU: the teacher's logits for each of ``examples`` (``(token_ids, label)``),
    in their order, in eval mode (no dropout: the targets are the teacher's function, not a noisy draw of it).
    The examples go in length order to pad little, then are put back. The teacher runs where its weights are."""
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    out = torch.empty(len(examples), teacher.num_labels)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        padded = data.pad_batch([examples[i][0] for i in rows], pad_id=pad_id)
        with autocast(device, precision=precision):
            logits = teacher(padded["input_ids"].to(device), attention_mask=padded["attention_mask"].to(device)).logits
        out[rows] = logits.float().cpu()  # (b, num_labels), back to the examples' order
    teacher.train(was_training)
    return out


@dataclass
class DistillationBatch(ClassificationBatch):
    teacher_logits: torch.Tensor = None  # (B, num_labels), the teacher's logits for these examples

    def to(self, device) -> "DistillationBatch":
        return DistillationBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                                 self.teacher_logits.to(device))


class DistillationTask(ClassificationTask):
    """:class:`~minillm.finetune.ClassificationTask` whose training loss is :func:`distillation_loss`.

    ``train_teacher_logits`` (N, num_labels) holds the teacher's logits for ``train[n]``, computed once
    (:func:`teacher_logits`) and looked up by index for each drawn batch: every example is drawn many times,
    and a lookup costs nothing where a teacher forward pass costs more than the student's. Being keyed by
    example, the logits may come from a teacher that read other token ids (another tokenizer).
    Evaluation is inherited: hard-label cross-entropy and accuracy on ``val``, so the best-model choice and
    the validation numbers compare with a student fine-tuned on labels alone.
    """

    def __init__(self, train: Sequence[tuple[Sequence[int], int]], val: Sequence[tuple[Sequence[int], int]], pad_id: int,
                 train_teacher_logits: torch.Tensor, temperature: float = 2.0, alpha: float = 0.5,
                 length_grouping: int = 16, seed: int = 0):
        super().__init__(train, val, pad_id, length_grouping, seed)
        if train_teacher_logits.dim() != 2 or len(train_teacher_logits) != len(self.train):
            raise ValueError(f"train_teacher_logits must be ({len(self.train)}, num_labels), one row per training "
                             f"example, got {tuple(train_teacher_logits.shape)}")
        if temperature <= 0 or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"need temperature > 0 and alpha in [0, 1], got {temperature} and {alpha}")
        self.train_teacher_logits = train_teacher_logits.detach().float().cpu()
        self.temperature, self.alpha = temperature, alpha

    def sample_batch(self, batch_size: int, generator: torch.Generator, device, rank: int = 0, world_size: int = 1):
        indices = self.draw(batch_size * world_size, generator)
        mine = indices[rank * batch_size:(rank + 1) * batch_size]  # this process's share of the global batch
        batch = self.batch([self.train[i] for i in mine])
        return DistillationBatch(batch.input_ids, batch.attention_mask, batch.labels,
                                 self.train_teacher_logits[mine]).to(device)

    def loss(self, model, batch: DistillationBatch) -> torch.Tensor:
        student = model(batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, num_labels)
        return distillation_loss(student, batch.teacher_logits, batch.labels, self.temperature, self.alpha)


@dataclass
class DistillationConfig(FinetuneConfig):
    """Fine-tuning's recipe (:class:`~minillm.finetune.FinetuneConfig`) with the soft targets mixed in."""

    out: str = field(default="runs/distil", metadata={"help": "run folder: checkpoints, log.jsonl, loss.png, results.json"})
    temperature: float = field(default=2.0, metadata={"help": "softmax temperature T of the soft targets (Hinton et al.: "
                                                              "1 to 20; DistilBERT: 2)"})
    alpha: float = field(default=0.5, metadata={"help": "weight of the soft-target term; 1 - alpha weighs the hard labels"})

    def validate(self):
        super().validate()
        if not self.temperature > 0 or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"--temperature must be positive and --alpha in [0, 1], got {self.temperature} "
                             f"and {self.alpha}")


def footprint(model, examples: Sequence[tuple[Sequence[int], int]], pad_id: int, batch_size: int = 32,
              repeats: int = 10) -> dict:
    """What serving ``model`` costs: its parameters, their bytes (each tensor once, as stored) and the median
    milliseconds of one forward pass over the first ``batch_size`` examples, in eval mode without gradients,
    on the model's device (:func:`minillm.timing.time_callable`). A measurement, not a test."""
    device = next(model.parameters()).device
    padded = data.pad_batch([ids for ids, _ in examples[:batch_size]], pad_id=pad_id)
    ids, mask = padded["input_ids"].to(device), padded["attention_mask"].to(device)  # (B, T)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        seconds = time_callable(lambda: model(ids, attention_mask=mask), device, warmup=2, repeats=repeats)
    model.train(was_training)
    tensors = {p.data_ptr(): p for p in model.parameters()} | {b.data_ptr(): b for b in model.buffers()}
    _, parameters = count_parameters(model)
    return {"parameters": parameters, "megabytes": sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6,
            "latency_ms": seconds * 1e3, "latency_batch": len(ids)}


def distil(teacher, student, train: Sequence[tuple[Sequence[int], int]], val: Sequence[tuple[Sequence[int], int]],
           test: Sequence[tuple[Sequence[int], int]], pad_id: int, config: DistillationConfig,
           run_info: dict | None = None, log=print, prepare=None) -> dict:
    """Train ``student`` on ``teacher``'s soft targets and the labels of ``train`` (token ids and labels, as
    :func:`minillm.finetune.encode_for_bert` makes them), keep the best evaluation on ``val`` (hard-label
    accuracy), and score it on ``test``: what :func:`minillm.finetune.finetune` returns (accuracy, precision,
    recall, F1, confusion matrix, collapse guard, steps, ...), plus ``teacher_agreement`` (the share of ``test``
    on which the student predicts the teacher's label), ``temperature`` and ``alpha``. The teacher's logits
    are computed once on its own device; only the student trains."""
    log(f"distillation: the teacher's logits for {len(train):,} training examples (T={config.temperature:g}, "
        f"alpha={config.alpha:g})")
    targets = teacher_logits(teacher, train, pad_id, precision=config.precision)
    task = DistillationTask(train, val, pad_id, targets, config.temperature, config.alpha, seed=config.seed)
    scores = finetune(student, task, config, test, run_info, log=log, prepare=prepare)
    teacher_device = next(teacher.parameters()).device
    student_device = next(student.parameters()).device
    teacher_predicted, _ = predict(teacher, task, test, teacher_device, precision=config.precision)
    student_predicted, _ = predict(student, task, test, student_device, precision=config.precision)
    agreement = sum(a == b for a, b in zip(teacher_predicted, student_predicted)) / max(1, len(test))
    return {**scores, "teacher_agreement": agreement, "temperature": config.temperature, "alpha": config.alpha}
