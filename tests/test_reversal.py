"""The reversal task, the attention-only model and the attention-mass measure chapter 04 reports."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minillm.device import seed_everything
from minillm.reversal import (
    IGNORE_INDEX,
    AttentionOnlyModel,
    attention_mass_on,
    reversal_batch,
    sequence_accuracy,
    train_reversal,
)


@given(seed=st.integers(0, 2**31 - 1), max_len=st.integers(1, 12), data=st.data())
def test_reversal_targets_are_the_real_tokens_backwards_and_padding_is_masked(seed, max_len, data):
    min_len = data.draw(st.integers(1, max_len))
    batch = reversal_batch(5, max_len, vocab_size=7, min_len=min_len, generator=torch.Generator().manual_seed(seed))
    for row in range(5):
        n = batch.lengths[row].item()
        assert min_len <= n <= max_len
        digits = batch.inputs[row, :n].tolist()
        assert all(0 <= d < 7 for d in digits) and (batch.inputs[row, n:] == 7).all()  # 7 = the padding id
        assert batch.targets[row, :n].tolist() == digits[::-1] and (batch.targets[row, n:] == IGNORE_INDEX).all()
        assert batch.padding_mask[row].tolist() == [i >= n for i in range(max_len)]
        assert batch.source_positions[row, :n].tolist() == list(range(n - 1, -1, -1))


def test_reversal_batch_refuses_impossible_lengths():
    with pytest.raises(ValueError):
        reversal_batch(4, max_len=5, min_len=6)
    with pytest.raises(ValueError):
        reversal_batch(4, max_len=5, min_len=0)


def test_model_shapes_and_per_layer_weights_that_ignore_padding():
    model = AttentionOnlyModel(vocab_size=10, max_len=8, d_model=16, n_heads=4, n_layers=3).eval()
    batch = reversal_batch(3, 8, 10, min_len=2, generator=torch.Generator().manual_seed(0))
    logits, weights = model(batch.inputs, batch.padding_mask, need_weights=True)
    assert logits.shape == (3, 8, 10) and len(weights) == 3
    for layer in weights:
        assert layer.shape == (3, 4, 8, 8)
        torch.testing.assert_close(layer.sum(-1), torch.ones(3, 4, 8))
        assert (layer.masked_select(batch.padding_mask[:, None, None, :].expand_as(layer)) == 0).all()
    fast_logits, no_weights = model(batch.inputs, batch.padding_mask)  # the fused kernel: same numbers
    torch.testing.assert_close(fast_logits, logits, rtol=1e-5, atol=1e-5)
    assert no_weights == []
    with pytest.raises(ValueError, match="longer than max_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_attention_mass_is_one_on_a_perfect_map_and_counts_only_real_queries():
    source = torch.tensor([[2, 1, 0, 0], [3, 2, 1, 0]])  # (B, L): lengths 3 and 4
    padding = torch.tensor([[False, False, False, True], [False] * 4])
    perfect = torch.nn.functional.one_hot(source, 4).float()[:, None]  # (B, 1, L, S)
    uniform = torch.full((2, 1, 4, 4), 0.25)
    both = torch.cat([perfect, uniform], dim=1)  # (B, 2 heads, L, S)
    torch.testing.assert_close(attention_mass_on(both, source, padding), torch.tensor([1.0, 0.25]))
    wrong_on_padding = perfect.clone()
    wrong_on_padding[0, 0, 3] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # the padding query looks elsewhere: ignored
    assert attention_mass_on(wrong_on_padding, source, padding).item() == 1.0
    with pytest.raises(ValueError):
        attention_mass_on(torch.rand(4, 4), source)


def test_two_attention_layers_learn_variable_length_reversal_in_a_few_hundred_steps():
    seed_everything(0)
    model = AttentionOnlyModel(vocab_size=10, max_len=6, d_model=32, n_heads=2, n_layers=2)
    run = train_reversal(model, steps=150, batch_size=64, min_len=2, lr=1e-2, generator=torch.Generator().manual_seed(0))
    assert len(run.losses) == 150 and run.losses[-1] < 0.25 * run.losses[0]
    held_out = reversal_batch(500, 6, 10, min_len=2, generator=torch.Generator().manual_seed(1))
    token_accuracy, sequence_accuracy_ = sequence_accuracy(model, held_out)
    assert token_accuracy > 0.95 and sequence_accuracy_ > 0.8
