"""minillm.device on the CPU: device choice, seeding, autocast policy, compile and its fallbacks."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from minillm import MinillmError, device as dev


@pytest.fixture
def no_accelerators(monkeypatch):
    monkeypatch.delenv(dev.DEVICE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)


def test_pick_device_prefers_cuda_then_mps_then_cpu(no_accelerators, monkeypatch):
    assert dev.pick_device() == torch.device("cpu")
    monkeypatch.setattr(dev, "_mps_available", lambda: True)
    assert dev.pick_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.pick_device("auto") == torch.device("cuda")


def test_explicit_device_and_environment_variable_override_the_automatic_choice(no_accelerators, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert dev.pick_device("cpu") == torch.device("cpu")
    monkeypatch.setenv(dev.DEVICE_ENV, "cpu")
    assert dev.pick_device() == torch.device("cpu")


@pytest.mark.parametrize("requested, message", [
    ("cuda", "no CUDA GPU"),
    ("mps", "MPS is not available"),
    ("tpu", "unknown device"),
    ("banana", "unknown device"),
])
def test_asking_for_a_missing_device_is_one_clear_error(no_accelerators, requested, message):
    with pytest.raises(MinillmError, match=message):
        dev.pick_device(requested)


def test_seed_everything_makes_python_numpy_and_torch_repeat():
    def draws():
        return random.random(), np.random.rand(), torch.rand(3).tolist()

    dev.seed_everything(1234)
    first = draws()
    dev.seed_everything(1234)
    assert draws() == first
    dev.seed_everything(4321)
    assert draws() != first


def test_autocast_policy_is_fp32_on_cpu_and_bf16_on_capable_cuda(monkeypatch):
    assert dev.autocast_dtype("cpu") == torch.float32
    assert dev.autocast_dtype("mps") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert dev.autocast_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert dev.autocast_dtype("cuda") == torch.float32


def test_autocast_on_cpu_leaves_matmuls_in_fp32():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with dev.autocast("cpu"):
        assert (a @ b).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_autocast_on_cuda_runs_matmuls_in_bf16():
    a, b = torch.randn(4, 4, device="cuda"), torch.randn(4, 4, device="cuda")
    with dev.autocast("cuda"):
        assert (a @ b).dtype == dev.autocast_dtype("cuda")


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


@pytest.mark.skipif(dev.compile_unsupported_reason("cpu") is not None, reason="torch.compile unsupported on this machine")
def test_maybe_compile_compiles_in_place_and_matches_eager():
    """The one real compile in the suite (a few seconds): same outputs, same state_dict keys."""
    model = tiny_model()
    x = torch.randn(5, 8)
    expected = model(x)
    keys = list(model.state_dict())
    messages = []
    compiled = dev.maybe_compile(model, log=messages.append)
    assert compiled is model and messages == []
    assert dev.is_compiled(model)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)  # fused kernels reorder float32 sums
    assert list(compiled.state_dict()) == keys


def test_maybe_compile_falls_back_to_eager_on_mps_with_one_message():
    model = tiny_model()
    messages = []
    assert dev.maybe_compile(model, device="mps", log=messages.append) is model
    assert not dev.is_compiled(model)
    assert len(messages) == 1 and "MPS" in messages[0]


def test_maybe_compile_falls_back_to_eager_without_a_c_compiler(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(dev.shutil, "which", lambda name: None)
    model = tiny_model()
    messages = []
    assert dev.maybe_compile(model, device="cpu", log=messages.append) is model
    assert not dev.is_compiled(model)
    assert len(messages) == 1 and "compiler" in messages[0]


def test_maybe_compile_can_be_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv(dev.COMPILE_ENV, "0")
    model = tiny_model()
    messages = []
    assert dev.maybe_compile(model, log=messages.append) is model and not dev.is_compiled(model)
    assert messages and dev.COMPILE_ENV in messages[0]


def test_describe_device_names_the_cpu():
    assert dev.describe_device(torch.device("cpu")).startswith("cpu (")
