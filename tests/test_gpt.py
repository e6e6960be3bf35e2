"""minillm.gpt: the loss is the next-token cross-entropy, the model is causal, GPT-2's init, and sampling.

Sampling is checked against its definition: greedy decoding with the KV cache gives exactly the
tokens of full recomputation (also after the context slides), top-k keeps exactly the k most likely
tokens, top-p the smallest prefix of the sorted distribution reaching p, and the empirical
frequencies of many samples match softmax(logits / T) within binomial error bounds.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm import MinillmError
from minillm.gpt import GPT, GPTConfig, sample_next_token


def tiny_gpt(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    sizes = dict(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    return GPT(GPTConfig(**{**sizes, **overrides})).eval()


def test_loss_is_the_mean_next_token_cross_entropy():
    model = tiny_gpt()
    idx = torch.randint(0, 11, (3, 10))
    targets = torch.randint(0, 11, (3, 10))
    targets[0, :4] = -100  # ignored positions
    logits, loss = model(idx, targets)
    log_probs = torch.log_softmax(logits, dim=-1)
    keep = targets != -100
    expected = -log_probs[keep].gather(-1, targets[keep].unsqueeze(-1)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_a_position_never_sees_the_tokens_after_it(positions):
    model = tiny_gpt(positions=positions)
    idx = torch.randint(0, 11, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 11
    torch.testing.assert_close(model(changed)[0][:, :7], model(idx)[0][:, :7])


def test_init_follows_gpt2_and_the_output_layer_is_tied():
    model = GPT(GPTConfig(vocab_size=500, block_size=64, n_layer=8, n_head=4, n_embd=128))
    assert model.lm_head.weight is model.wte.weight
    residual_std = 0.02 / math.sqrt(2 * 8)
    for block in model.blocks:
        assert block.attn.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
        assert block.mlp.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
        assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    untied = GPT(GPTConfig(vocab_size=500, block_size=64, n_layer=1, n_head=4, n_embd=128, tie_weights=False))
    assert untied.num_parameters() == GPT(GPTConfig(vocab_size=500, block_size=64, n_layer=1, n_head=4,
                                                    n_embd=128)).num_parameters() + 500 * 128


def test_a_fresh_model_predicts_nearly_uniformly():
    """With GPT-2's small init the first loss is close to ln(vocab_size), the loss of a uniform guess."""
    model = GPT(GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32))
    idx, targets = torch.randint(0, 65, (8, 32)), torch.randint(0, 65, (8, 32))
    assert model(idx, targets)[1].item() == pytest.approx(math.log(65), abs=0.1)


@settings(max_examples=10)
@given(seed=st.integers(0, 1000), positions=st.sampled_from(["learned", "rotary"]), prompt_len=st.integers(1, 20),
       new=st.integers(1, 30))
def test_greedy_decoding_with_the_kv_cache_equals_recomputation_even_past_the_context(seed, positions, prompt_len, new):
    model = tiny_gpt(seed, positions=positions)  # context 16: prompts and outputs run past it
    prompt = torch.randint(0, 11, (2, prompt_len), generator=torch.Generator().manual_seed(seed))
    cached = model.generate(prompt, new, temperature=0, use_kv_cache=True)
    recomputed = model.generate(prompt, new, temperature=0, use_kv_cache=False)
    assert torch.equal(cached, recomputed) and cached.shape == (2, prompt_len + new)
    assert torch.equal(cached[:, :prompt_len], prompt)


def test_generate_sizes_its_kv_caches_to_the_final_length_not_the_whole_context(monkeypatch):
    model = tiny_gpt(0)  # context 16
    sizes = []
    original = type(model).new_caches

    def recording(self, *args, **kwargs):
        caches = original(self, *args, **kwargs)
        sizes.append(caches[0].max_len)
        return caches

    monkeypatch.setattr(type(model), "new_caches", recording)
    model.generate(torch.tensor([[1, 2, 3]]), 5, temperature=0)
    assert sizes == [8]  # 3 prompt + 5 new: one allocation, not 16
    sizes.clear()
    model.generate(torch.tensor([[1, 2, 3]]), 20, temperature=0)  # past the context: refilled at the full 16
    assert sizes[0] == 16 and set(sizes) == {16}


def test_greedy_decoding_takes_the_argmax_of_the_last_window():
    model = tiny_gpt(3)
    out = model.generate(torch.tensor([[1, 2, 3]]), 20, temperature=0)
    for t in range(3, out.shape[1]):
        window = out[:, max(0, t - 16):t]  # the model sees at most block_size tokens
        assert out[0, t].item() == model(window)[0][0, -1].argmax().item()


def test_sampling_with_the_same_generator_seed_repeats_and_the_model_returns_to_its_mode():
    model = tiny_gpt(1)
    model.train()
    prompt = torch.tensor([[0, 1]])
    a = model.generate(prompt, 10, generator=torch.Generator().manual_seed(5))
    b = model.generate(prompt, 10, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and model.training


def test_top_k_keeps_exactly_the_k_most_likely_tokens():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    draws = {sample_next_token(logits, top_k=2, generator=torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert draws == {1, 3}


@given(probs=st.lists(st.floats(0.01, 1.0), min_size=2, max_size=8), top_p=st.floats(0.05, 0.99))
def test_top_p_keeps_the_smallest_prefix_of_the_sorted_distribution_reaching_p(probs, top_p):
    probs = torch.tensor(probs, dtype=torch.float64)
    probs = probs / probs.sum()
    logits = probs.log().unsqueeze(0)
    order = torch.argsort(probs, descending=True, stable=True)
    cumulative = torch.cumsum(probs[order], 0)
    n_keep = int((cumulative < top_p).sum()) + 1  # tokens until the mass first reaches top_p
    expected = set(order[:n_keep].tolist())
    allowed = set()
    for seed in range(300):
        allowed.add(sample_next_token(logits, top_p=top_p, generator=torch.Generator().manual_seed(seed)).item())
    assert allowed <= expected
    assert order[0].item() in allowed  # the most likely token always stays


def test_sample_frequencies_follow_softmax_of_logits_over_temperature():
    """20,000 draws per temperature; each frequency must lie within 5 binomial standard errors."""
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    n = 20_000
    for temperature in (0.5, 1.0, 2.0):
        expected = torch.softmax(logits[0] / temperature, dim=-1)
        draws = sample_next_token(logits.expand(n, -1), temperature=temperature, generator=torch.Generator().manual_seed(0))
        frequencies = torch.bincount(draws, minlength=4).double() / n
        bound = 5 * torch.sqrt(expected * (1 - expected) / n)
        assert torch.all((frequencies - expected).abs() <= bound), (temperature, frequencies, expected)


def test_stop_token_ends_rows_and_pads_them():
    model = tiny_gpt(2)
    greedy = model.generate(torch.tensor([[4]]), 12, temperature=0)[0, 1:].tolist()
    stop = greedy[3]
    out = model.generate(torch.tensor([[4], [4]]), 12, temperature=0, stop_token=stop)
    first = greedy.index(stop)
    assert out.shape[1] == 1 + first + 1 and out[0, 1:].tolist() == greedy[:first + 1]


def test_bad_arguments_are_refused():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.tensor([[1]]), 3, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(torch.tensor([[1]]), 3, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(torch.tensor([[1]]), 3, top_k=0)
    with pytest.raises(MinillmError, match="context of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="activation"):
        GPTConfig(activation="relu")


def test_the_fast_and_hand_written_paths_give_the_same_logits_and_gradients():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)).double()
    idx = torch.randint(0, 11, (2, 16))
    fast_logits, fast_loss = model(idx, idx)
    fast_loss.backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for module in model.modules():
        if hasattr(module, "fast_path"):
            module.fast_path = False
    slow_logits, slow_loss = model(idx, idx)
    slow_loss.backward()
    torch.testing.assert_close(slow_logits, fast_logits, rtol=1e-10, atol=1e-12)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, fast_grads[name], rtol=1e-9, atol=1e-12, msg=name)


def test_last_only_returns_the_last_positions_logits():
    model = tiny_gpt()
    idx = torch.randint(0, 11, (2, 9))
    full, _ = model(idx)
    last, _ = model(idx, last_only=True)
    torch.testing.assert_close(last, full[:, -1:])
    assert F.softmax(last, -1).sum(-1).allclose(torch.ones(2, 1))


def test_the_hand_written_attention_path_gives_the_fused_kernels_logits():
    """``attn.fused = False`` swaps PyTorch's SDPA kernel for minillm's own formula: the same function."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=30, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0)).double().eval()
    idx = torch.randint(0, 30, (3, 16))
    fused = model(idx)[0]
    for block in model.blocks:
        block.attn.fused = False
    torch.testing.assert_close(model(idx)[0], fused, rtol=1e-10, atol=1e-12)  # float64: only rounding differs


def test_a_gpt_run_saved_with_the_old_block_names_still_loads(tmp_path):
    """minillm 0.1 saved GPT blocks as norm1 / self_attn.{q,k,v}_proj / feed_forward.linear1 ...; today's names are
    GPT-2's. runs.load_model renames, and the model computes what the old one did."""
    from safetensors.torch import save_file

    from minillm import runs

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=30, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    model = GPT(config).eval()
    old = {}
    for name, tensor in model.state_dict().items():
        if ".attn.c_attn." in name:
            prefix, kind = name.split(".attn.c_attn.")
            for part, chunk in zip("qkv", tensor.chunk(3)):
                old[f"{prefix}.self_attn.{part}_proj.{kind}"] = chunk.clone()
            continue
        for new_name, old_name in (("ln_1.", "norm1."), ("ln_2.", "norm3."), ("attn.c_proj.", "self_attn.out_proj."),
                                   ("mlp.c_fc.", "feed_forward.linear1."), ("mlp.c_proj.", "feed_forward.linear2.")):
            name = name.replace(f".{new_name}", f".{old_name}")
        old[name] = tensor
    (tmp_path / "run").mkdir()
    save_file({name: t.contiguous() for name, t in old.items() if name != "lm_head.weight"},  # tied: stored once
              tmp_path / "run" / "model.safetensors")
    (tmp_path / "run" / "config.json").write_text(json.dumps(runs.run_info("gpt", config)))
    loaded = runs.load_model(tmp_path / "run", expect="gpt").eval()
    idx = torch.randint(0, 30, (2, 16))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0])
