"""Where the work runs: device choice, seeding, mixed precision and ``torch.compile``.

Every chapter starts with the same three lines::

    device = pick_device()          # cuda > mps > cpu, or what --device / MINILLM_DEVICE says
    seed_everything(1337)           # python, numpy and torch generators, all devices
    model = maybe_compile(model)    # torch.compile where it works, eager otherwise

and runs its forward passes under ``autocast(device)``, which is bf16 on GPUs that support it and
on CPUs that multiply bf16 matrices in hardware (AVX512-BF16 or AMX), and plain fp32 everywhere else.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import platform
import random
import shutil
import sys
from typing import Callable

import numpy as np
import torch

from minillm import MinillmError

DEVICE_ENV = "MINILLM_DEVICE"
COMPILE_ENV = "MINILLM_COMPILE"
PRECISION_ENV = "MINILLM_PRECISION"
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(requested: str | None = "auto") -> torch.device:
    """Return the device to run on.

    ``requested`` is ``"auto"`` (or None) for the best available device, in the order
    cuda > mps > cpu, or an explicit device string such as ``"cpu"``, ``"cuda"``, ``"cuda:1"``
    or ``"mps"``. When it is "auto", the environment variable ``MINILLM_DEVICE`` overrides it.
    Asking for a device this machine lacks raises :class:`MinillmError` with one clear sentence.
    """
    if requested in (None, "", "auto"):
        requested = os.environ.get(DEVICE_ENV, "auto") or "auto"
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise MinillmError(
            f"unknown device {requested!r}: use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MinillmError(f"device {requested!r} was asked for, but this machine has no CUDA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MinillmError(
                f"device {requested!r} was asked for, but this machine has "
                f"{torch.cuda.device_count()} CUDA GPU(s)"
            )
    elif device.type == "mps" and not _mps_available():
        raise MinillmError(f"device {requested!r} was asked for, but MPS is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise MinillmError(f"unsupported device {requested!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def describe_device(device: torch.device, precision: str = "auto") -> str:
    """A one-line human description, e.g. ``cuda:0 (NVIDIA H100, bf16 autocast)``."""
    device = torch.device(device)
    modes = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast, loss scaling", torch.float32: "fp32"}
    mode = modes[autocast_dtype(device, precision)]
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)}, {mode})"
    if device.type == "mps":
        return "mps (Apple GPU, fp32)"
    return f"cpu ({torch.get_num_threads()} threads, {mode})"


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python's, NumPy's and PyTorch's (CPU and every GPU) random number generators.

    With ``deterministic=True`` PyTorch is also asked to use deterministic kernels only
    (slower on GPUs; an error where an operation has no deterministic version).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def cpu_has_native_bf16() -> bool:
    """True when this CPU has bf16 dot-product instructions (AVX512-BF16, or AMX tiles).

    There oneDNN multiplies bf16 matrices at twice the fp32 rate or more: on the project's 2-core
    AMD EPYC (Zen 4), a (768 x 128) @ (128 x 512) product takes 256 us in bf16 and 599 us in fp32.
    Without them, bf16 is emulated and slower than fp32.
    """
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.7
    if get_capabilities is None:
        return False
    capabilities = get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def resolve_precision(precision: str = "auto") -> str:
    """``"auto"``, ``"bf16"``, ``"fp16"`` or ``"fp32"``, with ``"auto"`` replaced by ``MINILLM_PRECISION`` when it is set."""
    if precision == "auto":
        precision = os.environ.get(PRECISION_ENV, "auto").strip().lower() or "auto"
    if precision not in PRECISIONS:
        raise MinillmError(f"unknown precision {precision!r} (from {PRECISION_ENV}?): use auto, bf16, fp16 or fp32")
    return precision


def autocast_dtype(device: torch.device | str, precision: str = "auto") -> torch.dtype:
    """The dtype that matrix multiplies run in under :func:`autocast`.

    ``precision="auto"`` (the default; ``MINILLM_PRECISION`` overrides it) picks bfloat16 where it
    is fast: CUDA GPUs that support it (Ampere and newer) and CPUs with bf16 instructions
    (:func:`cpu_has_native_bf16`). bf16 keeps fp32's exponent range, so no loss scaling is needed;
    weights, gradients and optimizer state stay fp32 (mixed precision, Micikevicius et al., 2018).
    float32 everywhere else: emulated bf16 is slower than fp32, and fp16 would need a gradient
    scaler. ``"bf16"``, ``"fp16"`` and ``"fp32"`` force a choice; ``"fp16"`` is for GPUs without bf16 (T4,
    V100), and a training step under it needs a loss scaler (:mod:`minillm.loss_scaling`). bf16 and fp16 on MPS
    are not offered: fp32 there.
    """
    device = torch.device(device)
    precision = resolve_precision(precision)
    if precision == "fp32" or device.type not in ("cuda", "cpu"):
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def autocast(device: torch.device | str, enabled: bool = True, precision: str = "auto") -> contextlib.AbstractContextManager:
    """A context manager for mixed precision forward passes under the policy of :func:`autocast_dtype`.

    It is a no-op (``contextlib.nullcontext``) when the policy says fp32.
    """
    device = torch.device(device)
    dtype = autocast_dtype(device, precision)
    if not enabled or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def keep_freed_memory() -> bool:
    """Ask glibc's ``malloc`` to keep freed memory for reuse instead of giving it back to the kernel.

    A training step allocates its activations afresh and frees them after the backward pass. By
    default glibc hands large freed blocks back to the kernel (``munmap``, or trimming the top of
    the heap), so the next step writes to brand-new pages: each first write is a page fault in
    which the kernel zeroes 4 KiB, and threads that fault at once queue on one lock. For nanoGPT's
    CPU shape that is ~1,400 faults a step, and a GELU over fresh memory takes 430 us instead of
    120 us. Serving blocks up to 32 MiB from the heap (``M_MMAP_THRESHOLD``, glibc's maximum) and
    never trimming it (``M_TRIM_THRESHOLD``) brings that to ~0: the process keeps its peak memory.
    The same reason makes people preload jemalloc or tcmalloc for PyTorch on CPUs. Returns
    whether the setting took (glibc on Linux only; elsewhere nothing changes).
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def compile_unsupported_reason(device: torch.device | str) -> str | None:
    """Why ``torch.compile`` cannot work for ``device`` on this machine, or None if it should.

    The checks are the ones that otherwise fail deep inside the compiler on the first forward
    pass: no compile on MPS, a C compiler for the CPU backend, Triton for the CUDA backend,
    a supported Python, and the ``MINILLM_COMPILE=0`` switch.
    """
    device = torch.device(device)
    if os.environ.get(COMPILE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"{COMPILE_ENV}=0 is set"
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if sys.platform == "win32":
        return "torch.compile's default backend does not support Windows"
    if device.type == "mps":
        return "torch.compile is not supported on MPS"
    if device.type == "cpu":
        compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
        if not compiler:
            return "no C++ compiler (g++ or clang++) was found, which compile needs on the CPU"
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "Triton is not installed, which compile needs on CUDA"
    return None


def is_compiled(model: torch.nn.Module) -> bool:
    """True when ``model.compile()`` has been called on this module (its forward now runs compiled)."""
    return getattr(model, "_compiled_call_impl", None) is not None


def maybe_compile(
    model: torch.nn.Module | Callable,
    device: torch.device | str | None = None,
    enabled: bool = True,
    log: Callable[[str], None] | None = None,
    **compile_kwargs,
):
    """``torch.compile`` the model where it works; keep it eager, with a one-line message, where not.

    A module is compiled in place (``model.compile()``), so its ``state_dict`` keys and the
    object the caller holds stay the same; a plain function is wrapped by ``torch.compile``.
    ``device`` defaults to the device of the module's first parameter (cpu for functions).
    Returns the (possibly compiled) model.
    """
    if not enabled:
        return model
    log = log or (lambda message: print(message, file=sys.stderr))
    if device is None:
        first = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
        device = first.device if first is not None else torch.device("cpu")
    reason = compile_unsupported_reason(device)
    if reason is not None:
        log(f"torch.compile skipped, running eager: {reason}.")
        return model
    if isinstance(model, torch.nn.Module):
        model.compile(**compile_kwargs)
        return model
    return torch.compile(model, **compile_kwargs)
