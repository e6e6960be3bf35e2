"""minillm.bert and BERT pretraining: the losses are their definitions, attention is bidirectional,
padding is invisible, the MLM decoder is tied, and the pretraining task batches, masks and shards as documented.

Logits are compared in float64 (rtol 1e-10, atol 1e-12: the two computations differ only in
summation order). Hugging Face interop is in tests/test_hf.py; the masking statistics in
tests/test_bert_data.py.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm import MinillmError, data
from minillm.__main__ import main
from minillm.bert import BertConfig, BertForPreTraining, BertForSequenceClassification
from minillm.bert_pretraining import BertPretrainingTask
from minillm.runs import load_model

F64 = dict(rtol=1e-10, atol=1e-12)
PAD, CLS, SEP, MASK = 0, 2, 3, 4


def tiny_bert(seed=0, **overrides) -> BertForPreTraining:
    torch.manual_seed(seed)
    config = BertConfig(**{**dict(vocab_size=30, max_len=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0), **overrides})
    return BertForPreTraining(config).double().eval()


def batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 30, (3, 10), generator=generator)
    ids[:, 0] = CLS
    ids[1, 7:] = PAD  # the second example is shorter
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 4], labels[2, 8] = 7, 9, 11
    return ids, types, (ids != PAD).long(), labels, torch.tensor([0, 1, 0])


def test_the_loss_is_masked_lm_cross_entropy_plus_next_sentence_cross_entropy():
    model = tiny_bert()
    ids, types, mask, labels, nsp = batch()
    out = model(ids, types, mask, labels, nsp)
    selected = labels != -100
    mlm = F.cross_entropy(out.mlm_logits[selected], labels[selected])
    torch.testing.assert_close(out.mlm_loss, mlm, **F64)
    torch.testing.assert_close(out.nsp_loss, F.cross_entropy(out.nsp_logits, nsp), **F64)
    torch.testing.assert_close(out.loss, mlm + out.nsp_loss, **F64)
    masked_only = model(ids, types, mask, labels, nsp, mlm_positions="masked")
    torch.testing.assert_close(masked_only.mlm_logits, out.mlm_logits[selected], **F64)  # the same logits, fewer computed
    torch.testing.assert_close(masked_only.loss, out.loss, **F64)


def test_a_batch_with_nothing_masked_has_a_finite_loss_equal_to_the_next_sentence_loss():
    """15% masking can select no token in a short batch; the masked-LM term is then 0, not 0/0 = NaN."""
    model = tiny_bert()
    ids, types, mask, _, nsp = batch()
    nothing = torch.full_like(ids, -100)
    for positions in ("all", "masked"):
        out = model(ids, types, mask, nothing, nsp, mlm_positions=positions)
        assert out.mlm_loss.item() == 0.0
        torch.testing.assert_close(out.loss, out.nsp_loss, **F64)
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        model.zero_grad()


@settings(max_examples=40, deadline=None)
@given(batch_size=st.integers(1, 5), length=st.integers(3, 16), seed=st.integers(0, 2**31 - 1),
       probability=st.sampled_from([0.01, 0.15, 0.5]), positions=st.sampled_from(["all", "masked"]))
def test_the_masked_lm_loss_is_defined_for_every_batch_the_masking_draws(batch_size, length, seed, probability,
                                                                         positions):
    """Whatever masking draws (often nothing, for one short sequence at 1%), the loss is finite and equals the
    float64 definition: the mean cross-entropy over the masked positions, 0 over none. rtol 1e-10: the same sums."""
    model = tiny_bert()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 30, (batch_size, length), generator=generator)
    ids[:, 0], ids[:, -1] = CLS, SEP
    masked, labels = data.mask_tokens(ids, MASK, 30, [PAD, 1, CLS, SEP, MASK], mlm_probability=probability,
                                      generator=generator)
    types, attention = torch.zeros_like(ids), torch.ones_like(ids)
    out = model(masked, types, attention, labels, torch.zeros(batch_size, dtype=torch.long), mlm_positions=positions)
    logits = model(masked, types, attention).mlm_logits  # (B, T, vocab), every position
    selected = labels != -100
    expected = F.cross_entropy(logits[selected], labels[selected]) if selected.any() else torch.tensor(0.0, dtype=torch.float64)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.mlm_loss, expected, **F64)


def test_every_token_sees_the_tokens_after_it():
    model = tiny_bert()
    ids, types, mask, _, _ = batch()
    changed = ids.clone()
    changed[0, 6] = (changed[0, 6] + 1) % 25 + 5
    before, after = model.bert(ids, types, mask)[0], model.bert(changed, types, mask)[0]
    assert (before[0, :6] - after[0, :6]).abs().max() > 1e-6  # unlike GPT, earlier positions change


def test_padding_changes_nothing_at_real_positions():
    model = tiny_bert()
    ids, types, mask, _, _ = batch()
    short = model.bert(ids[1:2, :7], types[1:2, :7], mask[1:2, :7])
    padded = model.bert(ids[1:2], types[1:2], mask[1:2])
    torch.testing.assert_close(padded[0][:, :7], short[0], **F64)
    torch.testing.assert_close(padded[1], short[1], **F64)


def test_segment_embeddings_matter_and_the_decoder_is_the_word_embedding():
    model = tiny_bert()
    ids, types, mask, _, _ = batch()
    assert (model.bert(ids, types, mask)[0] - model.bert(ids, torch.zeros_like(types), mask)[0]).abs().max() > 1e-6
    assert model.mlm_decoder_weight is model.bert.embeddings.word_embeddings.weight
    assert torch.all(model.bert.embeddings.word_embeddings.weight[PAD] == 0)  # BERT zeroes the padding row


def test_a_classifier_starts_from_the_pretrained_encoder_with_a_fresh_head():
    pretrained = tiny_bert(seed=1)
    classifier = BertForSequenceClassification.from_pretraining(pretrained, num_labels=3).double().eval()
    for name, tensor in pretrained.bert.state_dict().items():
        assert torch.equal(classifier.bert.state_dict()[name], tensor), name
    ids, types, mask, _, _ = batch()
    out = classifier(ids, types, mask, labels=torch.tensor([0, 2, 1]))
    assert out.logits.shape == (3, 3)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, torch.tensor([0, 2, 1])), **F64)


def test_mean_pooling_averages_the_real_tokens_last_states_and_ignores_padding():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30, max_len=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    model = BertForSequenceClassification(config, pooling="mean").double().eval()
    ids, types, mask, _, _ = batch()
    hidden, _ = model.bert(ids, types, mask)
    for row in range(3):
        real = mask[row].bool()
        expected = model.classifier(hidden[row, real].mean(dim=0))
        torch.testing.assert_close(model(ids, types, mask).logits[row], expected, **F64)
    short = model(ids[1:2, :7], types[1:2, :7], mask[1:2, :7]).logits  # the padded row without its padding
    torch.testing.assert_close(model(ids, types, mask).logits[1:2], short, **F64)
    with pytest.raises(ValueError, match="pooling"):
        BertForSequenceClassification(config, pooling="max")


def test_bad_inputs_and_configs_are_refused():
    with pytest.raises(MinillmError, match="more than the model's 16 positions"):
        tiny_bert()(torch.full((1, 17), 6))
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="needs mlm_labels"):
        tiny_bert()(torch.full((1, 5), 6), mlm_positions="masked")
    with pytest.raises(ValueError, match="num_labels"):
        BertForSequenceClassification(BertConfig(vocab_size=30, n_embd=16, n_head=2), num_labels=1)


# ---------------------------------------------------------------------------------------------
# The pretraining task
# ---------------------------------------------------------------------------------------------


def examples(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(2, 8, (1,), generator=generator))
        a = torch.randint(5, 30, (length,), generator=generator).tolist()
        out.append(([CLS, *a, SEP, *a[:2], SEP], [0] * (length + 2) + [1] * 3, i % 2))
    return out


def make_task(dynamic=True, continuation_ids=None):
    return BertPretrainingTask(examples(50), examples(9, seed=1), pad_id=PAD, mask_id=MASK, vocab_size=30,
                               special_ids=[PAD, 1, CLS, SEP, MASK], mlm_probability=0.3, dynamic_masking=dynamic,
                               continuation_ids=continuation_ids, seed=0)


def draw(task, seed, **kwargs):
    return task.sample_batch(8, torch.Generator().manual_seed(seed), "cpu", **kwargs)


def test_static_masks_are_made_once_and_dynamic_masks_are_made_at_every_draw():
    dynamic, static = make_task(True), make_task(False)
    rows = static.draw(8, torch.Generator().manual_seed(3))  # what draw(.., 3) picks
    drawn = draw(static, 3)
    for row, index in enumerate(rows):
        example = static.static_train[index]
        n = example.input_ids.shape[1]
        assert torch.equal(drawn.input_ids[row, :n], example.input_ids[0]) and torch.all(drawn.input_ids[row, n:] == PAD)
        assert torch.equal(drawn.mlm_labels[row, :n], example.mlm_labels[0])
    assert torch.equal(draw(static, 3).input_ids, drawn.input_ids)
    masks = set()
    for seed in range(10):  # the same first example re-masked by each draw
        b = dynamic.sample_batch(1, torch.Generator().manual_seed(seed), "cpu")
        masks.add(tuple(b.mlm_labels[0].tolist()))
    assert len(masks) > 1
    b = draw(dynamic, 0)
    assert torch.all((b.mlm_labels == -100) | (b.mlm_labels >= 5))  # specials are never predicted


def test_each_process_gets_its_rows_of_the_one_process_global_batch():
    task = make_task(True)
    whole = draw(task, 5)
    shares = [task.sample_batch(4, torch.Generator().manual_seed(5), "cpu", rank=r, world_size=2) for r in range(2)]
    for name in ("input_ids", "mlm_labels", "next_sentence_label", "attention_mask"):
        assert torch.equal(torch.cat([getattr(s, name) for s in shares]), getattr(whole, name)), name


def test_validation_batches_are_the_same_at_every_estimate_and_cover_every_pair_once():
    task = make_task()
    first, second = list(task.eval_batches(4, "cpu")), list(task.eval_batches(4, "cpu"))
    assert len(first) == 3 and sum(len(b.next_sentence_label) for b in first) == 9
    for a, b in zip(first, second):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.mlm_labels, b.mlm_labels)
    assert len(list(task.eval_batches(4, "cpu", max_batches=2))) == 2


def test_whole_word_masking_treats_a_word_and_its_continuations_together():
    task = make_task(True, continuation_ids=range(20, 30))  # ids 20-29 play "##" pieces
    for seed in range(20):
        b = draw(task, seed)
        selected = b.mlm_labels != -100
        for row in range(8):
            for t in range(1, b.input_ids.shape[1]):
                original = b.mlm_labels[row, t] if selected[row, t] else b.input_ids[row, t]
                if 20 <= int(original) < 30 and int(b.attention_mask[row, t]) and bool(selected[row, t - 1]) != bool(selected[row, t]):
                    previous = b.mlm_labels[row, t - 1] if selected[row, t - 1] else b.input_ids[row, t - 1]
                    assert int(previous) in (PAD, 1, CLS, SEP, MASK), "a continuation piece split from its word"


def test_pretrain_bert_runs_and_reports_held_out_mlm_and_nsp_accuracy(tmp_path, capsys):
    out = tmp_path / "bert"
    assert main(["pretrain", "bert", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["mlm_accuracy"] <= 1 and 0 <= results["nsp_accuracy"] <= 1 and results["masked_tokens"] > 0
    for name in ("tokenizer.json", "model.safetensors", "checkpoint.safetensors", "log.jsonl", "loss.png"):
        assert (out / name).exists(), name
    model = load_model(out, expect="bert")
    assert model.config.n_embd == 32
    sst2 = tmp_path / "bert-sst2"  # SST-2's phrases, cut in two, instead of the reviews
    assert main(["pretrain", "bert", "--quick", "--data", "sst2", "--out", str(sst2), "--device", "cpu"]) == 0
    assert json.loads((sst2 / "config.json").read_text())["data"] == "sst2"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["pretrain", "bert", "--quick", "--tokenizer", "bpe", "--whole-word", "--out", str(tmp_path / "x")])
    assert "--whole-word needs --tokenizer wordpiece" in capsys.readouterr().err
