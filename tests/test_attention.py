"""minillm.attention against PyTorch: SDPA, nn.MultiheadAttention, the fast path and the KV cache.

All comparisons run in float64. Hand-written attention and PyTorch's math kernel compute the
same sums in a different order, so they agree to ~1e-15; rtol=atol=1e-10 leaves five orders of
magnitude of headroom while any wrong scale, mask or transpose shows up at the 1e-2 level.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from minillm.attention import KVCache, MultiHeadAttention, causal_mask, fused_attention, scaled_dot_product_attention

TOL = dict(rtol=1e-10, atol=1e-10)
F64 = torch.float64


@st.composite
def attention_inputs(draw, mask_kind=None):
    batch = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 3))
    query_len, key_len = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    head_dim, value_dim = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(batch, heads, query_len, head_dim, generator=generator, dtype=F64)
    k = torch.randn(batch, heads, key_len, head_dim, generator=generator, dtype=F64)
    v = torch.randn(batch, heads, key_len, value_dim, generator=generator, dtype=F64)
    kind = mask_kind or draw(st.sampled_from(["none", "bool", "float", "bool-broadcast"]))
    mask = None
    if kind == "bool":
        mask = torch.rand(batch, heads, query_len, key_len, generator=generator) > draw(st.floats(0.0, 0.9))
    elif kind == "bool-broadcast":
        mask = torch.rand(query_len, key_len, generator=generator) > 0.5  # (L, S) for every batch and head
    elif kind == "float":
        mask = torch.randn(batch, 1, query_len, key_len, generator=generator, dtype=F64)
        mask = mask.masked_fill(torch.rand(mask.shape, generator=generator) > 0.7, float("-inf"))
    return q, k, v, mask


@given(inputs=attention_inputs(), is_causal=st.booleans(), scale=st.one_of(st.none(), st.floats(0.1, 2.0)))
def test_hand_written_attention_equals_torch_sdpa(inputs, is_causal, scale):
    q, k, v, mask = inputs
    if is_causal:
        mask = None  # documented: the two cannot be combined (tested below)
    ours = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    torch.testing.assert_close(ours, theirs, **TOL)


@given(inputs=attention_inputs(mask_kind="none"), kv_heads=st.sampled_from([1, 2]))
def test_grouped_query_attention_equals_torch_sdpa(inputs, kv_heads):
    q, k, v, _ = inputs
    q = q.repeat(1, 2 * kv_heads, 1, 1)  # (B, 2 * kv_heads * H, L, E): a multiple of kv heads
    k, v = k[:, :1].repeat(1, kv_heads, 1, 1), v[:, :1].repeat(1, kv_heads, 1, 1)
    ours = scaled_dot_product_attention(q, k, v, enable_gqa=True)
    theirs = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(ours, theirs, **TOL)


def test_a_mask_together_with_is_causal_is_refused_as_torch_documents():
    q = torch.randn(3, 4, dtype=F64)
    mask = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="cannot both"):
        scaled_dot_product_attention(q, q, q, attn_mask=mask, is_causal=True)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask, is_causal=True)


def test_attention_weights_are_the_softmax_formula_and_rows_sum_to_one():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 4, dtype=F64), torch.randn(2, 5, 4, dtype=F64), torch.randn(2, 5, 6, dtype=F64)
    out, weights = scaled_dot_product_attention(q, k, v, return_weights=True)
    scores = torch.einsum("bld,bsd->bls", q, k) / 2.0  # sqrt(d_k) = sqrt(4)
    expected = torch.exp(scores) / torch.exp(scores).sum(-1, keepdim=True)
    torch.testing.assert_close(weights, expected, **TOL)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, dtype=F64), **TOL)
    torch.testing.assert_close(out, expected @ v, **TOL)


def test_a_row_that_may_attend_to_nothing_gives_zeros_not_nan_like_torch():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 3, 4, dtype=F64), torch.randn(1, 5, 4, dtype=F64), torch.randn(1, 5, 4, dtype=F64)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False  # query 1 may attend to nothing
    out, weights = scaled_dot_product_attention(q, k, v, attn_mask=mask, return_weights=True)
    assert not torch.isnan(out).any()
    assert torch.equal(out[0, 1], torch.zeros(4, dtype=F64)) and torch.equal(weights[0, 1], torch.zeros(5, dtype=F64))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), **TOL)
    float_mask = torch.zeros(3, 5, dtype=F64).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, attn_mask=float_mask), out, **TOL)


def test_nan_inputs_still_propagate():
    q = torch.full((1, 2, 4), float("nan"), dtype=F64)
    assert torch.isnan(scaled_dot_product_attention(q, torch.randn(1, 3, 4, dtype=F64), torch.randn(1, 3, 4, dtype=F64))).all()


def test_dropout_rescales_kept_weights_and_preserves_the_mean():
    """Dropout keeps each weight with probability 1-p and divides it by 1-p: E[output] = output without dropout.

    Over 4,000 draws the sample mean's standard error is below 0.01 here; 0.05 is a 5-sigma bound."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 3, dtype=F64), torch.randn(1, 4, 3, dtype=F64), torch.randn(1, 4, 2, dtype=F64)
    exact, exact_weights = scaled_dot_product_attention(q, k, v, return_weights=True)
    samples = []
    for _ in range(4000):
        out, weights = scaled_dot_product_attention(q, k, v, dropout_p=0.3, return_weights=True)
        kept = weights != 0
        torch.testing.assert_close(weights[kept], (exact_weights / 0.7)[kept], **TOL)
        torch.testing.assert_close(out, weights @ v, **TOL)
        samples.append(out)
    torch.testing.assert_close(torch.stack(samples).mean(0), exact, rtol=0, atol=0.05)


@given(inputs=attention_inputs(mask_kind="none"), seed=st.integers(0, 1000))
def test_attention_without_positions_is_permutation_equivariant(inputs, seed):
    """Permuting the queries permutes the outputs; permuting keys and values together changes nothing."""
    q, k, v, _ = inputs
    generator = torch.Generator().manual_seed(seed)
    query_perm = torch.randperm(q.shape[-2], generator=generator)
    key_perm = torch.randperm(k.shape[-2], generator=generator)
    out = scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(scaled_dot_product_attention(q[..., query_perm, :], k, v), out[..., query_perm, :], **TOL)
    torch.testing.assert_close(scaled_dot_product_attention(q, k[..., key_perm, :], v[..., key_perm, :]), out, **TOL)


def test_causal_mask_lets_each_position_see_itself_and_the_past():
    assert causal_mask(3, 3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert causal_mask(2, 4, offset=2).tolist() == [[True, True, True, False], [True, True, True, True]]


# ---------------------------------------------------------------------------------------------
# MultiHeadAttention
# ---------------------------------------------------------------------------------------------


def twin_modules(d_model, n_heads, bias, seed):
    """Our MultiHeadAttention and torch's, with the same weights (torch packs q, k, v into in_proj)."""
    torch.manual_seed(seed)
    theirs = torch.nn.MultiheadAttention(d_model, n_heads, bias=bias, batch_first=True, dtype=F64)
    ours = MultiHeadAttention(d_model, n_heads, bias=bias).to(F64)
    with torch.no_grad():
        for index, proj in enumerate((ours.q_proj, ours.k_proj, ours.v_proj)):
            proj.weight.copy_(theirs.in_proj_weight[index * d_model:(index + 1) * d_model])
            if bias:
                proj.bias.copy_(theirs.in_proj_bias[index * d_model:(index + 1) * d_model])
        ours.out_proj.weight.copy_(theirs.out_proj.weight)
        if bias:
            ours.out_proj.bias.copy_(theirs.out_proj.bias)
    return ours.eval(), theirs.eval()


@st.composite
def mha_case(draw):
    n_heads = draw(st.integers(1, 4))
    d_model = n_heads * draw(st.integers(1, 4))
    batch, query_len, key_len = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(batch, query_len, d_model, generator=generator, dtype=F64)
    memory = torch.randn(batch, key_len, d_model, generator=generator, dtype=F64)
    cross = draw(st.booleans())
    source_len = key_len if cross else query_len
    padding = torch.rand(batch, source_len, generator=generator) < draw(st.floats(0.0, 0.5))
    padding[:, 0] = False  # every sequence keeps at least one real token (torch gives NaN otherwise)
    return dict(n_heads=n_heads, d_model=d_model, x=x, memory=memory if cross else None, padding=padding,
                bias=draw(st.booleans()), seed=draw(st.integers(0, 1000)), padded=draw(st.booleans()),
                causal=draw(st.booleans()), fast=draw(st.booleans()))


@given(case=mha_case())
def test_multi_head_attention_equals_torch_multihead_attention(case):
    """Self- and cross-attention, with and without padding and causal masks, both paths, weights too.

    torch's masks mean the opposite of ours (True = blocked), hence the ``~``."""
    ours, theirs = twin_modules(case["d_model"], case["n_heads"], case["bias"], case["seed"])
    x, memory = case["x"], case["memory"]
    source = x if memory is None else memory
    padding = case["padding"] if case["padded"] else None
    causal = case["causal"] and source.shape[1] >= x.shape[1]  # top-left causal needs S >= L to keep rows alive
    allowed = causal_mask(x.shape[1], source.shape[1]) if causal else None
    expected, expected_weights = theirs(x, source, source, key_padding_mask=padding,
                                        attn_mask=None if allowed is None else ~allowed,
                                        need_weights=True, average_attn_weights=False)
    out, _ = ours(x, memory, key_padding_mask=padding, is_causal=causal, use_fast_path=case["fast"])
    torch.testing.assert_close(out, expected, **TOL)
    out_slow, weights = ours(x, memory, key_padding_mask=padding, is_causal=causal, need_weights=True)
    torch.testing.assert_close(out_slow, expected, **TOL)
    torch.testing.assert_close(weights, expected_weights, **TOL)


@given(case=mha_case(), mask_kind=st.sampled_from(["bool", "float", "per-batch"]))
def test_fast_and_hand_written_paths_agree_with_explicit_masks(case, mask_kind):
    ours, _ = twin_modules(case["d_model"], case["n_heads"], case["bias"], case["seed"])
    x = case["x"]
    generator = torch.Generator().manual_seed(case["seed"])
    length = x.shape[1]
    if mask_kind == "bool":
        mask = torch.rand(length, length, generator=generator) > 0.4
    elif mask_kind == "per-batch":
        mask = torch.rand(x.shape[0], length, length, generator=generator) > 0.4
    else:
        mask = torch.randn(length, length, generator=generator, dtype=F64)
    fast, _ = ours(x, attn_mask=mask, is_causal=case["causal"], use_fast_path=True)
    slow, _ = ours(x, attn_mask=mask, is_causal=case["causal"], use_fast_path=False)
    torch.testing.assert_close(fast, slow, **TOL)


@given(case=mha_case(), prefill=st.integers(0, 5), fast=st.booleans())
def test_kv_cache_decoding_equals_full_causal_recomputation(case, prefill, fast):
    """Feed a prefix in one call, then one token per call: each output equals the full causal pass."""
    ours, _ = twin_modules(case["d_model"], case["n_heads"], case["bias"], case["seed"])
    x = case["x"]
    length = x.shape[1]
    prefill = min(prefill, length)
    full, _ = ours(x, is_causal=True)
    cache = ours.new_cache(x.shape[0], max_len=length)
    pieces = []
    if prefill:
        pieces.append(ours(x[:, :prefill], is_causal=True, kv_cache=cache, use_fast_path=fast)[0])
    for position in range(prefill, length):
        pieces.append(ours(x[:, position: position + 1], is_causal=True, kv_cache=cache, use_fast_path=fast)[0])
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **TOL)
    assert cache.length == length


def test_rotary_hook_sees_the_absolute_positions_of_new_tokens():
    """With a cache, the rotary callable gets offset = number of cached positions, before keys are stored."""
    ours, _ = twin_modules(8, 2, True, 0)
    seen = []

    def shift(q, k, offset):  # a stand-in "rotation": add the position to every coordinate
        seen.append(offset)
        positions = torch.arange(offset, offset + q.shape[2], dtype=q.dtype).view(1, 1, -1, 1)
        return q + positions, k + positions

    x = torch.randn(1, 5, 8, dtype=F64)
    full, _ = ours(x, is_causal=True, rotary=shift)
    cache = ours.new_cache(1, max_len=5)
    steps = [ours(x[:, :2], is_causal=True, kv_cache=cache, rotary=shift)[0]]
    steps += [ours(x[:, i: i + 1], is_causal=True, kv_cache=cache, rotary=shift)[0] for i in range(2, 5)]
    torch.testing.assert_close(torch.cat(steps, 1), full, **TOL)
    assert seen == [0, 0, 2, 3, 4]


def test_kv_cache_chunked_prefill_uses_an_offset_causal_mask():
    ours, _ = twin_modules(8, 2, True, 0)
    x = torch.randn(2, 7, 8, dtype=F64)
    full, _ = ours(x, is_causal=True)
    cache = ours.new_cache(2, max_len=7)
    chunks = [ours(x[:, a:b], is_causal=True, kv_cache=cache)[0] for a, b in ((0, 3), (3, 6), (6, 7))]
    torch.testing.assert_close(torch.cat(chunks, 1), full, **TOL)


def test_static_cache_reuses_cross_attention_keys_and_values():
    ours, _ = twin_modules(8, 2, True, 0)
    x, memory = torch.randn(2, 4, 8, dtype=F64), torch.randn(2, 5, 8, dtype=F64)
    full, _ = ours(x, memory)
    cache = ours.new_cache(2, max_len=5, static=True)
    steps = [ours(x[:, i: i + 1], memory, kv_cache=cache)[0] for i in range(4)]
    torch.testing.assert_close(torch.cat(steps, 1), full, **TOL)
    assert cache.length == 5


def test_kv_cache_refuses_to_overflow_and_reorders_rows():
    cache = KVCache(batch_size=3, n_heads=1, max_len=2, head_dim=1)
    keys = torch.arange(3.0).view(3, 1, 1, 1)
    cache.append(keys, keys)
    cache.reorder(torch.tensor([2, 2, 0]))
    assert cache.cached()[0].flatten().tolist() == [2.0, 2.0, 0.0]
    cache.append(keys, keys)
    with pytest.raises(ValueError, match="KV cache is full"):
        cache.append(keys, keys)


def test_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2, dropout=0.5)
    x = torch.randn(1, 6, 8)
    mha.eval()
    assert torch.equal(mha(x)[0], mha(x)[0])
    mha.train()
    assert not torch.equal(mha(x)[0], mha(x)[0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(d_model=10, n_heads=3), "divisible"),
    (dict(d_model=8, n_heads=2, dropout=1.0), "dropout"),
])
def test_impossible_shapes_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiHeadAttention(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_path_on_cuda_in_bf16_matches_float64_reference():
    """bf16 keeps 8 bits of mantissa: relative error ~4e-3 per operation, so 3e-2 after two matmuls and a softmax."""
    ours, _ = twin_modules(64, 4, True, 0)
    x = torch.randn(2, 16, 64, dtype=F64)
    reference, _ = ours(x, is_causal=True, use_fast_path=False)
    fast = ours.to("cuda", torch.bfloat16)(x.to("cuda", torch.bfloat16), is_causal=True)[0]
    torch.testing.assert_close(fast.double().cpu(), reference, rtol=3e-2, atol=3e-2)


@given(inputs=attention_inputs(), is_causal=st.booleans(), autocast_fp32_inputs=st.booleans())
def test_fused_attention_on_the_cpu_in_bf16_runs_in_fp32_and_matches_float64(inputs, is_causal, autocast_fp32_inputs):
    """bf16 inputs (or fp32 ones under bf16 autocast, which would cast them down) are attended in fp32:
    PyTorch's CPU bf16 flash-attention backward is 3x slower. The only bf16 rounding left is the
    inputs' and the output's, each a relative 2^-9 = 0.2%; a softmax of 0.2%-perturbed scores over
    <= 7 keys moves the output by ~1e-2 at most, so rtol=atol=3e-2 (fp32 attention would be 1e-6)."""
    q, k, v, mask = inputs
    if is_causal:
        mask = None
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)  # float64
    if autocast_fp32_inputs:
        q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fused_attention(q32, k32, v32, attn_mask=mask, is_causal=is_causal)
        assert out.dtype == torch.float32
    else:
        q32, k32, v32 = (t.to(torch.bfloat16).requires_grad_() for t in (q, k, v))
        out = fused_attention(q32, k32, v32, attn_mask=mask if mask is None or mask.dtype == torch.bool else mask.bfloat16(),
                              is_causal=is_causal)
        assert out.dtype == torch.bfloat16
        with torch.no_grad():  # exactly fp32 attention of the bf16 inputs, rounded once at the end
            in_fp32 = F.scaled_dot_product_attention(q32.float(), k32.float(), v32.float(), is_causal=is_causal,
                                                     attn_mask=mask if mask is None or mask.dtype == torch.bool
                                                     else mask.bfloat16().float())
        assert torch.equal(out, in_fp32.to(torch.bfloat16))
    torch.testing.assert_close(out.double(), expected, rtol=3e-2, atol=3e-2)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == t.dtype and torch.isfinite(t.grad).all() for t in (q32, k32, v32))


def test_fused_attention_leaves_fp32_and_float64_alone_outside_autocast():
    q = torch.randn(2, 3, 5, 4, dtype=F64)
    torch.testing.assert_close(fused_attention(q, q, q, is_causal=True),
                               F.scaled_dot_product_attention(q, q, q, is_causal=True), rtol=0, atol=0)
