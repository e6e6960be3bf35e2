"""minillm.activation_checkpointing and ``--activation-checkpointing``: the same gradients for less kept memory, in
every model made of minillm's blocks, in the Trainer, and through every training command.

Gradients are compared bit for bit (torch.equal): non-reentrant checkpointing keeps the autograd graph and only
rebuilds the tensors a block saved, by running the same CPU kernels on the same input, with the random state of
the first pass restored, so dropout draws the same masks; the backward pass then multiplies the same numbers in
the same order.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import test_train  # its tiny GPT, task, config and train()
import torch
from conftest import REPO_ROOT
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm import MinillmError
from minillm.__main__ import main
from minillm.activation_checkpointing import (
    compare_activation_checkpointing,
    disable_activation_checkpointing,
    enable_activation_checkpointing,
    is_checkpointed,
    saved_activations,
    transformer_blocks,
)
from minillm.bert import BertConfig, BertForPreTraining, BertForSequenceClassification
from minillm.config import config_parser
from minillm.contrastive import SimCSEConfig
from minillm.gpt import GPT, GPTConfig
from minillm.runs import read_log
from minillm.transformer import Transformer, TransformerConfig


def gpt_and_loss(generator):
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.1))
    x, y = torch.randint(0, 11, (3, 8), generator=generator), torch.randint(0, 11, (3, 8), generator=generator)
    return model, lambda m: m(x, y)[1]


BERT = BertConfig(vocab_size=30, max_len=10, n_layer=2, n_head=2, n_embd=16, dropout=0.1)


def bert_pretraining_and_loss(generator):
    ids = torch.randint(1, 30, (3, 10), generator=generator)
    ids[0, 7:] = 0  # padding
    labels = torch.where(torch.rand(3, 10, generator=generator) < 0.3, ids, torch.full_like(ids, -100))
    nsp = torch.randint(0, 2, (3,), generator=generator)
    return BertForPreTraining(BERT), lambda m: m(ids, mlm_labels=labels, next_sentence_label=nsp).loss


def bert_classifier_and_loss(generator):
    ids, labels = torch.randint(1, 30, (3, 10), generator=generator), torch.randint(0, 2, (3,), generator=generator)
    return BertForSequenceClassification(BERT, pooling="mean"), lambda m: m(ids, labels=labels).loss


def transformer_and_loss(generator):
    config = TransformerConfig(src_vocab_size=13, tgt_vocab_size=13, d_model=16, n_heads=2, d_ff=32, dropout=0.1)
    src, tgt = torch.randint(3, 13, (3, 7), generator=generator), torch.randint(3, 13, (3, 6), generator=generator)
    return Transformer(config), lambda m: m(src, tgt[:, :-1], tgt[:, 1:])[1]


MODELS = {"gpt": gpt_and_loss, "bert pretraining": bert_pretraining_and_loss, "bert classifier": bert_classifier_and_loss,
          "encoder-decoder": transformer_and_loss}
BLOCKS = {"gpt": 2, "bert pretraining": 2, "bert classifier": 2, "encoder-decoder": 4}


@pytest.mark.parametrize("kind", MODELS)
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_checkpointed_models_give_the_plain_models_loss_and_gradients_bit_for_bit_with_dropout(kind, seed):
    torch.manual_seed(seed)
    model, loss_of = MODELS[kind](torch.Generator().manual_seed(seed))
    checkpointed = copy.deepcopy(model)
    assert enable_activation_checkpointing(checkpointed) == BLOCKS[kind]
    results = []
    for m in (model, checkpointed):
        torch.manual_seed(seed + 1)  # the dropout masks
        loss = loss_of(m)
        loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in m.named_parameters()}, torch.get_rng_state()))
    (loss, grads, rng), (loss_c, grads_c, rng_c) = results
    assert torch.equal(loss, loss_c)
    assert grads.keys() == grads_c.keys()
    unused = [name for name in grads if grads[name] is None]  # e.g. the pooler, under mean pooling
    assert unused == [name for name in grads_c if grads_c[name] is None]
    assert all(torch.equal(grads[name], grads_c[name]) for name in grads if name not in unused), kind
    assert torch.equal(rng, rng_c)  # recomputing drew no extra random numbers from the run's generator


def test_checkpointing_changes_no_name_or_weight_and_undoes_cleanly():
    model, loss_of = gpt_and_loss(torch.Generator().manual_seed(0))
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert enable_activation_checkpointing(model) == 2 == enable_activation_checkpointing(model)  # twice: no change
    assert all(is_checkpointed(block) for block in transformer_blocks(model))
    assert list(model.state_dict()) == list(state)  # checkpoints and Hugging Face exports read the same names
    assert all(torch.equal(model.state_dict()[name], state[name]) for name in state)
    assert disable_activation_checkpointing(model) == 2
    assert not any(is_checkpointed(block) for block in transformer_blocks(model))
    assert "forward" not in model.blocks[0].__dict__


def test_generation_with_a_kv_cache_is_unchanged_by_checkpointing():
    """Without gradients a checkpointed block runs plainly, so the KV cache is filled once, not twice."""
    model, _ = gpt_and_loss(torch.Generator().manual_seed(0))
    prompt = torch.tensor([[1, 2, 3]])
    plain = model.generate(prompt, 6, temperature=0)
    enable_activation_checkpointing(model)
    assert torch.equal(model.generate(prompt, 6, temperature=0), plain)


def test_a_model_without_transformer_blocks_is_one_clear_error():
    with pytest.raises(MinillmError, match="holds no Transformer block"):
        enable_activation_checkpointing(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU()))


def test_checkpointing_keeps_one_block_input_per_block_instead_of_every_activation():
    """Counted exactly (saved_tensors_hooks): with checkpointing, every extra block keeps one more float32 (B, T, C)
    tensor, its input, and nothing else; without it each block keeps over ten times as much."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 11, (3, 8), generator=generator), torch.randint(0, 11, (3, 8), generator=generator)
    one_block_input = 3 * 8 * 16 * 4  # B * T * C float32 numbers, in bytes
    kept = {}
    for n_layer in (2, 4):
        for checkpointed in (False, True):
            torch.manual_seed(0)
            model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=n_layer, n_head=2, n_embd=16, dropout=0.1))
            if checkpointed:
                enable_activation_checkpointing(model)
            kept[n_layer, checkpointed] = saved_activations(model, lambda m: m(x, y)[1])[0]
    assert kept[4, True] - kept[2, True] == 2 * one_block_input
    assert kept[4, False] - kept[2, False] > 10 * 2 * one_block_input
    assert kept[2, True] < kept[2, False]


def test_compare_activation_checkpointing_measures_both_and_leaves_the_model_as_it_was():
    model, loss_of = gpt_and_loss(torch.Generator().manual_seed(0))
    costs = compare_activation_checkpointing(model, loss_of, repeats=1)
    assert costs["recomputed"].saved_bytes < costs["stored"].saved_bytes
    assert costs["stored"].seconds > 0 and costs["recomputed"].peak_bytes is None  # the CPU has no allocator peak
    assert not any(is_checkpointed(block) for block in transformer_blocks(model))
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# In the Trainer, and on every training command
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_trainer_run_with_activation_checkpointing_equals_one_without(tmp_path, precision):
    """Same log and same weights, bit for bit, with dropout on (the tiny GPT's 0.1)."""
    messages = []
    model = test_train.new_model()
    trainer = test_train.Trainer(model, test_train.make_task(), test_train.config(
        tmp_path / "checkpointed", precision=precision, activation_checkpointing=True), {"model": test_train.MODEL},
        log=messages.append)
    trainer.fit()
    assert "activation checkpointing in 1 blocks" in messages[0]
    _, plain = test_train.train(tmp_path / "plain", precision=precision)
    strip = lambda log: [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in log]  # noqa: E731
    assert strip(read_log(tmp_path / "checkpointed")) == strip(read_log(tmp_path / "plain"))
    test_train.assert_same_weights(test_train.weights(model), test_train.weights(plain))


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("MINILLM_QUICK", None)
ENV.pop("MINILLM_PRECISION", None)


def command(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command_line", [["pretrain", "gpt"], ["pretrain", "bert"], ["finetune"], "SimCSE (chapter 10)"])
def test_every_training_command_offers_fp16_and_activation_checkpointing(command_line, capsys):
    """Both options are TrainConfig fields, so every command built on it lists them: python -m minillm's training
    commands, and chapter 10's contrastive script, whose options are SimCSEConfig's."""
    if command_line == "SimCSE (chapter 10)":
        help_text = config_parser(SimCSEConfig).format_help()
    else:
        with pytest.raises(SystemExit):
            main([*command_line, "--help"])
        help_text = capsys.readouterr().out
    text = " ".join(help_text.split())
    assert "--precision {auto,bf16,fp16,fp32}" in text and "--activation-checkpointing" in text
    assert "fp16 is for GPUs without bf16" in text


def test_pretrain_gpt_runs_in_fp16_with_activation_checkpointing_from_the_command_line(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 60, encoding="utf-8")
    out = tmp_path / "run"
    result = command("-m", "minillm", "pretrain", "gpt", "--data", corpus, "--out", out, "--n-layer", "2", "--n-head",
                     "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4", "--max-iters", "4",
                     "--eval-interval", "2", "--eval-iters", "1", "--warmup-iters", "1", "--no-progress",
                     "--sample-tokens", "5", "--device", "cpu", "--precision", "fp16", "--activation-checkpointing")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "fp16 autocast, loss scaling" in result.stdout and "activation checkpointing in 2 blocks" in result.stdout
    assert "steps skipped" in result.stdout
    log = read_log(out)
    assert [entry["step"] for entry in log] == [2, 4] and all(entry["loss_scale"] > 0 for entry in log)
