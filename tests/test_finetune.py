"""minillm.finetune: the GPT classifier, freezing, adapters, LoRA and prompt tuning.

Each method is checked against what it promises: the GPT classifier reads the last real token and
ignores right padding; freezing trains exactly the named parts; adapters and LoRA start as the
identity (the model is unchanged until trained) and train only their own weights (+ LayerNorms /
head); a merged LoRA model computes what the unmerged one did (float64, also after training, and
with the attention fast path, which must not fuse a wrapped q/k/v projection); a soft prompt
reaches the output, and a prompt that makes the input too long is an error.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from minillm import MinillmError
from minillm.bert import BertConfig, BertForSequenceClassification
from minillm.commands.finetune import FinetuneCommandConfig
from minillm.finetune import GPTForSequenceClassification
from minillm.gpt import GPT, GPTConfig
from minillm.layers import LayerNorm
from minillm.peft import (
    METHOD_RECIPES,
    Adapter,
    LoRALinear,
    PromptTuning,
    WithAdapter,
    add_adapters,
    apply_lora,
    apply_prompt_tuning,
    count_parameters,
    freeze_all_but_head,
    freeze_except_top_layers,
    lora_layers,
    merge_lora,
)

VOCAB, N_LAYER, D = 30, 3, 16
PAD = 0


def tiny_bert(seed=0, dtype=torch.float64, **overrides) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    sizes = dict(vocab_size=VOCAB, max_len=24, n_layer=N_LAYER, n_head=2, n_embd=D, dropout=0.0, pad_id=PAD)
    return BertForSequenceClassification(BertConfig(**{**sizes, **overrides}), num_labels=3).to(dtype).eval()


def tiny_gpt_config(**overrides) -> GPTConfig:
    sizes = dict(vocab_size=VOCAB, block_size=24, n_layer=N_LAYER, n_head=2, n_embd=D, dropout=0.0)
    return GPTConfig(**{**sizes, **overrides})


def tiny_gpt(seed=0, dtype=torch.float64, pad_id=PAD, **overrides) -> GPTForSequenceClassification:
    torch.manual_seed(seed)
    return GPTForSequenceClassification(tiny_gpt_config(**overrides), num_labels=3, pad_id=pad_id).to(dtype).eval()


MODELS = {"bert": tiny_bert, "gpt": tiny_gpt}


def padded_batch(lengths=(9, 5, 7), seed=1) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids (B, T) with real tokens 1..VOCAB-1, padded on the right with PAD; and the mask (B, T)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), PAD)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(1, VOCAB, (length,), generator=generator)
    return ids, (ids != PAD).long()


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def trainable_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def randomize(parameters, scale=0.3, seed=5):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale)


# ---------------------------------------------------------------------------------------------
# GPT classifier
# ---------------------------------------------------------------------------------------------


def test_gpt_forward_reads_its_hidden_states():
    model = tiny_gpt().gpt
    ids, _ = padded_batch()
    hidden = model.hidden_states(ids)
    assert hidden.shape == (*ids.shape, D)
    torch.testing.assert_close(model(ids)[0], model.lm_head(hidden), rtol=0, atol=0)


def test_gpt_classifier_reads_the_last_real_token_and_its_loss_is_the_cross_entropy():
    model = tiny_gpt()
    ids, mask = padded_batch(lengths=(9, 5, 7))
    labels = torch.tensor([0, 2, 1])
    out = model(ids, attention_mask=mask, labels=labels)
    hidden = model.gpt.hidden_states(ids)
    expected = model.classifier(hidden[torch.arange(3), torch.tensor([8, 4, 6])])
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, F.cross_entropy(expected, labels))
    torch.testing.assert_close(logits(model, ids), out.logits, rtol=0, atol=0)  # mask from pad_id: the same


@pytest.mark.parametrize("positions", ["learned", "rotary"])
@pytest.mark.parametrize("mask_from", ["attention_mask", "pad_id"])
def test_right_padding_does_not_change_a_rows_logits(positions, mask_from):
    model = tiny_gpt(positions=positions)
    lengths = (9, 3, 6, 1)
    ids, mask = padded_batch(lengths)
    batched = logits(model, ids, mask if mask_from == "attention_mask" else None)
    for row, length in enumerate(lengths):
        alone = logits(model, ids[row:row + 1, :length])  # no padding at all
        torch.testing.assert_close(batched[row:row + 1], alone, rtol=1e-12, atol=1e-12)


def test_gpt_classifier_rejects_left_padding_and_empty_rows():
    model = tiny_gpt()
    ids, mask = padded_batch(lengths=(4, 2))
    with pytest.raises(ValueError, match="padded on the right"):
        model(ids, attention_mask=mask.flip(1))
    mask[1] = 0
    with pytest.raises(ValueError, match="no real token"):
        model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="num_labels"):
        GPTForSequenceClassification(tiny_gpt_config(), num_labels=1)


def test_without_padding_information_every_token_is_real():
    model = tiny_gpt(pad_id=None)
    ids, _ = padded_batch()
    hidden = model.gpt.hidden_states(ids)
    torch.testing.assert_close(logits(model, ids), model.classifier(hidden[:, -1]), rtol=0, atol=0)


def test_from_pretrained_gpt_copies_the_body_and_keeps_the_tie():
    torch.manual_seed(3)
    lm = GPT(tiny_gpt_config()).double()
    model = GPTForSequenceClassification.from_pretrained_gpt(lm, num_labels=4, pad_id=PAD)
    assert model.classifier.out_features == 4 and model.classifier.weight.dtype == torch.float64
    for name, tensor in lm.state_dict().items():
        assert torch.equal(model.gpt.state_dict()[name], tensor), name
    assert model.gpt.lm_head.weight is model.gpt.wte.weight
    assert model.gpt.wte.weight is not lm.wte.weight  # a copy: fine-tuning leaves the language model alone


# ---------------------------------------------------------------------------------------------
# Freezing
# ---------------------------------------------------------------------------------------------


def blocks_and_top_names(kind):
    return ("bert.layers", "bert.pooler.") if kind == "bert" else ("gpt.blocks", "gpt.ln_f.")


@pytest.mark.parametrize("kind", MODELS)
def test_freeze_all_but_head_trains_only_the_classifier(kind):
    model = freeze_all_but_head(MODELS[kind]())
    assert trainable_names(model) == {"classifier.weight", "classifier.bias"}
    trainable, total = count_parameters(model)
    assert trainable == (D + 1) * 3
    assert total == sum(p.numel() for p in model.parameters())


def test_count_parameters_counts_a_tied_matrix_once():
    model = tiny_gpt()
    _, total = count_parameters(model)
    assert total == model.gpt.num_parameters() + (D + 1) * 3


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("k", range(N_LAYER + 1))
def test_freeze_except_top_layers_trains_the_top_k_blocks(kind, k):
    model = freeze_except_top_layers(MODELS[kind](), k)
    blocks, top = blocks_and_top_names(kind)
    expected = {name for name, _ in model.named_parameters()
                if name.startswith(("classifier.", top))
                or any(name.startswith(f"{blocks}.{i}.") for i in range(N_LAYER - k, N_LAYER))}
    assert trainable_names(model) == expected
    ids, mask = padded_batch()
    model(ids, attention_mask=mask, labels=torch.tensor([0, 1, 2])).loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in expected), name  # frozen weights get no gradient


@pytest.mark.parametrize("kind", MODELS)
def test_freeze_except_top_layers_rejects_k_out_of_range(kind):
    for k in (-1, N_LAYER + 1):
        with pytest.raises(ValueError, match="k must be"):
            freeze_except_top_layers(MODELS[kind](), k)
    with pytest.raises(TypeError):
        freeze_all_but_head(GPT(tiny_gpt_config()))


# ---------------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------------


def test_an_adapter_starts_as_the_identity_and_is_a_residual_bottleneck():
    adapter = Adapter(D, 4).double()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    torch.testing.assert_close(adapter(x), x, rtol=0, atol=0)
    randomize(adapter.up.parameters())
    expected = x + adapter.up(F.gelu(adapter.down(x)))
    torch.testing.assert_close(adapter(x), expected)


@pytest.mark.parametrize("kind", MODELS)
def test_add_adapters_leaves_the_output_unchanged_and_trains_adapters_norms_and_head(kind):
    model = MODELS[kind]()
    ids, mask = padded_batch()
    before = logits(model, ids, mask)
    add_adapters(model, bottleneck=4)
    torch.testing.assert_close(logits(model, ids, mask), before, rtol=0, atol=0)
    adapters = [m for m in model.modules() if isinstance(m, Adapter)]
    assert len(adapters) == 2 * N_LAYER
    norm_names = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, LayerNorm)
                  for p, _ in m.named_parameters()}
    expected = {n for n, _ in model.named_parameters() if ".adapter." in n} | norm_names \
        | {"classifier.weight", "classifier.bias"}
    assert trainable_names(model) == expected
    adapter_size = 2 * (2 * 4 * D + 4 + D)  # two adapters per block: 2·m·d + m + d each
    trainable, _ = count_parameters(model)
    assert trainable == N_LAYER * adapter_size + sum(p.numel() for n, p in model.named_parameters() if n in norm_names) \
        + (D + 1) * 3
    randomize(p for a in adapters for p in a.up.parameters())  # now the adapters do something
    assert not torch.allclose(logits(model, ids, mask), before)
    with pytest.raises(ValueError, match="already"):
        add_adapters(model)


def test_adapters_sit_on_each_sublayer_output_before_the_residual_add():
    """BERT's post-norm block with adapters is norm(x + adapter(sublayer(x))), written out by hand."""
    model = tiny_bert()
    block = model.bert.layers[0]
    original = copy.deepcopy(block)
    add_adapters(model, bottleneck=4)
    randomize(p for m in block.modules() if isinstance(m, Adapter) for p in m.parameters())
    assert isinstance(block.self_attn.out_proj, WithAdapter) and isinstance(block.feed_forward.linear2, WithAdapter)
    attention_adapter, ffn_adapter = block.self_attn.out_proj.adapter, block.feed_forward.linear2.adapter
    x = torch.randn(2, 6, D, dtype=torch.float64)
    with torch.no_grad():
        h = original.norm1(x + attention_adapter(original.self_attn(x)[0]))
        expected = original.norm2(h + ffn_adapter(original.feed_forward(h)))
        torch.testing.assert_close(block(x), expected)


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------


@given(d_in=st.integers(1, 12), d_out=st.integers(1, 12), r=st.integers(1, 6), alpha=st.floats(0.5, 64.0),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_lora_linear_is_w0_plus_scaled_ba_and_merges_exactly(d_in, d_out, r, alpha, bias, seed):
    torch.manual_seed(seed)
    base = torch.nn.Linear(d_in, d_out, bias=bias).double()
    layer = LoRALinear(base, r=r, alpha=alpha)
    x = torch.randn(3, 4, d_in, dtype=torch.float64)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # B = 0: exactly the base layer
    with torch.no_grad():
        layer.lora_B.normal_()
    assert layer.lora_A.shape == (r, d_in) and layer.lora_B.shape == (d_out, r)
    expected = base(x) + (alpha / r) * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    merged = layer.merged()
    assert type(merged) is torch.nn.Linear
    torch.testing.assert_close(merged(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(base(x), layer.base(x), rtol=0, atol=0)  # merging left the wrapped layer alone


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("targeted", [False, True])
def test_apply_lora_starts_unchanged_and_trains_only_lora_and_head(kind, targeted):
    model = MODELS[kind]()
    ids, mask = padded_batch()
    before = logits(model, ids, mask)
    targets = (["q_proj", "v_proj"] if kind == "bert" else ["c_attn", "c_fc"]) if targeted else None
    apply_lora(model, r=2, alpha=4, target_modules=targets)
    # B = 0, so the outputs are the same up to rounding: not bit for bit, because BERT's unwrapped
    # attention fuses q/k/v into one matmul, which some BLAS kernels block (and round) differently
    # from three. In float64 that is ~1e-16 relative; 1e-12 would still catch any real change.
    torch.testing.assert_close(logits(model, ids, mask), before, rtol=1e-12, atol=1e-12)
    wrapped = lora_layers(model)
    if targets is not None:
        assert {name.split(".")[-1] for name in wrapped} == set(targets) and len(wrapped) == 2 * N_LAYER
    else:
        # BERT: q, k, v, out_proj, linear1, linear2 (+ its pooler); GPT: c_attn (q | k | v), c_proj, c_fc, c_proj
        per_block = 6 if kind == "bert" else 4
        assert len(wrapped) == per_block * N_LAYER + (kind == "bert")
    assert trainable_names(model) == {f"{name}.lora_{m}" for name in wrapped for m in "AB"} \
        | {"classifier.weight", "classifier.bias"}
    trainable, _ = count_parameters(model)
    assert trainable == sum(2 * (layer.in_features + layer.out_features) for layer in wrapped.values()) + (D + 1) * 3


def test_apply_lora_never_wraps_the_head_or_the_tied_lm_head():
    model = apply_lora(tiny_gpt(), r=2, alpha=2)
    assert type(model.classifier) is torch.nn.Linear and model.classifier.weight.requires_grad
    assert type(model.gpt.lm_head) is torch.nn.Linear and model.gpt.lm_head.weight is model.gpt.wte.weight
    frozen_head = apply_lora(tiny_bert(), r=2, alpha=2, train_head=False)
    assert not frozen_head.classifier.weight.requires_grad
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, r=2, alpha=2)
    with pytest.raises(ValueError, match="no linear layer matches"):
        apply_lora(tiny_bert(), target_modules=["query"])


@pytest.mark.parametrize("kind", MODELS)
def test_lora_on_q_k_v_is_honoured_by_the_attention_fast_path(kind):
    """The fast path fuses [W_q; W_k; W_v] into one matmul: with LoRA on those projections it must not,
    else the low-rank updates would silently vanish."""
    model = MODELS[kind]()
    ids, mask = padded_batch()
    before = logits(model, ids, mask)
    apply_lora(model, r=2, alpha=4, target_modules=["q_proj", "k_proj", "v_proj"] if kind == "bert" else ["c_attn"])
    if kind == "bert":  # BERT's layer fuses three projections on its fast path; GPT's c_attn is one module already
        attention = model.bert.layers[0].self_attn
        assert attention.fast_path and not attention.projections_are_plain_linear()
    randomize(p for layer in lora_layers(model).values() for p in [layer.lora_B])
    lora_out = logits(model, ids, mask)
    assert (lora_out - before).abs().max() > 1e-3  # the updates reach the output
    merge_lora(model)
    if kind == "bert":
        assert attention.projections_are_plain_linear()  # merged: the fused fast path is back
    torch.testing.assert_close(logits(model, ids, mask), lora_out, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", MODELS)
def test_merge_lora_after_training_gives_the_same_outputs(kind):
    model = apply_lora(MODELS[kind](), r=3, alpha=6, dropout=0.1)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = padded_batch()
    labels = torch.tensor([0, 1, 2])
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
    model.eval()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name  # LoRA trained only A, B and the head
    trained = logits(model, ids, mask)
    n_wrapped = len(lora_layers(model))
    merge_lora(model)
    assert not lora_layers(model) and n_wrapped > 0
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(logits(model, ids, mask), trained, rtol=1e-10, atol=1e-10)


def test_a_lora_gpt_still_generates_with_the_kv_cache():
    torch.manual_seed(0)
    lm = apply_lora(GPT(tiny_gpt_config()).eval(), r=2, alpha=4, target_modules=["c_attn"])  # q | k | v
    randomize(layer.lora_B for layer in lora_layers(lm).values())
    prompt = torch.randint(0, VOCAB, (2, 3))
    cached = lm.generate(prompt, 6, temperature=0, use_kv_cache=True)
    recomputed = lm.generate(prompt, 6, temperature=0, use_kv_cache=False)
    assert torch.equal(cached, recomputed)


# ---------------------------------------------------------------------------------------------
# Prompt tuning
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("init", ["vocab", "random"])
def test_prompt_tuning_trains_only_the_prompt_and_head_and_reaches_the_output(kind, init):
    model = MODELS[kind]()
    tuned = apply_prompt_tuning(model, n_prompt_tokens=5, init=init, generator=torch.Generator().manual_seed(0))
    assert isinstance(tuned, PromptTuning) and tuned.model is model and tuned.n_prompt_tokens == 5
    assert trainable_names(tuned) == {"prompt", "model.classifier.weight", "model.classifier.bias"}
    assert count_parameters(tuned)[0] == 5 * D + (D + 1) * 3
    embeddings = model.bert.embeddings.word_embeddings.weight if kind == "bert" else model.gpt.wte.weight
    if init == "vocab":  # each prompt vector starts as a (non-padding) vocabulary embedding
        matches = (tuned.prompt.detach()[:, None] == embeddings.detach()[None]).all(-1)  # (P, vocab)
        assert matches.any(1).all() and not matches[:, PAD].any()
    ids, mask = padded_batch()
    out = tuned(ids, attention_mask=mask, labels=torch.tensor([0, 1, 2]))
    assert out.logits.shape == (3, 3)
    out.loss.backward()
    assert tuned.prompt.grad is not None and tuned.prompt.grad.abs().sum() > 0
    assert all(p.grad is None for name, p in tuned.named_parameters() if not p.requires_grad)
    randomize([tuned.prompt])  # (a constant shift would not do: every LayerNorm removes it)
    assert not torch.allclose(logits(tuned, ids, mask), out.logits)


@pytest.mark.parametrize("kind", MODELS)
def test_prompt_tuned_rows_still_ignore_their_padding(kind):
    """The prompt is never padding: BERT's mask is extended at the right place, and GPT reads the
    last real token P positions further on."""
    tuned = apply_prompt_tuning(MODELS[kind](), n_prompt_tokens=4, init="random")
    lengths = (9, 4, 6)
    ids, mask = padded_batch(lengths)
    batched = logits(tuned, ids, mask)
    for row, length in enumerate(lengths):
        torch.testing.assert_close(batched[row:row + 1], logits(tuned, ids[row:row + 1, :length]),
                                   rtol=1e-12, atol=1e-12)


def test_gpt_prompt_is_read_at_the_last_token_after_the_prefix():
    model = tiny_gpt()
    tuned = apply_prompt_tuning(model, n_prompt_tokens=4)
    ids, mask = padded_batch(lengths=(9, 5, 7))
    hidden = model.gpt.hidden_states(ids, prefix_embeddings=tuned.prompt)  # (B, 4 + T, D)
    assert hidden.shape == (3, 4 + ids.shape[1], D)
    expected = model.classifier(hidden[torch.arange(3), 4 + torch.tensor([8, 4, 6])])
    torch.testing.assert_close(logits(tuned, ids, mask), expected, rtol=0, atol=0)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_a_gpt_prefix_of_token_embeddings_is_those_tokens(positions):
    """Prefix vectors are read exactly like token embeddings placed before the input."""
    model = tiny_gpt(positions=positions).gpt
    prefix_ids, ids = torch.randint(0, VOCAB, (2, 4)), torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        with_prefix = model.hidden_states(ids, prefix_embeddings=model.wte(prefix_ids))
        as_tokens = model.hidden_states(torch.cat([prefix_ids, ids], dim=1))
    torch.testing.assert_close(with_prefix, as_tokens, rtol=0, atol=0)


def test_bert_prompt_goes_after_cls_and_the_pooler_reads_cls():
    model = tiny_bert()
    tuned = apply_prompt_tuning(model, n_prompt_tokens=3)
    ids, mask = padded_batch()
    with torch.no_grad():
        hidden, pooled = model.bert(ids, attention_mask=mask, prompt_embeddings=tuned.prompt)
        embedded = model.bert.embeddings(ids, torch.zeros_like(ids), tuned.prompt)
    assert hidden.shape == (3, 3 + ids.shape[1], D)
    torch.testing.assert_close(pooled, torch.tanh(model.bert.pooler(hidden[:, 0])), rtol=0, atol=0)
    plain = model.bert.embeddings(ids, torch.zeros_like(ids))  # (B, T, D)
    torch.testing.assert_close(embedded[:, :1], plain[:, :1])  # [CLS] first, at its own position
    torch.testing.assert_close(embedded[:, 4:], plain[:, 1:])  # the rest keep their positions, after the prompt
    torch.testing.assert_close(embedded[:, 1:4], model.bert.embeddings.norm(tuned.prompt).expand(3, -1, -1))


@pytest.mark.parametrize("kind", MODELS)
def test_a_prompt_that_makes_the_input_too_long_is_a_clear_error(kind):
    tuned = apply_prompt_tuning(MODELS[kind](), n_prompt_tokens=10)
    fits = torch.randint(1, VOCAB, (2, 14))  # 10 + 14 = 24 = the context
    assert tuned(fits).logits.shape == (2, 3)
    with pytest.raises(MinillmError, match="prompt vectors|prefix vectors"):
        tuned(torch.randint(1, VOCAB, (2, 15)))


def test_prompt_tuning_rejects_bad_arguments():
    with pytest.raises(ValueError, match="init"):
        apply_prompt_tuning(tiny_bert(), init="labels")
    with pytest.raises(ValueError, match="n_prompt_tokens"):
        apply_prompt_tuning(tiny_gpt(), n_prompt_tokens=0)
    with pytest.raises(ValueError, match="already"):
        apply_prompt_tuning(apply_prompt_tuning(tiny_gpt(), n_prompt_tokens=2))


# =============================================================================================
# Fine-tuning with the shared loop: the task, the recipe, the command
# =============================================================================================


def labelled(n, seed=0, vocab=VOCAB):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 12, (n,), generator=generator).tolist()
    return [(torch.randint(1, vocab, (length,), generator=generator).tolist(), i % 2) for i, length in enumerate(lengths)]


def test_classification_task_loss_is_the_mean_cross_entropy_of_the_batch():
    from minillm.finetune import ClassificationTask

    task = ClassificationTask(labelled(30), labelled(7, seed=1), pad_id=PAD)
    model = tiny_bert(seed=1).eval()
    batch = task.sample_batch(5, torch.Generator().manual_seed(0), "cpu")
    assert batch.input_ids.shape[0] == 5 and torch.all(batch.input_ids[batch.attention_mask == 0] == PAD)
    with torch.no_grad():
        logits = model(batch.input_ids, attention_mask=batch.attention_mask).logits.double()
        expected = -torch.log_softmax(logits, -1)[torch.arange(5), batch.labels].mean()
        assert torch.allclose(task.loss(model, batch).double(), expected, atol=1e-12)


def test_classification_task_gives_each_process_its_rows_of_one_global_batch():
    from minillm.finetune import ClassificationTask

    task = ClassificationTask(labelled(40), labelled(5, seed=1), pad_id=PAD)
    whole = task.sample_batch(8, torch.Generator().manual_seed(4), "cpu")
    halves = [task.sample_batch(4, torch.Generator().manual_seed(4), "cpu", rank=r, world_size=2) for r in (0, 1)]
    for rank, half in enumerate(halves):
        rows = whole.labels[rank * 4:(rank + 1) * 4]
        assert torch.equal(half.labels, rows)


def test_evaluation_batches_cover_every_example_once_and_predict_keeps_pairs_together():
    from minillm.finetune import ClassificationTask, predict

    val = labelled(23, seed=2)
    task = ClassificationTask(labelled(10), val, pad_id=PAD)
    seen = sorted(tuple(ids[mask.bool()].tolist()) for b in task.eval_batches(4, "cpu")
                  for ids, mask in zip(b.input_ids, b.attention_mask))
    assert seen == sorted(tuple(ids) for ids, _ in val)
    predicted, true = predict(tiny_bert(), task, val, "cpu", batch_size=4)
    assert sorted(true) == sorted(label for _, label in val) and len(predicted) == 23


def test_finetune_config_derives_the_step_budget_evaluations_and_warmup():
    from minillm.finetune import FinetuneConfig

    loop = FinetuneConfig(epochs=3, min_steps=0, evaluations=7, batch_size=10,
                          warmup_fraction=0.1).loop_config(steps_per_epoch=7, val_examples=25)
    assert (loop.max_iters, loop.eval_interval, loop.eval_iters, loop.warmup_iters) == (21, 3, 3, 2)
    few = FinetuneConfig(epochs=3, min_steps=600, evaluations=10).loop_config(steps_per_epoch=8, val_examples=25)
    assert (few.max_iters, few.eval_interval, few.warmup_iters) == (600, 60, 60)  # 250 labels: 75 epochs, not 3
    many = FinetuneConfig(epochs=3, min_steps=600, evaluations=10).loop_config(steps_per_epoch=1835, val_examples=25)
    assert (many.max_iters, many.eval_interval) == (5505, 551)


def test_the_collapse_guard_flags_a_one_class_classifier_of_mixed_labels_only():
    from minillm.finetune import predicts_one_class

    true = [0, 1] * 50
    assert predicts_one_class([1] * 100, true)
    assert predicts_one_class([1] * 96 + [0] * 4, true)
    assert not predicts_one_class([1] * 90 + [0] * 10, true)
    assert not predicts_one_class([1] * 100, [1] * 97 + [0] * 3)  # the labels themselves are (nearly) one class
    assert not predicts_one_class([], [])


def test_selecting_by_accuracy_keeps_the_most_accurate_evaluation_and_breaks_ties_by_loss(tmp_path):
    """Three evaluations scripted: (loss, accuracy) = (0.5, 0.6), (0.7, 0.8), (0.6, 0.8). By loss the first
    wins; by accuracy the third (0.8, then the lower loss)."""
    from minillm.finetune import ClassificationTask, FinetuneConfig
    from minillm.train import Trainer

    scripted = iter([(0.5, 0.6), (0.7, 0.8), (0.6, 0.8)] * 2)

    class Scripted(ClassificationTask):
        def evaluate_batch(self, model, batch):
            loss, accuracy = next(scripted)
            return torch.tensor(loss), torch.tensor(accuracy * len(batch.labels))

    for select_by, best in (("loss", 10), ("accuracy", 30)):
        task = Scripted(labelled(20), labelled(10, seed=1), pad_id=PAD)
        config = FinetuneConfig(out=str(tmp_path / select_by), select_by=select_by, max_iters=30, eval_interval=10,
                                eval_iters=1, batch_size=10, progress=False, device="cpu", warmup_iters=0)
        trainer = Trainer(tiny_bert(), task, config)
        trainer._finish = lambda *args: trainer.state  # noqa: E731 -- stop before the final whole-split pass
        assert trainer.fit().best_step == best, select_by


def test_the_finetune_command_takes_each_methods_recipe_unless_told_otherwise():
    for method, (lr, weight_decay) in METHOD_RECIPES.items():
        config = FinetuneCommandConfig(method=method)
        assert (config.lr, config.weight_decay) == (lr, weight_decay)
    assert FinetuneCommandConfig(method="lora", lr=3e-4, weight_decay=0.1).lr == 3e-4
    assert METHOD_RECIPES["lora"][0] != METHOD_RECIPES["head"][0]  # the recipes differ, so the check above bites
    with pytest.raises(ValueError, match="--method must be one of"):
        FinetuneCommandConfig(method="sideways")


@given(length=st.integers(0, 40), max_tokens=st.integers(1, 20))
def test_head_and_tail_keeps_a_text_that_fits_and_else_its_first_and_last_tokens(length, max_tokens):
    from minillm.finetune import head_and_tail

    ids = list(range(100, 100 + length))
    kept = head_and_tail(ids, max_tokens)
    if length <= max_tokens:
        assert kept == ids
    else:
        head = (max_tokens + 1) // 2
        assert len(kept) == max_tokens and kept == ids[:head] + ids[length - (max_tokens - head):]


def test_encode_for_bert_and_gpt_frame_the_text_and_cut_long_ones_to_head_and_tail():
    from minillm.finetune import encode_for_bert, encode_for_gpt
    from minillm.tokenization import special_token_ids, train_wordpiece

    tokenizer = train_wordpiece(["one two three four five six seven eight nine ten"] * 3, 60)
    special = special_token_ids(tokenizer)
    text = "one two three four five six seven eight nine ten"
    words = tokenizer.encode(text).ids
    [(bert_ids, label)] = encode_for_bert(tokenizer, [(text, 1)], max_length=6)
    assert label == 1 and bert_ids == [special.cls, *words[:2], *words[-2:], special.sep]
    [(gpt_ids, _)] = encode_for_gpt(tokenizer, [(text, 0)], max_length=6, end_id=special.sep)
    assert gpt_ids == [*words[:3], *words[-2:], special.sep]
    assert encode_for_bert(tokenizer, [("one two", 0)], max_length=64)[0][0] == [special.cls, *words[:2], special.sep]


def test_an_empty_example_is_refused():
    from minillm.finetune import ClassificationTask

    with pytest.raises(MinillmError, match="have no tokens"):
        ClassificationTask([([], 0), ([3], 1)], [([4], 0)], pad_id=PAD)


def test_a_training_set_of_one_class_is_refused_instead_of_training_a_majority_class_model():
    from minillm.finetune import ClassificationTask

    with pytest.raises(MinillmError, match="all 3 training examples have label 1: .* at least two classes"):
        ClassificationTask([([3], 1), ([4], 1), ([5, 6], 1)], [([4], 0), ([7], 1)], pad_id=PAD)
    ClassificationTask([([3], 1), ([4], 0)], [([4], 0)], pad_id=PAD)  # two classes: accepted


def test_the_finetune_command_trains_scores_and_refuses_a_missing_run(tmp_path, capsys):
    from minillm.__main__ import main

    bert = tmp_path / "bert"
    assert main(["pretrain", "bert", "--quick", "--out", str(bert), "--device", "cpu"]) == 0
    out = tmp_path / "lora"
    assert main(["finetune", "--quick", "--init", str(bert), "--method", "lora", "--out", str(out), "--device", "cpu"]) == 0
    import json

    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["test"]["accuracy"] <= 1 and results["report_split"] == "SST-2 dev"
    assert results["trainable_parameters"] < results["total_parameters"]
    for name in ("tokenizer.json", "model.safetensors", "log.jsonl"):
        assert (out / name).exists(), name
    imdb = tmp_path / "imdb"
    assert main(["finetune", "--quick", "--init", str(bert), "--data", "imdb", "--test-limit", "100", "--labelled", "100",
                 "--out", str(imdb), "--device", "cpu"]) == 0
    results = json.loads((imdb / "results.json").read_text())
    assert results["report_split"] == "IMDB test (100 of 25,000, stratified)"
    assert sum(map(sum, results["test"]["confusion_matrix"])) == 100
    capsys.readouterr()
    assert main(["finetune", "--quick", "--init", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err
    assert "is not a BERT run folder" in error and "Traceback" not in error
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# Training memory: weights, gradients, optimizer state, saved activations
# ---------------------------------------------------------------------------------------------


def test_training_memory_bytes_counts_weights_gradients_and_adamw_state():
    from minillm import optim
    from minillm.peft import training_memory_bytes

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))  # 16 + 10 parameters, fp32
    model[1].requires_grad_(False)
    assert training_memory_bytes(model) == 26 * 4 + 16 * 4 + 2 * 16 * 4
    assert training_memory_bytes(model, optimizer_states_per_param=0) == 26 * 4 + 16 * 4
    assert training_memory_bytes(model.double(), 1) == 26 * 8 + 2 * 16 * 8
    # the real optimizer's state: AdamW keeps exactly 2 tensors the size of each trainable parameter
    optimizer = optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(5, 3, dtype=torch.float64)).sum().backward()
    optimizer.step()
    state = sum(t.nbytes for s in optimizer.state.values() for k, t in s.items() if k != "step")
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    assert training_memory_bytes(model) == sum(p.nbytes for p in model.parameters()) + grads + state


def test_saved_activation_bytes_counts_what_backward_will_read():
    from minillm.peft import saved_activation_bytes

    x = torch.randn(5, 3)
    layer = torch.nn.Linear(3, 4)
    assert saved_activation_bytes(layer, lambda: layer(x).sum()) == x.nbytes  # the input, for the weight's gradient
    layer.weight.requires_grad_(False)
    assert saved_activation_bytes(layer, lambda: layer(x).sum()) == 0  # a bias's gradient needs no activation
    mlp = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert saved_activation_bytes(mlp, lambda: mlp(x).sum()) == x.nbytes + 5 * 4 * 4  # the input + ReLU's output (once)


@pytest.mark.parametrize("kind", MODELS)
def test_a_linear_probe_saves_only_the_classifiers_input_and_the_others_save_the_bodys(kind):
    from minillm.peft import saved_activation_bytes

    ids, mask = padded_batch()
    run = lambda model: saved_activation_bytes(model, lambda: model(ids, attention_mask=mask).logits.sum())  # noqa: E731
    head = run(freeze_all_but_head(MODELS[kind](dtype=torch.float32).train()))
    assert head == len(ids) * D * 4  # (B, C) float32: the pooled [CLS] / last-token vector
    full = run(MODELS[kind](dtype=torch.float32).train())
    for efficient in (add_adapters(MODELS[kind](dtype=torch.float32)), apply_lora(MODELS[kind](dtype=torch.float32)),
                      apply_prompt_tuning(MODELS[kind](dtype=torch.float32), n_prompt_tokens=4)):
        assert run(efficient.train()) > 10 * head  # the gradient must flow back through every block
    assert full > 10 * head
