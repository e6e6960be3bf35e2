"""minillm.tensor_parallel: a GPT block split over 2 gloo processes, by hand and with DTensor, equals the whole block.

Starting processes costs seconds, so one spawn (the module's fixture) runs every check and returns numbers;
each test asserts one property of them. Equality checks run in float64 on numbers of order 1, where the same
sums taken in another order differ by ~1e-15: a tolerance of 1e-12 leaves a margin of 1000, and a wrong slice
(a weight of the wrong head, a bias added twice) moves the results by ~1e-2 or more.
"""

import contextlib

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm import MinillmError
from minillm.distributed import spawn
from minillm.gpt import GPT, Block, GPTConfig
from minillm.tensor_parallel import (
    demonstrate,
    full_gradient,
    parallelize_block,
    parallelize_gpt,
    record_all_reduces,
    shard_block,
)

TOLERANCE = 1e-12  # float64, see the module docstring
BLOCK_CASES = [  # (n_head, bias, activation): 1 head or 2 heads per rank, with and without biases
    (2, True, "gelu"),
    (4, False, "gelu_tanh"),
    (4, True, "gelu"),
]
DEMO = dict(batch=2, length=8, n_embd=32, n_head=4)


@contextlib.contextmanager
def counting_all_reduces():
    """Every ``torch.distributed.all_reduce`` call inside, whoever makes it: the list of the tensors' shapes."""
    calls, original = [], dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        yield calls
    finally:
        dist.all_reduce = original


def expected_shard_gradients(full: dict, rank: int, world_size: int, width: int) -> dict:
    """The slices of the whole block's gradients that rank ``rank`` should hold, written out independently of
    :func:`shard_block`: its heads' rows of q, k and v in c_attn, the matching columns of attn.c_proj, its rows
    of mlp.c_fc and columns of mlp.c_proj; everything else whole."""
    head_width, hidden = width // world_size, 4 * width // world_size
    mine, hidden_mine = slice(rank * head_width, (rank + 1) * head_width), slice(rank * hidden, (rank + 1) * hidden)
    expected = dict(full)
    for name in ("attn.c_attn.weight", "attn.c_attn.bias"):
        if name in full:
            q, k, v = full[name][:width], full[name][width:2 * width], full[name][2 * width:]
            expected[name] = torch.cat([q[mine], k[mine], v[mine]])
    expected["attn.c_proj.weight"] = full["attn.c_proj.weight"][:, mine]
    for name in ("mlp.c_fc.weight", "mlp.c_fc.bias"):
        if name in full:
            expected[name] = full[name][hidden_mine]
    expected["mlp.c_proj.weight"] = full["mlp.c_proj.weight"][:, hidden_mine]
    return expected


def split_qkv(full: dict) -> dict:
    """Whole gradients renamed for the engine's layout: c_attn's (3C, ...) cut into q_proj, k_proj, v_proj's."""
    renamed = {}
    for name, gradient in full.items():
        if ".c_attn." in name:
            for part, piece in zip(("q_proj", "k_proj", "v_proj"), gradient.chunk(3, dim=0)):
                renamed[name.replace("c_attn", part)] = piece
        else:
            renamed[name] = gradient
    return renamed


def largest_difference(actual: dict, expected: dict) -> dict:
    return {name: (actual[name] - expected[name]).abs().max().item() for name in actual}


def check_block(rank: int, world_size: int, mesh, n_head: int, bias: bool, activation: str) -> dict:
    torch.manual_seed(1)  # the same block, input and upstream gradient on every rank
    width = 16
    block = Block(GPTConfig(n_embd=width, n_head=n_head, bias=bias, activation=activation, dropout=0.0)).double()
    for parameter in block.parameters():  # random biases and LayerNorm gains too, so that no slice is all zeros
        torch.nn.init.normal_(parameter, std=0.5)
    x = torch.randn(2, 5, width, dtype=torch.float64)
    upstream = torch.randn(2, 5, width, dtype=torch.float64)  # dL/d(output)
    full_x = x.clone().requires_grad_()
    full_out = block(full_x)
    full_out.backward(upstream)
    full_grads = {name: p.grad for name, p in block.named_parameters()}

    tp_block = shard_block(block, rank, world_size)
    tp_x = x.clone().requires_grad_()
    with counting_all_reduces() as forward_calls, record_all_reduces() as forward_records:
        tp_out = tp_block(tp_x)
    with counting_all_reduces() as backward_calls, record_all_reduces() as backward_records:
        tp_out.backward(upstream)
    tp_grads = {name: p.grad for name, p in tp_block.named_parameters()}

    wrong = shard_block(block, rank, world_size)
    with torch.no_grad():  # a contiguous split of the fused q | k | v rows: for N = 2, rank 0 gets q and half of k
        wrong.attn.c_attn.weight.copy_(block.attn.c_attn.weight.chunk(world_size)[rank])

    engine_block = parallelize_block(block, mesh)
    engine_x = x.clone().requires_grad_()
    from torch.distributed.tensor.debug import CommDebugMode
    with CommDebugMode() as forward_comms:
        engine_out = engine_block(engine_x)
    with CommDebugMode() as backward_comms:
        engine_out.backward(upstream)
    engine_grads = {name: full_gradient(p) for name, p in engine_block.named_parameters()}
    engine_local = {name: p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                    for name, p in engine_block.named_parameters()}

    return {
        "names": (sorted(tp_grads), sorted(full_grads)),
        "output": (tp_out - full_out).abs().max().item(),
        "input_gradient": (tp_x.grad - full_x.grad).abs().max().item(),
        "gradients": largest_difference(tp_grads, expected_shard_gradients(full_grads, rank, world_size, width)),
        "forward_all_reduce_shapes": forward_calls,
        "backward_all_reduce_shapes": backward_calls,
        "records": ([r.function for r in forward_records], [r.function for r in backward_records]),
        "wrong_split_output": (wrong(x) - full_out).abs().max().item(),
        "engine_output": (engine_out - full_out).abs().max().item(),
        "engine_input_gradient": (engine_x.grad - full_x.grad).abs().max().item(),
        "engine_gradients": largest_difference(engine_grads, split_qkv(full_grads)),
        "engine_vs_hand_output": (engine_out - tp_out).abs().max().item(),
        "engine_vs_hand_gradients": largest_difference(engine_local, split_qkv(tp_grads)),
        "engine_all_reduces": (count_all_reduces(forward_comms), count_all_reduces(backward_comms)),
        "engine_collectives": forward_comms.get_total_counts() + backward_comms.get_total_counts(),
    }


def count_all_reduces(comm_mode) -> int:
    return sum(count for op, count in comm_mode.get_comm_counts().items() if "all_reduce" in str(op))


def check_gpt(rank: int, world_size: int, mesh) -> dict:
    from torch.distributed.tensor.debug import CommDebugMode

    torch.manual_seed(2)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, dropout=0.0)).double()
    idx, targets = torch.randint(0, 11, (3, 8)), torch.randint(0, 11, (3, 8))
    _, loss = model(idx, targets)
    loss.backward()
    engine_model = parallelize_gpt(model, mesh)
    with CommDebugMode() as forward_comms:
        _, engine_loss = engine_model(idx, targets)
    with CommDebugMode() as backward_comms:
        engine_loss.backward()
    full_grads = split_qkv({name: p.grad for name, p in model.named_parameters()})
    engine_grads = {name: full_gradient(p) for name, p in engine_model.named_parameters()}
    return {
        "loss": abs(engine_loss.item() - loss.item()),
        "names": (sorted(engine_grads), sorted(full_grads)),
        "gradients": largest_difference(engine_grads, full_grads),
        "all_reduces": (count_all_reduces(forward_comms), count_all_reduces(backward_comms)),
    }


def all_checks(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    return {
        "blocks": {case: check_block(rank, world_size, mesh, *case) for case in BLOCK_CASES},
        "gpt": check_gpt(rank, world_size, mesh),
        "demo": demonstrate(rank, world_size, **DEMO),
    }


@pytest.fixture(scope="module")
def ranks():
    return spawn(all_checks, 2)


def block_results(ranks):
    for rank, result in enumerate(ranks):
        for case, checks in result["blocks"].items():
            yield f"rank {rank}, {case}", checks


def test_tensor_parallel_block_by_hand_gives_the_whole_blocks_output_and_input_gradient(ranks):
    for where, checks in block_results(ranks):
        assert checks["output"] < TOLERANCE, where
        assert checks["input_gradient"] < TOLERANCE, where


def test_each_rank_holds_the_gradients_of_its_own_slices_and_whole_gradients_of_replicated_parameters(ranks):
    for where, checks in block_results(ranks):
        tp_names, full_names = checks["names"]
        assert tp_names == full_names, where  # the same parameter names as a minillm Block
        worst = max(checks["gradients"].items(), key=lambda item: item[1])
        assert worst[1] < TOLERANCE, (where, worst)


def test_by_hand_a_block_all_reduces_twice_in_the_forward_and_twice_in_the_backward(ranks):
    activation_shape = (2, 5, 16)  # (B, T, d_model): what each all-reduce sums
    for where, checks in block_results(ranks):
        assert checks["forward_all_reduce_shapes"] == [activation_shape] * 2, where  # g after attention, after the MLP
        assert checks["backward_all_reduce_shapes"] == [activation_shape] * 2, where  # f's, in reverse order
        assert checks["records"] == (["g", "g"], ["f", "f"]), where  # record_all_reduces saw the same calls


def test_a_contiguous_split_of_the_fused_qkv_weight_would_give_a_wrong_output(ranks):
    for where, checks in block_results(ranks):
        assert checks["wrong_split_output"] > 1e-3, where  # what splitting by heads avoids (and a sensitive check)


def test_parallelize_module_block_equals_the_whole_block_forward_and_gathered_gradients(ranks):
    for where, checks in block_results(ranks):
        assert checks["engine_output"] < TOLERANCE, where
        assert checks["engine_input_gradient"] < TOLERANCE, where
        worst = max(checks["engine_gradients"].items(), key=lambda item: item[1])
        assert worst[1] < TOLERANCE, (where, worst)


def test_parallelize_module_holds_the_same_slices_and_gradients_as_the_hand_written_block(ranks):
    for where, checks in block_results(ranks):
        assert checks["engine_vs_hand_output"] < TOLERANCE, where
        worst = max(checks["engine_vs_hand_gradients"].items(), key=lambda item: item[1])
        assert worst[1] < TOLERANCE, (where, worst)


def test_parallelize_module_also_all_reduces_twice_each_way_and_nothing_else(ranks):
    for where, checks in block_results(ranks):
        assert checks["engine_all_reduces"] == (2, 2), where
        assert checks["engine_collectives"] == 4, where  # no all-gather, no reduce-scatter besides


def test_parallelize_gpt_gives_the_whole_models_loss_and_gradients_with_four_all_reduces_each_way(ranks):
    for rank, result in enumerate(ranks):
        checks = result["gpt"]
        assert checks["loss"] < TOLERANCE, rank
        assert checks["names"][0] == checks["names"][1], rank
        worst = max(checks["gradients"].items(), key=lambda item: item[1])
        assert worst[1] < TOLERANCE, (rank, worst)
        assert checks["all_reduces"] == (4, 4), rank  # 2 blocks × (attention, MLP)


def test_demonstration_shows_half_the_weights_per_rank_two_all_reduces_of_btc_floats_each_way_and_equal_numbers(ranks):
    batch, length, width = DEMO["batch"], DEMO["length"], DEMO["n_embd"]
    full_bytes = 4 * (12 * width**2 + 13 * width)  # fp32: c_attn 3C²+3C, c_proj C²+C, c_fc 4C²+4C, c_proj 4C²+C, LNs 4C
    rank_bytes = 4 * ((12 * width**2 + 7 * width) // 2 + 6 * width)  # split: weights, c_attn and c_fc biases; whole: the rest
    for demo in (result["demo"] for result in ranks):
        assert demo["weight_shapes"]["attn.c_attn.weight"] == (3 * width // 2, width)
        assert demo["weight_shapes"]["attn.c_proj.weight"] == (width, width // 2)
        assert demo["weight_shapes"]["mlp.c_fc.weight"] == (4 * width // 2, width)
        assert demo["weight_shapes"]["mlp.c_proj.weight"] == (width, 4 * width // 2)
        assert demo["weight_shapes"]["ln_1.weight"] == demo["full_weight_shapes"]["ln_1.weight"] == (width,)
        assert (demo["all_reduces_forward"], demo["all_reduces_backward"]) == (2, 2)
        assert (demo["engine_all_reduces_forward"], demo["engine_all_reduces_backward"]) == (2, 2)
        assert demo["bytes_per_all_reduce"] == [batch * length * width * 4] * 4
        assert demo["full_parameter_bytes"] == full_bytes
        assert demo["parameter_bytes"] == demo["engine_parameter_bytes"] == rank_bytes
        for name in ("output_difference", "input_gradient_difference", "weight_gradient_difference",
                     "engine_output_difference", "engine_weight_gradient_difference"):
            assert demo[name] < 1e-5, name  # fp32, relative to the largest value: rounding is ~1e-7


# ---------------------------------------------------------------------------------------------
# Without processes: how the weights are cut
# ---------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(heads_per_rank=st.integers(1, 3), world_size=st.integers(1, 4), head_dim=st.integers(1, 3),
       bias=st.booleans())
def test_the_ranks_shards_put_back_together_are_the_whole_blocks_weights(heads_per_rank, world_size, head_dim, bias):
    n_head = heads_per_rank * world_size
    width = n_head * head_dim
    block = Block(GPTConfig(n_embd=width, n_head=n_head, bias=bias, dropout=0.0))
    tp_blocks = [shard_block(block, rank, world_size) for rank in range(world_size)]
    assert all(tp_block.attn.n_head == heads_per_rank for tp_block in tp_blocks)
    shards = [dict(tp_block.named_parameters()) for tp_block in tp_blocks]
    whole = dict(block.named_parameters())
    assert all(shard.keys() == whole.keys() for shard in shards)
    for name in ("attn.c_attn.weight", "attn.c_attn.bias"):
        if bias or name.endswith("weight"):  # rank after rank: q of every head, then k, then v, as in c_attn
            parts = [torch.cat([shard[name].chunk(3)[part] for shard in shards]) for part in range(3)]
            assert torch.equal(torch.cat(parts), whole[name])
    for name, dim in (("attn.c_proj.weight", 1), ("mlp.c_fc.weight", 0), ("mlp.c_proj.weight", 1)):
        assert torch.equal(torch.cat([shard[name] for shard in shards], dim=dim), whole[name])
    for name in ("ln_1.weight", "ln_2.weight") + (("attn.c_proj.bias", "mlp.c_proj.bias") if bias else ()):
        assert all(torch.equal(shard[name], whole[name]) for shard in shards)  # replicated


def test_sharding_refuses_head_counts_the_processes_do_not_divide_and_dropout():
    block = Block(GPTConfig(n_embd=12, n_head=3, dropout=0.0))
    with pytest.raises(MinillmError, match="3 heads evenly: 2 processes"):
        shard_block(block, 0, 2)
    with pytest.raises(MinillmError, match="dropout=0"):
        shard_block(Block(GPTConfig(n_embd=12, n_head=2, dropout=0.1)), 0, 2)
