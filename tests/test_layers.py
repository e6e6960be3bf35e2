"""minillm.layers against their formulas and PyTorch's own layers.

Tolerance: everything is compared in float64 with rtol=1e-9, atol=1e-10. The hand-written
formulas and PyTorch's kernels do the same arithmetic in a different order (a fused one-pass
variance, a different summation tree in a matmul), which costs a few ulps, ~1e-15 relative per
operation; a Transformer block chains a few dozen operations, so 1e-9 leaves five orders of
magnitude of headroom, while any wrong formula (a missing scale, an unbiased variance, a norm in
the wrong place) shows up at 1e-3 or above.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from minillm.layers import (
    GELU,
    DecoderBlock,
    EncoderBlock,
    FeedForward,
    LayerNorm,
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    gelu,
    layer_norm,
    load_torch_layer_weights,
    make_activation,
    sinusoidal_table,
)

F64 = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)


@pytest.fixture(autouse=True)
def no_torch_fast_path():
    """torch's encoder/decoder layers take a nested-tensor "fast path" in eval mode that zeroes the
    outputs at padded positions; switch it off so both sides compute the textbook formula."""
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(True)


def random_tensor(shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3)


# ---------------------------------------------------------------------------------------------
# LayerNorm, GELU, feed-forward
# ---------------------------------------------------------------------------------------------


@given(shape=shapes, d_model=st.integers(1, 16), eps=st.sampled_from([1e-5, 1e-12, 0.1]),
       bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_layer_norm_matches_torch_layer_norm(shape, d_model, eps, bias, seed):
    x = random_tensor([*shape, d_model], seed, scale=3.0) + 5.0  # a large mean: centring must matter
    theirs = torch.nn.LayerNorm(d_model, eps=eps, bias=bias, dtype=F64)
    with torch.no_grad():
        theirs.weight.copy_(random_tensor([d_model], seed + 1))
        if bias:
            theirs.bias.copy_(random_tensor([d_model], seed + 2))
    for fast_path in (False, True):
        ours = LayerNorm(d_model, eps=eps, bias=bias, fast_path=fast_path).to(F64)
        ours.load_state_dict(theirs.state_dict())
        torch.testing.assert_close(ours(x), theirs(x), **TOL)


def test_layer_norm_output_has_zero_mean_and_unit_biased_variance_per_token():
    x = random_tensor([4, 7, 32], 0, scale=10.0)
    y = layer_norm(x, None, None, eps=0.0)
    torch.testing.assert_close(y.mean(-1), torch.zeros(4, 7, dtype=F64), **TOL)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(4, 7, dtype=F64), **TOL)


@given(shape=shapes, approximate=st.sampled_from(["none", "tanh"]), seed=st.integers(0, 2**31 - 1))
def test_gelu_exact_and_tanh_match_torch(shape, approximate, seed):
    x = random_tensor(shape, seed, scale=4.0)
    expected = F.gelu(x, approximate=approximate)
    torch.testing.assert_close(gelu(x, approximate), expected, **TOL)
    torch.testing.assert_close(GELU(approximate, fast_path=False)(x), expected, **TOL)
    torch.testing.assert_close(GELU(approximate)(x), expected, **TOL)


def test_gelu_is_x_times_the_normal_cdf_and_tanh_stays_close():
    x = torch.linspace(-6, 6, 1001, dtype=F64)
    normal_cdf = torch.distributions.Normal(torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64)).cdf(x)
    torch.testing.assert_close(gelu(x), x * normal_cdf, **TOL)
    assert (gelu(x, "tanh") - gelu(x)).abs().max() < 1e-3  # the approximation's known error is ~5e-4
    with pytest.raises(ValueError, match="approximate"):
        gelu(x, "sigmoid")
    with pytest.raises(ValueError, match="unknown activation"):
        make_activation("swish")


def test_feed_forward_is_w2_act_w1_x():
    torch.manual_seed(0)
    ffn = FeedForward(8, 32, activation="relu").to(F64)
    x = random_tensor([2, 5, 8], 1)
    expected = torch.relu(x @ ffn.linear1.weight.T + ffn.linear1.bias) @ ffn.linear2.weight.T + ffn.linear2.bias
    torch.testing.assert_close(ffn(x), expected, **TOL)


# ---------------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------------


def test_sinusoidal_table_is_the_papers_formula():
    d_model, max_len = 10, 50
    table = sinusoidal_table(max_len, d_model)
    for pos in (0, 1, 7, 49):
        for i in range(d_model // 2):
            angle = pos / 10000 ** (2 * i / d_model)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)  # float32 table
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_sinusoidal_encoding_of_a_shifted_position_is_a_fixed_rotation():
    """PE(pos + k) = R_k PE(pos) for a block-diagonal rotation R_k that does not depend on pos."""
    d_model, shift = 8, 5
    table = sinusoidal_table(100, d_model).double()
    frequencies = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=F64) / d_model)
    for i, frequency in enumerate(frequencies):
        c, s = math.cos(shift * frequency), math.sin(shift * frequency)
        sin_part, cos_part = table[:-shift, 2 * i], table[:-shift, 2 * i + 1]
        torch.testing.assert_close(table[shift:, 2 * i], sin_part * c + cos_part * s, rtol=0, atol=1e-6)
        torch.testing.assert_close(table[shift:, 2 * i + 1], cos_part * c - sin_part * s, rtol=0, atol=1e-6)


def test_positional_modules_return_the_rows_of_the_positions_asked_for():
    sinusoidal, learned = SinusoidalPositionalEncoding(6, 20), LearnedPositionalEmbedding(6, 20)
    torch.testing.assert_close(sinusoidal(4, offset=3), sinusoidal_table(20, 6)[3:7])
    assert torch.equal(learned(4, offset=3), learned.weight[3:7])
    assert not list(sinusoidal.parameters()) and list(sinusoidal.state_dict()) == []  # fixed, not saved
    for module in (sinusoidal, learned, RotaryEmbedding(6, 20)):
        with pytest.raises(ValueError, match="longer than the model's context"):
            module(torch.zeros(1, 1, 21, 6), torch.zeros(1, 1, 21, 6)) if isinstance(module, RotaryEmbedding) else module(21)
        with pytest.raises(ValueError, match="longer than the model's context"):
            module.rotate(torch.zeros(1, 1, 2, 6), offset=19) if isinstance(module, RotaryEmbedding) else module(2, offset=19)


@given(head_dim=st.sampled_from([2, 4, 8, 16]), seq_len=st.integers(1, 12), shift=st.integers(0, 20),
       seed=st.integers(0, 2**31 - 1))
def test_rotary_scores_depend_only_on_relative_position(head_dim, seq_len, shift, seed):
    """<R_m q, R_n k> = <R_{m+s} q, R_{n+s} k>: shifting every position changes no attention score."""
    rotary = RotaryEmbedding(head_dim, max_len=64).double()
    q, k = random_tensor([2, 3, seq_len, head_dim], seed), random_tensor([2, 3, seq_len, head_dim], seed + 1)
    q0, k0 = rotary(q, k, offset=0)
    q1, k1 = rotary(q, k, offset=shift)
    torch.testing.assert_close(q0 @ k0.transpose(-2, -1), q1 @ k1.transpose(-2, -1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q1.norm(dim=-1), q.norm(dim=-1), rtol=1e-6, atol=1e-6)  # a rotation keeps lengths


def test_rotary_is_complex_multiplication_by_e_to_the_i_m_theta():
    """Pair feature i with i + d/2 as a complex number z; the rotation at position m is z · exp(i m θ_i)."""
    head_dim, max_len = 8, 16
    rotary = RotaryEmbedding(head_dim, max_len).double()
    x = random_tensor([max_len, head_dim], 3)
    z = torch.complex(x[:, : head_dim // 2], x[:, head_dim // 2:])  # (T, d/2)
    theta = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=F64) / head_dim)
    angles = torch.arange(max_len, dtype=F64).unsqueeze(1) * theta  # (T, d/2)
    rotated = z * torch.polar(torch.ones_like(angles), angles)
    torch.testing.assert_close(rotary.rotate(x), torch.cat([rotated.real, rotated.imag], dim=-1), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Encoder and decoder blocks against torch.nn.TransformerEncoderLayer / TransformerDecoderLayer
# ---------------------------------------------------------------------------------------------


TORCH_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


@st.composite
def block_case(draw):
    n_heads = draw(st.integers(1, 4))
    d_model = n_heads * draw(st.integers(1, 4))
    batch, length, memory_len = draw(st.integers(1, 3)), draw(st.integers(1, 7)), draw(st.integers(1, 7))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    memory_lengths = torch.randint(1, memory_len + 1, (batch,), generator=generator)
    return dict(n_heads=n_heads, d_model=d_model, d_ff=draw(st.integers(1, 12)), batch=batch, length=length,
                memory_len=memory_len, seed=seed, norm_first=draw(st.booleans()), bias=draw(st.booleans()),
                activation=draw(st.sampled_from(list(TORCH_ACTIVATIONS))), causal=draw(st.booleans()),
                padded=draw(st.booleans()), fast=draw(st.booleans()),
                padding=torch.arange(length) >= lengths[:, None],  # (B, T) True at padding, on the right
                memory_padding=torch.arange(memory_len) >= memory_lengths[:, None])


def torch_layer(case, decoder: bool):
    torch.manual_seed(case["seed"])
    cls = torch.nn.TransformerDecoderLayer if decoder else torch.nn.TransformerEncoderLayer
    layer = cls(case["d_model"], case["n_heads"], dim_feedforward=case["d_ff"], dropout=0.0,
                activation=TORCH_ACTIVATIONS[case["activation"]], batch_first=True, norm_first=case["norm_first"],
                bias=case["bias"], dtype=F64)
    with torch.no_grad():  # LayerNorm starts at (1, 0): perturb it so a swapped gain or shift would show
        for name, parameter in layer.named_parameters():
            if name.startswith("norm"):
                parameter.add_(0.1 * torch.randn_like(parameter))
    return layer.eval()


def our_block(case, decoder: bool, theirs):
    cls = DecoderBlock if decoder else EncoderBlock
    ours = cls(case["d_model"], case["n_heads"], case["d_ff"], dropout=0.0, activation=case["activation"],
               norm_first=case["norm_first"], bias=case["bias"]).to(F64)
    load_torch_layer_weights(ours, theirs)
    for module in ours.modules():
        if hasattr(module, "fast_path"):
            module.fast_path = case["fast"]  # attention, LayerNorm and GELU: fused or hand-written
    return ours.eval()


def torch_causal_mask(length: int) -> torch.Tensor:
    """torch's layers take boolean masks with the opposite meaning of SDPA's: True = may NOT attend."""
    return torch.ones(length, length, dtype=torch.bool).triu(diagonal=1)


@given(case=block_case())
def test_encoder_block_equals_torch_transformer_encoder_layer(case):
    theirs = torch_layer(case, decoder=False)
    ours = our_block(case, decoder=False, theirs=theirs)
    x = random_tensor([case["batch"], case["length"], case["d_model"]], case["seed"])
    padding = case["padding"] if case["padded"] else None
    causal = torch_causal_mask(case["length"]) if case["causal"] else None
    expected = theirs(x, src_mask=causal, src_key_padding_mask=padding, is_causal=case["causal"])
    torch.testing.assert_close(ours(x, key_padding_mask=padding, is_causal=case["causal"]), expected, **TOL)


@given(case=block_case())
def test_decoder_block_equals_torch_transformer_decoder_layer(case):
    theirs = torch_layer(case, decoder=True)
    ours = our_block(case, decoder=True, theirs=theirs)
    x = random_tensor([case["batch"], case["length"], case["d_model"]], case["seed"])
    memory = random_tensor([case["batch"], case["memory_len"], case["d_model"]], case["seed"] + 1)
    padding = case["padding"] if case["padded"] else None
    memory_padding = case["memory_padding"] if case["padded"] else None
    causal = torch_causal_mask(case["length"]) if case["causal"] else None
    expected = theirs(x, memory, tgt_mask=causal, tgt_key_padding_mask=padding, memory_key_padding_mask=memory_padding,
                      tgt_is_causal=case["causal"])
    out = ours(x, memory, is_causal=case["causal"], key_padding_mask=padding, memory_key_padding_mask=memory_padding)
    torch.testing.assert_close(out, expected, **TOL)


def test_pre_norm_keeps_an_identity_path_and_post_norm_normalizes_the_output():
    torch.manual_seed(0)
    x = random_tensor([2, 5, 16], 0, scale=10.0) + 3.0
    post = EncoderBlock(16, 4, 32, norm_first=False).to(F64).eval()
    out = post(x)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 5, dtype=F64), **TOL)  # post-norm ends on a LayerNorm
    pre = EncoderBlock(16, 4, 32, norm_first=True).to(F64).eval()
    with torch.no_grad():  # zero both branches' last layers: a pre-norm block is then exactly the identity
        for linear in (pre.self_attn.out_proj, pre.feed_forward.linear2):
            linear.weight.zero_()
            linear.bias.zero_()
    torch.testing.assert_close(pre(x), x, **TOL)


@pytest.mark.parametrize("cross_attention", [True, False], ids=["encoder-decoder", "gpt-block"])
@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-norm", "post-norm"])
def test_decoder_block_with_kv_caches_equals_full_recomputation(cross_attention, norm_first):
    torch.manual_seed(0)
    block = DecoderBlock(16, 4, 32, norm_first=norm_first, cross_attention=cross_attention).to(F64).eval()
    rotary = None if cross_attention else RotaryEmbedding(4, 32).double()
    x = random_tensor([2, 9, 16], 1)
    memory = random_tensor([2, 6, 16], 2) if cross_attention else None
    memory_padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2]) if cross_attention else None
    full = block(x, memory, memory_key_padding_mask=memory_padding, rotary=rotary)
    cache = block.self_attn.new_cache(2, 9)
    cross_cache = block.multihead_attn.new_cache(2, 6, static=True) if cross_attention else None
    steps = [block(x[:, :4], memory, memory_key_padding_mask=memory_padding, kv_cache=cache, cross_kv_cache=cross_cache,
                   rotary=rotary)]  # a prompt of 4, then one token at a time
    for t in range(4, 9):
        steps.append(block(x[:, t:t + 1], memory, memory_key_padding_mask=memory_padding, kv_cache=cache,
                           cross_kv_cache=cross_cache, rotary=rotary))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)


def test_blocks_return_attention_weights_when_asked():
    torch.manual_seed(0)
    x, memory = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    _, weights = EncoderBlock(8, 2, 16)(x, need_weights=True)
    assert weights.shape == (2, 2, 5, 5)
    _, self_weights, cross_weights = DecoderBlock(8, 2, 16).eval()(x, memory, need_weights=True)
    assert self_weights.shape == (2, 2, 5, 5) and cross_weights.shape == (2, 2, 5, 3)
    assert torch.all(self_weights.triu(diagonal=1) == 0)  # causal by default
    with pytest.raises(ValueError, match="memory must be given"):
        DecoderBlock(8, 2, 16)(x)
    with pytest.raises(ValueError, match="memory must be given"):
        DecoderBlock(8, 2, 16, cross_attention=False)(x, memory)
