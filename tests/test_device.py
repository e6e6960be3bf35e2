"""minillm.device on the CPU: device choice, seeding, autocast policy, compile and its fallbacks."""

from __future__ import annotations

import ctypes
import platform
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from minillm import MinillmError
from minillm import device as dev


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


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Pretend the CPU has (True) or lacks (False) bf16 instructions; MINILLM_PRECISION unset."""
    monkeypatch.delenv(dev.PRECISION_ENV, raising=False)

    def set_native(native: bool):
        monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: native)
    return set_native


def test_autocast_policy_is_bf16_where_the_hardware_has_it_and_fp32_elsewhere(cpu_bf16, monkeypatch):
    cpu_bf16(True)
    assert dev.autocast_dtype("cpu") == torch.bfloat16
    cpu_bf16(False)
    assert dev.autocast_dtype("cpu") == torch.float32
    assert dev.autocast_dtype("mps") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert dev.autocast_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert dev.autocast_dtype("cuda") == torch.float32


def test_precision_fp32_bf16_and_fp16_override_the_policy_and_the_environment_overrides_auto(cpu_bf16, monkeypatch):
    cpu_bf16(True)
    assert dev.autocast_dtype("cpu", "fp32") == torch.float32
    cpu_bf16(False)
    assert dev.autocast_dtype("cpu", "bf16") == torch.bfloat16  # asked for: emulated, but honoured
    assert dev.autocast_dtype("mps", "bf16") == torch.float32  # not offered on MPS
    monkeypatch.setenv(dev.PRECISION_ENV, "bf16")
    assert dev.autocast_dtype("cpu") == torch.bfloat16
    assert dev.autocast_dtype("cpu", "fp32") == torch.float32  # an explicit choice beats the environment
    monkeypatch.setenv(dev.PRECISION_ENV, "fp16")
    assert dev.autocast_dtype("cpu") == torch.float16
    assert dev.autocast_dtype("mps") == torch.float32  # not offered on MPS
    assert "fp16 autocast, loss scaling" in dev.describe_device(torch.device("cpu"))
    monkeypatch.setenv(dev.PRECISION_ENV, "fp8")
    with pytest.raises(MinillmError, match="unknown precision 'fp8'"):
        dev.autocast_dtype("cpu")


def test_cpu_bf16_detection_reads_the_cpu_capabilities(monkeypatch):
    for flags, expected in [({"avx512_bf16": True}, True), ({"amx_bf16": True}, True),
                            ({"avx512_bf16": False, "avx2": True}, False), ({}, False)]:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda flags=flags: flags)
        assert dev.cpu_has_native_bf16() is expected


def test_autocast_on_cpu_runs_matmuls_in_the_policy_dtype(cpu_bf16):
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    for native, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        cpu_bf16(native)
        with dev.autocast("cpu"):
            assert (a @ b).dtype == dtype
        with dev.autocast("cpu", precision="fp32"):
            assert (a @ b).dtype == torch.float32
    assert "bf16 autocast" in dev.describe_device(torch.device("cpu"))
    assert "fp32" in dev.describe_device(torch.device("cpu"), "fp32")


HEAP_AFTER_A_FREED_BLOCK = """
import ctypes, sys
class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (2.33+): byte counts of the allocator's state
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype, libc.free.argtypes = MallInfo2, ctypes.c_void_p, [ctypes.c_void_p]
if sys.argv[1] == "keep":
    from minillm.device import keep_freed_memory
    assert keep_freed_memory() and keep_freed_memory()  # takes, and is harmless to repeat
size = 16 << 20  # a 16 MiB block of activations
before = libc.mallinfo2()
block = libc.malloc(size)
ctypes.memset(block, 1, size)  # touched, as a tensor would be
during = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print((during.hblkhd - before.hblkhd) >> 20, after.fordblks >> 20)  # MiB mmapped for it; MiB kept free in the heap
"""


@pytest.mark.skipif(not (sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
                         and hasattr(ctypes.CDLL(None), "mallinfo2")), reason="glibc 2.33+'s malloc only")
def test_keep_freed_memory_serves_a_step_from_the_heap_and_keeps_it_after_free():
    """By default glibc maps a 16 MiB block with its own mmap and unmaps it on free, so the next step's block
    is new pages, each first write a page fault (~2,500 a step for nanoGPT's CPU shape, ~10x fewer kept: the
    bench numbers in docs/ch06_gpt.md). Kept, the block comes from the heap and stays there, free, for the next
    step. What is checked is the allocator's own accounting (mallinfo2), which does not depend on load;
    counting page faults does (a busy machine added ~300 a step), so that is a measurement, not a test.
    Fresh processes, because the setting cannot be undone in this one."""
    def heap(mode: str) -> tuple[int, int]:
        done = subprocess.run([sys.executable, "-c", HEAP_AFTER_A_FREED_BLOCK, mode], capture_output=True, text=True,
                              check=True)
        mapped, kept = done.stdout.split()
        return int(mapped), int(kept)

    assert heap("default") == (16, 0)  # its own mapping, given back on free
    assert heap("keep") == (0, 16)  # from the heap, and kept there


def test_keep_freed_memory_reports_false_where_there_is_no_glibc(monkeypatch):
    monkeypatch.setattr(dev.platform, "libc_ver", lambda: ("", ""))
    assert dev.keep_freed_memory() is False


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
