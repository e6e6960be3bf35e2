"""The encoder-decoder Transformer: teacher forcing, padding, causality, and decoding.

Decoding is checked against brute force: with a beam wide enough to keep every hypothesis, beam
search must return the sequence with the highest log-probability among *all* sequences up to the
length limit, enumerated one by one and scored by a teacher-forced forward pass. Comparisons of
logits are in float64 (rtol 1e-9, atol 1e-10: the two computations differ only in summation order).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.transformer import Transformer, TransformerConfig

F64 = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)
PAD, BOS, EOS = 0, 1, 2


def tiny_model(seed=0, vocab=7, norm_first=True, positions="sinusoidal", max_len=16, d_model=16, **overrides):
    torch.manual_seed(seed)
    config = TransformerConfig(src_vocab_size=9, tgt_vocab_size=vocab, d_model=d_model, n_heads=2, n_encoder_layers=2,
                               n_decoder_layers=2, d_ff=32, dropout=0.0, max_len=max_len, norm_first=norm_first,
                               positions=positions, **overrides)
    model = Transformer(config).to(F64).eval()
    with torch.no_grad():  # random, peaked output distributions, so that decoding choices are not near-ties
        model.output.weight.mul_(4.0)
    return model


def random_source(seed, batch=3, length=6, vocab=9):
    generator = torch.Generator().manual_seed(seed)
    src = torch.randint(3, vocab, (batch, length), generator=generator)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    return src.masked_fill(torch.arange(length) >= lengths[:, None], PAD)  # right padding


def test_loss_is_the_mean_cross_entropy_over_non_padding_targets():
    model = tiny_model()
    src = random_source(0)
    tgt = torch.tensor([[BOS, 3, 4, EOS, PAD], [BOS, 5, EOS, PAD, PAD], [BOS, 3, 3, 6, EOS]])
    logits, loss = model(src, tgt[:, :-1], tgt[:, 1:])
    targets = tgt[:, 1:]
    keep = targets != PAD
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    torch.testing.assert_close(loss, -(log_probs[keep]).mean(), **TOL)
    _, smoothed = model(src, tgt[:, :-1], tgt[:, 1:], label_smoothing=0.1)
    expected = F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1), ignore_index=PAD, label_smoothing=0.1)
    torch.testing.assert_close(smoothed, expected, **TOL)


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-norm", "post-norm"])
def test_a_target_position_never_sees_later_target_tokens(norm_first):
    model = tiny_model(norm_first=norm_first)
    src = random_source(1)
    tgt = torch.randint(3, 7, (3, 6))
    logits, _ = model(src, tgt)
    changed = tgt.clone()
    changed[:, 4:] = torch.randint(3, 7, (3, 2))
    changed_logits, _ = model(src, changed)
    torch.testing.assert_close(changed_logits[:, :4], logits[:, :4], **TOL)


@given(seed=st.integers(0, 2**31 - 1), extra=st.integers(1, 4), positions=st.sampled_from(["sinusoidal", "learned"]))
@settings(max_examples=15)
def test_extra_source_padding_changes_nothing(seed, extra, positions):
    model = tiny_model(seed % 1000, positions=positions)
    src = random_source(seed)
    tgt = torch.randint(3, 7, (3, 5), generator=torch.Generator().manual_seed(seed))
    padded = torch.cat([src, torch.full((3, extra), PAD)], dim=1)
    torch.testing.assert_close(model(padded, tgt)[0], model(src, tgt)[0], **TOL)


def test_output_layer_is_tied_to_the_target_embedding_when_asked():
    tied, untied = tiny_model(), tiny_model(tie_output_embedding=False)
    assert tied.output.weight is tied.tgt_embedding.weight
    assert untied.output.weight is not untied.tgt_embedding.weight
    assert untied.num_parameters() == tied.num_parameters() + 7 * 16


@given(seed=st.integers(0, 2**31 - 1), norm_first=st.booleans())
@settings(max_examples=15)
def test_greedy_decoding_with_kv_cache_equals_recomputation(seed, norm_first):
    model = tiny_model(seed % 1000, norm_first=norm_first)
    src = random_source(seed)
    assert model.greedy_decode(src, 10, use_kv_cache=True) == model.greedy_decode(src, 10, use_kv_cache=False)


def test_greedy_decoding_picks_the_argmax_of_a_teacher_forced_pass_at_every_step():
    model = tiny_model(3)
    src = random_source(3, batch=1)
    output = model.greedy_decode(src, 8)[0]
    tgt = torch.tensor([[BOS, *output]])
    logits, _ = model(src, tgt)
    logits[..., [PAD, BOS]] = float("-inf")
    expected = logits.argmax(-1)[0].tolist()  # the next token after each prefix
    assert expected[: len(output)] == output
    assert len(output) == 8 or expected[len(output)] == EOS  # it stopped because EOS was the argmax


@given(seed=st.integers(0, 2**31 - 1))
@settings(max_examples=15)
def test_beam_search_with_one_beam_is_greedy_decoding(seed):
    model = tiny_model(seed % 1000)
    src = random_source(seed)
    assert model.beam_search(src, 8, beam_size=1) == model.greedy_decode(src, 8)


def sequence_log_prob(model, src, output: list[int], ended: bool) -> float:
    """log p(output [+ EOS] | src) by one teacher-forced pass, with the decoder's banned tokens masked."""
    tgt = torch.tensor([[BOS, *output, EOS]]) if ended else torch.tensor([[BOS, *output]])
    logits, _ = model(src, tgt[:, :-1])
    logits[..., [PAD, BOS]] = float("-inf")
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, tgt[:, 1:, None])  # (1, T, 1)
    return log_probs.sum().item()


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
@pytest.mark.parametrize("seed", range(12))
def test_a_beam_wide_enough_for_every_hypothesis_finds_the_most_likely_output(seed, length_penalty):
    """Vocabulary {PAD, BOS, EOS, a, b, c}; outputs of at most 4 tokens: 1 + 3 + 9 + 27 ended ones and
    81 cut at the limit. A beam of 128 never prunes, so beam search must return brute force's best.
    (Untied output weights make the random models less repetitive; in some of these cases the best
    output is not the greedy one, so the comparison is not trivially passed by greedy decoding.)"""
    model = tiny_model(seed, vocab=6, tie_output_embedding=False)
    src = random_source(seed, batch=1)
    max_new = 4
    candidates = []
    for length in range(max_new + 1):
        for output in itertools.product([3, 4, 5], repeat=length):
            ended = length < max_new  # at the limit, the output is cut without an EOS
            score = sequence_log_prob(model, src, list(output), ended)
            candidates.append((score / (length + ended) ** length_penalty if length + ended else score, list(output)))
    best_score, best = max(candidates)
    assert model.beam_search(src, max_new, beam_size=128, length_penalty=length_penalty)[0] == best


def test_beam_search_differs_from_greedy_decoding_where_greedy_is_not_the_most_likely():
    """Seed 0 of the brute-force test: greedy runs on to the length limit, while ending at once is more likely."""
    model = tiny_model(0, vocab=6, tie_output_embedding=False)
    src = random_source(0, batch=1)
    greedy, beam = model.greedy_decode(src, 4)[0], model.beam_search(src, 4, beam_size=4)[0]
    assert beam != greedy
    assert sequence_log_prob(model, src, beam, ended=len(beam) < 4) > sequence_log_prob(model, src, greedy, ended=len(greedy) < 4)


def test_attention_maps_are_distributions_that_respect_padding_and_causality():
    model = tiny_model()
    src = torch.tensor([[4, 5, 6, PAD], [4, 5, 6, 7]])
    tgt_in = torch.tensor([[BOS, 3, 4], [BOS, 5, 5]])
    maps = model.attention_maps(src, tgt_in)
    assert [len(maps[k]) for k in ("encoder", "decoder", "cross")] == [2, 2, 2]
    assert maps["encoder"][0].shape == (2, 2, 4, 4) and maps["cross"][1].shape == (2, 2, 3, 4)
    for weights in maps["encoder"] + maps["cross"]:
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1], dtype=F64), **TOL)
        assert torch.all(weights[0, ..., 3] == 0)  # nobody attends to the padding of the first source
    assert all(torch.all(w.triu(diagonal=1) == 0) for w in maps["decoder"])  # the decoder never looks ahead


def test_impossible_configs_and_lengths_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        TransformerConfig(src_vocab_size=5, tgt_vocab_size=5, d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="dropout"):
        TransformerConfig(src_vocab_size=5, tgt_vocab_size=5, dropout=1.0)
    model = tiny_model(max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        model.greedy_decode(torch.full((1, 9), 3), 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.beam_search(torch.full((1, 3), 3), 8)
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.full((1, 9), 3), torch.full((1, 2), 3))
