"""Int8 post-training quantization: weights and activations as 8-bit integers, the matmul in integers.

A float tensor is stored as int8 codes and one float **scale** per row (symmetric: zero maps to zero)::

    scale = max_k |x_k| / 127            (one per row; an all-zero row gets scale 1, its codes are all 0)
    q     = clamp(round(x / scale), -127, 127)          int8
    x̂     = q · scale                                    the dequantized value, |x̂ - x| <= scale / 2

- **weights**, per output channel: each row of W (out_features, in_features) gets its own scale, so one
  large row does not cost the others their resolution; quantized once, ahead of time;
- **activations**, per token and dynamically: each row of x (one token's vector) gets its own scale, computed
  from the values at run time (no calibration data), so an outlier token does not crush the resolution of
  the others (Dettmers et al., 2022, "LLM.int8()"; Xiao et al., 2023, "SmoothQuant", use per-token
  activation scales for the same reason).

A linear layer then multiplies integers and rescales once (Jacob et al., 2018, "Quantization and Training
of Neural Networks for Efficient Integer-Arithmetic-Only Inference", eq. 4, with zero points 0)::

    y_ij = s_x,i · s_w,j · Σ_k q_x,ik q_w,jk + b_j       i.e.   Y = (Q_x Q_wᵀ) ⊙ (s_x s_wᵀ) + b

The sum is exact in int32 (|Σ| <= K·127² < 2³¹ for K < 133,000), so the only errors are the roundings of x
and W, each at most half a step: :class:`Int8Linear` is within
Σ_k (s_x/2·|w_jk| + s_w,j/2·|x_k| + s_x·s_w,j/4) of the float layer (plus float rounding).

Four bytes per weight become one (plus a scale per row): ~4x smaller linear layers; an int8 matmul
does four times the multiply-adds per instruction of fp32 (AVX-512 VNNI: ``vpdpbusd``), which is what
makes it faster on a CPU. What stays in float: LayerNorm (a few parameters, and sensitive), biases (fp32,
added after the rescale), an output layer tied to the token embedding, and embeddings unless asked
(a lookup has no matmul to speed up; :class:`Int8Embedding` stores a table in int8 for size alone): see
:func:`quantize_model`.

:func:`library_quantize` does the same through torchao (its docstring says why torchao and not
``torch.ao.quantization``), :func:`weights_size_bytes` measures what a model's weights take on disk, and
:func:`compare_precisions` measures fp32, bf16 and both int8 models side by side.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pathlib
import time
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from minillm import MinillmError
from minillm.checkpoint import tied_names
from minillm.files import atomic_write_bytes
from minillm.timing import time_callable

QMAX = 127  # symmetric int8: codes -127..127 (-128 is left out, so that q and -q both exist)


# ---------------------------------------------------------------------------------------------
# The formulas: quantize rows, dequantize
# ---------------------------------------------------------------------------------------------

def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of each row (the last dimension) of ``x`` (..., K).

    Returns ``q`` (..., K) int8 and ``scale`` (..., 1) float32 with ``scale = max|row| / 127`` and
    ``q = clamp(round(x / scale), -127, 127)``; the row's largest magnitude maps to ±127. A row whose scale
    is 0 (all zeros, or so small that max/127 underflows) gets scale 1: its codes are all 0.
    The work is in float32 whatever the input's dtype (bf16 has too few bits to divide exactly)."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True) / QMAX  # (..., 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # guard: no 0/0 for an all-zero row
    q = (x / scale).round_().clamp_(-QMAX, QMAX).to(torch.int8)  # (..., K); in place: one float temporary
    return q, scale


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear layer's weight (out_features, in_features) -> int8 codes (out, in) and one scale per output
    channel (out, 1): :func:`quantize_rows` on the rows of W (each row makes one output feature)."""
    if weight.dim() != 2:
        raise ValueError(f"a linear weight is 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    return quantize_rows(weight.detach())


def quantize_activation_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations (..., C), e.g. (B, T, C) -> int8 codes (..., C) and one scale per token (..., 1), computed
    from this input (dynamic quantization): :func:`quantize_rows` on every token's vector."""
    return quantize_rows(x)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x̂ = q · scale, in float32 (``scale`` broadcasts: (out, 1) per channel, (..., 1) per token)."""
    return q.float() * scale


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b`` of int8 matrices a (M, K) and b (K, N), accumulated in int32: (M, N) int32.

    On the CPU and on CUDA (where cuBLAS asks M > 16 and K, N multiples of 8) this is ``torch._int_mm``:
    on the CPU, oneDNN's int8 GEMM, with AVX-512 VNNI where the CPU has it (~5x faster than an fp32 matmul
    of the same shape on the course's CPU). Elsewhere, :func:`int8_matmul_in_float`; and for K = 1, where
    the CPU ``torch._int_mm`` of torch 2.13 returns wrong numbers without an error: it reads the row stride of
    b (1, N), which for a size-1 dimension is arbitrary (1 for ``weight.t()``), as its leading dimension, and
    oneDNN rejects a leading dimension below N silently (pytorch/pytorch#195066; the tests catch it)."""
    m, k = a.shape
    n = b.shape[1]
    if k > 1 and (a.device.type == "cpu" or (a.device.type == "cuda" and m > 16 and k % 8 == 0 and n % 8 == 0)):
        return torch._int_mm(a, b)
    return int8_matmul_in_float(a, b)


def int8_matmul_in_float(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of int8 matrices taken in floating point, and still exact: every partial sum is an integer
    with |partial sum| <= K·127², which float32 holds exactly while K·127² <= 2²⁴ (K <= 1040) and float64
    beyond (2⁵³). For devices or shapes ``torch._int_mm`` does not take; ``a.int() @ b.int()`` would be exact
    too, but int32 matmuls are slow on CPUs and missing on GPUs."""
    exact_float = torch.float32 if a.shape[1] * QMAX * QMAX <= 2 ** 24 else torch.float64
    return (a.to(exact_float) @ b.to(exact_float)).to(torch.int32)


# ---------------------------------------------------------------------------------------------
# The int8 linear layer, and a model of them
# ---------------------------------------------------------------------------------------------

class Int8Linear(nn.Module):
    """``y = x Wᵀ + b`` with W stored in int8 (per-output-channel scales) and x quantized per token on the fly:

    .. math::  y = (Q_x Q_w^\\top) \\odot (s_x s_w^\\top) + b

    ``weight_int8`` (out, in) int8 is a buffer; ``weight_scale`` (out, 1) and ``bias`` (out,) are float32
    parameters with ``requires_grad=False`` (nothing here trains): parameters, not buffers, so that code
    that asks a module for its device and dtype with ``next(module.parameters())`` (the GPT's KV cache)
    finds a float tensor. The output has the input's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_scale = nn.Parameter(torch.ones(out_features, 1, device=device), requires_grad=False)
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        """The int8 version of a float ``nn.Linear`` (its weight quantized per output channel, its bias kept)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=linear.weight.device)
        q, scale = quantize_weight_per_channel(linear.weight)
        layer.weight_int8.copy_(q)
        layer.weight_scale.data.copy_(scale)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach().float())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        leading = x.shape[:-1]
        q_x, s_x = quantize_activation_per_token(x.reshape(-1, self.in_features))  # (M, K) int8, (M, 1): M = B·T
        accumulated = int8_matmul(q_x, self.weight_int8.t())  # (M, N) int32, exact
        # Rescale by s_x,i · s_w,j and add the bias: one conversion to float32, then in place. (Measured on the
        # course CPU: ``accumulated * s_x``, whose int32 · float32 promotion looks like one step, was ~20x slower
        # than this, and a new (M, N) temporary per step costs page faults.)
        y = accumulated.float()  # (M, N): exact up to 2^24, then rounded to float32's 24 bits
        y.mul_(s_x)  # · s_x,i, (M, 1)
        y.mul_(self.weight_scale.t())  # · s_w,j, (1, N)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*leading, self.out_features).to(x.dtype)  # (..., N)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Embedding(nn.Module):
    """An embedding table stored in int8, one scale per row (per token: :func:`quantize_rows`), weight only:
    a lookup dequantizes the rows it reads, ``e = q[id] · s[id]`` (float32). There is no matmul to speed up
    (a lookup reads C numbers per token); what it buys is size: a vocabulary of V × C floats is a large
    part of a small model (BERT-mini: 8000 × 256 of its 5.3M parameters).

    ``weight`` gives the whole table dequantized, for code that reads an embedding's weight."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight_scale = nn.Parameter(torch.ones(num_embeddings, 1, device=device), requires_grad=False)
        self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> "Int8Embedding":
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, device=embedding.weight.device)
        q, scale = quantize_rows(embedding.weight.detach())
        layer.weight_int8.copy_(q)
        layer.weight_scale.data.copy_(scale)
        return layer

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(self.weight_int8, self.weight_scale)  # (V, C)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize(self.weight_int8[ids], self.weight_scale[ids])  # (..., C)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


def tied_names_of_modules(model: nn.Module) -> set[str]:
    """The names of the modules holding a parameter that another module shares (GPT's ``lm_head`` and
    ``wte``: one matrix)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    return {name for name, module in model.named_modules()
            if any(owners[id(parameter)] > 1 for parameter in module.parameters(recurse=False))}


def names_to_quantize(model: nn.Module, skip: Iterable[str] = (), embeddings: bool = False) -> list[str]:
    """The layers :func:`quantize_model` replaces: every ``nn.Linear`` (and with ``embeddings`` every
    ``nn.Embedding``) but those named in ``skip`` and those whose weight another module shares."""
    skip = set(skip)
    unknown = skip - {name for name, _ in model.named_modules()}
    if unknown:
        raise MinillmError(f"quantize: the model has no layer named {sorted(unknown)[0]!r} to skip")
    kinds = (nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)
    tied = tied_names_of_modules(model)
    return [name for name, module in model.named_modules()
            if type(module) in kinds and name not in skip and name not in tied]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_model(model: nn.Module, skip: Iterable[str] = (), embeddings: bool = False) -> nn.Module:
    """A copy of ``model`` (in eval mode) whose ``nn.Linear`` layers are :class:`Int8Linear` (and, with
    ``embeddings``, whose ``nn.Embedding`` tables are :class:`Int8Embedding`); ``model`` is left unchanged.

    Stay in float32: LayerNorms (a few parameters that set every activation's scale), embeddings unless
    ``embeddings`` (a lookup has no matmul to speed up; quantizing them only saves bytes, which matters
    when the vocabulary is a large part of the model), the layers named in ``skip`` (e.g.
    ``("classifier",)``), and any layer whose weight another module shares. The GPT's ``lm_head`` is tied
    to the token embedding ``wte``: quantizing it would add an int8 copy beside the fp32 table the input
    still needs (more bytes, not fewer), and it is the layer that writes the logits, the most sensitive of
    all (LLM.int8() keeps it in float too); so both stay fp32 and tied. An untied output layer is quantized
    like any other. Only exact ``nn.Linear``/``nn.Embedding`` layers are replaced: a wrapper (a LoRA layer)
    computes more than ``x Wᵀ + b``; merge it first."""
    quantized = copy.deepcopy(model).eval()  # deepcopy keeps tied weights tied within the copy
    for name in names_to_quantize(quantized, skip, embeddings):
        layer = quantized.get_submodule(name)
        _replace(quantized, name, Int8Linear.from_linear(layer) if isinstance(layer, nn.Linear)
                 else Int8Embedding.from_embedding(layer))
    return quantized


# ---------------------------------------------------------------------------------------------
# The library: torchao
# ---------------------------------------------------------------------------------------------

def library_quantize(model: nn.Module, skip: Iterable[str] = ()) -> nn.Module:
    """The same scheme (int8 weights per output channel, int8 activations per token, dynamically; integer
    matmul, int32 accumulation) through torchao: ``quantize_(model, Int8DynamicActivationInt8WeightConfig())``,
    on a copy; the same layers as :func:`quantize_model` (tied and ``skip`` ones stay in float). The weights
    become torchao tensor subclasses inside ordinary ``nn.Linear`` layers.

    Why torchao: it is PyTorch's maintained quantization library (``torch.ao.quantization`` now points its
    users to it), its scheme is ours, so the two can be checked against each other, and it runs real int8
    matmuls on this CPU (``torch._int_mm``, oneDNN with AVX-512 VNNI). But it is built for ``torch.compile``:
    eager, it wraps every matmul in a dozen small elementwise operations (affine quantization with zero
    points, a uint8 shift and its correction) and is *slower* than fp32; compiled, Inductor fuses them and it
    is the fastest int8 path here. The alternative, ``torch.ao.quantization.quantize_dynamic`` (fbgemm
    kernels), is fast eagerly but deprecated (it warns "torch.ao.quantization is deprecated ... please
    migrate to use torchao eager mode quantize_ API", and the quantized tensor dtypes it builds on are being
    removed), and uses one scale for a whole activation tensor, with 7-bit activations on x86 (``reduce_range``).

    Rough times on the course's 2-core CPU (AVX-512 VNNI and BF16, no AMX; one thread, a busy machine):
    BERT classifier 4 layers × 256, batch 32 × 64 tokens, one forward pass: fp32 ~470-590 ms, bf16 ~230-280,
    int8 by hand (:class:`Int8Linear`, eager) ~280-330, torchao eager ~530-690 (slower than fp32), torchao
    compiled ~220-280 (after ~70 s of compiling the first time, ~15 s with Inductor's cache),
    ``quantize_dynamic`` ~320. The chapter 06 GPT (6 × 384), 8 × 256 tokens: fp32 ~1360 ms, bf16 ~760,
    by hand ~650, torchao eager ~1370.

    torchao differs from ours in small ways: its symmetric scale is max|row| / 127.5 with codes -128..127
    (ours: / 127, codes -127..127), so the two agree within the sum of their error bounds, not bit for bit."""
    # torchao logs a warning for each optional GPU kernel library it cannot load on a CPU-only machine.
    torchao_logger = logging.getLogger("torchao")
    level = torchao_logger.level
    torchao_logger.setLevel(logging.ERROR)
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    finally:
        torchao_logger.setLevel(level)
    quantized = copy.deepcopy(model).eval()
    chosen = set(names_to_quantize(quantized, skip))
    # set_inductor_config=False: leave torch.compile's global settings alone (compiled, it was as fast without)
    quantize_(quantized, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False),
              filter_fn=lambda module, name: name in chosen)
    return quantized


# ---------------------------------------------------------------------------------------------
# Size on disk, saving and loading an int8 model
# ---------------------------------------------------------------------------------------------

def _plain_tensors(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """A tensor subclass (torchao's int8 weight) as the plain tensors it is made of (``qdata``, ``scale``)."""
    if type(tensor) in (torch.Tensor, nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return {name: tensor.detach().contiguous().cpu()}  # the same memory when it already is (ties stay visible)
    inner_names, _ = tensor.__tensor_flatten__()
    found = {}
    for inner in inner_names:
        found.update(_plain_tensors(f"{name}.{inner}", getattr(tensor, inner)))
    return found


def weights_state(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors that saving ``model``'s weights writes: its state dict with tied weights once, tensor
    subclasses split into their plain parts, and (``dtype``, e.g. bf16) floating tensors cast to ``dtype``."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        tensors.update(_plain_tensors(name, tensor))
    aliases = tied_names(tensors)
    tensors = {name: tensor for name, tensor in tensors.items() if name not in aliases}
    if dtype is not None:
        tensors = {name: t.to(dtype) if t.is_floating_point() else t for name, t in tensors.items()}
    return tensors


def weights_size_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of ``model``'s weights saved as one safetensors file (:func:`weights_state`: tied weights once;
    ``dtype`` casts the floating tensors first, e.g. ``torch.bfloat16``), header included."""
    from safetensors.torch import save

    return len(save(weights_state(model, dtype)))


def save_quantized(model: nn.Module, path: str | os.PathLike) -> pathlib.Path:
    """Write a :func:`quantize_model` model's weights (int8 codes, scales, the float rest) as safetensors,
    with the names of its int8 layers in the metadata; :func:`load_quantized` reads it back."""
    from safetensors.torch import save

    names = [name for name, module in model.named_modules() if isinstance(module, (Int8Linear, Int8Embedding))]
    if not names:
        raise MinillmError("save_quantized writes a model from quantize_model; this one has no int8 layer")
    return atomic_write_bytes(path, save(weights_state(model), metadata={"int8_layers": json.dumps(names)}))


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """The int8 model saved at ``path``, built on a float ``model`` of the same configuration (whose own
    weights do not matter; it is left unchanged)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        names = json.loads((handle.metadata() or {}).get("int8_layers", "null"))
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    if names is None:
        raise MinillmError(f"{path} was not written by save_quantized (no int8_layers in its metadata)")
    quantized = copy.deepcopy(model).eval()
    modules = dict(quantized.named_modules())
    for name in names:
        layer = modules.get(name)
        if isinstance(layer, nn.Linear):
            _replace(quantized, name, Int8Linear(layer.in_features, layer.out_features, layer.bias is not None,
                                                 device=layer.weight.device))
        elif isinstance(layer, nn.Embedding):
            _replace(quantized, name, Int8Embedding(layer.num_embeddings, layer.embedding_dim, device=layer.weight.device))
        else:
            raise MinillmError(f"{path} does not fit this model: it has no linear or embedding layer {name!r}")
    missing = set(quantized.state_dict()) - set(tensors) - tied_names(quantized.state_dict())
    if missing:
        raise MinillmError(f"{path} does not fit this model: it lacks {sorted(missing)[0]}")
    quantized.load_state_dict(tensors, strict=False)
    return quantized


# ---------------------------------------------------------------------------------------------
# Measuring: fp32 vs bf16 vs int8, one table
# ---------------------------------------------------------------------------------------------

PRECISIONS = ("fp32", "bf16", "int8 (by hand)", "int8 (torchao)")


def precision_variant(model: nn.Module, precision: str, skip: Iterable[str] = (), embeddings: bool = False) -> nn.Module:
    """A copy of ``model`` in eval mode at one of :data:`PRECISIONS` (``model`` is left as it is);
    ``skip`` and ``embeddings`` as in :func:`quantize_model` (torchao: linear layers only)."""
    fp32 = copy.deepcopy(model).float().eval()
    if precision == "fp32":
        return fp32
    if precision == "bf16":
        return fp32.to(torch.bfloat16)
    if precision == "int8 (by hand)":
        return quantize_model(fp32, skip, embeddings)
    if precision == "int8 (torchao)":
        return library_quantize(fp32, skip)
    raise MinillmError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")


def compare_precisions(model: nn.Module, inputs: Sequence | dict, metric: Callable[[nn.Module], float] | None = None,
                       *, precisions: Sequence[str] = PRECISIONS, skip: Iterable[str] = (), embeddings: bool = False,
                       compile_library: bool = True, warmup: int = 2, repeats: int = 10) -> list[dict]:
    """One row per precision: ``{"precision", "size_bytes", "size_vs_fp32", "metric", "latency_ms",
    "examples_per_s", "speedup_vs_fp32", "setup_s"}``.

    ``inputs`` is one batch, the arguments of one forward call (a tuple of positional arguments, or a dict
    of keyword arguments; e.g. ``(input_ids,)`` with 32 rows): its latency is the median of ``repeats``
    calls under ``torch.inference_mode`` after ``warmup`` (:func:`minillm.timing.time_callable`), and
    examples/s is the batch size (the first tensor's first dimension) over it. ``metric(variant)`` scores
    each variant (accuracy on SST-2 dev, validation loss, ...) under ``torch.inference_mode``; without it the
    column is None. Size is :func:`weights_size_bytes`; ``skip`` and ``embeddings`` go to :func:`quantize_model`
    (BERT-mini's 8000-word table is 39% of its weights: int8 linear layers alone make it ~1.8x smaller,
    with ``embeddings`` ~3.9x). ``setup_s`` is the time to make the variant and
    call it once.

    With ``compile_library`` the torchao model is timed through ``torch.compile`` (eager, torchao is slower
    than fp32 on a CPU: see :func:`library_quantize`); its first call compiles (about a minute on a small
    CPU, counted in ``setup_s``). The metric is taken on the same model eagerly: the same arithmetic,
    without recompiling for every new batch shape."""
    args, kwargs = (tuple(inputs), {}) if not isinstance(inputs, dict) else ((), dict(inputs))
    first = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), None)
    if first is None:
        raise MinillmError("compare_precisions needs one batch of tensors to time the model on")
    batch_size = first.shape[0]
    rows = []
    for precision in precisions:
        start = time.perf_counter()
        variant = precision_variant(model, precision, skip, embeddings)
        timed = torch.compile(variant) if compile_library and precision == "int8 (torchao)" else variant

        def forward(timed=timed):
            with torch.inference_mode():
                return timed(*args, **kwargs)

        forward()
        setup = time.perf_counter() - start
        latency = time_callable(forward, warmup=warmup, repeats=repeats)
        with torch.inference_mode():
            score = metric(variant) if metric is not None else None
        rows.append({"precision": precision, "size_bytes": weights_size_bytes(variant), "metric": score,
                     "latency_ms": 1e3 * latency, "examples_per_s": batch_size / latency, "setup_s": setup})
    base = next((row for row in rows if row["precision"] == "fp32"), rows[0])
    for row in rows:
        row["size_vs_fp32"] = base["size_bytes"] / row["size_bytes"]
        row["speedup_vs_fp32"] = base["latency_ms"] / row["latency_ms"]
    return rows


def markdown_table(rows: list[dict], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """Rows of dicts as a Markdown table (floats to ``digits`` significant digits; None as a dash)."""
    if not rows:
        return ""
    columns = list(columns or rows[0])

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(name)) for name in columns) + " |" for row in rows]
    return "\n".join(lines)

