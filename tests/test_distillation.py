"""minillm.distillation: Hinton et al.'s loss, the student built from its teacher, and training on soft targets.

The loss is checked against a float64 reference written from the formula and against PyTorch's own
``kl_div`` / ``cross_entropy``; its gradient against T (q - p) and, for large T, against the
T-independent limit that the T² factor buys. The student copies exactly the teacher layers it names.
End to end, a tiny BERT student learns a rule from a teacher that knows it while every hard label it is
given is wrong: only the soft targets can teach it that (and on the labels alone it learns the opposite).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from minillm import MinillmError
from minillm.bert import BertConfig, BertForSequenceClassification, ClassificationOutput
from minillm.distillation import (
    DistillationBatch,
    DistillationConfig,
    DistillationTask,
    distil,
    distillation_loss,
    footprint,
    soft_target_loss,
    student_from_teacher,
    student_layer_indices,
    teacher_logits,
)
from minillm.finetune import ClassificationBatch
from minillm.peft import add_adapters, apply_lora, apply_prompt_tuning, lora_layers

VOCAB, PAD, CLS, GOOD, BAD = 30, 0, 1, 3, 4


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


def logit_rows(max_batch=5, max_classes=6, bound=20.0):
    """(student, teacher, labels) as float64 tensors: B rows of C logits in [-bound, bound]."""
    value = st.floats(-bound, bound, allow_nan=False, allow_infinity=False)
    return st.tuples(st.integers(1, max_batch), st.integers(2, max_classes)).flatmap(
        lambda shape: st.tuples(
            st.lists(value, min_size=shape[0] * shape[1], max_size=shape[0] * shape[1]),
            st.lists(value, min_size=shape[0] * shape[1], max_size=shape[0] * shape[1]),
            st.lists(st.integers(0, shape[1] - 1), min_size=shape[0], max_size=shape[0]),
        ).map(lambda lists: (torch.tensor(lists[0], dtype=torch.float64).reshape(shape),
                             torch.tensor(lists[1], dtype=torch.float64).reshape(shape),
                             torch.tensor(lists[2]))))


def reference_loss(student, teacher, labels, temperature, alpha) -> float:
    """The formula in numpy float64, row by row: alpha T² mean_b KL(p_b || q_b) + (1 - alpha) mean_b -log softmax(z_b)_y."""
    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()

    soft, hard = 0.0, 0.0
    for z, v, y in zip(student.numpy(), teacher.numpy(), labels.numpy()):
        p, q = softmax(v / temperature), softmax(z / temperature)
        soft += sum(pi * np.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)
        hard += -np.log(softmax(z)[y])
    batch = len(labels)
    return alpha * temperature ** 2 * soft / batch + (1 - alpha) * hard / batch


temperatures = st.floats(0.5, 20.0)
alphas = st.floats(0.0, 1.0)


@given(logit_rows(), temperatures, alphas)
def test_distillation_loss_is_the_formula_in_float64(rows, temperature, alpha):
    student, teacher, labels = rows
    got = distillation_loss(student, teacher, labels, temperature, alpha).item()
    # float64 throughout; the loss is at most ~T² * 40 * ... ≈ 1e4, so 1e-9 relative is ~1e6 ulps of headroom
    assert got == pytest.approx(reference_loss(student, teacher, labels, temperature, alpha), rel=1e-9, abs=1e-9)
    assert soft_target_loss(student, teacher, temperature).item() >= -1e-12  # KL >= 0 (Gibbs)


@given(logit_rows(), temperatures, alphas)
def test_distillation_loss_equals_torchs_kl_div_and_cross_entropy(rows, temperature, alpha):
    student, teacher, labels = rows
    kl = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                  reduction="batchmean", log_target=True)
    expected = alpha * temperature ** 2 * kl + (1 - alpha) * F.cross_entropy(student, labels)
    # the same float64 terms summed in another order: a few ulps of a value up to ~1e4
    assert torch.allclose(distillation_loss(student, teacher, labels, temperature, alpha), expected, rtol=1e-10, atol=1e-10)


@given(logit_rows(), temperatures)
def test_alpha_zero_is_plain_cross_entropy(rows, temperature):
    student, teacher, labels = rows
    assert torch.equal(distillation_loss(student, teacher, labels, temperature, alpha=0.0), F.cross_entropy(student, labels))


@given(logit_rows(), temperatures)
def test_a_student_equal_to_its_teacher_has_zero_soft_loss_and_gradient(rows, temperature):
    student, _, _ = rows
    for dtype in (torch.float32, torch.float64):
        z = student.to(dtype).clone().requires_grad_(True)
        loss = soft_target_loss(z, z.detach().clone(), temperature)
        assert loss.item() == 0.0  # log p - log q is the same computation on the same numbers: exactly 0
        loss.backward()
        # the gradient T (q - p) / B reaches autograd as T (q - p * sum(p)) / B: sum(p) is 1 within a few ulps
        assert z.grad.abs().max().item() <= temperature * 8 * torch.finfo(dtype).eps


@given(logit_rows(), temperatures)
def test_the_soft_gradient_is_t_times_q_minus_p_over_the_batch(rows, temperature):
    student, teacher, _ = rows
    z = student.clone().requires_grad_(True)
    soft_target_loss(z, teacher, temperature).backward()
    q, p = torch.softmax(student / temperature, -1), torch.softmax(teacher / temperature, -1)
    assert torch.allclose(z.grad, temperature * (q - p) / len(student), atol=1e-12)  # float64, terms of size <= T


@given(logit_rows(bound=4.0))
def test_with_t_squared_the_soft_gradient_tends_to_a_t_independent_limit(rows):
    """For large T, T (q - p)_i -> ((z_i - mean z) - (v_i - mean v)) / C, whatever T is.

    Bound: softmax(x)_i = (1 + x~_i + (x~_i² - mean(x~²)) / 2 + O(|x|³)) / C with x~ = x - mean(x), so the
    second-order remainder of T (q - p)_i is at most R² / (C T), R = max |x~| over both rows (≤ 8 here). The
    test allows twice that: the third-order terms are R / T ≤ 1e-3 of it."""
    student, teacher, _ = rows
    classes = student.shape[1]
    centred_z, centred_v = student - student.mean(-1, keepdim=True), teacher - teacher.mean(-1, keepdim=True)
    limit = (centred_z - centred_v) / classes
    radius = max(centred_z.abs().max().item(), centred_v.abs().max().item())
    for temperature in (1e3, 1e4):
        z = student.clone().requires_grad_(True)
        soft_target_loss(z, teacher, temperature).backward()
        per_row = z.grad * len(student)  # undo the batch mean
        assert (per_row - limit).abs().max().item() <= 2 * radius ** 2 / (classes * temperature) + 1e-12


def test_the_loss_refuses_bad_arguments():
    z = torch.zeros(2, 3)
    for bad in (dict(temperature=0.0), dict(alpha=1.5), dict(alpha=-0.1)):
        with pytest.raises(ValueError):
            distillation_loss(z, z, torch.zeros(2, dtype=torch.long), **bad)
    with pytest.raises(ValueError, match="batch, classes"):
        soft_target_loss(z, torch.zeros(2, 4))
    with pytest.raises(ValueError):
        DistillationConfig(alpha=2.0)


# ---------------------------------------------------------------------------------------------
# The student built from its teacher
# ---------------------------------------------------------------------------------------------


def tiny_teacher(n_layer=4, pooling="mean") -> BertForSequenceClassification:
    """A float64 BERT classifier whose every tensor is random and different (so a copy of the wrong layer, or
    of a LayerNorm that init left at 1, cannot pass for the right one)."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, max_len=16, n_layer=n_layer, n_head=2, n_embd=8, d_ff=16, dropout=0.0, pad_id=PAD)
    model = BertForSequenceClassification(config, num_labels=3, pooling=pooling).double().eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.3)
    return model


def padded(lengths=(6, 3, 5), seed=2):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), PAD)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(1, VOCAB, (length,), generator=generator)
    return ids, (ids != PAD).long()  # (B, T), (B, T)


def same_tensors(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("teacher_layers, n_layer, layers, expected", [
    (4, 2, "alternate", [0, 2]), (12, 6, "alternate", [0, 2, 4, 6, 8, 10]), (4, 3, "alternate", [0, 1, 2]),
    (4, 2, "first", [0, 1]), (4, 2, [1, 3], [1, 3]), (4, 4, "alternate", [0, 1, 2, 3])])
def test_student_layer_indices(teacher_layers, n_layer, layers, expected):
    assert student_layer_indices(teacher_layers, n_layer, layers) == expected


@pytest.mark.parametrize("n_layer, layers", [(0, "alternate"), (5, "alternate"), (2, [2, 1]), (2, [0, 4]), (2, [1])])
def test_student_layer_indices_refuses_impossible_choices(n_layer, layers):
    with pytest.raises(ValueError):
        student_layer_indices(4, n_layer, layers)


@pytest.mark.parametrize("layers, chosen", [("alternate", [0, 2]), ("first", [0, 1]), ([1, 3], [1, 3])])
def test_the_student_copies_embeddings_the_chosen_layers_pooler_and_head_exactly(layers, chosen):
    teacher = tiny_teacher()
    student = student_from_teacher(teacher, n_layer=2, layers=layers)
    assert student.config.n_layer == 2 and student.config.n_embd == teacher.config.n_embd
    assert (student.num_labels, student.pooling) == (3, "mean") and student.classifier.weight.dtype == torch.float64
    assert same_tensors(student.bert.embeddings, teacher.bert.embeddings)
    assert same_tensors(student.bert.pooler, teacher.bert.pooler) and same_tensors(student.classifier, teacher.classifier)
    for student_layer, index in zip(student.bert.layers, chosen):
        assert same_tensors(student_layer, teacher.bert.layers[index]), index
    # and it computes the teacher's embeddings, then the chosen layers in order, then the mean and the head
    ids, mask = padded()
    with torch.no_grad():
        x = teacher.bert.embeddings(ids, torch.zeros_like(ids))  # (B, T, H)
        for index in chosen:
            x = teacher.bert.layers[index](x, key_padding_mask=mask == 0)  # (B, T, H)
        weights = mask.double().unsqueeze(-1)  # (B, T, 1)
        expected = teacher.classifier((x * weights).sum(1) / weights.sum(1))  # (B, 3)
        logits = student.eval()(ids, attention_mask=mask).logits
    assert logits.shape == (3, 3)
    assert torch.allclose(logits, expected, atol=1e-12)  # float64, the same operations in the same order


def test_a_student_as_deep_as_its_teacher_is_the_teacher_and_a_random_one_shares_nothing():
    teacher = tiny_teacher(n_layer=3, pooling="cls")
    ids, mask = padded()
    with torch.no_grad():
        whole = student_from_teacher(teacher, n_layer=3).eval()
        assert torch.equal(whole(ids, attention_mask=mask).logits, teacher(ids, attention_mask=mask).logits)
        torch.manual_seed(3)
        fresh = student_from_teacher(teacher, n_layer=1, init="random")
        assert fresh.pooling == "cls" and fresh.config.n_layer == 1
        assert fresh(ids, attention_mask=mask).logits.shape == (3, 3)
    assert not any(torch.equal(p, t) for p in fresh.parameters() for t in teacher.parameters() if p.shape == t.shape)
    with pytest.raises(ValueError, match="init"):
        student_from_teacher(teacher, n_layer=1, init="half")


def test_a_lora_teacher_gives_its_merged_layers_and_peft_teachers_that_do_not_fold_are_refused():
    teacher = apply_lora(tiny_teacher(n_layer=2), r=2, alpha=4.0)
    with torch.no_grad():
        for layer in lora_layers(teacher).values():
            layer.lora_B.normal_(0.0, 0.3)  # B starts at 0 (LoRA = identity): make the low-rank update count
    ids, mask = padded()
    student = student_from_teacher(teacher, n_layer=2).eval()
    assert not lora_layers(student) and lora_layers(teacher)  # merged into plain layers, on a copy
    with torch.no_grad():
        # merging adds (alpha / r) B A into W0: float64 rounding, ~1e-16 of logits of size ~1
        assert torch.allclose(student(ids, attention_mask=mask).logits, teacher(ids, attention_mask=mask).logits, atol=1e-12)
    with pytest.raises(MinillmError, match="adapters"):
        student_from_teacher(add_adapters(tiny_teacher(n_layer=2), bottleneck=2), n_layer=1)
    with pytest.raises(MinillmError, match="BertForSequenceClassification"):
        student_from_teacher(apply_prompt_tuning(tiny_teacher(n_layer=2), 2), n_layer=1)


# ---------------------------------------------------------------------------------------------
# The task: precomputed soft targets looked up per batch, hard-label evaluation
# ---------------------------------------------------------------------------------------------


class ProbeTeacher(nn.Module):
    """Logits that name the example: (sum of its real ids, its length), to see which row went where."""

    num_labels = 2

    def __init__(self):
        super().__init__()
        self.unit = nn.Parameter(torch.ones(()))  # a weight, so that it has a device

    def forward(self, input_ids, attention_mask=None):
        mask = attention_mask if attention_mask is not None else (input_ids != PAD).long()
        return ClassificationOutput(torch.stack([(input_ids * mask).sum(1), mask.sum(1)], -1).float() * self.unit)


def random_examples(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 12, (n,), generator=generator).tolist()
    return [(torch.randint(1, VOCAB, (length,), generator=generator).tolist(), i % 2) for i, length in enumerate(lengths)]


def test_teacher_logits_are_per_example_and_in_the_examples_order():
    examples = random_examples(37)
    logits = teacher_logits(ProbeTeacher(), examples, PAD, batch_size=8)  # 5 batches of mixed lengths
    expected = torch.tensor([[float(sum(ids)), float(len(ids))] for ids, _ in examples])
    assert logits.dtype == torch.float32 and torch.equal(logits, expected)


def test_a_batch_carries_the_teacher_logits_of_its_own_examples_and_each_process_its_rows():
    train = random_examples(40)
    task = DistillationTask(train, random_examples(6, seed=1), PAD, teacher_logits(ProbeTeacher(), train, PAD))
    whole = task.sample_batch(8, torch.Generator().manual_seed(4), "cpu")
    assert isinstance(whole, DistillationBatch)
    assert torch.equal(whole.teacher_logits, ProbeTeacher()(whole.input_ids, whole.attention_mask).logits.detach())
    for rank in (0, 1):
        half = task.sample_batch(4, torch.Generator().manual_seed(4), "cpu", rank=rank, world_size=2)
        assert torch.equal(half.teacher_logits, whole.teacher_logits[rank * 4:(rank + 1) * 4])


def test_the_training_loss_is_the_distillation_loss_and_evaluation_uses_the_hard_labels_only():
    teacher, student = tiny_teacher(n_layer=2), tiny_teacher(n_layer=1)
    train, val = random_examples(20), random_examples(7, seed=1)
    train = [(ids, i % 3) for i, (ids, _) in enumerate(train)]
    val = [(ids, i % 3) for i, (ids, _) in enumerate(val)]
    task = DistillationTask(train, val, PAD, teacher_logits(teacher, train, PAD), temperature=3.0, alpha=0.7)
    batch = task.sample_batch(6, torch.Generator().manual_seed(0), "cpu")
    with torch.no_grad():
        z = student(batch.input_ids, attention_mask=batch.attention_mask).logits
        v = teacher(batch.input_ids, attention_mask=batch.attention_mask).logits
        # the teacher's logits went through float32 storage: 1e-6 of logits of size ~1 moves the loss far less
        assert torch.allclose(task.loss(student, batch), distillation_loss(z, v, batch.labels, 3.0, 0.7), atol=1e-5)
        (eval_batch,) = task.eval_batches(16, "cpu")
        assert type(eval_batch) is ClassificationBatch  # no soft targets: what fine-tuning's evaluation sees
        loss, right = task.evaluate_batch(student, eval_batch)
        z = student(eval_batch.input_ids, attention_mask=eval_batch.attention_mask).logits
        assert torch.allclose(loss, F.cross_entropy(z, eval_batch.labels), atol=1e-12)
        assert int(right) == int((z.argmax(-1) == eval_batch.labels).sum())
    with pytest.raises(ValueError, match="one row per training"):
        DistillationTask(train, val, PAD, torch.zeros(len(train) - 1, 3))


def test_footprint_counts_parameters_and_their_bytes():
    model = tiny_teacher(n_layer=2).float()
    result = footprint(model, random_examples(4), PAD, batch_size=4, repeats=1)
    n = sum(p.numel() for p in model.parameters())
    assert result["parameters"] == n and result["megabytes"] == pytest.approx(4 * n / 1e6)
    assert result["latency_batch"] == 4 and result["latency_ms"] > 0


# ---------------------------------------------------------------------------------------------
# End to end: the soft targets teach what the labels do not
# ---------------------------------------------------------------------------------------------


class RuleTeacher(nn.Module):
    """A teacher that knows the rule: positive when the sentence holds GOOD, negative when it holds BAD
    (logits ±2, which T = 2 softens to 88% / 12%)."""

    num_labels = 2

    def __init__(self):
        super().__init__()
        self.margin = nn.Parameter(torch.tensor(2.0))

    def forward(self, input_ids, attention_mask=None):
        score = ((input_ids == GOOD).sum(1) - (input_ids == BAD).sum(1)).float()  # (B,)
        return ClassificationOutput(torch.stack([-score, score], -1) * self.margin)  # (B, 2)


def rule_examples(n, seed):
    """[CLS] and 3-9 filler tokens with GOOD (label 1) or BAD (label 0) at a random place; labels alternate."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        length = int(torch.randint(3, 10, (1,), generator=generator))
        ids = torch.randint(5, VOCAB, (length,), generator=generator).tolist()
        label = i % 2
        ids.insert(int(torch.randint(0, length + 1, (1,), generator=generator)), GOOD if label else BAD)
        examples.append(([CLS, *ids], label))
    return examples


def test_a_student_learns_the_rule_from_the_teachers_soft_targets_though_every_label_it_is_given_is_wrong(tmp_path):
    """48 training sentences whose labels are all flipped. With alpha = 1 the student learns from the teacher
    alone and gets ≥ 90% of 40 new sentences right (by chance: P(≥ 36 of 40) ≈ 1e-7); on the labels alone
    (alpha = 0) the same student learns the flipped rule, ≤ 10%. Validation (model selection) has true labels:
    picking the best of two evaluations cannot move a student from 50% to 90%. Deterministic: seeded, fp32."""
    train, val, test = rule_examples(48, seed=0), rule_examples(16, seed=1), rule_examples(40, seed=2)
    flipped = [(ids, 1 - label) for ids, label in train]
    accuracy = {}
    for alpha in (1.0, 0.0):
        torch.manual_seed(0)
        student = BertForSequenceClassification(BertConfig(vocab_size=VOCAB, max_len=16, n_layer=1, n_head=2, n_embd=16,
                                                           dropout=0.0, pad_id=PAD), pooling="mean")
        config = DistillationConfig(out=str(tmp_path / f"alpha{alpha:g}"), temperature=2.0, alpha=alpha, epochs=1,
                                    min_steps=150, batch_size=16, lr=3e-2, min_lr=1e-4, weight_decay=0.0, evaluations=2,
                                    device="cpu", precision="fp32", progress=False)
        scores = distil(RuleTeacher(), student, flipped, val, test, PAD, config, log=lambda message: None)
        accuracy[alpha] = scores["accuracy"]
        assert scores["teacher_agreement"] == pytest.approx(scores["accuracy"])  # the teacher is always right
        assert (scores["temperature"], scores["alpha"], scores["steps"]) == (2.0, alpha, 150)
    assert accuracy[1.0] >= 0.9 and accuracy[0.0] <= 0.1, accuracy
