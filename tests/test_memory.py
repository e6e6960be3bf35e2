"""minillm.memory: the training-memory formulas, checked against what PyTorch really allocates and saves."""

import dataclasses

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from minillm import memory
from minillm.distributed import spawn
from minillm.gpt import GPT, GPTConfig
from minillm.optim import AdamW

configs = st.builds(
    lambda layers, heads, head_dim, vocab, bias, tie, block: GPTConfig(
        vocab_size=vocab, block_size=block, n_layer=layers, n_head=heads, n_embd=heads * head_dim, dropout=0.0,
        bias=bias, tie_weights=tie),
    st.integers(1, 3), st.integers(1, 4), st.integers(2, 8), st.integers(5, 70), st.booleans(), st.booleans(),
    st.integers(4, 12))


@settings(max_examples=25, deadline=None)
@given(configs, st.sampled_from(["learned", "rotary"]))
def test_parameter_count_equals_the_models_own_count(config, positions):
    assume(positions == "learned" or config.n_embd // config.n_head % 2 == 0)  # rotary needs an even head size
    config = dataclasses.replace(config, positions=positions)
    model = GPT(config)
    assert memory.parameter_count(config) == sum(p.numel() for p in model.parameters())  # tied: counted once


def _forward(model, batch, length, vocab, seed=0):
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (batch, length), generator=generator)
    targets = torch.randint(0, vocab, (batch, length), generator=generator)
    return lambda: model(idx, targets)[1]


@settings(max_examples=25, deadline=None)
@given(configs, st.integers(1, 3), st.data())
def test_fp32_activation_formula_equals_the_bytes_autograd_saves(config, batch, data):
    """Exact, byte for byte: the formula counts every tensor minillm's GPT saves for its backward pass (each storage
    once; the parameters are not activations), plus the 4-byte loss, which is per batch, not per token."""
    length = data.draw(st.integers(1, config.block_size))
    model = GPT(config)
    saved = memory.saved_activation_bytes(model, _forward(model, batch, length, config.vocab_size))
    per_token = memory.activation_bytes_per_token(config, "fp32")
    assert saved == batch * length * (config.n_layer * per_token["per_block"] + per_token["outside"]) + 4


@settings(max_examples=20, deadline=None)
@given(configs, st.integers(1, 3), st.data())
def test_autocast_fp16_activation_formula_and_weight_copies_equal_what_autograd_saves(config, batch, data):
    """Under 16-bit autocast (fp16 on this CPU; bf16 on a GPU follows the same policy) the saved activations match the
    formula exactly, and the saved 16-bit copies of the matrices are 2 bytes x the matmul parameters."""
    length = data.draw(st.integers(1, config.block_size))
    C = config.n_embd
    # Copies are told from activations by shape: no (B·T, width) activation may be shaped like a linear layer's weight.
    assume(batch * length not in {C, 3 * C, 4 * C, config.vocab_size})
    model = GPT(config)
    forward = _forward(model, batch, length, config.vocab_size)
    with torch.autocast("cpu", dtype=torch.float16):
        split = memory.split_saved_bytes(model, forward)
    per_token = memory.activation_bytes_per_token(config, "amp")
    assert split["activations"] == batch * length * (config.n_layer * per_token["per_block"] + per_token["outside"]) + 4
    assert split["weight_copies"] == 2 * memory.matmul_parameter_count(config)


def test_adamw_holds_eight_bytes_and_gradients_four_bytes_per_parameter_in_fp32():
    config = GPTConfig(vocab_size=40, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    model = GPT(config)
    optimizer = AdamW(model.parameters(), lr=1e-3)
    _forward(model, 2, 8, config.vocab_size)().backward()
    optimizer.step()
    phi = memory.parameter_count(config)
    per_parameter = memory.state_bytes_per_parameter("fp32")
    assert sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()) == per_parameter["gradients"] * phi
    assert memory.optimizer_state_bytes(optimizer) == per_parameter["optimizer"] * phi


def test_zero_stages_reproduce_the_zero_papers_figure_for_7_5_billion_parameters_on_64_gpus():
    """Rajbhandari et al. (2020), figure 1: Ψ = 7.5B, N_d = 64, K = 12: 120 GB, 31.4 GB, 16.6 GB, 1.9 GB per GPU."""
    phi, expected = 7.5e9, {"ddp": 120, "zero1": 31.4, "zero2": 16.6, "zero3": 1.9}
    for sharding, gigabytes in expected.items():
        total = sum(memory.model_state_bytes(phi, "zero-mixed", 64, sharding).values()) / 1e9
        assert total == pytest.approx(gigabytes, abs=0.05), sharding


@given(st.integers(1, 10**10), st.integers(1, 1024), st.sampled_from(list(memory.PRECISIONS)))
def test_each_zero_stage_shards_more_and_stage_three_divides_everything_by_n(phi, ranks, precision):
    totals = [sum(memory.model_state_bytes(phi, precision, ranks, s).values()) for s in memory.SHARDINGS]
    assert all(later <= earlier for earlier, later in zip(totals, totals[1:]))
    assert totals[-1] == pytest.approx(totals[0] / ranks)
    assert totals[0] == 16 * phi  # every precision keeps 16 bytes per parameter in states


def test_activation_checkpointing_keeps_only_each_blocks_input_plus_one_block_being_recomputed():
    config = GPTConfig(vocab_size=50, block_size=8, n_layer=4, n_head=2, n_embd=16, dropout=0.0)
    plain = memory.training_memory(config, 64)
    checkpointed = memory.training_memory(config, 64, activation_checkpointing=True)
    per_block = memory.activation_bytes_per_token(config)["per_block"]
    assert plain.activations - checkpointed.activations == 64 * (4 * per_block - 4 * 4 * 16 - per_block)
    assert checkpointed.weights == plain.weights and checkpointed.optimizer == plain.optimizer


def test_the_activation_formula_refuses_configurations_it_does_not_describe():
    with pytest.raises(ValueError, match="dropout 0"):
        memory.activation_bytes_per_token(GPTConfig(dropout=0.1))
    with pytest.raises(ValueError, match="sharding must be one of"):
        memory.model_state_bytes(100, sharding="zero4")


def _fsdp_local_sizes(rank, world_size, config_values):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = GPT(GPTConfig(**config_values))
    mesh = init_device_mesh("cpu", (world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, config_values["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(rank))
    model(idx, idx)[1].backward()
    optimizer.step()
    local = [p.to_local() for p in model.parameters()]
    rows = [p.shape[0] for p in model.parameters()]
    return {"weights": sum(t.numel() for t in local), "optimizer": memory.optimizer_state_bytes(optimizer),
            "rows": rows, "row_sizes": [p.numel() // p.shape[0] for p in model.parameters()]}


def test_fsdp_holds_one_nth_of_the_weights_and_optimizer_states_per_rank_as_zero_3_says():
    """Measured with FSDP2 on 2 gloo processes: the local shards of the weights add up to Φ over the ranks, each rank
    holds Φ/N up to FSDP's row rounding (each matrix is cut into N blocks of ceil(rows/N) rows), and AdamW's states
    on each rank are 8 bytes per local parameter: the ZeRO-3 row of the table."""
    values = dict(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    phi = memory.parameter_count(GPTConfig(**values))
    ranks = spawn(_fsdp_local_sizes, 2, values)
    assert sum(r["weights"] for r in ranks) == phi
    rounding = sum(size for size in ranks[0]["row_sizes"])  # at most one row per matrix more than Φ/N
    for r in ranks:
        assert abs(r["weights"] - phi / 2) <= rounding
        assert r["optimizer"] == 8 * r["weights"]
        assert r["optimizer"] == pytest.approx(memory.model_state_bytes(phi, "fp32", 2, "zero3")["optimizer"],
                                               abs=8 * rounding)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_memory_after_the_forward_and_after_the_backward_pass_matches_the_estimate():
    """On a GPU, what the forward pass leaves allocated (activations + autocast's 16-bit copies) and what the backward
    pass leaves (the gradients) against the estimate, within 5% (the allocator rounds each block up to 512 bytes, and
    the GPU's attention kernels pad their log-sum-exp)."""
    device = torch.device("cuda")
    config = GPTConfig(vocab_size=8192, block_size=256, n_layer=4, n_head=8, n_embd=512, dropout=0.0)
    model = GPT(config).to(device)
    idx = torch.randint(0, config.vocab_size, (8, 256), device=device)
    for precision, dtype in (("fp32", torch.float32), ("amp", torch.bfloat16)):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated(device)
        with torch.autocast("cuda", dtype=dtype, enabled=precision == "amp"):
            loss = model(idx, idx)[1]
        after_forward = torch.cuda.memory_allocated(device)
        loss.backward()
        del loss
        after_backward = torch.cuda.memory_allocated(device)
        estimate = memory.training_memory(config, 8 * 256, precision)
        assert after_forward - start == pytest.approx(estimate.activations + estimate.weight_copies, rel=0.05), precision
        assert after_backward - start == pytest.approx(estimate.gradients, rel=0.05), precision
