"""minillm.checkpoint: one safetensors file holds everything a run needs to continue, and nothing else.

Restoring must be exact (torch.equal), for minillm's optimizers and torch's alike, because resuming
a run must reproduce it bit for bit (tests/test_train.py checks the whole loop).
"""

from __future__ import annotations

import json
import random
import struct

import numpy as np
import pytest
import torch

from minillm import MinillmError, optim
from minillm.checkpoint import (
    load_model_state,
    load_training_state,
    read_safetensors,
    save_training_state,
    save_weights,
    tensor_sizes,
    tied_names,
    unique_state_dict,
)
from minillm.gpt import GPT, GPTConfig


def small_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=9, block_size=8, n_layer=1, n_head=2, n_embd=8, dropout=0.1))


def train_a_little(model, optimizer, steps=3):
    for _ in range(steps):
        idx = torch.randint(0, 9, (2, 8))
        model(idx, idx)[1].backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("make_optimizer", [lambda p: optim.AdamW(p, lr=1e-2), lambda p: torch.optim.AdamW(p, lr=1e-2),
                                            lambda p: optim.SGD(p, lr=0.1, momentum=0.9)], ids=["minillm-adamw", "torch-adamw", "sgd"])
def test_a_training_state_restores_exactly_and_continues_identically(tmp_path, make_optimizer):
    model = small_gpt()
    optimizer = make_optimizer(model.parameters())
    data_generator = torch.Generator().manual_seed(3)
    train_a_little(model, optimizer)
    random.seed(11)
    np.random.seed(12)
    save_training_state(tmp_path / "ckpt.safetensors", model, optimizer, step=3, generators={"data": data_generator},
                        metadata={"history": [[1, 2.5]]})
    expected_draws = (torch.rand(3), torch.randint(0, 100, (3,), generator=data_generator), random.random(), np.random.rand())
    torch.manual_seed(0)  # the same batches and dropout masks for both continuations
    train_a_little(model, optimizer, 2)

    restored = small_gpt(seed=99)  # other initial weights: everything must come from the file
    restored_optimizer = make_optimizer(restored.parameters())
    restored_generator = torch.Generator()
    header = load_training_state(tmp_path / "ckpt.safetensors", restored, restored_optimizer, {"data": restored_generator})
    assert header["step"] == 3 and header["history"] == [[1, 2.5]]
    draws = (torch.rand(3), torch.randint(0, 100, (3,), generator=restored_generator), random.random(), np.random.rand())
    assert torch.equal(draws[0], expected_draws[0]) and torch.equal(draws[1], expected_draws[1])
    assert draws[2:] == expected_draws[2:]  # the global torch, data, python and numpy generators
    torch.manual_seed(0)
    train_a_little(restored, restored_optimizer, 2)
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name


def test_tied_weights_are_stored_once_and_restored_tied(tmp_path):
    model = small_gpt()
    assert tied_names(model.state_dict()) == {"lm_head.weight"}
    assert "lm_head.weight" not in unique_state_dict(model)
    save_weights(tmp_path / "w.safetensors", model, {"step": 5})
    tensors, metadata = read_safetensors(tmp_path / "w.safetensors")
    assert metadata == {"step": 5} and "lm_head.weight" not in tensors
    other = small_gpt(seed=1)
    load_model_state(other, tensors)
    assert other.lm_head.weight is other.wte.weight and torch.equal(other.wte.weight, model.wte.weight)


def test_the_files_are_plain_safetensors_with_no_pickled_objects(tmp_path):
    model = small_gpt()
    optimizer = optim.AdamW(model.parameters())
    train_a_little(model, optimizer, 1)
    path = save_training_state(tmp_path / "ckpt.safetensors", model, optimizer, step=1)
    raw = path.read_bytes()
    header_length = struct.unpack("<Q", raw[:8])[0]  # safetensors: 8-byte length, a JSON header, raw tensor bytes
    header = json.loads(raw[8:8 + header_length])
    assert json.loads(header["__metadata__"]["minillm"])["step"] == 1
    assert all(entry["dtype"] in ("F32", "I64", "U8") for name, entry in header.items() if name != "__metadata__")
    assert b"\x80\x04" not in raw[:8 + header_length]  # no pickle protocol marker in the header


def test_a_mismatched_or_damaged_file_is_one_clear_error(tmp_path):
    model = small_gpt()
    save_weights(tmp_path / "w.safetensors", model)
    bigger = GPT(GPTConfig(vocab_size=9, block_size=8, n_layer=2, n_head=2, n_embd=8))
    with pytest.raises(MinillmError, match="do not fit this model"):
        load_model_state(bigger, read_safetensors(tmp_path / "w.safetensors")[0])
    wider = GPT(GPTConfig(vocab_size=9, block_size=16, n_layer=1, n_head=2, n_embd=8))
    with pytest.raises(MinillmError, match="has shape"):
        load_model_state(wider, read_safetensors(tmp_path / "w.safetensors")[0])
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(MinillmError, match="not a readable safetensors file"):
        read_safetensors(tmp_path / "bad.safetensors")
    with pytest.raises(MinillmError, match="does not exist"):
        read_safetensors(tmp_path / "missing.safetensors")
    with pytest.raises(MinillmError, match="not a minillm training checkpoint"):
        load_training_state(tmp_path / "w.safetensors", model, optim.AdamW(model.parameters()))


def test_weights_holding_nan_or_inf_are_refused_when_loaded(tmp_path):
    model = small_gpt()
    for bad in (float("nan"), float("inf")):
        with torch.no_grad():
            damaged = small_gpt()
            damaged.blocks[0].mlp.c_fc.weight[1, 2] = bad
        save_weights(tmp_path / "w.safetensors", damaged)
        with pytest.raises(MinillmError, match=r"w.safetensors is damaged: its weight blocks.0.mlp.c_fc.weight holds NaN"):
            load_model_state(model, read_safetensors(tmp_path / "w.safetensors")[0], str(tmp_path / "w.safetensors"))
    assert torch.equal(model.blocks[0].mlp.c_fc.weight, small_gpt().blocks[0].mlp.c_fc.weight)  # nothing was loaded


def test_tensor_sizes_reads_the_header_only_and_counts_each_stored_tensor(tmp_path):
    model = small_gpt()
    save_weights(tmp_path / "w.safetensors", model)
    sizes = tensor_sizes(tmp_path / "w.safetensors")
    assert sizes == {name: t.numel() for name, t in unique_state_dict(model).items()}
    assert sum(sizes.values()) >= sum(p.numel() for p in model.parameters())  # tied weight once; buffers besides


def test_atomic_writes_get_the_permissions_of_an_ordinary_write_and_leave_no_temp_file(tmp_path):
    import os

    from minillm.files import atomic_write_text, temp_files_of

    old_umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        ordinary = tmp_path / "b.json"
        ordinary.write_text("{}")
    finally:
        os.umask(old_umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == ordinary.stat().st_mode & 0o777 == 0o644
    (tmp_path / ".a.json.x1y2.tmp").write_text("half")  # what a SIGKILL mid-write leaves
    assert temp_files_of(tmp_path / "a.json") == [tmp_path / ".a.json.x1y2.tmp"]
    assert os.listdir(tmp_path).count("a.json") == 1
